"""Where the scripts differ from airbench94.py, and only there (as published in the release)."""
import pytest
import torch

from conftest import SMALL_WIDTHS, flatten, load_script

# Every hyperparameter that a script changes relative to airbench94.py.
DIFFERENCES = {
    'airbench94_compiled': {},
    'airbench95': {('opt', 'epochs'): 15, ('opt', 'lr'): 10.0,
                   ('net', 'widths'): {'block1': 128, 'block2': 384, 'block3': 384}},
    'airbench96': {('opt', 'epochs'): 37, ('opt', 'lr'): 9.0, ('opt', 'weight_decay'): 0.012,
                   ('opt', 'lr_warmup'): 0.1, ('opt', 'lr_end'): 0.0,  # warm-up from 0.2, as airbench94's
                   ('aug', 'translate'): 4, ('aug', 'cutout'): 12, ('net', 'batchnorm_momentum'): 0.9,
                   ('net', 'widths'): {'block1': 128, 'block2': 384, 'block3': 512}},
}


@pytest.mark.full_size
@pytest.mark.parametrize('name', DIFFERENCES)
def test_hyperparameters_differ_from_airbench94_exactly_where_the_spec_says(name):
    base, variant = flatten(load_script('airbench94').hyp), flatten(load_script(name).hyp)
    changed = {key: variant.get(key) for key in base.keys() | variant.keys() if base.get(key) != variant.get(key)}
    assert changed == DIFFERENCES[name]


def test_airbench96_blocks_have_a_residual_around_their_last_two_convs():
    airbench96 = load_script('airbench96')
    block = airbench96.ConvGroup(8, 16, batchnorm_momentum=0.9).eval()
    with torch.no_grad():
        block.conv2.weight.zero_()
        block.conv3.weight.zero_()  # the residual branch now adds BN3(0) = 0 (fresh running stats)
        x = torch.randn(2, 8, 16, 16)
        x0 = block.activ(block.norm1(block.pool(block.conv1(x))))
        assert torch.allclose(block(x), block.activ(x0), atol=1e-6)


def test_airbench94_blocks_have_no_third_conv():
    block = load_script('airbench94').ConvGroup(8, 16, batchnorm_momentum=0.6)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in block.modules()) == 2


def test_compiled_script_says_when_it_cannot_compile_and_trains_uncompiled(monkeypatch, tiny_data_dir):
    compiled = load_script('airbench94_compiled')
    monkeypatch.setattr(compiled.shutil, 'which', lambda name: None)
    problem = compiled.compile_problem(torch.device('cpu'))
    assert 'no C++ compiler' in problem
    net = compiled.compile_net(compiled.make_net(), torch.device('cpu'))
    assert net.forward.__func__ is compiled.Net.forward  # left as it was
    monkeypatch.setitem(compiled.hyp['net'], 'widths', SMALL_WIDTHS)
    loader = compiled.CifarLoader(tiny_data_dir, batch_size=64, device='cpu')
    compiled.train(loader, dtype=torch.float32, epochs=1, seed=0)


@pytest.mark.compile
def test_compiled_network_computes_what_the_uncompiled_one_does(monkeypatch):
    compiled = load_script('airbench94_compiled')
    if compiled.compile_problem(torch.device('cpu')):
        pytest.skip(compiled.compile_problem(torch.device('cpu')))
    monkeypatch.setitem(compiled.hyp['net'], 'widths', SMALL_WIDTHS)
    torch.manual_seed(0)
    eager = compiled.set_precision(compiled.make_net(), torch.float32)
    compiled.init_whitening_conv(eager.whiten, torch.randn(8, 3, 32, 32))
    net = compiled.compile_net(compiled.set_precision(compiled.make_net(), torch.float32), torch.device('cpu'))
    net.load_state_dict(eager.state_dict())
    x = torch.randn(16, 3, 32, 32)
    for mode in (True, False):  # training (batch statistics) and evaluation (running statistics)
        eager.train(mode), net.train(mode)
        assert torch.allclose(net(x), eager(x), atol=1e-4, rtol=1e-4)
    assert net.state_dict().keys() == eager.state_dict().keys()  # compiled in place: same API
