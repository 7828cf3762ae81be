"""A loss or gradient that turns NaN/infinite mid-run stops it (exit 3) naming the step; the last checkpoint survives.

Faults are injected into a real run through the runner: a generated batch becomes NaN at a chosen iteration (caught
at the generator step, or at a student step when it is the student's batch), or the student's gradient becomes
infinite while every loss is finite.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import DIGITS_CONFIGS, SHORT_RUN, run_cli, write_config

from lrwa_plugin.box import DataFreeDistillationBox
from lrwa_plugin.generator import AdversarialGenerator
from lrwa_plugin.models.digits import DigitsStudentCNN
from lrwa_plugin.run.checkpoint import atomic_save
from lrwa_plugin.strategies import LearnToRetainWhileAcquiring

DST_CKPT = 'resource/ckpt/digits/lrwa_mb.pt'


def _track_position(monkeypatch) -> dict:
    """Records the (epoch, iteration) the box is in and how many batches it has generated there."""
    state = {'at': None, 'samples': 0, 'snapshot': None}
    train_iteration = DataFreeDistillationBox.train_iteration

    def tracked(self, epoch, iteration):
        state['at'], state['samples'] = (epoch, iteration), 0
        return train_iteration(self, epoch, iteration)

    monkeypatch.setattr(DataFreeDistillationBox, 'train_iteration', tracked)
    return state


def _snapshot(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


@pytest.mark.parametrize('epoch, nth_sample, step, expected', [
    # 1st batch of an iteration: the generator step's; caught there, with the generator criterion's terms.
    (1, 1, 'epoch 1, iteration 1, generator step 0', ['gen = nan', 'adv = nan', 'bn = nan', 'generated batch']),
    # 2nd: the first student step's; caught with the acquisition loss and its terms.
    (1, 2, 'epoch 1, iteration 1, student step 0', ['acq = nan', 'acq.l1 = nan', 'generated batch']),
    # In the first epoch: the checkpoint of an earlier run must survive as well.
    (0, 1, 'epoch 0, iteration 1, generator step 0', ['gen = nan', 'generated batch']),
])
def test_nan_batch_stops_naming_the_step_and_keeps_the_last_checkpoint(epoch, nth_sample, step, expected, work,
                                                                      capsys, monkeypatch):
    config = write_config(DIGITS_CONFIGS / 'lrwa_mb.yaml', work / 'run.yaml', SHORT_RUN)
    dst = work / DST_CKPT
    if epoch == 0:
        atomic_save({'model': DigitsStudentCNN().state_dict()}, dst)
    state = _track_position(monkeypatch)
    sample = AdversarialGenerator.sample

    def poisoned(self, n):
        x = sample(self, n)
        if state['at'] == (epoch, 1):
            state['samples'] += 1
            if state['samples'] == nth_sample:
                state['snapshot'] = _snapshot(dst)  # what the run has saved so far
                return x * float('nan')  # keeps the autograd graph, as a real blow-up would
        return x

    monkeypatch.setattr(AdversarialGenerator, 'sample', poisoned)
    assert run_cli(config) == 3
    err = capsys.readouterr().err
    assert err.startswith('error: non-finite loss at ') and err.count('\n') == 1, err
    assert step in err, err
    assert all(text in err for text in expected), err
    assert state['snapshot'] is not None  # the fault hit while a checkpoint existed ...
    assert dst.read_bytes() == state['snapshot']  # ... and the stop left it byte for byte


def test_non_finite_student_gradient_stops_before_the_optimizer_step(work, capsys, monkeypatch):
    config = write_config(DIGITS_CONFIGS / 'lrwa_mb.yaml', work / 'run.yaml', SHORT_RUN)
    dst = work / DST_CKPT
    state = _track_position(monkeypatch)
    backward = LearnToRetainWhileAcquiring.backward
    weights: dict[str, torch.Tensor] = {}

    def poisoned(self, student, step_losses):
        losses = backward(self, student, step_losses)
        if state['at'] == (1, 1):
            state['snapshot'], state['student'] = _snapshot(dst), student
            weights.update({k: v.clone() for k, v in student.state_dict().items()})
            next(student.parameters()).grad[0].fill_(float('inf'))
        return losses

    monkeypatch.setattr(LearnToRetainWhileAcquiring, 'backward', poisoned)
    assert run_cli(config) == 3
    err = capsys.readouterr().err
    assert err.count('\n') == 1, err
    assert 'non-finite gradient norm of the student (inf) at epoch 1, iteration 1, student step 0' in err, err
    assert 'with finite losses acq = ' in err, err
    assert state['snapshot'] is not None and dst.read_bytes() == state['snapshot']
    # The optimizer never applied the poisoned gradient: the student's weights are those it had when it was found.
    final = state['student'].state_dict()
    assert all(torch.equal(final[k], weights[k]) for k in weights)

