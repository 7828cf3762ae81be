"""Every wrong config is refused before training: exit status 2, one line naming the key path, nothing written.

Each bad config is a small textual edit of a shipped digits config run through the runner, as a user would.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import yaml
from conftest import DIGITS_CONFIGS, SHORT_RUN, TEACHER_CKPT, run_cli, write_config
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from lrwa_plugin.config.data_free import validate_config
from lrwa_plugin.errors import ConfigError
from lrwa_plugin.models.digits import DigitsStudentCNN
from lrwa_plugin.run.checkpoint import atomic_save
from lrwa_plugin.run.trainers import DataFreeTrainer

REPLAY_BLOCK = ("    replay:\n      key: 'MemoryBank'\n"
                "      kwargs: {capacity: 1024, push_size: 128, push_every_epochs: 1, batch_size: 64}\n")
META_LINE = "    meta: {alpha_per_lr: 1.0, backend: 'higher', order: 'second'}\n"
STUDENT = "key: 'DigitsStudentCNN'\n    kwargs: {num_classes: 10}"
TEACHER = "key: 'DigitsTeacherCNN'\n    kwargs: {num_classes: 10}"
VAL_ID = "  val_data_loader:\n    dataset_id: 'digits/test'"
TEST_ID = "  test_data_loader:\n    dataset_id: 'digits/test'"


def _garbage_teacher(work: Path) -> None:
    (work / 'garbage.pt').write_bytes(b'this is not a checkpoint')


# (id, shipped config, edits, key path expected in the message, further text expected, preparation)
CASES: list[tuple[str, str, dict[str, str], str, str, Callable[[Path], None] | None]] = [
    ('strategy unknown', 'lrwa_mb', {"strategy: 'lrwa'": "strategy: 'lrwaa'"},
     'train.strategy', "did you mean 'lrwa'", None),
    ('strategy not a string', 'lrwa_mb', {"strategy: 'lrwa'": 'strategy: [lrwa]'},
     'train.strategy', 'dfad, lrwa, mad, mb_dfkd, pre_dfkd', None),
    ('data_free without strategy', 'lrwa_mb', {"  strategy: 'lrwa'\n": ''},
     'train.data_free', 'train.strategy is missing', None),
    ('num_epochs zero', 'lrwa_mb', {'num_epochs: 2': 'num_epochs: 0'},
     'train.num_epochs', 'positive integer', None),
    ('data_free unknown key', 'lrwa_mb', {'student_steps: 2': 'student_step: 2'},
     'train.data_free.student_step', "did you mean 'student_steps'", None),
    ('iterations_per_epoch zero', 'lrwa_mb', {'iterations_per_epoch: 3': 'iterations_per_epoch: 0'},
     'train.data_free.iterations_per_epoch', 'got 0', None),
    ('iterations_per_epoch boolean', 'lrwa_mb', {'iterations_per_epoch: 3': 'iterations_per_epoch: true'},
     'train.data_free.iterations_per_epoch', 'got True', None),
    ('batch_size negative', 'lrwa_mb', {'    batch_size: 32': '    batch_size: -8'},
     'train.data_free.batch_size', 'got -8', None),
    ('batch_size not an integer', 'lrwa_mb', {'    batch_size: 32': '    batch_size: 2.5'},
     'train.data_free.batch_size', 'got 2.5', None),
    ('student_steps a string', 'lrwa_mb', {'student_steps: 2': "student_steps: 'two'"},
     'train.data_free.student_steps', "got 'two'", None),
    ('generator steps zero', 'lrwa_mb', {'      steps: 1': '      steps: 0'},
     'train.data_free.generator.steps', 'positive integer', None),
    ('generator key unknown', 'lrwa_mb', {"key: 'DAFLGenerator'": "key: 'DAFLGenrator'"},
     'train.data_free.generator.key', "did you mean 'DAFLGenerator'", None),
    ('generator kwarg unknown', 'lrwa_mb', {'nz: 64': 'nzz: 64'},
     'train.data_free.generator.kwargs.nzz', "did you mean 'nz'", None),
    ('generator kwarg of the wrong type', 'lrwa_mb', {'nz: 64': "nz: 'sixty'"},
     'train.data_free.generator.kwargs.nz', 'expects an integer', None),
    ('generator kwarg refused by the class', 'lrwa_mb', {'img_size: 8': 'img_size: 6'},
     'train.data_free.generator.kwargs.img_size', 'multiple of 4', None),
    ('generator block unknown key', 'lrwa_mb', {"      optimizer:\n        key: 'Adam'":
                                                "      optimiser:\n        key: 'Adam'"},
     'train.data_free.generator.optimiser', "did you mean 'optimizer'", None),
    ('generator optimizer unknown', 'lrwa_mb', {"key: 'Adam'": "key: 'Adamm'"},
     'train.data_free.generator.optimizer.key', "did you mean 'Adam'", None),
    ('generator learning rate negative', 'lrwa_mb', {'kwargs: {lr: 0.001}': 'kwargs: {lr: -0.001}'},
     'train.data_free.generator.optimizer.kwargs', 'Invalid learning rate', None),
    ('generator scheduler kwarg unknown', 'lrwa_mb', {
        '      steps: 1': "      steps: 1\n      scheduler: {key: 'CosineAnnealingLR', kwargs: {T_maxx: 3}}"},
     'train.data_free.generator.scheduler.kwargs.T_maxx', 'T_maxx', None),
    ('generator loss weight NaN', 'lrwa_mb', {'weight: 5.0}': 'weight: .nan}'},
     'train.data_free.generator.criterion.kwargs.sub_terms.ie.weight', 'finite number', None),
    ('generator loss term unknown', 'lrwa_mb', {"key: 'OneHotLoss'": "key: 'OneHotLos'"},
     'train.data_free.generator.criterion', 'OneHotLos', None),
    ('generator loss sub_terms misspelt', 'lrwa_mb', {'          sub_terms:': '          sub_term:'},
     'train.data_free.generator.criterion.kwargs.sub_term', "did you mean 'sub_terms'", None),
    ('replay unknown', 'lrwa_mb', {"key: 'MemoryBank'": "key: 'MemoryBnak'"},
     'train.data_free.replay.key', "did you mean 'MemoryBank'", None),
    ('replay block unknown key', 'lrwa_mb', {"      key: 'MemoryBank'\n      kwargs:":
                                             "      key: 'MemoryBank'\n      kwarg:"},
     'train.data_free.replay.kwarg', "did you mean 'kwargs'", None),
    ('replay kwarg unknown', 'lrwa_mb', {'capacity: 1024': 'capacit: 1024'},
     'train.data_free.replay.kwargs.capacit', "did you mean 'capacity'", None),
    ('replay capacity zero', 'lrwa_mb', {'capacity: 1024': 'capacity: 0'},
     'train.data_free.replay.kwargs.capacity', 'positive integer', None),
    ('replay push_size above capacity', 'lrwa_mb', {'push_size: 128': 'push_size: 4096'},
     'train.data_free.replay.kwargs', 'must not exceed', None),
    ('replay policy unknown', 'lrwa_mb', {'push_every_epochs: 1,': "push_every_epochs: 1, policy: 'lifo',"},
     'train.data_free.replay.kwargs.policy', 'lifo', None),
    ('dfad given a replay memory', 'lrwa_mb', {"strategy: 'lrwa'": "strategy: 'dfad'"},
     'train.data_free.replay', "strategy 'dfad' uses no replay", None),
    ('lrwa without replay memory', 'lrwa_mb', {REPLAY_BLOCK: ''},
     'train.data_free.replay', "strategy 'lrwa' replays from a memory", None),
    ('mb_dfkd without replay memory', 'mb_dfkd', {REPLAY_BLOCK: ''},
     'train.data_free.replay', "strategy 'mb_dfkd' replays from a memory", None),
    ('meta alpha zero', 'lrwa_mb', {'alpha_per_lr: 1.0': 'alpha: 0'},
     'train.data_free.meta.alpha', 'finite number > 0, got 0', None),
    ('meta alpha NaN', 'lrwa_mb', {'alpha_per_lr: 1.0': 'alpha: .nan'},
     'train.data_free.meta.alpha', 'got nan', None),
    ('meta alpha negative', 'lrwa_mb', {'alpha_per_lr: 1.0': 'alpha: -0.5'},
     'train.data_free.meta.alpha', 'got -0.5', None),
    ('meta alpha a string', 'lrwa_mb', {'alpha_per_lr: 1.0': "alpha: 'big'"},
     'train.data_free.meta.alpha', "got 'big'", None),
    ('meta backend unknown', 'lrwa_mb', {"backend: 'higher'": "backend: 'torch'"},
     'train.data_free.meta.backend', 'higher, functional', None),
    ('meta order unknown', 'lrwa_mb', {"order: 'second'": "order: 'third'"},
     'train.data_free.meta.order', 'second, first', None),
    ('meta unknown key', 'lrwa_mb', {'alpha_per_lr: 1.0': 'alpah: 0.5'},
     'train.data_free.meta.alpah', "did you mean 'alpha'", None),
    ('meta given to mb_dfkd', 'lrwa_mb', {"strategy: 'lrwa'": "strategy: 'mb_dfkd'"},
     'train.data_free.meta', 'mb_dfkd', None),
    ('lrwa without meta', 'lrwa_mb', {META_LINE: ''},
     'train.data_free.meta', 'alpha', None),
    ('validation dataset unknown', 'lrwa_mb', {VAL_ID: VAL_ID.replace('digits/test', 'digits/val')},
     'train.val_data_loader.dataset_id', "did you mean 'digits/test'", None),
    ('test dataset unknown', 'lrwa_mb', {TEST_ID: TEST_ID.replace('digits/test', 'digits/tst')},
     'test.test_data_loader.dataset_id', "did you mean 'digits/test'", None),
    ('dataset class unknown', 'lrwa_mb', {'datasets.SklearnDigits': 'datasets.SklearnDigitz'},
     '--config', 'SklearnDigitz', None),
    ('teacher checkpoint missing', 'lrwa_mb', {TEACHER_CKPT: 'resource/ckpt/digits/no_teacher.pt'},
     'models.teacher_model.src_ckpt', 'does not exist', None),
    ('teacher checkpoint unreadable', 'lrwa_mb', {TEACHER_CKPT: 'garbage.pt'},
     'models.teacher_model.src_ckpt', 'could not be read', _garbage_teacher),
    ('teacher checkpoint of another model', 'lrwa_mb', {TEACHER: STUDENT},
     'models.teacher_model.src_ckpt', 'does not match the model', None),
    ('timm teacher checkpoint missing', 'lrwa_mb', {
        f"{TEACHER}\n    src_ckpt: '{TEACHER_CKPT}'":
            "key: 'timm_model'\n    kwargs: {model_name: 'test_resnet', num_classes: 10, "
            "checkpoint_path: 'no_timm_teacher.pth'}"},
     'models.teacher_model.kwargs.checkpoint_path', 'does not exist', None),
    ('student kwarg unknown', 'lrwa_mb', {STUDENT: STUDENT.replace('num_classes', 'num_clases')},
     'models.student_model.kwargs.num_clases', "DigitsStudentCNN does not accept it (did you mean 'num_classes'?)",
     None),
    ('student and teacher class counts differ', 'lrwa_mb', {STUDENT: STUDENT.replace('10', '7')},
     'models.student_model.kwargs.num_classes', 'predicts 7 classes but the teacher (models.teacher_model) 10', None),
    ('generator output does not fit the teacher', 'lrwa_mb', {'nc: 1': 'nc: 3'},
     'train.data_free.generator', 'teacher', None),
    ('teacher asked to learn', 'lrwa_mb', {'    requires_grad: False': '    requires_grad: True'},
     'train.teacher.requires_grad', 'must be False', None),
    # the strategy's own settings, the released-code parity options and the meta step's knobs
    ('strategy mapping key unknown', 'mb_dfkd', {"strategy: 'mb_dfkd'": "strategy: {key: 'mb_dfk'}"},
     'train.strategy.key', "did you mean 'mb_dfkd'", None),
    ('strategy kwarg unknown', 'mb_dfkd', {"strategy: 'mb_dfkd'":
                                           "strategy: {key: 'mb_dfkd', kwargs: {combin: 'sum'}}"},
     'train.strategy.kwargs.combin', "did you mean 'combine'", None),
    ('combine unknown', 'mb_dfkd', {"strategy: 'mb_dfkd'": "strategy: {key: 'mb_dfkd', kwargs: {combine: 'cat'}}"},
     'train.strategy.kwargs.combine', "unknown combine 'cat' (did you mean 'concat'?); expected one of: sum, concat",
     None),
    ('lrwa settings under strategy kwargs', 'lrwa_mb', {"strategy: 'lrwa'":
                                                        "strategy: {key: 'lrwa', kwargs: {alpha: 0.5}}"},
     'train.strategy.kwargs', 'train.data_free.meta', None),
    ('first_push_epoch negative', 'lrwa_mb', {'push_every_epochs: 1,': 'push_every_epochs: 1, first_push_epoch: -1,'},
     'train.data_free.replay.kwargs.first_push_epoch', 'got -1', None),
    ('draw unknown', 'lrwa_mb', {'push_every_epochs: 1,': "push_every_epochs: 1, draw: 'one',"},
     'train.data_free.replay.kwargs.draw', "unknown draw 'one'; expected one of: samples, batch", None),
    ('draw batch with a reservoir', 'lrwa_mb', {'push_every_epochs: 1,':
                                                "push_every_epochs: 1, policy: 'reservoir', draw: 'batch',"},
     'train.data_free.replay.kwargs', "only policy 'fifo'", None),
    ('cache_teacher not a boolean', 'lrwa_mb', {'push_every_epochs: 1,': "push_every_epochs: 1, cache_teacher: 'yes',"},
     'train.data_free.replay.kwargs.cache_teacher', 'expects true or false', None),
    ('decode_bn unknown', 'lrwa_gr', {'beta: 0.00001': "beta: 0.00001\n        decode_bn: 'eval'"},
     'train.data_free.replay.kwargs.decode_bn', "unknown decode_bn 'eval'; expected one of: batch, running", None),
    ('alpha_per_lr zero', 'lrwa_mb', {'alpha_per_lr: 1.0': 'alpha_per_lr: 0'},
     'train.data_free.meta.alpha_per_lr', 'got 0', None),
    ('alpha and alpha_per_lr both given', 'lrwa_mb', {'alpha_per_lr: 1.0': 'alpha: 0.5, alpha_per_lr: 1.0'},
     'train.data_free.meta', 'exactly one of alpha', None),
    ('neither alpha nor alpha_per_lr', 'lrwa_mb', {'alpha_per_lr: 1.0, ': ''},
     'train.data_free.meta', 'exactly one of alpha', None),
    ('a negative loss weight', 'lrwa_mb',
     {"kwargs: {kind: 'l1'}}, weight: 1.0}": "kwargs: {kind: 'l1'}}, weight: -1.0}"},
     'train.data_free.generator.criterion.kwargs.sub_terms.adv.weight', 'is negative: it would turn this term into its '
     'opposite', None),
    ('fd_eps without finite_difference', 'lrwa_mb', {"order: 'second'": "order: 'second', fd_eps: 0.05"},
     'train.data_free.meta.fd_eps', "is only read with order 'finite_difference', not 'second'", None),
    ('a key given twice', 'lrwa_mb',
     {'iterations_per_epoch: 3\n': 'iterations_per_epoch: 3\n    iterations_per_epoch: 5\n'},
     '--config', "key 'iterations_per_epoch' is given twice in one mapping", None),
    ('inner_bn unknown', 'lrwa_mb', {"order: 'second'": "order: 'second', inner_bn: 'freeze'"},
     'train.data_free.meta.inner_bn', "unknown inner_bn 'freeze'; expected one of: update, keep", None),
    ('momentum outside (0, 1)', 'mad', {'momentum: 0.95': 'momentum: 1.5'},
     'train.data_free.replay.kwargs.momentum', 'finite number > 0 and < 1, got 1.5', None),
    ('dfad given the momentum generator', 'mad', {"strategy: 'mad'": "strategy: 'dfad'"},
     'train.data_free.replay', "strategy 'dfad' uses no replay memory", None),
    ('fd_eps zero', 'lrwa_mb', {"order: 'second'": "order: 'finite_difference', fd_eps: 0"},
     'train.data_free.meta.fd_eps', 'got 0', None),
    # values that pass their type but make the run meaningless or doomed
    ('generator img_size other than the data', 'lrwa_mb', {'img_size: 8': 'img_size: 16'},
     'train.data_free.generator.kwargs.img_size', 'makes samples of shape 1x16x16 but the student is evaluated on '
                                                  '1x8x8', None),
    ('dst_ckpt under a file', 'lrwa_mb', {"dst_ckpt: 'resource/ckpt/digits/lrwa_mb.pt'": "dst_ckpt: 'run.yaml/s.pt'"},
     'models.student_model.dst_ckpt', 'is a file, not a folder', None),
    ('dst_ckpt a folder', 'lrwa_mb', {"dst_ckpt: 'resource/ckpt/digits/lrwa_mb.pt'": "dst_ckpt: 'resource/ckpt'"},
     'models.student_model.dst_ckpt', 'is a folder; expected the path of a file', None),
    ('student loss weight a string', 'lrwa_mb', {"{key: 'LogitsL1Loss', kwargs: {}}, weight: 1.0}":
                                                 "{key: 'LogitsL1Loss', kwargs: {}}, weight: 'abc'}"},
     'train.criterion.kwargs.sub_terms.l1.weight', "got 'abc'", None),
    ('student loss unknown', 'lrwa_mb', {"key: 'LogitsL1Loss'": "key: 'LogitsL1Los'"},
     'train.criterion.kwargs.sub_terms.l1.criterion.key', "did you mean 'LogitsL1Loss'", None),
    ('student learning rate scheduled negative', 'mb_dfkd',
     {"key: 'CosineAnnealingLR'\n    kwargs: {T_max: 12}": "key: 'ExponentialLR'\n    kwargs: {gamma: -1.0}"},
     'train.scheduler', 'the learning rate it schedules becomes negative (-0.1 after 1 of the run', None),
    ('generator learning rate scheduled negative', 'lrwa_mb', {
        '      steps: 1': "      steps: 1\n      scheduler: {key: 'LambdaLR', kwargs: {lr_lambda: !import_get {key: "
                         "'operator.neg'}}}"},
     'train.data_free.generator.scheduler', 'becomes negative', None),
    ('student scheduler unknown', 'lrwa_mb', {"key: 'CosineAnnealingLR'": "key: 'CosineAnnealingLRR'"},
     'train.scheduler.key', "did you mean 'CosineAnnealingLR'", None),
    ('student scheduler T_max zero', 'lrwa_mb', {'kwargs: {T_max: 12}': 'kwargs: {T_max: 0}'},
     'train.scheduler.kwargs', 'CosineAnnealingLR refused it', None),
    ('student learning rate negative', 'lrwa_mb', {'lr: 0.1, momentum': 'lr: -0.1, momentum'},
     'train.optimizer.kwargs', 'Invalid learning rate', None),
    ('student learning rate read as text', 'lrwa_mb', {'lr: 0.1, momentum': 'lr: 1e-1, momentum'},
     'train.optimizer.kwargs.lr', "YAML reads 1e-1 as text; write 1.0e-1", None),
    ('generator learning rate read as text', 'lrwa_mb', {'kwargs: {lr: 0.001}': 'kwargs: {lr: 1e-3}'},
     'train.data_free.generator.optimizer.kwargs.lr', 'write 1.0e-3', None),
    ('validation batch size zero', 'lrwa_mb', {'    kwargs: {batch_size: 360, num_workers: 0}\n  teacher:':
                                               '    kwargs: {batch_size: 0, num_workers: 0}\n  teacher:'},
     'train.val_data_loader.kwargs.batch_size', 'positive integer, got 0', None),
    ('post-forward process unknown', 'lrwa_mb', {"\n  optimizer:\n    key: 'SGD'":
                                                 "\n  post_forward_process: 'default_post_forward_proces'\n"
                                                 "  optimizer:\n    key: 'SGD'"},
     'train.post_forward_process', "did you mean 'default_post_forward_process'", None),
    ('memory that never replays', 'lrwa_mb', {'push_every_epochs: 1,': 'push_every_epochs: 2,'},
     'train.data_free.replay.kwargs', 'would never replay anything', None),
]


def _dst_ckpt(name: str) -> str:
    return f'resource/ckpt/digits/{name}.pt'


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes: what a refused run must leave exactly as it was."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


def _key_path(err: str) -> str:
    return err.removeprefix('error: ').split(': ', 1)[0].split(' ', 1)[0]


def test_cases_are_distinct_and_many():
    assert len(CASES) >= 25
    assert len({case[0] for case in CASES}) == len(CASES)
    assert len({(case[1], tuple(case[2].items())) for case in CASES}) == len(CASES)


@pytest.mark.parametrize('index', range(len(CASES)), ids=[case[0] for case in CASES])
def test_bad_config_is_one_line_error_before_training(index, work, capsys):
    _, name, edits, key_path, text, prepare = CASES[index]
    config = write_config(DIGITS_CONFIGS / f'{name}.yaml', work / 'run.yaml', {**SHORT_RUN, **edits})
    if prepare is not None:
        prepare(work)
    dst = work / _dst_ckpt(name)
    if index % 2:  # every other case starts from an earlier run's checkpoint, which must survive byte for byte
        atomic_save({'model': DigitsStudentCNN().state_dict()}, dst)
    before = _files(work)
    assert run_cli(config) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1, err
    assert key_path in err and text in err, err
    assert _files(work) == before
    assert dst.is_file() == bool(index % 2)


def test_shipped_configs_pass_validation():
    """Validation never refuses a shipped config: the digits ones loaded for real, every other one (MNIST, drift,
    released, paper scale) without building its datasets: validation only needs their names."""
    from torchdistill.common import yaml_util
    for path in sorted(DIGITS_CONFIGS.glob('*.yaml')):
        validate_config(yaml_util.load_yaml_file(str(path)))
    others = sorted(set((DIGITS_CONFIGS.parent).rglob('*.yaml')) - set(DIGITS_CONFIGS.glob('*.yaml')))
    assert len(others) > 60
    for path in others:
        validate_config(yaml.load(path.read_text(), Loader=_IgnoreTags))


def test_error_message_names_the_allowed_strategies():
    from lrwa_plugin.registry import STRATEGY_DICT
    config = {'datasets': {'d': None}, 'train': {'strategy': 'nope', 'val_data_loader': {'dataset_id': 'd'}},
              'test': {'test_data_loader': {'dataset_id': 'd'}}}
    with pytest.raises(ConfigError) as info:
        validate_config(config)
    assert info.value.path == 'train.strategy'
    assert all(key in str(info.value) for key in STRATEGY_DICT)


def test_validation_draws_nothing_from_the_global_generator():
    from torchdistill.common import yaml_util
    config = yaml_util.load_yaml_file(str(DIGITS_CONFIGS / 'lrwa_mb.yaml'))
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    validate_config(config)
    assert torch.equal(state, torch.random.get_rng_state())


# ------------------------------------------------------------------------------------- property-based test
PROPERTY_RUN = {**SHORT_RUN, 'num_epochs: 2': 'num_epochs: 1', 'iterations_per_epoch: 3': 'iterations_per_epoch: 1',
                'student_steps: 2': 'student_steps: 1', 'batch_size: 32': 'batch_size: 16'}
MUTANT_VALUES = (0, -3, 1.0e30, math.nan, 'text', None)


class _IgnoreTags(yaml.SafeLoader):
    """Reads a torchdistill YAML without running its ``!import_call`` tags (only the plugin's blocks are needed)."""


_IgnoreTags.add_multi_constructor('!', lambda loader, suffix, node: None)


def _paths(block: Any, prefix: tuple = ()) -> list[tuple]:
    paths = []
    if isinstance(block, dict):
        for key, value in block.items():
            paths.append((*prefix, key))
            paths.extend(_paths(value, (*prefix, key)))
    return paths


def _base_text() -> str:
    return write_config(DIGITS_CONFIGS / 'lrwa_mb.yaml', Path(tempfile.mkdtemp()) / 'base.yaml',
                        PROPERTY_RUN).read_text()


BASE_TEXT = _base_text()
BASE_TRAIN = yaml.load(BASE_TEXT, Loader=_IgnoreTags)['train']
PLUGIN_BLOCKS = {'strategy': BASE_TRAIN['strategy'], 'data_free': BASE_TRAIN['data_free']}
MUTABLE_PATHS = _paths(PLUGIN_BLOCKS)
mutations = st.tuples(st.sampled_from(MUTABLE_PATHS),
                      st.one_of(st.just(('rename',)), st.sampled_from(MUTANT_VALUES).map(lambda v: ('value', v))))


def _mutate(blocks: dict, path: tuple, mutation: tuple) -> tuple[str, ...]:
    """Applies one mutation in place; returns the dotted key paths a refusal may name."""
    parent = blocks
    for key in path[:-1]:
        parent = parent.get(key) if isinstance(parent, dict) else None
    if not isinstance(parent, dict) or path[-1] not in parent:
        return ()  # an earlier mutation removed the place
    dotted = '.'.join(['train', *map(str, path)])
    if mutation[0] == 'rename':
        new_key = f'{path[-1]}_'
        parent[new_key] = parent.pop(path[-1])
        # Without `strategy` the run is plain torchdistill, and the data_free block is what gets refused.
        also = ('train.data_free',) if path == ('strategy',) else ()
        return dotted, '.'.join(['train', *map(str, path[:-1]), new_key]), *also
    if isinstance(parent[path[-1]], dict):
        return ()  # only scalar values are mutated; blocks are renamed
    parent[path[-1]] = mutation[1]
    return (dotted,)


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10 ** 6).strip() \
        .removesuffix('...').strip()


def _write_mutant(blocks: dict, destination: Path) -> None:
    """The base config with its ``strategy`` line and ``data_free`` block replaced by the (mutated) ``blocks``."""
    text = BASE_TEXT.replace("  strategy: 'lrwa'\n", '')
    start, end = text.index('  data_free:\n'), text.index('  val_data_loader:\n')
    lines = ''.join(f'  {key}: {_flow(value)}\n' for key, value in blocks.items())
    destination.write_text(text[:start] + lines + text[end:])


def _run_mutant(blocks: dict, teacher_dir: Path) -> tuple[int, str, str, bool]:
    """Runs the mutated config in a fresh directory; returns (exit status, stdout, stderr, student written)."""
    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        (work / TEACHER_CKPT).parent.mkdir(parents=True)
        (work / TEACHER_CKPT).write_bytes((teacher_dir / TEACHER_CKPT).read_bytes())
        _write_mutant(blocks, work / 'run.yaml')
        out, err = io.StringIO(), io.StringIO()
        cwd = os.getcwd()
        os.chdir(work)
        try:
            # The per-epoch sample grids (matplotlib, ~1 s a run) are not what this property is about.
            with mock.patch.object(DataFreeTrainer, 'after_evaluation'), contextlib.redirect_stdout(out), \
                    contextlib.redirect_stderr(err):
                status = run_cli(work / 'run.yaml')
        except Exception:  # the property: no mutation may end in a raw traceback
            pytest.fail(f'raw exception for {blocks}:\n{traceback.format_exc()}')
        finally:
            os.chdir(cwd)
        trained = (work / _dst_ckpt('lrwa_mb')).is_file()
    return status, out.getvalue(), err.getvalue(), trained


# Nothing of Hypothesis lands in the repository, not even the patch file it writes for a failing example.
set_hypothesis_home_dir(tempfile.mkdtemp(prefix='hypothesis-'))


@settings(max_examples=30, derandomize=True, deadline=None, database=None, phases=(Phase.generate, Phase.shrink),
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mutations, min_size=1, max_size=2))
def test_mutated_plugin_blocks_train_or_fail_cleanly(teacher_dir, chosen):
    blocks = yaml.safe_load(yaml.safe_dump(PLUGIN_BLOCKS))
    named: list[str] = []
    for path, mutation in chosen:
        named.extend(_mutate(blocks, path, mutation))
    status, out, err, trained = _run_mutant(blocks, teacher_dir)
    if status == 0:
        assert trained and 'Summary' in out, (blocks, out, err)
        return
    assert err.startswith('error: ') and err.count('\n') == 1, (blocks, err)
    assert not trained, blocks
    if status == 2:
        path = _key_path(err)
        assert any(p == path or p.startswith(path + '.') for p in named), (named, err)
    else:
        assert status == 3 and 'non-finite' in err and 'epoch 0, iteration 0' in err, (blocks, status, err)
