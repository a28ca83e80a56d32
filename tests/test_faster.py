"""airbench96_faster.py: the proxy that chooses the data, and the main pass over the same stream."""
import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import SMALL_WIDTHS, Stop, load_script


@pytest.fixture
def faster(monkeypatch):
    script = load_script('airbench96_faster')
    monkeypatch.setitem(script.hyp['net'], 'widths', SMALL_WIDTHS)
    return script


def test_the_proxy_keeps_exactly_the_highest_loss_half(faster):
    losses = torch.tensor([0.3, 2.0, 0.1, 5.0, 1.0, 0.2, 4.0, 0.0])
    assert faster.keep_highest_loss(losses, keep=4).tolist() == [1, 3, 4, 6]  # in batch order
    assert faster.kept_per_batch(1024) == 512


def test_the_main_network_trains_on_the_kept_examples_of_the_same_stream(faster, tiny_data_dir, monkeypatch):
    loader = faster.CifarLoader(tiny_data_dir, train=True, batch_size=64, aug=faster.hyp['aug'], device='cpu')
    stream, trained_on, selections = [], [], []
    iterate = faster.CifarLoader.__iter__

    def recorded(self):
        for inputs, labels in iterate(self):
            stream.append((inputs.clone(), labels.clone()))
            yield inputs, labels
    monkeypatch.setattr(faster.CifarLoader, '__iter__', recorded)
    make_net, proxy_selection = faster.make_net, faster.proxy_selection

    def recorded_net(*args, **kwargs):
        net = make_net(*args, **kwargs)
        net.register_forward_hook(lambda module, inputs, output: trained_on.append(inputs[0].clone()))
        return net
    monkeypatch.setattr(faster, 'make_net', recorded_net)
    monkeypatch.setattr(faster, 'proxy_selection',
                        lambda *args: selections.append(proxy_selection(*args)) or selections[-1])
    faster.train(loader, dtype=torch.float32, epochs=2.5, seed=0)  # 10 steps: the proxy pass, then the main one

    total = 10
    assert len(stream) == 2 * total and len(trained_on) == total
    (kept,) = selections
    assert kept.shape == (total, 32) and (kept.diff(dim=1) > 0).all()  # 32 distinct positions of 64 a step
    for step in range(total):
        (proxy_inputs, proxy_labels), (inputs, labels) = stream[step], stream[total + step]
        assert torch.equal(inputs, proxy_inputs) and torch.equal(labels, proxy_labels)  # same order and augmentations
        assert torch.equal(trained_on[step], inputs[kept[step]])


def test_the_proxy_trains_on_every_4th_step_only(faster, tiny_data_dir, monkeypatch):
    loader = faster.CifarLoader(tiny_data_dir, train=True, batch_size=64, aug=faster.hyp['aug'], device='cpu')
    opt = dict(faster.hyp['opt'], epochs=2.5)
    steps = []
    sgd_step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, 'step', lambda self, *a, **k: steps.append(1) or sgd_step(self, *a, **k))
    books = faster.Bookkeeper(loader, torch.float32, opt)
    kept = faster.proxy_selection(loader, opt, total_steps=10, dtype=torch.float32, books=books)
    assert len(steps) == 3  # steps 0, 4 and 8 of 10
    assert kept.shape == (10, 32)


def test_flops_count_the_proxy_too(faster, monkeypatch):
    monkeypatch.setitem(faster.hyp['net'], 'widths', {'block1': 128, 'block2': 384, 'block3': 512})
    with_proxy = sum(faster.count_flops(2160, 1024, 10_000, tta_level=2))
    monkeypatch.setitem(faster.hyp['proxy'], 'train_every', 10**9)
    fewer_proxy_steps = sum(faster.count_flops(2160, 1024, 10_000, tta_level=2))
    assert fewer_proxy_steps < with_proxy
    assert with_proxy / 1e15 == pytest.approx(3.1, rel=0.03)  # published: 3.1 PFLOPs


def test_the_recipe_is_the_one_published(faster, tiny_data_dir, monkeypatch):
    """As released (it decides which examples are kept): both networks' weight decay is computed for the
    stream's batch, not the half each trains on; the proxy trains from its one scoring forward of the
    whole batch, with no lookahead, its whitening bias frozen at zero and the lr schedule over the
    stream's steps; the main network's whitening bias trains throughout."""
    loader = faster.CifarLoader(tiny_data_dir, train=True, batch_size=64, aug=faster.hyp['aug'], device='cpu')
    decay_batches, proxy_inputs, averaged, nets, proxies, multipliers, biases = [], [], [], [], [], [], []
    make_optimizer, make_net, make_proxy, LookaheadState = (faster.make_optimizer, faster.make_net, faster.make_proxy,
                                                             faster.LookaheadState)
    monkeypatch.setattr(faster, 'make_optimizer', lambda net, opt, batch_size: decay_batches.append(batch_size)
                        or make_optimizer(net, opt, batch_size))
    monkeypatch.setattr(faster, 'make_net', lambda: nets.append(make_net()) or nets[-1])

    def recorded_proxy():
        proxies.append(make_proxy())
        proxies[-1].register_forward_hook(lambda module, inputs, output: proxy_inputs.append(len(inputs[0])))
        return proxies[-1]
    monkeypatch.setattr(faster, 'make_proxy', recorded_proxy)
    monkeypatch.setattr(faster, 'LookaheadState', lambda net: averaged.append(net) or LookaheadState(net))
    sgd_step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, 'step', lambda self, *a, **k: multipliers.append(
        self.param_groups[0]['lr'] / self.param_groups[0]['initial_lr']) or sgd_step(self, *a, **k))
    faster.train(loader, dtype=torch.float32, epochs=5, seed=0,  # 20 steps of 4 an epoch
                 report=lambda row: biases.append(nets[0].whiten.bias.detach().clone()))
    assert decay_batches == [64, 64]  # the main network's, then the proxy's: the whole batch
    assert proxy_inputs == [64] * 20  # one forward of the whole batch a step, none other
    assert averaged == nets  # only the main network has a lookahead
    (proxy,) = proxies
    assert not proxy.whiten.bias.requires_grad and torch.all(proxy.whiten.bias == 0)
    opt = faster.hyp['opt']
    assert multipliers[:5] == pytest.approx([faster.lr_multiplier(step, 20, opt['lr_warmup'], opt['lr_start'],
                                                                  opt['lr_end']) for step in (0, 4, 8, 12, 16)])
    assert all(not torch.equal(a, b) for a, b in zip(biases, biases[1:]))  # trained in every epoch


def test_the_proxy_is_a_narrow_airbench94_and_steps_on_the_kept_losses_of_its_one_forward(faster, tiny_data_dir,
                                                                                          monkeypatch):
    """As published: the proxy is airbench94's network at widths 32/64/64 (BatchNorm as the main one's),
    whitened from the first 5000 training images; its first step's gradient is that of the label-smoothed
    losses of the kept examples, summed, from one forward of the whole batch in training mode."""
    loader = faster.CifarLoader(tiny_data_dir, train=True, batch_size=64, aug=faster.hyp['aug'], device='cpu')
    loader.images, loader.labels = torch.rand(5064, 3, 32, 32), torch.randint(0, 10, (5064,))
    fitted, batches, proxies, first = [], [], [], {}
    init, make_proxy, iterate = faster.init_whitening_conv, faster.make_proxy, faster.CifarLoader.__iter__
    monkeypatch.setattr(faster, 'init_whitening_conv', lambda layer, images: fitted.append((layer, images))
                        or init(layer, images))
    monkeypatch.setattr(faster, 'make_proxy', lambda: proxies.append(make_proxy()) or proxies[-1])

    def recorded(self):
        for inputs, labels in iterate(self):
            batches.append((inputs.clone(), labels.clone()))
            yield inputs, labels
    monkeypatch.setattr(faster.CifarLoader, '__iter__', recorded)

    def first_step(self, *args, **kwargs):
        first['weights'] = copy.deepcopy(proxies[0].state_dict())  # where the gradient was taken
        first['grads'] = [p.grad.clone() for p in proxies[0].parameters() if p.requires_grad]
        raise Stop
    monkeypatch.setattr(torch.optim.SGD, 'step', first_step)
    opt = dict(faster.hyp['opt'], epochs=1)
    with pytest.raises(Stop):
        faster.proxy_selection(loader, opt, total_steps=len(loader), dtype=torch.float32,
                               books=faster.Bookkeeper(loader, torch.float32, opt))
    convs = [m for m in proxies[0].modules() if isinstance(m, faster.Conv)]  # airbench94's blocks: 2 convs each
    assert [m.out_channels for m in convs] == [32, 32, 64, 64, 64, 64]
    norms = [m for m in proxies[0].modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.momentum == pytest.approx(0.1) for m in norms)  # as the main network's (paper convention 0.9)
    ((layer, images),) = fitted
    assert layer is proxies[0].whiten and torch.equal(images, loader.normalize(loader.images[:5000]))
    proxy = make_proxy()
    proxy.load_state_dict(first['weights'])
    proxy.whiten.bias.requires_grad = False  # as proxy_selection freezes it
    inputs, labels = batches[0]
    losses = F.cross_entropy(proxy(inputs), labels, label_smoothing=0.2, reduction='none')
    losses[faster.keep_highest_loss(losses.detach(), 32)].sum().backward()
    expected = [p.grad for p in proxy.parameters() if p.requires_grad]
    assert len(expected) == len(first['grads'])
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(first['grads'], expected))


def test_a_run_interrupted_after_the_proxy_pass_keeps_it(faster, tiny_data_dir, tmp_path, monkeypatch):
    """The proxy's pass is a checkpoint of its own: stopped in the main pass's first epoch, the run
    continues from the saved selection instead of running the proxy again."""
    loader = faster.CifarLoader(tiny_data_dir, train=True, batch_size=64, aug=faster.hyp['aug'], device='cpu')
    checkpoint, passes = tmp_path / 'checkpoint.pt', []
    proxy_selection, make_net = faster.proxy_selection, faster.make_net
    monkeypatch.setattr(faster, 'proxy_selection', lambda *args: passes.append(1) or proxy_selection(*args))

    def interrupt(module, inputs):
        raise KeyboardInterrupt  # Ctrl-C at the main network's first step

    def interrupted_net():
        net = make_net()
        net.register_forward_pre_hook(interrupt)
        return net
    monkeypatch.setattr(faster, 'make_net', interrupted_net)
    with pytest.raises(KeyboardInterrupt):
        faster.train(loader, dtype=torch.float32, epochs=2, seed=0, checkpoint=checkpoint)
    monkeypatch.setattr(faster, 'make_net', make_net)
    faster.train(loader, dtype=torch.float32, epochs=2, seed=0, checkpoint=checkpoint)
    assert passes == [1]
