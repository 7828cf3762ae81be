"""Runs several configs over several seeds and tabulates their learning evolution (``examples/compare.py``).

Every run is its own process (a crash loses only that run) writing into ``OUT/<config stem>/seed<k>/``; a run that
finished before (its ``result.json`` exists) is not run again. Then ``OUT/summary.json``, ``OUT/summary.md`` (one row
per config, each statistic mean ± std over seeds, the definition under the table) and ``OUT/evolution.png``
(per-epoch accuracy, one line per config, mean with a ±std band over seeds).

    python examples/compare.py --configs examples/configs/digits/dfad.yaml examples/configs/digits/lrwa_mb.yaml \\
        --seeds 0 1 2 --out runs/digits
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .evolution import DEFINITION, evolution_path, plot_evolution, summarise, summary_markdown

#: The runner every run is a process of: the installed package's command line (``python -m lrwa_plugin``).
RUNNER = ('-m', 'lrwa_plugin')


def get_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='Compare data-free configs over seeds: mu, sigma2, Acc_max, ...')
    parser.add_argument('--configs', nargs='+', required=True, help='yaml files (labels are their file stems)')
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument('--out', required=True, help='output directory')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--runner', help='a runner script to use instead of python -m lrwa_plugin '
                                         '(e.g. examples/run_torchdistill.py)')
    return parser


def run_one(config: Path, seed: int, run_dir: Path, device: str, runner: str | None = None) -> dict:
    """Runs one config with one seed in a subprocess unless it finished before; returns its result record."""
    result_path = run_dir / 'result.json'
    if result_path.is_file():
        return json.loads(result_path.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, *((runner,) if runner else RUNNER), '--config', str(config), '--seed', str(seed),
               '--device', device, '--dst_ckpt', str(run_dir / 'student.pt'), '--run_log', str(run_dir / 'log.txt'),
               '-no_progress']
    start = time.time()
    with open(run_dir / 'stdout.txt', 'w') as out:
        status = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode
    record = {'config': str(config), 'seed': seed, 'exit_status': status, 'seconds': time.time() - start}
    if status == 0:
        result_path.write_text(json.dumps(record, indent=2) + '\n')
    return record


def compare(configs: Sequence[str | Path], seeds: Sequence[int], out: str | Path, device: str = 'cpu',
            runner: str | None = None) -> dict:
    """Runs every config with every seed, then writes the summary files; returns the summary."""
    out = Path(out)
    evolutions: dict[str, list[dict]] = {}
    failures = []
    for config in map(Path, configs):
        label = config.stem
        for seed in seeds:
            run_dir = out / label / f'seed{seed}'
            record = run_one(config, seed, run_dir, device, runner)
            print(f"{label} seed {seed}: exit {record['exit_status']}, {record['seconds']:.0f} s", flush=True)
            if record['exit_status'] != 0:
                failures.append(f'{label} seed {seed} (see {run_dir / "stdout.txt"})')
                continue
            evolutions.setdefault(label, []).append(json.loads(evolution_path(run_dir / 'student.pt').read_text()))
    summary = summarise(evolutions)
    (out / 'summary.json').write_text(json.dumps({'definition': DEFINITION, 'configs': summary,
                                                  'failed_runs': failures}, indent=2) + '\n')
    (out / 'summary.md').write_text(summary_markdown(summary))
    if evolutions:
        plot_evolution({label: [r['accuracy'] for r in runs] for label, runs in evolutions.items()},
                       out / 'evolution.png')
    if failures:
        print('failed runs: ' + '; '.join(failures), file=sys.stderr)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = get_argparser().parse_args(argv)
    missing = [c for c in args.configs if not Path(c).is_file()]
    if missing:
        print(f"error: --configs: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    summary = compare(args.configs, args.seeds, args.out, args.device, args.runner)
    print(summary_markdown(summary))
    expected = len(args.configs) * len(args.seeds)
    return 0 if sum(entry['runs'] for entry in summary.values()) == expected else 1


if __name__ == '__main__':
    sys.exit(main())
