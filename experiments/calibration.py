"""calibration.py: is the ensemble of n airbench94 networks calibrated? (class-aggregated calibration error)

    python experiments/calibration.py --runs 10 --data-dir cifar10

n trainings of airbench94. For each class k and test example x, f_k(x) is the fraction of the n
networks that predict k (one of n + 1 values: these are the bins). Within each bin, the mean of
f_k is compared with how often the true class is k; CACE sums those gaps over the bins, weighted
by the bin's share of the test set, and over the classes. Published (the paper and its release): 0.0533 (n large).
"""
import torch

import harness


def class_aggregated_calibration_error(predictions, labels, classes=10):
    """predictions: int [networks, N] (argmax of each network); labels: int [N]."""
    networks, n = predictions.shape
    votes = torch.stack([(predictions == k).sum(0) for k in range(classes)])  # [classes, N]: networks voting k
    cace = 0.0
    for k in range(classes):
        for count in range(networks + 1):  # bin: exactly `count` networks predict k
            in_bin = votes[k] == count
            if in_bin.any():
                confidence = count / networks
                frequency = (labels[in_bin] == k).double().mean().item()
                cace += in_bin.double().mean().item() * abs(confidence - frequency)
    return cace


def summary(log):
    runs = log['arms']['airbench94']
    if not runs:
        return ''
    predictions = torch.stack([r['predictions'] for r in runs])
    log['cace'] = class_aggregated_calibration_error(predictions, log['test_labels'])
    return f"CACE of the {len(runs)}-network ensemble: {log['cace']:.4f} (published: 0.0533)"


def main(argv=None):
    args = harness.parse_args(__doc__.split('\n\n')[0], argv, runs_on_cpu=3, baseline_is_airbench94=True)
    train, test = harness.loaders(args)
    arms = {'airbench94': lambda seed: harness.train_run(args, train, test, seed)}
    return harness.run_study('calibration', 'class-aggregated calibration error of the ensemble', args, arms, summary,
                             test_labels=test.labels)


if __name__ == '__main__':
    main()
