"""--checkpoint: a run of hours on a CPU, interrupted after an epoch and run again, loses nothing and
ends with the same weights, bit for bit, as an uninterrupted run with the same seed. What a checkpoint
holds differs by script (optimizers, lookahead, the proxy's selection), so resuming is tested on each."""
import pytest
import torch

from conftest import ALL_SCRIPTS, ONLY_AIRBENCH94, load_script


@pytest.fixture(params=ALL_SCRIPTS, scope='session')
def script(request):
    return load_script(request.param)


class Interrupted(Exception):
    pass


def interrupt_after_epoch_1(row):
    raise Interrupted


def test_resumed_training_ends_where_an_uninterrupted_one_ends(script, tiny_data_dir, tmp_path):
    checkpoint = tmp_path / 'checkpoint.pt'

    def trained(report, seed=0, checkpoint=None):
        # 8 steps an epoch: the interrupted epoch already holds a lookahead update (every 5 steps)
        train = script.CifarLoader(tiny_data_dir, train=True, batch_size=16, aug=script.hyp['aug'], device='cpu')
        train.images, train.labels = train.images[:128], train.labels[:128]
        test = script.CifarLoader(tiny_data_dir, train=False, batch_size=64, device='cpu')
        return script.train(train, test, report=report, dtype=torch.float32, epochs=3.5, seed=seed,
                            checkpoint=checkpoint)
    uninterrupted_rows, resumed_rows = [], []
    uninterrupted = trained(uninterrupted_rows.append)
    with pytest.raises(Interrupted):
        trained(interrupt_after_epoch_1, checkpoint=checkpoint)
    resumed = trained(resumed_rows.append, checkpoint=checkpoint)  # re-seeded, then set to the saved random state

    assert [row['epoch'] for row in resumed_rows] == [1, 2, 3, 4]  # epoch 1 replayed from the checkpoint
    for key in ('train_loss', 'train_acc', 'val_acc'):
        assert [row[key] for row in resumed_rows] == [row[key] for row in uninterrupted_rows]
    assert uninterrupted.state_dict().keys() == resumed.state_dict().keys()
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@ONLY_AIRBENCH94
def test_a_checkpoint_of_another_training_is_refused(script, tiny_data_dir, tmp_path):
    checkpoint = tmp_path / 'checkpoint.pt'
    train = script.CifarLoader(tiny_data_dir, train=True, batch_size=64, aug=script.hyp['aug'], device='cpu')
    script.train(train, dtype=torch.float32, epochs=1, seed=0, checkpoint=checkpoint)
    with pytest.raises(script.AirbenchError, match='saved by another training .*seed: 0 there, 1 here'):
        script.train(train, dtype=torch.float32, epochs=1, seed=1, checkpoint=checkpoint)
    checkpoint.write_bytes(b'half a file')
    with pytest.raises(script.AirbenchError, match='cannot read .* as a checkpoint of these scripts'):
        script.train(train, dtype=torch.float32, epochs=1, seed=0, checkpoint=checkpoint)
    torch.save({'net': {}, 'step': 3}, checkpoint)  # an older layout, without the training's identity
    with pytest.raises(script.AirbenchError, match="as a checkpoint of these scripts \\(KeyError: 'identity'\\)"):
        script.train(train, dtype=torch.float32, epochs=1, seed=0, checkpoint=checkpoint)


@ONLY_AIRBENCH94
def test_the_same_command_run_again_continues_its_checkpoint(script, one_batch_data_dir, tmp_path, monkeypatch,
                                                             capsys):
    monkeypatch.chdir(tmp_path)
    command = ['--data-dir', str(one_batch_data_dir), '--epochs', '2', '--device', 'cpu', '--no-log',
               '--checkpoint', str(tmp_path / 'checkpoint.pt')]
    outputs = []
    for _ in range(2):  # no --seed: the second run takes the seed from the checkpoint
        script.main(command)
        outputs.append(capsys.readouterr().out.splitlines())
    assert 'continuing the training saved in' in '\n'.join(outputs[1])
    epoch_rows, finals = ([[line.split() for line in out if line.split()[1:2] == [kind]] for out in outputs]
                          for kind in ('2', 'final'))
    assert epoch_rows[0] == epoch_rows[1]  # replayed, seconds included
    assert finals[0][0][2] == finals[1][0][2]  # the same network: the same TTA accuracy
    assert not (tmp_path / 'logs').exists()  # --no-log
    with pytest.raises(SystemExit):
        script.main(command + ['--runs', '2'])
    assert '--checkpoint keeps one training' in capsys.readouterr().err
