"""The non-finite guard: a loss or gradient that becomes NaN or infinite stops training before the optimizer applies it.

The stop is a :class:`~lrwa_plugin.errors.NonFiniteLossError` whose one-line message names the step (``where``: epoch,
iteration, generator or student step), every loss value, the weighted terms of the criterion that produced it and
how many values of the input batches were already non-finite; the runner prints it and exits with status 3, and
nothing is saved over the last checkpoint. Under ``torchrun`` every rank learns of a stop at the same step (one
1-element all-reduce per check), so no rank waits in a collective that will never come.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from ..errors import NonFiniteLossError
from .distributed import World, any_rank

STOPPED = 'training stopped before the optimizer applied it; nothing was saved over the last checkpoint'


def values_of(losses: Mapping[str, Tensor | float]) -> dict[str, float]:
    return {name: float(v.detach()) if isinstance(v, Tensor) else float(v) for name, v in losses.items()}


def formatted(values: Mapping[str, float]) -> str:
    return ', '.join(f'{name} = {value:.6g}' for name, value in values.items())


def weighted_terms(criterion: nn.Module, io_dict: dict) -> dict[str, float]:
    """The weighted sub terms of a torchdistill ``WeightedSumLoss`` (``{}`` for another criterion), as floats.

    torchdistill reports only the total, so the terms are recomputed from its ``term_dict`` — only for a stop
    message, never in a healthy step.
    """
    term_dict = getattr(criterion, 'term_dict', None)
    if not isinstance(term_dict, dict):
        return {}
    values = {}
    for name, (term, factor) in term_dict.items():
        try:
            values[name] = float(factor * term(io_dict['student'], io_dict['teacher'], None))
        except (RuntimeError, KeyError, ValueError, TypeError):  # best effort: the stop message matters more
            continue
    return values


class NonFiniteGuard:
    """Checks losses and gradients of one run (see the module docstring).

    Attributes:
        where: the step training is at, for the message (set by the box before each step).
    """

    def __init__(self, world: World | None = None) -> None:
        self.world = world or World()
        self.where = 'a step outside train_iteration'

    def losses(self, losses: Mapping[str, Tensor | float], terms: Callable[[], dict[str, float]] | None = None,
               batches: Mapping[str, Tensor | None] | None = None) -> None:
        """Raises :class:`NonFiniteLossError` if a loss is NaN or infinite.

        Only then are the criterion's sub terms computed (``terms``) and the non-finite values of the input batches
        counted, so a healthy step pays one ``isfinite`` per loss.
        """
        values = values_of(losses)
        finite = all(math.isfinite(v) for v in values.values())
        if any_rank(not finite, self.world) and finite:
            raise NonFiniteLossError(f'rank {self.world.rank}: another rank saw a non-finite loss at {self.where}; '
                                     f'{STOPPED}')
        if finite:
            return
        details = formatted(values)
        if terms is not None:
            with torch.no_grad():
                term_values = terms()
            if term_values:
                details += f' (terms: {formatted(term_values)})'
        for kind, batch in (batches or {}).items():
            if batch is not None and not bool(torch.isfinite(batch).all()):
                details += f'; {kind} batch: {int((~torch.isfinite(batch)).sum())} of {batch.numel()} values non-finite'
        rank = f'rank {self.world.rank}: ' if self.world.distributed else ''
        raise NonFiniteLossError(f'{rank}non-finite loss at {self.where}: {details}; {STOPPED}')

    def gradient(self, model: str, parameters: Iterable[nn.Parameter], losses: Mapping[str, Tensor | float]) -> None:
        """Raises :class:`NonFiniteLossError` if the total gradient norm of ``parameters`` is NaN or infinite."""
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            return
        norm = float(torch.nn.utils.get_total_norm(grads))  # one fused norm over every gradient
        if not math.isfinite(norm):
            raise NonFiniteLossError(f'non-finite gradient norm of the {model} ({norm}) at {self.where} with finite '
                                     f'losses {formatted(values_of(losses))}; {STOPPED}')
