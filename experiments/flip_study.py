"""flip_study.py: does alternating flip beat random flip at equal epochs?

    python experiments/flip_study.py --runs 2 --budgets 4 9.9 --data-dir cifar10

Two arms per epoch budget: airbench94 unchanged (alternating flip), and airbench94 with the flip
redrawn at random every epoch. Published (the paper and its release): 94.01% vs 93.92% at 9.9 epochs, n large.
With several budgets it also reads off the epochs alternating flip needs to reach random flip's mean at each
(the effective speed-up; published: ~10% fewer epochs at 9.9, up to ~25% in longer trainings).
"""
import math

import torch

import harness
from harness import airbench94
from stats import bootstrap_interval, epochs_to_match, mean


class RandomFlipLoader(airbench94.CifarLoader):
    """airbench94's loader with the baseline flip: each image mirrored with probability 1/2,
    independently every epoch (the other augmentations unchanged)."""

    def augment(self, images, flip):
        return super().augment(images, torch.rand(len(images), device=images.device) < 0.5)


def effective_epochs(log, arms_by_budget):
    """A line per budget B: the epochs at which the alternating arm's means, interpolated between the study's
    budgets, reach the random arm's mean at B, and how much fewer than B that is (95% bootstrap interval)."""
    accuracies = {arm: [100 * run['tta_val_acc'] for run in runs] for arm, runs in log['arms'].items()}
    curve = {budget: accuracies[alternating] for budget, (alternating, _) in arms_by_budget.items()}
    if len(curve) < 2 or not all(curve.values()):
        return ''

    def epochs_at(*samples):  # the curve's budgets' accuracies, then the random arm's
        return epochs_to_match(dict(zip(curve, samples[:-1])), samples[-1])

    def shown(epochs):
        return f'{epochs:.2f}' if math.isfinite(epochs) else f'< {min(curve):g}' if epochs < 0 else f'> {max(curve):g}'
    lines = []
    for budget, (_, random_arm) in arms_by_budget.items():
        target = accuracies[random_arm]
        epochs = epochs_at(*curve.values(), target) if target else math.nan
        if math.isfinite(epochs):
            low, high = bootstrap_interval(epochs_at, *curve.values(), target)
            lines.append(f"alternating flip reaches random flip's {budget:g}-epoch mean ({mean(target):.2f}%) at "
                         f"{epochs:.2f} epochs, {100 * (1 - epochs / budget):.1f}% fewer (95% bootstrap interval "
                         f"{shown(low)} to {shown(high)}; linear between budgets)")
    return '\n'.join(lines)


def main(argv=None):
    args = harness.parse_args(__doc__.split('\n\n')[0], argv, extra=lambda p: p.add_argument(
        '--budgets', type=float, nargs='+', default=None, help='epoch budgets to compare (default: --epochs alone)'))
    alternating, _ = harness.loaders(args)
    random, test = harness.loaders(args, loader_class=RandomFlipLoader)
    arms, baselines, arms_by_budget = {}, {}, {}
    for epochs in args.budgets or [args.epochs]:
        baseline, variant = f'alternating flip, {epochs:g} epochs', f'random flip, {epochs:g} epochs'
        arms[baseline] = lambda seed, e=epochs: harness.train_run(args, alternating, test, seed, epochs=e)
        arms[variant] = lambda seed, e=epochs: harness.train_run(args, random, test, seed, epochs=e)
        baselines[variant], arms_by_budget[epochs] = baseline, (baseline, variant)
    return harness.run_study('flip_study', 'alternating vs random flip at equal epochs', args, arms,
                             lambda log: effective_epochs(log, arms_by_budget), baselines=baselines)


if __name__ == '__main__':
    main()
