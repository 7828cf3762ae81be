"""Runs several configs over several seeds and tabulates their learning evolution (``examples/compare.py``).

Every run is its own process of the installed runner (``python -m lrwa_plugin``; a crash loses only that run),
writing into ``OUT/<config stem>/seed<k>/``; a run that finished before (its ``result.json`` exists) is not run
again, so a long comparison can be stopped and continued later, and its small per-run files (``result.json``,
``student.evolution.json``) can be committed. Then, written atomically:

* ``OUT/summary.json`` and ``OUT/summary.md``: one row per config, each statistic mean ± sample std over seeds, the
  run time of its runs (wall and CPU seconds, as measured here), the definition under the table; with
  ``--baseline CONFIG``, a second table of paired differences to that config (per seed, then mean and 95% Student t
  interval over the seeds; :func:`lrwa_plugin.evolution.paired_differences`);
* ``OUT/evolution.png``: per-epoch accuracy, one line per config, mean with a ±std band over seeds.

``--name NAME`` writes ``NAME.json``, ``NAME.md`` and ``NAME.png`` instead, so other tables (a subset of the configs,
another baseline) can be made from the same runs.

.. code-block:: bash

    python examples/compare.py --configs examples/configs/digits/drift/{mb_dfkd,lrwa_mb}.yaml --seeds 0 1 2 \\
        --baseline examples/configs/digits/drift/mb_dfkd.yaml --out runs/digits_drift
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .evolution import (
    DEFINITION,
    PAIRED_DEFINITION,
    evolution_path,
    paired_differences,
    plot_evolution,
    summarise,
    summary_markdown,
)
from .util import atomic_write_text

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
    return parser


def run_one(config: Path, seed: int, run_dir: Path, device: str, runner: str | None = None,
            sample_grids: bool = False) -> dict:
    """Runs one config with one seed in a subprocess unless it finished before; returns its result record."""
    result_path = run_dir / 'result.json'
    if result_path.is_file():
        return json.loads(result_path.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, *((runner,) if runner else RUNNER), '--config', str(config), '--seed', str(seed),
               '--device', device, '--dst_ckpt', str(run_dir / 'student.pt'), '--run_log', str(run_dir / 'log.txt'),
               '-no_progress', *(() if sample_grids else ('-no_sample_grids',))]
    start, children = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(run_dir / 'stdout.txt', 'w') as out:
        status = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode
    done = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (done.ru_utime - children.ru_utime) + (done.ru_stime - children.ru_stime)
    record = {'config': str(config), 'seed': seed, 'exit_status': status, 'seconds': time.time() - start,
              'cpu_seconds': cpu}
    if status == 0:
        atomic_write_text(result_path, json.dumps(record, indent=2) + '\n')
    return record


def compare(configs: Sequence[str | Path], seeds: Sequence[int], out: str | Path, device: str = 'cpu',
            runner: str | None = None, baseline: str | Path | None = None, sample_grids: bool = False,
            name: str = 'summary') -> dict:
    """Runs every config with every seed, then writes the summary files; returns what ``NAME.json`` holds."""
    out = Path(out)
    evolutions: dict[str, list[dict]] = {}
    seconds: dict[str, float] = {}
    cpu_seconds: dict[str, float] = {}
    failures = []
    for config in map(Path, configs):
        label = config.stem
        for seed in seeds:
            run_dir = out / label / f'seed{seed}'
            record = run_one(config, seed, run_dir, device, runner, sample_grids)
            print(f"{label} seed {seed}: exit {record['exit_status']}, {record['seconds']:.0f} s", flush=True)
            if record['exit_status'] != 0:
                failures.append(f'{label} seed {seed} (see {run_dir / "stdout.txt"})')
                continue
            seconds[label] = seconds.get(label, 0.0) + float(record['seconds'])
            cpu_seconds[label] = cpu_seconds.get(label, 0.0) + float(record.get('cpu_seconds', math.nan))
            evolutions.setdefault(label, []).append(json.loads(evolution_path(run_dir / 'student.pt').read_text()))
    summary: dict[str, Any] = {'definition': DEFINITION, 'configs': summarise(evolutions), 'seconds': seconds,
                               'cpu_seconds': cpu_seconds, 'failed_runs': failures}
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; exit status 2 for bad arguments, 1 if a run failed, else 0."""
    args = get_argparser().parse_args(argv)
    missing = [c for c in args.configs if not Path(c).is_file()]
    if missing:
        print(f"error: --configs: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    stems = [Path(c).stem for c in args.configs]
    repeated = sorted({s for s in stems if stems.count(s) > 1})
    if repeated:
        print(f"error: --configs: two configs share the label (file stem) {', '.join(repeated)}; rename one",
              file=sys.stderr)
        return 2
    if args.baseline is not None and Path(args.baseline).stem not in stems:
        print(f"error: --baseline: '{args.baseline}' is not one of --configs", file=sys.stderr)
        return 2
    summary = compare(args.configs, args.seeds, args.out, args.device, args.runner, args.baseline,
                      args.sample_grids, args.name)
    paired = summary.get('paired')
    print(summary_markdown(summary['configs'], None if paired is None else paired['configs'],
                           None if paired is None else paired['baseline'], summary['seconds']))
    expected = len(args.configs) * len(args.seeds)
    return 0 if sum(entry['runs'] for entry in summary['configs'].values()) == expected else 1


if __name__ == '__main__':
    sys.exit(main())
