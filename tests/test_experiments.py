"""experiments/: the statistics helper against hand-computed values, each study's own arithmetic,
and every study end to end on the tiny synthetic dataset (narrow networks, batches of 64)."""
import argparse
import math
import sys
import types

import pytest
import torch

from conftest import REPO, SMALL_WIDTHS

sys.path.insert(0, str(REPO / 'experiments'))
import alt_translate, calibration, data_selection, dynamic_ls, flip_study  # noqa: E402,E401
import harness, stats, variance, whiten_unfreeze  # noqa: E402,E401

STUDIES = {'flip_study': flip_study, 'variance': variance, 'calibration': calibration, 'data_selection': data_selection,
           'alt_translate': alt_translate, 'dynamic_ls': dynamic_ls, 'whiten_unfreeze': whiten_unfreeze}


# The statistics helper (values worked by hand; cross-checked once against scipy.stats).

def test_summary_of_one_arm():
    s = stats.summarize([1, 2, 3, 4])
    assert (s['n'], s['mean']) == (4, 2.5)
    assert s['std'] == pytest.approx(math.sqrt(5 / 3))  # squared deviations 2.25+0.25+0.25+2.25 = 5, over n-1 = 3
    half = 3.182446 * math.sqrt(5 / 3) / 2  # t(0.975, df=3) = 3.182446
    assert s['ci95'] == pytest.approx((2.5 - half, 2.5 + half), abs=1e-5)


def test_one_run_has_no_spread_and_no_interval():
    s = stats.summarize([94.0])
    assert s['mean'] == 94.0 and math.isnan(s['std']) and all(math.isnan(x) for x in s['ci95'])
    assert math.isnan(stats.welch([94.0], [93.0, 93.5])['p'])


def test_welch_t_test():
    # a: mean 2.5, var 5/3; b: mean 5, var 2.5. se^2 = 5/12 + 1/2 = 11/12.
    result = stats.welch([1, 2, 3, 4], [3, 4, 5, 6, 7])
    assert result['difference'] == -2.5
    assert result['t'] == pytest.approx(-2.5 / math.sqrt(11 / 12))
    assert result['df'] == pytest.approx((11 / 12) ** 2 / ((5 / 12) ** 2 / 3 + 0.5 ** 2 / 4))  # 6.9808
    assert result['p'] == pytest.approx(0.034939, abs=1e-5)
    assert stats.welch([1, 2, 3], [1, 2, 3])['p'] == pytest.approx(1.0)


def test_summary_table_never_prints_a_p_of_zero():
    runs = lambda *accs: [{'tta_val_acc': a} for a in accs]  # noqa: E731
    table = harness.summary_table({'base': runs(0.930, 0.931, 0.929), 'better': runs(0.940, 0.941, 0.939),
                                   'same': runs(0.931, 0.929, 0.930)})
    assert '+1.00 pts, p < 0.001 (vs base)' in table and '+0.00 pts, p = 1.000 (vs base)' in table


@pytest.mark.parametrize('t, df, cdf', [(0.0, 5, 0.5), (1.0, 1, 0.75), (2.0, 2, 0.5 + 1 / math.sqrt(6)),
                                        (-2.0, 2, 0.5 - 1 / math.sqrt(6))])
def test_t_distribution_closed_forms(t, df, cdf):
    # df=1 is the Cauchy distribution (atan); df=2 has CDF 1/2 + t / (2 sqrt(2 + t^2)).
    assert stats.t_cdf(t, df) == pytest.approx(cdf, abs=1e-9)
    assert stats.t_quantile(cdf, df) == pytest.approx(t, abs=1e-6)


def test_epochs_to_match_interpolates_linearly_between_budgets():
    curve = {6: [92.0, 94.0], 10: [96.0], 12: [96.0]}  # means 93 at 6 epochs, 96 at 10 and 12
    assert stats.epochs_to_match(curve, [94.5, 94.5]) == pytest.approx(6 + 4 * 1.5 / 3)  # 8
    assert stats.epochs_to_match(curve, [93.0]) == 6 and stats.epochs_to_match(curve, [96.0]) == 10
    assert stats.epochs_to_match(curve, [92.0]) == -math.inf and stats.epochs_to_match(curve, [97.0]) == math.inf
    flat_then_rising = {6: [93.0], 10: [93.0], 12: [96.0]}  # reached first at 6; 94.5 halfway from 10 to 12
    assert stats.epochs_to_match(flat_then_rising, [93.0]) == 6
    assert stats.epochs_to_match(flat_then_rising, [94.5]) == 11


def test_bootstrap_keeps_paired_runs_paired_and_brackets_the_statistic():
    a = [93.1, 94.0, 93.5, 93.8, 94.2, 93.3]
    difference = lambda x, y: stats.mean(x) - stats.mean(y)  # noqa: E731
    assert stats.bootstrap_interval(difference, a, [v - 0.25 for v in a]) == pytest.approx((0.25, 0.25))
    low, high = stats.bootstrap_interval(stats.mean, a)
    assert min(a) < low < stats.mean(a) < high < max(a)
    assert stats.bootstrap_interval(stats.mean, a, seed=1) != (low, high) == stats.bootstrap_interval(stats.mean, a)


# Each study's own arithmetic.

def test_flip_study_reads_off_the_epochs_alternating_flip_needs():
    runs = lambda *accs: [{'tta_val_acc': a / 100} for a in accs]  # noqa: E731
    arms_by_budget = {6: ('alternating 6', 'random 6'), 10: ('alternating 10', 'random 10')}
    log = {'arms': {'alternating 6': runs(93.0, 93.0), 'random 6': runs(92.0, 92.0),
                    'alternating 10': runs(95.0, 95.0), 'random 10': runs(94.5, 94.5)}}
    text = flip_study.effective_epochs(log, arms_by_budget)  # 94.5 lies 3/4 of the way from 93 to 95
    assert text == ("alternating flip reaches random flip's 10-epoch mean (94.50%) at 9.00 epochs, 10.0% fewer "
                    "(95% bootstrap interval 9.00 to 9.00; linear between budgets)")  # 6 epochs: below the curve
    log['arms']['random 10'] = runs(94.0, 95.2)  # mean 94.6; 95.2 twice lies beyond the curve
    assert flip_study.effective_epochs(log, arms_by_budget).startswith(
        "alternating flip reaches random flip's 10-epoch mean (94.60%) at 9.20 epochs, 8.0% fewer (95% bootstrap "
        "interval 8.00 to > 10;")  # the low end: 94.0 twice
    assert flip_study.effective_epochs(log, {6: arms_by_budget[6]}) == ''  # one budget: no curve


def test_variance_decomposition_by_hand():
    correct = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    d = variance.variance_decomposition(correct)  # accuracies 1 and 0: variance 0.5; p = 1/2 everywhere
    assert d['test_set_std'] == pytest.approx(100 * math.sqrt(0.5))
    assert d['distribution_wise_std'] == pytest.approx(100 * math.sqrt(0.5 - 0.25 / 4))
    correct = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)
    d = variance.variance_decomposition(correct)  # variance 1/48 < finite-test-set part (1/9)/4: clipped to 0
    assert d['test_set_std'] == pytest.approx(100 * math.sqrt(1 / 48))
    assert d['distribution_variance_estimate'] == pytest.approx(1e4 * (1 / 48 - 1 / 36))
    assert d['distribution_wise_std'] == 0


def test_class_aggregated_calibration_error_by_hand():
    predictions = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])  # 2 networks, 4 examples
    labels = torch.tensor([0, 0, 1, 0])
    # class 0: bin 0 {2,3} 0.5*|0-0.5|, bin 1/2 {1} 0.25*|0.5-1|, bin 1 {0} 0; class 1 mirrors it: 0.375 each
    assert calibration.class_aggregated_calibration_error(predictions, labels, classes=2) == pytest.approx(0.75)
    assert calibration.class_aggregated_calibration_error(labels[None], labels, classes=2) == 0  # one perfect net


def test_cyclic_translation_visits_every_offset_once_per_cycle():
    offsets = alt_translate.offset_cycle(2)
    assert sorted(offsets) == [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float).reshape(2, 3, 8, 8)
    shifted = alt_translate.shift(images, 1, -2, r=2)
    assert torch.equal(shifted[..., 1:6, 2:7], images[..., 2:7, 0:5])  # content moved up 1 and right 2


def test_label_smoothing_anneals_linearly_over_the_epochs():
    values = [dynamic_ls.label_smoothing_at(e, 9.9, 0.2, 0.0) for e in range(10)]
    assert values[0] == 0.2 and values[-1] == 0.0
    assert values == pytest.approx([0.2 - 0.2 * e / 9 for e in range(10)])


# Every study end to end.

@pytest.fixture
def tiny_studies(monkeypatch):
    monkeypatch.setitem(harness.airbench94.hyp['net'], 'widths', SMALL_WIDTHS)
    monkeypatch.setitem(harness.airbench94.hyp['opt'], 'batch_size', 64)


@pytest.mark.parametrize('name, extra', [
    ('flip_study', ['--budgets', '1', '2']), ('variance', []), ('calibration', []),
    ('data_selection', ['--first-epochs', '1']), ('alt_translate', []), ('dynamic_ls', []),
    ('whiten_unfreeze', ['--unfreeze-epoch', '1']),
])
def test_study_runs_end_to_end_and_logs_everything(name, extra, tiny_studies, tiny_data_dir, tmp_path, capsys):
    log = STUDIES[name].main(['--runs', '2', '--epochs', '2', '--seed', '0', '--device', 'cpu',
                              '--data-dir', str(tiny_data_dir), '--logs', str(tmp_path), *extra])
    [directory] = (tmp_path / name).iterdir()
    assert directory.name.startswith('epochs1-2_seed0_' if name == 'flip_study' else 'epochs2_seed0_')
    saved = torch.load(directory / 'log.pt', weights_only=False)
    assert saved['experiment'] == name and saved['config']['runs'] == 2
    for arm, runs in saved['arms'].items():
        assert [run['seed'] for run in runs] == [0, 1], arm
        for run in runs:
            assert {'train_loss', 'train_acc', 'val_acc', 'tta_val_acc', 'seconds'} <= set(run['epochs'][-1])
            assert run['epochs'][-1]['tta_val_acc'] == run['tta_val_acc']
            assert 0 <= run['tta_val_acc'] <= 1 and run['predictions'].shape == (64,)
            assert run['predictions'].dtype == torch.uint8 and run['correct_probability'].dtype == torch.float16
            if saved['test_labels'] is not None:  # the studies of per-example statistics keep the labels
                assert (run['predictions'] == saved['test_labels']).float().mean().item() == run['tta_val_acc']
    text = (directory / 'log.txt').read_text()
    assert log['summary'] in text and log['summary'] in capsys.readouterr().out


def test_studies_log_their_own_fields_per_epoch(tiny_studies, tiny_data_dir, tmp_path):
    common = ['--runs', '1', '--epochs', '3', '--device', 'cpu', '--data-dir', str(tiny_data_dir),
              '--logs', str(tmp_path)]
    arms = dynamic_ls.main(common + ['--final-ls', '0.1'])['arms']
    annealed = [row['label_smoothing'] for row in arms['label smoothing 0.2 -> 0.1'][0]['epochs']]
    assert annealed == pytest.approx([0.2, 0.15, 0.1])
    assert [row['label_smoothing'] for row in arms['label smoothing 0.2 (airbench94)'][0]['epochs']] == [0.2] * 3
    arms = whiten_unfreeze.main(common + ['--unfreeze-epoch', '2'])['arms']
    assert [row['whiten_trainable'] for row in arms['unfrozen from epoch 2'][0]['epochs']] == [False, False, True]
    arms = alt_translate.main(common)['arms']
    assert [row['offset'] for row in arms['cyclic translate'][0]['epochs']] == alt_translate.offset_cycle(2)[:3]


def test_baseline_runs_are_reused_only_when_trained_the_same_way(tiny_studies, tiny_data_dir, one_batch_data_dir,
                                                                 tmp_path):
    common = ['--runs', '2', '--seed', '0', '--device', 'cpu', '--data-dir', str(tiny_data_dir),
              '--logs', str(tmp_path)]
    flip = flip_study.main(common + ['--budgets', '1', '2'])['arms']
    [flip_log] = (tmp_path / 'flip_study').iterdir()
    fresh = alt_translate.main(common + ['--epochs', '2'])['arms']['random translate (airbench94)']
    reused = alt_translate.main(common + ['--epochs', '2', '--baseline-from', str(flip_log)])['arms'][
        'random translate (airbench94)']
    assert all(run['reused_from'] == str(flip_log) for run in reused)
    # training on a CPU is deterministic: the reused runs are exactly the ones this study would train
    assert [r['tta_val_acc'] for r in reused] == [r['tta_val_acc'] for r in fresh] == \
        [r['tta_val_acc'] for r in flip['alternating flip, 2 epochs']]
    # other epochs: nothing to reuse, so the baseline is trained
    trained = dynamic_ls.main(common + ['--epochs', '0.5', '--baseline-from', str(flip_log)])['arms'][
        'label smoothing 0.2 (airbench94)']
    assert not any('reused_from' in run for run in trained)
    with pytest.raises(SystemExit, match='not a study log'):
        whiten_unfreeze.main(common + ['--baseline-from', str(tmp_path / 'nowhere')])
    with pytest.raises(SystemExit, match='trained on other data'):
        whiten_unfreeze.main(common + ['--data-dir', str(one_batch_data_dir), '--baseline-from', str(flip_log)])


def test_unfrozen_whitening_weights_actually_train(tiny_studies, tiny_data_dir):
    airbench94 = harness.airbench94
    train = airbench94.CifarLoader(tiny_data_dir, train=True, batch_size=64, aug=airbench94.hyp['aug'], device='cpu')
    net = airbench94.train(train, dtype=torch.float32, epochs=1, seed=0)
    whitened = net.whiten.weight.clone()
    net = airbench94.train(train, dtype=torch.float32, epochs=2, seed=0,
                           on_epoch_start=whiten_unfreeze.unfreeze_whitening_from(1, lr_scale=1.0))
    assert net.whiten.weight.requires_grad and not torch.allclose(net.whiten.weight, whitened)


def test_bad_study_flags_exit_with_a_message(tiny_data_dir, capsys):
    with pytest.raises(SystemExit):
        flip_study.main(['--runs', '0', '--data-dir', str(tiny_data_dir)])
    assert '--runs must be at least 1' in capsys.readouterr().err
    with pytest.raises(SystemExit, match='--fraction must be in'):
        data_selection.main(['--fraction', '1.5', '--data-dir', str(tiny_data_dir)])


def test_the_same_command_continues_a_study_where_it_stopped(tiny_studies, tiny_data_dir, tmp_path, monkeypatch):
    """Spread over sittings: a study run again with the same arguments keeps its finished runs and trains
    only the missing ones, arms interleaved, up to --runs per arm."""
    common = ['--epochs', '1', '--seed', '0', '--device', 'cpu', '--data-dir', str(tiny_data_dir),
              '--logs', str(tmp_path)]
    first = flip_study.main(common + ['--runs', '1'])['arms']
    train_run, calls = harness.train_run, []

    def interrupted_on_the_fourth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return train_run(*args, **kwargs)
    monkeypatch.setattr(harness, 'train_run', interrupted_on_the_fourth)
    partial = flip_study.main(common + ['--runs', '3'])['arms']  # trains run 2 of both arms, then run 3 of the first
    assert [len(runs) for runs in partial.values()] == [3, 2] and len(calls) == 4
    monkeypatch.setattr(harness, 'train_run', train_run)
    final = flip_study.main(common + ['--runs', '3'])['arms']
    [directory] = (tmp_path / 'flip_study').iterdir()
    assert [len(runs) for runs in final.values()] == [3, 3]
    for arm in final:
        assert [run['seed'] for run in final[arm]] == [0, 1, 2]
        assert final[arm][0]['seconds'] == first[arm][0]['seconds']  # kept, not trained again
    other = flip_study.main(common[:1] + ['2'] + common[2:] + ['--runs', '1'])  # other arguments: another study
    assert len(list((tmp_path / 'flip_study').iterdir())) == 2
    assert all(len(runs) == 1 for runs in other['arms'].values())


def test_data_selection_ranks_by_the_maximum_log_softmax(tiny_studies, tiny_data_dir, monkeypatch):
    """The release's confidence: the largest log-probability, whatever the label (not the true class's)."""
    logits = torch.tensor([[5.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 9.0, 0.0], [2.0, 0.0, 0.0]])
    monkeypatch.setattr(harness.airbench94, 'train', lambda *args, **kwargs: None)
    monkeypatch.setattr(harness.airbench94, 'infer', lambda net, loader, tta_level: logits)
    loader = types.SimpleNamespace(labels=torch.tensor([1, 0, 1, 1]))
    args = types.SimpleNamespace(dtype=torch.float32, first_epochs=1, fraction=0.5)
    indices, confidence = data_selection.least_confident(args, loader, seed=0)
    assert torch.allclose(confidence, logits.log_softmax(1).amax(1))
    assert indices.tolist() == [1, 3]  # the flattest and the next flattest, labels aside


def test_on_cuda_the_studies_train_airbench94_compiled_after_one_warm_up(monkeypatch):
    """The same method (tests/test_ablations.py checks airbench94_compiled against airbench94), compiled once."""
    warm_ups = []
    monkeypatch.setattr(harness, 'WARMED_UP', [])
    monkeypatch.setattr(harness.airbench94_compiled, 'warm_up', lambda *args: warm_ups.append(args))
    cuda = argparse.Namespace(device=torch.device('cuda'), dtype=torch.float16)
    assert harness.trainer(harness.airbench94, cuda, None, None) is harness.airbench94_compiled
    assert harness.trainer(harness.airbench94, cuda, None, None) is harness.airbench94_compiled
    assert len(warm_ups) == 1
    cpu = argparse.Namespace(device=torch.device('cpu'), dtype=torch.float32)
    assert harness.trainer(harness.airbench94, cpu, None, None) is harness.airbench94
    monkeypatch.setitem(harness.airbench94.hyp['opt'], 'lr', 1.0)  # a study that changes airbench94 trains it
    assert harness.trainer(harness.airbench94, cuda, None, None) is harness.airbench94
