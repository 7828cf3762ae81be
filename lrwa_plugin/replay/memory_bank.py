"""``MemoryBank``: a bounded store of generated samples (MB-DFKD, Binici et al., WACV 2022; LRWA, Patel, Mopuri, Qiu,
CVPR 2023), with the teacher's outputs for them.

.. code-block:: yaml

    train:
      data_free:
        replay:
          key: 'MemoryBank'
          kwargs: {capacity: 640, push_size: 64, push_every_epochs: 5, batch_size: 64}
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchdistill.common.constant import def_logger

from ..config.checks import choice, count
from ..errors import ConfigError
from ..registry import register_replay
from ..util import cat_rows, tree_map
from .base import Replayed, ReplayMemory

logger = def_logger.getChild(__name__)

MEMORY_POLICIES = ('fifo', 'reservoir')
DRAWS = ('samples', 'batch')
STORAGE_DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}


@register_replay
class MemoryBank(ReplayMemory):
    """Bounded memory of generated samples (MB-DFKD, Binici et al., WACV 2022; LRWA, Patel et al., CVPR 2023).

    **Pushes.** After epoch ``first_push_epoch`` and then after every ``push_every_epochs``-th epoch, the first
    ``push_size`` samples of that epoch's last generated student batch are stored. ``first_push_epoch`` defaults to
    ``push_every_epochs − 1`` (pushes after epochs 4, 9, 14, … for a period of 5: the end of each period); the
    paper's released code pushes after epochs 0, 5, 10, … (``first_push_epoch: 0``). The memory never holds more
    than ``capacity`` samples:

    * ``policy: 'fifo'`` (the papers'): pushed batches are kept whole; when more than ``capacity`` samples are held,
      the oldest batches are dropped.
    * ``policy: 'reservoir'``: reservoir sampling over single samples (Vitter's algorithm R): the ``i``-th sample
      ever pushed (from 0) fills a free slot, or once the memory is full replaces a uniformly chosen slot with
      probability ``capacity / (i + 1)``; so the memory is a uniform sample of *everything ever pushed*, old
      generator distributions included, rather than of the newest batches.

    **Draws.** ``draw: 'samples'``: a replay batch of ``batch_size`` samples drawn uniformly, with replacement, over
    every sample held. ``draw: 'batch'`` (fifo only): one whole stored batch, chosen uniformly, as the released code's
    ``random.choice`` over its pushed batches (``batch_size`` is then the pushed batch's size). Both the replacement
    decisions and the draws use the memory's own stream.

    **Teacher outputs** (``cache_teacher``, default on). The teacher is frozen and in eval mode, so its outputs for a
    stored sample never change: at push time the memory runs it once on the stored samples (after their conversion
    to ``dtype``, so the cached outputs are exactly those of a fresh forward of the replayed samples) and keeps its
    whole torchdistill I/O dict for them (its logits, and the hooked modules' inputs and outputs the student
    criterion may read); a replay batch brings them back and the box runs no teacher forward for it. They are kept
    in their own dtype (float32), not in ``dtype``: rounding them would change the retention targets. Cost per
    sample: the teacher's logits (10 floats on digits, 100 on CIFAR-100, against 64 and 3,072 sample values) plus any
    hooked feature maps, which can be larger than the sample (``cache_teacher: false`` then).

    Args:
        capacity: the most samples held (the paper: 10 batches of 64 = 640).
        push_size: samples pushed at a time.
        push_every_epochs: push every this many epochs.
        batch_size: replay batch size (``draw: 'samples'``).
        policy: ``'fifo'`` or ``'reservoir'``.
        dtype: storage precision of the samples, ``'float16'``, ``'bfloat16'`` or ``'float32'``; ``None`` keeps the
            pushed dtype. Samples come back in the dtype they were pushed in.
        first_push_epoch: the epoch after which the first push happens (default ``push_every_epochs − 1``).
        draw: ``'samples'`` or ``'batch'``.
        cache_teacher: store the teacher's I/O dict with the samples.
        seed: seed of the memory's stream.

    .. code-block:: yaml

        replay:
          key: 'MemoryBank'
          kwargs: {capacity: 1024, push_size: 128, push_every_epochs: 1, batch_size: 64, policy: 'reservoir',
                   dtype: 'float16'}
        # the released code's memory (configs *_released.yaml):
        replay:
          key: 'MemoryBank'
          kwargs: {capacity: 640, push_size: 64, push_every_epochs: 5, first_push_epoch: 0, draw: 'batch'}
    """

    def __init__(self, capacity: int = 640, push_size: int = 64, push_every_epochs: int = 1, batch_size: int = 64,
                 policy: str = 'fifo', dtype: str | None = None, first_push_epoch: int | None = None,
                 draw: str = 'samples', cache_teacher: bool = True, seed: int = 0) -> None:
        super().__init__(seed)
        self.policy = choice(policy, MEMORY_POLICIES, 'policy')
        if dtype is not None:
            choice(dtype, tuple(STORAGE_DTYPES), 'dtype')
        self.capacity = count(capacity, 'capacity')
        self.push_size = count(push_size, 'push_size')
        self.push_every_epochs = count(push_every_epochs, 'push_every_epochs')
        self.batch_size = count(batch_size, 'batch_size')
        if self.push_size > self.capacity:
            raise ConfigError('push_size', f'{push_size} must not exceed capacity ({capacity})')
        self.first_push_epoch = self.push_every_epochs - 1 if first_push_epoch is None else \
            count(first_push_epoch, 'first_push_epoch', minimum=0)
        self.draw = choice(draw, DRAWS, 'draw')
        if self.draw == 'batch' and self.policy != 'fifo':
            raise ConfigError('draw', "'batch' replays whole pushed batches, which only policy 'fifo' keeps")
        if not isinstance(cache_teacher, bool):
            raise ConfigError('cache_teacher', f'expected true or false, got {cache_teacher!r}')
        self.cache_teacher = cache_teacher
        self.storage_dtype = None if dtype is None else STORAGE_DTYPES[dtype]
        # fifo: pushed batches, oldest first; reservoir: one tensor of the slots. The teacher's I/O dicts row by row.
        self._batches: list[Tensor] = []
        self._outputs: list[dict] = []
        self._seen = 0  # samples ever pushed (reservoir)
        self._sample_dtype: torch.dtype | None = None
        self._pending: Tensor | None = None

    @classmethod
    def check_config(cls, kwargs: dict[str, Any], config: Any) -> None:
        """The run's rules: a memory whose first push comes after the last epoch would never replay anything (a
        one-epoch run, a smoke test, is let through: no memory bank can replay in it); a ``push_size`` above one
        student batch is said in one warning (each push stores one batch: the run is not meaningless, only smaller
        than written)."""
        push_size = kwargs.get('push_size', 64)
        if isinstance(push_size, int) and push_size > config.batch_size:  # it trains, storing less than asked: said
            logger.warning(f'train.data_free.replay.kwargs.push_size: {push_size} is more than a push can store (one '
                           f'student batch, train.data_free.batch_size {config.batch_size}); each push stores '
                           f'{config.batch_size}')
        every = kwargs.get('push_every_epochs', 1)
        first = kwargs.get('first_push_epoch')
        first = every - 1 if first is None and isinstance(every, int) else first
        if config.num_epochs > 1 and isinstance(first, int) and first >= config.num_epochs - 1:
            raise ConfigError('push_every_epochs', f'the first push is after epoch {first} (push_every_epochs {every}, '
                             f'first_push_epoch {kwargs.get("first_push_epoch")}) but the run ends after epoch '
                             f'{config.num_epochs - 1}: it would never replay anything; push earlier or train longer')

    def __len__(self) -> int:
        return sum(len(batch) for batch in self._batches)

    def pushes_after(self, epoch: int) -> bool:
        """Whether a batch is pushed after epoch ``epoch`` (counted from 0)."""
        return epoch >= self.first_push_epoch and (epoch - self.first_push_epoch) % self.push_every_epochs == 0

    def observe(self, x: Tensor, epoch: int, iteration: int) -> None:
        if self.pushes_after(epoch):
            self._pending = x  # the epoch's last student batch is the one pushed at end_epoch

    def end_epoch(self, epoch: int) -> None:
        if self._pending is not None and self.pushes_after(epoch):
            self.push(self._pending)
        self._pending = None

    def _teacher_outputs(self, stored: Tensor, dtype: torch.dtype) -> dict | None:
        context = self.context
        if not self.cache_teacher or context is None or context.teacher_io is None:
            return None
        with torch.no_grad():
            outputs = context.teacher_io(stored.to(context.device, dtype=dtype))
        return tree_map(lambda t: t.detach().to('cpu', copy=True), outputs)

    def push(self, x: Tensor) -> None:
        """Stores (a detached CPU copy of) the first ``push_size`` samples of ``x`` by the memory's policy."""
        self._sample_dtype = x.dtype
        stored = x.detach()[: self.push_size].to('cpu', dtype=self.storage_dtype or x.dtype, copy=True)
        outputs = self._teacher_outputs(stored, x.dtype)
        if self.policy == 'fifo':
            self._batches.append(stored)
            if outputs is not None:
                self._outputs.append(outputs)
            while len(self) > self.capacity:
                self._batches.pop(0)
                if self._outputs:
                    self._outputs.pop(0)
        else:
            self._reservoir_push(stored, outputs)

    def _reservoir_push(self, x: Tensor, outputs: dict | None) -> None:
        held = self._batches[0] if self._batches else x[:0]
        held_outputs = self._outputs[0] if self._outputs else \
            (None if outputs is None else tree_map(lambda t: t[:0], outputs))
        free = min(self.capacity - len(held), len(x))
        if free > 0:
            held = torch.cat([held, x[:free]])
            if outputs is not None:
                held_outputs = cat_rows(held_outputs, tree_map(lambda t: t[:free], outputs))
        rest = x[free:]
        if len(rest) > 0:
            # sample number i (counted over all pushes) replaces slot j ~ U{0..i} when j < capacity
            index = torch.arange(self._seen + free, self._seen + len(x), dtype=torch.float64)
            slots = (torch.rand(len(rest), generator=self.rng, dtype=torch.float64) * (index + 1)).long()
            for k in torch.nonzero(slots < self.capacity).flatten().tolist():
                held[slots[k]] = rest[k]  # in push order: a later sample may replace an earlier one of this push
                if outputs is not None:
                    _copy_row(held_outputs, outputs, int(slots[k]), free + k)
        self._batches = [held]
        self._outputs = [] if held_outputs is None else [held_outputs]
        self._seen += len(x)

    def sample(self, n: int | None = None, device: torch.device | str | None = None) -> Replayed | None:
        if not self._batches:
            return None
        cached = len(self._outputs) == len(self._batches)
        if self.draw == 'batch':
            k = int(torch.randint(len(self._batches), (1,), generator=self.rng))
            rows = slice(0, n)
            x, outputs = self._batches[k][rows], (self._outputs[k] if cached else None)
            outputs = None if outputs is None else tree_map(lambda t: t[rows], outputs)
        else:
            data = torch.cat(self._batches) if len(self._batches) > 1 else self._batches[0]
            index = torch.randint(len(data), (n or self.batch_size,), generator=self.rng)
            x = data[index]
            outputs = None
            if cached:
                held = self._outputs[0] if len(self._outputs) == 1 else _cat_all(self._outputs)
                outputs = tree_map(lambda t: t[index], held)
        teacher_io = None if outputs is None else tree_map(lambda t: t.to(device), outputs)
        return Replayed(x.to(device, dtype=self._sample_dtype), teacher_io)

    def extra_state(self) -> dict[str, Any]:
        dtype = None if self._sample_dtype is None else str(self._sample_dtype).removeprefix('torch.')
        return {'batches': list(self._batches), 'outputs': list(self._outputs), 'seen': self._seen,
                'sample_dtype': dtype}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._batches = [batch.clone() for batch in state['batches']]
        self._outputs = [tree_map(torch.clone, outputs) for outputs in state.get('outputs', [])]
        self._seen = int(state.get('seen', len(self)))
        dtype = state.get('sample_dtype')
        self._sample_dtype = None if dtype is None else getattr(torch, dtype)


def _cat_all(trees: list[dict]) -> dict:
    merged = trees[0]
    for tree in trees[1:]:
        merged = cat_rows(merged, tree)
    return merged


def _copy_row(target: Any, source: Any, slot: int, row: int) -> None:
    """``target[...][slot] = source[...][row]`` for every tensor of two trees of the same structure."""
    if isinstance(target, Tensor):
        target[slot] = source[row]
    elif isinstance(target, dict):
        for key, value in target.items():
            _copy_row(value, source[key], slot, row)
    elif isinstance(target, (list, tuple)):
        for a, b in zip(target, source):
            _copy_row(a, b, slot, row)
