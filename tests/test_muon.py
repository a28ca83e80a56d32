"""airbench94_muon.py: the Muon optimizer and the parts of its recipe that airbench94 does not have (the
choice of precision for Newton-Schulz on airbench94_2025 too)."""
import math

import pytest
import torch

from conftest import SMALL_WIDTHS, Stop, load_script, quintic


@pytest.fixture
def muon(monkeypatch):
    script = load_script('airbench94_muon')
    monkeypatch.setitem(script.hyp['net'], 'widths', SMALL_WIDTHS)
    return script


def band():
    """Where one more iteration sends anything between the quintic's peak (x = 0.555) and its value there
    (1.202): about [0.68, 1.202]. The iteration oscillates in this band instead of converging to 1."""
    values = quintic(torch.linspace(0.555, 1.2024, 100_001, dtype=torch.float64), steps=1)
    return values.min().item(), values.max().item()


def test_the_recipe_is_the_published_one():
    muon = load_script('airbench94_muon')
    opt, aug, net = muon.hyp['opt'], muon.hyp['aug'], muon.hyp['net']
    assert (opt['batch_size'], opt['epochs'] * (50_000 // opt['batch_size'])) == (2000, 200)
    assert (opt['muon_lr'], opt['muon_momentum']) == (0.24, 0.6)
    assert (opt['bias_lr'], opt['head_lr'], opt['momentum'], opt['weight_decay']) == (0.053, 0.67, 0.85, 2e-6)
    assert (opt['label_smoothing'], opt['whiten_bias_epochs']) == (0.2, 3)
    assert aug == {'flip': True, 'translate': 2}
    assert (net['widths'], net['batchnorm_momentum'], net['tta_level']) == (
        {'block1': 64, 'block2': 256, 'block3': 256}, 0.6, 2)


@pytest.mark.parametrize('shape', [(64, 576), (576, 64), (256, 2304)])
def test_newton_schulz_keeps_singular_vectors_and_moves_singular_values_into_the_band(muon, shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    X = muon.newton_schulz(G, dtype=torch.float32)
    assert X.shape == G.shape
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    expected = U @ torch.diag(quintic(S / G.norm())) @ Vh  # a polynomial in G G^T times G
    assert torch.allclose(X, expected, atol=1e-4)
    singular_values = torch.linalg.svdvals(X)
    low, high = band()
    assert low - 1e-4 <= singular_values.min() and singular_values.max() <= high + 1e-4  # the band, not exactly 1


def test_newton_schulz_in_bfloat16_lands_in_the_same_band(muon):
    """The CUDA (and bf16-CPU) precision, exercised on any CPU."""
    G = torch.randn(64, 576, generator=torch.Generator().manual_seed(1))
    X = muon.newton_schulz(G, dtype=torch.bfloat16)
    assert X.dtype == torch.bfloat16
    singular_values = torch.linalg.svdvals(X.float())
    low, high = band()
    assert low - 0.05 <= singular_values.min() and singular_values.max() <= high + 0.05  # bf16 rounding


def test_muon_step_rescales_each_filter_tensor_then_moves_it_along_the_orthogonalized_momentum(muon):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(16, 8, 3, 3) * 5)
    optimizer = muon.Muon([weight], lr=0.24, momentum=0.6)
    gradients = [torch.randn(16, 8, 3, 3) for _ in range(2)]
    buffer = torch.zeros(16, 8, 3, 3)
    for gradient in gradients:
        before = weight.detach().clone()
        weight.grad = gradient.clone()
        optimizer.step()
        buffer = 0.6 * buffer + gradient
        rescaled = before * math.sqrt(16) / before.norm()  # Frobenius norm sqrt(out_channels)
        update = muon.newton_schulz((gradient + 0.6 * buffer).reshape(16, -1), dtype=torch.float32)
        assert torch.allclose(weight.detach(), rescaled - 0.24 * update.view(16, 8, 3, 3), atol=1e-5)


def test_with_a_zero_lr_muon_only_rescales_the_filters(muon):
    weight = torch.nn.Parameter(torch.randn(32, 4, 3, 3) * 3)
    weight.grad = torch.randn(32, 4, 3, 3)
    muon.Muon([weight], lr=0.0, momentum=0.6).step()
    assert weight.norm().item() == pytest.approx(math.sqrt(32), rel=1e-5)


def test_muon_trains_the_filters_and_sgd_everything_else(muon):
    net = muon.make_net()
    sgd, muon_optimizer = muon.make_optimizers(net, muon.hyp['opt'], batch_size=2000)
    by_muon = {id(p) for group in muon_optimizer.param_groups for p in group['params']}
    by_sgd = {id(p) for group in sgd.param_groups for p in group['params']}
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert by_muon | by_sgd == trainable and not by_muon & by_sgd
    assert by_muon == {id(m.weight) for m in net.modules() if isinstance(m, muon.Conv)}
    assert id(net.whiten.weight) not in by_sgd | by_muon
    whiten_bias, norm_biases, head = sgd.param_groups
    assert whiten_bias['params'] == [net.whiten.bias] and head['params'] == [net.head.weight]
    assert (whiten_bias['lr'], norm_biases['lr'], head['lr']) == (0.053, 0.053, 0.67)
    for group in sgd.param_groups:  # the same decay per step: 2e-6 per example
        assert group['lr'] * group['weight_decay'] == pytest.approx(2e-6 * 2000)
        assert group['nesterov'] and group['momentum'] == 0.85
    assert muon_optimizer.param_groups[0]['lr'] == 0.24 and muon_optimizer.param_groups[0]['momentum'] == 0.6


def test_lrs_fall_linearly_to_zero_and_the_whitening_bias_freezes_after_3_epochs(muon, tiny_data_dir, monkeypatch):
    loader = muon.CifarLoader(tiny_data_dir, train=True, batch_size=64, aug=muon.hyp['aug'], device='cpu')  # 4 steps
    lrs, whiten_bias_grads, muon_lrs = [], [], []
    sgd_step, muon_step = torch.optim.SGD.step, muon.Muon.step
    monkeypatch.setattr(muon.Muon, 'step', lambda self: muon_lrs.append(self.param_groups[0]['lr']) or muon_step(self))

    def recording_step(self, *args, **kwargs):
        lrs.append([group['lr'] for group in self.param_groups])
        whiten_bias_grads.append(self.param_groups[0]['params'][0].grad is not None)
        return sgd_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.SGD, 'step', recording_step)
    muon.train(loader, dtype=torch.float32, epochs=4.6, seed=0)
    total, whiten_steps = 19, 12  # 4.6 epochs of 4 steps: rounded up
    assert [lr[2] for lr in lrs] == pytest.approx([0.67 * (1 - s / total) for s in range(total)])
    assert muon_lrs == pytest.approx([0.24 * (1 - s / total) for s in range(total)])
    expected = [0.053 * (1 - s / whiten_steps) for s in range(whiten_steps)]
    assert [lr[0] for lr in lrs[:whiten_steps]] == pytest.approx(expected)
    assert whiten_bias_grads == [True] * whiten_steps + [False] * (total - whiten_steps)


def test_head_has_unit_std_and_the_logits_are_divided_by_the_width(muon):
    net = muon.make_net()
    assert net.head.bias is None
    assert net.head.weight.std().item() == pytest.approx(1.0, rel=1e-5)
    assert net.scaling_factor == 1 / SMALL_WIDTHS['block3']


def test_newton_schulz_runs_in_bfloat16_only_where_the_device_has_it(muon, monkeypatch):
    cpu, cuda = torch.device('cpu'), torch.device('cuda')
    monkeypatch.setattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: False)
    assert muon.newton_schulz_dtype(cpu) == torch.float32
    monkeypatch.setattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: True)
    assert muon.newton_schulz_dtype(cpu) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda: True)
    assert muon.newton_schulz_dtype(cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda: False)
    assert muon.newton_schulz_dtype(cuda) == torch.float32


@pytest.mark.parametrize('name', ['airbench94_muon', 'airbench94_2025'])
def test_training_orthogonalizes_in_the_precision_chosen_for_the_device(name, tiny_data_dir, monkeypatch):
    script = load_script(name)
    monkeypatch.setattr(script, 'newton_schulz_dtype', lambda device: torch.bfloat16)  # as on a CPU with bf16
    make_optimizers, chosen = script.make_optimizers, []

    def recorded(*args):
        chosen.append(make_optimizers(*args)[1].newton_schulz_dtype)
        raise Stop
    monkeypatch.setattr(script, 'make_optimizers', recorded)
    loader = script.CifarLoader(tiny_data_dir, train=True, batch_size=64, aug=script.hyp['aug'], device='cpu')
    with pytest.raises(Stop):
        script.train(loader, dtype=torch.float32, epochs=1, seed=0)
    assert chosen == [torch.bfloat16]
