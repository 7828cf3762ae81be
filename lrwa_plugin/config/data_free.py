"""The plugin's part of a torchdistill config, parsed once into typed objects that the box, strategies and memories use.

A data-free config is a torchdistill config with two keys under ``train`` (Patel, Mopuri, Qiu, CVPR 2023)::

    train:
      strategy: 'lrwa'                 # or {key: 'mb_dfkd', kwargs: {combine: 'concat'}}
      num_epochs: 12
      data_free:
        iterations_per_epoch: 25       # default 50
        batch_size: 128                # default 256
        student_steps: 5               # default 5
        generator: {key, kwargs, steps, optimizer, scheduler, criterion}
        replay: {key, kwargs}          # the strategy says which memories it accepts
        meta: {alpha, backend, order}  # the settings of strategies that take the meta step (lrwa)

:func:`parse_data_free` reads that structure into a :class:`DataFreeConfig` (defaults live here, once).
:func:`validate_config` does that and, before any model is built, lets each component speak for itself: the
generator, its optimizer, scheduler and criterion, the replay memory and the strategy are checked against their
signatures and built once by the engine (:mod:`lrwa_plugin.config.checks`); a component with rules about the rest of
the run declares them beside its code (``check_config`` classmethods of memories and strategies). Every problem is a
:class:`~lrwa_plugin.errors.ConfigError` naming the key path.
"""
from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torchdistill.models.registry import MODEL_DICT

from ..errors import ConfigError
from ..registry import REPLAY_DICT, STRATEGY_DICT
from ..util import did_you_mean, show
from .checks import (
    check_criterion,
    check_keys,
    check_kwargs,
    check_optimizer,
    check_scheduler,
    choice,
    count,
    dry_build,
    finite,
    mapping,
    refused,
    require,
    rng_untouched,
)

#: The plugin's keys in torchdistill's ``train`` block.
PLUGIN_TRAIN_KEYS: tuple[str, ...] = ('strategy', 'data_free')
DATA_FREE_KEYS: tuple[str, ...] = ('iterations_per_epoch', 'batch_size', 'student_steps', 'generator', 'replay',
                                   'meta')
GENERATOR_KEYS: tuple[str, ...] = ('key', 'kwargs', 'steps', 'optimizer', 'scheduler', 'criterion')
DEFAULT_COUNTS: dict[str, int] = {'iterations_per_epoch': 50, 'batch_size': 256, 'student_steps': 5}


@dataclass(frozen=True)
class Component:
    """A ``{key, kwargs}`` block: what to build, and where the YAML says so (for messages)."""

    key: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    path: str = ''
    kwargs_path: str = ''


@dataclass(frozen=True)
class GeneratorConfig:
    """``train.data_free.generator``: the model, its optimizer (and scheduler), its criterion, its steps."""

    model: Component
    optimizer: Component
    scheduler: Component | None
    criterion: dict[str, Any]
    steps: int = 1


@dataclass(frozen=True)
class DataFreeConfig:
    """``train.strategy`` and ``train.data_free``, parsed (see the module docstring)."""

    strategy: Component
    num_epochs: int
    iterations_per_epoch: int
    batch_size: int
    student_steps: int
    generator: GeneratorConfig
    replay: Component | None

    @property
    def strategy_class(self) -> type:
        return STRATEGY_DICT[self.strategy.key]


def _component(block: Mapping, path: str, key: str, kwargs_key: str = 'kwargs') -> Component:
    kwargs = block.get(kwargs_key)
    return Component(key, copy.deepcopy(dict(kwargs or {})), path, f'{path}.{kwargs_key}')


def _strategy_key(train: Mapping) -> tuple[str, dict[str, Any]]:
    """``train.strategy``: ``'key'`` or ``{key, kwargs}``; returns the key and the kwargs written there."""
    value = train['strategy']
    known = sorted(STRATEGY_DICT)
    if isinstance(value, Mapping):
        check_keys(value, ('key', 'kwargs'), 'train.strategy')
        key = choice(value.get('key'), known, 'train.strategy.key', 'strategy')
        return key, dict(mapping(value.get('kwargs') or {}, 'train.strategy.kwargs'))
    return choice(value, known, 'train.strategy', 'strategy'), {}


def _strategy(key: str, kwargs: dict[str, Any], data_free: Mapping) -> Component:
    """The strategy with its settings, from ``train.strategy.kwargs`` or, if it takes the meta step, from ``meta``."""
    meta = data_free.get('meta')
    if STRATEGY_DICT[key].settings == 'meta':
        if kwargs:
            raise ConfigError('train.strategy.kwargs', f"strategy '{key}' takes its settings from "
                                                       'train.data_free.meta')
        if meta is None:
            raise ConfigError('train.data_free.meta', f"missing: strategy '{key}' takes the meta step's settings "
                                                      'here (alpha or alpha_per_lr, backend, order, inner_bn, '
                                                      'fd_eps)')
        return Component(key, copy.deepcopy(dict(mapping(meta, 'train.data_free.meta'))), 'train.strategy',
                         'train.data_free.meta')
    if meta is not None:
        takers = sorted(k for k, strategy in STRATEGY_DICT.items() if strategy.settings == 'meta')
        raise ConfigError('train.data_free.meta', f"only strategies that take the meta step read it "
                                                  f"({', '.join(takers)}), not '{key}'; remove it")
    return Component(key, copy.deepcopy(kwargs), 'train.strategy', 'train.strategy.kwargs')


def _parse_generator(block: Any, path: str) -> GeneratorConfig:
    if block is None:
        raise ConfigError(path, 'missing (key, kwargs, optimizer and criterion of the generator)')
    block = mapping(block, path)
    check_keys(block, GENERATOR_KEYS, path)
    key = choice(require(block, 'key', path, "the generator's model key"), sorted(MODEL_DICT), f'{path}.key',
                 'generator', known="expected a model of torchdistill's registry (register_model)")
    mapping(block.get('kwargs') or {}, f'{path}.kwargs')
    optimizer = mapping(require(block, 'optimizer', path, 'e.g. {key: Adam, kwargs: {lr: 0.001}}'),
                        f'{path}.optimizer')
    scheduler = block.get('scheduler')
    criterion = mapping(require(block, 'criterion', path, 'e.g. a WeightedSumLoss of generator losses'),
                        f'{path}.criterion')
    return GeneratorConfig(
        model=_component(block, path, key),
        optimizer=_component(optimizer, f'{path}.optimizer', str(optimizer.get('key'))),
        scheduler=_component(mapping(scheduler, f'{path}.scheduler'), f'{path}.scheduler',
                             str(scheduler.get('key'))) if scheduler else None,
        criterion=copy.deepcopy(dict(criterion)),
        steps=count(block.get('steps', 1), f'{path}.steps'))


def _parse_replay(block: Any, strategy: type, path: str = 'train.data_free.replay') -> Component | None:
    if not block:
        strategy.check_replay(None, path)
        return None
    block = mapping(block, path)
    check_keys(block, ('key', 'kwargs'), path)
    key = choice(block.get('key'), sorted(REPLAY_DICT), f'{path}.key', 'replay memory')
    strategy.check_replay(key, path)
    mapping(block.get('kwargs') or {}, f'{path}.kwargs')
    return _component(block, path, key)


def parse_data_free(train: Any) -> DataFreeConfig | None:
    """``train.strategy`` and ``train.data_free`` as a :class:`DataFreeConfig`; None for a plain torchdistill config.

    Checks the structure (known keys, counts, registered keys, the strategy's memory); the components' own
    arguments are checked by :func:`validate_config`.

    Raises:
        ConfigError: the first problem found, as ``<key path>: <value found and what is allowed>``.
    """
    if not isinstance(train, Mapping):
        return None
    if 'strategy' not in train:
        # torchdistill ignores unknown keys in `train`; a misspelt plugin key would silently turn the run into plain
        # (supervised) torchdistill, so a near miss of one is refused.
        for key in train:
            near = difflib.get_close_matches(str(key), PLUGIN_TRAIN_KEYS, n=1, cutoff=0.75)
            if key not in PLUGIN_TRAIN_KEYS and near:
                raise ConfigError(f'train.{key}', f'unknown key (did you mean {near[0]!r}?); without '
                                                  'train.strategy the run is plain torchdistill')
        if 'data_free' in train:
            raise ConfigError('train.data_free', f'set, but train.strategy is missing (one of: '
                                                 f'{", ".join(sorted(STRATEGY_DICT))}); without it the run is plain '
                                                 'torchdistill and would ignore this block')
        return None
    key, kwargs = _strategy_key(train)
    num_epochs = count(train.get('num_epochs'), 'train.num_epochs')
    if train.get('data_free') is None:
        raise ConfigError('train.data_free', f"missing: strategy '{key}' needs the generator, replay and meta "
                                             'settings there')
    data_free = mapping(train['data_free'], 'train.data_free')
    check_keys(data_free, DATA_FREE_KEYS, 'train.data_free')
    counts = {name: count(data_free.get(name, default), f'train.data_free.{name}')
              for name, default in DEFAULT_COUNTS.items()}
    generator = _parse_generator(data_free.get('generator'), 'train.data_free.generator')
    replay = _parse_replay(data_free.get('replay'), STRATEGY_DICT[key])
    strategy = _strategy(key, kwargs, data_free)
    _check_data_free_train_block(train)
    return DataFreeConfig(strategy=strategy, num_epochs=num_epochs, generator=generator, replay=replay, **counts)


def _check_data_free_train_block(train: Mapping) -> None:
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


# ------------------------------------------------------------------------------------------- component checks
def _check_built(component: Component, factory: Any, config: DataFreeConfig) -> None:
    """Arguments against the signature, the component's own rules about the run, one dry build."""
    name = component.key
    if not check_kwargs(factory, component.kwargs, component.kwargs_path, name):
        return  # the box supplies required arguments itself: its build will tell
    check_config = getattr(factory, 'check_config', None)
    if callable(check_config):
        try:
            check_config(component.kwargs, config)
        except ValueError as error:
            raise refused(component.kwargs_path, name, error) from error
    dry_build(component.kwargs_path, name, lambda: factory(**component.kwargs))


def check_data_free(config: DataFreeConfig) -> None:
    """Checks and dry-builds every component of a parsed data-free config (see the module docstring)."""
    generator = config.generator
    _check_built(generator.model, MODEL_DICT[generator.model.key], config)
    optimizer_block = {'key': generator.optimizer.key, 'kwargs': generator.optimizer.kwargs}
    optimizer = check_optimizer(optimizer_block, generator.optimizer.path)
    if generator.scheduler is not None:
        check_scheduler({'key': generator.scheduler.key, 'kwargs': generator.scheduler.kwargs},
                        generator.scheduler.path, optimizer)
    check_criterion(generator.criterion, 'train.data_free.generator.criterion', 'the generator loss terms')
    if config.replay is not None:
        _check_built(config.replay, REPLAY_DICT[config.replay.key], config)
    _check_built(config.strategy, config.strategy_class, config)


def _check_dataset_id(config: Mapping, section: str, loader: str, datasets: Mapping, why: str) -> None:
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


def _check_loader(block: Any, path: str) -> None:
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
            _check_loader(train[loader], f'train.{loader}')


def validate_config(config: Mapping, training: bool = True) -> DataFreeConfig | None:
    """Checks, before any model is built, what the runner needs: the datasets to evaluate on and the plugin's blocks.

    Args:
        config: the loaded YAML (``!import_call`` already resolved); it is not modified.
        training: False for ``-test_only`` runs, which need only ``test.test_data_loader``.

    Returns:
        The parsed data-free config, or None for a plain torchdistill config (or a test-only run).

    Raises:
        ConfigError: the first problem found, as ``<key path>: <value found and what is allowed>``.
    """
    datasets = mapping(config.get('datasets', {}), 'datasets')
    _check_dataset_id(config, 'test', 'test_data_loader', datasets, 'the real dataset the final model is tested on')
    _check_loader(config['test']['test_data_loader'], 'test.test_data_loader')
    if not training:
        return None
    _check_dataset_id(config, 'train', 'val_data_loader', datasets,
                      'the real dataset evaluated after every epoch to keep the best student')
    data_free = parse_data_free(config.get('train'))
    train = config['train']
    if data_free is None:
        if 'stage1' not in train:  # multi-stage configs name their loaders per stage
            _check_dataset_id(config, 'train', 'train_data_loader', datasets,
                              'a run without train.strategy is plain torchdistill and trains on this real dataset')
            with rng_untouched():
                check_train_block(train, None)
        return None
    with rng_untouched():
        check_data_free(data_free)
        check_train_block(train, data_free)
    return data_free


__all__ = ['Component', 'GeneratorConfig', 'DataFreeConfig', 'parse_data_free', 'check_data_free',
           'validate_config']
