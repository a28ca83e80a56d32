"""Shared fixtures. Behaviour that differs between scripts is tested on each of them through the
`script` fixture (parametrized over SCRIPTS), so a script added to the family is checked by the same
specification. The command line and bookkeeping, the same in every script (tests/test_bookkeeping.py),
are tested once, on airbench94 (`@ONLY_AIRBENCH94`)."""
import importlib.util
import os
import pathlib

import pytest
import torch
import torch._dynamo  # noqa: F401  imported up front: its import inspects torch.cuda.is_available,
                      # which some tests replace with a stub

REPO = pathlib.Path(__file__).resolve().parent.parent
# What differs between the scripts, as published (parameters and FLOPs per run with 6-view TTA).
FAMILY = {
    'airbench94': dict(parameters=1_972_792, pflops=0.359, convs_per_block=2, epochs=9.9),
    'airbench94_compiled': dict(parameters=1_972_792, pflops=0.359, convs_per_block=2, epochs=9.9),
    'airbench95': dict(parameters=4_606_520, pflops=1.37, convs_per_block=2, epochs=15),
    'airbench96': dict(parameters=9_918_776, pflops=4.99, convs_per_block=3, epochs=37),  # published: 9.92M
    # 200 steps of 2000 (0.283 PFLOPs; published: 0.29) + 6-view TTA on 10k.
    'airbench94_muon': dict(parameters=1_972_792, pflops=0.297, convs_per_block=2, epochs=8),
    # 243 steps of 1536 + 6-view TTA on 10k (its own default, TTA on a quarter of them: 0.270).
    'airbench94_2025': dict(parameters=1_972_792, pflops=0.278, convs_per_block=2, epochs=7.59),
    # The main network on 512 of each 1024 for 2160 steps, the proxy's passes, TTA (published: 3.1).
    'airbench96_faster': dict(parameters=9_918_776, pflops=3.165, convs_per_block=3, epochs=45),
}
SCRIPTS = list(FAMILY)
# The ablation series of the release: script, the feature it adds, its epochs.
SERIES = [
    ('ablations/main0_network', None, 34),
    ('ablations/main1_whiten', 'whiten', 21),
    ('ablations/main2_dirac', 'dirac', 18),
    ('ablations/main3_scalebias', 'scalebias', 13.5),
    ('ablations/main4_freeze', 'freeze', 13.5),
    ('ablations/main5_lookahead', 'lookahead', 12),
    ('ablations/main6_tta', 'tta', 10.8),
    ('ablations/main7_mirror', 'mirror', 9.9),
    ('ablations/main8_compile', 'compile', 9.9),
]
ABLATIONS = [name for name, _, _ in SERIES] + ['ablations/train_resnet18']
ALL_SCRIPTS = SCRIPTS + ABLATIONS
ONLY_AIRBENCH94 = pytest.mark.parametrize('script', ['airbench94'], indirect=True)  # for the shared bookkeeping
SMALL_WIDTHS = {'block1': 32, 'block2': 64, 'block3': 64}  # >= 24, the whitening conv's output
SMALL_RESNET_WIDTHS = {'block1': 16, 'block2': 16, 'block3': 32, 'block4': 32}  # its first stage runs at 32x32


def flatten(hyp):
    """{(section, knob): value} of a script's hyp dict, so two scripts' knobs compare key by key."""
    return {(section, key): value for section, knobs in hyp.items() for key, value in knobs.items()}


class Stop(Exception):
    """Raised by a test's stand-in to end a training early, once the test has seen what it checks."""


def quintic(x, coefficients=(3.4445, -4.7750, 2.0315), steps=3):
    """What Newton-Schulz does to each singular value of G / ||G||_F (airbench94_muon's coefficients)."""
    a, b, c = coefficients
    for _ in range(steps):
        x = a * x + b * x ** 3 + c * x ** 5
    return x


def only_for(script, *pieces):
    """Skip a test of pieces that `script` does not have (airbench94_muon trains by Muon, without
    airbench94's schedule, decoupled SGD or lookahead): shown as skipped, with the reason."""
    missing = [piece for piece in pieces if not hasattr(script, piece)]
    if missing:
        pytest.skip(f"{script.__name__} has no {', '.join(missing)}")


def load_script(name):
    """Import a script by file path (so scripts in subfolders load the same way)."""
    path = REPO / f'{name}.py'
    spec = importlib.util.spec_from_file_location(name.replace('/', '_'), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(params=SCRIPTS, scope='session')
def script(request):
    return load_script(request.param)


@pytest.fixture
def expected(script):
    """The script's own figures from FAMILY."""
    return FAMILY[script.__name__]


@pytest.fixture(autouse=True)
def small_uncompiled_networks(request, monkeypatch):
    """Behaviour tests train narrow networks (SMALL_WIDTHS; the ResNet-18: SMALL_RESNET_WIDTHS), so that
    every script's training tests take seconds on a CPU, and skip torch.compile (tested on its own,
    marked `compile`).
    Tests of the real sizes opt out with the `full_size` marker."""
    if 'script' not in request.fixturenames:
        return
    script = request.getfixturevalue('script')
    if not request.node.get_closest_marker('full_size'):
        resnet = 'block4' in script.hyp['net']['widths']
        monkeypatch.setitem(script.hyp['net'], 'widths', SMALL_RESNET_WIDTHS if resnet else SMALL_WIDTHS)
    if hasattr(script, 'compile_net') and not request.node.get_closest_marker('compile'):
        monkeypatch.setattr(script, 'compile_net', lambda net, device: net)


def write_dataset(path, train_images, test_images):
    """A synthetic dataset in the cache format, with a class-dependent colour so that a few
    training steps learn something."""
    for split, n in (('train', train_images), ('test', test_images)):
        generator = torch.Generator().manual_seed(n)
        labels = torch.arange(n) % 10
        images = torch.randint(0, 64, (n, 32, 32, 3), dtype=torch.uint8, generator=generator)
        images[..., 0] += (labels * 19).to(torch.uint8)[:, None, None]
        torch.save({'images': images, 'labels': labels, 'classes': [str(k) for k in range(10)]},
                   path / f'{split}.pt')
    return path


@pytest.fixture(scope='session')
def tiny_data_dir(tmp_path_factory):
    """256 train and 64 test images: behaviour tests train on it in seconds."""
    return write_dataset(tmp_path_factory.mktemp('tiny_cifar'), 256, 64)


@pytest.fixture(scope='session')
def one_batch_data_dir(tmp_path_factory):
    """One default-size training batch of every script (1024 images; airbench94_muon's 2000), for
    command-line runs."""
    return write_dataset(tmp_path_factory.mktemp('one_batch_cifar'), 2000, 100)


@pytest.fixture(scope='session')
def real_data_dir():
    """The real CIFAR-10 cache named by AIRBENCH_DATA. Required in CI; skipped elsewhere if unset."""
    path = os.environ.get('AIRBENCH_DATA')
    if path and (pathlib.Path(path) / 'train.pt').exists():
        return pathlib.Path(path)
    if os.environ.get('CI'):
        pytest.fail('AIRBENCH_DATA must name a directory with train.pt/test.pt in CI')
    pytest.skip('set AIRBENCH_DATA to a directory with the real CIFAR-10 train.pt/test.pt')
