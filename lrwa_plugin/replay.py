"""Replay memories: where the student's earlier pseudo-samples come back from (knowledge retention, L_Ret).

Every memory has the same small interface, so the strategies do not care which one they are given:
``observe(x, epoch, iteration, last_iteration)`` after every data-free iteration, ``sample(n, device)`` for a
replay batch (``None`` while the memory is empty) and ``state_dict`` / ``load_state_dict``.

``MemoryBank`` is the memory of MB-DFKD (Binici et al., WACV 2022) and of the LRWA paper (Patel, Mopuri, Qiu,
CVPR 2023): a bounded first-in-first-out store of whole batches of generated samples, pushed every few epochs.

.. code-block:: yaml

    train:
      data_free:
        replay: {key: 'MemoryBank', kwargs: {capacity: 640, push_size: 64, push_every_epochs: 5, batch_size: 64}}
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .registry import register_replay


class ReplayMemory:
    """Interface of a replay memory (see the module docstring)."""

    #: Samples a replay batch of this size unless the caller asks otherwise.
    batch_size: int

    def __len__(self) -> int:
        raise NotImplementedError

    def observe(self, x: Tensor, epoch: int, iteration: int, last_iteration: bool) -> None:
        raise NotImplementedError

    def sample(self, n: int | None = None, device: torch.device | str | None = None) -> Tensor | None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError


MEMORY_POLICIES = ('fifo',)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f'MemoryBank: {name} must be a positive integer, got {value!r}')
    return value


@register_replay
class MemoryBank(ReplayMemory):
    """Bounded memory of generated samples, first in first out by pushed batch (MB-DFKD, LRWA).

    At the end of every ``push_every_epochs``-th epoch the first ``push_size`` samples of the latest generated batch
    are pushed; when more than ``capacity`` samples are held, the oldest batches are dropped. A replay batch is
    drawn uniformly over the samples held, with the memory's own random generator (seeded, and saved in the state).

    Args:
        capacity: the most samples held (the paper: 10 batches of 64 = 640).
        push_size: samples pushed at a time.
        push_every_epochs: push at the end of every this many epochs.
        batch_size: replay batch size.
        policy: ``'fifo'``.
        seed: seed of the sampling generator.
    """

    def __init__(self, capacity: int = 640, push_size: int = 64, push_every_epochs: int = 1, batch_size: int = 64,
                 policy: str = 'fifo', seed: int = 0) -> None:
        if policy not in MEMORY_POLICIES:
            raise ValueError(f"MemoryBank: policy '{policy}' is not one of {', '.join(MEMORY_POLICIES)}")
        self.capacity = _positive_int('capacity', capacity)
        self.push_size = _positive_int('push_size', push_size)
        self.push_every_epochs = _positive_int('push_every_epochs', push_every_epochs)
        self.batch_size = _positive_int('batch_size', batch_size)
        if self.push_size > self.capacity:
            raise ValueError(f'MemoryBank: push_size ({push_size}) must not exceed capacity ({capacity})')
        self.policy = policy
        self._batches: list[Tensor] = []
        self._rng = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return sum(len(batch) for batch in self._batches)

    def push(self, x: Tensor) -> None:
        """Stores (a CPU copy of) ``x``, dropping the oldest batches beyond ``capacity``."""
        self._batches.append(x.detach()[: self.push_size].to('cpu', copy=True))
        while len(self) > self.capacity:
            self._batches.pop(0)

    def observe(self, x: Tensor, epoch: int, iteration: int, last_iteration: bool) -> None:
        if last_iteration and (epoch + 1) % self.push_every_epochs == 0:
            self.push(x)

    def sample(self, n: int | None = None, device: torch.device | str | None = None) -> Tensor | None:
        if not self._batches:
            return None
        data = torch.cat(self._batches) if len(self._batches) > 1 else self._batches[0]
        index = torch.randint(len(data), (n or self.batch_size,), generator=self._rng)
        return data[index].to(device)

    def state_dict(self) -> dict[str, Any]:
        return {'batches': list(self._batches), 'rng': self._rng.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._batches = [batch.clone() for batch in state['batches']]
        self._rng.set_state(state['rng'])
