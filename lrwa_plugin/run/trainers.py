"""What the runner trains with: one small protocol (:class:`Trainer`) and its two kinds.

* :class:`DataFreeTrainer` wraps :class:`lrwa_plugin.box.DataFreeDistillationBox` (``train.strategy`` set): its
  epochs are generator iterations, it writes sample grids after each evaluation and its whole state can be saved and
  resumed (:mod:`lrwa_plugin.run.resume`).
* :class:`SupervisedTrainer` wraps torchdistill's own boxes (a plain config, e.g. the teacher's): its epochs are its
  training loader.

The runner (:mod:`lrwa_plugin.run.runner`) drives either the same way, so it never asks which one it has.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..box import DataFreeDistillationBox
from ..config.checks import rng_untouched
from ..errors import ConfigError, NonFiniteLossError
from ..models.sample_shape import check_sample_shape
from ..util import first_line, modes_kept, unwrap
from .checkpoint import atomic_save
from .distributed import World, broadcast_module_state, seed_rank
from .visuals import TensorBoardLogger, save_sample_grid, teacher_predictions

OnIteration = Callable[[int, int, dict[str, float]], None]
"""Called after every iteration with ``(epoch, iteration, losses)`` (TensorBoard, training-state saves)."""


class Trainer(Protocol):
    """What the runner needs of a training box.

    Attributes:
        box: the torchdistill box (``optimizer``, ``lr_scheduler``, ``val_data_loader``, ``num_epochs``, ...).
        resumable: whether its state can be saved and resumed (``--save_every``, ``--resume``).
    """

    box: Any
    resumable: ClassVar[bool]

    @property
    def iterations_per_epoch(self) -> int: ...

    def prepare(self) -> None:
        """Checks made once everything is built, before the first step; data-parallel start-up."""

    def train_epoch(self, epoch: int, start_iteration: int, progress: bool,
                    on_iteration: OnIteration | None) -> dict[str, float]:
        """Trains one epoch from ``start_iteration``; returns the last loss values."""

    def after_evaluation(self, epoch: int, dst_ckpt: str | os.PathLike,
                         tensorboard: TensorBoardLogger | None) -> None:
        """After the epoch's evaluation, on the main rank (sample grids)."""

    def post_epoch(self, accuracy: float) -> None:
        """torchdistill's post-epoch process (epoch-level scheduling, with the accuracy as its metric)."""

    def checkpoint_extras(self) -> dict[str, Any]:
        """What the best-student checkpoint holds beside torchdistill's keys."""

    def close(self) -> None: ...


def progress_bar(iterable: Iterable, desc: str, enabled: bool, initial: int = 0, total: int | None = None) -> tqdm:
    """The one progress bar of a training epoch (disabled with ``-no_progress`` and on ranks > 0)."""
    return tqdm(iterable, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True, initial=initial,
                total=total)


def _postfix(bar: tqdm, losses: dict[str, float]) -> None:
    bar.set_postfix({k: f'{v:.4g}' for k, v in losses.items()}, refresh=False)


# ------------------------------------------------------------------------------------------------- data-free
class DataFreeTrainer:
    """Trains with :class:`~lrwa_plugin.box.DataFreeDistillationBox`.

    Args:
        box: the data-free box.
        teacher: the teacher (for the sample grids' labels).
        world: this process's place in a ``torchrun`` run.
        models_config: the ``models`` block (to name the student's ``num_classes`` in a message).
        student_key: ``'student_model'``.
        evaluation: ``(dataset id, dataset)`` the student is evaluated on: generated samples must look like its.
    """

    resumable: ClassVar[bool] = True

    def __init__(self, box: DataFreeDistillationBox, teacher: nn.Module, world: World, models_config: dict,
                 student_key: str, evaluation: tuple[str, Any] | None = None) -> None:
        self.box, self.teacher, self.world = box, teacher, world
        self.models_config, self.student_key = models_config, student_key
        self.evaluation = evaluation

    @property
    def iterations_per_epoch(self) -> int:
        return self.box.iterations_per_epoch

    def prepare(self) -> None:
        check_models_agree(self.box, self.models_config, self.student_key, self.evaluation)
        box = self.box
        # Every rank starts from rank 0's weights, then draws its own z.
        broadcast_module_state([box.student_model, box.generator, *(box.replay.modules() if box.replay else [])],
                               self.world)
        seed_rank(self.world)

    def train_epoch(self, epoch: int, start_iteration: int, progress: bool,
                    on_iteration: OnIteration | None) -> dict[str, float]:
        box = self.box
        bar = progress_bar(range(start_iteration, box.iterations_per_epoch), f'Epoch {epoch}', progress,
                           initial=start_iteration, total=box.iterations_per_epoch)
        losses: dict[str, float] = {}
        for iteration in bar:
            losses = box.train_iteration(epoch, iteration)
            _postfix(bar, losses)
            if on_iteration is not None:
                on_iteration(epoch, iteration, losses)
        box.finish_epoch(epoch)
        return losses

    def after_evaluation(self, epoch: int, dst_ckpt: str | os.PathLike,
                         tensorboard: TensorBoardLogger | None) -> None:
        save_sample_grids(self.box, self.teacher, dst_ckpt, epoch, tensorboard)

    def post_epoch(self, accuracy: float) -> None:
        self.box.post_epoch_process(metrics=accuracy)

    def checkpoint_extras(self) -> dict[str, Any]:
        return {'generator': self.box.generator.state_dict()}

    def close(self) -> None:
        self.box.clean_modules()


def save_sample_grids(box: DataFreeDistillationBox, teacher: nn.Module, dst_ckpt: str | os.PathLike, epoch: int,
                      tensorboard: TensorBoardLogger | None) -> None:
    """``<dst_ckpt stem>.samples/epoch_NNN_{generated,replayed}.png``: the newest generated batch and a replayed one,
    the teacher's class under each image."""
    ckpt = Path(os.path.expanduser(os.fspath(dst_ckpt)))
    directory = ckpt.with_name(ckpt.stem + '.samples')
    teacher.eval()
    for kind, images in box.monitor_batches().items():
        labels = teacher_predictions(teacher, images)
        save_sample_grid(images, labels, directory / f'epoch_{epoch:03d}_{kind}.png',
                         title=f'{kind} samples after epoch {epoch} (teacher class under each)')
        if tensorboard is not None:
            tensorboard.image(f'samples/{kind}', images, epoch)


def _forward(model: nn.Module, x: Tensor, path: str, what: str) -> Any:
    try:
        return model(x)
    except (RuntimeError, ValueError, TypeError) as error:
        raise ConfigError(path, f'a generated batch of shape {tuple(x.shape)} cannot go through the {what}: '
                                f'{first_line(error)}') from error


def _sample_shape(dataset: Any) -> tuple[int, ...] | None:
    """The shape of one sample of an evaluation dataset (``dataset[0][0]``), if it is a tensor."""
    try:
        sample = dataset[0][0]
    except Exception:  # a dataset that cannot be indexed that way: nothing to compare
        return None
    return tuple(sample.shape) if isinstance(sample, Tensor) else None


def _classes(dataset: Any) -> int | None:
    classes = getattr(dataset, 'num_classes', None) or len(getattr(dataset, 'classes', ()) or ()) or None
    return classes if isinstance(classes, int) else None


def check_models_agree(box: DataFreeDistillationBox, models_config: dict, student_key: str = 'student_model',
                       evaluation: tuple[str, Any] | None = None) -> None:
    """One forward of two generated samples through teacher and student: their class counts must agree, and the
    samples must have the shape of the data the student is evaluated on (a fully convolutional teacher takes any
    size, so a generator of the wrong ``img_size`` would train a student for data it never sees).

    Runs in eval mode under ``no_grad`` with the global random generator restored afterwards, so no BatchNorm
    statistics move and the run draws exactly what it would without the check.

    Raises:
        ConfigError: the generated batch does not go through a model, has another shape than the evaluation data,
            or the class counts differ.
    """
    generator = unwrap(box.generator)
    teacher, student = unwrap(box.teacher_model), unwrap(box.student_model)
    with rng_untouched(), torch.no_grad(), modes_kept(generator, teacher, student, eval_mode=True):
        try:
            x = generator(generator.sample_latent(2, device=box.device))
        except (RuntimeError, ValueError, TypeError) as error:
            raise ConfigError('train.data_free.generator.kwargs',
                              f'the generator cannot produce a batch: {first_line(error)}') from error
        if evaluation is not None:
            dataset_id, dataset = evaluation
            check_sample_shape(tuple(x.shape[1:]), _sample_shape(dataset), 'train.data_free.generator',
                               'the student is evaluated on', f'datasets.{dataset_id}')
        teacher_out = _forward(teacher, x, 'train.data_free.generator', 'teacher')
        student_out = _forward(student, x, f'models.{student_key}', 'student')
    if not (isinstance(teacher_out, Tensor) and isinstance(student_out, Tensor)
            and teacher_out.dim() == 2 and student_out.dim() == 2):
        return  # not plain logits (e.g. a dict of outputs): nothing to compare
    if teacher_out.shape[1] != student_out.shape[1]:
        student_kwargs = models_config.get(student_key, {}).get('kwargs') or {}
        path = f'models.{student_key}' + ('.kwargs.num_classes' if 'num_classes' in student_kwargs else '')
        raise ConfigError(path, f'the student predicts {student_out.shape[1]} classes but the teacher '
                                f'(models.teacher_model) {teacher_out.shape[1]}; they must agree')
    classes = _classes(evaluation[1]) if evaluation is not None else None
    if classes is not None and teacher_out.shape[1] != classes:
        raise ConfigError('models.teacher_model', f'the teacher predicts {teacher_out.shape[1]} classes but the '
                                                  f'evaluation data (datasets.{evaluation[0]}) has {classes}')


# ------------------------------------------------------------------------------------------------ supervised
class SupervisedTrainer:
    """Trains with torchdistill's own training or distillation box, on its ``train_data_loader``."""

    resumable: ClassVar[bool] = False

    def __init__(self, box: Any, device: torch.device) -> None:
        self.box, self.device = box, device

    @property
    def iterations_per_epoch(self) -> int:
        return len(self.box.train_data_loader)

    def prepare(self) -> None:
        return None

    def train_epoch(self, epoch: int, start_iteration: int, progress: bool,
                    on_iteration: OnIteration | None) -> dict[str, float]:
        box = self.box
        losses: dict[str, float] = {}
        bar = progress_bar(box.train_data_loader, f'Epoch {epoch}', progress)
        for iteration, (sample_batch, targets, supp_dict) in enumerate(bar):
            loss = box.forward_process(sample_batch.to(self.device), targets.to(self.device), supp_dict)
            value = float(loss.detach())
            if not torch.isfinite(loss.detach()):
                raise NonFiniteLossError(f'non-finite loss at epoch {epoch}, iteration {iteration}: loss = {value}; '
                                         'training stopped before the optimizer applied it')
            box.post_forward_process(loss=loss)
            losses = {'loss': value}
            _postfix(bar, losses)
            if on_iteration is not None:
                on_iteration(epoch, iteration, losses)
        return losses

    def after_evaluation(self, epoch: int, dst_ckpt: str | os.PathLike,
                         tensorboard: TensorBoardLogger | None) -> None:
        return None

    def post_epoch(self, accuracy: float) -> None:
        self.box.post_epoch_process(metrics=accuracy)

    def checkpoint_extras(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        self.box.clean_modules()


# ------------------------------------------------------------------------------------------- evaluation, files
@torch.inference_mode()
def evaluate(model: nn.Module, data_loader: Iterable, device: torch.device, progress: bool = False,
             desc: str = 'eval') -> float:
    """Top-1 accuracy in percent over ``data_loader`` (batches ``(x, y)`` or ``(x, y, supp_dict)``)."""
    correct, total = 0, 0
    with modes_kept(model, eval_mode=True):
        for batch in tqdm(data_loader, desc=desc, disable=not progress, leave=False):
            x, y = batch[0].to(device), batch[1].to(device)
            correct += int((model(x).argmax(dim=1) == y).sum())
            total += len(y)
    return 100.0 * correct / max(total, 1)


def save_student(path: str | os.PathLike, student: nn.Module, trainer: Trainer, best_value: float,
                 args: dict[str, Any]) -> None:
    """Writes the best student in torchdistill's checkpoint layout (plus the trainer's extras), atomically."""
    box = trainer.box
    ckpt = {'model': unwrap(student).state_dict(), 'optimizer': box.optimizer.state_dict(), 'best_value': best_value,
            'lr_scheduler': box.lr_scheduler.state_dict() if box.lr_scheduler is not None else None,
            'args': {k: v for k, v in args.items() if isinstance(v, (str, int, float, bool, type(None)))},
            **trainer.checkpoint_extras()}
    atomic_save(ckpt, os.path.expanduser(os.fspath(path)))
