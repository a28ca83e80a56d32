"""Optimization pieces and short end-to-end trainings on a tiny synthetic dataset. The device and
precision policy, the same in every script (test_bookkeeping.py), is tested on airbench94."""
import math

import pytest
import torch

from conftest import ONLY_AIRBENCH94, SMALL_WIDTHS, only_for

FAST = dict(epochs=2, seed=0)  # a few steps on the tiny dataset: seconds on a CPU


@pytest.fixture
def loaders(script, tiny_data_dir):
    train = script.CifarLoader(tiny_data_dir, train=True, batch_size=64, aug=script.hyp['aug'], device='cpu')
    test = script.CifarLoader(tiny_data_dir, train=False, batch_size=64, device='cpu')
    return train, test


def test_lr_schedule_values_at_its_knots(script):
    only_for(script, 'lr_multiplier')
    knobs = dict(warmup=0.23, start=0.2, end=0.07)
    total = 476
    warmup = 109  # int(0.23 * 476), as published: a whole number of steps
    assert script.lr_multiplier(0, total, **knobs) == pytest.approx(0.2)
    assert script.lr_multiplier(warmup - 1, total, **knobs) < 1.0
    assert script.lr_multiplier(warmup, total, **knobs) == 1.0
    assert script.lr_multiplier(total, total, **knobs) == pytest.approx(0.07)
    halfway_up = script.lr_multiplier(warmup / 2, total, **knobs)
    assert halfway_up == pytest.approx(0.6)  # linear in between
    values = [script.lr_multiplier(s, total, **knobs) for s in range(total)]
    peak = max(range(total), key=values.__getitem__)
    assert all(a < b for a, b in zip(values[:peak], values[1:peak + 1]))
    assert all(a > b for a, b in zip(values[peak:-1], values[peak + 1:]))


def test_optimizer_decouples_lr_momentum_and_weight_decay(script, expected):
    only_for(script, 'make_optimizer')
    net = script.make_net()
    opt = dict(script.hyp['opt'], lr=11.5, momentum=0.85, weight_decay=0.0153, bias_scaler=64.0)
    biases, others = script.make_optimizer(net, opt, batch_size=1024).param_groups
    k = 1024 * (1 + 1 / (1 - 0.85))
    assert others['lr'] == pytest.approx(11.5 / k)
    assert biases['lr'] == pytest.approx(64 * 11.5 / k)
    for group in (biases, others):  # the same total decay per step for both groups
        assert group['lr'] * group['weight_decay'] == pytest.approx(0.0153 * 1024 / k)
        assert group['nesterov'] and group['momentum'] == 0.85
    assert len(biases['params']) == 3 * expected['convs_per_block']


def test_lookahead_update_arithmetic(script):
    only_for(script, 'LookaheadState')
    net = torch.nn.BatchNorm2d(2)
    state = script.LookaheadState(net)
    with torch.no_grad():
        net.bias.fill_(1.0)
        net.running_mean.fill_(4.0)
    state.update(net, decay=0.75)
    # ema <- ema + (1 - decay) * (param - ema), and the net is pulled back to the ema.
    assert torch.allclose(net.bias, torch.full((2,), 0.25))
    assert torch.allclose(net.running_mean, torch.full((2,), 1.0))
    assert torch.allclose(state.ema['bias'], net.bias)
    with torch.no_grad():
        net.bias.fill_(5.0)
    state.update(net, decay=1.0)  # decay 1: the net is simply set to the ema
    assert torch.allclose(net.bias, torch.full((2,), 0.25))
    assert 'num_batches_tracked' not in state.ema


def test_lookahead_keeps_each_average_in_its_tensors_precision(script, monkeypatch):
    """As published: on a GPU the weights are float16 and BatchNorm float32; each average keeps its tensor's
    dtype, and both kinds are averaged and pulled back in the same update, one foreach call per dtype (the
    one-kernel path on a GPU takes tensors of one dtype)."""
    only_for(script, 'LookaheadState')
    lerp, calls = torch._foreach_lerp_, []
    record = lambda averages, current, weight: calls.append({t.dtype for t in averages + current})
    monkeypatch.setattr(torch, '_foreach_lerp_', lambda *args: record(*args) or lerp(*args))
    net = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False), torch.nn.BatchNorm1d(2))
    with torch.no_grad():
        net[0].weight.zero_()
    net[0].half()
    state = script.LookaheadState(net)
    assert state.ema['0.weight'].dtype == torch.float16 and state.ema['1.bias'].dtype == torch.float32
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[1].bias.fill_(1.0)
    state.update(net, decay=0.75)
    assert net[0].weight.dtype == torch.float16 and torch.equal(net[0].weight, torch.full((2, 2), 0.25).half())
    assert torch.equal(net[1].bias, torch.full((2,), 0.25)) and torch.equal(state.ema['0.weight'], net[0].weight)
    assert sorted(calls, key=str) == [{torch.float16}, {torch.float32}]


def test_lookahead_pulls_every_5_steps_ever_harder_and_ends_on_the_average(script, loaders, monkeypatch):
    """As published: every 5 steps an EMA update with decay 0.95**5 * (step / total_steps)**3, and
    the trained network is set to the EMA at the last step."""
    only_for(script, 'LookaheadState')
    monkeypatch.setitem(script.hyp['net'], 'widths', SMALL_WIDTHS)
    train, _ = loaders
    train.images, train.labels, train.batch_size = train.images[:64], train.labels[:64], 16
    # 4 steps per epoch: 4.6 epochs are 19 steps (18.4, rounded up)
    decays = []
    update = script.LookaheadState.update
    monkeypatch.setattr(script.LookaheadState, 'update',
                        lambda self, net, decay: decays.append(decay) or update(self, net, decay))
    script.train(train, dtype=torch.float32, epochs=4.6, seed=0)
    assert decays == pytest.approx([0.95**5 * (step / 19) ** 3 for step in (5, 10, 15)] + [1.0])


def test_tta_level_1_is_the_mean_of_image_and_mirror(script, loaders):
    _, test = loaders
    net = script.make_net().eval()
    with torch.no_grad():
        x = test.normalize(test.images)
        expected = 0.5 * (net(x) + net(x.flip(-1)))
    assert torch.allclose(script.infer(net, test, tta_level=1), expected, atol=1e-5)


def test_tta_level_2_adds_the_two_one_pixel_shifts(script, loaders):
    _, test = loaders
    net = script.make_net().eval()
    with torch.no_grad():
        x = test.normalize(test.images)
        padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode='reflect')
        level1 = lambda v: 0.5 * (net(v) + net(v.flip(-1)))
        expected = 0.5 * level1(x) + 0.25 * level1(padded[..., :32, :32]) + 0.25 * level1(padded[..., 2:, 2:])
    assert torch.allclose(script.infer(net, test, tta_level=2), expected, atol=1e-5)


def test_infer_ignores_shuffle_and_keeps_stored_order(script, loaders):
    train, _ = loaders
    net = script.make_net().eval()
    with torch.no_grad():
        expected = net(train.normalize(train.images))
    assert torch.allclose(script.infer(net, train, tta_level=0), expected, atol=1e-5)
    assert script.infer(net, train, tta_level=0).shape == (256, 10)
    net.train()  # infer evaluates in eval mode and gives the network back in the mode it found it in
    script.infer(net, train, tta_level=0)
    assert net.training


def test_training_end_to_end_learns_and_reports_each_epoch(script, loaders):
    train, test = loaders
    rows = []
    net = script.train(train, test, report=rows.append, dtype=torch.float32, epochs=8, seed=0)
    assert [r['epoch'] for r in rows] == list(range(1, 9))
    assert all(set(r) == {'epoch', 'train_loss', 'train_acc', 'val_acc', 'seconds'} for r in rows)
    assert rows[-1]['train_loss'] < rows[0]['train_loss']
    assert all(b['seconds'] > a['seconds'] for a, b in zip(rows, rows[1:]))
    assert script.evaluate(net, test) > 0.3  # classes are separable by colour; chance is 0.1


def test_whitening_bias_freezes_after_its_epochs(script, loaders, monkeypatch):
    only_for(script, 'LookaheadState')  # airbench94_muon: tests/test_muon.py
    if 'whiten_bias_epochs' not in script.hyp['opt']:
        pytest.skip(f'{script.__name__} trains its whitening bias throughout (tests/test_faster.py)')
    train, _ = loaders
    nets, biases = [], []
    make_net = script.make_net
    monkeypatch.setattr(script, 'make_net', lambda *a, **k: nets.append(make_net(*a, **k)) or nets[-1])
    script.train(train, report=lambda row: biases.append(nets[0].whiten.bias.detach().clone()),
                 dtype=torch.float32, epochs=5, seed=0, whiten_bias_epochs=2,
                 lookahead_every=10**9)  # no lookahead, so a frozen bias stays exactly put
    assert not torch.equal(biases[0], biases[1])  # epoch 2 still trains it
    assert torch.equal(biases[1], biases[2]) and torch.equal(biases[2], biases[3])  # frozen after


def test_fractional_epochs_stop_at_the_right_step(script, loaders, monkeypatch):
    train, _ = loaders  # 4 steps per epoch
    steps = []
    make_net = script.make_net

    def counted_net(*args, **kwargs):  # one forward of the trained network per step
        net = make_net(*args, **kwargs)
        net.register_forward_hook(lambda module, inputs, output: steps.append(1))
        return net
    monkeypatch.setattr(script, 'make_net', counted_net)
    script.train(train, dtype=torch.float32, epochs=1.3, seed=0)
    assert len(steps) == math.ceil(1.3 * 4)


def test_same_seed_gives_bit_identical_training_on_cpu(script, loaders):
    train, test = loaders
    dtype = script.choose_device_and_dtype('cpu')[1]  # the default CPU path (bf16 autocast where the CPU has bf16)
    nets = [script.train(train, dtype=dtype, **FAST) for _ in range(2)]
    for (name, a), b in zip(nets[0].state_dict().items(), nets[1].state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(script.infer(nets[0], test), script.infer(nets[1], test))
    other = script.train(train, dtype=dtype, epochs=2, seed=1)
    assert not torch.equal(script.infer(other, test), script.infer(nets[0], test))


@ONLY_AIRBENCH94
def test_float16_path_runs_on_cpu_with_float32_batchnorm(script, loaders):
    """The published CUDA precision (half weights, float32 BatchNorm), exercised here on the CPU."""
    train, test = loaders
    train.images, train.labels = train.images[:128], train.labels[:128]  # half precision is slow on CPUs
    net = script.train(train, test, dtype=torch.float16, **FAST)  # set_precision(net, float16)
    assert net.whiten.weight.dtype == torch.float16 and net.head.weight.dtype == torch.float16
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.bias.dtype == m.running_var.dtype == torch.float32 for m in norms)
    logits = script.infer(net, test)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.mark.parametrize('device, dtype, expected', [
    ('cpu', 'float32', torch.float32),
    ('cpu', 'float16', torch.float16),
    ('cpu', torch.bfloat16, torch.bfloat16),
])
@ONLY_AIRBENCH94
def test_device_and_dtype_overrides(script, device, dtype, expected):
    assert script.choose_device_and_dtype(device, dtype) == (torch.device('cpu'), expected)


@ONLY_AIRBENCH94
def test_default_precision_policy(script, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.mps, 'is_available', lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: True)
    assert script.choose_device_and_dtype() == (torch.device('cpu'), torch.bfloat16)
    monkeypatch.setattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: False)
    assert script.choose_device_and_dtype() == (torch.device('cpu'), torch.float32)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    assert script.choose_device_and_dtype() == (torch.device('cuda'), torch.float16)


@pytest.mark.parametrize('device, dtype, message', [
    ('tpu', None, 'unknown device'),
    ('cpu', 'int8', 'unknown dtype'),
])
@ONLY_AIRBENCH94
def test_bad_device_or_dtype_is_an_error(script, device, dtype, message):
    with pytest.raises(script.AirbenchError, match=message):
        script.choose_device_and_dtype(device, dtype)


@ONLY_AIRBENCH94
def test_cuda_without_a_gpu_is_an_error(script, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(script.AirbenchError, match='no CUDA GPU'):
        script.choose_device_and_dtype('cuda')


def lr_knob(script):
    return 'lr' if 'lr' in script.hyp['opt'] else 'head_lr'


@ONLY_AIRBENCH94
def test_nan_loss_stops_training_with_a_clear_message(script, loaders):
    train, _ = loaders
    with pytest.raises(script.AirbenchError, match='training diverged'):
        script.train(train, dtype=torch.float32, epochs=1, seed=0, **{lr_knob(script): float('inf')})


@pytest.mark.parametrize('overrides, message', [
    (dict(epochs=0), 'epochs must be positive'),
    (dict(learning_rate=1.0), 'unknown training option'),
])
@ONLY_AIRBENCH94
def test_bad_training_options_are_errors(script, loaders, overrides, message):
    with pytest.raises(script.AirbenchError, match=message):
        script.train(loaders[0], **overrides)


@pytest.mark.full_size
def test_flops_are_counted_not_typed_in(script, expected):
    """As published: e.g. airbench94 trains 476 steps of 1024 (0.345 PFLOPs) + 6-view TTA on 10k = 0.359 PFLOPs."""
    batch_size = script.hyp['opt']['batch_size']
    total_steps = math.ceil(expected['epochs'] * (50_000 // batch_size))
    train_flops, eval_flops = script.count_flops(total_steps, batch_size, 10_000, tta_level=2)
    assert train_flops + eval_flops == pytest.approx(expected['pflops'] * 1e15, rel=0.01)
    forward_per_image = eval_flops / 6 / 10_000
    # A training step is a forward and a backward: about 3x the forward (less the input-gradient of
    # the frozen first layer).
    if 'proxy' not in script.hyp:  # airbench96_faster trains on half of each batch, and runs a proxy too
        assert 2.8 < train_flops / (total_steps * batch_size * forward_per_image) < 3.0


def test_on_epoch_start_hook_sees_every_epoch_and_can_change_the_options(script, loaders, monkeypatch):
    """The experiments' hook: called before each epoch; what it writes into `opt` is used from then on."""
    train, _ = loaders  # 4 steps per epoch
    smoothing_used = []
    cross_entropy = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, 'cross_entropy',
                        lambda *a, **k: smoothing_used.append(k['label_smoothing']) or cross_entropy(*a, **k))
    epochs_seen = []

    def anneal(epoch, net, optimizer, opt):
        epochs_seen.append(epoch)
        opt['label_smoothing'] = 0.1 * epoch

    if hasattr(script, 'proxy_selection'):  # its proxy pass runs before the first epoch: keep every example, no calls
        monkeypatch.setattr(script, 'proxy_selection', lambda loader, opt, total_steps, *args:
                            torch.arange(loader.batch_size).expand(total_steps, -1))
    script.train(train, dtype=torch.float32, epochs=3, seed=0, on_epoch_start=anneal)
    assert epochs_seen == [0, 1, 2]
    assert smoothing_used == pytest.approx([0.0] * 4 + [0.1] * 4 + [0.2] * 4)
