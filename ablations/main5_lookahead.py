"""main5_lookahead.py: ablation 5 of 8, adding lookahead.

Every 5 steps the weights are pulled back towards their EMA, and end on it. With it come airbench94's
lr (11.5 instead of 10), fast BatchNorm running statistics (momentum 0.6 instead of 0.9) and lr
schedule (peak at 23% of the steps, ending at 0.07 instead of 0): the original release found that
lookahead helps only together with the fast BatchNorm momentum, and vice versa, so the series
counts them as one feature.

    python ablations/main5_lookahead.py            # train, print a table per epoch, log to logs/<run id>/
    python ablations/main5_lookahead.py --help     # every flag

One step of the series in ablations/README.md, from main0_network.py (a plain conv net, standard
training) to main8_compile.py (airbench94_compiled.py): each script adds exactly one feature to
the one before and trains for the published fewest epochs at which it still reaches 94% (12 here).
`diff ablations/main4_freeze.py ablations/main5_lookahead.py` shows the feature and nothing else.

The method comes first; the command line and bookkeeping, the same in every script of the family,
follow at the end. Importing this file only defines things; its API is airbench94.py's (see README.md).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# What this script has, in the order the series adds it (ablations/README.md).
features = ('whiten', 'dirac', 'scalebias', 'freeze', 'lookahead')

hyp = {
    'opt': {
        'epochs': 12.0,             # published: the fewest epochs at which this step reaches 94%
        'batch_size': 1024,         # used when train() builds its own loader
        'lr': 11.5,                 # learning rate per 1024 examples (decoupled: see make_optimizer)
        'momentum': 0.85,           # Nesterov momentum
        'weight_decay': 0.0153,     # decay per 1024 examples, independent of lr and momentum
        'bias_scaler': 64.0,        # BatchNorm biases learn this much faster than the weights
        'label_smoothing': 0.2,     # regularizes the short, high-lr training
        'lr_warmup': 0.23,          # fraction of steps over which the lr ramps up...
        'lr_start': 0.2,            # ...from this multiple of lr to 1.0...
        'lr_end': 0.07,             # ...and then falls linearly to this multiple at the last step
        'whiten_bias_epochs': 3,    # the whitening conv's bias trains this many epochs, then freezes
        'lookahead_every': 5,       # steps between lookahead (EMA) updates
        'lookahead_decay': 0.95,    # per-step EMA decay base (raised to the 5th for 5 steps)
        'seed': None,               # None draws a fresh seed per training
    },
    'aug': {
        'flip': True,               # random flip: each image mirrored with probability 1/2, every epoch
        'translate': 2,             # reflect-pad by 2 and crop back at a random offset per image
    },
    'net': {
        'widths': {'block1': 64, 'block2': 256, 'block3': 256},
        'batchnorm_momentum': 0.6,  # paper convention: running = 0.6*running + 0.4*batch (fast)
        'scaling_factor': 1 / 9,    # scales the logits down, so the large lr stays stable
        'tta_level': 1,             # 0: one view, 1: + mirror (2 views)
    },
}

#############################################
#           Data and augmentation           #
#############################################

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # CIFAR-10's (a cache of another dataset carries its own)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


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

    def __init__(self, path, train=True, batch_size=500, aug=None, drop_last=None, shuffle=None, device=None):
        self.aug = dict(aug or {})
        unknown = sorted(set(self.aug) - {'flip', 'translate', 'cutout'})
        check(not unknown, f"unknown augmentation(s) {unknown}: use flip, translate, cutout")
        check(batch_size >= 1, f"batch_size must be at least 1, got {batch_size}")
        self.device = choose_device_and_dtype(device)[0]
        data = load_cifar10(path, train)
        self.images = data['images'].to(self.device).permute(0, 3, 1, 2).float().div(255)
        self.labels, self.classes = data['labels'].to(self.device), data['classes']
        self.mean = torch.tensor(data['mean'], device=self.device).view(1, 3, 1, 1)  # made once, not per batch:
        self.std = torch.tensor(data['std'], device=self.device).view(1, 3, 1, 1)    # a copy to the GPU would block
        self.batch_size = batch_size
        self.drop_last = train if drop_last is None else drop_last
        self.shuffle = train if shuffle is None else shuffle

    def __len__(self):
        n = len(self.images)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def normalize(self, images):
        return (images - self.mean) / self.std

    def __iter__(self):
        check(len(self.images) == len(self.labels),
              f"loader has {len(self.images)} images but {len(self.labels)} labels")
        flip = torch.rand(len(self.images), device=self.device) < 0.5  # random flip: a fresh half every epoch
        images = self.augment(self.normalize(self.images), flip)  # the whole set at once: a few kernels an epoch
        n = len(self.images)
        order = torch.randperm(n, device=self.device) if self.shuffle else torch.arange(n, device=self.device)
        for i in range(len(self)):
            indices = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield images[indices], self.labels[indices]

    def augment(self, images, flip):
        if self.aug.get('flip'):
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        if self.aug.get('translate'):
            images = batch_translate(images, self.aug['translate'])
        if self.aug.get('cutout'):
            images = batch_cutout(images, self.aug['cutout'])
        return images

#############################################
#                 Network                   #
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

    def forward(self, x):
        logits = self.head(self.layers(self.whiten(x)))
        return logits.float() * self.scaling_factor  # scaled in float32, whatever precision computed them


def make_net(widths=None, batchnorm_momentum=None):
    """A fresh airbench94 network (float32, on the CPU, whitening weights not yet set)."""
    widths = widths or hyp['net']['widths']
    batchnorm_momentum = hyp['net']['batchnorm_momentum'] if batchnorm_momentum is None else batchnorm_momentum
    return Net(widths, batchnorm_momentum, hyp['net']['scaling_factor']).to(memory_format=torch.channels_last)

#############################################
#       Whitening conv initialization       #
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
#     Optimizer, lr schedule, lookahead     #
#############################################


def lr_multiplier(step, total_steps, warmup, start, end):
    """Piecewise-linear lr schedule: start -> 1 over the first int(warmup * total_steps) steps, then 1 -> end."""
    warmup_steps = int(warmup * total_steps)
    if step < warmup_steps:
        return start + (1 - start) * step / warmup_steps
    return 1 + (end - 1) * (step - warmup_steps) / (total_steps - warmup_steps)


def make_optimizer(net, opt, batch_size):
    """Nesterov SGD, parameterized so that lr, momentum and weight decay tune independently.

    The loss is summed over the batch, so its gradient grows with the batch size; and momentum keeps
    applying each gradient at later steps, which multiplies its total effect by about 1/(1 - momentum).
    So lr is given per 1024 examples and divided by 1024 * (1 + 1/(1 - momentum)) (the release's
    momentum scale): changing the batch size or the momentum leaves the step per example about as it
    was. Weight decay is given as the total decay per 1024 examples (lr * wd in PyTorch's terms), so
    changing lr leaves the decay alone.
    """
    kilostep_scale = 1024 * (1 + 1 / (1 - opt['momentum']))
    lr = opt['lr'] / kilostep_scale                            # per step
    decay = opt['weight_decay'] * batch_size / kilostep_scale  # total decay per step, lr * wd
    norm_biases = [m.bias for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    other_params = [p for p in net.parameters() if p.requires_grad and all(p is not b for b in norm_biases)]
    lr_biases = lr * opt['bias_scaler']
    groups = [dict(params=norm_biases, lr=lr_biases, weight_decay=decay / lr_biases),
              dict(params=other_params, lr=lr, weight_decay=decay / lr)]
    fused = next(net.parameters()).is_cuda  # one kernel a step for all the parameters on a GPU
    optimizer = torch.optim.SGD(groups, momentum=opt['momentum'], nesterov=True, fused=fused)
    for group in optimizer.param_groups:
        group['initial_lr'] = group['lr']
    return optimizer


class LookaheadState:
    """EMA of all float state (BatchNorm running statistics included) that the net is pulled back to. Each
    average keeps its tensor's precision (as published): then one foreach call per precision updates them all,
    a few kernels on a GPU where a loop over the tensors would launch two for each."""

    def __init__(self, net):
        self.ema = {k: v.detach().clone() for k, v in net.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, net, decay):
        state = net.state_dict()
        for dtype in {v.dtype for v in self.ema.values()}:
            averages = [v for v in self.ema.values() if v.dtype == dtype]
            current = [state[k] for k, v in self.ema.items() if v.dtype == dtype]
            torch._foreach_lerp_(averages, current, 1 - decay)  # average += (1 - decay) * (current - average)
            torch._foreach_copy_(current, averages)  # and the net is pulled back to it

#############################################
#                Training                   #
#############################################


def train(train_loader=None, test_loader=None, *, dtype=None, report=None, on_epoch_start=None, checkpoint=None,
          progress=False, **overrides):
    """Train a fresh network and return it (set to its lookahead weights).

    train_loader: a training CifarLoader (default: the data dir's training set with hyp['aug']).
    test_loader:  if given, val_acc is measured after each epoch (not counted in `seconds`).
    dtype:        compute precision (default: choose_device_and_dtype's choice for the device).
    report:       called after each epoch with a dict: epoch, train_loss, train_acc, val_acc,
                  seconds (cumulative training time, GPU-synchronized, evaluation excluded).
    on_epoch_start: called as on_epoch_start(epoch, net, optimizer, opt) before each epoch (0-based);
                  it may change `opt` (read at every step) or the optimizer: the hook for experiments.
    checkpoint:   a path: the training state is saved there after every epoch, and a training that
                  finds one there continues from it (bit for bit on a CPU), replaying its epochs' reports.
    progress:     show a progress line inside long epochs.
    overrides:    any key of hyp['opt'], e.g. epochs=8, lr=10.0, label_smoothing=0, seed=0.
    """
    opt = Bookkeeper.options(overrides)
    if train_loader is None:
        train_loader = CifarLoader(default_data_dir(), batch_size=opt['batch_size'], aug=hyp['aug'])
    device, dtype = choose_device_and_dtype(train_loader.device, dtype)
    total_steps = math.ceil(opt['epochs'] * len(train_loader))
    net = set_precision(make_net().to(device), dtype)
    optimizer = make_optimizer(net, opt, train_loader.batch_size)

    books = Bookkeeper(train_loader, dtype, opt, report, checkpoint, progress)  # the clock starts here
    init_whitening_conv(net.whiten, train_loader.normalize(train_loader.images[:5000]))
    lookahead = LookaheadState(net)
    step = books.resume(net=net, optimizer=optimizer, lookahead=lookahead, loader=train_loader)
    for epoch in range(len(books.history), math.ceil(opt['epochs'])):  # a resumed training skips its finished epochs
        net.whiten.bias.requires_grad = epoch < opt['whiten_bias_epochs']
        if on_epoch_start is not None:
            on_epoch_start(epoch, net, optimizer, opt)
        net.train()
        for inputs, labels in books.batches(train_loader, step):
            outputs = net(inputs)
            loss = F.cross_entropy(outputs, labels, label_smoothing=opt['label_smoothing'], reduction='sum')
            loss.backward()
            for group in optimizer.param_groups:
                group['lr'] = group['initial_lr'] * lr_multiplier(
                    step, total_steps, opt['lr_warmup'], opt['lr_start'], opt['lr_end'])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % opt['lookahead_every'] == 0:
                decay = opt['lookahead_decay'] ** opt['lookahead_every'] * (step / total_steps) ** 3
                lookahead.update(net, decay)
            books.count(loss, outputs, labels)
        if step == total_steps:
            lookahead.update(net, decay=1.0)  # end on the averaged weights
        books.end_epoch(net, test_loader, step)
    return net

#############################################
#      Test-time augmentation (TTA)         #
#############################################

TTA_VIEWS = {0: 1, 1: 2}  # views per image at each tta_level


def tta_logits(net, images, tta_level):
    """Level 0: one view. 1: mean with the mirror."""
    if tta_level == 0:
        return net(images)
    return 0.5 * (net(images) + net(images.flip(-1)))


@torch.no_grad()
def infer(net, loader, tta_level=None, batch_size=2000):
    """Logits [N,10] for every image of `loader`, in its stored order (no augmentation, no shuffle)."""
    tta_level = hyp['net']['tta_level'] if tta_level is None else tta_level
    check(tta_level in TTA_VIEWS, f"tta_level must be one of {sorted(TTA_VIEWS)}, got {tta_level}")
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
#   This script's part of the bookkeeping   #
#############################################

GPU_RUNS = 25  # trainings per command on a GPU, as published (1 on a CPU)


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
    return train_flops, counter.get_total_flops() / len(x) * TTA_VIEWS[tta_level] * test_images


def warm_up(args, train_loader, test_loader):
    """An untimed training first on a GPU: cudnn's autotuning and lazy initialization stay out of the timings."""
    if args.device.type == 'cuda':
        train(train_loader, test_loader, dtype=args.dtype, epochs=args.epochs)

#############################################
#       Command line and bookkeeping        #
#############################################
# The same, byte for byte, in every script of the family: edit it in airbench94.py, then carry it to the
# others with `python tests/sync_bookkeeping.py` (tests/test_bookkeeping.py fails while a copy differs).

import argparse  # noqa: E402
import ctypes  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
COLUMNS = ('run', 'epoch', 'train_loss', 'train_acc', 'val_acc', 'tta_val_acc', 'seconds')


class AirbenchError(Exception):
    """A problem the user can fix (bad flag, missing data, diverged run): main() prints it, no traceback."""


def check(condition, message):
    if not condition:
        raise AirbenchError(message)


def cpu_has_bf16():
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def choose_device_and_dtype(device=None, dtype=None):
    """The device and precision policy: float16 on CUDA (BatchNorm in float32, as published), bfloat16
    autocast on a CPU with bf16 instructions, float32 elsewhere. Returns (torch.device, torch.dtype)."""
    present = [kind for kind in ('cuda', 'mps', 'cpu') if getattr(torch, kind).is_available()]
    try:
        device = torch.device(device or present[0])
    except (RuntimeError, TypeError):
        raise AirbenchError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
    check(device.type in present, f"device {str(device)!r}: PyTorch sees none here (no CUDA GPU?); use --device cpu")
    default = {'cuda': 'float16', 'cpu': 'bfloat16' if cpu_has_bf16() else 'float32'}.get(device.type, 'float32')
    dtype = DTYPES.get(dtype or default, dtype)
    check(dtype in DTYPES.values(), f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return device, dtype


def precision_problem(device, dtype):
    """Why `dtype` should not train on `device`, or None: the command line refuses it, train() runs it."""
    if device.type == 'cpu' and dtype == torch.float16:
        return f"--dtype float16 is for CUDA GPUs; on the CPU use {'bfloat16 or ' if cpu_has_bf16() else ''}float32"
    if device.type == 'cpu' and dtype == torch.bfloat16 and not cpu_has_bf16():
        return "this CPU has no bf16 instructions, so bfloat16 would be emulated and many times slower; use float32"
    if device.type == 'cuda' and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return "this GPU has no bfloat16 support; use float16 or float32"


def set_precision(net, dtype):
    """Make `net` compute in `dtype`. float16: half weights and inputs, float32 BatchNorm (as published).
    bfloat16: float32 weights under bf16 autocast (bf16 weights would round away the small updates)."""
    weights = torch.float16 if dtype == torch.float16 else torch.float32
    net.to(weights)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.float()
    forward = type(net).forward.__get__(net)  # the class's own, so that a second call does not wrap twice

    def forward_in_precision(x):
        with torch.autocast(x.device.type, torch.bfloat16, enabled=dtype == torch.bfloat16):
            return forward(x.to(weights, memory_format=torch.channels_last))
    net.forward = forward_in_precision
    return net


def tune_process_for(device):
    """Process-wide speedups, applied by main() only (never on import)."""
    torch.backends.cudnn.benchmark = True  # pick the fastest conv kernels for our fixed shapes
    if device.type == 'cpu' and sys.platform.startswith('linux'):
        # glibc hands freed large blocks back to the OS, so every step would page-fault its ~1 GB of
        # activations back in: a third of a CPU step. Serve them from a heap that never shrinks instead.
        libc = ctypes.CDLL('libc.so.6')
        libc.mallopt(-4, 0)  # M_MMAP_MAX
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD


def synchronize(device):  # wait for the device's queued work, so that wall-clock time measures it
    getattr(torch, device.type).synchronize()


def default_data_dir():
    return os.environ.get('AIRBENCH_DATA', './cifar10')


def load_cifar10(data_dir, train=True):
    """{'images': uint8 [N,32,32,3], 'labels': int64 [N], 'classes', 'mean', 'std'} of a split, from
    <data_dir>/{train,test}.pt, written first from the official cifar-10-python.tar.gz there (downloaded if
    absent or damaged). A cache of another dataset carries its own classes and normalization."""
    path = os.path.join(data_dir, 'train.pt' if train else 'test.pt')
    fix = (f"Fix: point --data-dir (or AIRBENCH_DATA) at a directory holding train.pt and test.pt, or, without "
           f"network, put the official cifar-10-python.tar.gz (www.cs.toronto.edu/~kriz/cifar.html) in {data_dir}.")
    try:
        if not os.path.exists(path):
            from torchvision.datasets import CIFAR10  # checks, reads and if need be downloads the official archive
            for split in ('train', 'test'):
                data = CIFAR10(data_dir, train=split == 'train', download=True)
                save_atomically({'images': torch.tensor(data.data), 'labels': torch.tensor(data.targets),
                                 'classes': data.classes}, os.path.join(data_dir, f'{split}.pt'))
            shutil.rmtree(os.path.join(data_dir, 'cifar-10-batches-py'))  # the archive's unpacked copy
    except Exception as e:
        raise AirbenchError(f"CIFAR-10 is not in {data_dir}, and writing it from the official archive failed "
                            f"({type(e).__name__}: {e}). {fix}") from None
    try:
        data = torch.load(path, map_location='cpu', weights_only=True)
        images, labels, classes = data['images'], data['labels'], data.get('classes') or [str(k) for k in range(10)]
        check(images.dtype == torch.uint8 and images.shape[1:] == (32, 32, 3) and labels.dtype == torch.int64
              and labels.shape == images.shape[:1] and 0 <= labels.min() and labels.max() < len(classes),
              "expected a dict of 'images', uint8 [N,32,32,3], and 'labels', int64 [N] in 0-9")
    except Exception as e:
        raise AirbenchError(f"cannot read {path} as a CIFAR-10 {'train' if train else 'test'} cache "
                            f"({type(e).__name__}: {e}); delete it to write it again. {fix}") from None
    return dict(images=images, labels=labels, classes=classes, mean=data.get('mean', CIFAR_MEAN),
                std=data.get('std', CIFAR_STD))


def save_atomically(obj, path):
    """An interrupted write leaves the previous complete file, never half of one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(obj, f'{path}.tmp')
    os.replace(f'{path}.tmp', path)


def load_checkpoint(path, identity):
    """The training state saved at `path`, after checking that the same training saved it."""
    try:
        saved = torch.load(path, map_location='cpu', weights_only=True)
        differences = [f'{key}: {saved["identity"].get(key)} there, {value} here' for key, value in identity.items()
                       if saved['identity'].get(key) != value]
    except Exception as e:
        raise AirbenchError(f"cannot read {path} as a checkpoint of these scripts ({type(e).__name__}: {e}); "
                            f"delete it to start over") from None
    check(not differences, f"the checkpoint {path} was saved by another training ({'; '.join(differences)}); "
          f"use the flags it was saved with, or delete it to start over")
    return saved


def random_state(device, state=None):
    """The random states a training draws from (the CPU's, and the GPU's holding the data), or set them to `state`."""
    gpu = [] if device.type == 'cpu' else [getattr(torch, device.type)]  # torch.cuda or torch.mps
    if state is None:
        return [torch.get_rng_state()] + [module.get_rng_state(device) for module in gpu]
    torch.set_rng_state(state[0])
    for module in gpu:
        module.set_rng_state(state[1], device)


class Bookkeeper:
    """What train() keeps beside the method: its options, the clock (training only, GPU-synchronized), each
    epoch's figures for `report`, a progress line inside long epochs, and a checkpoint after every epoch
    from which the same training, run again, continues (bit for bit on a CPU)."""
    min_epoch_seconds = 30  # shorter epochs (any GPU run) show no progress line, only their table row

    @staticmethod
    def options(overrides):
        """hyp['opt'] with train()'s overrides, checked; the random state is seeded if a seed is given."""
        unknown = sorted(set(overrides) - set(hyp['opt']))
        check(not unknown, f"unknown training option(s) {unknown}; known: {', '.join(hyp['opt'])}")
        opt = {**hyp['opt'], **overrides}
        check(opt['epochs'] > 0, f"epochs must be positive, got {opt['epochs']}")
        if opt['seed'] is not None:
            torch.manual_seed(opt['seed'])
        return opt

    def __init__(self, loader, dtype, opt, report=None, checkpoint=None, progress=False):
        check(len(loader) > 0, f"the training set ({len(loader.images)} images) is smaller than one batch")
        self.device, self.report, self.progress, self.path = loader.device, report, progress, checkpoint
        self.steps_per_epoch, self.total_steps = len(loader), math.ceil(opt['epochs'] * len(loader))
        self.identity = {**opt, **{section: hyp[section] for section in hyp if section != 'opt'},
                         'train_images': len(loader.images), 'device': loader.device.type, 'dtype': str(dtype)}
        self.history, self.seconds = [], 0.0
        self.start_clock()

    def start_clock(self):
        synchronize(self.device)
        self.start, self.loss_sum, self.correct, self.seen = time.perf_counter(), 0, 0, 0

    def resume(self, **parts):
        """Keep `parts` (net, optimizers, lookahead, loader) for the checkpoint; if one of this training is
        saved, load them from it, replay its epochs to `report` and return its step, else 0."""
        self.parts = parts
        if self.path is None or not os.path.exists(self.path):
            return 0
        saved = load_checkpoint(self.path, self.identity)
        for name, part in parts.items():
            if hasattr(part, 'load_state_dict'):
                part.load_state_dict(saved[name])
            else:  # a loader's or a lookahead's plain attributes
                vars(part).update({k: v.to(self.device) if torch.is_tensor(v) else v for k, v in saved[name].items()})
        random_state(self.device, saved['random_state'])
        self.history, self.seconds = saved['history'], saved['seconds']
        for row in self.history if self.report else ():
            self.report(row)
        self.start_clock()
        return saved['step']

    def batches(self, loader, step, label=None):
        """The loader's batches up to the training's last step; inside long epochs, a progress line on stderr
        every tenth of the epoch (rewritten in place on a terminal)."""
        steps, shown, start = min(self.steps_per_epoch, self.total_steps - step), -1, time.perf_counter()
        for done, batch in zip(range(1, steps + 1), loader):
            yield batch
            per_step = (time.perf_counter() - start) / done
            if self.progress and per_step * steps >= self.min_epoch_seconds and 10 * done // steps > shown:
                shown, left = 10 * done // steps, (self.total_steps - step - done) * per_step / 60
                print(f'{label or f"epoch {len(self.history) + 1}"} step {done}/{steps}  {per_step:.2f} s/step  '
                      f'{per_step * (steps - done) / 60:.1f} min left in the epoch, {left:.1f} in the training',
                      end='\x1b[K\r' if sys.stderr.isatty() else '\n', file=sys.stderr, flush=True)

    def count(self, loss, outputs, labels):
        self.loss_sum = self.loss_sum + loss.detach()
        self.correct = self.correct + (outputs.argmax(1) == labels).sum()
        self.seen += len(labels)

    def end_epoch(self, net, test_loader, step):
        """Stop the clock; check the loss; record, save and report the epoch; restart the clock."""
        synchronize(self.device)
        self.seconds += time.perf_counter() - self.start
        if self.progress and sys.stderr.isatty():
            print('\x1b[K', end='', file=sys.stderr)  # the epoch's row takes the progress line's place
        check(torch.isfinite(self.loss_sum), f"the training loss became {float(self.loss_sum)} in epoch "
              f"{len(self.history) + 1}; training diverged (try a lower lr, or float32 with --dtype float32)")
        self.history.append({'epoch': len(self.history) + 1, 'train_loss': float(self.loss_sum) / self.seen,
                             'train_acc': float(self.correct) / self.seen,
                             'val_acc': None if test_loader is None else evaluate(net, test_loader, tta_level=0),
                             'seconds': self.seconds})
        self.save(step)
        if self.report is not None:
            self.report(self.history[-1])
        self.start_clock()

    def save(self, step):
        """Save the checkpoint, if one was asked for: the parts' state, with the random state and the figures."""
        if self.path is not None:  # of a loader: its pass count and flips; of a lookahead: its averages
            parts = {name: part.state_dict() if hasattr(part, 'state_dict') else
                     {k: v for k, v in vars(part).items() if k in ('epoch', 'flipped', 'ema', 'kept')}
                     for name, part in self.parts.items()}
            save_atomically({'identity': self.identity, 'random_state': random_state(self.device), 'step': step,
                             'seconds': self.seconds, 'history': self.history, **parts}, self.path)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--runs', type=int, help=f'trainings to run (default: {GPU_RUNS} on a GPU, 1 on a CPU)')
    parser.add_argument('--epochs', type=float, default=hyp['opt']['epochs'],
                        help='training length, may be fractional (default: %(default)s)')
    parser.add_argument('--seed', type=int, help='seed of the first run; run i uses seed+i (default: a random one)')
    parser.add_argument('--data-dir', default=default_data_dir(), help='train.pt and test.pt, or the official '
                        'cifar-10-python.tar.gz to write them from (default: env AIRBENCH_DATA, else %(default)s)')
    parser.add_argument('--tta-level', type=int, default=hyp['net']['tta_level'], choices=sorted(TTA_VIEWS),
                        help=f'test-time augmentation, {{level: views per image}} {TTA_VIEWS} (default: %(default)s)')
    parser.add_argument('--device', help='cpu, cuda, cuda:N or mps (default: the best available)')
    parser.add_argument('--dtype', choices=tuple(DTYPES), help='compute precision (default: float16 on CUDA, '
                        'bfloat16 on CPUs with bf16 instructions, else float32)')
    parser.add_argument('--no-log', action='store_true', help='do not write logs/<run id>/log.pt')
    parser.add_argument('--checkpoint', metavar='PATH', help='save the training state to PATH after every epoch; '
                        'the same command run again continues from it (for long CPU runs; one run only)')
    args = parser.parse_args(argv)
    try:
        check(args.runs is None or args.runs >= 1, f'--runs must be at least 1, got {args.runs}')
        check(not args.checkpoint or args.runs in (None, 1), f'--checkpoint keeps one training: use it with '
              f'--runs 1, not {args.runs}')
        check(0 < args.epochs < math.inf, f'--epochs must be a positive number, got {args.epochs}')
        args.device, args.dtype = choose_device_and_dtype(args.device, args.dtype)
        check(not precision_problem(args.device, args.dtype), precision_problem(args.device, args.dtype))
    except AirbenchError as e:
        parser.error(str(e))
    if args.runs is None:
        args.runs = GPU_RUNS if args.device.type == 'cuda' and not args.checkpoint else 1
    return args


def print_row(*cells):
    cells = ['' if cell is None else f'{cell:.4f}' if isinstance(cell, float) else cell for cell in cells]
    print('  '.join(f'{cell:>{len(name)}}' for cell, name in zip(cells, COLUMNS)), flush=True)


def run_training(args, train_loader, test_loader, seed, run):
    """One timed training and its TTA evaluation: prints the table rows and returns the run's record."""
    epochs = []

    def report(row):
        epochs.append(row)
        print_row(run, row['epoch'], row['train_loss'], row['train_acc'], row['val_acc'], None, f'{row["seconds"]:.2f}')
    net = train(train_loader, test_loader, dtype=args.dtype, report=report, checkpoint=args.checkpoint,
                progress=True, epochs=args.epochs, seed=seed)
    start = time.perf_counter()  # train() returns with the device synchronized; evaluate() ends synchronized
    tta_val_acc = evaluate(net, test_loader, tta_level=args.tta_level)
    seconds = epochs[-1]['seconds'] + time.perf_counter() - start
    print_row(run, 'final', None, None, None, tta_val_acc, f'{seconds:.2f}')
    return {'seed': seed, 'tta_val_acc': tta_val_acc, 'seconds': seconds, 'epochs': epochs}


def main(argv=None):
    args = parse_args(argv)
    tune_process_for(args.device)
    log_path = os.path.join('logs', time.strftime('%Y-%m-%d_%H-%M-%S_') + os.urandom(3).hex(), 'log.pt')
    with open(__file__) as f:
        log = {'argv': sys.argv, 'source': f.read(), 'hyp': hyp, 'device': str(args.device), 'dtype': str(args.dtype),
               'torch': torch.__version__, 'runs': []}
    try:
        train_loader = CifarLoader(args.data_dir, batch_size=hyp['opt']['batch_size'], aug=hyp['aug'],
                                   device=args.device)
        test_loader = CifarLoader(args.data_dir, train=False, batch_size=2000, device=args.device)
        resuming = args.checkpoint is not None and os.path.exists(args.checkpoint)
        if resuming and args.seed is None:  # the same command again continues the same training
            args.seed = load_checkpoint(args.checkpoint, identity={})['identity']['seed']
        seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), 'little') >> 1
        total_steps = math.ceil(args.epochs * len(train_loader))
        log['flops'] = sum(count_flops(total_steps, train_loader.batch_size, len(test_loader.images), args.tta_level))
        print(f'device {args.device}, dtype {str(args.dtype)[6:]}, {args.runs} run(s) of {args.epochs} epochs '
              f'({total_steps} steps), first seed {seed}')
        print(f'{sum(p.numel() for p in make_net().parameters()):,} parameters; {log["flops"] / 1e15:.3f} PFLOPs per '
              f'run (TTA evaluation included)')
        if resuming:
            print(f'continuing the training saved in {args.checkpoint} (its finished epochs are replayed)')
        warm_up(args, train_loader, test_loader)
        print_row(*COLUMNS)
        for i in range(args.runs):
            log['runs'].append(run_training(args, train_loader, test_loader, seed + i, run=i + 1))
            if not args.no_log:
                save_atomically(log, log_path)
    except AirbenchError as e:
        sys.exit(f'{os.path.basename(__file__)}: error: {e}')
    except KeyboardInterrupt:
        print(f'\ninterrupted after {len(log["runs"])} complete run(s)', file=sys.stderr)
    accs = torch.tensor([run['tta_val_acc'] for run in log['runs']]) * 100
    if len(accs):
        print(f'TTA accuracy per run: {", ".join(f"{acc:.2f}" for acc in accs.tolist())}')
        std = f'{accs.std():.2f}' if len(accs) > 1 else 'n/a'
        print(f'mean {accs.mean():.2f} ± {std} % over {len(accs)} run(s); '
              f'{sum(run["seconds"] for run in log["runs"]) / len(accs):.2f} s per run')
    if len(accs) and not args.no_log:
        print(f'log: {log_path}')
    if len(accs) < args.runs:
        sys.exit(130)


if __name__ == '__main__':
    main()
