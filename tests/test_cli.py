"""The command line: clear one-paragraph errors (never a traceback), logs, and imports without side effects."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ABLATIONS, FAMILY, REPO, SCRIPTS


def run_script(name, *args, cwd):
    """Run a script as a user would. torch.compile is switched off (TORCHDYNAMO_DISABLE) to keep
    these tests fast; compiling is tested on its own."""
    return subprocess.run([sys.executable, str(REPO / f'{name}.py'), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, 'TORCHDYNAMO_DISABLE': '1'})


@pytest.mark.parametrize('name', SCRIPTS + ABLATIONS)
def test_import_has_no_side_effects(name, tmp_path):
    code = f'import sys; sys.path.insert(0, {str(REPO)!r}); import {name.replace("/", ".")}'
    result = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == '' and result.stderr == ''
    assert list(tmp_path.iterdir()) == []  # no logs, no data, no downloads


@pytest.mark.parametrize('name', SCRIPTS + ABLATIONS)
def test_help_documents_every_flag(name, tmp_path):
    result = run_script(name, '--help', cwd=tmp_path)
    assert result.returncode == 0
    for flag in ('--runs', '--epochs', '--seed', '--data-dir', '--tta-level', '--device', '--dtype', '--no-log'):
        assert flag in result.stdout


@pytest.mark.parametrize('args, message', [
    (['--epochs', '0'], '--epochs must be a positive number'),
    (['--epochs', 'nan'], '--epochs must be a positive number'),
    (['--runs', '0'], '--runs must be at least 1'),
    (['--tta-level', '3'], 'invalid choice'),
    (['--device', 'tpu'], 'unknown device'),
    (['--dtype', 'int8'], 'invalid choice'),
])
def test_invalid_flags_exit_with_a_message_and_no_traceback(script, args, message, tmp_path):
    result = run_script(script.__name__, *args, cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr and 'Traceback' not in result.stderr


def corrupt(path):
    path.write_bytes(b'not a torch file')


def wrong_shape(path):
    torch.save({'images': torch.zeros(10, 3, 32, 32, dtype=torch.uint8), 'labels': torch.zeros(10, dtype=torch.int64)}, path)


@pytest.mark.parametrize('damage, message', [(corrupt, 'cannot read'), (wrong_shape, 'is not a CIFAR-10 train cache')])
def test_bad_data_cache_exits_with_a_fix_and_no_traceback(script, damage, message, tmp_path):
    damage(tmp_path / 'train.pt')
    result = run_script(script.__name__, '--data-dir', str(tmp_path), '--no-log', cwd=tmp_path)
    assert result.returncode == 1
    assert message in result.stderr and 'prepare_cifar10.py' in result.stderr
    assert 'Traceback' not in result.stderr


def test_unreadable_data_dir_exits_with_a_message(script, tmp_path):
    (tmp_path / 'train.pt').mkdir()  # a directory where the file should be: unreadable as a file
    result = run_script(script.__name__, '--data-dir', str(tmp_path), '--no-log', cwd=tmp_path)
    assert result.returncode == 1 and 'cannot read' in result.stderr and 'Traceback' not in result.stderr


def test_missing_data_without_network_is_a_clear_error(script, tmp_path, monkeypatch):
    import torchvision

    def no_network(*args, **kwargs):
        raise OSError('network is unreachable')
    monkeypatch.setattr(torchvision.datasets, 'CIFAR10', no_network)
    with pytest.raises(script.AirbenchError, match='downloading it failed.*network is unreachable'):
        script.CifarLoader(tmp_path / 'empty', device='cpu')
    with pytest.raises(SystemExit, match='prepare_cifar10.py'):
        script.main(['--data-dir', str(tmp_path / 'empty'), '--no-log', '--device', 'cpu'])


def test_download_writes_the_cache_format(script, tmp_path, monkeypatch):
    import numpy as np
    import torchvision

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            n = 20 if train else 10
            self.data = np.zeros((n, 32, 32, 3), dtype=np.uint8)
            self.targets = [i % 10 for i in range(n)]
            self.classes = [str(k) for k in range(10)]
    monkeypatch.setattr(torchvision.datasets, 'CIFAR10', FakeCIFAR10)
    loader = script.CifarLoader(tmp_path, train=False, device='cpu')
    assert len(loader.images) == 10 and sorted(p.name for p in tmp_path.iterdir()) == ['test.pt', 'train.pt']


def test_main_trains_prints_the_table_and_writes_an_atomic_log(script, one_batch_data_dir, tmp_path):
    result = run_script(script.__name__, '--data-dir', str(one_batch_data_dir), '--epochs', '1', '--runs', '2',
                        '--seed', '5', '--device', 'cpu', cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.split() == ['run', 'epoch', 'train_loss', 'train_acc', 'val_acc', 'tta_val_acc', 'seconds']
               for line in lines)
    assert sum(line.split()[:2] == ['2', 'final'] for line in lines) == 1
    assert any(line.startswith('mean ') and '±' in line and 'over 2 run(s)' in line for line in lines)
    assert f"{FAMILY[script.__name__]['parameters']:,} parameters" in result.stdout and 'PFLOPs' in result.stdout
    (log_dir,) = (tmp_path / 'logs').iterdir()
    assert [p.name for p in log_dir.iterdir()] == ['log.pt']  # no leftover .tmp
    log = torch.load(log_dir / 'log.pt', weights_only=False)
    assert log['source'] == (REPO / f'{script.__name__}.py').read_text()
    assert log['hyp']['opt']['lr'] == script.hyp['opt']['lr'] and log['device'] == 'cpu'
    assert [r['seed'] for r in log['runs']] == [5, 6]
    assert all(0 <= r['tta_val_acc'] <= 1 and r['seconds'] > 0 and len(r['epochs']) == 1 for r in log['runs'])


def test_same_seed_on_the_command_line_reproduces_the_accuracy(one_batch_data_dir, tmp_path):
    """End to end through the CLI for one script (test_training checks determinism for every script)."""
    args = ('--data-dir', str(one_batch_data_dir), '--epochs', '1', '--seed', '3', '--device', 'cpu', '--no-log')
    finals = [[line for line in run_script('airbench94', *args, cwd=tmp_path).stdout.splitlines()
               if 'final' in line][0].split()[2] for _ in range(2)]
    assert finals[0] == finals[1]
    assert not (tmp_path / 'logs').exists()  # --no-log
