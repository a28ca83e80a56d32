"""What every study shares: its command line, n seeded trainings per arm with airbench94's pieces,
and the logs: logs/<experiment>/<key>/log.pt and log.txt, rewritten after every run, <key> naming
the study's arguments (all but --runs and --logs). So an interrupted study keeps every finished run,
and the same command run again continues it, where it stopped, up to --runs per arm: a study can be
spread over several sittings.

A study defines its arms as a dict {arm name: function(seed) -> run record} (see `train_run`) and
calls `run_study`; the first arm is the baseline the others are tested against (Welch's t-test).
Where that baseline is airbench94 unchanged, `--baseline-from` takes its runs from an earlier
study's log instead of training them again.
"""
import argparse
import hashlib
import os
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import airbench94  # noqa: E402  (the repository root is on the path only now)
import airbench94_compiled  # noqa: E402
from stats import summarize, welch  # noqa: E402


def parse_args(description, argv=None, epochs=airbench94.hyp['opt']['epochs'], runs_on_cpu=2, extra=None,
               baseline_is_airbench94=False):
    """The flags every study takes (--runs, --epochs, --data-dir, --seed, --device), --baseline-from
    where the study's baseline arm is airbench94 unchanged, plus the study's own from
    `extra(parser)`. Bad values exit with a message, no traceback."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('--runs', type=int, default=None,
                        help=f'trainings per arm (default: 10 on a GPU, {runs_on_cpu} on a CPU)')
    parser.add_argument('--epochs', type=float, default=epochs,
                        help="training length of every arm (default: %(default)s; None: each script's own)")
    parser.add_argument('--data-dir', default=airbench94.default_data_dir(),
                        help='directory with train.pt/test.pt (default: %(default)s)')
    parser.add_argument('--seed', type=int, default=0,
                        help='run i of every arm uses seed + i (paired arms) (default: %(default)s)')
    parser.add_argument('--device', default=None, help='cpu, cuda, cuda:N or mps (default: the best available)')
    parser.add_argument('--logs', default='logs', help='logs go to LOGS/<experiment>/<key>/ (default: %(default)s)')
    if baseline_is_airbench94:
        parser.add_argument('--baseline-from', default=None, metavar='LOG_DIR',
                            help="reuse an earlier study's unchanged-airbench94 runs (same epochs, seeds, data, "
                                 "device, dtype) as this study's airbench94 arm instead of training them again")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        parser.error(f'--runs must be at least 1, got {args.runs}')
    if args.epochs is not None and not 0 < args.epochs < float('inf'):
        parser.error(f'--epochs must be a positive number, got {args.epochs}')
    try:
        args.device, args.dtype = airbench94.choose_device_and_dtype(args.device)
    except airbench94.AirbenchError as e:
        parser.error(str(e))
    if args.runs is None:
        args.runs = 10 if args.device.type == 'cuda' else runs_on_cpu
    return args


def loaders(args, loader_class=airbench94.CifarLoader, aug=None):
    """(training loader, test loader) on the study's device; training uses airbench94's augmentation
    unless `aug` is given."""
    aug = airbench94.hyp['aug'] if aug is None else aug
    try:
        train = loader_class(args.data_dir, train=True, batch_size=airbench94.hyp['opt']['batch_size'], aug=aug,
                             device=args.device)
        return train, airbench94.CifarLoader(args.data_dir, train=False, batch_size=2000, device=args.device)
    except airbench94.AirbenchError as e:
        sys.exit(f'{pathlib.Path(sys.argv[0]).name}: error: {e}')


WARMED_UP = []  # the devices on which airbench94_compiled has compiled its graphs


def trainer(script, args, train_loader, test_loader):
    """The script a run trains: on CUDA, airbench94_compiled in place of an unchanged airbench94 (the same method,
    compiled once, by a warm-up before the first run, for all of them); elsewhere `script` itself."""
    net_knobs = {key: value for key, value in airbench94_compiled.hyp['net'].items() if key != 'compile_on'}
    unchanged = {**airbench94_compiled.hyp, 'net': net_knobs} == airbench94.hyp  # no study has changed airbench94
    if script is not airbench94 or args.device.type != 'cuda' or not unchanged:
        return script
    if args.device not in WARMED_UP:
        tta_level = airbench94.hyp['net']['tta_level']
        airbench94_compiled.warm_up(argparse.Namespace(device=args.device, dtype=args.dtype, tta_level=tta_level),
                                    train_loader, test_loader)
        WARMED_UP.append(args.device)
    return airbench94_compiled


def train_run(args, train_loader, test_loader, seed, epoch_fields=None, script=airbench94, **overrides):
    """One training of `script` (airbench94 by default) and its TTA evaluation, as a run record: seed,
    tta_val_acc, seconds, per-example test results, compact (predictions: the argmax, uint8;
    correct_probability: the TTA softmax of the true class, float16), and per-epoch rows (train_loss,
    train_acc, val_acc, tta_val_acc (final epoch only: 6 views cost an epoch's worth of time on a
    CPU), seconds, and whatever `epoch_fields(epoch, net, optimizer, opt)` returns: it runs at the
    start of each epoch, as train()'s on_epoch_start hook, and may change the training)."""
    rows, fields = [], {}

    def on_epoch_start(epoch, net, optimizer, opt):
        fields.clear()
        fields.update(epoch_fields(epoch, net, optimizer, opt) if epoch_fields else {})

    def report(row):
        rows.append({**row, 'tta_val_acc': None, **fields})

    overrides = {'epochs': args.epochs or script.hyp['opt']['epochs'], **overrides}
    script = trainer(script, args, train_loader, test_loader)
    net = script.train(train_loader, test_loader, dtype=args.dtype, report=report,
                       on_epoch_start=on_epoch_start, seed=seed, **overrides)
    script.synchronize(args.device)
    start = time.perf_counter()
    logits = script.infer(net, test_loader)
    script.synchronize(args.device)
    predictions = logits.argmax(1)
    rows[-1]['tta_val_acc'] = (predictions == test_loader.labels).float().mean().item()
    rows[-1]['seconds'] += time.perf_counter() - start
    correct_probability = logits.softmax(1)[torch.arange(len(logits), device=logits.device), test_loader.labels]
    return {'seed': seed, 'tta_val_acc': rows[-1]['tta_val_acc'], 'seconds': rows[-1]['seconds'],
            'predictions': predictions.to(torch.uint8).cpu(), 'correct_probability': correct_probability.half().cpu(),
            'epochs': rows, 'train_epochs': overrides['epochs']}


def summary_table(arms, baselines=None):
    """Text: one line per arm (n, mean, std, 95% interval of TTA accuracy in %) and Welch's test of
    each arm against its baseline: baselines[arm], by default the first arm."""
    first = next(iter(arms), None)
    baselines = baselines or {arm: first for arm in arms if arm != first}
    lines = [f"{'arm':<36} {'n':>3} {'mean %':>8} {'std':>6} {'95% interval':>17}  vs its baseline (Welch)"]
    for name, runs in arms.items():
        accs = [100 * r['tta_val_acc'] for r in runs]
        if not accs:
            continue
        s = summarize(accs)
        versus = ''
        if name in baselines and arms[baselines[name]]:
            test = welch(accs, [100 * r['tta_val_acc'] for r in arms[baselines[name]]])
            p = 'p < 0.001' if test['p'] < 0.001 else f"p = {test['p']:.3f}"
            versus = f"{test['difference']:+.2f} pts, {p} (vs {baselines[name]})"
        lines.append(f"{name:<36} {s['n']:>3} {s['mean']:>8.2f} {s['std']:>6.2f} "
                     f"{s['ci95'][0]:>8.2f}-{s['ci95'][1]:<8.2f}  {versus}")
    return '\n'.join(lines)


def write_log(log, directory, text):
    """log.pt (everything) and log.txt (readable), each replaced atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(log, directory / 'log.pt.tmp')
    os.replace(directory / 'log.pt.tmp', directory / 'log.pt')
    (directory / 'log.txt.tmp').write_text(text)
    os.replace(directory / 'log.txt.tmp', directory / 'log.txt')


def log_text(log, extra_summary=''):
    lines = [f"{log['experiment']}: {log['question']}", f"config: {log['config']}", '']
    for arm, runs in log['arms'].items():
        for run in runs:
            lines.append(f"[{arm}] seed {run['seed']}: TTA accuracy {100 * run['tta_val_acc']:.2f}%, "
                         f"{run['seconds']:.1f} s")
            for row in run['epochs']:
                cells = [f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}' for k, v in row.items()]
                lines.append('    ' + ', '.join(cells))
    return '\n'.join(lines + ['', summary_table(log['arms'], log['baselines']), extra_summary, ''])


def config_of(args):
    return {k: str(v) if isinstance(v, (torch.device, torch.dtype)) else v for k, v in vars(args).items()}


def earlier_baseline_runs(args, name):
    """{seed: run record} of the unchanged-airbench94 runs (the baseline arms) in the log at
    args.baseline_from that were trained as this study's baseline would be: same epochs, data,
    device and dtype. On a CPU training is deterministic, so these are exactly the runs this study
    would train; elsewhere, runs of the same recipe."""
    path = pathlib.Path(args.baseline_from)
    try:
        log = torch.load(path / 'log.pt' if path.is_dir() else path, weights_only=False)
        arms = set((log['baselines'] or {}).values()) or {next(iter(log['arms']))}
    except Exception as e:  # a missing, unreadable or foreign file: say which, no traceback
        sys.exit(f'{name}: error: --baseline-from {path}: not a study log ({type(e).__name__}: {e})')
    ours = config_of(args)
    if any(log['config'].get(key) != ours[key] for key in ('data_dir', 'device', 'dtype')):
        sys.exit(f'{name}: error: --baseline-from {path}: trained on other data, device or dtype')
    return {run['seed']: run for arm in arms for run in log['arms'][arm] if run.get('train_epochs') == args.epochs}


def study_directory(args, name):
    """logs/<experiment>/epochs<budgets>_seed<seed>_<key>: the key names every argument but --runs and
    --logs, so that the same command, run again, finds the study it continues (and other arguments
    start another)."""
    config = {key: value for key, value in config_of(args).items() if key not in ('runs', 'logs')}
    key = hashlib.sha1(repr(sorted(config.items())).encode()).hexdigest()[:12]
    budgets = getattr(args, 'budgets', None) or [args.epochs]
    epochs = '-'.join('own' if e is None else f'{e:g}' for e in budgets)
    return pathlib.Path(args.logs) / name / f'epochs{epochs}_seed{args.seed}_{key}'


def run_study(name, question, args, arms, summarize_extra=None, baselines=None, test_labels=None):
    """Run every arm args.runs times (run i of each arm with seed args.seed + i, arms interleaved so
    that an interrupted study stays balanced), log after every run, print the summary and return
    the log. A study already logged with these arguments is continued: its finished runs are kept
    and only the missing ones trained. `summarize_extra(log) -> text` adds the study's own
    statistics; `baselines` maps an arm to the arm it is tested against (default: every arm against
    the first); `test_labels` are kept in the log for per-example statistics."""
    airbench94.tune_process_for(args.device)
    directory = study_directory(args, name)
    config = config_of(args)
    reused = earlier_baseline_runs(args, name) if getattr(args, 'baseline_from', None) else {}
    baseline_arm = next(iter(arms))
    log = {'experiment': name, 'question': question, 'config': config, 'torch': torch.__version__,
           'arms': {arm: [] for arm in arms}, 'baselines': baselines,
           'test_labels': None if test_labels is None else test_labels.cpu()}
    if (directory / 'log.pt').exists():
        log['arms'].update(torch.load(directory / 'log.pt', weights_only=False)['arms'])
        done = ', '.join(f'{len(runs)} run(s) of {arm}' for arm, runs in log['arms'].items())
        print(f'continuing {directory}: {done}')
    print(f'{name}: {question}\n{args.runs} run(s) per arm on {args.device} '
          f'({str(args.dtype).removeprefix("torch.")}); '
          f'logs in {directory}', flush=True)
    try:
        for i in range(args.runs):
            for arm, run in arms.items():
                if len(log['arms'][arm]) > i:  # finished in an earlier sitting
                    continue
                earlier = reused.get(args.seed + i) if arm == baseline_arm else None
                record = {**earlier, 'reused_from': args.baseline_from} if earlier else run(args.seed + i)
                log['arms'][arm].append(record)
                print(f'[{arm}] run {i + 1}/{args.runs}, seed {record["seed"]}: TTA accuracy '
                      f'{100 * record["tta_val_acc"]:.2f}%, {record["seconds"]:.1f} s'
                      + (f' (reused from {args.baseline_from})' if earlier else ''), flush=True)
                extra = summarize_extra(log) if summarize_extra else ''
                write_log(log, directory, log_text(log, extra))
    except airbench94.AirbenchError as e:
        sys.exit(f'{name}: error: {e}')
    except KeyboardInterrupt:
        print('\ninterrupted: the log keeps every finished run; the same command continues the study',
              file=sys.stderr)
    log['summary'] = summary_table(log['arms'], baselines)
    extra = summarize_extra(log) if summarize_extra else ''
    if any(log['arms'].values()):
        write_log(log, directory, log_text(log, extra))
    print('\n' + log['summary'] + ('\n' + extra if extra else ''))
    return log
