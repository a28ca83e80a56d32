"""dynamic_ls.py: does annealing label smoothing over training beat airbench94's constant 0.2?

    python experiments/dynamic_ls.py --runs 2 --final-ls 0.0 --data-dir cifar10

The baseline is airbench94 unchanged (label smoothing 0.2 throughout). The variant anneals it
linearly, epoch by epoch, from 0.2 in the first epoch to --final-ls in the last; the value in
effect is logged per epoch.
"""
import math

import harness
from harness import airbench94


def label_smoothing_at(epoch, epochs, start, final):
    """Linear from `start` (first epoch) to `final` (last epoch, the ceil(epochs)-th)."""
    last = max(math.ceil(epochs) - 1, 1)
    return start + (final - start) * min(epoch, last) / last


def main(argv=None):
    def extra(parser):
        parser.add_argument('--final-ls', type=float, default=0.0,
                            help='label smoothing in the last epoch (default: %(default)s)')
    args = harness.parse_args(__doc__.split('\n\n')[0], argv, baseline_is_airbench94=True, extra=extra)
    if not 0 <= args.final_ls < 1:
        raise SystemExit(f'dynamic_ls.py: error: --final-ls must be in [0, 1), got {args.final_ls}')
    train, test = harness.loaders(args)
    start = airbench94.hyp['opt']['label_smoothing']

    def constant(epoch, net, optimizer, opt):
        return {'label_smoothing': opt['label_smoothing']}

    def anneal(epoch, net, optimizer, opt):
        opt['label_smoothing'] = label_smoothing_at(epoch, args.epochs, start, args.final_ls)
        return {'label_smoothing': opt['label_smoothing']}

    arms = {f'label smoothing {start} (airbench94)':
            lambda seed: harness.train_run(args, train, test, seed, epoch_fields=constant),
            f'label smoothing {start} -> {args.final_ls}':
            lambda seed: harness.train_run(args, train, test, seed, epoch_fields=anneal)}
    return harness.run_study('dynamic_ls', 'annealed vs constant label smoothing', args, arms)


if __name__ == '__main__':
    main()
