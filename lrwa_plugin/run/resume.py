"""Training state: ``<dst_ckpt without suffix>.last.pt``, from which ``--resume`` continues a run exactly.

Data-free distillation at the paper's scale (Patel, Mopuri, Qiu, CVPR 2023: 400 epochs x 72 iterations x 10
student steps) runs for days, and its released code cannot resume without losing the replay memory. The state written
here holds everything the next iteration depends on:

* shared by every rank: student, generator, their optimizers and schedulers, torchdistill's step counter
  (:meth:`lrwa_plugin.box.DataFreeDistillationBox.state_dict`), where to continue (epoch, iteration), the
  accuracy history and best accuracy so far, the config text, seed and world size;
* per rank (``ranks[r]``): the replay memory (a memory bank's samples, a generative replay's VAE and its optimizer,
  their own random streams) and the python / numpy / torch (/ CUDA) random states.

It is written by rank 0 (the other ranks' parts are gathered to it) with :func:`lrwa_plugin.run.checkpoint.atomic_save`
(temporary file, fsync, rename: a run killed mid-write leaves the previous state), at every epoch end and, with
``--save_every N``, every N iterations; it is read with ``torch.load(weights_only=True)``. Resuming on the CPU
reproduces bit for bit the weights of a run that was never stopped (tests/test_resume.py).

.. code-block:: bash

    python examples/run_torchdistill.py --config run.yaml --save_every 10          # killed at some point ...
    python examples/run_torchdistill.py --config run.yaml --resume student.last.pt  # ... continues it

A state written by a different config (anything but ``train.num_epochs``, which may grow to extend a run), seed or
number of processes is refused with a message listing what differs.
"""
from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..util import first_line
from .checkpoint import atomic_save, describe_read_error
from .distributed import World, gather_to_main
from .loading import read_plain

FORMAT = 'lrwa_plugin.training_state'
VERSION = 1
#: Config keys that may differ between the saved run and the resumed one.
ALLOWED_CHANGES: tuple[str, ...] = ('train.num_epochs',)
_MAX_LISTED = 5


def last_checkpoint_path(dst_ckpt: str | os.PathLike) -> Path:
    """``student.pt`` -> ``student.last.pt`` (beside the best-by-accuracy student)."""
    path = Path(os.path.expanduser(os.fspath(dst_ckpt)))
    return path.with_name(path.stem + '.last.pt')


@dataclass
class Position:
    """Where a run stands: the next ``iteration`` of ``epoch`` to run, the per-epoch accuracies and the best one."""

    epoch: int = 0
    iteration: int = 0
    history: list[float] = field(default_factory=list)
    best: float = -1.0


# ------------------------------------------------------------------------------------------------ random states
def rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch (and CUDA) random states, in types ``weights_only`` loading accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {'python': random.getstate(),
            'numpy': {'kind': kind, 'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                      'has_gauss': int(has_gauss), 'cached_gaussian': float(cached)},
            'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized()
            else []}


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    numpy = state['numpy']
    np.random.set_state((numpy['kind'], numpy['keys'].numpy().astype(np.uint32), numpy['pos'], numpy['has_gauss'],
                         numpy['cached_gaussian']))
    torch.set_rng_state(state['torch'])
    if state['cuda']:
        torch.cuda.set_rng_state_all(state['cuda'])


# ---------------------------------------------------------------------------------------------------- writing
def run_identity(teacher: nn.Module | None) -> dict[str, Any]:
    """What a state pins beyond its config and seed: the teacher's weights (a SHA-256 of every tensor of its state
    dict) and the CPU thread count (float sums reorder with it, so results do)."""
    digest = hashlib.sha256()
    for name, tensor in ({} if teacher is None else teacher.state_dict()).items():
        digest.update(name.encode('utf-8'))
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {'teacher_digest': digest.hexdigest(), 'threads': torch.get_num_threads()}


def save_training_state(path: str | os.PathLike, box: Any, position: Position, world: World, config_text: str,
                        seed: int | None, identity: dict[str, Any] | None = None) -> None:
    """Gathers every rank's part to rank 0, which writes the state atomically (collective: call on every rank);
    ``identity``: :func:`run_identity`."""
    replay = box.replay.state_dict() if box.replay is not None else None
    ranks = gather_to_main({'replay': replay, 'rng': rng_state()}, world)
    if not world.is_main:
        return
    atomic_save({'format': FORMAT, 'version': VERSION, 'config': config_text, 'seed': seed,
                 'world_size': world.size, 'epoch': position.epoch, 'iteration': position.iteration,
                 'history': list(position.history), 'best': position.best, 'box': box.state_dict(),
                 'ranks': ranks, **(identity or {})}, path)


# ---------------------------------------------------------------------------------------------------- reading
def read_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a state written by :func:`save_training_state`; every problem is a one-line ``ConfigError``."""
    path = os.path.expanduser(os.fspath(path))
    label = f"checkpoint '{path}'"
    if not os.path.isfile(path):
        raise ConfigError('--resume', f'{label} does not exist')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # truncated, corrupt, not a torch file: one line
        raise ConfigError('--resume', f'{label} could not be read: {describe_read_error(error, path)}') from error
    if not isinstance(state, dict) or state.get('format') != FORMAT:
        raise ConfigError('--resume', f'{label} is not a training state written by lrwa_plugin (expected the '
                         f'<dst_ckpt stem>.last.pt file of a data-free run, not the best-student checkpoint)')
    if state.get('version') != VERSION:
        raise ConfigError('--resume', f"{label} has format version {state.get('version')}, this lrwa_plugin reads "
                                      f'{VERSION}')
    return state




def _differences(saved: Any, current: Any, path: str = '') -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        found = []
        for key in list(saved) + [k for k in current if k not in saved]:
            sub = f'{path}.{key}' if path else str(key)
            if key not in current:
                found.append(f'{sub} removed')
            elif key not in saved:
                found.append(f'{sub} added')
            else:
                found.extend(_differences(saved[key], current[key], sub))
        return found
    if saved != current and path not in ALLOWED_CHANGES:
        return [f'{path}: {saved!r} -> {current!r}']
    return []


def check_state_belongs(state_path: str | os.PathLike, dst_ckpt: str, dst_key: str) -> None:
    """A training state is continued only by the run it belongs to: ``--resume`` must be this run's own
    ``<dst_ckpt stem>.last.pt``, else the resumed run would write its state, its evolution and its best student over
    another run's files (and test that run's student)."""
    own, given = last_checkpoint_path(dst_ckpt), Path(os.path.expanduser(os.fspath(state_path)))
    if given.resolve() == own.resolve():
        return
    owner = given.with_name(given.name[:-len('.last.pt')] + '.pt') if given.name.endswith('.last.pt') else None
    hint = f"resume with --dst_ckpt '{owner}'" if owner is not None else "give the run's own --dst_ckpt"
    raise ConfigError('--resume', f"'{os.fspath(state_path)}' is not the training state of this run ({dst_key} "
                                  f"'{dst_ckpt}' keeps it in '{own}'); {hint}, so that the resumed run writes its own "
                                  'files')


def check_same_run(state: dict[str, Any], config_text: str, seed: int | None, world: World, path: str,
                   amp: str | None = None, identity: dict[str, Any] | None = None) -> None:
    """Refuses a state written by another config, seed, number of processes, precision, teacher or thread count,
    listing what differs (a state written before it recorded the teacher and threads is checked without them)."""
    differences = _differences(read_plain(state['config']), read_plain(config_text))
    if seed is not None and seed != state['seed']:
        differences.append(f"--seed: {state['seed']} -> {seed}")
    if world.size != state['world_size']:
        differences.append(f"number of processes: {state['world_size']} -> {world.size}")
    for key, what in (('teacher_digest', "teacher's weights"), ('threads', 'CPU threads')):
        if key in state and identity is not None and state[key] != identity[key]:
            shown = [str(v)[:12] for v in (state[key], identity[key])]
            differences.append(f'{what}: {shown[0]} -> {shown[1]}')
    written_amp = (state['box'].get('precision') or {}).get('amp')
    if written_amp != amp:
        differences.append(f"--amp: {written_amp or 'none (float32)'} -> {amp or 'none (float32)'}")
    if differences:
        shown = differences[:_MAX_LISTED] + ([f'+{len(differences) - _MAX_LISTED} more']
                                             if len(differences) > _MAX_LISTED else [])
        raise ConfigError('--resume', f"checkpoint '{path}' was written by a different run ({'; '.join(shown)}); "
                                      f'resume with the same config, seed and number of processes, or start a new run')


def restore_training_state(state: dict[str, Any], box: Any, world: World) -> Position:
    """Loads the state into the box and this rank's replay memory and random streams; returns where to continue."""
    try:
        box.load_state_dict(state['box'])
        rank = state['ranks'][world.rank]
        if (box.replay is None) != (rank['replay'] is None):
            raise ValueError('the replay memory of the checkpoint and of the config differ')
        if box.replay is not None:
            box.replay.load_state_dict(rank['replay'])
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        raise ConfigError('--resume', f'the checkpoint does not fit the models built from the config: '
                         f'{first_line(error, limit=None)}') from error
    set_rng_state(rank['rng'])  # last: nothing may draw from the streams between here and the first step
    return Position(int(state['epoch']), int(state['iteration']), [float(a) for a in state['history']],
                    float(state['best']))
