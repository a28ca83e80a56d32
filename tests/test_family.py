"""Where the scripts differ from airbench94.py, and only there (as published in the release)."""
import pytest
import torch

from conftest import SMALL_WIDTHS, Stop, flatten, load_script

# Every hyperparameter that a script changes relative to airbench94.py.
DIFFERENCES = {
    'airbench94_compiled': {('net', 'compile_on'): ('cuda',)},  # where it compiles
    'airbench95': {('opt', 'epochs'): 15, ('opt', 'lr'): 10.0,
                   ('net', 'widths'): {'block1': 128, 'block2': 384, 'block3': 384}},
    'airbench96': {('opt', 'epochs'): 37, ('opt', 'lr'): 9.0, ('opt', 'weight_decay'): 0.012,
                   ('opt', 'lr_warmup'): 0.1, ('opt', 'lr_end'): 0.0,  # warm-up from 0.2, as airbench94's
                   ('aug', 'translate'): 4, ('aug', 'cutout'): 12, ('net', 'batchnorm_momentum'): 0.9,
                   ('net', 'widths'): {'block1': 128, 'block2': 384, 'block3': 512}},
}
DIFFERENCES['airbench96_faster'] = {  # airbench96, 45 epochs of the stream, and the proxy
    **DIFFERENCES['airbench96'], ('opt', 'epochs'): 45, ('net', 'compile_on'): ('cuda',),
    ('opt', 'whiten_bias_epochs'): None,  # the whitening bias trains throughout, as published
    ('proxy', 'widths'): {'block1': 32, 'block2': 64, 'block3': 64}, ('proxy', 'keep_fraction'): 0.5,
    ('proxy', 'train_every'): 4}


@pytest.mark.full_size
@pytest.mark.parametrize('name', DIFFERENCES)
def test_hyperparameters_differ_from_airbench94_exactly_where_the_spec_says(name):
    base, variant = flatten(load_script('airbench94').hyp), flatten(load_script(name).hyp)
    changed = {key: variant.get(key) for key in base.keys() | variant.keys() if base.get(key) != variant.get(key)}
    assert changed == DIFFERENCES[name]


@pytest.mark.parametrize('name', ['airbench96', 'airbench96_faster'])
def test_airbench96_blocks_have_a_residual_around_their_last_two_convs(name):
    """conv -> pool -> BN -> GELU = x0; conv -> BN -> GELU; conv -> BN; + x0; GELU (the published block)."""
    torch.manual_seed(0)
    block = load_script(name).ConvGroup(8, 16, batchnorm_momentum=0.9).eval()
    with torch.no_grad():
        for norm in (block.norm1, block.norm2, block.norm3):  # BatchNorms far from the identity
            norm.running_mean.uniform_(-1, 1), norm.running_var.uniform_(0.5, 4), norm.bias.uniform_(-1, 1)
        x = torch.randn(2, 8, 16, 16)
        x0 = block.activ(block.norm1(block.pool(block.conv1(x))))
        residual = block.norm3(block.conv3(block.activ(block.norm2(block.conv2(x0)))))
        assert torch.allclose(block(x), block.activ(residual + x0), atol=1e-5)


def test_airbench94_blocks_have_no_third_conv():
    block = load_script('airbench94').ConvGroup(8, 16, batchnorm_momentum=0.6)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in block.modules()) == 2


def test_compiled_script_compiles_on_cuda_only_unless_told(monkeypatch):
    compiled = load_script('airbench94_compiled')
    assert "compile_on'] leaves cpu out" in compiled.compile_problem(torch.device('cpu'))
    assert 'compile_on' not in (compiled.compile_problem(torch.device('cuda')) or '')
    monkeypatch.setitem(compiled.hyp['net'], 'compile_on', ())
    assert "compile_on'] leaves cuda out" in compiled.compile_problem(torch.device('cuda'))


def test_compiled_script_says_when_it_cannot_compile_and_trains_uncompiled(monkeypatch, tiny_data_dir):
    compiled = load_script('airbench94_compiled')
    monkeypatch.setitem(compiled.hyp['net'], 'compile_on', ('cuda', 'cpu'))
    monkeypatch.setattr(compiled.shutil, 'which', lambda name: None)
    problem = compiled.compile_problem(torch.device('cpu'))
    assert 'no C++ compiler' in problem
    net = compiled.compile_net(compiled.make_net(), torch.device('cpu'))
    assert net.forward.__func__ is compiled.Net.forward  # left as it was
    monkeypatch.setitem(compiled.hyp['net'], 'widths', SMALL_WIDTHS)
    loader = compiled.CifarLoader(tiny_data_dir, batch_size=64, device='cpu')
    compiled.train(loader, dtype=torch.float32, epochs=1, seed=0)
    monkeypatch.setattr(torch._dynamo, 'is_dynamo_supported', lambda: False)  # e.g. a Python too new for it
    assert 'torch.compile does not support Python' in compiled.compile_problem(torch.device('cuda'))


@pytest.mark.compile
def test_compiled_network_computes_what_the_uncompiled_one_does(monkeypatch):
    """The graphs torch.compile captures (Dynamo, and AOTAutograd's forward and backward) compute what the eager
    network does. Inductor's own code generation (slow on a CPU, and another backend on CUDA) is left out."""
    compiled = load_script('airbench94_compiled')
    monkeypatch.setitem(compiled.hyp['net'], 'compile_on', ('cuda', 'cpu'))
    if compiled.compile_problem(torch.device('cpu')):
        pytest.skip(compiled.compile_problem(torch.device('cpu')))
    monkeypatch.setitem(compiled.hyp['net'], 'widths', SMALL_WIDTHS)
    compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, 'compile', lambda net, **kwargs: compile(net, backend='aot_eager'))
    torch.manual_seed(0)
    eager = compiled.set_precision(compiled.make_net(), torch.float32)
    compiled.init_whitening_conv(eager.whiten, torch.randn(8, 3, 32, 32))
    net = compiled.compile_net(compiled.set_precision(compiled.make_net(), torch.float32), torch.device('cpu'))
    net.load_state_dict(eager.state_dict())
    x = torch.randn(16, 3, 32, 32)
    for mode in (True, False):  # training (batch statistics) and evaluation (running statistics)
        eager.train(mode), net.train(mode)
        assert torch.allclose(net(x), eager(x), atol=1e-4, rtol=1e-4)
    net(x).square().sum().backward(), eager(x).square().sum().backward()
    assert torch.allclose(net.head.weight.grad, eager.head.weight.grad, atol=1e-4, rtol=1e-4)
    assert net.state_dict().keys() == eager.state_dict().keys()  # compiled in place: same API


@pytest.mark.compile
def test_the_warm_up_compiles_every_graph_and_later_runs_compile_nothing(monkeypatch, tiny_data_dir):
    """One graph for training (the whitening-bias freeze drops a gradient rather than switching requires_grad),
    one for evaluation and one for the TTA's shifted views: all compiled by the warm-up, none by a later run."""
    import argparse

    from torch._dynamo.utils import counters
    compiled = load_script('airbench94_compiled')
    monkeypatch.setitem(compiled.hyp['net'], 'compile_on', ('cuda', 'cpu'))
    if compiled.compile_problem(torch.device('cpu')):
        pytest.skip(compiled.compile_problem(torch.device('cpu')))
    monkeypatch.setitem(compiled.hyp['net'], 'widths', SMALL_WIDTHS)
    monkeypatch.setitem(compiled.hyp['opt'], 'batch_size', 64)
    compile = torch.nn.Module.compile  # Dynamo's graphs and guards, without Inductor's code generation (slow here)
    monkeypatch.setattr(torch.nn.Module, 'compile', lambda net, **kwargs: compile(net, backend='eager', dynamic=False))
    torch._dynamo.reset()
    train = compiled.CifarLoader(tiny_data_dir, batch_size=64, aug=compiled.hyp['aug'], device='cpu')
    test = compiled.CifarLoader(tiny_data_dir, train=False, batch_size=64, device='cpu')
    args = argparse.Namespace(device=torch.device('cpu'), dtype=torch.float32, tta_level=2)
    before = counters['stats']['unique_graphs']  # counted since the process started
    compiled.warm_up(args, train, test)
    graphs = counters['stats']['unique_graphs']
    assert graphs - before == 3
    net = compiled.train(train, test, dtype=torch.float32, epochs=4, seed=0)  # a timed run: past the freeze
    compiled.evaluate(net, test, tta_level=2)
    assert counters['stats']['unique_graphs'] == graphs


def test_on_cuda_an_untimed_warm_up_trains_first_and_leaves_the_loader_whole(script, tiny_data_dir, monkeypatch):
    """cudnn's autotuning, lazy initialization and compilation stay out of the timed runs, compiled or not; a CPU
    has nothing to warm up. airbench94_compiled's warm-up is one batch an epoch, past the whitening bias's freeze."""
    import argparse
    loader = script.CifarLoader(tiny_data_dir, batch_size=64, aug=script.hyp['aug'], device='cpu')
    trained = []

    def recorder(train_loader, *args, **kwargs):
        trained.append((len(train_loader.images), kwargs['epochs']))
        raise Stop
    monkeypatch.setattr(script, 'train', recorder)
    for device in ('cpu', 'cuda'):
        args = argparse.Namespace(device=torch.device(device), dtype=torch.float32, epochs=2, tta_level=2)
        try:
            script.warm_up(args, loader, loader)
        except Stop:
            pass
    compiled = script.__name__ == 'airbench94_compiled'
    assert trained == [(64, script.hyp['opt']['whiten_bias_epochs'] + 1) if compiled else (256, 2)]
    assert len(loader.images) == len(loader.labels) == 256 and loader.epoch == 0


@pytest.mark.parametrize('name', ['airbench94_compiled', 'airbench94_muon', 'airbench94_2025', 'airbench96_faster'])
def test_each_network_is_compiled_where_hyp_says_and_only_there(name, monkeypatch, tiny_data_dir):
    """On CUDA by default (max-autotune), on a CPU only if hyp['net']['compile_on'] names it; Muon's
    Newton-Schulz with the network. torch.compile itself is replaced by a recorder here."""
    script = load_script(name)
    monkeypatch.setitem(script.hyp['net'], 'widths', SMALL_WIDTHS)
    compiled = []
    monkeypatch.setattr(torch.nn.Module, 'compile', lambda net, **kwargs: compiled.append((type(net).__name__, kwargs)))
    monkeypatch.setattr(torch, 'compile', lambda fn, **kwargs: compiled.append((fn.__name__, kwargs)) or fn)
    loader = script.CifarLoader(tiny_data_dir, batch_size=64, aug=script.hyp['aug'], device='cpu')
    script.train(loader, dtype=torch.float32, epochs=1, seed=0)
    assert compiled == []  # eager on a CPU by default
    assert script.hyp['net']['compile_on'] == ('cuda',)
    monkeypatch.setitem(script.hyp['net'], 'compile_on', ('cuda', 'cpu'))
    script.train(loader, dtype=torch.float32, epochs=1, seed=0)
    expected = {'airbench94_compiled': ['Net'], 'airbench94_muon': ['Net', 'newton_schulz'],
                'airbench94_2025': ['Net', 'newton_schulz'], 'airbench96_faster': ['Net', 'Net']}[name]  # + proxy
    assert sorted(what for what, _ in compiled) == expected
    assert all(kwargs.get('dynamic') is False for _, kwargs in compiled)


@pytest.mark.parametrize('name', ['airbench94_compiled', 'airbench94_muon', 'airbench94_2025', 'airbench96_faster'])
def test_on_cuda_the_network_compiles_with_max_autotune_and_static_shapes_where_triton_is(name, monkeypatch):
    """As published: mode max-autotune, one graph per shape. torch.compile itself is replaced by a recorder."""
    import torch.utils._triton
    script = load_script(name)
    calls = []
    monkeypatch.setattr(torch.nn.Module, 'compile', lambda net, **kwargs: calls.append(kwargs))
    for triton in (False, True):
        monkeypatch.setattr(torch.utils._triton, 'has_triton', lambda: triton)
        script.compile_net(script.make_net(), torch.device('cuda'))
    assert calls == [dict(mode='max-autotune', dynamic=False)]


COMPILING = ['airbench94_compiled', 'airbench94_muon', 'airbench94_2025', 'airbench96_faster',
             'ablations/main8_compile']


def reusing_output_memory(net):
    """Make `net` behave as compiled with CUDA graphs (max-autotune): each call returns its output in memory that
    the next call overwrites (here with NaN, then its own output; on a GPU, reading it raises an error)."""
    forward, memory = net.forward, {}

    def forward_into_memory(x):
        with torch.no_grad():
            for output in memory.values():
                output.fill_(float('nan'))
        output = forward(x)
        return memory.setdefault(output.shape, torch.empty_like(output)).detach_().copy_(output)  # a graph per call
    net.forward = forward_into_memory
    return net


@pytest.mark.parametrize('name', COMPILING)
def test_evaluation_keeps_no_network_output_past_the_next_call_as_cuda_graphs_overwrite_it(name, tiny_data_dir,
                                                                                         monkeypatch):
    """Every TTA level, over several batches, gives the same logits from a network that reuses its output memory."""
    script = load_script(name)
    monkeypatch.setitem(script.hyp['net'], 'widths', SMALL_WIDTHS)
    net = script.make_net().eval()
    test = script.CifarLoader(tiny_data_dir, train=False, batch_size=64, device='cpu')
    expected = {tta_level: script.infer(net, test, tta_level, batch_size=16) for tta_level in script.TTA_VIEWS}
    reusing_output_memory(net)
    for tta_level in script.TTA_VIEWS:
        assert torch.allclose(script.infer(net, test, tta_level, batch_size=16), expected[tta_level]), tta_level


@pytest.mark.parametrize('name', COMPILING)
def test_a_training_reads_each_network_output_before_the_next_call_as_cuda_graphs_need(name, tiny_data_dir,
                                                                                     monkeypatch):
    """With its networks reusing their output memory (the proxy too), a training reports the same epochs, per-epoch
    evaluation included, and ends with the same TTA logits."""
    script = load_script(name)
    monkeypatch.setitem(script.hyp['net'], 'widths', SMALL_WIDTHS)
    train = script.CifarLoader(tiny_data_dir, batch_size=64, aug=script.hyp['aug'], device='cpu')
    test = script.CifarLoader(tiny_data_dir, train=False, batch_size=64, device='cpu')

    def run():
        rows = []
        net = script.train(train, test, report=rows.append, dtype=torch.float32, epochs=1, seed=0)
        return [(row['train_loss'], row['train_acc'], row['val_acc']) for row in rows], script.infer(net, test)
    rows, logits = run()
    monkeypatch.setattr(script, 'compile_net', lambda net, device: reusing_output_memory(net))
    patched_rows, patched_logits = run()
    assert patched_rows == rows and torch.equal(patched_logits, logits)


@pytest.mark.parametrize('name', ['airbench94_muon', 'airbench94_2025', 'airbench96_faster'])
def test_without_triton_a_cuda_run_trains_uncompiled(name, monkeypatch):
    """torch.compile needs Triton to generate CUDA code (absent e.g. on Windows): the script then trains as it
    would with compilation switched off, instead of failing at its first step."""
    import torch.utils._triton
    script = load_script(name)
    cuda, cpu = torch.device('cuda'), torch.device('cpu')
    monkeypatch.setattr(torch.utils._triton, 'has_triton', lambda: True)
    assert script.compiles_on(cuda) and not script.compiles_on(cpu)
    monkeypatch.setattr(torch.utils._triton, 'has_triton', lambda: False)
    assert not script.compiles_on(cuda)
    compiled = []  # compile_net asks compiles_on: torch.compile itself is replaced by a recorder here
    monkeypatch.setattr(torch.nn.Module, 'compile', lambda net, **kwargs: compiled.append(type(net).__name__))
    script.compile_net(script.make_net(), cuda)
    assert compiled == []
    monkeypatch.setattr(torch.utils._triton, 'has_triton', lambda: True)
    script.compile_net(script.make_net(), cuda)
    assert compiled == ['Net']
    monkeypatch.setattr(torch.utils._triton, 'has_triton', lambda: False)
    monkeypatch.setitem(script.hyp['net'], 'compile_on', ('cuda', 'cpu'))
    assert script.compiles_on(cpu) and not script.compiles_on(cuda)


@pytest.mark.parametrize('name', COMPILING)
def test_compiled_each_training_takes_over_the_memory_of_the_last_as_cuda_graphs_are_recorded_there(
        name, tiny_data_dir, monkeypatch):
    """A training's compiled networks (the proxy too) have their parameters and buffers at the addresses of the
    previous training's, even while that network is still held, and train as fresh ones: the same epochs and
    logits as uncompiled. torch.compile itself is replaced by a recorder of those addresses."""
    script = load_script(name)
    monkeypatch.setitem(script.hyp['net'], 'widths', SMALL_WIDTHS)
    train = script.CifarLoader(tiny_data_dir, batch_size=64, aug=script.hyp['aug'], device='cpu')
    test = script.CifarLoader(tiny_data_dir, train=False, batch_size=64, device='cpu')
    addresses = []
    monkeypatch.setattr(torch.nn.Module, 'compile', lambda net, **kwargs: addresses.append(
        [tensor.data_ptr() for tensor in net.state_dict().values()]))
    monkeypatch.setattr(torch, 'compile', lambda fn, **kwargs: fn)

    def run():
        rows = []
        net = script.train(train, test, report=rows.append, dtype=torch.float32, epochs=1, seed=0)
        return net, [(row['train_loss'], row['train_acc'], row['val_acc']) for row in rows], script.infer(net, test)
    _, rows, logits = run()
    assert addresses == []  # uncompiled on a CPU by default
    monkeypatch.setitem(script.hyp['net'], 'compile_on', ('cuda', 'cpu'))
    first, first_rows, first_logits = run()
    networks = 2 if name == 'airbench96_faster' else 1  # the proxy too
    _, second_rows, second_logits = run()  # while the first network is held
    assert len(addresses) == 2 * networks and addresses[networks:] == addresses[:networks]
    assert first_rows == second_rows == rows
    assert torch.equal(first_logits, logits) and torch.equal(second_logits, logits)
