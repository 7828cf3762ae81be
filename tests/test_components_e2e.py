"""The paper's components end to end: PRE-DFKD and LRWA with generative replay through the runner, the box's replay
and shape checks, and the new generator terms switched on from YAML."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import DIGITS_CONFIGS, SHORT_RUN, run_cli, write_config
from torchdistill.common import yaml_util
from torchdistill.models.registry import get_model

from lrwa_plugin.box import DataFreeDistillationBox
from lrwa_plugin.replay import GenerativeReplay, MemoryBank


def replay_block(name: str) -> str:
    """The ``replay:`` block of a shipped config, as text (up to the next key of ``data_free`` or ``train``)."""
    lines = (DIGITS_CONFIGS / f'{name}.yaml').read_text().splitlines(keepends=True)
    start = lines.index('    replay:\n')
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith('     '))
    return ''.join(lines[start:end])


@pytest.mark.parametrize('name', ['pre_dfkd', 'lrwa_gr'])
def test_generative_replay_configs_run_and_write_the_student(name, work, capsys):
    config = write_config(DIGITS_CONFIGS / f'{name}.yaml', work / 'run.yaml', SHORT_RUN)
    assert run_cli(config) == 0
    ckpt = torch.load(work / f'resource/ckpt/digits/{name}.pt', weights_only=True)
    assert set(ckpt) >= {'model', 'optimizer', 'best_value', 'generator'}
    assert 'student_top1' in capsys.readouterr().out


def test_new_generator_terms_and_generator_switch_on_from_yaml(work):
    """KL adversarial term, DAFL activation norm on the teacher's fc input, DCGAN generator with spectral norm."""
    config = write_config(DIGITS_CONFIGS / 'lrwa_gr.yaml', work / 'components.yaml', {
        **SHORT_RUN,
        "kwargs: {kind: 'l1'}}, weight: 1.0}": "kwargs: {kind: 'kl', temperature: 2.0}}, weight: 1.0}\n"
                                              "            act: {criterion: {key: 'ActivationNormLoss', kwargs: "
                                              "{teacher_module_path: 'fc', teacher_module_io: 'input'}}, weight: 0.1}",
        "key: 'DAFLGenerator'\n      kwargs: {nz: 64, img_size: 8, nc: 1, ngf: 64}":
            "key: 'DCGANGenerator'\n      kwargs: {nz: 64, img_size: 8, nc: 1, ngf: 32, spectral_norm: true}",
        "    requires_grad: False": "    requires_grad: False\n    forward_hook: {input: ['fc'], output: []}",
    })
    assert run_cli(config) == 0
    generator = torch.load(work / 'resource/ckpt/digits/lrwa_gr.pt', weights_only=True)['generator']
    assert any('parametrizations.weight' in key for key in generator)


# ------------------------------------------------------------------------ the box, built without the runner
def build_box(tmp_path: Path, name: str, edits: dict[str, str]) -> DataFreeDistillationBox:
    """The data-free box of a shipped config (random teacher: these tests are about wiring, not accuracy)."""
    config = yaml_util.load_yaml_file(str(write_config(DIGITS_CONFIGS / f'{name}.yaml', tmp_path / 'box.yaml',
                                                       {**SHORT_RUN, **edits})))
    torch.manual_seed(0)
    models = config['models']
    teacher = get_model(models['teacher_model']['key'], **models['teacher_model']['kwargs'])
    student = get_model(models['student_model']['key'], **models['student_model']['kwargs'])
    return DataFreeDistillationBox(teacher, student, config['datasets'], config['train'], torch.device('cpu'),
                                   None, False)


@pytest.mark.parametrize('name, other, value, allowed', [
    ('mb_dfkd', 'pre_dfkd', 'GenerativeReplay', 'MemoryBank'),
    ('pre_dfkd', 'mb_dfkd', 'MemoryBank', 'GenerativeReplay'),
])
def test_box_refuses_a_replay_memory_the_strategy_does_not_use(name, other, value, allowed, tmp_path):
    with pytest.raises(ValueError) as info:
        build_box(tmp_path, name, {replay_block(name): replay_block(other)})
    message = str(info.value)
    assert message.startswith('train.data_free.replay.key: ') and '\n' not in message
    assert f"'{value}'" in message and f'allowed: {allowed}' in message and f"strategy '{name}'" in message


def test_box_refuses_a_generator_the_teacher_cannot_take(tmp_path):
    with pytest.raises(ValueError) as info:
        build_box(tmp_path, 'lrwa_mb', {'kwargs: {nz: 64, img_size: 8, nc: 1, ngf: 64}':
                                        'kwargs: {nz: 64, img_size: 8, nc: 3, ngf: 64}'})
    message = str(info.value)
    assert message.startswith('train.data_free.generator.kwargs.nc: ') and '\n' not in message
    assert '3x8x8' in message and '1x?x?' in message


def train_epoch(box: DataFreeDistillationBox, epoch: int = 0) -> dict:
    box.pre_epoch_process(epoch=epoch)
    for iteration in range(box.iterations_per_epoch):
        losses = box.train_iteration(epoch, iteration)
    box.finish_epoch(epoch)
    return losses


def test_memory_bank_still_pushes_the_epochs_last_student_batch(tmp_path):
    box = build_box(tmp_path, 'lrwa_mb', {})
    assert isinstance(box.replay, MemoryBank)
    batches = []
    student_step = box.student_step

    def recording_step():
        x, losses = student_step()
        batches.append(x)
        return x, losses

    box.student_step = recording_step
    train_epoch(box)
    assert len(batches) == 3 * 2  # 3 iterations x 2 student steps (short run)
    held = box.replay.state_dict()['batches']
    assert len(held) == 1 and torch.equal(held[0], batches[-1])


def test_generative_replay_observes_every_student_step_and_replays(tmp_path):
    box = build_box(tmp_path, 'lrwa_gr', {})
    assert isinstance(box.replay, GenerativeReplay) and box.replay.teacher is box.teacher_model
    losses = train_epoch(box)
    # 6 student steps; the VAE trains on steps 0, 1 and 5 (k mod 5 < 2), on 32 generated samples each
    assert len(box.replay) == 3 * 32 and losses['memory'] == 96.0
    assert 'ret' in losses and 'vae' in losses
