"""What a run writes, checked before it starts, and the lock that keeps two runs off the same checkpoint.

A run writes beside its student checkpoint ``dst_ckpt``: the checkpoint itself, ``<stem>.last.pt`` (training state),
``<stem>.evolution.json`` and the folder ``<stem>.samples/``; with ``--log_dir`` a TensorBoard folder; with
``--run_log`` a log file. :func:`check_writable` refuses, before anything is built, a file path that is a folder, a
folder path that is a file, and a path whose nearest existing folder cannot be written (a probe file is created and
removed there: permissions alone do not tell, e.g. for root on a read-only mount), so a run never trains for hours
and then fails to save.

:class:`RunLock` holds ``<dst_ckpt>.lock`` for the run's lifetime with an exclusive ``flock``: a second run on the same
``dst_ckpt`` is refused while the first lives, and the kernel releases the lock of a process that died (even by
SIGKILL), so a stale lock file never blocks the next run. The file holds the owner's pid, for the message, and is
removed when the run ends.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from ..errors import ConfigError


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path('/')


def _check_folder_writable(folder: Path, key: str, what: str) -> None:
    """``what`` (e.g. "the file 'x/y.pt'") can be written into ``folder``: its nearest existing ancestor is a folder
    we may write."""
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise ConfigError(key, f"{what} cannot be created: '{existing}' is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ConfigError(key, f"{what} cannot be written: the folder '{existing}' is not writable "
                               f'({error.strerror or error})') from error


def check_writable(files: Iterable[tuple[str | os.PathLike, str]] = (),
                   folders: Iterable[tuple[str | os.PathLike, str]] = ()) -> None:
    """Refuses any ``(path, key)`` the run could not write (see the module docstring); creates nothing.

    Args:
        files: files the run will write, each with the key or flag that names it.
        folders: folders the run will write into.

    Raises:
        ConfigError: naming the key or flag, the path and why.
    """
    for path, key in files:
        path = Path(os.path.expanduser(os.fspath(path)))
        if path.is_dir():
            raise ConfigError(key, f"'{path}' is a folder; expected the path of a file")
        _check_folder_writable(path.parent, key, f"the file '{path}'")
    for path, key in folders:
        path = Path(os.path.expanduser(os.fspath(path)))
        if path.exists() and not path.is_dir():
            raise ConfigError(key, f"'{path}' is a file; expected a folder")
        _check_folder_writable(path, key, f"the folder '{path}'")


class RunLock:
    """An exclusive lock on ``<dst_ckpt>.lock`` (see the module docstring); a context manager.

    Args:
        dst_ckpt: the student checkpoint the run writes.
        key: how messages name it (``models.student_model.dst_ckpt``).
    """

    def __init__(self, dst_ckpt: str | os.PathLike, key: str,
                 advice: str = 'let it finish, stop it, or give this run another dst_ckpt') -> None:
        dst = Path(os.path.expanduser(os.fspath(dst_ckpt)))
        self.path = dst.with_name(dst.name + '.lock')
        self.key, self.advice = key, advice
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 64).decode(errors='replace').strip() or 'unknown'
            os.close(fd)
            raise ConfigError(self.key, f"another run (pid {owner}) is writing to '{self.path.with_suffix('')}' "
                                        f"(lock '{self.path}'); {self.advice}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f'{os.getpid()}\n'.encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
