"""data_selection.py: does training on the examples a first network finds hardest beat a random subset?

    python experiments/data_selection.py --runs 2 --data-dir cifar10

Per run: a first airbench94 network is trained on all the data without label smoothing; its
confidence in each training example ranks the examples, as in the release: the maximum
log-softmax over the classes (one view). Two arms train airbench94
for --epochs (default 16) on a --fraction (default 60%) of the training set: a random subset
(the baseline) and the least-confident subset. Published (the paper and its release): ~94% vs ~93%.
"""
import copy

import torch

import harness
from harness import airbench94


def subset(loader, indices):
    """The same loader over only `indices` (the published interface: replace images and labels)."""
    part = copy.copy(loader)
    part.images, part.labels = loader.images[indices], loader.labels[indices]
    return part


def least_confident(args, train, seed):
    """Indices of the args.fraction of `train` that a first network (trained on all of it without
    label smoothing) is least confident about, confidence being the maximum log-softmax over the
    classes (as in the release); and that network's confidences."""
    first = airbench94.train(train, dtype=args.dtype, seed=seed, epochs=args.first_epochs, label_smoothing=0.0)
    confidence = airbench94.infer(first, train, tta_level=0).log_softmax(1).amax(1)
    return confidence.argsort()[:int(args.fraction * len(train.labels))], confidence


def main(argv=None):
    def extra(parser):
        parser.add_argument('--fraction', type=float, default=0.6,
                            help='share of the training set each arm trains on (default: %(default)s)')
        parser.add_argument('--first-epochs', type=float, default=airbench94.hyp['opt']['epochs'],
                            help='training length of the first (ranking) network (default: %(default)s)')
    args = harness.parse_args(__doc__.split('\n\n')[0], argv, epochs=16, extra=extra)
    if not 0 < args.fraction <= 1:
        raise SystemExit(f'data_selection.py: error: --fraction must be in (0, 1], got {args.fraction}')
    train, test = harness.loaders(args)
    size = int(args.fraction * len(train.labels))

    def random_subset(seed):
        generator = torch.Generator().manual_seed(seed)
        indices = torch.randperm(len(train.labels), generator=generator)[:size].to(train.labels.device)
        return harness.train_run(args, subset(train, indices), test, seed)

    def least_confident_subset(seed):
        indices, confidence = least_confident(args, train, seed)
        record = harness.train_run(args, subset(train, indices), test, seed)
        record['selected_mean_confidence'] = confidence[indices].mean().item()
        record['all_mean_confidence'] = confidence.mean().item()
        return record

    arms = {f'random {args.fraction:.0%}': random_subset,
            f'least confident {args.fraction:.0%}': least_confident_subset}
    return harness.run_study('data_selection', 'least-confident vs random subset of the training set', args, arms)


if __name__ == '__main__':
    main()
