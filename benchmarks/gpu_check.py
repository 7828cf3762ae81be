"""The GPU acceptance run: what the CPU benchmarks and tests cannot say, checked and timed on one GPU in one command.

Five sections, each timed, each recorded (a failing one with its error) before the next starts:

1. ``meta_tests``: ``tests/test_meta.py`` with its nets and tensors on the device (``LRWA_TEST_DEVICE``), in a
   subprocess: passed / failed counts and the tail of pytest's output.
2. ``iterations``: whole data-free iterations (``DataFreeDistillationBox.train_iteration``: the generator step, the
   student steps, the replay update) of ``examples/configs/cifar100/{dfad,mb_dfkd,lrwa_mb,lrwa_gr}.yaml`` at the
   configs' own batch size and student steps, each in float32, TF32 (``-tf32``) and bfloat16 (``--amp bfloat16``):
   boxes built as the runner builds them, with random-weight teachers and FakeData in place of CIFAR-100 (no
   downloads), the replay memory filled first so the meta step runs from the first timed iteration; after a warm-up,
   the median seconds per iteration (``torch.cuda.synchronize`` around each), the peak memory
   (``torch.cuda.max_memory_allocated``, reset per variant) and the projected hours of the full run
   (``num_epochs × iterations_per_epoch × s/it``, evaluations not included).
3. ``meta_step``: one student step of ``benchmarks/bench_meta_step.py``'s ``plain``, ``released`` (the paper's
   released step, reproduced) and ``lrwa_higher`` variants on the device, interleaved: the time ratios
   released / plain and lrwa / plain (``docs/performance.md`` quotes the CPU's), at the benchmark's size and at the
   paper's (the CIFAR student, 512 + 64 samples).
4. ``determinism``: two short runs each of ``cifar100/lrwa_mb.yaml`` and ``cifar100/lrwa_gr.yaml`` (two epochs, the
   second replaying; batch 64) through the command line with ``-deterministic``, compared bit for bit (training
   states: student, generator, optimizers, memory, random streams; the accuracy history; the best students).
5. ``ranks``: the ``lrwa_mb`` run on two ranks under ``python -m torch.distributed.run --nproc_per_node 2`` (nccl;
   gloo with ``--device cpu``), when two GPUs are visible.

It writes ``gpu_check.json`` and ``gpu_check.md`` (the card, the versions, each section's table, what was skipped and
why) into ``--out``, prints a short summary, and exits 1 if any section failed. Timings are reported, never asserted.

    python benchmarks/gpu_check.py --out examples/results/gpu                  # one GPU (estimated 3-5 minutes)
    python benchmarks/gpu_check.py --device cpu --tiny --out gpu_check_cpu     # the same sections, small, on the CPU

``--tiny`` shrinks what runs (WRN-16-1 teacher and student, narrower generator and VAE, batches of 8, 2 student
steps, one timed iteration without warm-up, ``lrwa_mb`` only in section 4) so that ``tests/test_gpu_check.py`` runs
the whole script on the CPU in about half a minute; on the CPU TF32 is a no-op and is recorded as such.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import logging
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple
from xml.etree import ElementTree

import torch
from torchdistill.common import yaml_util
from torchdistill.common.main_util import import_dependencies
from torchdistill.models.registry import get_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_meta_step  # noqa: E402
from bench_iteration import build_box  # noqa: E402

from lrwa_plugin.precision import Precision, set_backend_flags  # noqa: E402
from lrwa_plugin.run.checkpoint import atomic_save, load_state_dict_file  # noqa: E402
from lrwa_plugin.run.resume import read_training_state  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / 'examples' / 'configs' / 'cifar100'
STRATEGIES = ('dfad', 'mb_dfkd', 'lrwa_mb', 'lrwa_gr')
PRECISIONS = ('float32', 'tf32', 'bfloat16')
META_VARIANTS = ('plain', 'released', 'lrwa_higher')
SECTIONS = ('meta_tests', 'iterations', 'meta_step', 'determinism', 'ranks')
#: The shipped dataset entry, swapped for torchvision's FakeData of CIFAR-100's shapes (an edit that must apply).
SHIPPED_DATASET = ("  cifar100/test: !import_call\n    key: 'lrwa_plugin.datasets.cifar'\n    init:\n"
                   "      kwargs: {name: 'cifar100', root: '~/datasets/cifar100', split: 'test', download: False}")
FAKE_DATASET = ("  cifar100/test: !import_call {{key: 'torchvision.datasets.FakeData', init: {{kwargs: {{size: {size}, "
                "image_size: [3, 32, 32], num_classes: 100, transform: !import_call "
                "{{key: 'torchvision.transforms.ToTensor', init: {{}}}}}}}}}}")
TEACHER = 'resnet34_cifar'
#: --tiny: WRN-16-1 for both networks (its classifier is ``fc``, where the configs hook ``linear``), a narrower
#: generator and VAE, the memory's sizes scaled down with the batch
TINY_EDITS = {
    "key: 'resnet34_cifar'": "key: 'wrn_16_1'",
    "key: 'resnet18_cifar'": "key: 'wrn_16_1'",
    "teacher_module_path: 'linear'": "teacher_module_path: 'fc'",
    "forward_hook: {input: ['linear']": "forward_hook: {input: ['fc']",
    'ngf: 128': 'ngf: 16',
}
TINY_REPLAY_EDITS = {
    'MemoryBank': {'capacity: 640, push_size: 64, push_every_epochs: 5, batch_size: 64':
                   'capacity: 16, push_size: 8, push_every_epochs: 5, batch_size: 2'},
    'GenerativeReplay': {'nef: 64': 'nef: 8', 'train_size: 256': 'train_size: 4', 'self_replay: 64': 'self_replay: 2',
                         'batch_size: 64             #': 'batch_size: 2              #'},
}


class Sizes(NamedTuple):
    """How much each section runs: the paper's sizes on a GPU, small ones with ``--tiny``."""

    batch_size: int | None  # None: the config's (512)
    student_steps: int | None  # None: the config's (10)
    warmup: int
    timed: int
    meta_settings: tuple[dict[str, Any], ...]
    meta_warmup: int
    meta_steps: int
    run_batch_size: int  # the short runs of sections 4 and 5
    determinism_configs: tuple[str, ...]
    run_student_steps: int
    timeout_s: int


PAPER = Sizes(batch_size=None, student_steps=None, warmup=2, timed=3,
              meta_settings=({'name': 'bench_meta_step', 'model': 'resnet18', 'timm': True, 'num_classes': 10,
                              'img_size': 32, 'acq_batch': 64, 'mem_batch': 8},
                             {'name': 'paper', 'model': 'resnet18_cifar', 'timm': False, 'num_classes': 100,
                              'img_size': 32, 'acq_batch': 512, 'mem_batch': 64}),
              meta_warmup=2, meta_steps=5, run_batch_size=64, determinism_configs=('lrwa_mb', 'lrwa_gr'),
              run_student_steps=2, timeout_s=300)
TINY = Sizes(batch_size=8, student_steps=2, warmup=0, timed=1,
             meta_settings=({'name': 'tiny', 'model': 'resnet18', 'timm': True, 'num_classes': 10, 'img_size': 16,
                             'acq_batch': 8, 'mem_batch': 2},),
             meta_warmup=0, meta_steps=1, run_batch_size=4, determinism_configs=('lrwa_mb',), run_student_steps=1,
             timeout_s=300)


def get_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', required=True, help='folder for gpu_check.json and gpu_check.md')
    parser.add_argument('--device', default='cuda', help="'cuda' (default), 'cuda:N' or 'cpu'")
    parser.add_argument('--tiny', action='store_true', help='small models and batches (the CPU self-test)')
    parser.add_argument('--sections', nargs='+', choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument('--strategies', nargs='+', choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument('--warmup', type=int, help='section 2: untimed iterations per variant (default 2; --tiny 0)')
    parser.add_argument('--timed', type=int, help='section 2: timed iterations per variant (default 3; --tiny 1)')
    parser.add_argument('--threads', type=int, default=1, help='torch intra-op threads of this process')
    parser.add_argument('--seed', type=int, default=0)
    return parser


# ------------------------------------------------------------------------------------------------- helpers
def child_env(**extra: str) -> dict[str, str]:
    """A subprocess's environment: one OpenMP thread, this checkout first on ``PYTHONPATH``."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get('PYTHONPATH', '')) if p)
    return {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': path, **extra}


def start(command: list[str], cwd: Path, **extra_env: str) -> subprocess.Popen:
    """A subprocess in its own session (so a timeout ends it and whatever it started), output captured."""
    return subprocess.Popen(command, cwd=cwd, env=child_env(**extra_env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(process: subprocess.Popen, timeout_s: float) -> str:
    """Waits for ``process`` (ending its session after ``timeout_s``, then raising) and returns its output."""
    try:
        return process.communicate(timeout=timeout_s)[0]
    except subprocess.TimeoutExpired:
        end(process)
        raise


def end(process: subprocess.Popen) -> None:
    """Ends a process this script started, and its children (its session), if it still runs."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def tail(text: str, lines: int = 15) -> str:
    return '\n'.join(text.strip().splitlines()[-lines:])


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def edited(text: str, edits: dict[str, str], what: str) -> str:
    """``text`` with every edit applied (each must apply: a stale edit is an error naming it)."""
    for old, new in edits.items():
        if old not in text:
            raise ValueError(f'{what}: {old!r} not found (the shipped config changed; update gpu_check.py)')
        text = text.replace(old, new)
    return text


def first_difference(a: Any, b: Any, path: str = 'state') -> str | None:
    """The path of the first difference of two loaded states (tensors bit for bit), or None if they are the same."""
    if isinstance(a, torch.Tensor):
        same = isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return None if same else path
    if isinstance(a, dict):
        if not isinstance(b, dict) or list(a) != list(b):
            return path
        return next((d for key in a if (d := first_difference(a[key], b[key], f'{path}.{key}')) is not None), None)
    if isinstance(a, (list, tuple)):
        if type(a) is not type(b) or len(a) != len(b):
            return path
        return next((d for i, (x, y) in enumerate(zip(a, b))
                     if (d := first_difference(x, y, f'{path}[{i}]')) is not None), None)
    return None if a == b or (a != a and b != b) else path  # nan == nan


class Workspace:
    """The temporary folder of a check: random-weight teacher checkpoints, edited configs, the short runs."""

    def __init__(self, root: Path, tiny: bool) -> None:
        self.root, self.tiny = root, tiny
        self.teacher_key = 'wrn_16_1' if tiny else TEACHER
        torch.manual_seed(0)
        self.teacher_ckpt = root / f'teacher_{self.teacher_key}.pt'
        atomic_save(get_model(self.teacher_key, num_classes=100).state_dict(), self.teacher_ckpt)

    def config_text(self, strategy: str, batch_size: int | None = None, student_steps: int | None = None,
                    extra: dict[str, str] | None = None, dataset_size: int = 8) -> str:
        """``cifar100/<strategy>.yaml`` on FakeData and the random teacher, with the requested sizes."""
        path = CONFIGS / f'{strategy}.yaml'
        text = path.read_text()
        edits = {SHIPPED_DATASET: FAKE_DATASET.format(size=dataset_size),
                 "src_ckpt: 'resource/ckpt/cifar100/teacher_resnet34.pt'": f"src_ckpt: '{self.teacher_ckpt}'",
                 'kwargs: {batch_size: 512, num_workers: 4}': 'kwargs: {batch_size: 64, num_workers: 0}'}
        if batch_size is not None or student_steps is not None:
            edits['batch_size: 512\n    student_steps: 10'] = \
                f'batch_size: {batch_size or 512}\n    student_steps: {student_steps or 10}'
        if self.tiny:
            edits.update(TINY_EDITS)
            for replay, replay_edits in TINY_REPLAY_EDITS.items():
                if f"key: '{replay}'" in text:
                    edits.update(replay_edits)
        edits.update(extra or {})
        return edited(text, edits, str(path.relative_to(ROOT)))

    def load_config(self, strategy: str, batch_size: int | None, student_steps: int | None) -> dict:
        path = self.root / f'{strategy}.yaml'
        path.write_text(self.config_text(strategy, batch_size, student_steps))
        config = yaml_util.load_yaml_file(str(path))
        import_dependencies(config.get('dependencies'))
        return config


@contextlib.contextmanager
def backend_flags(device: torch.device, tf32: bool) -> Iterator[None]:
    """The runner's switches for a block (TF32 on or off, cuDNN autotuning on), this process's own after it."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32
    set_backend_flags(device, tf32=tf32)
    try:
        yield
    finally:
        cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = before


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == 'cuda' else None


# ------------------------------------------------------------------------------------------------ sections
def meta_tests(args: argparse.Namespace, device: torch.device, sizes: Sizes, work: Workspace) -> dict[str, Any]:
    """1. tests/test_meta.py on the device."""
    command = [sys.executable, '-m', 'pytest', 'tests/test_meta.py', '-q', '-p', 'no:cacheprovider']
    report = work.root / 'test_meta.xml'  # the counts, whatever the verbosity (setup.cfg's addopts add a -q)
    # deterministic kernels on a GPU (the tests compare some gradients bit for bit): cuBLAS reads this at its start
    process = start([*command, f'--junitxml={report}'], ROOT, LRWA_TEST_DEVICE=str(device),
                    CUBLAS_WORKSPACE_CONFIG=os.environ.get('CUBLAS_WORKSPACE_CONFIG', ':4096:8'))
    output = finish(process, sizes.timeout_s)
    record: dict[str, Any] = {'command': f'LRWA_TEST_DEVICE={device} python ' + ' '.join(command[1:]),
                              'returncode': process.returncode, 'output_tail': tail(output)}
    if not report.is_file():
        return {**record, 'status': 'failed', 'error': f'pytest exited {process.returncode} without a report'}
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == 'testsuite' else suite.find('testsuite')
    counts = {key: int(suite.get(key, 0)) for key in ('tests', 'failures', 'errors', 'skipped')}
    record.update(passed=counts['tests'] - counts['failures'] - counts['errors'] - counts['skipped'],
                  failed=counts['failures'], errors=counts['errors'], skipped=counts['skipped'])
    ok = process.returncode == 0 and record['passed'] > 0 and not record['failed'] and not record['errors']
    record['status'] = 'passed' if ok else 'failed'
    if not ok:
        record['error'] = f'{record["failed"]} failed, {record["errors"]} errors (pytest exit {process.returncode})'
    return record


def iterations(args: argparse.Namespace, device: torch.device, sizes: Sizes, work: Workspace) -> dict[str, Any]:
    """2. Timed whole iterations per config and precision."""
    warmup = sizes.warmup if args.warmup is None else args.warmup
    timed = sizes.timed if args.timed is None else args.timed
    rows = []
    for strategy in args.strategies:
        config = work.load_config(strategy, sizes.batch_size, sizes.student_steps)
        train = config['train']
        total_iterations = train['num_epochs'] * train['data_free']['iterations_per_epoch']
        for name in PRECISIONS:
            row: dict[str, Any] = {'config': f'cifar100/{strategy}', 'precision': name,
                                   'batch_size': train['data_free']['batch_size'],
                                   'student_steps': train['data_free']['student_steps'],
                                   'full_run_iterations': total_iterations}
            rows.append(row)
            if name == 'tf32' and device.type != 'cuda':
                row.update(status='skipped', reason='TF32 is a no-op on the CPU (its float32 kernels do not use it)')
                continue
            box = None
            try:
                precision = Precision('bfloat16' if name == 'bfloat16' else None, device.type)
                with backend_flags(device, tf32=name == 'tf32'):
                    box = build_box(config, args.seed, device=device, precision=precision)
                    reset_peak(device)
                    times = []
                    for i in range(warmup + timed):
                        synchronize(device)
                        start = time.perf_counter()
                        box.train_iteration(0, i % box.iterations_per_epoch)
                        synchronize(device)
                        if i >= warmup:
                            times.append(time.perf_counter() - start)
                seconds = statistics.median(times)
                row.update(status='passed', s_per_it=seconds, times_s=times, peak_gib=peak_gib(device),
                           projected_hours=total_iterations * seconds / 3600)
            except Exception as error:  # recorded; the other variants still run
                row.update(status='failed', error=f'{type(error).__name__}: {error}',
                           traceback=tail(traceback.format_exc(), 8))
            finally:
                box = None  # before the next variant is built
                reset_peak(device)
    record = {'status': 'passed', 'warmup': warmup, 'timed': timed, 'rows': rows,
              'note': 'projected hours = num_epochs x iterations_per_epoch x s/iteration / 3600 (the configs\' 400 x '
                      '72), evaluations not included' + ('; --tiny sizes, not the paper\'s' if args.tiny else '')}
    failed = [row for row in rows if row['status'] == 'failed']
    if failed:
        record.update(status='failed', error='; '.join(f'{r["config"]} {r["precision"]}: {r["error"]}' for r in failed),
                      traceback='\n\n'.join(f'{r["config"]} {r["precision"]}:\n{r["traceback"]}' for r in failed))
    return record


def meta_step(args: argparse.Namespace, device: torch.device, sizes: Sizes, work: Workspace) -> dict[str, Any]:
    """3. The released step against plain and ours, interleaved, on the device."""
    import timm

    settings = []
    for setting in sizes.meta_settings:
        torch.manual_seed(args.seed)
        if setting['timm']:
            student = timm.create_model(setting['model'], pretrained=False, num_classes=setting['num_classes'])
        else:
            student = get_model(setting['model'], num_classes=setting['num_classes'])
        student = student.to(device).train()
        shape = (3, setting['img_size'], setting['img_size'])
        n, m, k = setting['acq_batch'], setting['mem_batch'], setting['num_classes']
        batches = {'x': torch.randn(n, *shape), 't': torch.randn(n, k), 'x_m': torch.randn(m, *shape),
                   't_m': torch.randn(m, k)}
        batches = {key: value.to(device) for key, value in batches.items()}
        steps, peaks, times = {}, {}, {v: [] for v in META_VARIANTS}
        for variant in META_VARIANTS:
            model = copy.deepcopy(student)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
            steps[variant] = bench_meta_step.make_step(variant, model, optimizer, batches, 0.9)
        order = list(META_VARIANTS)
        with backend_flags(device, tf32=False):
            for round_index in range(sizes.meta_warmup + sizes.meta_steps):
                for variant in order:
                    synchronize(device)
                    start = time.perf_counter()
                    steps[variant]()
                    synchronize(device)
                    if round_index >= sizes.meta_warmup:
                        times[variant].append(time.perf_counter() - start)
                order = order[1:] + order[:1]
            for variant in META_VARIANTS if device.type == 'cuda' else ():  # one more step each: its peak memory
                reset_peak(device)
                steps[variant]()
                synchronize(device)
                peaks[variant] = peak_gib(device)
        medians = {v: statistics.median(times[v]) for v in META_VARIANTS}
        settings.append({**{key: value for key, value in setting.items() if key != 'timm'},
                         'variants': {v: {'median_s': medians[v], 'ratio_to_plain': medians[v] / medians['plain'],
                                          'times_s': times[v], 'peak_gib': peaks.get(v),
                                          'description': bench_meta_step.DESCRIPTIONS[v]} for v in META_VARIANTS},
                         'released_over_plain': medians['released'] / medians['plain'],
                         'lrwa_over_plain': medians['lrwa_higher'] / medians['plain']})
        del steps, student, batches
        reset_peak(device)
    return {'status': 'passed', 'warmup': sizes.meta_warmup, 'steps': sizes.meta_steps, 'settings': settings,
            'cpu_reference': 'docs/performance.md, "One student step" (CPU, bench_meta_step sizes): '
                             'released 3.47x plain, lrwa (higher) 2.64x plain'}


def short_run_config(work: Workspace, sizes: Sizes, strategy: str, folder: Path) -> Path:
    """``cifar100/<strategy>.yaml`` for two epochs of one iteration, the second replaying (a memory bank pushes after
    each epoch; a VAE trains on the first student step)."""
    folder.mkdir(parents=True, exist_ok=True)
    extra = {'num_epochs: 400': 'num_epochs: 2', 'iterations_per_epoch: 72': 'iterations_per_epoch: 1'}
    if strategy in ('mb_dfkd', 'lrwa_mb'):
        extra['push_every_epochs: 5'] = 'push_every_epochs: 1'
    text = work.config_text(strategy, sizes.run_batch_size, sizes.run_student_steps, extra=extra, dataset_size=4)
    path = folder / 'run.yaml'
    path.write_text(text)
    return path


def cli_command(device: torch.device, *extra: str) -> list[str]:
    return ['--config', 'run.yaml', '--device', str(device), '--seed', '0', '-no_progress', '-no_sample_grids',
            '--dst_ckpt', 'out/student.pt', *extra]


def compare_runs(folders: list[Path]) -> str | None:
    """The first difference between two finished runs' training states and best students, or None."""
    states = [read_training_state(folder / 'out' / 'student.last.pt') for folder in folders]
    students = [load_state_dict_file(folder / 'out' / 'student.pt') for folder in folders]
    return (first_difference(states[0]['box'], states[1]['box'], 'box')
            or first_difference(states[0]['ranks'], states[1]['ranks'], 'ranks')
            or first_difference(states[0]['history'], states[1]['history'], 'history')
            or first_difference(students[0], students[1], 'best student'))


def determinism(args: argparse.Namespace, device: torch.device, sizes: Sizes, work: Workspace) -> dict[str, Any]:
    """4. Two -deterministic runs of each config, all at once, each in its own folder with the same relative paths
    (so the configs and paths they record are the same), compared bit for bit."""
    command = [sys.executable, '-m', 'lrwa_plugin', *cli_command(device, '-deterministic')]
    folders = {strategy: [work.root / 'determinism' / strategy / name for name in 'ab']
               for strategy in sizes.determinism_configs}
    for pair in folders.values():
        for folder in pair:
            short_run_config(work, sizes, folder.parent.name, folder)
    processes = {strategy: [start(command, folder) for folder in pair] for strategy, pair in folders.items()}
    try:
        outputs = {strategy: [finish(process, sizes.timeout_s) for process in pair]
                   for strategy, pair in processes.items()}
    finally:
        for pair in processes.values():
            for process in pair:
                end(process)
    runs = []
    for strategy, pair in processes.items():
        output = outputs[strategy]
        run: dict[str, Any] = {'config': f'cifar100/{strategy}', 'returncodes': [p.returncode for p in pair]}
        runs.append(run)
        failed = [i for i, process in enumerate(pair) if process.returncode != 0]
        if failed:
            run.update(identical=None, error=f'run {"ab"[failed[0]]} exited {pair[failed[0]].returncode}',
                       output_tail=tail(output[failed[0]]))
            continue
        difference = compare_runs(folders[strategy])
        run.update(identical=difference is None, first_difference=difference)
    identical = None if any(run['identical'] is None for run in runs) else all(run['identical'] for run in runs)
    record = {'status': 'passed' if identical else 'failed', 'identical': identical, 'runs': runs,
              'command': ' '.join(['python', *command[1:]]),
              'setting': f'2 epochs x 1 iteration (the second replaying), batch {sizes.run_batch_size}, '
                         f'{sizes.run_student_steps} student step(s), FakeData, a random teacher',
              'compared': 'training states (box: student, generator, optimizers, schedulers; ranks: memory, random '
                          'streams; history) and the best-student checkpoints'}
    if not identical:
        record['error'] = '; '.join(f'{run["config"]}: ' + (run.get('error') or f'differs at {run["first_difference"]}')
                                    for run in runs if not run['identical'])
    return record


def ranks(args: argparse.Namespace, device: torch.device, sizes: Sizes, work: Workspace) -> dict[str, Any]:
    """5. Two ranks under torchrun (nccl on two GPUs; gloo on the CPU)."""
    if device.type == 'cuda' and torch.cuda.device_count() < 2:
        return {'status': 'skipped', 'reason': f'{torch.cuda.device_count()} GPU visible: two ranks need two'}
    folder = work.root / 'ranks'
    short_run_config(work, sizes, 'lrwa_mb', folder)
    rank_device = torch.device('cuda') if device.type == 'cuda' else device  # each rank takes cuda:LOCAL_RANK
    command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port',
               str(free_port()), '-m', 'lrwa_plugin', *cli_command(rank_device, '--world_size', '2')]
    process = start(command, folder)
    output = finish(process, sizes.timeout_s)
    record: dict[str, Any] = {'backend': 'nccl' if device.type == 'cuda' else 'gloo', 'returncode': process.returncode,
                              'command': ' '.join(['python', *command[1:]])}
    if process.returncode != 0:
        return {**record, 'status': 'failed', 'error': f'torchrun exited {process.returncode}',
                'output_tail': tail(output)}
    state = read_training_state(folder / 'out' / 'student.last.pt')
    record.update(world_size=state['world_size'], position=[state['epoch'], state['iteration']],
                  summaries=output.count('Summary ['))
    ok = state['world_size'] == 2 and (state['epoch'], state['iteration']) == (2, 0) and record['summaries'] == 1
    record['status'] = 'passed' if ok else 'failed'
    if not ok:
        record['error'] = 'expected world_size 2, position (2, 0) and one summary (rank 0)'
    return record


SECTION_FUNCTIONS: dict[str, Callable[..., dict[str, Any]]] = {
    'meta_tests': meta_tests, 'iterations': iterations, 'meta_step': meta_step, 'determinism': determinism,
    'ranks': ranks}
TITLES = {'meta_tests': '1. Meta-step tests on the device', 'iterations': '2. Whole iterations, paper configs',
          'meta_step': '3. The released step against ours', 'determinism': '4. Determinism (-deterministic)',
          'ranks': '5. Two ranks (torchrun)'}


# ------------------------------------------------------------------------------------------------- report
def environment(device: torch.device, args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    cuda = device.type == 'cuda'
    name = torch.cuda.get_device_name(device) if cuda else f'{platform.processor() or platform.machine()} CPU'
    return {'device': str(device), 'device_name': name,
            'gpus_visible': torch.cuda.device_count() if torch.cuda.is_available() else 0,
            'torch': torch.__version__, 'cuda': torch.version.cuda, 'cudnn': torch.backends.cudnn.version(),
            'python': platform.python_version(), 'tiny': args.tiny, 'threads': torch.get_num_threads(),
            'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            'command': ' '.join(['python', 'benchmarks/gpu_check.py', *argv])}


def fmt(value: float | None, spec: str) -> str:
    return '—' if value is None else format(value, spec)


def section_lines(name: str, s: dict[str, Any]) -> list[str]:
    """A section's Markdown body (its table or sentence; what failed and why)."""
    if s['status'] == 'skipped':
        return [f'Skipped: {s["reason"]}.']
    lines = []
    if name == 'meta_tests' and 'passed' in s:
        lines += [f'`{s["command"]}`: {s["passed"]} passed, {s["failed"]} failed, {s["errors"]} errors, '
                  f'{s["skipped"]} skipped.']
    elif name == 'iterations' and 'rows' in s:
        lines += [f'Median of {s["timed"]} timed iterations after {s["warmup"]} warm-up; {s["note"]}.', '',
                  '| config | precision | batch | student steps | s / iteration | peak GiB | projected hours |',
                  '|---|---|--:|--:|--:|--:|--:|']
        for row in s['rows']:
            if row['status'] == 'passed':
                cells = f'{row["s_per_it"]:.3f} | {fmt(row["peak_gib"], ".2f")} | {row["projected_hours"]:.1f}'
            else:
                cells = f'{row["status"]}: {row.get("reason") or row.get("error", "")} | |'
            lines.append(f'| `{row["config"]}` | {row["precision"]} | {row["batch_size"]} | {row["student_steps"]} | '
                         f'{cells} |')
    elif name == 'meta_step' and 'settings' in s:
        lines += [f'Median of {s["steps"]} interleaved rounds after {s["warmup"]} warm-up, float32 (no TF32). '
                  f'CPU reference: {s["cpu_reference"]}.', '',
                  '| setting | student | acquisition + memory | step | ms | × plain | peak GiB |',
                  '|---|---|--:|---|--:|--:|--:|']
        for x in s['settings']:
            for variant, v in x['variants'].items():
                lines.append(f'| {x["name"]} | `{x["model"]}` | {x["acq_batch"]} + {x["mem_batch"]} | `{variant}` | '
                             f'{v["median_s"] * 1e3:.1f} | {v["ratio_to_plain"]:.2f} | {fmt(v["peak_gib"], ".2f")} |')
    elif name == 'determinism' and 'runs' in s:
        lines += [f'`{s["command"]}`, twice per config: {s["setting"]}. Compared: {s["compared"]}.', '',
                  '| config | identical | first difference |', '|---|---|---|']
        lines += [f'| `{run["config"]}` | {run["identical"]} | {run.get("first_difference") or run.get("error", "")} |'
                  for run in s['runs']]
    elif name == 'ranks' and 'backend' in s:
        lines += [f'`{s["command"]}` ({s["backend"]}): exit {s["returncode"]}'
                  + (f', world size {s["world_size"]}, stopped at epoch {s["position"][0]}, iteration '
                     f'{s["position"][1]}' if 'world_size' in s else '') + '.']
    if s['status'] == 'failed':
        lines += ['', f'**Failed**: {s.get("error", "")}']
        detail = s.get('traceback') or s.get('output_tail') or next(
            (run['output_tail'] for run in s.get('runs', []) if run.get('output_tail')), None)
        if detail:
            lines += ['', '```', detail, '```']
    return lines


def markdown(result: dict[str, Any]) -> str:
    env, sections = result['environment'], result['sections']
    lines = [f'# GPU acceptance run: {env["device_name"]}', '',
             f'`{env["command"]}` on `{env["device"]}` ({env["gpus_visible"]} GPU(s) visible): torch {env["torch"]}, '
             f'CUDA {env["cuda"]}, cuDNN {env["cudnn"]}, Python {env["python"]}, {env["date"]}'
             + ('; **--tiny** sizes, not the paper\'s' if env['tiny'] else '') + f'; {result["seconds"]:.0f} s in all.',
             '', 'What each section does: the docstring of `benchmarks/gpu_check.py`. Every number is in '
             '`gpu_check.json` beside this file.', '', '| section | status | seconds |', '|---|---|--:|']
    lines += [f'| {TITLES[name]} | {s["status"]} | {s["seconds"]:.1f} |' for name, s in sections.items()]
    skipped = [f'- {TITLES[name]}: {s["reason"]}' for name, s in sections.items() if s['status'] == 'skipped']
    skipped += [f'- {TITLES["iterations"]}, `{row["config"]}` {row["precision"]}: {row["reason"]}'
                for row in sections.get('iterations', {}).get('rows', []) if row['status'] == 'skipped']
    if skipped:
        lines += ['', 'Skipped:', '', *skipped]
    for name, s in sections.items():
        lines += ['', f'## {TITLES[name]}', '', *section_lines(name, s)]
    return '\n'.join(lines) + '\n'


def summary(result: dict[str, Any]) -> str:
    """The few lines printed at the end."""
    env, sections = result['environment'], result['sections']
    out = [f'gpu_check on {env["device"]} ({env["device_name"]}), torch {env["torch"]}, CUDA {env["cuda"]}'
           + (', --tiny sizes' if env['tiny'] else '') + f', {result["seconds"]:.0f} s']
    for name, s in sections.items():
        detail = s.get('reason') or s.get('error') or ''
        if name == 'meta_tests' and 'passed' in s:
            detail = f'{s["passed"]} passed, {s["failed"]} failed, {s["errors"]} errors'
        elif name == 'iterations' and 'rows' in s:
            by_config: dict[str, list[str]] = {}
            for row in s['rows']:
                by_config.setdefault(row['config'].split('/')[1], []).append(
                    f'{row["s_per_it"]:.3f}' if row['status'] == 'passed' else row['status'][:4])
            detail = 's/it float32/tf32/bfloat16: ' + ', '.join(f'{c} {"/".join(v)}' for c, v in by_config.items())
        elif name == 'meta_step' and 'settings' in s:
            detail = '; '.join(f'{x["name"]}: released/plain {x["released_over_plain"]:.2f}, lrwa/plain '
                               f'{x["lrwa_over_plain"]:.2f}' for x in s['settings'])
        elif name == 'determinism' and 'runs' in s:
            detail = ', '.join(f'{run["config"].split("/")[1]} identical: {run["identical"]}' for run in s['runs'])
        elif name == 'ranks' and 'world_size' in s:
            detail = f'{s["backend"]}, world size {s["world_size"]}, exit {s["returncode"]}'
        out.append(f'  {name:<12} {s["status"]:<8} {s["seconds"]:6.1f} s  {detail}')
    out.append(f'failed: {", ".join(result["failed"]) or "none"}; wrote {result["files"][0]} and {result["files"][1]}')
    return '\n'.join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_argparser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        print('error: --device cuda, but no CUDA device is visible; use --device cpu --tiny for the CPU self-test',
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torchdistill_logger = logging.getLogger('torchdistill')
    level = torchdistill_logger.level
    torchdistill_logger.setLevel(logging.WARNING)
    sizes = TINY if args.tiny else PAPER
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {'environment': environment(device, args, argv), 'sections': {}}
    start_all = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix='gpu_check_'))
    try:
        work = Workspace(scratch, args.tiny)
        for name in args.sections:
            start = time.perf_counter()
            try:
                record = SECTION_FUNCTIONS[name](args, device, sizes, work)
            except Exception as error:  # recorded; the next section still runs
                record = {'status': 'failed', 'error': f'{type(error).__name__}: {error}',
                          'traceback': tail(traceback.format_exc(), 12)}
            record['seconds'] = time.perf_counter() - start
            result['sections'][name] = record
            reset_peak(device)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        torchdistill_logger.setLevel(level)
    result['seconds'] = time.perf_counter() - start_all
    result['failed'] = [name for name, s in result['sections'].items() if s['status'] == 'failed']
    result['files'] = [str(out / 'gpu_check.json'), str(out / 'gpu_check.md')]
    (out / 'gpu_check.json').write_text(json.dumps(result, indent=1) + '\n')
    (out / 'gpu_check.md').write_text(markdown(result))
    print(summary(result))
    return 1 if result['failed'] else 0


if __name__ == '__main__':
    sys.exit(main())
