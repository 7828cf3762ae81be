"""``MomentumGenerator``: replay from an exponential moving average of the generator (MAD, Do et al., NeurIPS 2022).

Do, Le, Nguyen, Nguyen, Harikumar, Tran, Rana, Venkatesh, "Momentum Adversarial Distillation: Handling Large
Distribution Shifts in Data-Free Knowledge Distillation", NeurIPS 2022: the EMA generator is "an ensemble of the
generator's old versions" that changes less per update than the generator, so training the student on its samples
as well recalls what was learnt on earlier generator distributions. It costs one generator forward per replay batch
instead of a store or a VAE.

.. code-block:: yaml

    train:
      strategy: 'mad'                  # or 'lrwa': retain on the momentum generator's samples at θ'
      data_free:
        replay: {key: 'MomentumGenerator', kwargs: {momentum: 0.95, batch_size: 64}}
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..config.checks import count, finite
from ..registry import register_replay
from ..util import buffers_restored
from .base import ReplayContext, Replayed, ReplayMemory


@register_replay
class MomentumGenerator(ReplayMemory):
    """An EMA copy ``G̃`` of the box's generator ``G``; a replay batch is ``G̃(z)`` with the memory's own ``z``.

    **Update**, after every generator step (:meth:`after_generator_step`): every parameter
    ``θ̃ ← m θ̃ + (1 − m) θ`` (``torch.lerp``), and the buffers (BatchNorm running statistics, spectral-norm vectors)
    copied from ``G``. ``G̃`` starts as a copy of ``G`` when the run is built. The buffers only matter for an
    eval-mode forward: ``G̃`` samples as ``G`` does during training, in train mode with batch statistics (its running
    statistics are not moved by sampling).

    **Replay.** :meth:`sample` decodes ``z ~ N(0, I)`` drawn from the memory's stream, without gradient. It replays
    from the first generator update on (before it, ``G̃ = G``). ``len()`` counts the updates.

    Under ``torchrun`` every rank keeps the same ``G̃``: it starts from rank 0's generator and follows the averaged
    (identical) generator, and its buffers follow rank 0's after every iteration, as the student's do (``synced``).

    Args:
        momentum: ``m``, in (0, 1); the average's horizon is about ``1 / (1 − m)`` generator steps.
        batch_size: replay batch size.
        seed: seed of the memory's stream (its latents).

    .. code-block:: yaml

        replay: {key: 'MomentumGenerator', kwargs: {momentum: 0.95, batch_size: 64}}
    """

    def __init__(self, momentum: float = 0.95, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__(seed)
        self.momentum = finite(momentum, 'momentum', low=0, high=1)
        self.batch_size = count(batch_size, 'batch_size')
        self.ema: nn.Module | None = None
        self.generator: nn.Module | None = None
        self.updates = 0

    def attach(self, context: ReplayContext) -> None:
        """Keeps the run's generator and makes ``G̃`` a copy of it."""
        super().attach(context)
        if context.generator is None:
            raise RuntimeError('MomentumGenerator: the run shows it no generator (ReplayContext.generator)')
        self.generator = context.generator
        self.ema = copy.deepcopy(context.generator)
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.ema.train()

    def _ema(self) -> nn.Module:
        if self.ema is None:
            raise RuntimeError('MomentumGenerator: call attach(ReplayContext(..., generator=G)) first (the box does)')
        return self.ema

    def __len__(self) -> int:
        return self.updates

    @torch.no_grad()
    def after_generator_step(self) -> None:
        ema, generator = self._ema(), self.generator
        averaged = [p for p in ema.parameters()]
        torch._foreach_lerp_(averaged, [p.detach() for p in generator.parameters()], 1.0 - self.momentum)
        for mine, theirs in zip(ema.buffers(), generator.buffers()):
            mine.copy_(theirs)
        self.updates += 1

    @torch.no_grad()
    def sample(self, n: int | None = None, device: torch.device | str | None = None) -> Replayed | None:
        if not self.updates:
            return None
        ema = self._ema()
        z = ema.sample_latent(n or self.batch_size, device='cpu', generator=self.rng)
        parameter = next(ema.parameters())
        # Train mode (batch statistics, like G's own samples); the forward's updates of the buffers (running
        # statistics, spectral-norm power iterations) are undone, so sampling moves nothing and every rank's G̃ stays
        # the same however often each samples.
        with buffers_restored([ema]):
            x = ema(z.to(parameter.device, parameter.dtype))
        return Replayed(x.to(device))

    def modules(self) -> list[nn.Module]:
        return [] if self.ema is None else [self.ema]

    def synced(self) -> list[nn.Module]:
        return self.modules()

    def log_values(self) -> dict[str, float]:
        return {'memory': float(self.updates)}

    def extra_state(self) -> dict[str, Any]:
        return {'ema': self._ema().state_dict(), 'updates': self.updates}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._ema().load_state_dict(state['ema'])
        self.updates = int(state['updates'])
