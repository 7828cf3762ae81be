"""The runner behind ``examples/run_torchdistill.py``: torchdistill's example flags, plus data-free strategies.

``python examples/run_torchdistill.py --config X.yaml`` runs a torchdistill config. With ``train.strategy``
(``lrwa`` | ``mb_dfkd`` | ``dfad``) the student is trained data-free by
:class:`lrwa_plugin.box.DataFreeDistillationBox`; without it the config runs as torchdistill's own
``examples/torchvision/image_classification.py`` would run it (that is how the digits teacher is trained). With no
``--config`` it runs the offline digits demo: it trains the teacher if its checkpoint is missing, then distils a
student with ``strategy: lrwa`` and prints both accuracies.

Mistakes found while building the run (a missing checkpoint, an unknown key, a value out of range: see
:mod:`lrwa_plugin.validation`) end it before any training with a one-line ``error:`` and exit status 2. A loss or
gradient that becomes NaN or infinite stops training with a one-line ``error:`` naming the step and exit status 3,
leaving the last checkpoint as it was. Anything else keeps its traceback.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torchdistill.common import yaml_util
from torchdistill.common.constant import def_logger
from torchdistill.common.main_util import import_dependencies, set_seed, setup_for_distributed
from torchdistill.common.module_util import check_if_wrapped
from torchdistill.core.distillation import get_distillation_box
from torchdistill.core.training import get_training_box
from torchdistill.datasets.util import build_data_loader
from torchdistill.misc.log import set_basic_log_config, setup_log_file
from torchdistill.models.official import get_image_classification_model
from torchdistill.models.registry import get_model
from tqdm import tqdm

from .box import DataFreeDistillationBox, NonFiniteLossError
from .checkpoint import atomic_save, load_weights_strictly
from .distributed import (
    World,
    barrier,
    broadcast_float,
    broadcast_module_state,
    destroy,
    device_for,
    init_distributed,
    seed_rank,
)
from .evolution import write_evolution
from .monitor import TensorBoardLogger, save_sample_grid, teacher_predictions
from .resume import (
    Position,
    check_same_run,
    last_checkpoint_path,
    read_training_state,
    restore_training_state,
    save_training_state,
)
from .validation import check_models_agree, first_line, narrow_path, validate_config

logger = def_logger.getChild(__name__)

DEMO_TEACHER_CONFIG = 'teacher.yaml'
DEMO_STUDENT_CONFIG = 'lrwa_mb.yaml'
DEMO_SEED = 0


class SetupError(Exception):
    """A problem with the config or its files, found before training starts."""


def get_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='Data-free knowledge distillation (LRWA) with torchdistill')
    parser.add_argument('--config', help='yaml file path; omit to run the offline digits demo')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='device')
    parser.add_argument('--run_log', help='log file path')
    parser.add_argument('--start_epoch', default=0, type=int, metavar='N', help='start epoch')
    parser.add_argument('--seed', type=int, help='seed in random number generator')
    parser.add_argument('-disable_cudnn_benchmark', action='store_true', help='disable torch.backend.cudnn.benchmark')
    parser.add_argument('-test_only', action='store_true', help='only test the models')
    parser.add_argument('-student_only', action='store_true', help='test the student model only')
    parser.add_argument('-log_config', action='store_true', help='log config')
    parser.add_argument('-no_progress', action='store_true', help='no progress bars')
    parser.add_argument('--log_dir', help='write TensorBoard scalars and sample grids to this directory')
    parser.add_argument('--dst_ckpt', help="override the student's dst_ckpt (the evolution JSON and sample grids "
                                           'are written beside it)')
    parser.add_argument('--save_every', type=int, default=0, metavar='N',
                        help='data-free runs: also write the training state <dst_ckpt stem>.last.pt every N '
                             'iterations (it is always written at each epoch end)')
    parser.add_argument('--resume', metavar='PATH', help='continue the data-free run whose training state '
                                                         '(<dst_ckpt stem>.last.pt) is PATH, exactly where it stopped')
    parser.add_argument('--world_size', default=1, type=int,
                        help='number of distributed processes (start them with torchrun --nproc_per_node N)')
    parser.add_argument('--dist_url', default='env://', help='url used to set up distributed training')
    parser.add_argument('-adjust_lr', action='store_true',
                        help='multiply learning rate by number of distributed processes (world_size)')
    return parser


# ------------------------------------------------------------------------------------------------- models
def load_model(model_config: dict, role: str, device: torch.device, distributed: bool) -> nn.Module:
    """Builds ``models.<role>`` (torchvision first, then torchdistill's registry) and loads ``src_ckpt`` strictly."""
    if 'key' not in model_config:
        raise SetupError(f'models.{role}: missing key `key` (the registered model name)')
    kwargs = model_config.get('kwargs') or {}
    try:
        model = get_image_classification_model(model_config, distributed)
        if model is None:
            model = get_model(model_config['key'], model_config.get('repo_or_dir'), **kwargs)
    except (ValueError, TypeError, RuntimeError, FileNotFoundError) as error:
        raise SetupError(f'{_model_error_path(role, kwargs, error)}: {first_line(error, limit=None)}') from error
    src_ckpt = model_config.get('src_ckpt')
    if src_ckpt is not None:
        # torchdistill only logs a missing src_ckpt and trains on: here it is an error.
        load_weights_strictly(model, os.path.expanduser(src_ckpt), what=f'models.{role}.src_ckpt')
    return model.to(device)


def _model_error_path(role: str, kwargs: dict, error: BaseException) -> str:
    """The key an error building ``models.<role>`` is about: its checkpoint, the one kwarg it names, or the model."""
    checkpoint_path = kwargs.get('checkpoint_path')
    if checkpoint_path is not None and os.fspath(checkpoint_path) in str(error):
        return f'models.{role}.kwargs.checkpoint_path'
    path = narrow_path(f'models.{role}.kwargs', kwargs, error)
    return path if path != f'models.{role}.kwargs' else f'models.{role}'


def _has_weights(model_config: dict) -> bool:
    return model_config.get('src_ckpt') is not None or model_config.get('kwargs', {}).get('checkpoint_path') is not None


# --------------------------------------------------------------------------------------------- evaluation
@torch.inference_mode()
def evaluate(model: nn.Module, data_loader: Iterable, device: torch.device, progress: bool = False,
             desc: str = 'eval') -> float:
    """Top-1 accuracy in percent over ``data_loader`` (batches ``(x, y)`` or ``(x, y, supp_dict)``)."""
    was_training = model.training
    model.eval()
    correct, total = 0, 0
    for batch in tqdm(data_loader, desc=desc, disable=not progress, leave=False):
        x, y = batch[0].to(device), batch[1].to(device)
        correct += int((model(x).argmax(dim=1) == y).sum())
        total += len(y)
    model.train(was_training)
    return 100.0 * correct / max(total, 1)


def save_student(path: str, student: nn.Module, box: Any, best_value: float, args: argparse.Namespace) -> None:
    """Writes the best student in torchdistill's checkpoint layout (plus the generator), atomically."""
    student = student.module if check_if_wrapped(student) else student
    ckpt = {'model': student.state_dict(), 'optimizer': box.optimizer.state_dict(), 'best_value': best_value,
            'lr_scheduler': box.lr_scheduler.state_dict() if box.lr_scheduler is not None else None,
            'args': {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}}
    if isinstance(box, DataFreeDistillationBox):
        ckpt['generator'] = box.generator.state_dict()
    atomic_save(ckpt, os.path.expanduser(path))


# ------------------------------------------------------------------------------------------------ training
def _train_supervised_epoch(box: Any, device: torch.device, epoch: int, progress: bool) -> float:
    loss_value = float('nan')
    bar = tqdm(box.train_data_loader, desc=f'Epoch {epoch}', disable=not progress, leave=False, dynamic_ncols=True)
    for sample_batch, targets, supp_dict in bar:
        loss = box.forward_process(sample_batch.to(device), targets.to(device), supp_dict)
        box.post_forward_process(loss=loss)
        loss_value = float(loss.detach())
        if not torch.isfinite(loss.detach()):
            raise ValueError(f'The training loop was broken due to loss = {loss_value}')
        bar.set_postfix(loss=f'{loss_value:.4g}', refresh=False)
    return loss_value


def build_box(teacher: nn.Module | None, student: nn.Module, config: dict, device: torch.device,
              world: World, args: argparse.Namespace) -> Any:
    """The training box: data-free when ``train.strategy`` is set, else torchdistill's own.

    A data-free box does its own data parallelism (:mod:`lrwa_plugin.distributed`); torchdistill's boxes get
    torchdistill's (DDP, on CUDA only: on the CPU torchdistill wraps nothing, so ranks would train apart).
    """
    train_config = config['train']
    dataset_dict = config.get('datasets', {})
    distributed = world.distributed
    device_ids = [world.local_rank] if distributed and device.type == 'cuda' else None
    lr_factor = world.size if distributed and args.adjust_lr else 1
    if 'strategy' in train_config:
        box = DataFreeDistillationBox(teacher, student, dataset_dict, train_config, device, device_ids,
                                      distributed, lr_factor, world=world)
    elif distributed and device.type != 'cuda':
        raise SetupError('--world_size: data-parallel training without train.strategy runs torchdistill\'s own box, '
                         'which synchronises nothing on the CPU; use --device cuda or a single process')
    elif teacher is None:
        box = get_training_box(student, dataset_dict, train_config, device, device_ids, distributed, lr_factor)
    else:
        box = get_distillation_box(teacher, student, dataset_dict, train_config, device, device_ids, distributed,
                                   lr_factor)
    if box.val_data_loader is None:
        raise SetupError('train.val_data_loader: no validation dataset (dataset_id must name one of datasets)')
    return box


def _monitor_samples(box: DataFreeDistillationBox, teacher: nn.Module, dst_ckpt: str, epoch: int,
                     tensorboard: TensorBoardLogger | None) -> None:
    """Sample grids of the newest generated batch and of a replayed one, teacher's class under each image."""
    ckpt = Path(os.path.expanduser(dst_ckpt))
    directory = ckpt.with_name(ckpt.stem + '.samples')
    teacher.eval()
    for kind, images in box.monitor_batches().items():
        labels = teacher_predictions(teacher, images)
        save_sample_grid(images, labels, directory / f'epoch_{epoch:03d}_{kind}.png',
                         title=f'{kind} samples after epoch {epoch} (teacher class under each)')
        if tensorboard is not None:
            tensorboard.image(f'samples/{kind}', images, epoch)


@dataclass
class RunState:
    """What :func:`train` needs beyond the box: the run's identity, its processes and where it starts."""

    config_path: str | None = None
    config_text: str = ''
    seed: int | None = None
    world: World = field(default_factory=World)
    save_every: int = 0
    position: Position = field(default_factory=Position)  # restored from --resume, else epoch --start_epoch


def train(box: Any, teacher: nn.Module | None, student: nn.Module, dst_ckpt: str, device: torch.device,
          args: argparse.Namespace, run_state: RunState | None = None) -> dict[str, float]:
    """Runs the epochs; returns the best and last validation top-1.

    After every epoch: top-1 on the validation split, the run's learning evolution written beside ``dst_ckpt``
    (:mod:`lrwa_plugin.evolution`), sample grids (data-free runs) and, with ``--log_dir``, TensorBoard scalars. The
    student with the best validation top-1 is written to ``dst_ckpt``, as torchdistill's example does. A data-free
    run also writes its whole training state to ``<dst_ckpt stem>.last.pt`` at each epoch end (and every
    ``--save_every`` iterations); a resumed run starts at ``run_state.position`` (:mod:`lrwa_plugin.resume`). In a
    data-parallel run rank 0 evaluates and writes files; the other ranks receive its accuracy.
    """
    run_state = run_state or RunState(seed=args.seed, position=Position(epoch=args.start_epoch))
    world = run_state.world
    data_free = isinstance(box, DataFreeDistillationBox)
    tensorboard = TensorBoardLogger(args.log_dir) if args.log_dir and world.is_main else None
    progress = not args.no_progress and world.is_main
    position = run_state.position
    history, best, accuracy = position.history, position.best, float('nan')
    last_path = last_checkpoint_path(dst_ckpt)

    def save_state(epoch: int, iteration: int) -> None:
        save_training_state(last_path, box, Position(epoch, iteration, history, best), world,
                            run_state.config_text, run_state.seed)

    def on_iteration(epoch: int, iteration: int, losses: dict[str, float]) -> None:
        done = epoch * box.iterations_per_epoch + iteration + 1
        if tensorboard is not None:
            tensorboard.scalars('train', losses, done - 1)
        # The epoch's last iteration is followed by the epoch-end state.
        if run_state.save_every and done % run_state.save_every == 0 and iteration + 1 < box.iterations_per_epoch:
            save_state(epoch, iteration + 1)

    start = time.time()
    for epoch in range(position.epoch, box.num_epochs):
        box.pre_epoch_process(epoch=epoch)
        if data_free:
            start_iteration = position.iteration if epoch == position.epoch else 0
            losses = box.train_one_epoch(epoch, progress=progress, on_iteration=on_iteration,
                                         start_iteration=start_iteration)
        else:
            losses = {'loss': _train_supervised_epoch(box, device, epoch, progress)}
        accuracy = evaluate(student, box.val_data_loader, device) if world.is_main else math.nan
        accuracy = broadcast_float(accuracy, world, device)
        history.append(accuracy)
        loss_text = '  '.join(f'{k} {v:.4g}' for k, v in losses.items())
        logger.info(f'Epoch {epoch}: val top-1 {accuracy:.2f}%  {loss_text}')
        if world.is_main:
            write_evolution(dst_ckpt, history, run_state.config_path, run_state.seed)
            if tensorboard is not None:
                tensorboard.scalars('val', {'top1': accuracy}, epoch)
            if data_free:
                _monitor_samples(box, teacher, dst_ckpt, epoch, tensorboard)
        if accuracy > best:
            best = accuracy
            if world.is_main:
                save_student(dst_ckpt, student, box, best, args)
        box.post_epoch_process()
        if data_free:
            save_state(epoch + 1, 0)
    logger.info('Training time %s', datetime.timedelta(seconds=int(time.time() - start)))
    if tensorboard is not None:
        tensorboard.close()
    box.clean_modules()
    barrier(world)  # rank 0 has written dst_ckpt before any rank reads it
    return {'best_val_top1': best, 'last_val_top1': history[-1] if history else accuracy}


# -------------------------------------------------------------------------------------------------- runs
def _load_config(path: str | os.PathLike) -> dict:
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise SetupError(f"--config: file '{path}' does not exist")
    try:
        config = yaml_util.load_yaml_file(path)
    except (yaml.YAMLError, ImportError, AttributeError, ValueError, TypeError, KeyError, OSError) as error:
        # Loading runs the !import_call / !import_get tags (datasets, transforms): a wrong name fails here.
        raise SetupError(f"--config: '{path}' could not be loaded: {first_line(error)}") from error
    if not isinstance(config, dict):
        raise SetupError(f"--config: '{path}' is not a YAML mapping")
    return config


def run(config_path: str | os.PathLike, args: argparse.Namespace, world: World | None = None) -> dict[str, float]:
    """Runs one config (train unless ``-test_only``, then test); returns the top-1 accuracies in percent.

    ``world``: this process's place in a data-parallel run (:func:`lrwa_plugin.distributed.init_distributed`);
    None for a single process.
    """
    world = world or World()
    distributed = world.distributed
    torch.backends.cudnn.benchmark = not args.disable_cudnn_benchmark
    device = device_for(torch.device(args.device), world)
    try:
        if args.save_every < 0:
            raise SetupError(f'--save_every: expected a number of iterations >= 0 (0: only at epoch ends), got '
                             f'{args.save_every}')
        if args.resume is not None and args.start_epoch:
            raise SetupError('--start_epoch: not with --resume (the training state says where the run continues)')
        state = read_training_state(args.resume) if args.resume is not None else None
        if state is not None and args.seed is None:
            args.seed = state['seed']
        set_seed(args.seed)
        config = _load_config(config_path)
        import_dependencies(config.get('dependencies'))
        validate_config(config, training=not args.test_only)
        models_config = config.get('models', {})
        student_key = 'student_model' if 'student_model' in models_config else 'model'
        if student_key not in models_config:
            raise SetupError('models: expected `student_model` (distillation) or `model` (training)')
        teacher_config = models_config.get('teacher_model')
        if 'strategy' in config.get('train', {}) and (teacher_config is None or not _has_weights(teacher_config)):
            raise SetupError('models.teacher_model: a data-free run needs a trained teacher: give src_ckpt '
                             '(or kwargs.checkpoint_path for timm_model)')
        teacher = None if teacher_config is None else load_model(teacher_config, 'teacher_model', device,
                                                                 distributed)
        student_config = models_config[student_key]
        if args.dst_ckpt is not None:
            student_config['dst_ckpt'] = args.dst_ckpt
        if 'dst_ckpt' not in student_config:
            raise SetupError(f'models.{student_key}.dst_ckpt: missing (where the trained student is written)')
        student = load_model(student_config, student_key, device, distributed)
        box = None if args.test_only else build_box(teacher, student, config, device, world, args)
        data_free = isinstance(box, DataFreeDistillationBox)
        if data_free:
            check_models_agree(box, models_config, student_key)
        elif args.resume is not None or args.save_every:
            raise SetupError(f"--{'resume' if args.resume is not None else 'save_every'}: only data-free runs "
                             '(train.strategy) write and resume training states')
        config_text = Path(os.path.expanduser(str(config_path))).read_text()
        run_state = RunState(config_path=str(config_path), config_text=config_text, seed=args.seed, world=world,
                             save_every=args.save_every, position=Position(epoch=args.start_epoch))
        if state is not None:
            check_same_run(state, config_text, args.seed, world, args.resume)
        if data_free:  # every rank starts from rank 0's weights, then draws its own z
            broadcast_module_state([student, box.generator, *(box.replay.modules() if box.replay else [])], world)
            seed_rank(world)
        if state is not None:  # last: it sets the random streams the first step draws from
            run_state.position = restore_training_state(state, box, world)
            logger.info(f'Resuming at epoch {run_state.position.epoch}, iteration {run_state.position.iteration}')
    except (SetupError, ValueError, FileNotFoundError, KeyError, TypeError) as error:
        # Everything above is built from the config: its errors are the user's to fix, printed on one line.
        raise SetupError(first_line(error, limit=None)) from error
    if args.log_config:
        logger.info(config)
    results: dict[str, float] = {}
    if box is not None:
        results.update(train(box, teacher, student, student_config['dst_ckpt'], device, args, run_state))
    dst_ckpt = os.path.expanduser(student_config['dst_ckpt'])
    load_weights_strictly(student, dst_ckpt, what=f'models.{student_key}.dst_ckpt')
    test_loader_config = config['test']['test_data_loader']
    # Every rank tests on the whole split (no DistributedSampler); only rank 0 prints.
    test_loader = build_data_loader(config['datasets'][test_loader_config['dataset_id']], test_loader_config,
                                    False)
    if teacher is not None and not args.student_only:
        results['teacher_top1'] = evaluate(teacher, test_loader, device)
        logger.info(f"[Teacher: {teacher_config['key']}] test top-1 {results['teacher_top1']:.2f}%")
    role = 'student' if student_key == 'student_model' else 'model'
    results[f'{role}_top1'] = evaluate(student, test_loader, device)
    logger.info(f"[{role.capitalize()}: {student_config['key']}] test top-1 {results[f'{role}_top1']:.2f}%")
    return results


def run_demo(config_dir: Path, args: argparse.Namespace, world: World | None = None) -> dict[str, float]:
    """The offline digits demo: teacher (trained once, if its checkpoint is missing), then the LRWA student."""
    if args.seed is None:
        args.seed = DEMO_SEED
    teacher_config_path = config_dir / DEMO_TEACHER_CONFIG
    teacher_ckpt = _load_config(teacher_config_path)['models']['model']['dst_ckpt']
    if not os.path.isfile(os.path.expanduser(teacher_ckpt)):
        logger.info(f'Training the digits teacher ({teacher_config_path}); it is saved at {teacher_ckpt}')
        run(teacher_config_path, argparse.Namespace(**{**vars(args), 'dst_ckpt': None, 'log_dir': None}), world)
    start = time.time()
    results = run(config_dir / DEMO_STUDENT_CONFIG, args, world)
    results['seconds'] = time.time() - start
    return results


def main(argv: Sequence[str] | None = None, demo_config_dir: str | os.PathLike | None = None) -> int:
    """Entry point; returns the exit status: 2 for a config error found before training, 3 for a non-finite loss."""
    args = get_argparser().parse_args(argv)
    set_basic_log_config()
    if args.run_log is not None:
        setup_log_file(os.path.expanduser(args.run_log))
    logger.info(args)
    start = time.time()
    try:
        world = init_distributed(args.world_size, args.dist_url, torch.device(args.device))
    except ValueError as error:
        sys.stderr.write(f'error: {error}\n')  # every rank: print is rank 0's only
        return 2
    if not world.is_main:  # one voice: rank 0 prints and logs, the others only warn
        setup_for_distributed(False)
        def_logger.setLevel(logging.WARNING)
    try:
        if args.config is None:
            config_dir = Path(demo_config_dir) if demo_config_dir is not None else \
                Path(__file__).resolve().parent.parent / 'examples' / 'configs' / 'digits'
            results = run_demo(config_dir, args, world)
            label = f'digits demo ({DEMO_STUDENT_CONFIG}, seed {args.seed})'
        else:
            results = run(args.config, args, world)
            label = args.config
    except (SetupError, NonFiniteLossError) as error:
        sys.stderr.write(f'error: {error}\n')  # every rank: print is rank 0's only
        return 2 if isinstance(error, SetupError) else 3
    finally:
        destroy(world)
    summary = ', '.join(f'{k} {v:.2f}' + ('%' if 'top1' in k else ' s' if k == 'seconds' else '')
                        for k, v in results.items())
    print(f'Summary [{label}]: {summary}; wall time {time.time() - start:.0f} s')
    return 0
