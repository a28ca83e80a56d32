"""The network: its size, its frozen parts and its initialization."""
import pytest
import torch

from conftest import only_for

MUON_FAMILY = ('airbench94_muon', 'airbench94_2025')


@pytest.mark.full_size
def test_parameter_count_matches_the_paper(script, expected):
    assert sum(p.numel() for p in script.make_net().parameters()) == expected['parameters']


def test_whitening_weights_and_batchnorm_scales_are_frozen(script, expected):
    torch.manual_seed(0)
    net = script.make_net()
    assert not net.whiten.weight.requires_grad
    assert net.whiten.bias.requires_grad  # trains for the first epochs, then train() freezes it
    if script.__name__ in MUON_FAMILY:  # as published: PyTorch's default conv-bias init, U(+-1/sqrt(fan_in = 12))
        assert 0 < net.whiten.bias.abs().min() and net.whiten.bias.abs().max() <= 12 ** -0.5
        assert net.whiten.bias.std() > 0.3 * 12 ** -0.5  # spread over the range (uniform: std 0.58 of the bound)
    else:
        assert torch.all(net.whiten.bias == 0)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 3 * expected['convs_per_block']
    for norm in norms:
        assert not norm.weight.requires_grad and norm.bias.requires_grad
        assert torch.all(norm.weight == 1)
        assert norm.momentum == pytest.approx(1 - script.hyp['net']['batchnorm_momentum']) and norm.eps == 1e-12


def test_frozen_parameters_are_not_given_to_the_optimizer(script):
    only_for(script, 'make_optimizer')  # airbench94_muon: tests/test_muon.py
    net = script.make_net()
    optimizer = script.make_optimizer(net, script.hyp['opt'], batch_size=1024)
    optimized = {id(p) for group in optimizer.param_groups for p in group['params']}
    assert id(net.whiten.weight) not in optimized
    assert all(id(p) in optimized for p in net.parameters() if p.requires_grad)


def test_convs_start_as_partial_identity(script, expected):
    net = script.make_net()
    convs = [m for m in net.modules() if isinstance(m, script.Conv)]
    assert len(convs) == 3 * expected['convs_per_block']
    for conv in convs:
        x = torch.randn(2, conv.in_channels, 8, 8)
        y = conv(x)
        # The first in_channels outputs copy the input channels exactly.
        assert torch.allclose(y[:, :conv.in_channels], x, atol=1e-6)


def test_output_shape_and_spatial_sizes(script):
    net = script.make_net()
    sizes = []
    for block in [m for m in net.modules() if isinstance(m, script.ConvGroup)]:
        block.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
    logits = net(torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 10) and logits.dtype == torch.float32
    assert sizes == [15, 7, 3]


def test_logits_are_the_heads_output_scaled_down(script):
    """As published: the head's output times 1/9 in float32 (airbench94_muon, airbench94_2025: 1/width,
    tests/test_muon.py and tests/test_2025.py)."""
    if 'scaling_factor' not in script.hyp['net']:
        pytest.skip(f'{script.__name__} divides its logits by the width')
    assert script.hyp['net']['scaling_factor'] == 1 / 9
    net = script.make_net()
    heads = []
    net.head.register_forward_hook(lambda module, inputs, output: heads.append(output))
    logits = net(torch.randn(2, 3, 32, 32))
    assert torch.allclose(logits, heads[0].float() / 9, rtol=1e-6, atol=0)


def test_activations_are_gelu(script):
    """As published: GELU after the whitening conv and in every block (airbench94_2025's blocks: SiLU, the record's)."""
    net = script.make_net()
    blocks = [m for m in net.modules() if isinstance(m, script.ConvGroup)]
    in_blocks = torch.nn.SiLU if script.__name__ == 'airbench94_2025' else torch.nn.GELU
    assert type(net.layers[0]) is torch.nn.GELU
    assert len(blocks) == 3 and all(type(block.activ) is in_blocks for block in blocks)
