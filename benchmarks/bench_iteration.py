"""Whole data-free iterations per second, per strategy, on the digits demo configs.

One iteration is what ``DataFreeDistillationBox.train_iteration`` runs: the generator step(s), the student steps
(``student_steps`` of them, each with its replay batch) and the replay memory's update. Every variant gets its own
box built from a shipped config (``examples/configs/digits/``) the way the runner builds it (torchdistill's
``yaml_util``, :func:`lrwa_plugin.run.loading.load_model`, :class:`lrwa_plugin.box.DataFreeDistillationBox`), from
the same
seed, with its memory filled first so that replay (and the meta step) is active from the first timed iteration.
The variants run interleaved (one iteration of each, in an order rotated every round, then again) after a warm-up,
and are reported as the median seconds per iteration (wall time, and this process's CPU time, which other jobs on a
shared machine disturb less), iterations per second, and the ratios to ``dfad`` measured in this run. Nothing is
asserted on timings.

Variants: ``dfad``, ``mb_dfkd``, ``lrwa`` (``lrwa_mb.yaml`` as shipped: backend higher, second order) and edits of
them: ``lrwa_functional`` (backend functional), ``lrwa_first`` (first order), ``lrwa_fd`` (finite-difference
Hessian), and ``mb_dfkd_recompute`` / ``lrwa_recompute`` with ``cache_teacher: false`` (the memory bank keeps no
teacher outputs, so every replay batch costs a teacher forward, as before the cache). For each, the share of the
iteration's time spent in teacher forwards is measured too (a forward pre-hook and hook on the teacher: generator
step, student steps, replay batches, pushes).

Needs the digits teacher at ``resource/ckpt/digits/teacher.pt`` (relative to the repository root, where the configs
point); if it is missing it is trained first with ``examples/configs/digits/teacher.yaml`` (about 20 s), unless
``--no_train_teacher`` is given, in which case the benchmark stops with a message saying how to train it.

    python benchmarks/bench_iteration.py                  # 1 thread, 10 timed rounds
    python benchmarks/bench_iteration.py --json
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torchdistill.common import yaml_util
from torchdistill.common.main_util import import_dependencies

from lrwa_plugin.box import DataFreeDistillationBox
from lrwa_plugin.precision import Precision
from lrwa_plugin.run.cli import main as cli_main
from lrwa_plugin.run.distributed import World
from lrwa_plugin.run.loading import load_model

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / 'examples' / 'configs' / 'digits'
TEACHER_CONFIG = CONFIGS / 'teacher.yaml'
#: variant -> (config file, edits of train.data_free: {block: {key: value}} merged into meta / replay.kwargs)
VARIANTS: dict[str, tuple[str, dict[str, dict[str, Any]]]] = {
    'dfad': ('dfad.yaml', {}),
    'mb_dfkd': ('mb_dfkd.yaml', {}),
    'mb_dfkd_recompute': ('mb_dfkd.yaml', {'replay': {'cache_teacher': False}}),
    'lrwa': ('lrwa_mb.yaml', {}),
    'lrwa_recompute': ('lrwa_mb.yaml', {'replay': {'cache_teacher': False}}),
    'lrwa_functional': ('lrwa_mb.yaml', {'meta': {'backend': 'functional'}}),
    'lrwa_first': ('lrwa_mb.yaml', {'meta': {'order': 'first'}}),
    'lrwa_fd': ('lrwa_mb.yaml', {'meta': {'order': 'finite_difference'}}),
}


class TeacherTimer:
    """Accumulates the wall time of the teacher's forwards (a forward pre-hook starts the clock, a hook stops it)."""

    def __init__(self, teacher: torch.nn.Module) -> None:
        self.seconds = 0.0
        self._start: float | None = None
        self.handles = [teacher.register_forward_pre_hook(self._begin), teacher.register_forward_hook(self._end)]

    def _begin(self, *args: Any) -> None:
        self._start = time.perf_counter()

    def _end(self, *args: Any) -> None:
        self.seconds += time.perf_counter() - self._start


def get_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--variants', nargs='+', choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument('--steps', type=int, default=10, help='timed rounds (one iteration of every variant each)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed rounds first')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch intra-op threads (1 by default: on a shared, loaded machine two threads spin)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--no_train_teacher', action='store_true',
                        help='stop with a message instead of training a missing digits teacher')
    parser.add_argument('--json', action='store_true', help='print one JSON object instead of the table')
    return parser


def teacher_checkpoint(config: dict) -> Path:
    return ROOT / config['models']['teacher_model']['src_ckpt']


def ensure_teacher(path: Path, train: bool) -> None:
    if path.is_file():
        return
    command = f'python examples/run_torchdistill.py --config {TEACHER_CONFIG.relative_to(ROOT)} --device cpu'
    if not train:
        sys.exit(f'error: the digits teacher {path} is missing; train it (about 20 s) with `{command}` '
                 'from the repository root')
    print(f'the digits teacher {path} is missing: training it ({command})', file=sys.stderr)
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the benchmark's (its JSON)
        status = cli_main(['--config', str(TEACHER_CONFIG), '--device', 'cpu', '--seed', '0', '-no_progress'])
    if status != 0 or not path.is_file():
        sys.exit(f'error: training the digits teacher failed; run `{command}` from the repository root')


def build_box(config: dict, seed: int, world: World | None = None, device: torch.device | None = None,
              precision: Precision | None = None) -> DataFreeDistillationBox:
    """A box as the runner builds it (``world``: this rank of a data-parallel run; ``precision``: ``--amp``), its
    memory filled so that replay and the meta step run from the first iteration; ``config`` is not modified."""
    config = copy.deepcopy(config)
    device = device or torch.device('cpu')
    torch.manual_seed(seed)
    models = config['models']
    teacher = load_model(models['teacher_model'], 'teacher_model', device, False)
    student = load_model(models['student_model'], 'student_model', device, False)
    box = DataFreeDistillationBox(teacher, student, config.get('datasets', {}), config['train'], device, None, False,
                                  world=world, precision=precision)
    box.pre_epoch_process(epoch=0)
    if box.replay is not None:
        push_epoch = getattr(box.replay, 'first_push_epoch', 0)  # an epoch after which a MemoryBank pushes
        capacity = getattr(box.replay, 'capacity', 1)
        for _ in range(64):
            with torch.no_grad():
                x = box.sample()
            # outside no_grad: a generative replay trains its VAE on what it observes
            box.replay.observe(x, push_epoch, box.iterations_per_epoch - 1)
            box.replay.end_epoch(push_epoch)
            if len(box.replay) >= capacity:
                break
        if box.replay.sample(1) is None:
            raise RuntimeError(f'the replay memory of {config["train"]["strategy"]} stayed empty')
    return box


def main(argv: list[str] | None = None) -> int:
    args = get_argparser().parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger('torchdistill').setLevel(logging.WARNING)
    os.chdir(ROOT)  # the configs' checkpoint paths are relative to the repository root
    configs = {}
    for variant in args.variants:
        file, edits = VARIANTS[variant]
        config = yaml_util.load_yaml_file(str(CONFIGS / file))
        import_dependencies(config.get('dependencies'))
        data_free = config['train']['data_free']
        data_free.get('meta', {}).update(edits.get('meta', {}))
        data_free.get('replay', {}).get('kwargs', {}).update(edits.get('replay', {}))
        configs[variant] = config
    ensure_teacher(teacher_checkpoint(next(iter(configs.values()))), train=not args.no_train_teacher)
    boxes = {variant: build_box(config, args.seed) for variant, config in configs.items()}
    timers = {variant: TeacherTimer(box.teacher_model) for variant, box in boxes.items()}

    times: dict[str, list[float]] = {variant: [] for variant in args.variants}
    cpu_times: dict[str, list[float]] = {variant: [] for variant in args.variants}
    teacher_times: dict[str, list[float]] = {variant: [] for variant in args.variants}
    order = list(args.variants)
    for round_index in range(args.warmup + args.steps):
        for variant in order:
            box, timer = boxes[variant], timers[variant]
            gc.collect()
            timer.seconds = 0.0
            start, start_cpu = time.perf_counter(), time.process_time()
            box.train_iteration(0, round_index % box.iterations_per_epoch)
            elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            if round_index >= args.warmup:
                times[variant].append(elapsed)
                cpu_times[variant].append(elapsed_cpu)
                teacher_times[variant].append(timer.seconds)
        order = order[1:] + order[:1]

    medians = {v: statistics.median(times[v]) for v in args.variants}
    cpu = {v: statistics.median(cpu_times[v]) for v in args.variants}
    teacher_share = {v: sum(teacher_times[v]) / sum(times[v]) for v in args.variants}
    base = 'dfad' if 'dfad' in medians else args.variants[0]
    first = boxes[args.variants[0]]
    result = {
        'variants': {v: {'median_s': medians[v], 'iterations_per_s': 1 / medians[v],
                         'ratio_to_' + base: medians[v] / medians[base], 'median_cpu_s': cpu[v],
                         'cpu_ratio_to_' + base: cpu[v] / cpu[base], 'times_s': times[v], 'cpu_times_s': cpu_times[v],
                         'teacher_forward_share': teacher_share[v], 'teacher_forward_s': teacher_times[v],
                         'config': VARIANTS[v][0], 'edits': VARIANTS[v][1],
                         'meta': configs[v]['train']['data_free'].get('meta')}
                     for v in args.variants},
        'settings': {'threads': torch.get_num_threads(), 'steps': args.steps, 'warmup': args.warmup,
                     'batch_size': first.batch_size, 'student_steps': first.student_steps,
                     'torch': torch.__version__},
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f'digits demo configs: batch {first.batch_size}, {first.student_steps} student steps per iteration, '
          f'{torch.get_num_threads()} thread(s), median of {args.steps} interleaved rounds after {args.warmup} '
          f'warm-up; torch {torch.__version__}')
    print(f'{"variant":<18} {"config":<13} {"wall ms":>8} {"iter/s":>7} {"× " + base:>7} {"CPU ms":>8} '
          f'{"× " + base:>7} {"teacher":>8}  edits')
    for v in args.variants:
        print(f'{v:<18} {VARIANTS[v][0]:<13} {medians[v] * 1e3:8.1f} {1 / medians[v]:7.2f} '
              f'{medians[v] / medians[base]:7.2f} {cpu[v] * 1e3:8.1f} {cpu[v] / cpu[base]:7.2f} '
              f'{100 * teacher_share[v]:7.1f}%  {VARIANTS[v][1] or ""}')
    print('ms/iter: median time of one whole iteration; wall: perf_counter, iter/s = 1 / wall; '
          'CPU: process_time of this process; teacher: share of the timed iterations spent in teacher forwards')
    return 0


if __name__ == '__main__':
    sys.exit(main())
