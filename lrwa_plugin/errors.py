"""The plugin's own errors: the failures the runner reports as one ``error:`` line and an exit status (2 for a config
that cannot work, 3 for a non-finite loss, 4 for a file that could not be written), where anything else keeps its
traceback. They take no YAML of their own:
a :class:`ConfigError` names the YAML key path (or flag) that is wrong.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A config value, flag or file that cannot work. The message is one line: ``<key path or flag>: <what is wrong>``.

    Args:
        path: dotted key path (``train.data_free.meta.alpha``) or flag (``--resume``).
        message: the value found and what is allowed.
    """

    #: The command lines' exit status for it.
    exit_status = 2

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

    exit_status = 3


class WriteError(OSError):
    """A file of the run could not be written (a full disk, a folder that became read-only, a destination that cannot
    be replaced). Every file is written atomically, so the file at ``path`` and everything written before are as they
    were; the runner prints one line and exits with status 4.

    Args:
        path: the file that could not be written.
        reason: the operating system's (or torch's writer's) reason, one line.
    """

    exit_status = 4

    def __init__(self, path: str, reason: str, errno: int | None = None) -> None:
        super().__init__(errno, f"could not write '{path}' ({reason}); it and every file written before are as they "
                                'were')
        self.path, self.reason = path, reason

    def __str__(self) -> str:
        return self.strerror
