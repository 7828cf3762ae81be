"""Data-parallel iterations per second on 1 and 2 CPU ranks (gloo), and what the gradient averaging costs.

Each world size runs in its own processes (``torch.multiprocessing.spawn``, gloo, one torch thread per rank unless
``--threads``), every rank building the box from a shipped digits config the way the runner does
(:func:`bench_iteration.build_box`: same seed, memory filled first so the meta step is active), then the start
broadcast and per-rank seeds of a torchrun run. After a warm-up, each timed iteration starts at a barrier, and rank 0
reports the median seconds per whole iteration (generator step, student steps, replay update, buffer broadcast),
iterations per second, generated samples per second over all ranks (ranks × batch per step), and the share of the
iteration spent in :class:`lrwa_plugin.run.distributed.GradientAverager` (student and generator all-reduces, including
any wait for the slower rank). Nothing is asserted on timings.

    python benchmarks/bench_ddp.py                          # lrwa_mb.yaml, 1 and 2 ranks
    python benchmarks/bench_ddp.py --config mb_dfkd.yaml --json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchdistill.common import yaml_util
from torchdistill.common.main_util import import_dependencies

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_iteration import CONFIGS, ROOT, build_box, ensure_teacher, teacher_checkpoint  # noqa: E402

from lrwa_plugin.run.distributed import World, broadcast_module_state, seed_rank  # noqa: E402


def get_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--config', default='lrwa_mb.yaml', help='a data-free config in examples/configs/digits/')
    parser.add_argument('--world_sizes', nargs='+', type=int, default=[1, 2])
    parser.add_argument('--steps', type=int, default=10, help='timed iterations')
    parser.add_argument('--warmup', type=int, default=2, help='untimed iterations first')
    parser.add_argument('--threads', type=int, default=1, help='torch intra-op threads per rank')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--json', action='store_true', help='print one JSON object instead of the table')
    return parser


def _rank(rank: int, size: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    logging.getLogger('torchdistill').setLevel(logging.WARNING)
    dist.init_process_group('gloo', rank=rank, world_size=size)
    world = World(rank, size)
    config = yaml_util.load_yaml_file(str(CONFIGS / args.config))
    import_dependencies(config.get('dependencies'))
    box = build_box(config, args.seed, world)
    broadcast_module_state([box.student_model, box.generator], world)
    seed_rank(world)
    averagers = (box.student_averager, box.generator_averager)
    times, sync = [], []
    for index in range(args.warmup + args.steps):
        dist.barrier()
        before = sum(a.seconds for a in averagers)
        start = time.perf_counter()
        box.train_iteration(0, index % box.iterations_per_epoch)
        elapsed = time.perf_counter() - start
        if index >= args.warmup:
            times.append(elapsed)
            sync.append(sum(a.seconds for a in averagers) - before)
    if rank == 0:
        Path(out).write_text(json.dumps({'times_s': times, 'sync_s': sync, 'batch_size': box.batch_size,
                                         'student_steps': box.student_steps}))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    args = get_argparser().parse_args(argv)
    os.chdir(ROOT)
    ensure_teacher(teacher_checkpoint(yaml_util.load_yaml_file(str(CONFIGS / args.config))), train=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.world_sizes:
            out = os.path.join(tmp, f'{size}.json')
            mp.spawn(_rank, args=(size, _free_port(), args, out), nprocs=size, join=True)
            raw = json.loads(Path(out).read_text())
            median = statistics.median(raw['times_s'])
            sync = statistics.median(raw['sync_s'])
            results[size] = {'median_s': median, 'iterations_per_s': 1 / median,
                             'samples_per_s': size * raw['batch_size'] * raw['student_steps'] / median,
                             'grad_sync_median_s': sync, 'grad_sync_fraction': sync / median, **raw}
    base = results[args.world_sizes[0]]
    for r in results.values():
        r['throughput_ratio'] = r['samples_per_s'] / base['samples_per_s']
    settings = {'config': args.config, 'threads_per_rank': args.threads, 'steps': args.steps, 'warmup': args.warmup,
                'backend': 'gloo', 'torch': torch.__version__}
    if args.json:
        print(json.dumps({'world_sizes': results, 'settings': settings}, indent=1))
        return 0
    print(f'{args.config}: gloo on the CPU, {args.threads} thread(s) per rank, median of {args.steps} iterations '
          f'after {args.warmup} warm-up; torch {torch.__version__}')
    print(f'{"ranks":>5} {"ms/iter":>8} {"iter/s":>7} {"samples/s":>10} {"× 1 rank":>8} {"grad sync ms":>12} '
          f'{"sync share":>10}')
    for size, r in results.items():
        print(f'{size:>5} {r["median_s"] * 1e3:8.1f} {r["iterations_per_s"]:7.2f} {r["samples_per_s"]:10.0f} '
              f'{r["throughput_ratio"]:8.2f} {r["grad_sync_median_s"] * 1e3:12.1f} {r["grad_sync_fraction"]:10.1%}')
    print('samples/s: generated samples the students learn from per second, all ranks; grad sync: student and '
          'generator all-reduces per iteration (bucketed), waits for the slower rank included')
    return 0


if __name__ == '__main__':
    sys.exit(main())
