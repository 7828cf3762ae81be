"""Checks of torchdistill's own ``train`` and ``test`` blocks that torchdistill makes only when it builds the box (or
never): the datasets the loaders name, the loaders' counts, the process hooks, the student optimizer, its scheduler
(stepped as the run will step it) and criterion, and what a data-free run reads differently (a frozen teacher, one
student step per generated batch).

.. code-block:: yaml

    train:
      optimizer: {key: 'SGD', kwargs: {lr: 0.1, momentum: 0.9}, max_grad_norm: 5.0}
      scheduler: {key: 'CosineAnnealingLR', kwargs: {T_max: 12}, scheduling_step: 0}
      criterion: {key: 'WeightedSumLoss', kwargs: {sub_terms: {...}}}
      val_data_loader: {dataset_id: 'digits/test', kwargs: {batch_size: 256}}
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..util import did_you_mean, show
from .checks import (
    check_criterion,
    check_keys,
    check_optimizer,
    check_scheduler,
    choice,
    count,
    finite,
    mapping,
    require,
)

if TYPE_CHECKING:
    from .data_free import DataFreeConfig

def check_dataset_id(config: Mapping, section: str, loader: str, datasets: Mapping, why: str) -> None:
    block = config.get(section)
    if not isinstance(block, Mapping) or not isinstance(block.get(loader), Mapping):
        raise ConfigError(f'{section}.{loader}', f'missing: {why} ({{dataset_id: ..., kwargs: {{batch_size: ...}}}})')
    dataset_id = block[loader].get('dataset_id')
    if not isinstance(dataset_id, str) or dataset_id not in datasets:
        known = ', '.join(map(str, datasets)) or 'none'
        raise ConfigError(f'{section}.{loader}.dataset_id',
                          f'{show(dataset_id)} is not a key of datasets{did_you_mean(dataset_id, datasets)}; '
                          f'known: {known}; needed: {why}')


#: torchdistill's process hooks of the ``train`` block, with the names of their registries.
PROCESS_REGISTRIES = {'pre_epoch_process': 'PRE_EPOCH_PROC_FUNC_DICT',
                      'pre_forward_process': 'PRE_FORWARD_PROC_FUNC_DICT',
                      'post_forward_process': 'POST_FORWARD_PROC_FUNC_DICT',
                      'post_epoch_process': 'POST_EPOCH_PROC_FUNC_DICT'}
#: Keys of torchdistill's ``train.optimizer`` block (besides key and kwargs).
OPTIMIZER_EXTRA_KEYS = ('module_wise_configs', 'filters_params', 'max_grad_norm', 'grad_accum_step')
#: Step-wise scheduling is tried for at most this many steps (a dummy optimizer: the checks cost nothing).
MAX_CHECKED_SCHEDULER_STEPS = 20_000


def check_loader(block: Any, path: str) -> None:
    block = mapping(block, path)
    kwargs = mapping(block.get('kwargs') or {}, f'{path}.kwargs')
    if 'batch_size' in kwargs:
        count(kwargs['batch_size'], f'{path}.kwargs.batch_size')
    if 'num_workers' in kwargs:
        count(kwargs['num_workers'], f'{path}.kwargs.num_workers', minimum=0)


def _scheduler_steps(train: Mapping, data_free: DataFreeConfig | None) -> int:
    """How often the student's scheduler steps over the run (epoch-wise: once an epoch)."""
    epochs = train.get('num_epochs') if isinstance(train.get('num_epochs'), int) else 1
    every = (train.get('scheduler') or {}).get('scheduling_step', 0)
    if not every or data_free is None:
        return max(1, epochs)
    optimizer_steps = epochs * data_free.iterations_per_epoch * data_free.student_steps
    return max(1, min(optimizer_steps // every, MAX_CHECKED_SCHEDULER_STEPS))


def check_train_block(train: Mapping, data_free: DataFreeConfig | None) -> None:
    """torchdistill's own keys of ``train``, which torchdistill only reads when it builds the box (or later): its
    process hooks, the student optimizer, scheduler (stepped as the run will step it) and criterion, the loaders."""
    from torchdistill.core.interfaces import registry as processes

    for key, registry in PROCESS_REGISTRIES.items():
        if train.get(key) is not None:
            choice(train[key], sorted(getattr(processes, registry)), f'train.{key}', key.replace('_', ' '))
    optimizer = None
    if train.get('optimizer'):
        block = mapping(train['optimizer'], 'train.optimizer')
        check_keys(block, ('key', 'kwargs', *OPTIMIZER_EXTRA_KEYS), 'train.optimizer')
        if block.get('max_grad_norm') is not None:
            finite(block['max_grad_norm'], 'train.optimizer.max_grad_norm', positive=True)
        if 'grad_accum_step' in block:
            count(block['grad_accum_step'], 'train.optimizer.grad_accum_step')
        optimizer = check_optimizer({'key': block.get('key'), 'kwargs': block.get('kwargs')}, 'train.optimizer')
    if train.get('scheduler'):
        block = mapping(train['scheduler'], 'train.scheduler')
        check_keys(block, ('key', 'kwargs', 'scheduling_step'), 'train.scheduler')
        if 'scheduling_step' in block:
            count(block['scheduling_step'], 'train.scheduler.scheduling_step', minimum=0)
        if optimizer is None:
            raise ConfigError('train.scheduler', 'set, but train.optimizer is missing')
        check_scheduler({'key': block.get('key'), 'kwargs': block.get('kwargs')}, 'train.scheduler', optimizer,
                        steps=_scheduler_steps(train, data_free))
    if data_free is not None:
        check_criterion(require(train, 'criterion', 'train', "the student's criterion (L_Acq and L_Ret)"),
                        'train.criterion', "the student's loss terms")
    for loader in ('train_data_loader', 'val_data_loader'):
        if train.get(loader) is not None:
            check_loader(train[loader], f'train.{loader}')



def check_data_free_train_block(train: Mapping) -> None:
    """What of torchdistill's ``train`` block a data-free run reads differently: a frozen teacher, one step per
    generated batch, no training data."""
    teacher = train.get('teacher') or {}
    if isinstance(teacher, Mapping) and teacher.get('requires_grad', False):
        raise ConfigError('train.teacher.requires_grad', 'must be False: the teacher is frozen in data-free '
                                                         'distillation')
    optimizer = train.get('optimizer') or {}
    if isinstance(optimizer, Mapping) and optimizer.get('grad_accum_step', 1) != 1:
        raise ConfigError('train.optimizer.grad_accum_step', 'must be 1 for data-free distillation: every student '
                                                             'step sees a fresh generated batch')


