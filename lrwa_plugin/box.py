"""``DataFreeDistillationBox``: torchdistill's ``DistillationBox`` with the data-free training iteration.

torchdistill builds everything it already knows from the YAML — the frozen teacher, the student, their forward
hooks, the student criterion, optimizer and scheduler, the validation loader — and this box adds what data-free
distillation needs, from ``train.data_free``: a generator (with its own optimizer and criterion), a replay memory and
a strategy (``train.strategy``: dfad | mb_dfkd | lrwa). One iteration (Patel, Mopuri, Qiu, CVPR 2023):

1. generator step(s): ``x = G(z)``; the generator minimises its criterion (adversarial term plus priors such as
   BatchNorm-statistics matching) through the frozen teacher and the student;
2. student step(s): ``x = G(z)`` without gradient, a replay batch ``x_m`` from the memory, teacher logits for both;
   the strategy leaves the student gradient in ``.grad`` and torchdistill's optimizer steps (clipping and step-wise
   scheduling as in torchdistill);
3. the replay memory observes the newest batch.

.. code-block:: yaml

    train:
      strategy: 'lrwa'
      num_epochs: 30
      data_free:
        iterations_per_epoch: 50
        batch_size: 256
        student_steps: 5
        generator:
          key: 'DAFLGenerator'
          kwargs: {nz: 256, img_size: 8, nc: 1}
          steps: 1
          optimizer: {key: 'Adam', kwargs: {lr: 0.001}}
          criterion: {key: 'WeightedSumLoss', kwargs: {sub_terms: {...}}}
        replay: {key: 'MemoryBank', kwargs: {capacity: 1024, push_size: 256, batch_size: 128}}
        meta: {alpha: 0.5, backend: 'higher', order: 'second'}
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torchdistill.common.constant import SELF_MODULE_PATH, def_logger
from torchdistill.common.module_util import check_if_wrapped
from torchdistill.core.distillation import DistillationBox
from torchdistill.core.util import extract_io_dict
from torchdistill.losses.registry import get_high_level_loss
from torchdistill.models.registry import get_model
from torchdistill.optim.registry import get_optimizer, get_scheduler
from tqdm import tqdm

from .losses import BN_STATS_PATH, TeacherBNStatistics
from .registry import get_replay, get_strategy
from .replay import ReplayMemory

logger = def_logger.getChild(__name__)


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite: training stops before the optimizer applies it."""


class DataFreeDistillationBox(DistillationBox):
    """A ``DistillationBox`` whose samples come from a generator instead of a data loader.

    Args are torchdistill's (see ``torchdistill.core.distillation.DistillationBox``); ``train_config`` has the
    two extra keys ``strategy`` and ``data_free`` shown in the module docstring.
    """

    def __init__(self, teacher_model: nn.Module, student_model: nn.Module, dataset_dict: dict,
                 train_config: dict, device: torch.device, device_ids: list[int] | None, distributed: bool,
                 lr_factor: float = 1, accelerator: Any = None) -> None:
        teacher_config = train_config.setdefault('teacher', {})
        if teacher_config.get('requires_grad', False):
            raise ValueError('train.teacher.requires_grad must be False: the teacher is frozen in data-free '
                             'distillation')
        teacher_config['requires_grad'] = False
        optim_config = train_config.get('optimizer', {})
        if optim_config.get('grad_accum_step', 1) != 1:
            raise ValueError('train.optimizer.grad_accum_step must be 1 for data-free distillation: every student '
                             'step sees a fresh generated batch')
        super().__init__(teacher_model, student_model, dataset_dict, train_config, device, device_ids,
                         distributed, lr_factor, accelerator)
        data_free = train_config['data_free']
        self.strategy_key = train_config['strategy']
        meta = data_free.get('meta')
        self.strategy = get_strategy(self.strategy_key, **({} if meta is None else {'meta': meta}))
        self.iterations_per_epoch = int(data_free.get('iterations_per_epoch', 50))
        self.batch_size = int(data_free.get('batch_size', 256))
        self.student_steps = int(data_free.get('student_steps', 5))
        self._build_generator(data_free['generator'])
        self.replay = self._build_replay(data_free.get('replay'))
        self.bn_statistics = TeacherBNStatistics(self._unwrapped(self.teacher_model))
        self.last_losses: dict[str, float] = {}

    # ----------------------------------------------------------------------------------------------- set-up
    def _build_generator(self, generator_config: dict) -> None:
        self.generator = get_model(generator_config['key'], **generator_config.get('kwargs', {})).to(self.device)
        optim_config = generator_config['optimizer']
        self.generator_optimizer = get_optimizer(self.generator, optim_config['key'], **optim_config['kwargs'])
        scheduler_config = generator_config.get('scheduler')
        self.generator_scheduler = None if not scheduler_config else \
            get_scheduler(self.generator_optimizer, scheduler_config['key'], **scheduler_config['kwargs'])
        self.generator_criterion = get_high_level_loss(generator_config['criterion'])
        self.generator_steps = int(generator_config.get('steps', 1))
        logger.info('Generator loss: %s', self.generator_criterion)

    def _build_replay(self, replay_config: dict | None) -> ReplayMemory | None:
        if not self.strategy.uses_replay:
            if replay_config:
                raise ValueError(f"train.data_free.replay is set but strategy '{self.strategy_key}' uses no replay")
            return None
        if not replay_config:
            raise ValueError(f"strategy '{self.strategy_key}' needs train.data_free.replay (e.g. key: MemoryBank)")
        return get_replay(replay_config['key'], **replay_config.get('kwargs', {}))

    @staticmethod
    def _unwrapped(model: nn.Module) -> nn.Module:
        return model.module if check_if_wrapped(model) else model

    # ------------------------------------------------------------------------------------------- iteration
    def sample(self, batch_size: int | None = None) -> Tensor:
        """Generates a batch ``G(z)`` with ``z ~ N(0, I)`` (gradient-tracking; wrap in no_grad when not needed)."""
        z = self.generator.sample_latent(batch_size or self.batch_size, device=self.device)
        return self.generator(z)

    def _student_io(self, model: Callable[..., Any], x: Tensor) -> dict:
        outputs = self.student_forward_proc(model, x, None, {})
        io_dict = extract_io_dict(self.student_io_dict, self.device)
        io_dict[SELF_MODULE_PATH]['output'] = outputs
        return io_dict

    def _teacher_io(self, x: Tensor) -> dict:
        outputs = self.teacher_forward_proc(self.teacher_model, x, None, {})
        io_dict = extract_io_dict(self.teacher_io_dict, self.device)
        io_dict[SELF_MODULE_PATH]['output'] = outputs
        return io_dict

    def generator_step(self) -> float:
        """One generator update: minimise the generator criterion on ``x = G(z)`` (only G's parameters move)."""
        self.generator.train()
        x = self.sample()
        self.bn_statistics.enabled = True
        try:
            teacher_io = self._teacher_io(x)
        finally:
            self.bn_statistics.enabled = False
        teacher_io[BN_STATS_PATH] = {'output': self.bn_statistics.pop()}
        student_io = self._student_io(self.student_model, x)
        loss = self.generator_criterion({'teacher': teacher_io, 'student': student_io}, {}, None)
        self._check_finite('generator', loss)
        self.generator_optimizer.zero_grad(set_to_none=True)
        # inputs=: the student's parameters must not collect gradient from the generator's objective.
        loss.backward(inputs=list(self.generator.parameters()))
        self.generator_optimizer.step()
        return float(loss.detach())

    def _criterion_closure(self, x: Tensor, teacher_io: dict) -> Callable[[Callable[..., Any]], Tensor]:
        def closure(model: Callable[..., Any]) -> Tensor:
            student_io = self._student_io(model, x)
            model_loss_dict = self.extract_model_loss(student_io[SELF_MODULE_PATH]['output'], None, supp_dict={})
            return self.criterion({'teacher': teacher_io, 'student': student_io}, model_loss_dict, None)
        return closure

    def student_step(self) -> tuple[Tensor, dict[str, float]]:
        """One student update by the strategy; returns the acquisition batch and the loss values."""
        with torch.no_grad():
            x = self.sample()
            teacher_io = self._teacher_io(x)
            x_m = self.replay.sample(device=self.device) if self.replay is not None else None
            teacher_io_m = self._teacher_io(x_m) if x_m is not None else None
        acquire = self._criterion_closure(x, teacher_io)
        retain = self._criterion_closure(x_m, teacher_io_m) if x_m is not None else None
        losses = self.strategy.backward(self.student_model, acquire, retain)
        for name, value in losses.items():
            self._check_finite(f'student {name}', value)
        self._optimizer_step()
        return x, losses

    def _optimizer_step(self) -> None:
        # torchdistill's default post-forward process, minus its backward: the strategy has filled .grad already.
        if self.max_grad_norm is not None:
            params = [p for group in self.optimizer.param_groups for p in group['params']]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.stage_grad_count += 1
        if self.lr_scheduler is not None and self.scheduling_step > 0 \
                and self.stage_grad_count % self.scheduling_step == 0:
            self.lr_scheduler.step()

    @staticmethod
    def _check_finite(name: str, value: Tensor | float) -> None:
        value = float(value.detach()) if isinstance(value, Tensor) else float(value)
        if not math.isfinite(value):
            raise NonFiniteLossError(f'{name} loss is {value}: training stopped before applying it')

    def train_iteration(self, epoch: int, iteration: int) -> dict[str, float]:
        """Generator step(s), student step(s), replay update; returns the last loss values."""
        losses: dict[str, float] = {}
        for _ in range(self.generator_steps):
            losses['gen'] = self.generator_step()
        x = None
        for _ in range(self.student_steps):
            x, student_losses = self.student_step()
            losses.update(student_losses)
        if self.replay is not None and x is not None:
            self.replay.observe(x, epoch, iteration, iteration == self.iterations_per_epoch - 1)
            losses['memory'] = float(len(self.replay))
        self.last_losses = losses
        return losses

    def pre_epoch_process(self, epoch: int | None = None, **kwargs: Any) -> None:
        super().pre_epoch_process(epoch=epoch, **kwargs)
        self.teacher_model.eval()
        self.student_model.train()

    def train_one_epoch(self, epoch: int, progress: bool = True,
                        on_iteration: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, float]:
        """Runs ``iterations_per_epoch`` iterations with a progress bar; returns the last loss values.

        ``on_iteration(global_iteration, losses)`` is called after each iteration (e.g. for TensorBoard).
        """
        bar = tqdm(range(self.iterations_per_epoch), desc=f'Epoch {epoch}', disable=not progress, leave=False,
                   dynamic_ncols=True)
        losses: dict[str, float] = {}
        for iteration in bar:
            losses = self.train_iteration(epoch, iteration)
            bar.set_postfix({k: f'{v:.4g}' for k, v in losses.items()}, refresh=False)
            if on_iteration is not None:
                on_iteration(epoch * self.iterations_per_epoch + iteration, losses)
        return losses

    @torch.no_grad()
    def monitor_batches(self, n: int = 32) -> dict[str, Tensor]:
        """A fresh generated batch and, when the memory holds samples, a replayed one (for sample grids)."""
        was_training = self.generator.training
        self.generator.eval()
        batches = {'generated': self.sample(n)}
        self.generator.train(was_training)
        replayed = self.replay.sample(n, device=self.device) if self.replay is not None else None
        if replayed is not None:
            batches['replayed'] = replayed
        return batches

    def post_epoch_process(self, *args: Any, **kwargs: Any) -> None:
        super().post_epoch_process(*args, **kwargs)
        if self.generator_scheduler is not None:
            self.generator_scheduler.step()

    def clean_modules(self) -> None:
        super().clean_modules()
        self.bn_statistics.remove()
