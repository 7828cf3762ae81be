"""``DataFreeDistillationBox``: torchdistill's ``DistillationBox`` with the data-free training iteration.

torchdistill builds everything it already knows from the YAML — the frozen teacher, the student, their forward
hooks, the student criterion, optimizer and scheduler, the post-forward and post-epoch processes, the validation
loader — and this box adds what data-free distillation needs, from the parsed ``train.data_free``
(:class:`lrwa_plugin.config.DataFreeConfig`): a generator (:class:`lrwa_plugin.generator.AdversarialGenerator`),
a replay memory (:mod:`lrwa_plugin.replay`) and a strategy (:mod:`lrwa_plugin.strategies`). One iteration (Patel,
Mopuri, Qiu, CVPR 2023):

1. generator step(s): the generator minimises its criterion on ``x = G(z)`` through the frozen teacher and the
   student; the memory hears of each (``after_generator_step``);
2. student step(s): ``x = G(z)`` without gradient, a replay batch ``x_m`` from the memory, the teacher's I/O dicts
   for both (a memory bank brings its own); the strategy leaves the student gradient in ``.grad``, and torchdistill's
   post-forward process (``train.post_forward_process``, default torchdistill's) clips, steps the optimizer and the
   step-wise scheduler — its ``loss.backward()`` adds nothing, the strategy has done the backward; the memory observes
   the step's batch;
3. after an epoch's last iteration, :meth:`finish_epoch` tells the memory (a memory bank pushes then).

Epoch-level scheduling (``scheduling_step: 0``, ``ReduceLROnPlateau`` with the validation accuracy as its metric,
``CosineAnnealingWarmRestarts``) is torchdistill's post-epoch process; the generator's scheduler steps after it.
Under ``torchrun`` (``world``, :mod:`lrwa_plugin.run.distributed`) every backward is followed by a bucketed average of
the gradients across ranks, and every iteration ends with rank 0's BatchNorm statistics broadcast to the others;
each rank samples its own ``z`` and keeps its own replay memory. Losses and gradients are checked for NaN and
infinity before the optimizer applies them (:mod:`lrwa_plugin.run.guard`).

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
          optimizer: {key: 'Adam', kwargs: {lr: 0.001}}
          criterion: {key: 'WeightedSumLoss', kwargs: {sub_terms: {...}}}
        replay: {key: 'MemoryBank', kwargs: {capacity: 1024, push_size: 256, batch_size: 128}}
        meta: {alpha: 0.5, backend: 'higher', order: 'second'}
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torchdistill.common.constant import SELF_MODULE_PATH, def_logger
from torchdistill.core.distillation import DistillationBox
from torchdistill.core.util import extract_io_dict

from .config.data_free import DataFreeConfig, parse_data_free
from .generator import AdversarialGenerator
from .models.sample_shape import check_generator_fits_teacher
from .precision import Precision
from .registry import get_replay, get_strategy
from .replay import ReplayContext, ReplayMemory
from .run.distributed import GradientAverager, World, broadcast_module_state
from .run.guard import NonFiniteGuard, weighted_terms
from .strategies import StepClosures
from .util import buffers_restored, cat_rows, load_optional_state, modes_kept, unwrap

logger = def_logger.getChild(__name__)


class DataFreeDistillationBox(DistillationBox):
    """A ``DistillationBox`` whose samples come from a generator instead of a data loader.

    Args are torchdistill's (see ``torchdistill.core.distillation.DistillationBox``); ``train_config`` has the two
    extra keys ``strategy`` and ``data_free`` shown in the module docstring, and is not modified.
    ``data_free``: the already parsed block (the runner parses it once while validating); None parses it here.
    ``precision``: float32 (None) or mixed precision (``--amp``, :mod:`lrwa_plugin.precision`).
    """

    def __init__(self, teacher_model: nn.Module, student_model: nn.Module, dataset_dict: dict,
                 train_config: dict, device: torch.device, device_ids: list[int] | None, distributed: bool,
                 lr_factor: float = 1, accelerator: Any = None, world: World | None = None,
                 data_free: DataFreeConfig | None = None, precision: Precision | None = None) -> None:
        # Data parallelism is the box's own (lrwa_plugin.run.distributed): torchdistill sees a single process, so it
        # wraps nothing in DDP and its validation loader covers the whole split (evaluated on rank 0).
        self.world = world or World()
        self.config = data_free or parse_data_free(train_config)
        self.precision = precision or Precision(None, torch.device(device).type)
        super().__init__(teacher_model, student_model, dataset_dict, _torchdistill_view(train_config), device,
                         device_ids, False, lr_factor, accelerator)
        config = self.config
        self.iterations_per_epoch = config.iterations_per_epoch
        self.batch_size = config.batch_size
        self.student_steps = config.student_steps
        self.strategy = get_strategy(config.strategy.key, **config.strategy.kwargs)
        self.guard = NonFiniteGuard(self.world)
        teacher = unwrap(self.teacher_model)
        self.generation = AdversarialGenerator(config.generator, teacher, self.device, self.world, self.guard,
                                               self.precision)
        self.generator = self.generation.generator
        check_generator_fits_teacher(self.generator, teacher, 'train.data_free.generator')
        self.replay: ReplayMemory | None = None
        if config.replay is not None:
            self.replay = get_replay(config.replay.key, **config.replay.kwargs)
            self.replay.attach(ReplayContext(teacher=teacher, device=self.device, generator=self.generator,
                                             teacher_io=self.teacher_io, world=self.world))
            self.replay.seed_rank(self.world.rank)
        self.student_averager = GradientAverager(self.student_model.parameters(), self.world)
        self.last_losses: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------------ forwards
    def sample(self, batch_size: int | None = None) -> Tensor:
        """Generates a batch ``G(z)`` with ``z ~ N(0, I)`` (gradient-tracking; wrap in no_grad when not needed)."""
        return self.generation.sample(batch_size or self.batch_size)

    def student_io(self, model: Callable[..., Any], x: Tensor) -> dict:
        """The student's torchdistill I/O dict for ``x``, run through ``model`` (the student at θ or elsewhere)."""
        outputs = self.student_forward_proc(model, x, None, {})
        io_dict = extract_io_dict(self.student_io_dict, self.device)
        io_dict[SELF_MODULE_PATH]['output'] = outputs
        return io_dict

    def teacher_io(self, x: Tensor) -> dict:
        """The teacher's torchdistill I/O dict for ``x``."""
        outputs = self.teacher_forward_proc(self.teacher_model, x, None, {})
        io_dict = extract_io_dict(self.teacher_io_dict, self.device)
        io_dict[SELF_MODULE_PATH]['output'] = outputs
        return io_dict

    def _criterion(self, x: Tensor, teacher_io: dict) -> Callable[[Callable[..., Any]], Tensor]:
        def closure(model: Callable[..., Any]) -> Tensor:
            with self.precision.autocast():  # the forward; the criterion reduces in float32
                student_io = self.precision.to_float32(self.student_io(model, x))
            model_loss_dict = self.extract_model_loss(student_io[SELF_MODULE_PATH]['output'], None, supp_dict={})
            return self.criterion({'teacher': teacher_io, 'student': student_io}, model_loss_dict, None)
        return closure

    # ----------------------------------------------------------------------------------------------- iteration
    def generator_step(self) -> float:
        """One generator update; the memory hears of it."""
        loss = self.generation.step(self.batch_size, self.teacher_io, lambda x: self.student_io(self.student_model, x))
        if self.replay is not None:
            self.replay.after_generator_step()
        return loss

    def student_closures(self, x: Tensor, teacher_io: dict, x_m: Tensor | None,
                         teacher_io_m: dict | None) -> StepClosures:
        """The closures a strategy is given for the acquisition batch ``x`` and the replay batch ``x_m``."""
        lr = float(self.optimizer.param_groups[0]['lr'])
        scale = self.precision.student_scale.scale if self.precision.student_scale is not None else 1.0
        if x_m is None:
            return StepClosures(acquire=self._criterion(x, teacher_io), lr=lr, loss_scale=scale)

        def joint(model: Callable[..., Any]) -> Tensor:
            return self._criterion(torch.cat([x, x_m]), cat_rows(teacher_io, teacher_io_m))(model)

        return StepClosures(acquire=self._criterion(x, teacher_io), retain=self._criterion(x_m, teacher_io_m),
                            joint=joint, lr=lr, loss_scale=scale)

    def student_step(self) -> tuple[Tensor, dict[str, float]]:
        """One student update by the strategy; returns the acquisition batch and the loss values."""
        to_float32 = self.precision.to_float32
        with torch.no_grad(), self.precision.autocast():
            x = to_float32(self.sample())
            teacher_io = to_float32(self.teacher_io(x))
            replayed = self.replay.sample(device=self.device) if self.replay is not None else None
            x_m = None if replayed is None else to_float32(replayed.x)
            teacher_io_m = None if replayed is None else to_float32(replayed.teacher_io or self.teacher_io(x_m))
        losses = self.strategy.backward(self.student_model, self.student_closures(x, teacher_io, x_m, teacher_io_m))
        self.student_averager()

        def acquisition_terms() -> dict[str, float]:
            # At θ, as acquired; the other losses are only reported as their totals.
            io_dict = {'teacher': teacher_io, 'student': self.student_io(self.student_model, x)}
            return {f'acq.{name}': value for name, value in weighted_terms(self.criterion, io_dict).items()}

        self.guard.losses(losses, acquisition_terms, {'generated': x, 'replayed': x_m})
        scale = self.precision.student_scale
        if scale is not None and not scale.unscale_(self.student_model.parameters()):
            # float16: the scaled gradients overflowed; the step is skipped (the scale has halved)
            self.optimizer.zero_grad(set_to_none=True)
            return x, losses
        self.guard.gradient('student', self.student_model.parameters(), losses)
        # torchdistill's post-forward process steps the optimizer (clipping, step-wise scheduling); the backward it
        # runs on this loss reaches nothing, as the strategy has already accumulated the gradient.
        self.post_forward_process(loss=_applied(sum(losses.values())))
        return x, losses

    def train_iteration(self, epoch: int, iteration: int) -> dict[str, float]:
        """Generator step(s), student step(s); returns the last loss values."""
        losses: dict[str, float] = {}
        for step in range(self.generation.steps):
            self.guard.where = f'epoch {epoch}, iteration {iteration}, generator step {step}'
            losses['gen'] = self.generator_step()
        for step in range(self.student_steps):
            self.guard.where = f'epoch {epoch}, iteration {iteration}, student step {step}'
            x, step_losses = self.student_step()
            losses.update(step_losses)
            if self.replay is not None:
                self.replay.observe(x, epoch, iteration)
        if self.replay is not None:
            losses.update(self.replay.log_values())
        # BatchNorm statistics moved with each rank's own batches: rank 0's win, as under DDP.
        synced = self.replay.synced() if self.replay is not None else []
        broadcast_module_state([self.student_model, self.generator, *synced], self.world, buffers_only=True)
        self.last_losses = losses
        return losses

    def finish_epoch(self, epoch: int) -> None:
        """After the last iteration of ``epoch`` (before it is evaluated): the memory hears of it."""
        if self.replay is not None:
            self.replay.end_epoch(epoch)

    # ------------------------------------------------------------------------------------------- epoch hooks
    def pre_epoch_process(self, epoch: int | None = None, **kwargs: Any) -> None:
        super().pre_epoch_process(epoch=epoch, **kwargs)
        self.teacher_model.eval()
        self.student_model.train()

    def post_epoch_process(self, *args: Any, **kwargs: Any) -> None:
        """torchdistill's post-epoch process (epoch-level scheduling; pass ``metrics=`` for ReduceLROnPlateau), then
        the generator's scheduler."""
        super().post_epoch_process(*args, **kwargs)
        self.generation.end_epoch()

    @torch.no_grad()
    def monitor_batches(self, n: int = 32) -> dict[str, Tensor]:
        """A fresh generated batch and, when the memory holds samples, a replayed one (for sample grids).

        It changes nothing the run uses — the global random streams and the memory's are restored, and so are the
        buffers of the memory's networks (a VAE decoding in train mode moves its BatchNorm statistics) — so a run
        gives the same results with or without its sample grids.
        """
        devices = [self.device] if self.device.type == 'cuda' else []
        memory_stream = self.replay.rng.get_state() if self.replay is not None else None
        memory_modules = self.replay.modules() if self.replay is not None else []
        with torch.random.fork_rng(devices=devices), modes_kept(self.generator, eval_mode=True), \
                buffers_restored(memory_modules):
            batches = {'generated': self.sample(n)}
            replayed = self.replay.sample(n, device=self.device) if self.replay is not None else None
        if memory_stream is not None:
            self.replay.rng.set_state(memory_stream)
        if replayed is not None:
            batches['replayed'] = replayed.x
        return batches

    def clean_modules(self) -> None:
        super().clean_modules()
        self.generation.close()

    # ------------------------------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """What every rank shares: student, generator, their optimizers and schedulers, the step counter."""
        state = {'student': unwrap(self.student_model).state_dict(), **self.generation.state_dict(),
                 'optimizer': self.optimizer.state_dict(),
                 'lr_scheduler': None if self.lr_scheduler is None else self.lr_scheduler.state_dict(),
                 'stage_grad_count': self.stage_grad_count}
        if self.precision.enabled:  # float32 states stay as they were
            state['precision'] = self.precision.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` (strict: every module, optimizer and scheduler must match)."""
        unwrap(self.student_model).load_state_dict(state['student'])
        self.generation.load_state_dict(state)
        self.optimizer.load_state_dict(state['optimizer'])
        load_optional_state('lr_scheduler', self.lr_scheduler, state['lr_scheduler'])
        self.stage_grad_count = int(state['stage_grad_count'])
        self.precision.load_state_dict(state.get('precision'))


def _applied(value: float) -> Tensor:
    """A loss tensor of ``value`` whose backward touches no model (a non-leaf, so it may be divided in place)."""
    return torch.tensor(float(value), requires_grad=True) * 1.0


def _torchdistill_view(train_config: dict) -> dict:
    """The ``train`` block as torchdistill's box may consume it: a copy (torchdistill edits it in place, e.g. the
    learning rate by ``lr_factor``), without ``teacher/student.wrapper`` (the data-free box runs the plain modules)
    or a training loader (it would only be loaded), and with a frozen teacher."""
    ignored = ('strategy', 'data_free', 'train_data_loader')
    if train_config.get('train_data_loader') is not None:
        logger.warning('train.train_data_loader is not used: a data-free run (train.strategy) trains on generated '
                       'samples; the real data only evaluates the student')
    view = copy.deepcopy({key: value for key, value in train_config.items() if key not in ignored})
    view.setdefault('teacher', {})['requires_grad'] = False  # parse_data_free refused anything else
    for role in ('teacher', 'student'):
        wrapper = view.get(role, {}).pop('wrapper', None)
        if wrapper is not None:
            key = wrapper.get('key') if isinstance(wrapper, dict) else wrapper
            logger.warning(f"train.{role}.wrapper '{key}' is not used: data-free training runs the plain {role} "
                           f"(higher and torch.func cannot go through a wrapper); under torchrun the box averages "
                           f"gradients across ranks itself")
    return view
