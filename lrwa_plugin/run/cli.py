"""The command line behind ``examples/run_torchdistill.py`` and ``python -m lrwa_plugin``: torchdistill's example flags,
plus data-free strategies.

``python examples/run_torchdistill.py --config X.yaml`` runs a torchdistill config (:mod:`lrwa_plugin.run.runner`). With
``train.strategy`` (``lrwa`` | ``mb_dfkd`` | ``pre_dfkd`` | ``dfad``) the student is trained data-free by
:class:`lrwa_plugin.box.DataFreeDistillationBox`; without it the config runs as torchdistill's own
``examples/torchvision/image_classification.py`` would run it (that is how the digits teacher is trained). With no
``--config`` it runs the offline digits demo from the installed package's configs: it trains the teacher if its
checkpoint is missing, then distils a student with ``strategy: lrwa`` and prints both accuracies.

Exit status: 0 done; 2 a :class:`~lrwa_plugin.errors.ConfigError` (a config value, file or flag that cannot work,
found before anything is trained; one ``error:`` line); 3 a :class:`~lrwa_plugin.errors.NonFiniteLossError` (a loss or
gradient became NaN or infinite; one ``error:`` line naming the step; the last checkpoint is left as it was); 4 a
:class:`~lrwa_plugin.errors.WriteError` (a file could not be written: a full disk, a folder that became read-only; one
``error:`` line naming the file; it and every file written before are as they were); 128 + the signal's number for a
run stopped by SIGINT / SIGTERM. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch
from torchdistill.common.constant import def_logger
from torchdistill.common.main_util import setup_for_distributed
from torchdistill.misc.log import set_basic_log_config, setup_log_file

from ..errors import ConfigError, NonFiniteLossError, WriteError
from ..precision import AMP_DTYPES
from ..util import first_line
from .distributed import World, destroy, init_distributed
from .files import check_writable
from .loading import load_config
from .runner import run_config
from .stopping import RunStopped, interruptible, keep_swallowing_signals

logger = def_logger.getChild(__name__)

DEMO_DATASET = 'digits'
DEMO_TEACHER_CONFIG = 'teacher'
DEMO_STUDENT_CONFIG = 'lrwa_mad'
DEMO_SEED = 0


def shipped_config(dataset: str, name: str) -> Path:
    """The path of a shipped config, ``configs/<dataset>/<name>.yaml``, wherever the package is installed."""
    return Path(str(resources.files('lrwa_plugin.configs').joinpath(dataset, f'{name}.yaml')))


def get_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='Data-free knowledge distillation (LRWA) with torchdistill')
    parser.add_argument('--config', help='yaml file path; omit to run the offline digits demo')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='device')
    parser.add_argument('--run_log', help='log file path')
    parser.add_argument('--start_epoch', default=0, type=int, metavar='N', help='start epoch')
    parser.add_argument('--seed', type=int, help='seed in random number generator')
    parser.add_argument('-disable_cudnn_benchmark', action='store_true', help='disable torch.backend.cudnn.benchmark')
    parser.add_argument('--amp', choices=sorted(AMP_DTYPES),
                        help='data-free runs: autocast the forwards to this dtype (GPUs; parameters, gradients, '
                             'BatchNorm statistics and losses stay float32; float16 scales the loss); default float32')
    parser.add_argument('-tf32', action='store_true',
                        help='TF32 matrix products and convolutions on Ampere+ GPUs: faster, ~3 significant digits '
                             'inside each product')
    parser.add_argument('-channels_last', action='store_true',
                        help='NHWC memory order for the models (faster convolutions on tensor cores)')
    parser.add_argument('-deterministic', action='store_true',
                        help='deterministic kernels only (torch.use_deterministic_algorithms, fixed cuBLAS workspace, '
                             'no cuDNN autotuning): the same seed gives the same run on a GPU, slower')
    parser.add_argument('-test_only', action='store_true', help='only test the models')
    parser.add_argument('-student_only', action='store_true', help='test the student model only')
    parser.add_argument('-log_config', action='store_true', help='log config')
    parser.add_argument('-no_progress', action='store_true', help='no progress bars')
    parser.add_argument('-no_sample_grids', action='store_true',
                        help='data-free runs: write no per-epoch sample grids (<dst_ckpt stem>.samples/)')
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


def run_demo(args: argparse.Namespace, world: World | None = None,
             config_dir: str | os.PathLike | None = None) -> dict[str, float]:
    """The offline digits demo: teacher (trained once, if its checkpoint is missing), then the LRWA student.

    ``config_dir``: where ``teacher.yaml`` and ``lrwa_mad.yaml`` are (default: the installed package's digits configs).
    """
    directory = Path(config_dir) if config_dir is not None else shipped_config(DEMO_DATASET, DEMO_TEACHER_CONFIG).parent
    demo_args = argparse.Namespace(**{**vars(args), 'seed': DEMO_SEED if args.seed is None else args.seed})
    teacher_config = directory / f'{DEMO_TEACHER_CONFIG}.yaml'
    teacher_ckpt = load_config(teacher_config)['models']['model']['dst_ckpt']
    if not os.path.isfile(os.path.expanduser(teacher_ckpt)):
        logger.info(f'Training the digits teacher ({teacher_config}); it is saved at {teacher_ckpt}')
        run_config(teacher_config, argparse.Namespace(**{**vars(demo_args), 'dst_ckpt': None, 'log_dir': None}), world)
    start = time.time()
    results = run_config(directory / f'{DEMO_STUDENT_CONFIG}.yaml', demo_args, world)
    results['seconds'] = time.time() - start
    return results


def check_device(name: str) -> torch.device:
    """``--device`` of the runner and of compare: a CPU, or a CUDA device this machine has."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError('--device', f"{name!r} is not a device ({first_line(error)}); expected e.g. 'cpu', "
                                      "'cuda' or 'cuda:0'") from error
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ConfigError('--device', f"{name!r}, but this machine has no CUDA device; use --device cpu")
    if device.type not in ('cpu', 'cuda'):
        raise ConfigError('--device', f"{name!r}: the runner supports 'cpu' and 'cuda' devices")
    return device


def check_flags(args: argparse.Namespace) -> None:
    """The flags that need no config: the device, the number of processes, the log file, the seed's range and the
    resume/save flags (:func:`lrwa_plugin.run.runner.set_up` checks those that need the config)."""
    check_device(args.device)
    if args.world_size < 1:
        raise ConfigError('--world_size', f'expected a number of processes >= 1, got {args.world_size}')
    if args.save_every < 0:
        raise ConfigError('--save_every', f'expected a number of iterations >= 0 (0: only at epoch ends), got '
                                          f'{args.save_every}')
    if args.resume is not None and args.start_epoch:
        raise ConfigError('--start_epoch', 'not with --resume (the training state says where the run continues)')
    if args.seed is not None and not 0 <= args.seed < 2 ** 32:
        raise ConfigError('--seed', f'expected an integer from 0 to 2**32 - 1 (NumPy seeds no other), got {args.seed}')
    if args.run_log is not None:
        check_writable(files=[(args.run_log, '--run_log')])


def stopped_message(stop: RunStopped, argv: Sequence[str]) -> str:
    """The one line a stopped run prints: where its state is and the command that continues it."""
    if not stop.resumable:
        return f'stopped: {stop}; a run without train.strategy cannot resume (its best student is at dst_ckpt)'
    if stop.state_path is None:
        return (f'stopped: {stop}, before its first training state was written (they are written at every epoch '
                'end, and with --save_every): there is nothing to resume; start the run again')
    kept, skip = [], False
    for arg in argv:  # the same command, with --resume pointing at the state
        if skip:
            skip = False
        elif arg == '--resume':
            skip = True
        elif not arg.startswith('--resume='):
            kept.append(arg)
    command = shlex.join(['python', '-m', 'lrwa_plugin', *kept, '--resume', stop.state_path])
    if stop.at_once:
        return (f"stopped: {stop}; the last training state written is '{stop.state_path}' (it continues from "
                f'{stop.where}; what was trained since is lost); continue the run with: {command}')
    return f"stopped: {stop}; the training state is '{stop.state_path}'; continue the run with: {command}"


def main(argv: Sequence[str] | None = None, demo_config_dir: str | os.PathLike | None = None) -> int:
    """Entry point; returns the exit status: 2 for a config error found before training, 3 for a non-finite loss,
    128 + the signal's number for a run stopped by SIGINT / SIGTERM."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    args = get_argparser().parse_args(argv)
    set_basic_log_config()
    try:
        check_flags(args)
    except ConfigError as error:
        sys.stderr.write(f'error: {error}\n')
        return 2
    if args.run_log is not None:
        setup_log_file(os.path.expanduser(args.run_log))
    logger.info(args)
    start = time.time()
    try:
        world = init_distributed(args.world_size, args.dist_url, torch.device(args.device))
    except ConfigError as error:
        sys.stderr.write(f'error: {error}\n')  # every rank: print is rank 0's only
        return 2
    if not world.is_main:  # one voice: rank 0 prints and logs, the others only warn
        setup_for_distributed(False)
        def_logger.setLevel(logging.WARNING)
    try:
        with interruptible():
            try:
                if args.config is None:
                    results = run_demo(args, world, demo_config_dir)
                    seed = DEMO_SEED if args.seed is None else args.seed
                    label = f'digits demo ({DEMO_STUDENT_CONFIG}.yaml, seed {seed})'
                else:
                    results = run_config(args.config, args, world)
                    label = args.config
            except RunStopped as stop:  # said while later signals are swallowed
                if world.is_main:
                    sys.stderr.write(stopped_message(stop, argv) + '\n')
                if from_command_line:  # the process is ending: a late second Ctrl-C must not turn into a traceback
                    keep_swallowing_signals()
                return stop.exit_status
    except (ConfigError, NonFiniteLossError, WriteError) as error:
        sys.stderr.write(f'error: {error}\n')  # every rank: print is rank 0's only
        return error.exit_status
    except KeyboardInterrupt as interrupt:
        signum = getattr(interrupt, 'signum', signal.SIGINT)
        sys.stderr.write(f'stopped: {signal.Signals(signum).name} outside training (while setting up, or testing '
                         'the trained student); no training state was written by this run\n')
        return 128 + signum
    finally:
        destroy(world)
    summary = ', '.join(f'{k} {v:.2f}' + ('%' if 'top1' in k else ' s' if k == 'seconds' else '')
                        for k, v in results.items())
    print(f'Summary [{label}]: {summary}; wall time {time.time() - start:.0f} s')
    return 0
