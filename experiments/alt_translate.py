"""alt_translate.py: does a deterministic translation schedule beat random translation?

    python experiments/alt_translate.py --runs 2 --data-dir cifar10

The baseline is airbench94 unchanged (each image shifted by its own random offset in [-2, 2]^2,
redrawn every epoch). The variant, in the spirit of alternating flip, shifts every image of an
epoch by the same (dy, dx), taken from a fixed cyclic list of all 25 offsets (in a fixed shuffled
order, so consecutive epochs differ). The offset used is logged per epoch.
"""
import torch
import torch.nn.functional as F

import harness
from harness import airbench94


def offset_cycle(r, seed=0):
    """All (dy, dx) in [-r, r]^2, in a fixed pseudorandom order."""
    offsets = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
    order = torch.randperm(len(offsets), generator=torch.Generator().manual_seed(seed))
    return [offsets[i] for i in order]


def shift(images, dy, dx, r):
    """Every image moved by (dy, dx) pixels, reflect-padded: the crop at offset (dy, dx) of the r-padded image."""
    h, w = images.shape[-2:]
    padded = F.pad(images, (r, r, r, r), mode='reflect')
    return padded[..., r + dy:r + dy + h, r + dx:r + dx + w]


class CyclicTranslateLoader(airbench94.CifarLoader):
    """airbench94's loader (alternating flip kept) with epoch e translating every image by
    offsets[e % len(offsets)]. The radius comes from aug['cyclic_translate']."""

    def __init__(self, *args, aug=None, **kwargs):
        aug = dict(aug or {})
        self.radius = aug.pop('cyclic_translate', airbench94.hyp['aug']['translate'])
        self.offsets = offset_cycle(self.radius)
        super().__init__(*args, aug=aug, **kwargs)

    def augment(self, images, flip):
        dy, dx = self.offsets[(self.epoch - 1) % len(self.offsets)]  # self.epoch counts the pass under way
        return shift(super().augment(images, flip), dy, dx, self.radius)


def main(argv=None):
    args = harness.parse_args(__doc__.split('\n\n')[0], argv, baseline_is_airbench94=True)
    baseline, test = harness.loaders(args)
    radius = airbench94.hyp['aug']['translate']
    cyclic, _ = harness.loaders(args, loader_class=CyclicTranslateLoader,
                                aug={**airbench94.hyp['aug'], 'translate': 0, 'cyclic_translate': radius})

    def offset_of(epoch, net, optimizer, opt):
        return {'offset': cyclic.offsets[epoch % len(cyclic.offsets)]}

    arms = {'random translate (airbench94)': lambda seed: harness.train_run(args, baseline, test, seed),
            'cyclic translate': lambda seed: harness.train_run(args, cyclic, test, seed, epoch_fields=offset_of)}
    return harness.run_study('alt_translate', 'one cyclic offset per epoch vs random translation', args, arms)


if __name__ == '__main__':
    main()
