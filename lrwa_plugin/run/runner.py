"""One run of a config, in two phases: :func:`set_up` builds everything, :func:`execute` trains and tests.

``set_up`` reads the config once (:func:`lrwa_plugin.config.validate_config`), loads the teacher and builds the
student, the training box and its :class:`~lrwa_plugin.run.trainers.Trainer`, restores a ``--resume`` state, and checks
on the way everything a user can get wrong: each problem is a :class:`~lrwa_plugin.errors.ConfigError` (one line,
exit status 2) raised before anything is trained or written. Neither the parsed arguments nor the loaded config are
modified. ``execute`` runs the epochs — after each: top-1 on the validation split, the learning evolution beside
``dst_ckpt`` (:mod:`lrwa_plugin.run.evolution`), the trainer's after-evaluation work (sample grids), TensorBoard with
``--log_dir``, the best student to ``dst_ckpt`` (torchdistill's convention), and for a resumable trainer its whole
state to ``<dst_ckpt stem>.last.pt`` (:mod:`lrwa_plugin.run.resume`) — then tests the best student (and the teacher).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchdistill.common.constant import def_logger
from torchdistill.common.main_util import import_dependencies, set_seed
from torchdistill.core.distillation import get_distillation_box
from torchdistill.core.training import get_training_box
from torchdistill.datasets.util import build_data_loader

from ..box import DataFreeDistillationBox
from ..config.data_free import DataFreeConfig, validate_config
from ..errors import ConfigError
from ..precision import Precision, set_backend_flags, to_channels_last
from ..util import first_line
from .checkpoint import load_weights_strictly
from .distributed import World, any_rank, barrier, broadcast_float, device_for
from .evolution import evolution_path, write_evolution
from .files import RunLock, check_writable
from .loading import has_weights, load_config, load_model
from .resume import (
    Position,
    check_same_run,
    check_state_belongs,
    last_checkpoint_path,
    read_training_state,
    restore_training_state,
    run_identity,
    save_training_state,
)
from .stopping import RunStopped, StoppedAtOnce, StopRequest, stop_requests
from .trainers import DataFreeTrainer, SupervisedTrainer, Trainer, evaluate, save_student
from .visuals import TensorBoardLogger

logger = def_logger.getChild(__name__)


@dataclass
class Run:
    """A run that is set up: every model built, the start position known, nothing trained yet."""

    args: argparse.Namespace
    config_path: str
    config: dict
    config_text: str
    seed: int | None
    world: World
    device: torch.device
    teacher: nn.Module | None
    student: nn.Module
    student_key: str
    dst_ckpt: str
    trainer: Trainer | None  # None: -test_only
    position: Position = field(default_factory=Position)
    identity: dict[str, Any] = field(default_factory=dict)  # what its training state pins (run_identity)

    @property
    def teacher_key(self) -> str | None:
        teacher = self.config.get('models', {}).get('teacher_model')
        return None if teacher is None else teacher.get('key')


# ------------------------------------------------------------------------------------------------------ set-up
def build_trainer(teacher: nn.Module | None, student: nn.Module, config: dict, data_free: DataFreeConfig | None,
                  device: torch.device, world: World, args: argparse.Namespace, student_key: str) -> Trainer:
    """The training box and its trainer: data-free when ``train.strategy`` is set, else torchdistill's own.

    A data-free box does its own data parallelism (:mod:`lrwa_plugin.run.distributed`); torchdistill's boxes get
    torchdistill's (DDP, on CUDA only: on the CPU torchdistill wraps nothing, so ranks would train apart).
    """
    train_config = config['train']
    dataset_dict = config.get('datasets', {})
    distributed = world.distributed
    device_ids = [world.local_rank] if distributed and device.type == 'cuda' else None
    lr_factor = world.size if distributed and args.adjust_lr else 1
    if data_free is not None:
        box = DataFreeDistillationBox(teacher, student, dataset_dict, train_config, device, device_ids,
                                      distributed, lr_factor, world=world, data_free=data_free,
                                      precision=Precision(args.amp, device.type))
        val_id = train_config['val_data_loader']['dataset_id']
        trainer: Trainer = DataFreeTrainer(box, teacher, world, config.get('models', {}), student_key,
                                           (val_id, dataset_dict[val_id]))
    elif distributed and device.type != 'cuda':
        raise ConfigError('--world_size', "data-parallel training without train.strategy runs torchdistill's own "
                                          'box, which synchronises nothing on the CPU; use --device cuda or a single '
                                          'process')
    else:
        train_view = copy.deepcopy(train_config)  # torchdistill edits it in place (the learning rate by lr_factor)
        box = get_training_box(student, dataset_dict, train_view, device, device_ids, distributed, lr_factor) \
            if teacher is None else get_distillation_box(teacher, student, dataset_dict, train_view, device,
                                                         device_ids, distributed, lr_factor)
        trainer = SupervisedTrainer(box, device)
    if box.val_data_loader is None:
        raise ConfigError('train.val_data_loader', 'no validation dataset (dataset_id must name one of datasets)')
    return trainer


def set_up(config_path: str | os.PathLike, args: argparse.Namespace, world: World | None = None) -> Run:
    """Builds the run of ``config_path`` with the runner's flags ``args`` (see :mod:`lrwa_plugin.run.cli`, which
    checks the flags that need no config).

    Raises:
        ConfigError: anything in the config, its files or the flags that cannot work; nothing is written.
    """
    world = world or World()
    device = device_for(torch.device(args.device), world)
    set_backend_flags(device, tf32=args.tf32, deterministic=args.deterministic,
                      cudnn_benchmark=not args.disable_cudnn_benchmark)
    state = read_training_state(args.resume) if args.resume is not None else None
    seed = state['seed'] if state is not None and args.seed is None else args.seed
    set_seed(seed)
    config, data_free = _read_config(config_path, args)
    student_key, dst_ckpt = _student_output(config, args, data_free is not None)
    if args.resume is not None:
        check_state_belongs(args.resume, dst_ckpt, '--dst_ckpt' if args.dst_ckpt is not None
                            else f'models.{student_key}.dst_ckpt')
    amp = args.amp
    if amp is not None and data_free is None and not args.test_only:
        raise ConfigError('--amp', 'only data-free runs (train.strategy) autocast; a plain torchdistill run trains in '
                                   'float32')
    teacher = _load_teacher(config, data_free is not None, device, world)
    student = load_model(config['models'][student_key], student_key, device, world.distributed)
    trainer = None if args.test_only else build_trainer(teacher, student, config, data_free, device, world, args,
                                                        student_key)
    if args.channels_last:
        to_channels_last(teacher, student, getattr(trainer.box, 'generator', None) if trainer is not None else None)
    if trainer is not None and not trainer.resumable and (args.resume is not None or args.save_every):
        raise ConfigError(f"--{'resume' if args.resume is not None else 'save_every'}",
                          'only data-free runs (train.strategy) write and resume training states')
    config_text = Path(os.path.expanduser(str(config_path))).read_text()
    identity = run_identity(teacher) if trainer is not None and trainer.resumable else {}
    if state is not None:
        check_same_run(state, config_text, seed, world, args.resume, amp=amp, identity=identity)
    run = Run(args=args, config_path=str(config_path), config=config, config_text=config_text, seed=seed,
              world=world, device=device, teacher=teacher, student=student, student_key=student_key,
              dst_ckpt=dst_ckpt, trainer=trainer, position=Position(epoch=args.start_epoch), identity=identity)
    if trainer is not None:
        trainer.prepare()
    if state is not None:  # last: it sets the random streams the first step draws from
        run.position = restore_training_state(state, trainer.box, world)
        if run.position.epoch >= trainer.box.num_epochs:  # refused before anything is written
            raise ConfigError('--resume', f"the training state '{args.resume}' is at the end of epoch "
                                          f'{run.position.epoch - 1}, and train.num_epochs is '
                                          f'{trainer.box.num_epochs}: nothing is left to train; raise '
                                          'train.num_epochs to extend the run, or test its student with -test_only')
        logger.info(f'Resuming at epoch {run.position.epoch}, iteration {run.position.iteration}')
    return run


def _read_config(config_path: str | os.PathLike, args: argparse.Namespace) -> tuple[dict, DataFreeConfig | None]:
    """The loaded config, its dependencies imported, validated (:func:`lrwa_plugin.config.validate_config`), with
    ``--start_epoch`` inside its epochs."""
    config = load_config(config_path)
    try:
        import_dependencies(config.get('dependencies'))
    except (ImportError, AttributeError, TypeError, KeyError) as error:
        raise ConfigError('dependencies', first_line(error)) from error
    data_free = validate_config(config, training=not args.test_only)
    num_epochs = config.get('train', {}).get('num_epochs')
    if not args.test_only and isinstance(num_epochs, int) and not 0 <= args.start_epoch < num_epochs:
        raise ConfigError('--start_epoch', f'expected an epoch from 0 to train.num_epochs - 1 = {num_epochs - 1}, got '
                                           f'{args.start_epoch}')
    return config, data_free


def _student_output(config: dict, args: argparse.Namespace, data_free: bool) -> tuple[str, str]:
    """The student's key (``student_model`` or ``model``) and ``dst_ckpt`` (``--dst_ckpt`` first), with every file
    and folder the run will write checked before anything is built."""
    models_config = config.get('models', {})
    student_key = 'student_model' if 'student_model' in models_config else 'model'
    if student_key not in models_config:
        raise ConfigError('models', 'expected `student_model` (distillation) or `model` (training)')
    dst_ckpt = args.dst_ckpt if args.dst_ckpt is not None else models_config[student_key].get('dst_ckpt')
    if dst_ckpt is None:
        raise ConfigError(f'models.{student_key}.dst_ckpt', 'missing (where the trained student is written)')
    dst_ckpt = os.path.expanduser(str(dst_ckpt))
    dst_key = '--dst_ckpt' if args.dst_ckpt is not None else f'models.{student_key}.dst_ckpt'
    if args.test_only and not os.path.isfile(dst_ckpt):
        raise ConfigError(dst_key, f"-test_only: no trained student at '{dst_ckpt}'")
    if not args.test_only:
        check_writable(*outputs_of(dst_ckpt, dst_key, args, data_free))
    return student_key, dst_ckpt


def _load_teacher(config: dict, data_free: bool, device: torch.device, world: World) -> nn.Module | None:
    """``models.teacher_model`` with its weights (a data-free run refuses a teacher without any)."""
    teacher_config = config.get('models', {}).get('teacher_model')
    if data_free and (teacher_config is None or not has_weights(teacher_config)):
        raise ConfigError('models.teacher_model', 'a data-free run needs a trained teacher: give src_ckpt '
                                                  '(or kwargs.checkpoint_path for timm_model)')
    return None if teacher_config is None else load_model(teacher_config, 'teacher_model', device, world.distributed)


def outputs_of(dst_ckpt: str, key: str, args: argparse.Namespace, data_free: bool
               ) -> tuple[list[tuple[str | Path, str]], list[tuple[str | Path, str]]]:
    """Every file and folder a training run writes, each with the key or flag that names it."""
    files: list[tuple[str | Path, str]] = [(dst_ckpt, key), (evolution_path(dst_ckpt), key),
                                           (Path(dst_ckpt).with_name(Path(dst_ckpt).name + '.lock'), key)]
    folders: list[tuple[str | Path, str]] = []
    if data_free:
        files.append((last_checkpoint_path(dst_ckpt), key))
        if not args.no_sample_grids:
            stem = Path(dst_ckpt)
            folders.append((stem.with_name(stem.stem + '.samples'), key))
    if args.log_dir:
        folders.append((args.log_dir, '--log_dir'))
    return files, folders


# ---------------------------------------------------------------------------------------------------- execution
def train(run: Run) -> dict[str, float]:
    """Runs the epochs from ``run.position``; returns the best and last validation top-1 (see the module docstring).

    In a data-parallel run rank 0 evaluates and writes files; the other ranks receive its accuracy. A SIGINT or
    SIGTERM stops the run at the next boundary with its training state saved there (:mod:`lrwa_plugin.run.stopping`).
    """
    args, trainer = run.args, run.trainer
    tensorboard = TensorBoardLogger(args.log_dir) if args.log_dir and run.world.is_main else None
    start = time.time()
    with stop_requests() as request:
        loop = _EpochLoop(run, request, tensorboard)
        try:
            for epoch in range(run.position.epoch, trainer.box.num_epochs):
                loop.epoch(epoch)
        except StoppedAtOnce as stop:
            raise loop.stopped_at_once(stop.signum) from None
    logger.info('Training time %s', datetime.timedelta(seconds=int(time.time() - start)))
    if tensorboard is not None:
        tensorboard.close()
    trainer.close()
    barrier(run.world)  # rank 0 has written dst_ckpt before any rank reads it
    at = loop.at
    return {'best_val_top1': at.best, 'last_val_top1': at.history[-1] if at.history else math.nan}


class _EpochLoop:
    """One run's epochs: each trained, evaluated, recorded; the training state saved where the run may stop."""

    def __init__(self, run: Run, request: StopRequest, tensorboard: TensorBoardLogger | None) -> None:
        self.run, self.request, self.tensorboard = run, request, tensorboard
        self.trainer, self.world, self.args = run.trainer, run.world, run.args
        self.at = Position(run.position.epoch, run.position.iteration, list(run.position.history), run.position.best)
        self.last_path = last_checkpoint_path(run.dst_ckpt)
        # where the training state on disk continues from (a resumed run's state is still there)
        self.saved_at = (run.position.epoch, run.position.iteration) if run.args.resume is not None else None

    def save_state(self, epoch: int, iteration: int) -> None:
        with self.request.writing():
            save_training_state(self.last_path, self.trainer.box,
                                Position(epoch, iteration, self.at.history, self.at.best), self.world,
                                self.run.config_text, self.run.seed, self.run.identity)
            self.saved_at = (epoch, iteration)

    def stopped_at_once(self, signum: int) -> RunStopped:
        """A second signal stopped the run mid-step: the last training state written, if any, continues it."""
        resumable = self.trainer.resumable and self.saved_at is not None
        where = f'epoch {self.saved_at[0]}, iteration {self.saved_at[1]}' if self.saved_at is not None else ''
        return RunStopped(signum, where, str(self.last_path) if resumable else None, at_once=True,
                          resumable=self.trainer.resumable)

    def stop_if_asked(self, epoch: int, iteration: int) -> None:
        """Honours a SIGINT / SIGTERM: the state where the run stands (as --save_every writes it), then RunStopped."""
        if not self.request.requested(self.world):
            return
        if self.trainer.resumable:
            self.save_state(epoch, iteration)
        raise RunStopped(self.request.signum or signal.SIGTERM, f'epoch {epoch}, iteration {iteration}',
                         str(self.last_path) if self.trainer.resumable else None, resumable=self.trainer.resumable)

    def on_iteration(self, epoch: int, iteration: int, losses: dict[str, float]) -> None:
        done = epoch * self.trainer.iterations_per_epoch + iteration + 1
        if self.tensorboard is not None:
            self.tensorboard.scalars('train', losses, done - 1)
        if iteration + 1 < self.trainer.iterations_per_epoch:  # the epoch's last is followed by the epoch-end state
            if self.args.save_every and done % self.args.save_every == 0:
                self.save_state(epoch, iteration + 1)
            self.stop_if_asked(epoch, iteration + 1)

    def epoch(self, epoch: int) -> None:
        run, trainer, world, at = self.run, self.trainer, self.world, self.at
        box = trainer.box
        box.pre_epoch_process(epoch=epoch)
        start_iteration = at.iteration if epoch == at.epoch else 0
        progress = not self.args.no_progress and world.is_main
        losses = trainer.train_epoch(epoch, start_iteration, progress, self.on_iteration)
        accuracy = evaluate(run.student, box.val_data_loader, run.device) if world.is_main else math.nan
        accuracy = broadcast_float(accuracy, world, run.device)
        at.history.append(accuracy)
        loss_text = '  '.join(f'{k} {v:.4g}' for k, v in losses.items())
        logger.info(f'Epoch {epoch}: val top-1 {accuracy:.2f}%  {loss_text}')
        if world.is_main:
            write_evolution(run.dst_ckpt, at.history, run.config_path, run.seed)
            if self.tensorboard is not None:
                self.tensorboard.scalars('val', {'top1': accuracy}, epoch)
            if not self.args.no_sample_grids:
                trainer.after_evaluation(epoch, run.dst_ckpt, self.tensorboard)
        if accuracy > at.best:
            at.best = accuracy
            if world.is_main:
                save_student(run.dst_ckpt, run.student, trainer, at.best, vars(self.args))
        trainer.post_epoch(accuracy)
        if trainer.resumable:
            self.save_state(epoch + 1, 0)
        if epoch + 1 < box.num_epochs:
            self.stop_if_asked(epoch + 1, 0)


def execute(run: Run) -> dict[str, float]:
    """Trains (unless ``-test_only``), then tests the best student and the teacher; returns top-1 in percent."""
    if run.args.log_config:
        logger.info(run.config)
    results: dict[str, float] = {}
    if run.trainer is not None:
        results.update(train(run))
    load_weights_strictly(run.student, run.dst_ckpt, what=f'models.{run.student_key}.dst_ckpt')
    test_loader_config = run.config['test']['test_data_loader']
    # Every rank tests on the whole split (no DistributedSampler); only rank 0 prints.
    test_loader = build_data_loader(run.config['datasets'][test_loader_config['dataset_id']], test_loader_config,
                                    False)
    if run.teacher is not None and not run.args.student_only:
        results['teacher_top1'] = evaluate(run.teacher, test_loader, run.device)
        logger.info(f"[Teacher: {run.teacher_key}] test top-1 {results['teacher_top1']:.2f}%")
    role = 'student' if run.student_key == 'student_model' else 'model'
    results[f'{role}_top1'] = evaluate(run.student, test_loader, run.device)
    student_key = run.config['models'][run.student_key]['key']
    logger.info(f"[{role.capitalize()}: {student_key}] test top-1 {results[f'{role}_top1']:.2f}%")
    return results


def run_config(config_path: str | os.PathLike, args: argparse.Namespace, world: World | None = None
               ) -> dict[str, Any]:
    """:func:`set_up`, then :func:`execute` while holding the run's lock on its checkpoint."""
    run = set_up(config_path, args, world)
    with locked(run):
        return execute(run)


@contextlib.contextmanager
def locked(run: Run) -> Iterator[None]:
    """Holds ``<dst_ckpt>.lock`` (rank 0, for every rank) while a training run executes (:class:`RunLock`)."""
    if run.trainer is None:  # -test_only reads only
        yield
        return
    key = '--dst_ckpt' if run.args.dst_ckpt is not None else f'models.{run.student_key}.dst_ckpt'
    lock = RunLock(run.dst_ckpt, key)
    refusal: ConfigError | None = None
    if run.world.is_main:
        try:
            lock.acquire()
        except ConfigError as error:
            refusal = error
    if any_rank(refusal is not None, run.world):
        raise refusal or ConfigError(key, 'rank 0 could not lock the checkpoint: another run is writing to it')
    try:
        yield
    finally:
        lock.release()
