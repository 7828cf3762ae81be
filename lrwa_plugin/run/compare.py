"""Runs several configs over several seeds and tabulates their learning evolution (``examples/compare.py``).

Every run is its own process of the installed runner (``python -m lrwa_plugin``; a crash loses only that run),
writing into ``OUT/<config stem>/seed<k>/``; a run that finished before (its ``result.json`` exists) is not run
again, so a long comparison can be stopped and continued later (a stopped run resumes from its training state, and
its ``result.json`` counts the seconds of every attempt), and its small per-run files (``result.json``,
``student.evolution.json``) can be committed. Then, written atomically:

* ``OUT/summary.json`` and ``OUT/summary.md``: one row per config, each statistic mean ± sample std over seeds, the
  run time of its runs (wall and CPU seconds, as measured here), the definition under the table; with
  ``--baseline CONFIG``, a second table of paired differences to that config (per seed, then mean and 95% Student t
  interval over the seeds; :func:`lrwa_plugin.run.evolution.paired_differences`);
* ``OUT/evolution.png``: per-epoch accuracy, one line per config, mean with a ±std band over seeds.

``--name NAME`` writes ``NAME.json``, ``NAME.md`` and ``NAME.png`` instead, so other tables (a subset of the configs,
another baseline) can be made from the same runs.

Every run computes with ``--threads`` CPU threads (default 1; ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` in its
environment), recorded in its ``result.json``: floating-point sums differ with the thread count, so one count makes a
run's numbers the same on any machine, whatever its cores. ``--jobs`` runs (default: the CPU count over
``--threads``) go at once; on this project's 2-core machine two 1-thread runs took 130 s together where one 2-thread
run took 79 s alone (a digits drift LRWA run, measured 2026-12-02).

.. code-block:: bash

    python examples/compare.py --configs examples/configs/digits/drift/{mb_dfkd,lrwa_mb}.yaml --seeds 0 1 2 \\
        --baseline examples/configs/digits/drift/mb_dfkd.yaml --out runs/digits_drift
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..errors import ConfigError, WriteError
from ..precision import AMP_DTYPES
from ..util import atomic_write_text, listed
from .cli import check_device
from .evolution import (
    DEFINITION,
    PAIRED_DEFINITION,
    evolution_path,
    paired_differences,
    plot_evolution,
    summarise,
    summary_markdown,
)
from .files import RunLock, check_writable
from .loading import config_digest
from .stopping import interruptible

#: The runner every run is a process of: the installed package's command line (``python -m lrwa_plugin``).
RUNNER = ('-m', 'lrwa_plugin')


def get_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='Compare data-free configs over seeds: mu, sigma2, Acc_max, ...')
    parser.add_argument('--configs', nargs='+', required=True, help='yaml files (labels are their file stems)')
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument('--out', required=True, help='output directory')
    parser.add_argument('--baseline', help='one of --configs: also tabulate every other config\'s paired '
                                           'differences to it, with 95%% confidence intervals')
    parser.add_argument('--name', default='summary', help='the tables are OUT/NAME.json and OUT/NAME.md, the plot '
                                                          'OUT/NAME.png (default: summary.json, summary.md, '
                                                          'evolution.png); another name tabulates other configs or '
                                                          'another baseline over the same runs')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--sample_grids', action='store_true', help='let the runs write their per-epoch sample grids')
    parser.add_argument('--runner', help='a runner script to use instead of python -m lrwa_plugin '
                                         '(e.g. examples/run_torchdistill.py)')
    parser.add_argument('--threads', type=int, default=1,
                        help='CPU threads of every run (default 1: the same numbers on any machine)')
    parser.add_argument('--jobs', type=int, help='runs at once (default: the CPU count over --threads)')
    parser.add_argument('--amp', choices=sorted(AMP_DTYPES),
                        help="every run's --amp (mixed precision; recorded in its result.json)")
    parser.add_argument('--adopt_legacy', action='store_true',
                        help="record the current config's digest in finished runs that have none (written before "
                             'digests existed), once you have checked the configs are the ones they ran')
    return parser


def _reusable(record: dict, run_dir: Path, digest: str, threads: int, amp: str | None, adopt: bool) -> dict:
    """A finished run's record, if it was made by this config, thread count and precision; else one line, exit 2.
    A record written before digests existed is reused only after ``--adopt_legacy`` has recorded the digest."""
    problems = []
    if 'config_digest' not in record:
        if not adopt:
            raise ConfigError('--out', f'{run_dir} holds a finished run without a config digest (written before '
                                       'digests existed); if its config is unchanged since, add --adopt_legacy to '
                                       'record it, else give another --out')
        record = {**record, 'config_digest': digest}
        atomic_write_text(run_dir / 'result.json', json.dumps(record, indent=2) + '\n')
    if record['config_digest'] != digest:
        problems.append(f"its config changed since (digest {record['config_digest'][:12]} -> {digest[:12]})")
    if record.get('threads') != threads:
        problems.append(f"--threads {record.get('threads')} -> {threads} (results change with the thread count)")
    if record.get('amp') != amp:
        problems.append(f"--amp {record.get('amp') or 'none'} -> {amp or 'none'}")
    if problems:
        raise ConfigError('--out', f"{run_dir} holds a finished run of another setting ({'; '.join(problems)}); "
                                   'give another --out, or remove that folder to run it again')
    return record


class _Children:
    """The runs going now, so that a stopped comparison stops them (each at its next boundary, with a state)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: set[subprocess.Popen] = set()
        self.stopping = False

    def stop(self, signum: int = signal.SIGINT) -> None:
        """No run starts any more; the running ones get the signal (their threads wait for them to end)."""
        with self.lock:
            self.stopping = True
            running = list(self.running)
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)


_CHILDREN = _Children()


def run_one(config: Path, seed: int, run_dir: Path, device: str, digest: str, runner: str | None = None,
            sample_grids: bool = False, threads: int = 1, amp: str | None = None) -> dict:
    """Runs one config (its ``digest``: :func:`~lrwa_plugin.run.loading.config_digest`) with one seed in a
    subprocess unless it finished before (:func:`compare` has checked that a finished run is reusable); returns its
    result record. A run that resumes a stopped attempt counts that attempt's seconds too (``attempts.json`` keeps
    them), so its record is the whole run's compute."""
    result_path = run_dir / 'result.json'
    if result_path.is_file():
        return json.loads(result_path.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    state = run_dir / 'student.last.pt'  # a run stopped before: it continues from its training state
    command = [sys.executable, *((runner,) if runner else RUNNER), '--config', str(config), '--seed', str(seed),
               '--device', device, '--dst_ckpt', str(run_dir / 'student.pt'), '--run_log', str(run_dir / 'log.txt'),
               '-no_progress', *(() if sample_grids else ('-no_sample_grids',)), *(('--amp', amp) if amp else ()),
               *(('--resume', str(state)) if state.is_file() else ())]
    env = {**os.environ, 'OMP_NUM_THREADS': str(threads), 'MKL_NUM_THREADS': str(threads)}
    attempts_path = run_dir / 'attempts.json'  # the stopped attempts this run continues from (none: from scratch)
    earlier = json.loads(attempts_path.read_text()) if state.is_file() and attempts_path.is_file() else []
    start = time.time()
    with open(run_dir / 'stdout.txt', 'a' if state.is_file() else 'w') as out, _CHILDREN.lock:
        if _CHILDREN.stopping:
            return {'config': str(config), 'seed': seed, 'exit_status': None, 'seconds': 0.0}
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        _CHILDREN.running.add(process)
    try:
        # this child's own CPU time (other runs may be going at once, so not RUSAGE_CHILDREN)
        _, wait_status, usage = os.wait4(process.pid, 0)
        process.returncode = status = os.waitstatus_to_exitcode(wait_status)
    finally:
        with _CHILDREN.lock:
            _CHILDREN.running.discard(process)
    attempt = {'exit_status': status, 'seconds': time.time() - start, 'cpu_seconds': usage.ru_utime + usage.ru_stime}
    record = {'config': str(config), 'seed': seed, 'exit_status': status,
              'seconds': attempt['seconds'] + sum(a['seconds'] for a in earlier),
              'cpu_seconds': attempt['cpu_seconds'] + sum(a['cpu_seconds'] for a in earlier),
              **({'attempts': len(earlier) + 1} if earlier else {}), 'threads': threads,
              **({'amp': amp} if amp else {}), 'config_digest': digest}
    if status == 0:
        atomic_write_text(result_path, json.dumps(record, indent=2) + '\n')
    else:
        atomic_write_text(attempts_path, json.dumps([*earlier, attempt], indent=2) + '\n')
    return record


def compare(configs: Sequence[str | Path], seeds: Sequence[int], out: str | Path, device: str = 'cpu',
            runner: str | None = None, baseline: str | Path | None = None, sample_grids: bool = False,
            name: str = 'summary', threads: int = 1, jobs: int = 1, amp: str | None = None,
            adopt: bool = False) -> dict:
    """Runs every config with every seed (``jobs`` at once, each on ``threads`` CPU threads, ``amp``: their
    ``--amp``), then writes the summary files; returns what ``NAME.json`` holds. Finished runs are reused only if they
    were made by the same config, thread count and precision: that is checked for all of them before any run starts
    (:class:`~lrwa_plugin.errors.ConfigError` otherwise)."""
    out = Path(out)
    evolutions: dict[str, list[dict]] = {}
    seconds: dict[str, float] = {}
    cpu_seconds: dict[str, float] = {}
    failures = []
    runs = [(config, seed, out / config.stem / f'seed{seed}') for config in map(Path, configs) for seed in seeds]
    digests = {config: config_digest(config) for config in {config for config, _, _ in runs}}
    for config, _, run_dir in runs:  # every finished run checked before any run starts
        if (run_dir / 'result.json').is_file():
            _reusable(json.loads((run_dir / 'result.json').read_text()), run_dir, digests[config], threads, amp,
                      adopt)

    def run(config: Path, seed: int, run_dir: Path) -> dict:
        record = run_one(config, seed, run_dir, device, digests[config], runner, sample_grids, threads, amp)
        print(f"{config.stem} seed {seed}: exit {record['exit_status']}, {record['seconds']:.0f} s", flush=True)
        return record

    _CHILDREN.stopping = False
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(run, *r) for r in runs]
        try:
            records = [future.result() for future in futures]
        except BaseException as error:  # Ctrl-C / SIGTERM: every run going now stops at its next boundary
            for future in futures:
                future.cancel()
            _CHILDREN.stop(getattr(error, 'signum', signal.SIGINT))
            raise
    used = sorted({str(record.get('threads', 'unrecorded')) for record in records})
    if len(used) > 1:
        print(f'warning: these runs computed with different thread counts ({listed(used)}); their numbers '
              'are not comparable bit for bit', file=sys.stderr)
    for (config, seed, run_dir), record in zip(runs, records):
        label = config.stem
        if record['exit_status'] != 0:
            failures.append(f'{label} seed {seed} (see {run_dir / "stdout.txt"})')
            continue
        seconds[label] = seconds.get(label, 0.0) + float(record['seconds'])
        cpu_seconds[label] = cpu_seconds.get(label, 0.0) + float(record.get('cpu_seconds', math.nan))
        evolutions.setdefault(label, []).append(json.loads(evolution_path(run_dir / 'student.pt').read_text()))
    summary: dict[str, Any] = {'definition': DEFINITION, 'configs': summarise(evolutions), 'seconds': seconds,
                               'cpu_seconds': cpu_seconds, 'threads': used, 'failed_runs': failures}
    baseline_label = None if baseline is None else Path(baseline).stem
    paired = None
    if baseline_label is not None and baseline_label in evolutions:
        paired = paired_differences(evolutions, baseline_label)
        summary['paired'] = {'baseline': baseline_label, 'definition': PAIRED_DEFINITION, 'configs': paired}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f'{name}.json', json.dumps(summary, indent=2) + '\n')
    atomic_write_text(out / f'{name}.md', summary_markdown(summary['configs'], paired, baseline_label, seconds))
    if evolutions:
        plot_evolution({label: [r['accuracy'] for r in runs] for label, runs in evolutions.items()},
                       out / ('evolution.png' if name == 'summary' else f'{name}.png'))
    if failures:
        print('failed runs: ' + '; '.join(failures), file=sys.stderr)
    return summary


def check_arguments(args: argparse.Namespace) -> int:
    """Every argument that cannot work is one :class:`~lrwa_plugin.errors.ConfigError`, before any run starts;
    returns the number of runs at once."""
    missing = [c for c in args.configs if not Path(c).is_file()]
    if missing:
        raise ConfigError('--configs', f"no such file: {', '.join(missing)}")
    stems = [Path(c).stem for c in args.configs]
    repeated = sorted({s for s in stems if stems.count(s) > 1})
    if repeated:
        raise ConfigError('--configs', f"two configs share the label (file stem) {', '.join(repeated)}; rename one")
    if args.baseline is not None and Path(args.baseline).stem not in stems:
        raise ConfigError('--baseline', f"'{args.baseline}' is not one of --configs")
    for key in ('threads', 'jobs'):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise ConfigError(f'--{key}', f'expected a positive integer, got {getattr(args, key)}')
    bad_seeds = [s for s in args.seeds if not 0 <= s < 2 ** 32]
    if bad_seeds or len(set(args.seeds)) != len(args.seeds):
        raise ConfigError('--seeds', f'expected distinct integers from 0 to 2**32 - 1, got {args.seeds}')
    if not args.name or Path(args.name).name != args.name or args.name in ('.', '..'):
        raise ConfigError('--name', f"expected a plain file name (the tables are OUT/NAME.json, ...), got "
                                    f"'{args.name}'")
    if args.runner is not None and not Path(args.runner).is_file():
        raise ConfigError('--runner', f"no such file: '{args.runner}'")
    check_device(args.device)
    check_writable(folders=[(args.out, '--out')])
    return args.jobs if args.jobs is not None else max(1, (os.cpu_count() or 1) // args.threads)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; exit status 2 for bad arguments, 1 if a run failed, 4 for a file that could not be written,
    128 + the signal's number when stopped by SIGINT / SIGTERM, else 0."""
    args = get_argparser().parse_args(argv)
    try:
        jobs = check_arguments(args)
        # one comparison at a time per --out: two would run the same seeds into the same folders
        with interruptible(), RunLock(Path(args.out) / 'compare', '--out',
                                      advice='let it finish, stop it, or give this comparison another --out'):
            summary = compare(args.configs, args.seeds, args.out, args.device, args.runner, args.baseline,
                              args.sample_grids, args.name, args.threads, jobs, args.amp, args.adopt_legacy)
    except (ConfigError, WriteError) as error:
        print(f'error: {error}', file=sys.stderr)
        return error.exit_status
    except KeyboardInterrupt as interrupt:
        signum = getattr(interrupt, 'signum', signal.SIGINT)
        print(f"stopped: {signal.Signals(signum).name}; the finished runs in '{args.out}' are kept and the runs that "
              'were going stopped at their next boundary with a training state; run the same command again to '
              'continue (finished runs are re-read, stopped ones resume)', file=sys.stderr)
        return 128 + signum
    paired = summary.get('paired')
    print(summary_markdown(summary['configs'], None if paired is None else paired['configs'],
                           None if paired is None else paired['baseline'], summary['seconds']))
    expected = len(args.configs) * len(args.seeds)
    return 0 if sum(entry['runs'] for entry in summary['configs'].values()) == expected else 1


if __name__ == '__main__':
    sys.exit(main())
