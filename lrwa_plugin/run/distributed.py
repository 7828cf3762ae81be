"""Data parallelism for data-free distillation: process group, bucketed gradient averaging, rank-0 results.

Started the way torchdistill's example scripts are, with ``torchrun`` (``env://``; gloo on the CPU, nccl on CUDA)::

    torchrun --nproc_per_node 2 examples/run_torchdistill.py --config examples/configs/digits/lrwa_mb.yaml \\
        --device cpu --world_size 2

Why not ``DistributedDataParallel``? The retain-while-acquire step runs the student through ``higher``'s patched
copy or ``torch.func.functional_call`` (Patel, Mopuri, Qiu, CVPR 2023), neither of which goes through DDP's forward,
and the student's gradient comes from one ``torch.autograd.backward`` over ``L_Acq(θ) + L_Ret(θ')``, so DDP's
reducer hooks would not see a normal forward/backward pair. The data-free box therefore runs every step on the plain
(unwrapped) modules and calls :class:`GradientAverager` after each backward: the ``.grad`` of the student (and, at
the generator step, of the generator) are averaged across ranks in buckets, one collective per bucket. Every rank
starts from rank 0's weights (:func:`broadcast_module_state`) and applies the same averaged gradient, so parameters
stay bit-identical; each rank draws its own ``z`` (:func:`seed_rank`) and keeps its own replay memory.
"""
from __future__ import annotations

import os
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torchdistill.common.constant import def_logger

from ..errors import ConfigError

logger = def_logger.getChild(__name__)

#: Bucket size of the gradient all-reduce (the default of ``DistributedDataParallel``).
BUCKET_BYTES = 25 * 1024 * 1024


@dataclass(frozen=True)
class World:
    """Who this process is: ``rank`` of ``size`` processes (``size == 1``: not distributed)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(world_size: int, dist_url: str, device: torch.device) -> World:
    """Joins the process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), if any.

    gloo on the CPU, nccl on CUDA (each process on ``cuda:LOCAL_RANK``). Without those variables the run is a single
    process and ``--world_size`` must be 1; with them it must be 1 (unset) or equal ``WORLD_SIZE``.
    """
    if 'RANK' not in os.environ or 'WORLD_SIZE' not in os.environ:
        if world_size != 1:
            raise ConfigError('--world_size', f'{world_size} processes asked for, but RANK/WORLD_SIZE are not set; '
                                              f'start the run with torchrun --nproc_per_node {world_size} ...')
        return World()
    rank, size = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    local_rank = int(os.environ.get('LOCAL_RANK', rank))
    if world_size not in (1, size):
        raise ConfigError('--world_size', f"{world_size} does not match torchrun's WORLD_SIZE={size}")
    if size == 1:
        return World()
    if device.type == 'cuda':
        torch.cuda.set_device(local_rank)
    backend = 'nccl' if device.type == 'cuda' else 'gloo'
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method=dist_url, world_size=size, rank=rank)
    logger.info(f'distributed: rank {rank} of {size} ({backend}, {dist_url})')
    return World(rank, size, local_rank)


def device_for(device: torch.device, world: World) -> torch.device:
    """``cuda:LOCAL_RANK`` for a distributed CUDA run, else ``device`` unchanged."""
    if world.distributed and device.type == 'cuda':
        return torch.device('cuda', world.local_rank)
    return device


def seed_rank(world: World) -> None:
    """Gives every rank > 0 its own python / numpy / torch random streams, so each draws its own ``z``.

    Rank 0 keeps the stream ``--seed`` set, so a 1-process run and rank 0 of a larger one draw the same first batch.
    """
    if world.rank == 0:
        return
    seed = (torch.initial_seed() + 1_000_003 * world.rank) % 2 ** 63
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)


def _buckets(tensors: list[Tensor], bucket_bytes: int) -> list[list[Tensor]]:
    """Consecutive groups of tensors of one dtype and device, each up to ``bucket_bytes`` (at least one tensor)."""
    buckets: list[list[Tensor]] = []
    size = 0
    for tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        last = buckets[-1] if buckets else None
        if last is None or size + nbytes > bucket_bytes or last[0].dtype != tensor.dtype \
                or last[0].device != tensor.device:
            buckets.append([tensor])
            size = nbytes
        else:
            last.append(tensor)
            size += nbytes
    return buckets


class GradientAverager:
    """Averages the ``.grad`` of some parameters across ranks: one ``all_reduce`` per bucket of ~25 MiB.

    Parameters without a gradient are skipped (every rank runs the same code, so they are the same on every rank).
    ``seconds`` and ``calls`` accumulate the time spent, for ``benchmarks/bench_ddp.py``. With one process it does
    nothing.
    """

    def __init__(self, parameters: Iterable[nn.Parameter], world: World, bucket_bytes: int = BUCKET_BYTES) -> None:
        self.parameters = [p for p in parameters if p.requires_grad]
        self.world = world
        self.bucket_bytes = bucket_bytes
        self.seconds = 0.0
        self.calls = 0

    def __call__(self) -> None:
        if not self.world.distributed:
            return
        start = time.perf_counter()
        params = [p for p in self.parameters if p.grad is not None]
        for bucket in _buckets(params, self.bucket_bytes):
            grads = [p.grad for p in bucket]
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            flat.div_(self.world.size)
            torch._foreach_copy_(grads, list(_unflatten_dense_tensors(flat, grads)))
        self.seconds += time.perf_counter() - start
        self.calls += 1


def broadcast_module_state(modules: Iterable[nn.Module], world: World, buffers_only: bool = False) -> None:
    """Copies rank 0's parameters and buffers (or only its buffers) into every rank (bucketed broadcasts).

    With ``buffers_only`` this is what ``DistributedDataParallel(broadcast_buffers=True)`` does before each forward:
    BatchNorm running statistics are rank 0's everywhere, so evaluation and checkpoints agree across ranks.
    """
    if not world.distributed:
        return
    tensors = [t for module in modules for t in (*([] if buffers_only else module.parameters()), *module.buffers())]
    for bucket in _buckets(tensors, BUCKET_BYTES):
        data = [t.data for t in bucket]
        flat = _flatten_dense_tensors(data)
        dist.broadcast(flat, src=0)
        torch._foreach_copy_(data, list(_unflatten_dense_tensors(flat, data)))


def broadcast_float(value: float, world: World, device: torch.device) -> float:
    """Rank 0's ``value`` on every rank (e.g. the accuracy only rank 0 measured)."""
    if not world.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


def any_rank(flag: bool, world: World) -> bool:
    """True on every rank if ``flag`` is True on any (one tiny all-reduce; ``flag`` itself for one process)."""
    if not world.distributed:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def gather_to_main(obj: object, world: World) -> list[object] | None:
    """Every rank's ``obj`` as a list on rank 0 (None elsewhere); ``[obj]`` for one process."""
    if not world.distributed:
        return [obj]
    gathered: list[object] | None = [None] * world.size if world.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def destroy(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
