"""Slow tier (`pytest -m slow`): full-length trainings on the real CIFAR-10."""
import pytest
import torch

from conftest import load_script


@pytest.mark.slow
def test_airbench94_full_run_reaches_93_5_percent(real_data_dir):
    """One complete CPU run of airbench94 (about 10 minutes here). Published mean: 94.01%."""
    airbench94 = load_script('airbench94')
    airbench94.tune_process_for(torch.device('cpu'))  # as main() does: keeps the CPU step fast
    train_loader = airbench94.CifarLoader(real_data_dir, train=True, batch_size=1024, aug=airbench94.hyp['aug'], device='cpu')
    test_loader = airbench94.CifarLoader(real_data_dir, train=False, device='cpu')
    net = airbench94.train(train_loader, seed=0)
    accuracy = airbench94.evaluate(net, test_loader, tta_level=2)
    print(f'airbench94 full CPU run, seed 0: TTA accuracy {accuracy:.4f}')
    assert accuracy >= 0.935
