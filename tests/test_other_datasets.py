"""experiments/other_datasets.py: each dataset read from small archives in its official format, written
here (a few images per class), trained on for a step by airbench96 and the ResNet-18, and evaluated;
each kind of damage stopped with a message naming the file and the fix."""
import io
import pickle
import sys
import tarfile

import numpy as np
import pytest
import torch

from conftest import REPO, SMALL_WIDTHS

sys.path.insert(0, str(REPO / 'experiments'))
import other_datasets  # noqa: E402


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_cifar100(directory, per_class=1):
    rng = np.random.default_rng(0)
    with tarfile.open(directory / 'cifar-100-python.tar.gz', 'w:gz') as tar:
        add(tar, 'cifar-100-python/meta', pickle.dumps({b'fine_label_names': [f'c{k}'.encode() for k in range(100)],
                                                        b'coarse_label_names': [b'x'] * 20}))
        for split, n in (('train', 100 * per_class), ('test', 100)):
            add(tar, f'cifar-100-python/{split}', pickle.dumps({
                b'data': rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                b'fine_labels': [k % 100 for k in range(n)], b'coarse_labels': [k % 20 for k in range(n)]}))


def write_svhn(directory, n=64):
    from scipy.io import savemat
    rng = np.random.default_rng(0)
    for name in ('train_32x32.mat', 'test_32x32.mat'):
        savemat(directory / name, {'X': rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                                   'y': (np.arange(n) % 10 + 1).reshape(-1, 1).astype(np.uint8)})  # 1-10, 10 = digit 0


def write_cinic10(directory, per_class=4):
    from PIL import Image
    rng = np.random.default_rng(0)
    classes = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
    with tarfile.open(directory / 'CINIC-10.tar.gz', 'w:gz') as tar:
        for split in ('train', 'valid', 'test'):
            for label in classes:
                for i in range(per_class):
                    png = io.BytesIO()
                    mode = 'L' if i == 0 else 'RGB'  # CINIC-10 has a few greyscale images
                    shape = (32, 32) if mode == 'L' else (32, 32, 3)
                    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(png, format='PNG')
                    add(tar, f'{split}/{label}/{split}-{label}-{i}.png', png.getvalue())


WRITERS = {'cifar100': write_cifar100, 'svhn': write_svhn, 'cinic10': write_cinic10}


@pytest.fixture
def tiny_scripts(monkeypatch):
    """Narrow networks, batches of 32: both arms train a step in seconds."""
    for script, widths in ((other_datasets.airbench96, SMALL_WIDTHS),
                           (other_datasets.train_resnet18, {'block1': 8, 'block2': 8, 'block3': 8, 'block4': 8})):
        monkeypatch.setitem(script.hyp['net'], 'widths', widths)
        monkeypatch.setitem(script.hyp['opt'], 'batch_size', 32)


@pytest.mark.parametrize('dataset', sorted(WRITERS))
def test_each_dataset_is_read_trained_on_and_evaluated(dataset, tiny_scripts, tmp_path, monkeypatch):
    import torchvision.datasets.utils
    monkeypatch.setattr(torchvision.datasets.utils, 'download_url', lambda *a, **k: pytest.fail('downloaded'))
    WRITERS[dataset](tmp_path)
    log = other_datasets.main(['--dataset', dataset, '--runs', '1', '--epochs', '1', '--data-dir', str(tmp_path),
                               '--device', 'cpu', '--logs', str(tmp_path / 'logs')])
    assert list(log['arms']) == [f'airbench96 on {dataset}', f'ResNet-18 on {dataset}']
    for runs in log['arms'].values():
        assert len(runs) == 1 and 0 <= runs[0]['tta_val_acc'] <= 1 and runs[0]['train_epochs'] == 1
    assert 'published (the paper): airbench96' in (next((tmp_path / 'logs' / 'other_datasets').iterdir()) /
                                                   'log.txt').read_text()


def test_the_classes_and_the_normalization_come_from_the_data(tmp_path):
    write_cifar100(tmp_path, per_class=2)
    cache = other_datasets.prepare('cifar100', tmp_path)
    train = other_datasets.airbench96.CifarLoader(cache, train=True, batch_size=32, device='cpu')
    test = other_datasets.airbench96.CifarLoader(cache, train=False, batch_size=32, device='cpu')
    assert len(train.classes) == 100 and train.labels.max() == 99 and len(train.images) == 200
    expected_mean = train.images.mean((0, 2, 3))
    assert torch.allclose(train.mean.flatten(), expected_mean, atol=1e-6)
    assert torch.equal(test.mean, train.mean) and torch.equal(test.std, train.std)  # the training images' statistics
    assert other_datasets.airbench96.make_net(num_classes=100).head.out_features == 100
    assert other_datasets.train_resnet18.make_net(num_classes=100).head.out_features == 100


def test_svhn_label_10_is_the_digit_0(tmp_path):
    write_svhn(tmp_path, n=20)
    (train_images, train_labels), _, classes = other_datasets.read_svhn(tmp_path)
    assert train_images.shape == (20, 32, 32, 3) and train_labels.tolist() == [(k + 1) % 10 for k in range(20)]
    assert classes == [str(d) for d in range(10)]


def test_cinic10_trains_on_train_or_on_train_and_valid(tmp_path):
    write_cinic10(tmp_path, per_class=2)
    (train_images, train_labels), (test_images, _), classes = other_datasets.read_cinic10(tmp_path)
    assert len(train_images) == len(test_images) == 20 and classes[0] == 'airplane'
    assert train_images.shape[1:] == (32, 32, 3)  # greyscale images come out RGB
    (with_valid, _), _, _ = other_datasets.read_cinic10(tmp_path, with_valid=True)
    assert len(with_valid) == 40
    assert other_datasets.prepare('cinic10', tmp_path, with_valid=True).name == 'cinic10-with-valid-cache'


def not_an_archive(directory, dataset):
    (directory / other_datasets.OFFICIAL[dataset][0][0]).write_bytes(b'not what it should be')


def wrongly_shaped_svhn(directory, dataset):
    from scipy.io import savemat
    for name in ('train_32x32.mat', 'test_32x32.mat'):
        savemat(directory / name, {'X': np.zeros((28, 28, 3, 5), dtype=np.uint8), 'y': np.ones((5, 1))})


@pytest.mark.parametrize('dataset, damage, message', [
    ('cifar100', not_an_archive, 'cannot read cifar-100-python.tar.gz in .* as the official cifar100 files'),
    ('cinic10', not_an_archive, 'cannot read CINIC-10.tar.gz in .* as the official cinic10 files'),
    ('svhn', not_an_archive, 'cannot read train_32x32.mat, test_32x32.mat'),
    ('svhn', wrongly_shaped_svhn, r"not svhn's 32x32 RGB images .*\(images \(5, 28, 28, 3\)"),
])
def test_a_damaged_or_wrongly_shaped_file_is_named_with_the_fix(dataset, damage, message, tmp_path):
    if dataset == 'svhn' and damage is not_an_archive:
        (tmp_path / 'test_32x32.mat').write_bytes(b'')
    damage(tmp_path, dataset)
    with pytest.raises(other_datasets.DataError, match=message) as error:
        other_datasets.prepare(dataset, tmp_path)
    assert 'Fix: delete it to download it again, or put the official file' in str(error.value)


def test_a_missing_file_without_network_is_named_with_where_to_get_it(tmp_path, monkeypatch, capsys):
    import torchvision.datasets.utils

    def no_network(*args, **kwargs):
        raise OSError('network is unreachable')
    monkeypatch.setattr(torchvision.datasets.utils, 'download_url', no_network)
    with pytest.raises(SystemExit, match='CINIC-10.tar.gz is not in .* downloading it failed .*network is unreachable.*'
                                         'Fix: put the official CINIC-10.tar.gz'):
        other_datasets.main(['--dataset', 'cinic10', '--data-dir', str(tmp_path), '--device', 'cpu'])
