"""The plugin's own registries, in torchdistill's ``register_*`` / ``get_*`` style.

torchdistill already has registries for models, losses, optimizers and datasets, and the plugin uses those for its
generators, networks and losses. What torchdistill lacks is a place for *strategies* (how the student gradient is
formed) and *replay memories*; they live here. Unknown keys raise a ``ValueError`` that lists the known ones.
Registering a class sets its ``key`` attribute to the registered key, so a component states its key once.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

STRATEGY_DICT: dict[str, Callable[..., Any]] = {}
REPLAY_DICT: dict[str, Callable[..., Any]] = {}


def _register(registry: dict[str, Callable[..., Any]], arg: Any = None, key: str | None = None):
    def _do(cls_or_func: Callable[..., Any]) -> Callable[..., Any]:
        name = key or cls_or_func.__name__
        registry[name] = cls_or_func
        if isinstance(cls_or_func, type):
            cls_or_func.key = name
        return cls_or_func

    if callable(arg):
        return _do(arg)
    return _do


def _get(registry: dict[str, Callable[..., Any]], kind: str, key: str) -> Callable[..., Any]:
    if key not in registry:
        known = ', '.join(sorted(registry))
        raise ValueError(f'unknown {kind} `{key}`; expected one of: {known}')
    return registry[key]


def register_strategy(arg: Any = None, *, key: str | None = None):
    """Registers a student-gradient strategy (``train.strategy`` in YAML).

    >>> @register_strategy(key='my_strategy')
    ... class MyStrategy(Strategy): ...
    >>> MyStrategy.key
    'my_strategy'
    """
    return _register(STRATEGY_DICT, arg, key)


def register_replay(arg: Any = None, *, key: str | None = None):
    """Registers a replay memory (``train.data_free.replay.key`` in YAML)."""
    return _register(REPLAY_DICT, arg, key)


def get_strategy(key: str, **kwargs: Any) -> Any:
    """Builds the strategy registered as ``key`` with ``kwargs``."""
    return _get(STRATEGY_DICT, 'strategy', key)(**kwargs)


def get_replay(key: str, **kwargs: Any) -> Any:
    """Builds the replay memory registered as ``key`` with ``kwargs``."""
    return _get(REPLAY_DICT, 'replay memory', key)(**kwargs)
