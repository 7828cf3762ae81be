"""The checking idiom: a value that cannot work is one :class:`~lrwa_plugin.errors.ConfigError` naming its key path,
the value and what is allowed.

torchdistill is lenient where data-free distillation cannot afford it: an unknown key is ignored, a mistyped count
only fails deep inside the first iteration, and a typo in a generator argument surfaces as a tensor-shape error. This
module knows nothing of the plugin's blocks (:mod:`lrwa_plugin.config.data_free` says what they are); it is the one way
everything checks, the YAML layer and the components alike. A component checks its own arguments with the argument's
name as the path (``count(capacity, 'capacity')``); the layer that built it from ``{key, kwargs}`` moves the error
below its block (:meth:`ConfigError.under`), so the key path travels with the error and is never read back from a
message. Components are built once before training (:func:`dry_build`: on the ``meta`` device when possible, never
drawing from the global random generator, so a run's results do not depend on whether it was validated).

.. code-block:: text

    train.data_free.meta.alpha: expected a finite number > 0, got 0
    train.data_free.replay.kwrags: unknown key (did you mean 'kwargs'?); allowed: key, kwargs
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import math
import numbers
import re
import types
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torchdistill.losses.registry import (
    HIGH_LEVEL_LOSS_DICT,
    LOSS_DICT,
    LOSS_WRAPPER_DICT,
    LOW_LEVEL_LOSS_DICT,
    MIDDLE_LEVEL_LOSS_DICT,
    get_high_level_loss,
)
from torchdistill.optim.registry import OPTIM_DICT, SCHEDULER_DICT

from ..errors import ConfigError
from ..util import did_you_mean, first_line, listed, show

__all__ = ['ConfigError', 'Component', 'parse_component', 'check_component', 'mapping', 'check_keys', 'require',
           'count', 'finite', 'choice', 'check_kwargs', 'dry_build', 'refused', 'rng_untouched', 'check_optimizer',
           'check_scheduler', 'check_criterion']

COMPONENT_KEYS: tuple[str, ...] = ('key', 'kwargs')
SUB_TERM_KEYS: tuple[str, ...] = ('criterion', 'criterion_wrapper', 'weight')


# ---------------------------------------------------------------------------------------------------- structure
def mapping(block: Any, path: str) -> Mapping:
    if not isinstance(block, Mapping):
        raise ConfigError(path, f'expected a mapping, got {show(block)}')
    return block


def check_keys(block: Mapping, allowed: Sequence[str], path: str) -> None:
    for key in block:
        if key not in allowed:
            raise ConfigError(f'{path}.{key}',
                              f'unknown key{did_you_mean(key, allowed)}; allowed: {", ".join(allowed)}')


def require(block: Mapping, key: str, path: str, what: str) -> Any:
    if block.get(key) is None:
        raise ConfigError(f'{path}.{key}', f'missing ({what})')
    return block[key]


def count(value: Any, path: str, minimum: int = 1) -> int:
    """``value`` if it is an integer ``>= minimum`` (booleans are not)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = 'a positive integer' if minimum == 1 else f'an integer >= {minimum}'
        raise ConfigError(path, f'expected {what}, got {show(value)}{_number_hint(value)}')
    return value


def finite(value: Any, path: str, low: float | None = None, high: float | None = None, low_open: bool = True,
           high_open: bool = True, positive: bool = False) -> float:
    """``float(value)`` if it is a finite number within the bounds given (open by default; ``positive``: > 0)."""
    if positive:
        low, low_open = 0.0, True
    inside = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value) \
        and (low is None or (value > low if low_open else value >= low)) \
        and (high is None or (value < high if high_open else value <= high))
    if not inside:
        bounds = [f'{">" if low_open else ">="} {low:g}'] if low is not None else []
        bounds += [f'{"<" if high_open else "<="} {high:g}'] if high is not None else []
        where = f' {" and ".join(bounds)}' if bounds else ''
        raise ConfigError(path, f'expected a finite number{where}, got {show(value)}{_number_hint(value)}')
    return float(value)


_YAML11_NUMBER = re.compile(r'^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$')


def _number_hint(value: Any) -> str:
    """PyYAML reads ``1e-3`` as a string (YAML 1.1 wants ``1.0e-3``): say so when that is what happened."""
    if isinstance(value, str) and _YAML11_NUMBER.match(value.strip()):
        mantissa, exponent = re.split('[eE]', value.strip())
        fixed = (mantissa if '.' in mantissa else f'{mantissa}.0') + 'e' + exponent
        return f' (a string: YAML reads {value} as text; write {fixed})'
    return ''


def choice(value: Any, choices: Sequence[str], path: str, what: str | None = None,
           known: str = 'expected one of') -> str:
    """``value`` if it is one of ``choices``; ``what`` names it in the message (default: the last key of ``path``)."""
    what = path.rpartition('.')[2] if what is None else what
    if isinstance(value, str) and value in choices:
        return value
    raise ConfigError(path, f'unknown {what} {show(value)}{did_you_mean(value, choices)}; '
                            f'{known}: {listed(choices) or "none"}')


@contextlib.contextmanager
def rng_untouched() -> Iterator[None]:
    # Building a module initialises its weights from the global generator: a dry build must not shift the run's draws.
    with torch.random.fork_rng(devices=[]):
        yield


# ---------------------------------------------------------------------------------------- signatures and builds
_TYPE_NAMES: dict[Any, str] = {int: 'an integer', float: 'a number', str: 'a string', bool: 'true or false',
                               type(None): 'null'}
_TYPE_CHECKS: dict[Any, Callable[[Any], bool]] = {
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isnan(v),
    str: lambda v: isinstance(v, str),
    bool: lambda v: isinstance(v, bool),
    type(None): lambda v: v is None,
}


def signature_of(factory: Callable[..., Any]) -> inspect.Signature | None:
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


def check_kwargs(factory: Callable[..., Any], kwargs: Mapping, path: str, name: str) -> bool:
    """Checks names (did-you-mean) and simple annotated types; returns whether ``factory(**kwargs)`` binds."""
    signature = signature_of(factory)
    if signature is None:
        return True
    params = {key: p for key, p in signature.parameters.items()
              if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    for key, value in kwargs.items():
        if key not in params:
            if takes_any:
                continue
            raise ConfigError(f'{path}.{key}', f'{name} does not accept it{did_you_mean(key, params)}; '
                                               f'accepted: {", ".join(params) or "none"}')
        if _number_hint(value):  # nobody means the string '1e-3'
            raise ConfigError(f'{path}.{key}', f'expected a number, got {show(value)}{_number_hint(value)}')
        annotation = params[key].annotation
        if annotation is not inspect.Parameter.empty and _fits(value, annotation) is False:
            members = typing.get_args(annotation) or (annotation,)
            expected = ' or '.join(_TYPE_NAMES[m] for m in members)
            raise ConfigError(f'{path}.{key}', f'{name} expects {expected}, got {show(value)}{_number_hint(value)}')
    try:
        signature.bind(**kwargs)
    except TypeError:
        return False  # required arguments the box supplies itself: the box's own build will tell
    return True


def dry_build(path: str, name: str, build: Callable[[], Any]) -> Any:
    """Builds a component to let its own argument checks speak; returns it, or raises a ConfigError at ``path``.

    The build is tried on the meta device first (nothing allocated or initialised); meta tensors refuse some
    legitimate code (``.item()``), so a failure there is confirmed by a real build before it is reported; see
    :func:`refused` for the key path it is reported at.
    """
    with contextlib.suppress(Exception), rng_untouched(), torch.device('meta'):
        return build()
    try:
        with rng_untouched():
            return build()
    except (ValueError, TypeError, RuntimeError, KeyError, AssertionError, ZeroDivisionError) as error:
        raise refused(path, name, error) from error


def refused(path: str, name: str, error: BaseException) -> ConfigError:
    """The :class:`ConfigError` for a component ``name`` built from the kwargs at ``path`` that refused them: its own
    :class:`ConfigError` (whose path names the argument) moved below ``path``; any other error at ``path``."""
    if isinstance(error, ConfigError):
        return error.under(path)
    return ConfigError(path, f'{name} refused it: {first_line(error)}')


@dataclass(frozen=True)
class Component:
    """A ``{key, kwargs}`` block: what to build, and where the YAML says so (for messages)."""

    key: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    path: str = ''
    kwargs_path: str = ''


def parse_component(block: Any, path: str, registry: Mapping[str, Callable[..., Any]], what: str,
                    known: str = 'expected one of', extra_keys: Sequence[str] = ()) -> Component:
    """The one reader of a ``{key, kwargs}`` block naming a registered component (``extra_keys``: what else the
    block may hold, e.g. a generator's ``optimizer``): known keys, a registered key, kwargs a mapping (copied)."""
    block = mapping(block, path)
    check_keys(block, (*COMPONENT_KEYS, *extra_keys), path)
    key = choice(require(block, 'key', path, f'the {what} key'), sorted(registry), f'{path}.key', what, known)
    kwargs = mapping(block.get('kwargs') or {}, f'{path}.kwargs')
    return Component(key, copy.deepcopy(dict(kwargs)), path, f'{path}.kwargs')


def check_component(block: Any, path: str, registry: Mapping[str, Callable[..., Any]], what: str,
                    known: str = 'expected one of') -> Component:
    """:func:`parse_component`, its kwargs checked by name and type against the registered factory (not built)."""
    component = parse_component(block, path, registry, what, known)
    check_kwargs(registry[component.key], component.kwargs, component.kwargs_path, component.key)
    return component


# ------------------------------------------------------------------------------------- torchdistill components
def _key_kwargs(component: Component) -> tuple[str, dict[str, Any]]:
    return component.key, component.kwargs


def check_optimizer(block: Any, path: str, parameters: Sequence[nn.Parameter] | None = None) -> torch.optim.Optimizer:
    """``{key, kwargs}`` of an optimizer; built on a dummy parameter so that its argument checks run."""
    block = mapping(block, path)
    key, kwargs = _key_kwargs(check_component(block, path, OPTIM_DICT, 'optimizer'))
    require(block, 'kwargs', path, 'a mapping; {} for none')
    params = list(parameters) if parameters is not None else [nn.Parameter(torch.zeros(1))]
    return dry_build(f'{path}.kwargs', key, lambda: OPTIM_DICT[key](params, **kwargs))


def check_scheduler(block: Any, path: str, optimizer: torch.optim.Optimizer, steps: int = 1) -> None:
    """``{key, kwargs}`` of a scheduler; stepped ``steps`` times on a dummy optimizer, as the run will step it (some
    schedulers read their arguments only when stepping), and refused if the learning rate it schedules ever becomes
    negative: that would be gradient ascent, which trains to nothing."""
    block = mapping(block, path)
    key, kwargs = _key_kwargs(check_component(block, path, SCHEDULER_DICT, 'scheduler'))
    require(block, 'kwargs', path, 'a mapping; {} for none')

    def lowest_lr() -> float:
        return min(float(group['lr']) for group in optimizer.param_groups)

    def build() -> tuple[float, int]:
        lowest = (lowest_lr(), 0)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            scheduler = SCHEDULER_DICT[key](optimizer, **kwargs)
            for step in range(1, steps + 1):
                scheduler.step(*([1.0] if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) else []))
                lowest = min(lowest, (lowest_lr(), step))
        return lowest

    lr, step = dry_build(f'{path}.kwargs', key, build)
    if lr < 0:
        raise ConfigError(path, f'the learning rate it schedules becomes negative ({lr:g} after {step} of the run\'s '
                                f'{steps} scheduler steps): that is gradient ascent; keep it >= 0')


def _named_init_parameters(cls: type) -> list[str]:
    """Named ``__init__`` arguments over the class hierarchy (torchdistill's losses pass ``**kwargs`` up and drop
    whatever nobody names, so a misspelt ``sub_terms`` would silently give a loss of 0)."""
    names: list[str] = []
    for klass in cls.__mro__:
        if klass in (nn.Module, object) or '__init__' not in vars(klass):
            continue
        signature = signature_of(klass.__init__)
        for name, parameter in ({} if signature is None else signature.parameters).items():
            if name != 'self' and parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                     inspect.Parameter.KEYWORD_ONLY) and name not in names:
                names.append(name)
    return names


def check_criterion(block: Any, path: str, what: str = 'the loss terms') -> None:
    """A torchdistill high-level loss (e.g. ``WeightedSumLoss`` with its ``sub_terms``), built once."""
    block = mapping(block, path)
    check_keys(block, ('key', 'kwargs', 'func2extract_model_loss'), path)
    key = choice(block.get('key'), sorted(HIGH_LEVEL_LOSS_DICT), f'{path}.key', 'high-level loss')
    kwargs = block.get('kwargs')
    kwargs = {} if kwargs is None else mapping(kwargs, f'{path}.kwargs')
    accepted = _named_init_parameters(HIGH_LEVEL_LOSS_DICT[key])
    check_keys(kwargs, accepted, f'{path}.kwargs')
    if 'sub_terms' in accepted:
        sub_terms = mapping(require(kwargs, 'sub_terms', f'{path}.kwargs', what), f'{path}.kwargs.sub_terms')
        if not sub_terms:
            raise ConfigError(f'{path}.kwargs.sub_terms', f'empty: {what} need at least one term')
        for name, term in sub_terms.items():
            _check_sub_term(term, f'{path}.kwargs.sub_terms.{name}')
    try:
        with rng_untouched():
            get_high_level_loss(block)
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise ConfigError(path, first_line(error)) from error


def _check_sub_term(term: Any, path: str) -> None:
    term = mapping(term, path)
    check_keys(term, SUB_TERM_KEYS, path)
    weight = finite(require(term, 'weight', path, 'the factor of this term'), f'{path}.weight')
    if weight < 0:  # a range that is knowable: a negative weight trains towards the opposite of the term
        raise ConfigError(f'{path}.weight', f'{weight:g} is negative: it would turn this term into its opposite '
                                            '(the adversarial term is already negated by AdversarialLoss); use a '
                                            'weight >= 0 (0 switches the term off)')
    criterion = mapping(require(term, 'criterion', path, '{key: ..., kwargs: {...}}'), f'{path}.criterion')
    # torchdistill looks a term up in its middle-level registry, then in torch.nn's losses and its low-level one.
    losses = {**LOW_LEVEL_LOSS_DICT, **LOSS_DICT, **MIDDLE_LEVEL_LOSS_DICT}
    check_component(criterion, f'{path}.criterion', losses, 'loss',
                    known="expected a loss of torchdistill's registries (register_mid_level_loss, or torch.nn's)")
    wrapper = term.get('criterion_wrapper')
    if wrapper is not None:
        wrapper = mapping(wrapper, f'{path}.criterion_wrapper')
        choice(wrapper.get('key'), sorted(LOSS_WRAPPER_DICT), f'{path}.criterion_wrapper.key', 'loss wrapper')
