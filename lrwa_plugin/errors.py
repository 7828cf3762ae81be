"""The plugin's own errors: what the runner turns into one line and an exit status; anything else keeps its traceback.

=====================  ===========  ==============================================================================
error                  exit status  when
=====================  ===========  ==============================================================================
:class:`ConfigError`   2            a config value, flag or file that cannot work, found before anything is trained
:class:`NonFiniteLossError` 3       a loss or gradient became NaN or infinite; training stops before the optimizer
                                    applies it and nothing is saved over the last checkpoint
=====================  ===========  ==============================================================================
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A config value, flag or file that cannot work. The message is one line: ``<key path or flag>: <what is wrong>``.

    Args:
        path: dotted key path (``train.data_free.meta.alpha``) or flag (``--resume``).
        message: the value found and what is allowed.
    """

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f'{path}: {message}')
        self.path = path


class NonFiniteLossError(RuntimeError):
    """A loss or gradient became NaN or infinite: training stops before the optimizer applies it.

    The message is one line naming the step (epoch, iteration, generator or student step) and the loss values; the
    runner prints it and exits with status 3, and nothing is saved over the last checkpoint.
    """
