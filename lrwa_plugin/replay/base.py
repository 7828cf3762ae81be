"""What every replay memory is: :class:`ReplayMemory`, the run it is shown (:class:`ReplayContext`) and what it gives
back (:class:`Replayed`).

A memory is one file: subclass :class:`ReplayMemory`, register it with
:func:`lrwa_plugin.registry.register_replay`, and every strategy that accepts its type uses it (``lrwa`` accepts any
memory; :attr:`lrwa_plugin.strategies.Strategy.accepts`). The data-free box never reaches into a memory, and a
memory never reaches into the box: the box shows it the run once (:meth:`ReplayMemory.attach`) and then tells it
what happens, in this order within an iteration::

    after_generator_step()            after every generator optimizer step
    sample(device=...)                before every student step: a Replayed batch, or None while it holds nothing
    observe(x, epoch, iteration)      after every student step, with that step's generated batch
    end_epoch(epoch)                  after the last iteration of every epoch

**Random numbers.** A memory draws only from its own stream :attr:`ReplayMemory.rng` (a ``torch.Generator`` seeded
with ``seed``), so it neither depends on nor shifts the run's other draws; under ``torchrun`` every rank's stream
is offset by :meth:`ReplayMemory.seed_rank`.

**State.** :meth:`ReplayMemory.state_dict` goes into the training state (``.last.pt``), which is read with
``torch.load(weights_only=True)``: it may hold tensors, ``int``/``float``/``bool``/``str``/``None``, and lists, tuples
and dicts of those, nothing else (no modules, no classes, no NumPy arrays). The base class adds the stream (key
``'rng'``); a subclass implements :meth:`ReplayMemory.extra_state` and :meth:`ReplayMemory.load_extra_state`.

.. code-block:: python

    @register_replay
    class LastBatch(ReplayMemory):
        '''Replays the newest generated batch.'''
        def __init__(self, batch_size: int = 64, seed: int = 0) -> None:
            super().__init__(seed)
            self.batch_size, self.last = batch_size, None
        def __len__(self) -> int:
            return 0 if self.last is None else len(self.last)
        def observe(self, x, epoch, iteration) -> None:
            self.last = x.detach()
        def sample(self, n=None, device=None):
            return None if self.last is None else Replayed(self.last[: n or self.batch_size].to(device))
        def extra_state(self):
            return {'last': self.last}
        def load_extra_state(self, state):
            self.last = state['last']
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..run.distributed import World

TeacherIO = Callable[[Tensor], dict]
"""The teacher's torchdistill I/O dict for a batch (its output at ``'.'`` and every hooked module), no gradient."""


@dataclass
class ReplayContext:
    """What the run shows a memory when it is built (:meth:`ReplayMemory.attach`).

    Attributes:
        teacher: the frozen teacher (unwrapped, in eval mode).
        device: where the models run.
        generator: the data-free generator (a momentum memory keeps an average of it).
        teacher_io: the teacher's I/O dict of a batch, what the student criterion reads of it (a memory bank stores
            it beside its samples, so replaying them costs no teacher forward); None outside the box.
        world: this process's place in a ``torchrun`` run.
    """

    teacher: nn.Module
    device: torch.device
    generator: nn.Module | None = None
    teacher_io: TeacherIO | None = None
    world: World = World()


@dataclass
class Replayed:
    """A replay batch: samples ``x`` and, when the memory stored them, the teacher's I/O dict for them (else the box
    runs the teacher)."""

    x: Tensor
    teacher_io: dict | None = None


class ReplayMemory(ABC):
    """A replay memory (see the module docstring for the calls it receives and what its state may hold).

    Args:
        seed: seed of :attr:`rng`, the memory's own random stream.
    """

    #: Samples a replay batch of this size unless the caller asks for another.
    batch_size: int = 64

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.rng = torch.Generator().manual_seed(seed)
        self.context: ReplayContext | None = None

    # ------------------------------------------------------------------------------------------- what a run calls
    def attach(self, context: ReplayContext) -> None:
        """Called once by the box after building the memory; a subclass that needs the run extends it."""
        self.context = context

    def seed_rank(self, rank: int) -> None:
        """Gives rank ``rank``'s memory its own stream (data-parallel runs keep one memory per rank)."""
        if rank:
            self.rng.manual_seed(self.seed + 1_000_003 * rank)

    def after_generator_step(self) -> None:
        """After every generator optimizer step (nothing by default)."""
        return None

    def observe(self, x: Tensor, epoch: int, iteration: int) -> None:
        """After every student step, with that step's generated batch (detached; nothing by default)."""
        return None

    def end_epoch(self, epoch: int) -> None:
        """After the last iteration of epoch ``epoch`` (nothing by default)."""
        return None

    @abstractmethod
    def __len__(self) -> int:
        """How much the memory holds (0 while :meth:`sample` returns None); the progress bar shows it."""

    @abstractmethod
    def sample(self, n: int | None = None, device: torch.device | str | None = None) -> Replayed | None:
        """A replay batch of ``n`` (default :attr:`batch_size`) samples on ``device``; None while it holds nothing."""

    def log_values(self) -> dict[str, float]:
        """Numbers worth a progress-bar column."""
        return {'memory': float(len(self))}

    def modules(self) -> list[nn.Module]:
        """Networks the memory holds (made identical across ranks at the start of a data-parallel run)."""
        return []

    def synced(self) -> list[nn.Module]:
        """Networks that stay identical across ranks (their buffers follow rank 0's after every iteration, as the
        student's do); a memory of its own per rank (a memory bank, a VAE) has none."""
        return []

    # ----------------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The memory's whole state, loadable with ``torch.load(weights_only=True)``."""
        return {'rng': self.rng.get_state(), **self.extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.set_state(state['rng'])
        self.load_extra_state(state)

    @abstractmethod
    def extra_state(self) -> dict[str, Any]:
        """The subclass's part of :meth:`state_dict` (plain values and tensors only, see the module docstring)."""

    @abstractmethod
    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restores :meth:`extra_state`."""
