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
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from torchdistill.models.registry import MODEL_DICT

from ..errors import ConfigError
from ..registry import REPLAY_DICT, STRATEGY_DICT
from .checks import (
    Component,
    check_criterion,
    check_keys,
    check_kwargs,
    check_optimizer,
    check_scheduler,
    choice,
    count,
    dry_build,
    mapping,
    parse_component,
    refused,
    require,
    rng_untouched,
)
from .train_block import check_data_free_train_block, check_dataset_id, check_loader, check_train_block

#: The plugin's keys in torchdistill's ``train`` block.
PLUGIN_TRAIN_KEYS: tuple[str, ...] = ('strategy', 'data_free')
#: The key of ``train.data_free`` whose settings go to the strategy that takes the meta step (lrwa).
META_KEY = 'meta'


def _yaml(*keys: str, **metadata: Any) -> dict[str, Any]:
    """A field's metadata: the YAML keys it is read from (default: its own name)."""
    return {'yaml': keys, **metadata}


@dataclass(frozen=True, kw_only=True)
class GeneratorConfig:
    """``train.data_free.generator``: the model, its optimizer (and scheduler), its criterion, its steps."""

    model: Component = field(metadata=_yaml('key', 'kwargs'))
    steps: int = 1
    optimizer: Component
    scheduler: Component | None = None
    criterion: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class DataFreeConfig:
    """``train.strategy`` and ``train.data_free``, parsed (see the module docstring). The fields read from
    ``train.data_free`` and their defaults are stated here, once: the allowed keys and the documentation follow."""

    strategy: Component = field(metadata=_yaml(block='train'))
    num_epochs: int = field(metadata=_yaml(block='train'))
    iterations_per_epoch: int = 50
    batch_size: int = 256
    student_steps: int = 5
    generator: GeneratorConfig
    replay: Component | None = None

    @property
    def strategy_class(self) -> type:
        return STRATEGY_DICT[self.strategy.key]


def yaml_keys(cls: type, block: str | None = None) -> tuple[str, ...]:
    """The YAML keys a dataclass is read from (with ``block``: only its fields of that block)."""
    return tuple(key for f in fields(cls) if f.metadata.get('block') == block
                 for key in f.metadata.get('yaml', (f.name,)))


#: ``train.data_free``'s keys: the dataclass's own and the meta step's settings.
DATA_FREE_KEYS: tuple[str, ...] = (*yaml_keys(DataFreeConfig), META_KEY)
#: ``train.data_free``'s counts and their defaults.
DEFAULT_COUNTS: dict[str, int] = {f.name: f.default for f in fields(DataFreeConfig) if f.type == 'int'
                                  and f.default is not MISSING}


def _strategy(train: Mapping) -> Component:
    """``train.strategy``: ``'key'`` or ``{key, kwargs}``."""
    value = train['strategy']
    if isinstance(value, Mapping):
        return parse_component(value, 'train.strategy', STRATEGY_DICT, 'strategy')
    return Component(choice(value, sorted(STRATEGY_DICT), 'train.strategy', 'strategy'), {}, 'train.strategy',
                     'train.strategy.kwargs')


def _with_settings(strategy: Component, data_free: Mapping) -> Component:
    """The strategy with its settings: from ``train.strategy.kwargs`` or, if it takes the meta step, from
    ``train.data_free.meta``."""
    key, meta, meta_path = strategy.key, data_free.get(META_KEY), f'train.data_free.{META_KEY}'
    if STRATEGY_DICT[key].takes_meta_step:
        if strategy.kwargs:
            raise ConfigError('train.strategy.kwargs', f"strategy '{key}' takes its settings from {meta_path}")
        if meta is None:
            raise ConfigError(meta_path, f"missing: strategy '{key}' takes the meta step's settings here (alpha "
                                         'or alpha_per_lr, backend, order, inner_bn, fd_eps)')
        return Component(key, copy.deepcopy(dict(mapping(meta, meta_path))), 'train.strategy', meta_path)
    if meta is not None:
        takers = sorted(k for k, cls in STRATEGY_DICT.items() if cls.takes_meta_step)
        raise ConfigError(meta_path, f"only strategies that take the meta step read it ({', '.join(takers)}), "
                                     f"not '{key}'; remove it")
    return strategy


def _parse_generator(block: Any, path: str) -> GeneratorConfig:
    if block is None:
        raise ConfigError(path, 'missing (key, kwargs, optimizer and criterion of the generator)')
    extra = tuple(key for key in yaml_keys(GeneratorConfig) if key not in ('key', 'kwargs'))
    model = parse_component(block, path, MODEL_DICT, 'generator', extra_keys=extra,
                            known="expected a model of torchdistill's registry (register_model)")
    optimizer = mapping(require(block, 'optimizer', path, 'e.g. {key: Adam, kwargs: {lr: 0.001}}'),
                        f'{path}.optimizer')
    scheduler = block.get('scheduler')
    criterion = mapping(require(block, 'criterion', path, 'e.g. a WeightedSumLoss of generator losses'),
                        f'{path}.criterion')
    return GeneratorConfig(
        model=model,
        optimizer=_unchecked_component(optimizer, f'{path}.optimizer'),
        scheduler=_unchecked_component(mapping(scheduler, f'{path}.scheduler'), f'{path}.scheduler')
        if scheduler else None,
        criterion=copy.deepcopy(dict(criterion)),
        steps=count(block.get('steps', 1), f'{path}.steps'))


def _unchecked_component(block: Mapping, path: str) -> Component:
    """A torchdistill optimizer or scheduler block, kept as written: :func:`check_data_free` checks it with a dry
    build."""
    return Component(str(block.get('key')), copy.deepcopy(dict(block.get('kwargs') or {})), path, f'{path}.kwargs')


def _parse_replay(block: Any, strategy: type, path: str = 'train.data_free.replay') -> Component | None:
    if not block:
        strategy.check_replay(None, path)
        return None
    replay = parse_component(block, path, REPLAY_DICT, 'replay memory')
    strategy.check_replay(replay.key, path)
    return replay


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
    strategy = _strategy(train)
    num_epochs = count(train.get('num_epochs'), 'train.num_epochs')
    if train.get('data_free') is None:
        raise ConfigError('train.data_free', f"missing: strategy '{strategy.key}' needs the generator, replay and "
                                             'meta settings there')
    data_free = mapping(train['data_free'], 'train.data_free')
    check_keys(data_free, DATA_FREE_KEYS, 'train.data_free')
    counts = {name: count(data_free.get(name, default), f'train.data_free.{name}')
              for name, default in DEFAULT_COUNTS.items()}
    generator = _parse_generator(data_free.get('generator'), 'train.data_free.generator')
    replay = _parse_replay(data_free.get('replay'), STRATEGY_DICT[strategy.key])
    strategy = _with_settings(strategy, data_free)
    check_data_free_train_block(train)
    return DataFreeConfig(strategy=strategy, num_epochs=num_epochs, generator=generator, replay=replay, **counts)


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
                        generator.scheduler.path, optimizer, steps=config.num_epochs)  # stepped once an epoch
    check_criterion(generator.criterion, 'train.data_free.generator.criterion', 'the generator loss terms')
    if config.replay is not None:
        _check_built(config.replay, REPLAY_DICT[config.replay.key], config)
    _check_built(config.strategy, config.strategy_class, config)


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
    check_dataset_id(config, 'test', 'test_data_loader', datasets, 'the real dataset the final model is tested on')
    check_loader(config['test']['test_data_loader'], 'test.test_data_loader')
    if not training:
        return None
    check_dataset_id(config, 'train', 'val_data_loader', datasets,
                      'the real dataset evaluated after every epoch to keep the best student')
    data_free = parse_data_free(config.get('train'))
    train = config['train']
    if data_free is None:
        if 'stage1' not in train:  # multi-stage configs name their loaders per stage
            check_dataset_id(config, 'train', 'train_data_loader', datasets,
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
