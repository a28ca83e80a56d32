"""variance.py: how much of airbench94's run-to-run spread is the finite test set?

    python experiments/variance.py --runs 10 --data-dir cifar10

n trainings of airbench94 with different seeds. The test-set std is the std of their accuracies.
Part of that variance is only the sampling of 10,000 test images: for an example that a
fraction p of the runs gets right, it contributes p(1 - p) / N to the variance of the accuracy.
The rest is the distribution-wise variance (what a fresh test set would show on average):
    var_distribution = var_test - (1/N) * mean over examples of p(1 - p).
Published (the paper and its release): test-set std 0.128%, distribution-wise std 0.029% (n large).
"""
import math

import torch

import harness
from stats import summarize


def variance_decomposition(correct):
    """correct: bool [runs, N] (run r got example i right). Returns test-set std, distribution-wise
    std (0 where the estimate goes negative, as it can for few runs) and the mean p(1 - p), in %."""
    runs, n = correct.shape
    accuracies = correct.double().mean(1)
    test_variance = accuracies.var(unbiased=True).item() if runs > 1 else math.nan
    p = correct.double().mean(0)
    finite_test_set = (p * (1 - p)).mean().item() / n
    distribution_variance = test_variance - finite_test_set
    return {'runs': runs, 'test_set_std': 100 * math.sqrt(test_variance) if runs > 1 else math.nan,
            'distribution_wise_std': 100 * math.sqrt(max(distribution_variance, 0.0)) if runs > 1 else math.nan,
            'distribution_variance_estimate': 1e4 * distribution_variance,
            'mean_p_one_minus_p': (p * (1 - p)).mean().item()}


def summary(log):
    runs = log['arms']['airbench94']
    if not runs:
        return ''
    labels = log['test_labels']
    correct = torch.stack([r['predictions'] == labels for r in runs])
    d = variance_decomposition(correct)
    log['variance'] = d
    s = summarize([100 * r['tta_val_acc'] for r in runs])
    return (f"n = {d['runs']}: mean {s['mean']:.2f}%, test-set std {d['test_set_std']:.3f}%, distribution-wise std "
            f"{d['distribution_wise_std']:.3f}% (variance estimate {d['distribution_variance_estimate']:+.5f} %^2; "
            f"published: 0.128% and 0.029%)")


def main(argv=None):
    args = harness.parse_args(__doc__.split('\n\n')[0], argv, runs_on_cpu=3, baseline_is_airbench94=True)
    train, test = harness.loaders(args)
    arms = {'airbench94': lambda seed: harness.train_run(args, train, test, seed)}
    return harness.run_study('variance', 'test-set vs distribution-wise std of airbench94', args, arms, summary,
                             test_labels=test.labels)


if __name__ == '__main__':
    main()
