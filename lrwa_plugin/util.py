"""Small helpers the whole plugin shares, each written once so that no module writes its own: one-line messages,
train/eval modes and buffers left as they were, trees of tensors (torchdistill's I/O dicts), and atomic writes (a
result file is either the old one or the complete new one)."""
from __future__ import annotations

import contextlib
import difflib
import os
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor, nn

from .errors import WriteError

MAX_MESSAGE_CHARS = 300
MAX_SHOWN_CHARS = 80
MAX_LISTED = 25


# ----------------------------------------------------------------------------------------------------- messages
def first_text_line(text: str) -> str:
    """The first non-empty line of ``text``, stripped (``''`` if none)."""
    return next((line.strip() for line in text.splitlines() if line.strip()), '')


def first_line(error: BaseException, limit: int | None = MAX_MESSAGE_CHARS, with_type: bool = False) -> str:
    """The first non-empty line of an exception's message, cut at ``limit`` characters (``None``: never); with
    ``with_type``, behind the exception's type (``OSError: ...``).

    A ``KeyError`` reads ``missing key 'x'``.
    """
    if isinstance(error, KeyError) and error.args:
        text = f'missing key {error.args[0]!r}'
    else:
        text = first_text_line(str(error))
        if with_type:
            text = f'{type(error).__name__}: {text}' if text else type(error).__name__
        text = text or type(error).__name__
    return text if limit is None or len(text) <= limit else text[:limit - 3] + '...'


def show(value: Any, limit: int = MAX_SHOWN_CHARS) -> str:
    """``repr(value)`` on one line, cut at ``limit`` characters."""
    text = ' '.join(repr(value).split())
    return text if len(text) <= limit else text[:limit - 3] + '...'


def listed(items: Sequence[Any], limit: int = MAX_LISTED, separator: str = ', ') -> str:
    """``items`` joined, at most ``limit`` of them and ``+N more``."""
    shown = [str(item) for item in items[:limit]]
    if len(items) > limit:
        shown.append(f'+{len(items) - limit} more')
    return separator.join(shown)


def shape_text(shape: Sequence[Any]) -> str:
    """A tensor shape as messages write it: ``3x32x32``."""
    return 'x'.join(str(v) for v in shape)


def did_you_mean(word: Any, choices: Iterable[Any]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or ``''``."""
    matches = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f' (did you mean {matches[0]!r}?)' if matches else ''


# ------------------------------------------------------------------------------------------------------- modules
def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DataParallel`` / ``DistributedDataParallel`` (the module itself otherwise)."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module
    return model


@contextlib.contextmanager
def modes_kept(*modules: nn.Module, eval_mode: bool = False) -> Iterator[None]:
    """Restores each module's train/eval mode on exit; with ``eval_mode`` the modules are in eval mode meanwhile."""
    modes = [(module, module.training) for module in modules]
    try:
        if eval_mode:
            for module in modules:
                module.eval()
        yield
    finally:
        for module, mode in modes:
            module.train(mode)


@contextlib.contextmanager
def buffers_restored(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Leaves the modules' buffers (BatchNorm statistics, spectral-norm vectors) as they were before the block: for
    forwards that only look (sample grids, a memory's samples)."""
    buffers = [b for module in modules for b in module.buffers()]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        if buffers:
            torch._foreach_copy_(buffers, saved)


def load_optional_state(name: str, obj: Any, state: dict | None) -> None:
    """Loads the state of an optional part (a scheduler), refusing a checkpoint that has one where the run has none
    (or the reverse)."""
    if (obj is None) != (state is None):
        raise ValueError(f'{name}: the checkpoint has {"none" if state is None else "one"}, '
                         f'the config {"none" if obj is None else "one"}')
    if obj is not None:
        obj.load_state_dict(state)


# -------------------------------------------------------------------------------------------- trees of tensors
def tree_map(fn: Callable[[Tensor], Any], tree: Any) -> Any:
    """``fn`` applied to every tensor of a nest of dicts, lists and tuples (anything else is kept as it is)."""
    if isinstance(tree, Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {key: tree_map(fn, value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_map(fn, value) for value in tree)
    return tree


def cat_rows(first: Any, second: Any) -> Any:
    """Two trees of the same structure with their tensors concatenated along the first (batch) dimension."""
    if isinstance(first, Tensor):
        return torch.cat([first, second])
    if isinstance(first, dict):
        return {key: cat_rows(value, second[key]) for key, value in first.items()}
    if isinstance(first, (list, tuple)):
        return type(first)(cat_rows(a, b) for a, b in zip(first, second))
    return first


def tensors_of(tree: Any) -> list[Tensor]:
    """Every tensor of a tree, in order."""
    found: list[Tensor] = []
    tree_map(found.append, tree)
    return found


# ---------------------------------------------------------------------------------------------------------- files
def _fsync_directory(directory: Path) -> None:
    """Makes a completed rename durable (best effort; not possible on every platform)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Writes ``path`` through ``write(file)`` so that it is either the old file or the complete new one.

    ``write`` fills a temporary file in the same folder (a unique name, so concurrent writers never share it); it is
    flushed, fsynced and moved over ``path`` with :func:`os.replace`. Parent folders are created. On any failure the
    temporary file is removed and an existing ``path`` is left untouched; a failure of the file system (a full disk, a
    folder that cannot be written, a destination that cannot be replaced) is a :class:`~lrwa_plugin.errors.WriteError`
    naming ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp')
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(error, WriteError):
            raise
        if isinstance(error, OSError) or _is_writer_failure(error):
            raise WriteError(os.fspath(path), first_line(error, with_type=True),
                             getattr(error, 'errno', None)) from error
        raise
    _fsync_directory(path.parent)
    return path


def _is_writer_failure(error: BaseException) -> bool:
    """torch's zip writer reports a failed write (a full disk) as a RuntimeError from its inline container."""
    return isinstance(error, RuntimeError) and any(mark in str(error) for mark in ('inline_container',
                                                                                    'PytorchStreamWriter'))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of a UTF-8 text."""
    return atomic_write(path, lambda f: f.write(text.encode('utf-8')))
