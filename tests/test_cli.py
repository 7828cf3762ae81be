"""End to end through the runner: torchdistill YAML -> registries -> box -> meta step -> optimizer -> checkpoint."""
from __future__ import annotations

import pytest
import torch
from conftest import DIGITS_CONFIGS, DIGITS_TEST_DATASET, SHORT_RUN, TEACHER_CKPT, run_cli, write_config

from lrwa_plugin.run.checkpoint import atomic_save, load_state_dict_file


@pytest.mark.parametrize('name, edits', [
    ('lrwa_mb', {}),
    ('lrwa_mb', {"backend: 'higher'": "backend: 'functional'"}),
    ('lrwa_mb', {"order: 'second'": "order: 'first'"}),
    ('mb_dfkd', {}),
    ('dfad', {}),
])
def test_data_free_config_runs_and_writes_student(name, edits, work, capsys):
    config = write_config(DIGITS_CONFIGS / f'{name}.yaml', work / 'run.yaml', {**SHORT_RUN, **edits})
    assert run_cli(config) == 0
    ckpt = torch.load(work / f'resource/ckpt/digits/{name}.pt', weights_only=True)
    assert set(ckpt) >= {'model', 'optimizer', 'best_value', 'generator'}
    out = capsys.readouterr().out
    assert 'Summary' in out and 'student_top1' in out and 'teacher_top1' in out


def test_student_trains_away_from_its_initialisation(work):
    config = write_config(DIGITS_CONFIGS / 'lrwa_mb.yaml', work / 'run.yaml', SHORT_RUN)
    torch.manual_seed(0)
    from lrwa_plugin.models.digits import DigitsStudentCNN
    initial = DigitsStudentCNN().state_dict()
    assert run_cli(config) == 0
    trained = load_state_dict_file(work / 'resource/ckpt/digits/lrwa_mb.pt')
    assert any(not torch.equal(initial[k], trained[k]) for k in initial if initial[k].is_floating_point())


def test_torchdistill_forward_hooks_feed_the_criterion_inside_the_meta_step(work):
    """KDLoss on the student's `fc` output reads torchdistill's io_dict: it is filled only if hooks fire in the
    patched (higher) or functional model for the acquisition and for the retention forward."""
    kd = ("l1: {criterion: {key: 'KDLoss', kwargs: {student_module_path: 'fc', student_module_io: 'output', "
          "teacher_module_path: '.', teacher_module_io: 'output', temperature: 2.0, alpha: 0.0}}, weight: 1.0}")
    for backend in ('higher', 'functional'):
        config = write_config(DIGITS_CONFIGS / 'lrwa_mb.yaml', work / f'{backend}.yaml', {
            **SHORT_RUN,
            "backend: 'higher'": f"backend: '{backend}'",
            "l1: {criterion: {key: 'LogitsL1Loss', kwargs: {}}, weight: 1.0}": kd,
            "    requires_grad: True": "    requires_grad: True\n    forward_hook: {input: [], output: ['fc']}",
        })
        assert run_cli(config) == 0


def test_timm_teacher_loaded_from_a_file_the_test_wrote(work):
    """A timm teacher (`test_resnet`) from a local checkpoint, a timm student, on 3x32x32 FakeData."""
    from lrwa_plugin.models.timm_model import timm_model
    torch.manual_seed(0)
    atomic_save(timm_model('test_resnet', num_classes=10).state_dict(), work / 'teacher_timm.pth')
    fake = ("!import_call {key: 'torchvision.datasets.FakeData', init: {kwargs: {size: 16, image_size: [3, 32, 32], "
            "num_classes: 10, transform: !import_call {key: 'torchvision.transforms.ToTensor', init: {}}}}}")
    config = write_config(DIGITS_CONFIGS / 'lrwa_mb.yaml', work / 'timm.yaml', {
        **SHORT_RUN,
        DIGITS_TEST_DATASET: f'digits/test: {fake}',
        "key: 'DigitsTeacherCNN'\n    kwargs: {num_classes: 10}\n    src_ckpt: 'resource/ckpt/digits/teacher.pt'":
            "key: 'timm_model'\n    kwargs: {model_name: 'test_resnet', num_classes: 10, "
            "checkpoint_path: 'teacher_timm.pth'}",
        "key: 'DigitsStudentCNN'\n    kwargs: {num_classes: 10}":
            "key: 'timm_model'\n    kwargs: {model_name: 'test_resnet', num_classes: 10}",
        'kwargs: {nz: 64, img_size: 8, nc: 1, ngf: 64}': 'kwargs: {nz: 32, img_size: 32, nc: 3, ngf: 32}',
    })
    assert run_cli(config) == 0
    assert (work / 'resource/ckpt/digits/lrwa_mb.pt').is_file()


def test_missing_teacher_checkpoint_is_a_clear_error_before_training(work, capsys):
    config = write_config(DIGITS_CONFIGS / 'lrwa_mb.yaml', work / 'run.yaml',
                          {**SHORT_RUN, TEACHER_CKPT: 'resource/ckpt/digits/no_such_teacher.pt'})
    assert run_cli(config) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and 'no_such_teacher.pt' in err and 'does not exist' in err
    assert err.count('\n') == 1, err
    assert not (work / 'resource/ckpt/digits/lrwa_mb.pt').exists()


def test_teacher_that_does_not_match_the_architecture_is_an_error(work, capsys):
    config = write_config(DIGITS_CONFIGS / 'lrwa_mb.yaml', work / 'run.yaml', {
        **SHORT_RUN, "key: 'DigitsTeacherCNN'\n    kwargs: {num_classes: 10}": "key: 'DigitsStudentCNN'\n"
                                                                           "    kwargs: {num_classes: 10}"})
    assert run_cli(config) == 2
    err = capsys.readouterr().err
    assert 'does not match the model' in err and 'teacher' in err
    assert not (work / 'resource/ckpt/digits/lrwa_mb.pt').exists()


def test_missing_config_file_is_a_clear_error(work, capsys):
    assert run_cli(work / 'nope.yaml') == 2
    assert "'" + str(work / 'nope.yaml') + "' does not exist" in capsys.readouterr().err
