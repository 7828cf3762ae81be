"""Learning evolution: how steadily the student's test accuracy grows over training.

The LRWA paper (Patel, Mopuri, Qiu, CVPR 2023) claims a *steadier* student rather than a better best one, and
reports the mean μ, the variance σ² and the maximum Acc_max of the per-epoch test accuracy. Papers disagree on how σ²
is computed, so the definition used here travels with every number (:data:`DEFINITION`). Because the first epochs
dominate σ² over a whole run (it mostly measures the warm-up), the late-run figures ``mu_late``, ``sigma2_late``
(over the second half of the epochs) and ``worst_drop`` are recorded beside the paper's three.

Each run writes ``<dst_ckpt without suffix>.evolution.json``::

    {"accuracy": [...], "mu": ..., "sigma2": ..., "acc_max": ..., "final": ..., "mu_late": ...,
     "sigma2_late": ..., "worst_drop": ..., "definition": "...", "config": "...", "seed": 0}
"""
from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scipy.stats import t as student_t

from ..util import atomic_write_text

DEFINITION = (
    'With a_e the top-1 test accuracy in percent after epoch e = 1..E: mu = mean(a_e), sigma2 = population variance '
    '(1/E) sum (a_e - mu)^2, acc_max = max a_e, final = a_E, all over every epoch of the run; mu_late and '
    'sigma2_late are the same over the second half of the epochs (e > floor(E/2)); worst_drop = max_e (a_{e-1} - a_e), '
    'the largest fall from one epoch to the next (0 if accuracy never falls).'
)
STAT_KEYS = ('mu', 'sigma2', 'acc_max', 'final', 'mu_late', 'sigma2_late', 'worst_drop')


def evolution_stats(accuracy: Sequence[float]) -> dict[str, float]:
    """The statistics of :data:`DEFINITION` for one run's per-epoch accuracies (percent)."""
    if len(accuracy) == 0:
        raise ValueError('evolution_stats needs at least one epoch of accuracy')
    values = [float(a) for a in accuracy]
    late = values[len(values) // 2:]
    drops = [prev - cur for prev, cur in zip(values, values[1:])]
    return {
        'mu': statistics.fmean(values), 'sigma2': statistics.pvariance(values), 'acc_max': max(values),
        'final': values[-1], 'mu_late': statistics.fmean(late), 'sigma2_late': statistics.pvariance(late),
        'worst_drop': max([0.0, *drops]),
    }


def evolution_path(dst_ckpt: str | os.PathLike) -> Path:
    """``<dst_ckpt without suffix>.evolution.json``."""
    path = Path(os.path.expanduser(str(dst_ckpt)))
    return path.with_name(path.stem + '.evolution.json')


def write_evolution(dst_ckpt: str | os.PathLike, accuracy: Sequence[float], config: str | None,
                    seed: int | None) -> Path:
    """Writes the run's evolution JSON beside its checkpoint (atomically) and returns its path."""
    path = evolution_path(dst_ckpt)
    record = {'accuracy': [float(a) for a in accuracy], **evolution_stats(accuracy), 'definition': DEFINITION,
              'config': config, 'seed': seed}
    return atomic_write_text(path, json.dumps(record, indent=2) + '\n')


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``n − 1`` in the denominator; 0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per label (e.g. a config), each statistic as mean and sample std over its runs (seeds)."""
    summary: dict[str, dict[str, Any]] = {}
    for label, records in runs.items():
        entry: dict[str, Any] = {'runs': len(records), 'seeds': [r.get('seed') for r in records]}
        for key in STAT_KEYS:
            mean, std = mean_std([float(r[key]) for r in records])
            entry[key] = {'mean': mean, 'std': std}
        summary[label] = entry
    return summary


#: The statistics compared run by run against a baseline, primary first (the study fixes mu_late and final).
PAIRED_KEYS = ('mu_late', 'final', 'mu', 'acc_max', 'sigma2_late', 'worst_drop')
PAIRED_DEFINITION = (
    'Paired by seed: for each seed s run by both, d_s = statistic(config, s) - statistic(baseline, s); the table '
    'gives the mean of d_s over the n paired seeds and its 95% confidence interval mean +- t(0.975, n-1) * sd / '
    'sqrt(n) (Student t, sd the sample standard deviation of d_s); * marks an interval that excludes 0. The same '
    'seed gives every arm the same teacher, the same initial student and the same initial generator.'
)


def paired_differences(runs: Mapping[str, Sequence[Mapping[str, Any]]], baseline: str,
                       keys: Sequence[str] = PAIRED_KEYS, confidence: float = 0.95) -> dict[str, dict[str, Any]]:
    """Per label other than ``baseline``, each statistic's per-seed difference to the baseline's and its Student t
    confidence interval over the seeds both ran (see :data:`PAIRED_DEFINITION`).

    Returns:
        ``{label: {'seeds': [...], key: {'n', 'mean', 'std', 'ci': [low, high], 'excludes_zero', 'per_seed'}}}``;
        with fewer than two paired seeds the interval is ``[nan, nan]`` and excludes nothing.
    """
    by_seed = {label: {r['seed']: r for r in records} for label, records in runs.items()}
    if baseline not in by_seed:
        raise ValueError(f"paired_differences: the baseline '{baseline}' has no runs")
    reference = by_seed[baseline]
    result: dict[str, dict[str, Any]] = {}
    for label, records in by_seed.items():
        if label == baseline:
            continue
        seeds = sorted(seed for seed in records if seed in reference)
        entry: dict[str, Any] = {'seeds': seeds}
        for key in keys:
            diffs = [float(records[s][key]) - float(reference[s][key]) for s in seeds]
            n = len(diffs)
            mean = statistics.fmean(diffs) if n else math.nan
            std = statistics.stdev(diffs) if n > 1 else math.nan
            half = float(student_t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n) if n > 1 else math.nan
            low, high = mean - half, mean + half
            entry[key] = {'n': n, 'mean': mean, 'std': std, 'ci': [low, high],
                          'excludes_zero': bool(n > 1 and (low > 0 or high < 0)),
                          'per_seed': {str(s): d for s, d in zip(seeds, diffs)}}
        result[label] = entry
    return result


def summary_markdown(summary: Mapping[str, Mapping[str, Any]], paired: Mapping[str, Mapping[str, Any]] | None = None,
                     baseline: str | None = None, seconds: Mapping[str, float] | None = None) -> str:
    """The summary as markdown: one row per label with each statistic ``mean ± std`` over seeds (and the compute it
    took), the definition under it; with ``paired``, a second table of the differences to ``baseline``."""
    with_time = seconds is not None
    header = '| config | runs | ' + ' | '.join(STAT_KEYS) + (' | run time (s) |' if with_time else ' |')
    rule = '|---|---|' + '---|' * (len(STAT_KEYS) + with_time)
    rows = [f"| {label} | {entry['runs']} | "
            + ' | '.join(f"{entry[k]['mean']:.2f} ± {entry[k]['std']:.2f}" for k in STAT_KEYS)
            + (f' | {seconds.get(label, math.nan):.0f}' if with_time else '') + ' |'
            for label, entry in summary.items()]
    lines = [header, rule, *rows, '', f'Mean ± sample std over seeds. {DEFINITION}'
             + (' Run time: the wall time of all of the row\'s runs, as compare.py measured them.' if with_time
                else ''), '']
    if paired:
        keys = [k for k in PAIRED_KEYS if k in next(iter(paired.values()))]
        lines += [f'Paired differences to {baseline} (mean [95% CI]):', '',
                  '| config | seeds | ' + ' | '.join(f'Δ {k}' for k in keys) + ' |',
                  '|---|---|' + '---|' * len(keys)]
        for label, entry in paired.items():
            cells = []
            for k in keys:
                d = entry[k]
                low, high = d['ci']
                cells.append(f"{d['mean']:+.2f} [{low:+.2f}, {high:+.2f}]{'*' if d['excludes_zero'] else ''}")
            lines.append(f"| {label} | {len(entry['seeds'])} | " + ' | '.join(cells) + ' |')
        lines += ['', PAIRED_DEFINITION, '']
    return '\n'.join(lines)


def plot_evolution(curves: Mapping[str, Sequence[Sequence[float]]], path: str | os.PathLike,
                   title: str = 'Student test top-1 per epoch') -> Path:
    """Draws one line per label (mean over its runs) with a ±std band; writes a PNG."""
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from .visuals import save_figure

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for label, runs in curves.items():
        length = min(len(r) for r in runs)
        columns = [[r[e] for r in runs] for e in range(length)]
        stats = [mean_std(c) for c in columns]
        epochs = list(range(1, length + 1))
        means = [m for m, _ in stats]
        ax.plot(epochs, means, label=f'{label} (n={len(runs)})')
        ax.fill_between(epochs, [m - s for m, s in stats], [m + s for m, s in stats], alpha=0.2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel('epoch (line: mean over seeds; band: ± sample std)')
    ax.set_ylabel('top-1 (%)')
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc='lower right', fontsize='small')
    return save_figure(fig, path)
