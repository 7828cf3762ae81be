"""``DataFreeDistillationBox``: torchdistill's ``DistillationBox`` with the data-free training iteration.

torchdistill builds everything it already knows from the YAML — the frozen teacher, the student, their forward
hooks, the student criterion, optimizer and scheduler, the validation loader — and this box adds what data-free
distillation needs, from ``train.data_free``: a generator (with its own optimizer and criterion), a replay memory and
a strategy (``train.strategy``: dfad | mb_dfkd | pre_dfkd | lrwa). One iteration (Patel, Mopuri, Qiu, CVPR 2023):

1. generator step(s): ``x = G(z)``; the generator minimises its criterion (adversarial term plus priors such as
   BatchNorm-statistics matching) through the frozen teacher and the student;
2. student step(s): ``x = G(z)`` without gradient, a replay batch ``x_m`` from the memory, teacher logits for both;
   the strategy leaves the student gradient in ``.grad`` and torchdistill's optimizer steps (clipping and step-wise
   scheduling as in torchdistill);
3. after every student step, the replay memory observes that step's batch (a ``MemoryBank`` pushes the epoch's last
   one, a ``GenerativeReplay`` trains its VAE on some of them).

Under ``torchrun`` (``world``, :mod:`lrwa_plugin.distributed`) every backward is followed by a bucketed average of the
gradients across ranks, and every iteration ends with rank 0's BatchNorm statistics broadcast to the others; each
rank samples its own ``z`` and keeps its own replay memory. :meth:`state_dict` / :meth:`load_state_dict` carry what
:mod:`lrwa_plugin.resume` needs to continue a run exactly.

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
from collections.abc import Callable, Iterable
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

from .distributed import GradientAverager, World, any_rank, broadcast_module_state
from .losses import BN_STATS_PATH, TeacherBNStatistics
from .models.generators import check_generator_fits_teacher
from .registry import get_replay, get_strategy
from .replay import ReplayMemory

logger = def_logger.getChild(__name__)


class NonFiniteLossError(RuntimeError):
    """A loss or gradient became NaN or infinite: training stops before the optimizer applies it.

    The message is one line naming the step (epoch, iteration, generator or student step) and the loss values; the
    runner prints it and exits with status 3, and nothing is saved over the last checkpoint.
    """


class DataFreeDistillationBox(DistillationBox):
    """A ``DistillationBox`` whose samples come from a generator instead of a data loader.

    Args are torchdistill's (see ``torchdistill.core.distillation.DistillationBox``); ``train_config`` has the
    two extra keys ``strategy`` and ``data_free`` shown in the module docstring.
    """

    def __init__(self, teacher_model: nn.Module, student_model: nn.Module, dataset_dict: dict,
                 train_config: dict, device: torch.device, device_ids: list[int] | None, distributed: bool,
                 lr_factor: float = 1, accelerator: Any = None, world: World | None = None) -> None:
        # Data parallelism is the box's own (lrwa_plugin.distributed): torchdistill sees a single process, so it
        # wraps nothing in DDP and its validation loader covers the whole split (evaluated on rank 0).
        self.world = world or World()
        _drop_wrappers(train_config)
        distributed = False
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
        check_generator_fits_teacher(self.generator, self._unwrapped(self.teacher_model), 'train.data_free.generator')
        self.replay = self._build_replay(data_free.get('replay'))
        self.bn_statistics = TeacherBNStatistics(self._unwrapped(self.teacher_model))
        self.last_losses: dict[str, float] = {}
        self.student_averager = GradientAverager(self.student_model.parameters(), self.world)
        self.generator_averager = GradientAverager(self.generator.parameters(), self.world)
        if self.replay is not None:
            self.replay.seed_rank(self.world.rank)

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
        kinds = self.strategy.replay_kinds
        if not kinds:
            if replay_config:
                raise ValueError(f"train.data_free.replay is set but strategy '{self.strategy_key}' uses no replay")
            return None
        if not replay_config:
            raise ValueError(f"strategy '{self.strategy_key}' needs train.data_free.replay (key: one of "
                             f"{', '.join(kinds)})")
        key = replay_config.get('key')
        if key not in kinds:
            raise ValueError(f"train.data_free.replay.key: '{key}' cannot be used with strategy '{self.strategy_key}'; "
                             f"allowed: {', '.join(kinds)}")
        replay = get_replay(key, **replay_config.get('kwargs', {}))
        replay.attach(self._unwrapped(self.teacher_model), self.device)
        return replay

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
        io_dict = {'teacher': teacher_io, 'student': student_io}
        loss = self.generator_criterion(io_dict, {}, None)
        self._check_finite({'gen': loss}, lambda: _loss_terms(self.generator_criterion, io_dict), {'generated': x})
        self.generator_optimizer.zero_grad(set_to_none=True)
        # inputs=: the student's parameters must not collect gradient from the generator's objective.
        loss.backward(inputs=list(self.generator.parameters()))
        self.generator_averager()
        self._check_finite_gradient('generator', self.generator.parameters(), {'gen': loss})
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
        self.student_averager()

        def acquisition_terms() -> dict[str, float]:
            # At θ, as acquired; L_Ret of lrwa is taken at θ' and is only reported as its total.
            io_dict = {'teacher': teacher_io, 'student': self._student_io(self.student_model, x)}
            return {f'acq.{name}': value for name, value in _loss_terms(self.criterion, io_dict).items()}

        self._check_finite(losses, acquisition_terms, {'generated': x, 'replayed': x_m})
        self._check_finite_gradient('student', self.student_model.parameters(), losses)
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

    #: Where training is (set by :meth:`train_iteration`), for the message of a :class:`NonFiniteLossError`.
    _at: str = 'a step outside train_iteration'
    _STOPPED = 'training stopped before the optimizer applied it; nothing was saved over the last checkpoint'

    def _check_finite(self, losses: dict[str, Tensor | float], terms: Callable[[], dict[str, float]] | None = None,
                      batches: dict[str, Tensor | None] | None = None) -> None:
        """Raises :class:`NonFiniteLossError` if a loss is NaN or infinite, naming the step and every value.

        Only then are the criterion's weighted sub terms computed (``terms``) and the non-finite values of the
        input batches counted, so a healthy step pays one ``isfinite`` per loss.
        """
        values = _loss_values(losses)
        finite = all(math.isfinite(v) for v in values.values())
        # Under torchrun every rank learns of it here, so no rank waits in a collective that will never come.
        if any_rank(not finite, self.world) and finite:
            raise NonFiniteLossError(f'rank {self.world.rank}: another rank saw a non-finite loss at {self._at}; '
                                     f'{self._STOPPED}')
        if finite:
            return
        details = _format_values(values)
        if terms is not None:
            with torch.no_grad():
                term_values = terms()
            if term_values:
                details += f' (terms: {_format_values(term_values)})'
        for kind, batch in (batches or {}).items():
            if batch is not None and not bool(torch.isfinite(batch).all()):
                details += f'; {kind} batch: {int((~torch.isfinite(batch)).sum())} of {batch.numel()} values non-finite'
        where = f'rank {self.world.rank}: ' if self.world.distributed else ''
        raise NonFiniteLossError(f'{where}non-finite loss at {self._at}: {details}; {self._STOPPED}')

    def _check_finite_gradient(self, model: str, parameters: Iterable[nn.Parameter],
                               losses: dict[str, Tensor | float]) -> None:
        """Raises :class:`NonFiniteLossError` if the total gradient norm of ``parameters`` is NaN or infinite."""
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            return
        norm = float(torch.nn.utils.get_total_norm(grads))  # one fused norm over every gradient
        if not math.isfinite(norm):
            raise NonFiniteLossError(f'non-finite gradient norm of the {model} ({norm}) at {self._at} with finite '
                                     f'losses {_format_values(_loss_values(losses))}; {self._STOPPED}')

    def train_iteration(self, epoch: int, iteration: int) -> dict[str, float]:
        """Generator step(s), student step(s), replay update; returns the last loss values."""
        losses: dict[str, float] = {}
        for step in range(self.generator_steps):
            self._at = f'epoch {epoch}, iteration {iteration}, generator step {step}'
            losses['gen'] = self.generator_step()
        last_iteration = iteration == self.iterations_per_epoch - 1
        for step in range(self.student_steps):
            self._at = f'epoch {epoch}, iteration {iteration}, student step {step}'
            x, student_losses = self.student_step()
            losses.update(student_losses)
            if self.replay is not None:  # every student batch; a MemoryBank keeps the epoch's last one
                self.replay.observe(x, epoch, iteration, last_iteration and step == self.student_steps - 1)
        if self.replay is not None:
            losses.update(self.replay.log_values())
        # BatchNorm statistics moved with each rank's own batches: rank 0's win, as under DDP.
        broadcast_module_state([self.student_model, self.generator], self.world, buffers_only=True)
        self.last_losses = losses
        return losses

    def pre_epoch_process(self, epoch: int | None = None, **kwargs: Any) -> None:
        super().pre_epoch_process(epoch=epoch, **kwargs)
        self.teacher_model.eval()
        self.student_model.train()

    def train_one_epoch(self, epoch: int, progress: bool = True,
                        on_iteration: Callable[[int, int, dict[str, float]], None] | None = None,
                        start_iteration: int = 0) -> dict[str, float]:
        """Runs iterations ``start_iteration`` .. ``iterations_per_epoch - 1`` with a progress bar.

        ``on_iteration(epoch, iteration, losses)`` is called after each iteration (TensorBoard, checkpoints).
        Returns the last loss values (``{}`` when no iteration was left to run).
        """
        bar = tqdm(range(start_iteration, self.iterations_per_epoch), desc=f'Epoch {epoch}', disable=not progress,
                   leave=False, dynamic_ncols=True, initial=start_iteration, total=self.iterations_per_epoch)
        losses: dict[str, float] = {}
        for iteration in bar:
            losses = self.train_iteration(epoch, iteration)
            bar.set_postfix({k: f'{v:.4g}' for k, v in losses.items()}, refresh=False)
            if on_iteration is not None:
                on_iteration(epoch, iteration, losses)
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

    # ------------------------------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """What every rank shares: student, generator, their optimizers and schedulers, the step counter."""
        def optional(obj: Any) -> Any:
            return None if obj is None else obj.state_dict()
        return {'student': self._unwrapped(self.student_model).state_dict(),
                'generator': self.generator.state_dict(),
                'optimizer': self.optimizer.state_dict(), 'lr_scheduler': optional(self.lr_scheduler),
                'generator_optimizer': self.generator_optimizer.state_dict(),
                'generator_scheduler': optional(self.generator_scheduler),
                'stage_grad_count': self.stage_grad_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` (strict: every module, optimizer and scheduler must match)."""
        self._unwrapped(self.student_model).load_state_dict(state['student'])
        self.generator.load_state_dict(state['generator'])
        self.optimizer.load_state_dict(state['optimizer'])
        self.generator_optimizer.load_state_dict(state['generator_optimizer'])
        for name, scheduler in (('lr_scheduler', self.lr_scheduler), ('generator_scheduler', self.generator_scheduler)):
            if (scheduler is None) != (state[name] is None):
                raise ValueError(f'{name}: the checkpoint has {"none" if state[name] is None else "one"}, '
                                 f'the config {"none" if scheduler is None else "one"}')
            if scheduler is not None:
                scheduler.load_state_dict(state[name])
        self.stage_grad_count = int(state['stage_grad_count'])


def _drop_wrappers(train_config: dict) -> None:
    """Removes ``train.teacher/student.wrapper``: the data-free box runs the plain modules (see distributed.py)."""
    for role in ('teacher', 'student'):
        wrapper = train_config.get(role, {}).pop('wrapper', None)
        if wrapper is not None:
            key = wrapper.get('key') if isinstance(wrapper, dict) else wrapper
            logger.warning(f"train.{role}.wrapper '{key}' is not used: data-free training runs the plain {role} "
                           f"(higher and torch.func cannot go through a wrapper); under torchrun the box averages "
                           f"gradients across ranks itself")


def _loss_values(losses: dict[str, Tensor | float]) -> dict[str, float]:
    return {name: float(v.detach()) if isinstance(v, Tensor) else float(v) for name, v in losses.items()}


def _format_values(values: dict[str, float]) -> str:
    return ', '.join(f'{name} = {value:.6g}' for name, value in values.items())


def _loss_terms(criterion: nn.Module, io_dict: dict) -> dict[str, float]:
    """The weighted sub terms of a torchdistill ``WeightedSumLoss`` (``{}`` for another criterion), as floats."""
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
