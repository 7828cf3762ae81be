"""The generator side of an iteration: ``G(z)``, its optimizer (and scheduler) and its update.

Step 1 of every data-free iteration (Patel, Mopuri, Qiu, CVPR 2023; DFAD, Fang et al., 2019): ``x = G(z)``,
``z ~ N(0, I)``; the frozen teacher runs on ``x`` *with* input gradients (its BatchNorm layers' input statistics are
recorded for ``BNStatMatchingLoss``) and so does the student; the generator criterion (adversarial term plus priors,
:mod:`lrwa_plugin.losses`) is minimised with respect to the generator's parameters only.

.. code-block:: yaml

    train:
      data_free:
        generator:
          key: 'DAFLGenerator'
          kwargs: {nz: 256, img_size: 8, nc: 1}
          steps: 1
          optimizer: {key: 'Adam', kwargs: {lr: 0.001}}
          scheduler: {key: 'CosineAnnealingLR', kwargs: {T_max: 30}}     # optional, stepped once per epoch
          criterion: {key: 'WeightedSumLoss', kwargs: {sub_terms: {...}}}
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torchdistill.common.constant import def_logger
from torchdistill.losses.registry import get_high_level_loss
from torchdistill.models.registry import get_model
from torchdistill.optim.registry import get_optimizer, get_scheduler

from .config.data_free import GeneratorConfig
from .losses import BN_STATS_PATH, TeacherBNStatistics
from .precision import Precision
from .run.distributed import GradientAverager, World
from .run.guard import NonFiniteGuard, weighted_terms
from .util import load_optional_state

logger = def_logger.getChild(__name__)

IOFunction = Callable[[Any, Tensor], dict]
"""Runs a model (callable) on a batch through torchdistill's forward process; returns its I/O dict."""


class AdversarialGenerator:
    """The generator, its optimizer, scheduler and criterion, and one update of them.

    Args:
        config: ``train.data_free.generator``, parsed.
        teacher: the unwrapped, frozen teacher (its BatchNorm layers are hooked for their input statistics).
        device: where the generator runs.
        world: under ``torchrun``, the generator's gradients are averaged across ranks after every backward.
        guard: stops the run at a non-finite loss or gradient.
        precision: float32 or mixed precision (:mod:`lrwa_plugin.precision`); float16 skips an overflowing step.
    """

    def __init__(self, config: GeneratorConfig, teacher: nn.Module, device: torch.device, world: World,
                 guard: NonFiniteGuard, precision: Precision | None = None) -> None:
        self.generator = get_model(config.model.key, **config.model.kwargs).to(device)
        self.optimizer = get_optimizer(self.generator, config.optimizer.key, **config.optimizer.kwargs)
        self.scheduler = None if config.scheduler is None else \
            get_scheduler(self.optimizer, config.scheduler.key, **config.scheduler.kwargs)
        self.criterion = get_high_level_loss(config.criterion)
        self.steps = config.steps
        self.device = device
        self.guard = guard
        self.precision = precision or Precision(None, device.type)
        self.bn_statistics = TeacherBNStatistics(teacher)
        self.averager = GradientAverager(self.generator.parameters(), world)
        logger.info('Generator loss: %s', self.criterion)

    def sample(self, n: int) -> Tensor:
        """A batch ``G(z)``, ``z ~ N(0, I)`` (gradient-tracking; wrap in no_grad when not needed)."""
        return self.generator(self.generator.sample_latent(n, device=self.device))

    def step(self, n: int, teacher_io: Callable[[Tensor], dict], student_io: Callable[[Tensor], dict]) -> float:
        """One update on a fresh batch of ``n``: minimise the criterion (only G's parameters move); returns it."""
        self.generator.train()
        precision = self.precision
        with precision.autocast():  # the forwards; the criterion reduces in float32
            x = self.sample(n)
            self.bn_statistics.enabled = True
            try:
                teacher = precision.to_float32(teacher_io(x))
            finally:
                self.bn_statistics.enabled = False
            student = precision.to_float32(student_io(x))
        teacher[BN_STATS_PATH] = {'output': self.bn_statistics.pop()}
        io_dict = {'teacher': teacher, 'student': student}
        loss = self.criterion(io_dict, {}, None)
        self.guard.losses({'gen': loss}, lambda: weighted_terms(self.criterion, io_dict), {'generated': x})
        self.optimizer.zero_grad(set_to_none=True)
        # inputs=: the student's parameters must not collect gradient from the generator's objective.
        scale = precision.generator_scale
        (loss if scale is None else loss * scale.scale).backward(inputs=list(self.generator.parameters()))
        self.averager()
        if scale is not None and not scale.unscale_(self.generator.parameters()):
            return float(loss.detach())  # float16 overflow: the step is skipped (the scale has halved)
        self.guard.gradient('generator', self.generator.parameters(), {'gen': loss})
        self.optimizer.step()
        return float(loss.detach())

    def end_epoch(self) -> None:
        if self.scheduler is not None:
            self.scheduler.step()

    def close(self) -> None:
        self.bn_statistics.remove()

    def state_dict(self) -> dict[str, Any]:
        return {'generator': self.generator.state_dict(), 'generator_optimizer': self.optimizer.state_dict(),
                'generator_scheduler': None if self.scheduler is None else self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state['generator'])
        self.optimizer.load_state_dict(state['generator_optimizer'])
        load_optional_state('generator_scheduler', self.scheduler, state['generator_scheduler'])

