"""Refuses a config that cannot work, before anything is trained: one line naming the key, the value, what is allowed.

torchdistill is lenient where data-free distillation cannot afford it: an unknown key is ignored, a mistyped count
only fails deep inside the first iteration, and a typo in a generator argument surfaces as a tensor-shape error.
Two checks run in the set-up phase of the runner (:func:`lrwa_plugin.cli.run`):

* :func:`validate_config`, before any model is built: the plugin's blocks ``train.strategy`` and ``train.data_free``
  (``generator``, ``replay``, ``meta``), and the real datasets the run is evaluated on. Unknown keys get a
  did-you-mean; kwargs are checked against the signature of the class they go to; the generator, its optimizer,
  scheduler and criterion, the replay memory and the strategy are each built once, so that their own argument checks
  speak — on the ``meta`` device when possible (no memory, no tensor initialisation) and never drawing from the
  global random number generator, so a run's results do not depend on whether it was validated.
* :func:`check_models_agree`, once the box is built and before its first step: one forward of a tiny generated batch
  through teacher and student (their class counts must agree).

Both raise :class:`ConfigError`, a ``ValueError`` whose message starts with the key path, e.g.::

    train.data_free.meta.alpha: expected a finite number > 0, got 0
    train.data_free.replay.kwrags: unknown key; did you mean 'kwargs'? (allowed: key, kwargs)
"""
from __future__ import annotations

import contextlib
import difflib
import inspect
import math
import numbers
import re
import types
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torchdistill.common.module_util import check_if_wrapped
from torchdistill.losses.registry import HIGH_LEVEL_LOSS_DICT, get_high_level_loss
from torchdistill.models.registry import MODEL_DICT
from torchdistill.optim.registry import OPTIM_DICT, SCHEDULER_DICT

from .meta import BACKENDS, ORDERS, RetainWhileAcquire
from .registry import REPLAY_DICT, STRATEGY_DICT

__all__ = ['ConfigError', 'validate_config', 'validate_data_free_config', 'check_models_agree', 'first_line',
           'narrow_path']

#: The plugin's keys in torchdistill's ``train`` block.
PLUGIN_TRAIN_KEYS: tuple[str, ...] = ('strategy', 'data_free')
#: Keys the data-free box reads; anything else in these blocks would be silently ignored, so it is refused.
DATA_FREE_KEYS: tuple[str, ...] = ('iterations_per_epoch', 'batch_size', 'student_steps', 'generator', 'replay',
                                   'meta')
DATA_FREE_COUNTS: tuple[str, ...] = ('iterations_per_epoch', 'batch_size', 'student_steps')
GENERATOR_KEYS: tuple[str, ...] = ('key', 'kwargs', 'steps', 'optimizer', 'scheduler', 'criterion')
REPLAY_KEYS: tuple[str, ...] = ('key', 'kwargs')
OPTIMIZER_KEYS: tuple[str, ...] = ('key', 'kwargs')
CRITERION_KEYS: tuple[str, ...] = ('key', 'kwargs')
SUB_TERM_KEYS: tuple[str, ...] = ('criterion', 'criterion_wrapper', 'weight')

_MAX_LISTED = 25
_MAX_SHOWN_CHARS = 80
_MAX_MESSAGE_CHARS = 300


class ConfigError(ValueError):
    """A config value that cannot work. The message is one line: ``<key path>: <what is wrong>``.

    Args:
        path: dotted key path, e.g. ``train.data_free.meta.alpha``.
        message: the value found and what is allowed.
    """

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f'{path}: {message}')
        self.path = path


# ------------------------------------------------------------------------------------------------ helpers
def first_line(error: BaseException, limit: int | None = _MAX_MESSAGE_CHARS) -> str:
    """The first non-empty line of an exception's message, cut at ``limit`` characters (``None``: never).

    A ``KeyError`` reads ``missing key 'x'``.
    """
    if isinstance(error, KeyError) and error.args:
        text = f'missing key {error.args[0]!r}'
    else:
        text = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return text if limit is None or len(text) <= limit else text[:limit - 3] + '...'


def _show(value: Any) -> str:
    text = ' '.join(repr(value).split())
    return text if len(text) <= _MAX_SHOWN_CHARS else text[:_MAX_SHOWN_CHARS - 3] + '...'


def _did_you_mean(word: Any, choices: typing.Iterable[str]) -> str:
    matches = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f' (did you mean {matches[0]!r}?)' if matches else ''


def _listed(choices: typing.Sequence[str]) -> str:
    if len(choices) > _MAX_LISTED:
        return ', '.join(choices[:_MAX_LISTED]) + f', +{len(choices) - _MAX_LISTED} more'
    return ', '.join(choices)


def _mapping(block: Any, path: str) -> Mapping:
    if not isinstance(block, Mapping):
        raise ConfigError(path, f'expected a mapping, got {_show(block)}')
    return block


def _check_keys(block: Mapping, allowed: typing.Sequence[str], path: str) -> None:
    for key in block:
        if key not in allowed:
            raise ConfigError(f'{path}.{key}',
                              f'unknown key{_did_you_mean(key, allowed)}; allowed: {", ".join(allowed)}')


def _require(block: Mapping, key: str, path: str, what: str) -> Any:
    if block.get(key) is None:
        raise ConfigError(f'{path}.{key}', f'missing ({what})')
    return block[key]


def _positive_int(value: Any, path: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(path, f'expected a positive integer, got {_show(value)}')


def _finite_number(value: Any, path: str, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or (positive and value <= 0):
        raise ConfigError(path, f'expected a finite number{" > 0" if positive else ""}, got {_show(value)}')


def _choice(value: Any, choices: typing.Sequence[str], path: str, what: str,
            known: str = 'expected one of') -> None:
    if isinstance(value, str) and value in choices:
        return
    raise ConfigError(path, f'unknown {what} {_show(value)}{_did_you_mean(value, choices)}; '
                            f'{known}: {_listed(choices) or "none"}')


def _without_prefix(text: str, *prefixes: str) -> str:
    """Drops a leading ``<prefix>:`` or ``<prefix> `` that would repeat what the message already says."""
    for prefix in prefixes:
        for separator in (': ', ' '):
            if text.startswith(prefix + separator):
                return text[len(prefix) + len(separator):]
    return text


def _kwargs(block: Mapping, path: str) -> Mapping:
    kwargs = block.get('kwargs')
    if kwargs is None:
        return {}
    return _mapping(kwargs, f'{path}.kwargs')


@contextlib.contextmanager
def _rng_untouched() -> Iterator[None]:
    # Building a module initialises its weights from the global generator: a dry build must not shift the run's draws.
    with torch.random.fork_rng(devices=[]):
        yield


def narrow_path(path: str, kwargs: Mapping, error: BaseException) -> str:
    """Narrows ``path`` to ``path.<arg>`` when the error names exactly one of the given arguments."""
    text = str(error)
    named = [key for key in kwargs if re.search(rf'\b{re.escape(str(key))}\b', text)]
    return f'{path}.{named[0]}' if len(named) == 1 else path


# ---------------------------------------------------------------------------------- signatures and builds
_TYPE_NAMES: dict[Any, str] = {int: 'an integer', float: 'a number', str: 'a string', bool: 'true or false',
                               type(None): 'null'}
_TYPE_CHECKS: dict[Any, Callable[[Any], bool]] = {
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isnan(v),
    str: lambda v: isinstance(v, str),
    bool: lambda v: isinstance(v, bool),
    type(None): lambda v: v is None,
}


def _parameters(factory: Callable[..., Any]) -> inspect.Signature | None:
    for eval_str in (True, False):
        try:
            return inspect.signature(factory, eval_str=eval_str)
        except Exception:  # unresolvable annotations or no signature: try without, else skip the check
            continue
    return None


def _fits(value: Any, annotation: Any) -> bool | None:
    """Whether ``value`` fits a simple annotation (int, float, str, bool, None and their unions); None if unknown."""
    members = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    if not all(member in _TYPE_CHECKS for member in members):
        return None
    return any(_TYPE_CHECKS[member](value) for member in members)


def _check_kwargs(factory: Callable[..., Any], kwargs: Mapping, path: str, name: str) -> bool:
    """Checks names (did-you-mean) and simple annotated types; returns whether ``factory(**kwargs)`` binds."""
    signature = _parameters(factory)
    if signature is None:
        return True
    params = {key: p for key, p in signature.parameters.items()
              if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    for key, value in kwargs.items():
        if key not in params:
            if takes_any:
                continue
            raise ConfigError(f'{path}.{key}', f'{name} does not accept it{_did_you_mean(key, params)}; '
                                               f'accepted: {", ".join(params) or "none"}')
        annotation = params[key].annotation
        if annotation is not inspect.Parameter.empty and _fits(value, annotation) is False:
            members = typing.get_args(annotation) or (annotation,)
            expected = ' or '.join(_TYPE_NAMES[m] for m in members)
            raise ConfigError(f'{path}.{key}', f'{name} expects {expected}, got {_show(value)}')
    try:
        signature.bind(**kwargs)
    except TypeError:
        return False  # required arguments the box supplies itself: the box's own build will tell
    return True


def _build(path: str, name: str, build: Callable[[], Any], kwargs: Mapping) -> Any:
    """Builds a component to let its own argument checks speak; returns it, or raises a ConfigError at ``path``.

    The build is tried on the meta device first (nothing allocated or initialised); meta tensors refuse some
    legitimate code (``.item()``), so a failure there is confirmed by a real build before it is reported.
    """
    with contextlib.suppress(Exception), _rng_untouched(), torch.device('meta'):
        return build()
    try:
        with _rng_untouched():
            return build()
    except (ValueError, TypeError, RuntimeError, KeyError, AssertionError) as error:
        raise ConfigError(narrow_path(path, kwargs, error),
                          f'{name} refused it: {_without_prefix(first_line(error), name)}') from error


# ------------------------------------------------------------------------------------------------ blocks
def _check_generator(generator: Any, path: str) -> None:
    if generator is None:
        raise ConfigError(path, 'missing (key, kwargs, optimizer and criterion of the generator)')
    generator = _mapping(generator, path)
    _check_keys(generator, GENERATOR_KEYS, path)
    key = _require(generator, 'key', path, "the generator's model key")
    _choice(key, sorted(MODEL_DICT), f'{path}.key', 'generator',
            known="expected a model of torchdistill's registry (register_model)")
    if 'steps' in generator:
        _positive_int(generator['steps'], f'{path}.steps')
    kwargs = _kwargs(generator, path)
    if _check_kwargs(MODEL_DICT[key], kwargs, f'{path}.kwargs', key):
        _build(f'{path}.kwargs', key, lambda: MODEL_DICT[key](**kwargs), kwargs)
    optimizer = _check_optimizer(_require(generator, 'optimizer', path, 'e.g. {key: Adam, kwargs: {lr: 0.001}}'),
                                 f'{path}.optimizer')
    if generator.get('scheduler'):
        _check_scheduler(generator['scheduler'], f'{path}.scheduler', optimizer)
    _check_criterion(_require(generator, 'criterion', path, 'e.g. a WeightedSumLoss of generator losses'),
                     f'{path}.criterion')


def _check_optimizer(block: Any, path: str) -> torch.optim.Optimizer:
    block = _mapping(block, path)
    _check_keys(block, OPTIMIZER_KEYS, path)
    key = block.get('key')
    _choice(key, sorted(OPTIM_DICT), f'{path}.key', 'optimizer')
    kwargs = _mapping(_require(block, 'kwargs', path, 'a mapping; {} for none'), f'{path}.kwargs')
    # Optimizers do not care which parameters they get: one dummy CPU parameter lets the argument checks run.
    return _build(f'{path}.kwargs', key, lambda: OPTIM_DICT[key]([nn.Parameter(torch.zeros(1))], **kwargs), kwargs)


def _check_scheduler(block: Any, path: str, optimizer: torch.optim.Optimizer) -> None:
    block = _mapping(block, path)
    _check_keys(block, OPTIMIZER_KEYS, path)
    key = block.get('key')
    _choice(key, sorted(SCHEDULER_DICT), f'{path}.key', 'scheduler')
    kwargs = _mapping(_require(block, 'kwargs', path, 'a mapping; {} for none'), f'{path}.kwargs')

    def build() -> None:
        # Some schedulers read their arguments only when stepping: step the dummy one once.
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            SCHEDULER_DICT[key](optimizer, **kwargs).step()

    _build(f'{path}.kwargs', key, build, kwargs)


def _named_init_parameters(cls: type) -> list[str]:
    """Named ``__init__`` arguments over the class hierarchy (torchdistill's losses pass ``**kwargs`` up and drop
    whatever nobody names, so a misspelt ``sub_terms`` would silently give a loss of 0)."""
    names: list[str] = []
    for klass in cls.__mro__:
        if klass in (nn.Module, object) or '__init__' not in vars(klass):
            continue
        signature = _parameters(klass.__init__)
        for name, parameter in ({} if signature is None else signature.parameters).items():
            if name != 'self' and parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                     inspect.Parameter.KEYWORD_ONLY) and name not in names:
                names.append(name)
    return names


def _check_criterion(block: Any, path: str) -> None:
    block = _mapping(block, path)
    _check_keys(block, CRITERION_KEYS, path)
    key = block.get('key')
    _choice(key, sorted(HIGH_LEVEL_LOSS_DICT), f'{path}.key', 'high-level loss')
    kwargs = _kwargs(block, path)
    accepted = _named_init_parameters(HIGH_LEVEL_LOSS_DICT[key])
    _check_keys(kwargs, accepted, f'{path}.kwargs')
    if 'sub_terms' in accepted:
        sub_terms = _mapping(_require(kwargs, 'sub_terms', f'{path}.kwargs', 'the loss terms of the generator'),
                             f'{path}.kwargs.sub_terms')
        if not sub_terms:
            raise ConfigError(f'{path}.kwargs.sub_terms', 'empty: the generator needs at least one loss term')
        for name, term in sub_terms.items():
            term_path = f'{path}.kwargs.sub_terms.{name}'
            term = _mapping(term, term_path)
            _check_keys(term, SUB_TERM_KEYS, term_path)
            _finite_number(_require(term, 'weight', term_path, 'the factor of this term'), f'{term_path}.weight')
            _mapping(_require(term, 'criterion', term_path, '{key: ..., kwargs: {...}}'), f'{term_path}.criterion')
    try:
        with _rng_untouched():
            get_high_level_loss(block)
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise ConfigError(path, first_line(error)) from error


def _needs_replay(strategy_cls: type) -> bool:
    kinds = getattr(strategy_cls, 'replay_kinds', None)
    return bool(kinds) if kinds is not None else bool(getattr(strategy_cls, 'uses_replay', True))


def _kind_name(kind: Any) -> str:
    return kind if isinstance(kind, str) else getattr(kind, '__name__', str(kind))


def _accepts(kinds: typing.Iterable[Any], key: str) -> bool:
    cls = REPLAY_DICT[key]
    return any(kind == key or kind is cls or isinstance(kind, type) and isinstance(cls, type) and issubclass(cls, kind)
               for kind in kinds)


def _check_replay(strategy: str, strategy_cls: type, replay: Any, path: str) -> None:
    kinds = getattr(strategy_cls, 'replay_kinds', None)
    if not _needs_replay(strategy_cls):
        if replay:
            replaying = sorted(key for key, cls in STRATEGY_DICT.items() if _needs_replay(cls))
            raise ConfigError(path, f"strategy '{strategy}' uses no replay memory: remove this block, or choose a "
                                    f"strategy that replays ({', '.join(replaying)})")
        return
    known = [_kind_name(kind) for kind in kinds] if kinds else sorted(REPLAY_DICT)
    if not replay:
        raise ConfigError(path, f"missing: strategy '{strategy}' replays from a memory (key one of: "
                                f"{', '.join(known)})")
    replay = _mapping(replay, path)
    _check_keys(replay, REPLAY_KEYS, path)
    key = replay.get('key')
    _choice(key, sorted(REPLAY_DICT), f'{path}.key', 'replay memory')
    if kinds and not _accepts(kinds, key):
        raise ConfigError(f'{path}.key', f"strategy '{strategy}' replays from {', '.join(known)}, not {key!r}")
    kwargs = _kwargs(replay, path)
    if _check_kwargs(REPLAY_DICT[key], kwargs, f'{path}.kwargs', key):
        _build(f'{path}.kwargs', key, lambda: REPLAY_DICT[key](**kwargs), kwargs)


def _check_meta(strategy: str, strategy_cls: type, meta: Any, path: str) -> None:
    signature = _parameters(RetainWhileAcquire)
    params = [] if signature is None else list(signature.parameters)
    if meta is not None:
        meta = _mapping(meta, path)
        _check_keys(meta, params, path)
        if 'alpha' in meta:
            _finite_number(meta['alpha'], f'{path}.alpha', positive=True)
        if 'backend' in meta:
            _choice(meta['backend'], BACKENDS, f'{path}.backend', 'backend')
        if 'order' in meta:
            _choice(meta['order'], ORDERS, f'{path}.order', 'order')
        _check_kwargs(RetainWhileAcquire, meta, path, 'meta')
    try:
        with _rng_untouched():
            strategy_cls(**({} if meta is None else {'meta': meta}))
    except (ValueError, TypeError) as error:
        if meta is None:
            raise ConfigError(path, f"missing: strategy '{strategy}' needs it ({', '.join(params)}): "
                                    f'{first_line(error)}') from error
        raise ConfigError(narrow_path(path, meta, error), _without_prefix(first_line(error), path)) from error


def _check_dataset_id(config: Mapping, section: str, loader: str, datasets: Mapping, why: str) -> None:
    block = config.get(section)
    if not isinstance(block, Mapping) or not isinstance(block.get(loader), Mapping):
        raise ConfigError(f'{section}.{loader}', f'missing: {why} ({{dataset_id: ..., kwargs: {{batch_size: ...}}}})')
    dataset_id = block[loader].get('dataset_id')
    if not isinstance(dataset_id, str) or dataset_id not in datasets:
        known = ', '.join(map(str, datasets)) or 'none'
        raise ConfigError(f'{section}.{loader}.dataset_id',
                          f'{_show(dataset_id)} is not a key of datasets{_did_you_mean(dataset_id, datasets)}; '
                          f'known: {known}; needed: {why}')


# ------------------------------------------------------------------------------------------- entry points
def validate_data_free_config(config: Mapping) -> None:
    """Checks ``train.strategy`` and ``train.data_free`` (a no-op for a config without either).

    Raises:
        ConfigError: the first problem found, as ``<key path>: <value found and what is allowed>``.
    """
    train = config.get('train')
    if not isinstance(train, Mapping):
        return
    if 'strategy' not in train:
        # torchdistill ignores unknown keys in `train`; a misspelt plugin key would silently turn the run into plain
        # (supervised) torchdistill, so a near miss of one is refused.
        for key in train:
            near = difflib.get_close_matches(str(key), PLUGIN_TRAIN_KEYS, n=1, cutoff=0.75)
            if key not in PLUGIN_TRAIN_KEYS and near:
                raise ConfigError(f'train.{key}', f'unknown key{_did_you_mean(key, PLUGIN_TRAIN_KEYS)}; without '
                                                  'train.strategy the run is plain torchdistill')
        if 'data_free' in train:
            raise ConfigError('train.data_free', f'set, but train.strategy is missing (one of: '
                                                 f'{", ".join(sorted(STRATEGY_DICT))}); without it the run is plain '
                                                 'torchdistill and would ignore this block')
        return
    strategy = train['strategy']
    _choice(strategy, sorted(STRATEGY_DICT), 'train.strategy', 'strategy')
    strategy_cls = STRATEGY_DICT[strategy]
    _positive_int(train.get('num_epochs'), 'train.num_epochs')
    if train.get('data_free') is None:
        raise ConfigError('train.data_free', f"missing: strategy '{strategy}' needs the generator, replay and meta "
                                             'settings there')
    data_free = _mapping(train['data_free'], 'train.data_free')
    _check_keys(data_free, DATA_FREE_KEYS, 'train.data_free')
    for key in DATA_FREE_COUNTS:
        if key in data_free:
            _positive_int(data_free[key], f'train.data_free.{key}')
    _check_generator(data_free.get('generator'), 'train.data_free.generator')
    _check_replay(strategy, strategy_cls, data_free.get('replay'), 'train.data_free.replay')
    _check_meta(strategy, strategy_cls, data_free.get('meta'), 'train.data_free.meta')


def validate_config(config: Mapping, training: bool = True) -> None:
    """Checks, before any model is built, what the runner needs: the datasets to evaluate on and the plugin's blocks.

    Args:
        config: the loaded YAML (``!import_call`` already resolved).
        training: False for ``-test_only`` runs, which need only ``test.test_data_loader``.

    Raises:
        ConfigError: the first problem found, as ``<key path>: <value found and what is allowed>``.
    """
    datasets = _mapping(config.get('datasets', {}), 'datasets')
    _check_dataset_id(config, 'test', 'test_data_loader', datasets, 'the real dataset the final model is tested on')
    if not training:
        return
    _check_dataset_id(config, 'train', 'val_data_loader', datasets,
                      'the real dataset evaluated after every epoch to keep the best student')
    validate_data_free_config(config)
    train = config['train']
    if 'strategy' not in train and 'stage1' not in train:  # multi-stage configs name their loaders per stage
        _check_dataset_id(config, 'train', 'train_data_loader', datasets,
                          'a run without train.strategy is plain torchdistill and trains on this real dataset')


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.module if check_if_wrapped(model) else model


def _forward(model: nn.Module, x: Tensor, path: str, what: str) -> Any:
    try:
        return model(x)
    except (RuntimeError, ValueError, TypeError) as error:
        raise ConfigError(path, f'a generated batch of shape {tuple(x.shape)} cannot go through the {what}: '
                                f'{first_line(error)}') from error


def check_models_agree(box: Any, models_config: Mapping, student_key: str = 'student_model') -> None:
    """One forward of two generated samples through teacher and student: their class counts must agree.

    Runs in eval mode under ``no_grad`` with the global random generator restored afterwards, so no BatchNorm
    statistics move and the run draws exactly what it would without the check.

    Args:
        box: a built :class:`lrwa_plugin.box.DataFreeDistillationBox`.
        models_config: the ``models`` block (to name the student's ``num_classes`` in the message).
        student_key: ``'student_model'``.

    Raises:
        ConfigError: the generated batch does not go through a model, or the class counts differ.
    """
    generator = _unwrapped(box.generator)
    teacher, student = _unwrapped(box.teacher_model), _unwrapped(box.student_model)
    modes = [(module, module.training) for module in (generator, teacher, student)]
    try:
        with _rng_untouched(), torch.no_grad():
            for module, _ in modes:
                module.eval()
            try:
                x = generator(generator.sample_latent(2, device=box.device))
            except (RuntimeError, ValueError, TypeError) as error:
                raise ConfigError('train.data_free.generator.kwargs',
                                  f'the generator cannot produce a batch: {first_line(error)}') from error
            teacher_out = _forward(teacher, x, 'train.data_free.generator', 'teacher')
            student_out = _forward(student, x, f'models.{student_key}', 'student')
    finally:
        for module, mode in modes:
            module.train(mode)
    if not (isinstance(teacher_out, Tensor) and isinstance(student_out, Tensor)
            and teacher_out.dim() == 2 and student_out.dim() == 2):
        return  # not plain logits (e.g. a dict of outputs): nothing to compare
    if teacher_out.shape[1] != student_out.shape[1]:
        student_kwargs = models_config.get(student_key, {}).get('kwargs') or {}
        path = f'models.{student_key}' + ('.kwargs.num_classes' if 'num_classes' in student_kwargs else '')
        raise ConfigError(path, f'the student predicts {student_out.shape[1]} classes but the teacher '
                                f'(models.teacher_model) {teacher_out.shape[1]}; they must agree')
