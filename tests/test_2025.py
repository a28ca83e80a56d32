"""airbench94_2025.py: the 2025 record's recipe, its jitter, its Muon and its selective TTA."""
import math

import pytest
import torch

from conftest import SMALL_WIDTHS, Stop, load_script, quintic


@pytest.fixture
def record(monkeypatch):
    script = load_script('airbench94_2025')
    monkeypatch.setitem(script.hyp['net'], 'widths', SMALL_WIDTHS)
    return script


def test_the_recipe_is_the_records():
    record = load_script('airbench94_2025')
    opt, aug, net = record.hyp['opt'], record.hyp['aug'], record.hyp['net']
    assert (opt['batch_size'], math.ceil(opt['epochs'] * (50_000 // opt['batch_size']))) == (1536, 243)
    assert math.ceil(opt['whiten_bias_epochs'] * 32) == 7 and opt['label_smoothing'] == 0.09
    assert (opt['muon_lr'], opt['muon_momentum'], opt['muon_decay']) == (0.205, 0.655, 1.0418e-6)
    assert (opt['bias_lr'], opt['head_lr'], opt['momentum'], opt['weight_decay']) == (0.0573, 0.5415, 0.825, 1.0418e-6)
    assert aug == {'flip': True, 'translate': 2, 'brightness': 0.1399, 'contrast': 0.1308}
    assert (net['batchnorm_momentum'], net['whitening_images'], net['tta_level'], net['tta_fraction']) == (
        0.5566, 960, 3, 0.25)
    model = record.make_net()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.momentum == pytest.approx(0.4434) and m.eps == 1e-12 and not m.weight.requires_grad for m in norms)
    activations = [type(m) for m in model.modules() if isinstance(m, (torch.nn.GELU, torch.nn.SiLU))]
    assert activations[0] is torch.nn.GELU and set(activations[1:]) == {torch.nn.SiLU}  # GELU after the whitening
    assert model.scaling_factor == 1 / 256 and model.head.weight.std().item() == pytest.approx(1.0, rel=1e-5)


def test_flops_are_counted_as_spent():
    record = load_script('airbench94_2025')
    train_flops, eval_flops = record.count_flops(243, 1536, 10_000, tta_level=3)
    one_view = record.count_flops(243, 1536, 10_000, tta_level=0)[1]
    assert eval_flops == pytest.approx(one_view * (1 + 6 * 0.25))  # six views for 2,500 images, not 10,000
    assert (train_flops + eval_flops) / 1e15 == pytest.approx(0.270, abs=0.002)  # under 0.28


def test_jitter_is_uniform_per_image_in_the_records_ranges(record):
    torch.manual_seed(0)
    images = torch.zeros(4000, 3, 32, 32)
    images[..., 1] = 1.0  # so that (u, v) can be read off each image: x' = (x + u)(1 + v)
    out = record.batch_jitter(images, brightness=0.1399, contrast=0.1308)
    v = out[:, 0, 0, 1] - out[:, 0, 0, 0] - 1
    u = out[:, 0, 0, 0] / (1 + v)
    assert torch.allclose(out, (images + u.view(-1, 1, 1, 1)) * (1 + v.view(-1, 1, 1, 1)), atol=1e-4)
    for values, limit in ((u, 0.1399), (v, 0.1308)):
        assert values.abs().max() <= limit + 1e-4 and values.abs().max() > 0.99 * limit
        assert abs(values.mean()) < 0.01 and values.std() == pytest.approx(limit / math.sqrt(3), rel=0.05)


def test_the_loader_jitters_each_normalized_training_image(record, tiny_data_dir):
    aug = {'brightness': 0.1399, 'contrast': 0.1308}
    loader = record.CifarLoader(tiny_data_dir, train=True, batch_size=64, aug=aug, device='cpu', shuffle=False)
    loader.images[..., 0], loader.images[..., 1] = 0.0, 1.0  # so that (u, v) can be read off each image
    normalized = loader.normalize(loader.images[:64])
    inputs, _ = next(iter(loader))
    (x0, x1), (y0, y1) = normalized[:, 0, 0, :2].T, inputs[:, 0, 0, :2].T
    v = (y1 - y0) / (x1 - x0) - 1
    u = y0 / (1 + v) - x0
    assert torch.allclose(inputs, (normalized + u.view(-1, 1, 1, 1)) * (1 + v.view(-1, 1, 1, 1)), atol=1e-4)
    assert u.abs().max() <= 0.1399 + 1e-4 and v.abs().max() <= 0.1308 + 1e-4
    assert u.std() > 0.03 and v.std() > 0.03  # drawn per image


def test_batched_newton_schulz_equals_one_matrix_at_a_time(record):
    generator = torch.Generator().manual_seed(0)
    matrices = [torch.randn(*shape, generator=generator) for shape in ((64, 216), (64, 576), (256, 2304), (96, 32))]
    batched = record.newton_schulz(matrices, dtype=torch.float32)
    for G, X in zip(matrices, batched):
        (alone,) = record.newton_schulz([G], dtype=torch.float32)
        assert X.shape == G.shape and torch.allclose(X, alone, atol=1e-5)
        singular_values = torch.linalg.svdvals(X)
        assert 0.5 < singular_values.min() and singular_values.max() < 1.3  # near 1, as Muon wants


@pytest.mark.parametrize('shape', [(64, 576), (576, 64)])
def test_newton_schulz_applies_the_records_quintic_to_each_singular_value(record, shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    (X,) = record.newton_schulz([G], dtype=torch.float32)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    record_quintic = quintic(S / G.norm(), coefficients=(3.4576, -4.7391, 2.0843))
    assert torch.allclose(X, U @ torch.diag(record_quintic) @ Vh, atol=1e-4)


def test_newton_schulz_runs_in_float16_on_cuda_as_the_record_does(record, monkeypatch):
    assert record.newton_schulz_dtype(torch.device('cuda')) == torch.float16
    monkeypatch.setattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: True)
    assert record.newton_schulz_dtype(torch.device('cpu')) == torch.bfloat16
    monkeypatch.setattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: False)
    assert record.newton_schulz_dtype(torch.device('cpu')) == torch.float32


def test_in_float16_the_record_computes_batchnorm_in_float16_too(record, tiny_data_dir, monkeypatch):
    """The record's precision on CUDA (airbench94's keeps BatchNorm in float32)."""
    loader = record.CifarLoader(tiny_data_dir, train=True, batch_size=64, aug=record.hyp['aug'], device='cpu')
    monkeypatch.setattr(record, 'choose_device_and_dtype', lambda device=None, dtype=None: (device, torch.float16))
    nets = []

    def recorded(net, *args):
        nets.append(net)
        raise Stop
    monkeypatch.setattr(record, 'make_optimizers', recorded)
    with pytest.raises(Stop):
        record.train(loader, epochs=1, seed=0)
    assert {t.dtype for t in nets[0].state_dict().values() if t.is_floating_point()} == {torch.float16}


def test_filters_are_renormalized_ever_more_rarely():
    record = load_script('airbench94_2025')
    steps = [step for step in range(243) if record.renormalizing(step, 243)]
    assert steps[:4] == [0, 2, 4, 6]  # every 2nd step at first
    assert steps[-1] - steps[-2] >= 15  # every 16th or so at the end
    assert all(step % (2 + int(15 * step / 243)) == 0 for step in steps)


def test_muon_step_renormalizes_when_told_then_decays_after_the_update(record):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(16, 8, 3, 3) * 5)
    optimizer = record.Muon([weight], lr=0.2, momentum=0.655, decay=0.01)
    gradient = torch.randn(16, 8, 3, 3)
    for renormalize in (True, False):
        before = weight.detach().clone()
        weight.grad = gradient.clone()
        optimizer.param_groups[0]['renormalize'] = renormalize
        optimizer.step()
        buffer = optimizer.state[weight]['momentum_buffer']
        start = before * math.sqrt(16) / before.norm() if renormalize else before
        (update,) = record.newton_schulz([(gradient + 0.655 * buffer).reshape(16, -1)], dtype=torch.float32)
        expected = (start - 0.2 * update.view(16, 8, 3, 3)) * (1 - 0.2 * 0.01)
        assert torch.allclose(weight.detach(), expected, atol=1e-5)


def test_the_whitening_bias_trains_its_7_steps_then_stops(record, tiny_data_dir, monkeypatch):
    loader = record.CifarLoader(tiny_data_dir, train=True, batch_size=32, aug=record.hyp['aug'],
                                device='cpu')  # 8 steps
    lrs, trained = [], []
    sgd_step = torch.optim.SGD.step

    def recording(self, *args, **kwargs):
        lrs.append(self.param_groups[0]['lr'])
        trained.append(self.param_groups[0]['params'][0].grad is not None)
        return sgd_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.SGD, 'step', recording)
    record.train(loader, dtype=torch.float32, epochs=2, seed=0, whiten_bias_epochs=0.5)  # 4 of 8 steps an epoch
    assert trained == [True] * 4 + [False] * 12
    assert lrs[:4] == pytest.approx([0.0573 * (1 - step / 4) for step in range(4)])


def test_muon_lr_falls_linearly_and_its_filters_renormalize_and_decay_as_the_record_says(record, tiny_data_dir,
                                                                                        monkeypatch):
    loader = record.CifarLoader(tiny_data_dir, train=True, batch_size=32, aug=record.hyp['aug'], device='cpu')
    groups = []
    muon_step = record.Muon.step
    monkeypatch.setattr(record.Muon, 'step', lambda self: groups.append(dict(self.param_groups[0])) or muon_step(self))
    record.train(loader, dtype=torch.float32, epochs=1.9, seed=0)  # 1.9 epochs of 8 steps: 16 steps, rounded up
    total = 16
    assert [group['lr'] for group in groups] == pytest.approx([0.205 * (1 - step / total) for step in range(total)])
    assert [group['renormalize'] for group in groups] == [record.renormalizing(step, total) for step in range(total)]
    assert all(group['decay'] == pytest.approx(1.0418e-6 * 32) for group in groups)  # per example, times the batch


def test_whitening_comes_from_the_first_960_training_images(record, tiny_data_dir, monkeypatch):
    monkeypatch.setitem(record.hyp['net'], 'whitening_images', 100)
    seen = []
    init = record.init_whitening_conv
    monkeypatch.setattr(record, 'init_whitening_conv', lambda layer, images: seen.append(images) or init(layer, images))
    loader = record.CifarLoader(tiny_data_dir, train=True, batch_size=64, aug=record.hyp['aug'], device='cpu')
    record.train(loader, dtype=torch.float32, epochs=1, seed=0)
    assert torch.equal(seen[0], loader.normalize(loader.images[:100]))


@pytest.mark.parametrize('fraction, unsure_count', [(0.25, 16), (0.5, 32)])  # the record's quarter, or hyp's share
def test_selective_tta_gives_six_views_to_the_least_confident_fraction_only(record, tiny_data_dir, monkeypatch,
                                                                           fraction, unsure_count):
    monkeypatch.setitem(record.hyp['net'], 'tta_fraction', fraction)
    loader = record.CifarLoader(tiny_data_dir, train=False, batch_size=64, device='cpu')  # 64 images
    net = record.make_net().eval()
    one_view = record.infer(net, loader, tta_level=0)
    selective = record.infer(net, loader, tta_level=3)
    unsure = one_view.softmax(1).amax(1).argsort()[:unsure_count]
    with torch.no_grad():
        six = record.six_views(net, loader.normalize(loader.images[unsure]))
    changed = (selective != one_view).any(1)
    assert changed.sum() == unsure_count and changed[unsure].all()
    assert torch.allclose(selective[unsure], six, atol=1e-5)
    assert torch.equal(selective[~changed], one_view[~changed])  # the rest keep their one-view logits
    x = loader.normalize(loader.images[:4])
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode='reflect')
    views = [x, padded[..., :32, :32], padded[..., 2:, 2:]]
    with torch.no_grad():
        assert torch.allclose(record.six_views(net, x), sum(net(v) + net(v.flip(-1)) for v in views) / 6, atol=1e-5)
