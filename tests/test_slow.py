"""Slow tier (`pytest -m slow`): airbench94 trained on the real CIFAR-10, as long as the machine allows.

A full airbench94 run takes 10-17 minutes on 2 CPU cores with bf16 instructions (AVX-512 BF16)
and about an hour on 2 cores without them (float32 on AVX2): there, too long beside the fast
tier's few minutes. So the test first times a few real training steps. If a full run fits in
FULL_RUN_BUDGET_S it trains one and asks for 93.5% with TTA (published mean: 94.01%); otherwise
it trains one epoch, same seed, and asks for SHORT_FLOOR with one view, a floor set from runs
measured here (see below). Either way the test prints which check it ran.
"""
import copy
import time
import warnings

import pytest
import torch

from conftest import load_script

FULL_RUN_BUDGET_S = 35 * 60  # CI's limit is 90 minutes in all
FULL_FLOOR = 0.935
SHORT_EPOCHS = 1
# `python airbench94.py --epochs 1 --runs 2 --seed 0 --tta-level 0 --no-log`, float32 on AVX2 kernels (an AVX-512
# machine held to them: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2),
# 2026-11-30: 69.82% and 69.55%. The floor sits 2 points under the lower (other CPUs round differently).
SHORT_FLOOR = 0.675


def seconds_per_step(airbench94, train_loader, steps=3):
    """Wall-clock seconds of one full-size training step here, from a short timed training."""
    probe = copy.copy(train_loader)
    n = steps * train_loader.batch_size
    probe.images, probe.labels = train_loader.images[:n], train_loader.labels[:n]
    airbench94.train(probe, epochs=1, seed=0)  # warm-up: first-call allocation and kernel choice
    start = time.perf_counter()
    airbench94.train(probe, epochs=1, seed=0)
    return (time.perf_counter() - start) / steps


@pytest.mark.slow
def test_airbench94_trains_to_its_accuracy_on_real_data(real_data_dir):
    airbench94 = load_script('airbench94')
    airbench94.tune_process_for(torch.device('cpu'))  # as main() does: keeps the CPU step fast
    train_loader = airbench94.CifarLoader(real_data_dir, train=True, batch_size=1024, aug=airbench94.hyp['aug'],
                                          device='cpu')
    test_loader = airbench94.CifarLoader(real_data_dir, train=False, device='cpu')
    full_steps = -(-airbench94.hyp['opt']['epochs'] * len(train_loader) // 1)
    projected = seconds_per_step(airbench94, train_loader) * full_steps * 1.1  # + 10% for TTA evaluation
    if projected <= FULL_RUN_BUDGET_S:
        epochs, tta_level, floor = airbench94.hyp['opt']['epochs'], 2, FULL_FLOOR
    else:
        epochs, tta_level, floor = SHORT_EPOCHS, 0, SHORT_FLOOR
    net = airbench94.train(train_loader, seed=0, epochs=epochs)
    accuracy = airbench94.evaluate(net, test_loader, tta_level=tta_level)
    message = (f'airbench94, {epochs} epochs on the CPU (a full run would take ~{projected / 60:.0f} min here), '
               f'seed 0: accuracy {accuracy:.4f} at TTA level {tta_level}, floor {floor}')
    print(message)
    if epochs == SHORT_EPOCHS:
        warnings.warn('too slow a machine for a full run: ' + message)  # shown in pytest's summary
    assert accuracy >= floor
