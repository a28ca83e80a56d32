"""other_datasets.py: does the method carry over to other datasets without retuning?

    python experiments/other_datasets.py --dataset cifar100 --runs 5 --data-dir data
    python experiments/other_datasets.py --dataset cinic10 --with-valid --runs 5 --data-dir data

Two arms with paired seeds: airbench96 with its recipe unchanged, and the ResNet-18 baseline
(ablations/train_resnet18.py) with its own, each for its own epochs unless --epochs is given. Only
the number of classes and the normalization (the training images' mean and std) come from the data.
Published (the paper): airbench96 79.76% on CIFAR-100, 88.22% on CINIC-10, 97.64% on SVHN; the
ResNet-18 78.04%, 87.58% and 97.35%.

Each dataset is read from its official distribution in --data-dir, downloaded there from its
official source where it is absent:
- CIFAR-100: cifar-100-python.tar.gz (pickled train and test, the 100 fine labels);
- SVHN: train_32x32.mat and test_32x32.mat (the label 10 is the digit 0; `extra` is not used);
- CINIC-10: CINIC-10.tar.gz (train, valid and test folders of class folders of PNGs): trains on
  train, or on train and valid with --with-valid; tests on test.
It is converted once into <data-dir>/<dataset>-cache/{train,test}.pt, the scripts' cache format with
the classes and the normalization, which the scripts' own loaders read.
"""
import io
import pathlib
import pickle
import sys
import tarfile

import torch

import harness
import airbench96  # noqa: E402  (harness put the repository root on the path)
from ablations import train_resnet18  # noqa: E402

OFFICIAL = {  # dataset: its files, each (name, url, md5 or None)
    'cifar100': [('cifar-100-python.tar.gz', 'https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz',
                  'eb9058c3a382ffc7106e4002c42a8d85')],
    'svhn': [('train_32x32.mat', 'http://ufldl.stanford.edu/housenumbers/train_32x32.mat',
              'e26dedcc434d2e4c54c9b2d4a06d8373'),
             ('test_32x32.mat', 'http://ufldl.stanford.edu/housenumbers/test_32x32.mat',
              'eb5a983be6a315427106f1b164d9cef3')],
    'cinic10': [('CINIC-10.tar.gz', 'https://datashare.ed.ac.uk/bitstream/handle/10283/3192/CINIC-10.tar.gz', None)],
}
PUBLISHED = {'cifar100': (79.76, 78.04), 'cinic10': (88.22, 87.58), 'svhn': (97.64, 97.35)}  # airbench96, ResNet-18


class DataError(Exception):
    """A missing, damaged or wrongly shaped file: the message names it and the fix."""


def read_cifar100(directory, with_valid=False):
    with tarfile.open(directory / 'cifar-100-python.tar.gz') as tar:
        meta, train, test = (pickle.load(tar.extractfile(f'cifar-100-python/{name}'), encoding='bytes')
                             for name in ('meta', 'train', 'test'))

    def split(batch):
        images = torch.tensor(batch[b'data'], dtype=torch.uint8).view(-1, 3, 32, 32).permute(0, 2, 3, 1)
        return images, torch.tensor(batch[b'fine_labels'])
    return split(train), split(test), [name.decode() for name in meta[b'fine_label_names']]


def read_svhn(directory, with_valid=False):
    from scipy.io import loadmat

    def split(name):
        mat = loadmat(directory / name)
        images = torch.from_numpy(mat['X']).permute(3, 0, 1, 2)  # stored [32, 32, 3, N]
        return images, torch.from_numpy(mat['y'].astype('int64')).flatten() % 10  # the label 10 is the digit 0
    return split('train_32x32.mat'), split('test_32x32.mat'), [str(digit) for digit in range(10)]


def read_cinic10(directory, with_valid=False):
    import numpy as np
    from PIL import Image
    with tarfile.open(directory / 'CINIC-10.tar.gz') as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith('.png')), key=lambda m: m.name)
        classes = sorted({pathlib.PurePosixPath(m.name).parts[-2] for m in members})
        splits = {'train': ([], []), 'valid': ([], []), 'test': ([], [])}
        for member in members:
            split, label = pathlib.PurePosixPath(member.name).parts[-3:-1]
            image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert('RGB')  # a few are greyscale
            splits[split][0].append(torch.from_numpy(np.array(image)))
            splits[split][1].append(classes.index(label))

    def split(*names):
        return (torch.stack([image for name in names for image in splits[name][0]]),
                torch.tensor([label for name in names for label in splits[name][1]]))
    return split('train', 'valid') if with_valid else split('train'), split('test'), classes


READERS = {'cifar100': read_cifar100, 'svhn': read_svhn, 'cinic10': read_cinic10}


def prepare(dataset, data_dir, with_valid=False):
    """The cache directory of `dataset` under data_dir, written from its official files (downloaded
    first where absent). Raises DataError naming the file and the fix."""
    cache = data_dir / (f'{dataset}-with-valid-cache' if with_valid else f'{dataset}-cache')
    if (cache / 'test.pt').exists():
        return cache
    for name, url, md5 in OFFICIAL[dataset]:
        if not (data_dir / name).exists():
            try:
                from torchvision.datasets.utils import download_url
                download_url(url, str(data_dir), name, md5)
            except Exception as e:
                raise DataError(f"{name} is not in {data_dir} and downloading it failed ({type(e).__name__}: {e}). "
                                f"Fix: put the official {name} ({url}) in {data_dir}.") from None
    files = ', '.join(name for name, _, _ in OFFICIAL[dataset])
    fix = f"Fix: delete it to download it again, or put the official file ({OFFICIAL[dataset][0][1]}) in {data_dir}."
    try:
        (train_images, train_labels), (test_images, test_labels), classes = READERS[dataset](data_dir, with_valid)
    except Exception as e:
        raise DataError(f"cannot read {files} in {data_dir} as the official {dataset} files "
                        f"({type(e).__name__}: {e}). {fix}") from None
    for images, labels in ((train_images, train_labels), (test_images, test_labels)):
        if not (images.dtype == torch.uint8 and images.ndim == 4 and images.shape[1:] == (32, 32, 3) and len(images) > 0
                and labels.shape == images.shape[:1] and 0 <= labels.min() and labels.max() < len(classes)):
            raise DataError(f"{files} in {data_dir}: not {dataset}'s 32x32 RGB images with labels 0-{len(classes) - 1} "
                            f"(images {tuple(images.shape)}, {images.dtype}). {fix}")
    pixels = train_images.float().div(255)
    mean, std = tuple(pixels.mean((0, 1, 2)).tolist()), tuple(pixels.std((0, 1, 2)).tolist())
    for split, images, labels in (('train', train_images, train_labels), ('test', test_images, test_labels)):
        airbench96.save_atomically({'images': images.contiguous(), 'labels': labels.long(), 'classes': classes,
                                    'mean': mean, 'std': std}, str(cache / f'{split}.pt'))
    return cache


def arm(args, script, cache):
    """One arm: `script` trained on the cached dataset by its own recipe, through its own loader."""
    train = script.CifarLoader(cache, train=True, batch_size=script.hyp['opt']['batch_size'], aug=script.hyp['aug'],
                               device=args.device)
    test = script.CifarLoader(cache, train=False, batch_size=2000, device=args.device)
    return lambda seed: harness.train_run(args, train, test, seed, script=script)


def main(argv=None):
    def extra(parser):
        parser.add_argument('--dataset', required=True, choices=sorted(OFFICIAL), help='the dataset to train on')
        parser.add_argument('--with-valid', action='store_true', help='CINIC-10: train on train and valid')
    args = harness.parse_args(__doc__.split('\n\n')[0], argv, epochs=None, runs_on_cpu=1, extra=extra)
    try:
        cache = prepare(args.dataset, pathlib.Path(args.data_dir), args.with_valid)
    except DataError as e:
        sys.exit(f'other_datasets.py: error: {e}')
    arms = {f'airbench96 on {args.dataset}': arm(args, airbench96, cache),
            f'ResNet-18 on {args.dataset}': arm(args, train_resnet18, cache)}
    published = PUBLISHED[args.dataset]
    question = f'airbench96 and the ResNet-18 on {args.dataset}, unretuned'
    published_line = f'published (the paper): airbench96 {published[0]}%, ResNet-18 {published[1]}%'
    return harness.run_study('other_datasets', question, args, arms, lambda log: published_line)


if __name__ == '__main__':
    main()
