"""Checkpoint I/O shared by the whole plugin: read weights safely, load them strictly, save atomically.

Why not torchdistill's ``load_ckpt``? It unpickles with ``weights_only=False`` (arbitrary code execution on an
untrusted file) and, when the file does not exist, only logs a message and returns: the teacher silently stays a
randomly initialised network. In data-free distillation the teacher is the *only* source of knowledge, so here every
problem is an error whose single-line message names what was being loaded and from where.

Supported files:

* ``.safetensors`` (read with :func:`safetensors.torch.load_file`; also recognised by content under another suffix);
* anything :func:`torch.save` wrote, read with ``weights_only=True``. ``argparse.Namespace`` is allow-listed because
  torchdistill's ``save_ckpt`` stores ``{'model': ..., 'optimizer': ..., 'lr_scheduler': ..., 'best_value': ...,
  'args': argparse.Namespace}``.
"""
from __future__ import annotations

import argparse
import os
import pickle
from collections.abc import Mapping
from typing import Any

import safetensors.torch
import torch
from torch import nn

from ..util import atomic_write, first_text_line, listed

StrPath = str | os.PathLike

#: Containers holding the plain (non-EMA) weights, tried in this order.
PLAIN_KEYS: tuple[str, ...] = ('model', 'state_dict')
#: Containers holding EMA weights; used only when no plain weights are present.
EMA_KEYS: tuple[str, ...] = ('state_dict_ema', 'model_ema')
#: Wrapper prefixes stripped when *every* key carries them (DDP / DataParallel, then ``torch.compile``).
WRAPPER_PREFIXES: tuple[str, ...] = ('module.', '_orig_mod.')

_MAX_LISTED = 5
_MAX_REASON_CHARS = 200


def _label(path: StrPath, what: str) -> str:
    return f"{what} checkpoint '{os.fspath(path)}'" if what else f"checkpoint '{os.fspath(path)}'"


def _looks_like_safetensors(path: StrPath) -> bool:
    """Returns True if the file starts like a safetensors file (8-byte little-endian header length, then ``{``)."""
    with open(path, 'rb') as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b'{' and 0 < int.from_bytes(head[:8], 'little') < os.path.getsize(path)


def _read_file(path: StrPath) -> Any:
    """Reads a safetensors or torch file without executing any pickled code."""
    if os.fspath(path).endswith('.safetensors') or _looks_like_safetensors(path):
        return safetensors.torch.load_file(os.fspath(path), device='cpu')
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


def _refused_globals(path: StrPath) -> list[str]:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(os.fspath(path))
    except Exception:  # only used to improve an error message
        return []
    return [name for name in names if name != 'argparse.Namespace']


def describe_read_error(exc: BaseException, path: StrPath) -> str:
    """Turns a (possibly multi-paragraph) loader exception into a short single-line reason."""
    if os.path.getsize(path) == 0:
        return 'the file is empty'
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and 'WeightsUnpickler error:' in text:
        refused = _refused_globals(path)
        if refused:
            return (f'it pickles Python objects that weights_only=True refuses ({", ".join(refused)}); '
                    're-save only the state_dict')
        text = text.split('WeightsUnpickler error:', 1)[1]
    first_sentence = first_text_line(text).split('. ')[0]
    reason = f'{type(exc).__name__}: {first_sentence}' if first_sentence else type(exc).__name__
    return reason if len(reason) <= _MAX_REASON_CHARS else reason[:_MAX_REASON_CHARS - 3] + '...'


def _is_flat_state_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _select_state_dict(obj: Any, label: str) -> Mapping:
    """Picks the weights out of a checkpoint container.

    A flat ``{name: tensor}`` mapping is returned as is. Otherwise the plain weights (``'model'``, as torchdistill's
    ``save_ckpt`` writes, or ``'state_dict'``) win over EMA weights (``'state_dict_ema'``, ``'model_ema'``): the plain
    weights are what the training run evaluated and reported, so they are the least surprising choice. EMA weights are
    used only when a checkpoint holds nothing else. (Note: timm's own ``load_state_dict`` prefers EMA by default.)
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f'{label} could not be read: it holds a {type(obj).__name__}, not a state dict')
    if _is_flat_state_dict(obj):
        return obj
    for key in PLAIN_KEYS + EMA_KEYS:
        candidate = obj.get(key)
        if isinstance(candidate, Mapping) and len(candidate) > 0:
            return candidate
    top = ', '.join(repr(k) for k in list(obj)[:_MAX_LISTED])
    raise ValueError(f'{label} could not be read: no state dict found (looked for a flat name->tensor mapping or '
                     f'{", ".join(PLAIN_KEYS + EMA_KEYS)}); top-level keys: [{top}]')


def _strip_wrapper_prefixes(state_dict: Mapping) -> dict:
    """Removes ``module.`` / ``_orig_mod.`` when every key has it, so a legitimately named submodule is kept."""
    result = dict(state_dict)
    stripped = True
    while stripped and result:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in result):
                result = {k[len(prefix):]: v for k, v in result.items()}
                stripped = True
    return result


def _validate_tensors(state_dict: Mapping, label: str) -> dict[str, torch.Tensor]:
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f'{label} could not be read: entry {key!r} is a {type(value).__name__}, not a tensor')
    return dict(state_dict)


def load_state_dict_file(path: StrPath, what: str = '') -> dict[str, torch.Tensor]:
    """Reads the model weights stored in a local checkpoint file.

    Args:
        path: ``.safetensors`` file or a file written by :func:`torch.save` (a bare state dict, torchdistill's
            ``save_ckpt`` layout, or a timm-style ``{'state_dict': ..., 'state_dict_ema': ...}``).
        what: What is being loaded, used in error messages, e.g. ``'teacher'``.

    Returns:
        A flat ``{parameter/buffer name: tensor}`` dict on the CPU, with a DDP ``module.`` prefix removed.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The file cannot be read (corrupt, truncated, refused by ``weights_only=True``) or holds no
            state dict.
    """
    label = _label(path, what)
    if not os.path.exists(path):
        raise FileNotFoundError(f'{label} does not exist')
    if not os.path.isfile(path):
        raise ValueError(f'{label} could not be read: it is not a regular file')
    try:
        raw = _read_file(path)
    except Exception as exc:  # every loader failure becomes one clear ValueError
        raise ValueError(f'{label} could not be read: {describe_read_error(exc, path)}') from exc
    state_dict = _strip_wrapper_prefixes(_select_state_dict(raw, label))
    return _validate_tensors(state_dict, label)


def _listed(items: list[str]) -> str:
    return '[' + listed(items, limit=_MAX_LISTED) + ']'


def _shape(tensor: torch.Tensor) -> str:
    return '(' + ', '.join(str(d) for d in tensor.shape) + ')'


def describe_mismatch(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> str | None:
    """Compares a model's state dict with a checkpoint's.

    Args:
        expected: ``model.state_dict()``.
        found: The checkpoint's state dict.

    Returns:
        ``None`` if every key and shape matches, else
        ``'missing keys [...]; unexpected keys [...]; shape mismatches [name: ckpt (..) vs model (..)]'``.
    """
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f'{k}: ckpt {_shape(found[k])} vs model {_shape(v)}'
              for k, v in expected.items() if k in found and found[k].shape != v.shape]
    if not (missing or unexpected or shapes):
        return None
    return f'missing keys {_listed(missing)}; unexpected keys {_listed(unexpected)}; shape mismatches {_listed(shapes)}'


def load_weights_strictly(model: nn.Module, path: StrPath, what: str = '') -> None:
    """Loads a checkpoint into ``model``, requiring identical keys and shapes.

    Keys and shapes are compared before any tensor is copied, so on error the model is left exactly as it was.
    Load into the unwrapped model (``ddp_model.module``), since a ``module.`` prefix is stripped from checkpoints.

    Args:
        model: Model whose ``state_dict()`` defines the expected keys and shapes.
        path: Checkpoint file (see :func:`load_state_dict_file`).
        what: What is being loaded, used in error messages.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The file cannot be read or does not match the model (single line listing the differences).
    """
    state_dict = load_state_dict_file(path, what)
    mismatch = describe_mismatch(model.state_dict(), state_dict)
    if mismatch is not None:
        raise ValueError(f'{_label(path, what)} does not match the model: {mismatch}')
    model.load_state_dict(state_dict, strict=True)


def atomic_save(obj: Any, path: StrPath) -> None:
    """Saves ``obj`` with :func:`torch.save` so that ``path`` is either the old file or the complete new one
    (:func:`lrwa_plugin.util.atomic_write`: temporary file in the same folder, fsync, rename; parents created)."""
    atomic_write(path, lambda f: torch.save(obj, f))
