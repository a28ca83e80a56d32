"""The command line: clear one-paragraph errors (never a traceback), logs, and imports without side effects.
The command line is the same in every script (test_bookkeeping.py), so it is tested on airbench94."""
import os
import pathlib
import subprocess
import sys
import urllib.request

import pytest
import torch

from conftest import ALL_SCRIPTS, ONLY_AIRBENCH94, REPO


def run_script(name, *args, cwd):
    """Run a script as a user would. torch.compile is switched off (TORCHDYNAMO_DISABLE) to keep
    these tests fast; compiling is tested on its own."""
    return subprocess.run([sys.executable, str(REPO / f'{name}.py'), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, 'TORCHDYNAMO_DISABLE': '1'})


def exit_of_main(script, *args, capsys):
    """(exit status, stderr) of main() run in this process as a user would run the script: any exception but
    SystemExit escapes and fails the test, as a traceback would. sys.exit(text) prints the text, status 1."""
    with pytest.raises(SystemExit) as raised:
        script.main(list(args))
    code, err = raised.value.code, capsys.readouterr().err
    return (1, err + code) if isinstance(code, str) else (code, err)


def test_import_has_no_side_effects(tmp_path):
    """Every script, imported one after the other in one process: nothing printed, nothing written."""
    code = f'import sys; sys.path.insert(0, {str(REPO)!r})\n' + '\n'.join(
        f'import {name.replace("/", ".")}' for name in ALL_SCRIPTS)
    result = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == '' and result.stderr == ''
    assert list(tmp_path.iterdir()) == []  # no logs, no data, no downloads


def test_help_documents_every_flag_and_the_scripts_own_defaults(tmp_path):
    result = run_script('airbench94', '--help', cwd=tmp_path)
    assert result.returncode == 0
    for flag in ('--runs', '--epochs', '--seed', '--data-dir', '--tta-level', '--device', '--dtype', '--no-log',
                 '--checkpoint'):
        assert flag in result.stdout
    assert 'default: 25 on a GPU' in result.stdout and 'default: 9.9' in result.stdout


@pytest.mark.parametrize('name, runs', [('airbench95', 10), ('airbench96', 5), ('ablations/main5_lookahead', 25)])
def test_each_script_runs_its_own_number_of_trainings_on_a_gpu(name, runs, monkeypatch):
    from conftest import load_script
    script = load_script(name)
    monkeypatch.setattr(script, 'choose_device_and_dtype', lambda device, dtype: (torch.device('cuda'), torch.float16))
    monkeypatch.setattr(script, 'precision_problem', lambda device, dtype: None)
    assert script.parse_args([]).runs == runs and script.parse_args(['--checkpoint', 'c.pt']).runs == 1
    assert script.parse_args(['--epochs', '3']).epochs == 3.0


@pytest.mark.parametrize('args, message', [
    (['--epochs', '0'], '--epochs must be a positive number'),
    (['--epochs', 'nan'], '--epochs must be a positive number'),
    (['--runs', '0'], '--runs must be at least 1'),
    (['--tta-level', '3'], 'invalid choice'),
    (['--device', 'tpu'], 'unknown device'),
    (['--dtype', 'int8'], 'invalid choice'),
    (['--device', 'cpu', '--dtype', 'float16'], '--dtype float16 is for CUDA GPUs; on the CPU use'),
])
@ONLY_AIRBENCH94
def test_invalid_flags_exit_with_a_message_and_no_traceback(script, args, message, capsys):
    code, err = exit_of_main(script, *args, capsys=capsys)
    assert code != 0 and message in err


def corrupt(path):
    path.write_bytes(b'not a torch file')


def wrong_shape(path):
    images, labels = torch.zeros(10, 3, 32, 32, dtype=torch.uint8), torch.zeros(10, dtype=torch.int64)  # CHW, not HWC
    torch.save({'images': images, 'labels': labels}, path)


@pytest.mark.parametrize('damage, message', [(corrupt, 'as a CIFAR-10 train cache'),
                                             (wrong_shape, "expected a dict of 'images', uint8 [N,32,32,3]")])
@ONLY_AIRBENCH94
def test_bad_data_cache_exits_with_a_fix_and_no_traceback(script, damage, message, tmp_path, capsys):
    damage(tmp_path / 'train.pt')
    code, err = exit_of_main(script, '--data-dir', str(tmp_path), '--no-log', capsys=capsys)
    assert code == 1 and message in err and 'cifar-10-python.tar.gz' in err


@ONLY_AIRBENCH94
def test_unreadable_data_dir_exits_with_a_message(script, tmp_path, capsys):
    (tmp_path / 'train.pt').mkdir()  # a directory where the file should be: unreadable as a file
    code, err = exit_of_main(script, '--data-dir', str(tmp_path), '--no-log', capsys=capsys)
    assert code == 1 and 'cannot read' in err


def no_network(*args, **kwargs):
    raise OSError('network is unreachable')


@ONLY_AIRBENCH94
def test_missing_data_without_network_is_a_clear_error(script, tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, 'urlopen', no_network)
    with pytest.raises(script.AirbenchError, match='from the official archive failed.*network is unreachable'):
        script.CifarLoader(tmp_path / 'empty', device='cpu')
    with pytest.raises(SystemExit, match='put the official cifar-10-python.tar.gz'):
        script.main(['--data-dir', str(tmp_path / 'empty'), '--no-log', '--device', 'cpu'])


def write_official_archive(path, images_per_batch=3):
    """A small cifar-10-python.tar.gz in the official layout: pickled dicts of flat CHW uint8 rows (str keys,
    as the official Python 2 pickles read)."""
    import io
    import pickle
    import tarfile

    import numpy as np
    rng = np.random.default_rng(0)
    with tarfile.open(path, 'w:gz') as tar:
        def add(name, content):
            data = pickle.dumps(content)
            info = tarfile.TarInfo('cifar-10-batches-py/' + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add('batches.meta', {'label_names': list('abcdefghij')})
        batches = {}
        for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
            batches[name] = {'data': rng.integers(0, 256, (images_per_batch, 3072), dtype=np.uint8),
                             'labels': rng.integers(0, 10, images_per_batch).tolist()}
            add(name, batches[name])
    return batches


@pytest.fixture
def small_archives_pass_the_checksums(monkeypatch):
    """torchvision checks the official archive's MD5s; the small archives here are not the official one."""
    import torchvision.datasets.cifar
    import torchvision.datasets.utils
    for module in (torchvision.datasets.utils, torchvision.datasets.cifar):
        monkeypatch.setattr(module, 'check_integrity', lambda path, md5=None: pathlib.Path(path).exists())


@ONLY_AIRBENCH94
def test_the_official_archive_is_read_without_network(script, tmp_path, monkeypatch, small_archives_pass_the_checksums):
    monkeypatch.setattr(urllib.request, 'urlopen', lambda *a, **k: pytest.fail('downloaded'))
    batches = write_official_archive(tmp_path / 'cifar-10-python.tar.gz')
    loader = script.CifarLoader(tmp_path, train=True, device='cpu')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['cifar-10-python.tar.gz', 'test.pt', 'train.pt']
    train = script.load_cifar10(tmp_path, train=True)
    assert train['classes'] == list('abcdefghij') and train['images'].shape == (15, 32, 32, 3)
    first = batches['data_batch_1']['data'][0]  # a row is the red plane, then green, then blue
    assert train['images'][0, 0, 1].tolist() == [first[1], first[1024 + 1], first[2048 + 1]]
    assert train['labels'].tolist() == sum((batches[f'data_batch_{i}']['labels'] for i in range(1, 6)), [])
    assert torch.equal(loader.images, train['images'].permute(0, 3, 1, 2).float() / 255)
    test = script.load_cifar10(tmp_path, train=False)
    assert test['labels'].tolist() == batches['test_batch']['labels']


@ONLY_AIRBENCH94
def test_a_damaged_archive_is_a_clear_error(script, tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, 'urlopen', no_network)  # its checksum fails, so it is fetched anew
    (tmp_path / 'cifar-10-python.tar.gz').write_bytes(b'not an archive')
    with pytest.raises(script.AirbenchError, match='writing it from the official archive failed'):
        script.CifarLoader(tmp_path, device='cpu')


@ONLY_AIRBENCH94
def test_download_fetches_the_official_archive_and_writes_the_cache(script, tmp_path, monkeypatch,
                                                                   small_archives_pass_the_checksums):
    import torchvision.datasets.utils

    def fake_download(url, root, filename, md5):
        assert url.endswith('/cifar-10-python.tar.gz') and filename == 'cifar-10-python.tar.gz'
        write_official_archive(pathlib.Path(root) / filename)
    monkeypatch.setattr(torchvision.datasets.utils, 'download_url', fake_download)
    loader = script.CifarLoader(tmp_path, train=False, device='cpu')
    assert len(loader.images) == 3 and (tmp_path / 'train.pt').exists()


@ONLY_AIRBENCH94
def test_main_trains_prints_the_table_and_writes_an_atomic_log(script, one_batch_data_dir, tmp_path, monkeypatch,
                                                               capsys):
    args = ('--data-dir', str(one_batch_data_dir), '--epochs', '1', '--device', 'cpu')
    monkeypatch.chdir(tmp_path)
    script.main([*args, '--runs', '2', '--seed', '5'])
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split() == ['run', 'epoch', 'train_loss', 'train_acc', 'val_acc', 'tta_val_acc', 'seconds']
               for line in lines)
    assert sum(line.split()[:2] == ['2', 'final'] for line in lines) == 1
    assert any(line.startswith('mean ') and '±' in line and 'over 2 run(s)' in line for line in lines)
    parameters = sum(p.numel() for p in script.make_net().parameters())
    assert any(line.startswith(f'{parameters:,} parameters; ') and 'PFLOPs' in line for line in lines)
    (log_dir,) = (tmp_path / 'logs').iterdir()
    assert [p.name for p in log_dir.iterdir()] == ['log.pt']  # no leftover .tmp
    log = torch.load(log_dir / 'log.pt', weights_only=False)
    assert log['source'] == (REPO / f'{script.__name__}.py').read_text()
    assert log['hyp']['opt'] == script.hyp['opt'] and log['device'] == 'cpu'
    assert [r['seed'] for r in log['runs']] == [5, 6]
    assert all(0 <= r['tta_val_acc'] <= 1 and r['seconds'] > 0 and len(r['epochs']) == 1 for r in log['runs'])

    (tmp_path / 'again').mkdir()
    monkeypatch.chdir(tmp_path / 'again')  # the second run alone, by its seed: the same training
    script.main([*args, '--seed', '6'])
    (again,) = (tmp_path / 'again' / 'logs').glob('*/log.pt')
    assert torch.load(again, weights_only=False)['runs'][0]['epochs'][0]['train_loss'] == \
        log['runs'][1]['epochs'][0]['train_loss'] != log['runs'][0]['epochs'][0]['train_loss']


@ONLY_AIRBENCH94
def test_unsupported_precisions_are_named_with_what_works(script, monkeypatch):
    cpu, cuda = torch.device('cpu'), torch.device('cuda')
    monkeypatch.setattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: False)
    assert script.precision_problem(cpu, torch.float16).endswith('on the CPU use float32')
    assert 'no bf16 instructions' in script.precision_problem(cpu, torch.bfloat16)
    assert script.precision_problem(cpu, torch.float32) is None
    monkeypatch.setattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: True)
    assert script.precision_problem(cpu, torch.float16).endswith('on the CPU use bfloat16 or float32')
    assert script.precision_problem(cpu, torch.bfloat16) is None
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda: False)
    assert 'use float16 or float32' in script.precision_problem(cuda, torch.bfloat16)
    assert script.precision_problem(cuda, torch.float16) is None


@ONLY_AIRBENCH94
def test_long_epochs_show_a_progress_line_every_tenth_in_a_log(script, tiny_data_dir, monkeypatch, capsys):
    monkeypatch.setattr(script.Bookkeeper, 'min_epoch_seconds', 0)  # as if every epoch took minutes
    train = script.CifarLoader(tiny_data_dir, train=True, batch_size=16, aug=script.hyp['aug'], device='cpu')
    script.train(train, dtype=torch.float32, epochs=1.5, seed=0, progress=True)  # 16 + 8 steps
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith('epoch 1 step 1/16 ') and lines[-1].startswith('epoch 2 step 8/8 ')
    assert len(lines) == 11 + 8  # 16 steps: step 1 and then a line per tenth; 8 steps: every step
    assert all(' s/step ' in line and 'left in the epoch' in line and 'in the training' in line for line in lines)


@ONLY_AIRBENCH94
def test_short_epochs_show_no_progress_line(script, tiny_data_dir, capsys):
    train = script.CifarLoader(tiny_data_dir, train=True, batch_size=64, aug=script.hyp['aug'], device='cpu')
    script.train(train, dtype=torch.float32, epochs=1, seed=0, progress=True)
    assert capsys.readouterr().err == ''


@ONLY_AIRBENCH94
def test_progress_line_is_rewritten_in_place_on_a_terminal(script, tiny_data_dir, monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    terminal = Terminal()
    monkeypatch.setattr(sys, 'stderr', terminal)
    monkeypatch.setattr(script.Bookkeeper, 'min_epoch_seconds', 0)
    train = script.CifarLoader(tiny_data_dir, train=True, batch_size=64, aug=script.hyp['aug'], device='cpu')
    script.train(train, dtype=torch.float32, epochs=1, seed=0, progress=True)  # 4 steps
    written = terminal.getvalue()
    lines = written.split('\r')  # each line clears what a longer one before it left, then returns
    assert len(lines) == 5 and '\n' not in written and all(line.endswith('\x1b[K') for line in lines)
    assert lines[-1] == '\x1b[K'  # the last one cleared for the epoch's row
    assert 'epoch 1 step 4/4' in written
