"""main4_freeze.py: ablation 4 of 8, adding whitening bias freeze.

The whitening conv's bias trains for 3 epochs, then is frozen.

    python ablations/main4_freeze.py               # train, print a table per epoch, log to logs/<run id>/
    python ablations/main4_freeze.py --help        # every flag

One step of the series in ablations/README.md, from main0_network.py (a plain conv net, standard
training) to main8_compile.py (airbench94_compiled.py): each script adds exactly one feature to
the one before and trains for the published fewest epochs at which it still reaches 94% (13.5 here).
`diff ablations/main3_scalebias.py ablations/main4_freeze.py` shows the feature and nothing else.

Importing this file does nothing but define things; its API is airbench94.py's (see README.md).
"""

#############################################
#                  Setup                    #
#############################################

import argparse
import contextlib
import ctypes
import datetime
import math
import os
import pickle
import sys
import tarfile
import time
import uuid

import torch
import torch.nn as nn
import torch.nn.functional as F

# What this script has, in the order the series adds it (ablations/README.md).
features = ('whiten', 'dirac', 'scalebias', 'freeze')

hyp = {
    'opt': {
        'epochs': 13.5,             # published: the fewest epochs at which this step reaches 94%
        'batch_size': 1024,         # used when train() builds its own loader
        'lr': 10.0,                 # learning rate per 1024 examples (decoupled: see make_optimizer)
        'momentum': 0.85,           # Nesterov momentum
        'weight_decay': 0.0153,     # decay per 1024 examples, independent of lr and momentum
        'bias_scaler': 64.0,        # BatchNorm biases learn this much faster than the weights
        'label_smoothing': 0.2,     # regularizes the short, high-lr training
        'lr_warmup': 0.2,           # triangular schedule: the lr ramps up over this fraction of steps...
        'lr_start': 0.2,            # ...from this multiple of lr to 1.0...
        'lr_end': 0.0,              # ...and then falls linearly to zero at the last step
        'whiten_bias_epochs': 3,    # the whitening conv's bias trains this many epochs, then freezes
        'seed': None,               # None draws a fresh seed per training
    },
    'aug': {
        'flip': True,               # random flip: each image mirrored with probability 1/2, every epoch
        'translate': 2,             # reflect-pad by 2 and crop back at a random offset per image
    },
    'net': {
        'widths': {'block1': 64, 'block2': 256, 'block3': 256},
        'batchnorm_momentum': 0.9,  # paper convention: running = 0.9*running + 0.1*batch (PyTorch's default)
        'scaling_factor': 1 / 9,    # scales the logits down, so the large lr stays stable
        'tta_level': 1,             # 0: one view, 1: + mirror (2 views)
    },
}

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


class AirbenchError(Exception):
    """A problem the user can fix (bad flag, missing data, diverged run): main() prints the message
    and exits without a traceback."""


#############################################
#          Device and precision policy      #
#############################################

def choose_device_and_dtype(device=None, dtype=None):
    """The whole device/precision policy, in one place. Returns (torch.device, torch.dtype).

    - CUDA: float16 weights and activations, BatchNorm kept in float32 (as published).
    - CPU: float32 weights, matmuls and convs under bfloat16 autocast when the CPU has bf16
      instructions (much faster than float32 there), else plain float32.
    - MPS: float32 (half precision there is unverified).
    `device` / `dtype` (strings or torch objects) override the automatic choice.
    """
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise AirbenchError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps")
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise AirbenchError("device 'cuda' was asked for, but PyTorch sees no CUDA GPU here; use --device cpu")
    if device.type == 'mps' and not torch.backends.mps.is_available():
        raise AirbenchError("device 'mps' was asked for, but this PyTorch has no MPS backend; use --device cpu")
    if device.type not in ('cpu', 'cuda', 'mps'):
        raise AirbenchError(f"unsupported device {str(device)!r}: use cpu, cuda, cuda:N or mps")
    if dtype is None:
        cpu_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        dtype = {'cuda': torch.float16, 'mps': torch.float32,
                 'cpu': torch.bfloat16 if cpu_bf16 else torch.float32}[device.type]
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise AirbenchError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise AirbenchError(f"unsupported dtype {dtype}: use one of {', '.join(DTYPES)}")
    return device, dtype


def precision_problem(device, dtype):
    """Why `dtype` cannot train on `device` here (a message naming what works), or None if it can.
    The command line refuses such a choice before any work; train() itself accepts any dtype, so the
    CUDA precision (float16) can be exercised on a CPU in tests."""
    cpu_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    works_on_cpu = 'bfloat16 (this CPU has bf16 instructions) or float32' if cpu_bf16 else 'float32'
    if device.type == 'cpu' and dtype == torch.float16:
        return f"--dtype float16 is for CUDA GPUs; on the CPU use {works_on_cpu}"
    if device.type == 'cpu' and dtype == torch.bfloat16 and not cpu_bf16:
        return "this CPU has no bf16 instructions, so bfloat16 would be emulated and many times slower; use float32"
    if device.type == 'cuda' and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return "this GPU has no bfloat16 support; use float16 or float32"
    return None


def tune_process_for(device):
    """Process-wide speedups, applied by main() only (never on import)."""
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # pick the fastest conv kernels for our fixed shapes
    if device.type == 'cpu' and sys.platform.startswith('linux'):
        # glibc hands freed large blocks back to the OS, so every step would page-fault its
        # ~1 GB of activations back in: about a third of a CPU step. Keep freed memory instead.
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL('libc.so.6')
            libc.mallopt(-4, 0)           # M_MMAP_MAX = 0: serve large blocks from the heap
            libc.mallopt(-1, 2**31 - 1)   # M_TRIM_THRESHOLD: never shrink the heap


def synchronize(device):
    """Wait for queued GPU work, so that wall-clock time measures it."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    elif device.type == 'mps':
        torch.mps.synchronize()


#############################################
#                DataLoader                 #
#############################################

CIFAR10_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
CIFAR10_ARCHIVE = 'cifar-10-python.tar.gz'  # the official "python version", read without network
CIFAR10_MD5 = 'c58f30108f718f92721af3b95e74349a'


def default_data_dir():
    return os.environ.get('AIRBENCH_DATA', './cifar10')


def load_cifar10(data_dir, train=True):
    """Return {'images': uint8 [N,32,32,3], 'labels': int64 [N], 'classes': [10 names]} for one split,
    from <data_dir>/{train,test}.pt. If absent, both are written from the official archive
    <data_dir>/cifar-10-python.tar.gz, which is downloaded first if it is not there either."""
    split = 'train' if train else 'test'
    path = os.path.join(data_dir, split + '.pt')
    fix = (f"Fix: point --data-dir (or AIRBENCH_DATA) at a directory holding train.pt and test.pt, or, "
           f"without network, put the official {CIFAR10_ARCHIVE} ({CIFAR10_URL}) in {data_dir}.")
    if not os.path.exists(path):
        archive = os.path.join(data_dir, CIFAR10_ARCHIVE)
        if not os.path.exists(archive):
            download_cifar10(data_dir, fix)
        write_cache_from_archive(archive, data_dir, fix)
    try:
        data = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise AirbenchError(f"cannot read {path} ({type(e).__name__}: {e}). It may be corrupted or "
                            f"unreadable; delete it to write it again. {fix}") from None
    images, labels = (data.get('images'), data.get('labels')) if isinstance(data, dict) else (None, None)
    if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.ndim == 4
            and images.shape[1:] == (32, 32, 3) and len(images) > 0
            and isinstance(labels, torch.Tensor) and labels.dtype == torch.int64 and labels.shape == images.shape[:1]
            and 0 <= labels.min() and labels.max() <= 9):
        raise AirbenchError(f"{path} is not a CIFAR-10 {split} cache: expected a dict with 'images' "
                            f"(uint8 [N,32,32,3]) and 'labels' (int64 [N], values 0-9). "
                            f"Delete it to write it again. {fix}")
    return {'images': images, 'labels': labels, 'classes': data.get('classes')}


def download_cifar10(data_dir, fix):
    """Fetch the official archive into data_dir (checked against its published MD5)."""
    try:
        from torchvision.datasets.utils import download_url
        download_url(CIFAR10_URL, data_dir, CIFAR10_ARCHIVE, CIFAR10_MD5)
    except Exception as e:
        raise AirbenchError(f"CIFAR-10 is not in {data_dir} and downloading it failed "
                            f"({type(e).__name__}: {e}). {fix}") from None


def write_cache_from_archive(archive, data_dir, fix):
    """Write <data_dir>/train.pt and test.pt (atomically) from the official archive's pickled batches."""
    try:
        with tarfile.open(archive) as tar:
            def unpickle(name):
                return pickle.load(tar.extractfile('cifar-10-batches-py/' + name), encoding='bytes')
            classes = [name.decode() for name in unpickle('batches.meta')[b'label_names']]
            for split, batches in (('train', [f'data_batch_{i}' for i in range(1, 6)]), ('test', ['test_batch'])):
                batches = [unpickle(name) for name in batches]
                images = torch.cat([torch.as_tensor(b[b'data'], dtype=torch.uint8) for b in batches])
                labels = torch.cat([torch.as_tensor(b[b'labels'], dtype=torch.int64) for b in batches])
                data = {'images': images.reshape(-1, 3, 32, 32).permute(0, 2, 3, 1).contiguous(),
                        'labels': labels, 'classes': classes}
                save_atomically(data, os.path.join(data_dir, split + '.pt'))
    except Exception as e:
        raise AirbenchError(f"cannot read {archive} as the CIFAR-10 python archive "
                            f"({type(e).__name__}: {e}). {fix}") from None


def batch_translate(images, r):
    """Reflect-pad each image by r and crop it back at an independent uniform offset in [-r, r]^2."""
    n, c, h, w = images.shape
    padded = F.pad(images, (r, r, r, r), mode='reflect')
    dy, dx = torch.randint(0, 2 * r + 1, (2, n, 1), device=images.device)
    rows = (dy + torch.arange(h, device=images.device))[:, None, :, None]
    cols = (dx + torch.arange(w, device=images.device))[:, None, None, :]
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def batch_cutout(images, size):
    """Zero one size x size square per image, placed uniformly so that it lies wholly inside."""
    n, _, h, w = images.shape
    y0, x0 = (torch.randint(0, h - size + 1, (2, n, 1, 1), device=images.device))
    ys = torch.arange(h, device=images.device)[None, :, None]
    xs = torch.arange(w, device=images.device)[None, None, :]
    square = (ys >= y0) & (ys < y0 + size) & (xs >= x0) & (xs < x0 + size)
    return images.masked_fill(square[:, None], 0)


class CifarLoader:
    """One CIFAR-10 split held whole on the device, iterated as normalized, augmented batches.

    `images` (float [N,3,32,32] in [0,1]) and `labels` (int64 [N]) may be replaced, e.g. by a
    subset, before iterating. `aug` keys: flip (bool), translate (pixels), cutout (square size).
    """
    AUGMENTATIONS = ('flip', 'translate', 'cutout')

    def __init__(self, path, train=True, batch_size=500, aug=None, drop_last=None, shuffle=None, device=None):
        self.aug = dict(aug or {})
        unknown = set(self.aug) - set(self.AUGMENTATIONS)
        if unknown:
            raise AirbenchError(f"unknown augmentation(s) {sorted(unknown)}: use {', '.join(self.AUGMENTATIONS)}")
        if batch_size < 1:
            raise AirbenchError(f"batch_size must be at least 1, got {batch_size}")
        self.device = choose_device_and_dtype(device)[0]
        data = load_cifar10(path, train)
        self.images = data['images'].to(self.device).permute(0, 3, 1, 2).float().div(255)
        self.labels = data['labels'].to(self.device)
        # Made once: a copy to the GPU at every batch would block, the host waiting for the GPU every step.
        self.mean = torch.tensor(CIFAR_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(CIFAR_STD, device=self.device).view(1, 3, 1, 1)
        self.classes = data['classes']
        self.batch_size = batch_size
        self.drop_last = train if drop_last is None else drop_last
        self.shuffle = train if shuffle is None else shuffle

    def __len__(self):
        n = len(self.images)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def normalize(self, images):
        return (images - self.mean) / self.std

    def augment(self, images):
        # Augmenting each batch as it is drawn gives every image the same independent draws as
        # augmenting the whole epoch up front, with no epoch-sized temporaries.
        if self.aug.get('flip'):
            flip = torch.rand(len(images), device=images.device) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        if self.aug.get('translate'):
            images = batch_translate(images, self.aug['translate'])
        if self.aug.get('cutout'):
            images = batch_cutout(images, self.aug['cutout'])
        return images

    def __iter__(self):
        if len(self.images) != len(self.labels):
            raise AirbenchError(f"loader has {len(self.images)} images but {len(self.labels)} labels")
        n = len(self.images)
        order = torch.randperm(n, device=self.device) if self.shuffle else torch.arange(n, device=self.device)
        for i in range(len(self)):
            indices = order[i * self.batch_size:(i + 1) * self.batch_size]
            images = self.normalize(self.images[indices])
            yield self.augment(images), self.labels[indices]


#############################################
#            Network Components             #
#############################################

class BatchNorm(nn.BatchNorm2d):
    """BatchNorm with its scale fixed at 1 (only the bias trains) and paper-convention momentum."""

    def __init__(self, num_features, momentum, eps=1e-12):
        super().__init__(num_features, eps=eps, momentum=1 - momentum)
        self.weight.requires_grad = False


class Conv(nn.Conv2d):
    """3x3 'same' conv, initialized as partial identity: the first in_channels filters pass their
    input channel through unchanged, so each block starts close to the identity map."""

    def __init__(self, channels_in, channels_out):
        super().__init__(channels_in, channels_out, kernel_size=3, padding='same', bias=False)
        with torch.no_grad():
            nn.init.dirac_(self.weight[:channels_in])


class ConvGroup(nn.Module):
    def __init__(self, channels_in, channels_out, batchnorm_momentum):
        super().__init__()
        self.conv1 = Conv(channels_in, channels_out)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = BatchNorm(channels_out, batchnorm_momentum)
        self.conv2 = Conv(channels_out, channels_out)
        self.norm2 = BatchNorm(channels_out, batchnorm_momentum)
        self.activ = nn.GELU()

    def forward(self, x):
        x = self.activ(self.norm1(self.pool(self.conv1(x))))
        return self.activ(self.norm2(self.conv2(x)))


class Net(nn.Module):
    def __init__(self, widths, batchnorm_momentum, scaling_factor):
        super().__init__()
        self.whiten = nn.Conv2d(3, 24, kernel_size=2, padding=0, bias=True)
        self.whiten.weight.requires_grad = False  # set from the data by init_whitening_conv, frozen
        nn.init.zeros_(self.whiten.bias)
        self.layers = nn.Sequential(
            nn.GELU(),
            ConvGroup(24, widths['block1'], batchnorm_momentum),
            ConvGroup(widths['block1'], widths['block2'], batchnorm_momentum),
            ConvGroup(widths['block2'], widths['block3'], batchnorm_momentum),
            nn.MaxPool2d(3),
            nn.Flatten(),
        )
        self.head = nn.Linear(widths['block3'], 10, bias=False)
        self.scaling_factor = scaling_factor
        self.autocast_dtype = None  # set by set_precision

    def set_precision(self, dtype):
        """float16: half weights, float32 BatchNorm (as published). bfloat16: float32 weights under
        bf16 autocast (bf16 weights would round away the small updates). float32: plain."""
        self.float()
        if dtype == torch.float16:
            self.half()
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.float()
        self.autocast_dtype = dtype if dtype == torch.bfloat16 else None
        return self

    def forward(self, x):
        x = x.to(self.whiten.weight.dtype, memory_format=torch.channels_last)
        with torch.autocast(x.device.type, torch.bfloat16, enabled=self.autocast_dtype is not None):
            logits = self.head(self.layers(self.whiten(x)))
        return logits.float() * self.scaling_factor


def make_net(widths=None, batchnorm_momentum=None):
    """A fresh airbench94 network (float32, on the CPU, whitening weights not yet set)."""
    widths = widths or hyp['net']['widths']
    batchnorm_momentum = hyp['net']['batchnorm_momentum'] if batchnorm_momentum is None else batchnorm_momentum
    return Net(widths, batchnorm_momentum, hyp['net']['scaling_factor']).to(memory_format=torch.channels_last)


#############################################
#       Whitening Conv Initialization       #
#############################################

def get_patches(images, patch_size):
    """All patch_size x patch_size patches of images [N,C,H,W], flattened to rows of C*k*k."""
    c, k = images.shape[1], patch_size
    patches = images.unfold(2, k, 1).unfold(3, k, 1)  # [N,C,H',W',k,k]
    return patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)


@torch.no_grad()
def init_whitening_conv(layer, images, eps=5e-4):
    """Set `layer` (a Conv2d(3, 2*3*k*k, k)) to whiten the k x k patches of `images` (normalized
    training images [N,3,32,32]): each eigenvector of the patch covariance, scaled by
    1/sqrt(eigenvalue + eps), largest first, followed by all of their negations."""
    k = layer.kernel_size[0]
    patches = get_patches(images.float(), k)
    covariance = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)  # largest first
    filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).reshape(-1, images.shape[1], k, k)
    layer.weight.copy_(torch.cat([filters, -filters]))


#############################################
#                Training                   #
#############################################

def lr_multiplier(step, total_steps, warmup, start, end):
    """Piecewise-linear lr schedule: start -> 1 over the first `warmup` fraction, then 1 -> end."""
    warmup_steps = warmup * total_steps
    if step < warmup_steps:
        return start + (1 - start) * step / warmup_steps
    return 1 + (end - 1) * (step - warmup_steps) / (total_steps - warmup_steps)


def make_optimizer(net, opt, batch_size):
    """Nesterov SGD, parameterized so that lr, momentum and weight decay tune independently:
    lr and decay are given per 1024 examples and divided by the effective step size of momentum."""
    kilostep_scale = 1024 * (1 + 1 / (1 - opt['momentum']))
    lr = opt['lr'] / kilostep_scale                            # per step
    decay = opt['weight_decay'] * batch_size / kilostep_scale  # total decay per step, lr * wd
    norm_biases = [m.bias for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    other_params = [p for p in net.parameters() if p.requires_grad and all(p is not b for b in norm_biases)]
    lr_biases = lr * opt['bias_scaler']
    groups = [dict(params=norm_biases, lr=lr_biases, weight_decay=decay / lr_biases),
              dict(params=other_params, lr=lr, weight_decay=decay / lr)]
    optimizer = torch.optim.SGD(groups, momentum=opt['momentum'], nesterov=True)
    for group in optimizer.param_groups:
        group['initial_lr'] = group['lr']
    return optimizer


class ProgressLine:
    """Step, seconds per step and time left, inside epochs long enough to wait for (CPU runs): rewritten
    in place on a terminal, one line every ~10% of an epoch in a log file. Written to stderr."""
    min_epoch_seconds = 30  # shorter epochs (any GPU run) show only their table row

    def __init__(self, steps_per_epoch, total_steps, stream=None):
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.stream = stream or sys.stderr
        self.in_place = self.stream.isatty()
        self.shown = False

    def start_epoch(self, epoch, step):
        self.epoch, self.first_step, self.last_tenth = epoch, step, -1
        self.epoch_steps = min(self.steps_per_epoch, self.total_steps - step)
        self.start = time.perf_counter()

    def update(self, step):
        done = step - self.first_step
        seconds_per_step = (time.perf_counter() - self.start) / done
        tenth = 10 * done // self.epoch_steps
        if seconds_per_step * self.epoch_steps < self.min_epoch_seconds or (tenth == self.last_tenth and not self.in_place):
            return
        self.last_tenth = tenth
        line = (f'epoch {self.epoch + 1} step {done}/{self.epoch_steps}  {seconds_per_step:.2f} s/step  '
                f'{format_duration(seconds_per_step * (self.epoch_steps - done))} left in the epoch, '
                f'{format_duration(seconds_per_step * (self.total_steps - step))} in the training')
        self.stream.write('\r' + line + '\x1b[K' if self.in_place else line + '\n')
        self.stream.flush()
        self.shown = self.in_place

    def clear(self):
        """Erase the in-place line, so that the epoch's table row takes its place."""
        if self.shown:
            self.stream.write('\r\x1b[K')
            self.stream.flush()
            self.shown = False


def format_duration(seconds):
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f'{hours}h{minutes:02d}m' if hours else f'{minutes}m{seconds:02d}s' if minutes else f'{seconds}s'


def train(train_loader=None, test_loader=None, *, dtype=None, report=None, on_epoch_start=None, checkpoint=None,
          progress=False, **overrides):
    """Train a fresh network and return it.

    train_loader: a training CifarLoader (default: the data dir's training set with hyp['aug']).
    test_loader:  if given, val_acc is measured after each epoch (not counted in `seconds`).
    dtype:        compute precision (default: choose_device_and_dtype's choice for the device).
    report:       called after each epoch with a dict: epoch, train_loss, train_acc, val_acc,
                  seconds (cumulative training time, GPU-synchronized, evaluation excluded).
    on_epoch_start: called as on_epoch_start(epoch, net, optimizer, opt) before each epoch (0-based);
                  it may change `opt` (read at every step) or the optimizer: the hook for experiments.
    checkpoint:   a file path: the training state is saved there (atomically) after every epoch, and a
                  training that finds one there (same options, data size, device and dtype) continues
                  from it, first replaying the finished epochs' reports. On a CPU, a resumed training
                  ends with the same weights, bit for bit, as an uninterrupted one.
    progress:     show a ProgressLine inside long epochs.
    overrides:    any key of hyp['opt'], e.g. epochs=8, lr=10.0, label_smoothing=0, seed=0.
    """
    unknown = set(overrides) - set(hyp['opt'])
    if unknown:
        raise AirbenchError(f"unknown training option(s) {sorted(unknown)}; known: {', '.join(hyp['opt'])}")
    opt = {**hyp['opt'], **overrides}
    if not opt['epochs'] > 0:
        raise AirbenchError(f"epochs must be positive, got {opt['epochs']}")
    if opt['seed'] is not None:
        torch.manual_seed(opt['seed'])
    if train_loader is None:
        train_loader = CifarLoader(default_data_dir(), train=True, batch_size=opt['batch_size'], aug=hyp['aug'])
    device, dtype = choose_device_and_dtype(train_loader.device, dtype)
    if len(train_loader) == 0:
        raise AirbenchError(f"the training set ({len(train_loader.images)} images) is smaller than one batch "
                            f"({train_loader.batch_size})")
    steps_per_epoch = len(train_loader)
    total_steps = math.ceil(opt['epochs'] * steps_per_epoch)
    identity = {**opt, 'widths': hyp['net']['widths'], 'train_images': len(train_loader.images),
                'device': device.type, 'dtype': str(dtype)}
    checkpoint = None if checkpoint is None else os.path.abspath(checkpoint)  # any path-like, even a bare name
    saved = load_checkpoint(checkpoint, identity) if checkpoint and os.path.exists(checkpoint) else None
    progress_line = ProgressLine(steps_per_epoch, total_steps) if progress else None

    net = make_net().to(device).set_precision(dtype)
    optimizer = make_optimizer(net, opt, train_loader.batch_size)
    step = 0
    seconds = 0.0
    history = []  # the report of every finished epoch, kept for the checkpoint

    synchronize(device)
    start = time.perf_counter()
    init_whitening_conv(net.whiten, train_loader.normalize(train_loader.images[:5000]))
    if saved is not None:  # continue where the saved training stopped
        net.load_state_dict(saved['net'])
        optimizer.load_state_dict(saved['optimizer'])
        set_rng_state(device, saved['rng'])
        step, seconds, history = saved['step'], saved['seconds'], saved['history']
        for row in history if report is not None else ():
            report(row)
        synchronize(device)
        start = time.perf_counter()
    for epoch in range(len(history), math.ceil(opt['epochs'])):
        net.whiten.bias.requires_grad = epoch < opt['whiten_bias_epochs']
        if on_epoch_start is not None:
            on_epoch_start(epoch, net, optimizer, opt)
        if progress_line is not None:
            progress_line.start_epoch(epoch, step)
        loss_sum = correct = seen = 0
        net.train()
        for inputs, labels in train_loader:
            outputs = net(inputs)
            loss = F.cross_entropy(outputs, labels, label_smoothing=opt['label_smoothing'], reduction='sum')
            loss.backward()
            for group in optimizer.param_groups:
                group['lr'] = group['initial_lr'] * lr_multiplier(
                    step, total_steps, opt['lr_warmup'], opt['lr_start'], opt['lr_end'])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_sum = loss_sum + loss.detach()
            correct = correct + (outputs.argmax(1) == labels).sum()
            seen += len(labels)
            if progress_line is not None:
                progress_line.update(step)
            if step == total_steps:
                break
        synchronize(device)
        seconds += time.perf_counter() - start
        if progress_line is not None:
            progress_line.clear()
        if not torch.isfinite(loss_sum):
            raise AirbenchError(f"the training loss became {float(loss_sum)} in epoch {epoch + 1}; "
                                f"training diverged (try a lower lr, or float32 with --dtype float32)")
        history.append({'epoch': epoch + 1, 'train_loss': float(loss_sum) / seen, 'train_acc': float(correct) / seen,
                        'val_acc': evaluate(net, test_loader, tta_level=0) if test_loader is not None else None,
                        'seconds': seconds})
        if checkpoint is not None:
            save_atomically({**identity, 'net': net.state_dict(), 'optimizer': optimizer.state_dict(),
                             'rng': get_rng_state(device),
                             'step': step, 'seconds': seconds, 'history': history}, checkpoint)
        if report is not None:
            report(history[-1])
        synchronize(device)
        start = time.perf_counter()
    return net


def get_rng_state(device):
    """Every random state the training draws from: the CPU's, and the GPU's where the data lives there."""
    state = {'cpu': torch.get_rng_state()}
    if device.type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(device)
    if device.type == 'mps':
        state['mps'] = torch.mps.get_rng_state()
    return state


def set_rng_state(device, state):
    torch.set_rng_state(state['cpu'])
    if device.type == 'cuda':
        torch.cuda.set_rng_state(state['cuda'], device)
    if device.type == 'mps':
        torch.mps.set_rng_state(state['mps'])


def load_checkpoint(path, identity):
    """The training state saved at `path`, after checking it was saved by the same training."""
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise AirbenchError(f"cannot read the checkpoint {path} ({type(e).__name__}: {e}); delete it to start over") from None
    differences = [f"{key}: {state.get(key)} there, {value} here" for key, value in identity.items() if state.get(key) != value]
    if differences:
        raise AirbenchError(f"the checkpoint {path} was saved by another training ({'; '.join(differences)}); "
                            f"use the flags it was saved with, or delete it to start over")
    return state


#############################################
#          Evaluation (with TTA)            #
#############################################

def tta_logits(net, images, tta_level):
    """Level 0: one view. 1: mean with the mirror."""
    if tta_level == 0:
        return net(images)
    return 0.5 * (net(images) + net(images.flip(-1)))


@torch.no_grad()
def infer(net, loader, tta_level=None, batch_size=2000):
    """Logits [N,10] for every image of `loader`, in its stored order (no augmentation, no shuffle)."""
    tta_level = hyp['net']['tta_level'] if tta_level is None else tta_level
    if tta_level not in (0, 1):
        raise AirbenchError(f"tta_level must be 0 or 1, got {tta_level}")
    was_training = net.training
    net.eval()
    images = loader.images
    logits = torch.cat([tta_logits(net, loader.normalize(images[i:i + batch_size]), tta_level)
                        for i in range(0, len(images), batch_size)])
    net.train(was_training)
    return logits


def evaluate(net, loader, tta_level=None):
    """Accuracy (a float in [0, 1]) of `net` on every image of `loader`."""
    return (infer(net, loader, tta_level).argmax(1) == loader.labels).float().mean().item()


#############################################
#            FLOP and size counts           #
#############################################

def count_flops(total_steps, batch_size, test_images, tta_level):
    """(training FLOPs, evaluation FLOPs) of a run, counted by torch.utils.flop_counter on one real
    forward+backward and one forward of a small batch (both are linear in the batch size)."""
    from torch.utils.flop_counter import FlopCounterMode
    net, x = make_net(), torch.randn(2, 3, 32, 32)
    init_whitening_conv(net.whiten, x)
    with FlopCounterMode(display=False) as counter:
        net(x).sum().backward()
    train_flops = counter.get_total_flops() / len(x) * batch_size * total_steps
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x)
    views = {0: 1, 1: 2}[tta_level]
    return train_flops, counter.get_total_flops() / len(x) * views * test_images


def count_parameters(net):
    return sum(p.numel() for p in net.parameters())


#############################################
#                  Main                     #
#############################################

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--runs', type=int, default=None,
                        help='trainings to run (default: 25 on a GPU, as published; 1 on a CPU)')
    parser.add_argument('--epochs', type=float, default=hyp['opt']['epochs'], help='training length (may be fractional) (default: %(default)s)')
    parser.add_argument('--seed', type=int, default=None,
                        help='seed of the first run (run i uses seed+i); same seed, device and dtype, same result')
    parser.add_argument('--data-dir', default=default_data_dir(),
                        help='directory with train.pt/test.pt, or with the official cifar-10-python.tar.gz to write them from '
                             '(downloaded there if absent; env AIRBENCH_DATA) (default: %(default)s)')
    parser.add_argument('--tta-level', type=int, default=hyp['net']['tta_level'], choices=(0, 1),
                        help='test-time augmentation: 0 one view, 1 +mirror (default: %(default)s)')
    parser.add_argument('--device', default=None, help='cpu, cuda, cuda:N or mps (default: the best available)')
    parser.add_argument('--dtype', default=None, choices=tuple(DTYPES),
                        help='compute precision (default: float16 on CUDA, bfloat16 on bf16-capable CPUs)')
    parser.add_argument('--no-log', action='store_true', help='do not write logs/<run id>/log.pt')
    parser.add_argument('--checkpoint', metavar='PATH',
                        help='save the training state to PATH after every epoch; the same command run again '
                             'continues from it (for long CPU runs; one run only)')
    args = parser.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        parser.error(f'--runs must be at least 1, got {args.runs}')
    if args.checkpoint is not None:
        if args.runs not in (None, 1):
            parser.error(f'--checkpoint keeps one training: use it with --runs 1, not {args.runs}')
        args.runs = 1
    if not args.epochs > 0 or math.isinf(args.epochs):
        parser.error(f'--epochs must be a positive number, got {args.epochs}')
    try:
        args.device, args.dtype = choose_device_and_dtype(args.device, args.dtype)
    except AirbenchError as e:
        parser.error(str(e))
    problem = precision_problem(args.device, args.dtype)
    if problem:
        parser.error(problem)
    if args.runs is None:
        args.runs = 25 if args.device.type == 'cuda' else 1
    return args


COLUMNS = ('run', 'epoch', 'train_loss', 'train_acc', 'val_acc', 'tta_val_acc', 'seconds')


def print_row(values):
    cells = []
    for name, value in zip(COLUMNS, values):
        if isinstance(value, float):
            value = f'{value:.4f}' if name != 'seconds' else f'{value:.2f}'
        cells.append(f"{'' if value is None else value:>{len(name)}}")
    print('  '.join(cells), flush=True)


def save_atomically(obj, path):
    """Write atomically: an interrupted run leaves the previous complete file, never half of one."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(obj, path + '.tmp')
    os.replace(path + '.tmp', path)


def run_training(args, train_loader, test_loader, seed, label):
    """One timed training plus TTA evaluation; prints its table rows and returns its record."""
    epochs = []

    def report(row):
        epochs.append(row)
        print_row((label, row['epoch'], row['train_loss'], row['train_acc'], row['val_acc'], None, row['seconds']))

    net = train(train_loader, test_loader, dtype=args.dtype, report=report, epochs=args.epochs, seed=seed,
                checkpoint=args.checkpoint, progress=True)
    synchronize(args.device)
    start = time.perf_counter()
    tta_val_acc = evaluate(net, test_loader, tta_level=args.tta_level)
    synchronize(args.device)
    seconds = epochs[-1]['seconds'] + time.perf_counter() - start
    print_row((label, 'final', None, None, None, tta_val_acc, seconds))
    return {'seed': seed, 'tta_val_acc': tta_val_acc, 'seconds': seconds, 'epochs': epochs}


def main(argv=None):
    args = parse_args(argv)
    tune_process_for(args.device)
    run_id = datetime.datetime.now().strftime('%Y-%m-%d_%H-%M-%S_') + uuid.uuid4().hex[:6]
    log_path = os.path.join('logs', run_id, 'log.pt')
    try:
        train_loader = CifarLoader(args.data_dir, train=True, batch_size=hyp['opt']['batch_size'],
                                   aug=hyp['aug'], device=args.device)
        test_loader = CifarLoader(args.data_dir, train=False, batch_size=2000, device=args.device)
    except AirbenchError as e:
        sys.exit(f'{os.path.basename(__file__)}: error: {e}')

    resuming = args.checkpoint is not None and os.path.exists(args.checkpoint)
    if resuming and args.seed is None:  # the same command again continues the same training
        try:
            args.seed = load_checkpoint(args.checkpoint, identity={}).get('seed')
        except AirbenchError as e:
            sys.exit(f'{os.path.basename(__file__)}: error: {e}')

    total_steps = math.ceil(args.epochs * len(train_loader))
    train_flops, eval_flops = count_flops(total_steps, train_loader.batch_size, len(test_loader.images), args.tta_level)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), 'little') >> 1
    print(f'device {args.device}, dtype {str(args.dtype).removeprefix("torch.")}, {args.runs} run(s) of '
          f'{args.epochs} epochs ({total_steps} steps), first seed {seed}')
    print(f'{count_parameters(make_net()):,} parameters; {(train_flops + eval_flops) / 1e15:.3f} PFLOPs per run '
          f'(training {train_flops / 1e15:.3f} + TTA evaluation {eval_flops / 1e15:.4f})')
    if resuming:
        print(f'continuing the training saved in {args.checkpoint} (finished epochs are replayed from it)')
    with open(__file__) as f:
        source = f.read()
    log = {'run_id': run_id, 'argv': sys.argv, 'source': source, 'hyp': hyp,
           'device': str(args.device), 'dtype': str(args.dtype), 'torch': torch.__version__,
           'epochs': args.epochs, 'tta_level': args.tta_level, 'checkpoint': args.checkpoint,
           'flops': train_flops + eval_flops, 'runs': []}

    runs = log['runs']
    try:
        if args.device.type == 'cuda':  # warm-up: cudnn autotuning and lazy init stay out of the timings
            train(train_loader, test_loader, dtype=args.dtype, epochs=args.epochs)
        print_row(COLUMNS)
        for i in range(args.runs):
            runs.append(run_training(args, train_loader, test_loader, seed + i, label=i + 1))
            if not args.no_log:
                save_atomically(log, log_path)
    except AirbenchError as e:
        sys.exit(f'{os.path.basename(__file__)}: error: {e}')
    except KeyboardInterrupt:
        print(f'\ninterrupted after {len(runs)} complete run(s)', file=sys.stderr)
        if args.checkpoint is not None and not runs:
            print(f'the finished epochs are saved in {args.checkpoint}: run the same command to continue', file=sys.stderr)

    if runs:
        accs = torch.tensor([r['tta_val_acc'] for r in runs]) * 100
        times = torch.tensor([r['seconds'] for r in runs])
        std = f'{accs.std().item():.2f}' if len(runs) > 1 else 'n/a'
        print(f'TTA accuracy per run: {", ".join(f"{a:.2f}" for a in accs.tolist())}')
        print(f'mean {accs.mean().item():.2f} ± {std} % over {len(runs)} run(s); '
              f'{times.mean().item():.2f} s per run; {log["flops"] / times.mean().item() / 1e12:.3f} TFLOP/s')
        if not args.no_log:
            print(f'log: {log_path}')
    if len(runs) < args.runs:
        sys.exit(130)


if __name__ == '__main__':
    main()
