"""The plugin's own errors: the failures the runner reports as one ``error:`` line and an exit status (2 for a config
that cannot work, 3 for a non-finite loss), where anything else keeps its traceback. They take no YAML of their own:
a :class:`ConfigError` names the YAML key path (or flag) that is wrong.
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
        self.detail = message

    def under(self, prefix: str) -> ConfigError:
        """The same error one level up: a component's argument ``alpha`` becomes ``train.data_free.meta.alpha``."""
        return ConfigError(f'{prefix}.{self.path}' if prefix else self.path, self.detail)


class NonFiniteLossError(RuntimeError):
    """A loss or gradient became NaN or infinite: training stops before the optimizer applies it.

    The message is one line naming the step (epoch, iteration, generator or student step) and the loss values; the
    runner prints it and exits with status 3, and nothing is saved over the last checkpoint.
    """
