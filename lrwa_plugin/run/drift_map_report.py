"""What a drift map found (:mod:`lrwa_plugin.run.drift_map`'s ``analyse``): its finished runs read, compared and
written as ``OUT/map.json``, ``OUT/map.md`` and ``OUT/map.png``.

Per level, the paired differences of each comparison on the primary statistics (``mu_late``, ``final``, and
``sigma2_late`` as a ratio: the paired mean of ``log((sigma2_late + 0.01) / (the other arm's + 0.01))``, exponentiated
with its interval); per comparison, the trend across levels (the per-seed differences regressed on the level index;
slope and 95% interval); per dataset, the axis check (the forgetting gap's trend must be negative). A run made by
another config or thread count than the map's is refused, never averaged in. The statistics are docs/study.md's
(learning evolution); the pre-registration they serve is docs/drift_map.md.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scipy import stats

from ..errors import ConfigError
from ..util import atomic_write_text
from .evolution import evolution_path, paired_differences, summarise
from .loading import config_digest, read_plain

if TYPE_CHECKING:  # the spec's types only: drift_map imports this module to analyse
    from .drift_map import Level, MapSpec

#: The primary statistics of a map, in order; ``log_sigma2_late`` is reported as a ratio.
PRIMARY = ('mu_late', 'final', 'log_sigma2_late')
SECONDARY = ('sigma2_late', 'mu', 'acc_max', 'worst_drop')
#: Added to sigma2_late before the log (points squared): a perfectly flat late run stays finite.
SIGMA2_FLOOR = 0.01


# ---------------------------------------------------------------------------------------------------- reading
def read_level(spec: MapSpec, level: Level) -> dict[str, list[dict]]:
    """The finished runs of a level, per arm: their evolution records with ``log_sigma2_late`` added. A run made by
    another config (its digest) or thread count than the map's is a ConfigError."""
    runs: dict[str, list[dict]] = {}
    for arm, config in level.configs.items():
        digest = config_digest(config)
        records = []
        for seed in spec.seeds_of(level, arm):
            run_dir = spec.out / level.folder / config.stem / f'seed{seed}'
            result_path = run_dir / 'result.json'
            if not result_path.is_file():
                continue
            result = json.loads(result_path.read_text())
            if result.get('config_digest') != digest or result.get('threads') != 1:
                raise ConfigError(str(result_path), f'made by another config or thread count than {config} on 1 '
                                                    'thread; move it away or restore the config')
            record = json.loads(evolution_path(run_dir / 'student.pt').read_text())
            record['log_sigma2_late'] = math.log(float(record['sigma2_late']) + SIGMA2_FLOOR)
            record['seconds'], record['cpu_seconds'] = result['seconds'], result.get('cpu_seconds', math.nan)
            records.append(record)
        if records:
            runs[arm] = records
    return runs


def knob_values(spec: MapSpec, level: Level) -> dict[str, Any]:
    """The level's knobs, read from its baseline config (``None`` where a path is absent)."""
    config = read_plain(level.configs[spec.baseline].read_text(encoding='utf-8'))
    values = {}
    for name, dotted in spec.knobs.items():
        node: Any = config
        for key in dotted.split('.'):
            node = node.get(key) if isinstance(node, Mapping) else None
        values[name] = node
    return values


# ---------------------------------------------------------------------------------------------------- statistics
def interval_as_ratio(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A paired log difference as a ratio: exp of its mean and of its interval's ends."""
    low, high = entry['ci']
    return {'n': entry['n'], 'ratio': math.exp(entry['mean']), 'ci': [math.exp(low), math.exp(high)],
            'below_one': bool(high < 0), 'above_one': bool(low > 0)}


def trend(points: Sequence[tuple[float, float]], confidence: float = 0.95) -> dict[str, Any]:
    """Ordinary least squares of y on x over ``(x, y)`` points: the slope, its ``confidence`` Student-t interval
    (df = N - 2) and the intercept; NaN where fewer than three points or fewer than two distinct x."""
    n = len(points)
    if n < 3 or len({x for x, _ in points}) < 2:
        return {'n': n, 'slope': math.nan, 'ci': [math.nan, math.nan], 'intercept': math.nan, 'excludes_zero': False}
    fit = stats.linregress([x for x, _ in points], [y for _, y in points])
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 2)) * fit.stderr
    low, high = fit.slope - half, fit.slope + half
    return {'n': n, 'slope': float(fit.slope), 'ci': [float(low), float(high)], 'intercept': float(fit.intercept),
            'excludes_zero': bool(low > 0 or high < 0)}


def compare_level(spec: MapSpec, runs: Mapping[str, Sequence[dict]]) -> dict[str, dict[str, Any]]:
    """Each comparison of the spec over the seeds both of its arms finished (``paired_differences``)."""
    result = {}
    for c in spec.comparisons:
        if c.arm in runs and c.against in runs:
            entry = paired_differences({c.arm: runs[c.arm], c.against: runs[c.against]}, c.against,
                                       keys=(*PRIMARY, *SECONDARY))[c.arm]
            entry['sigma2_late_ratio'] = interval_as_ratio(entry['log_sigma2_late'])
            result[c.label] = entry
    return result


def analyse(spec: MapSpec) -> dict[str, Any]:
    """Reads every finished run of the map; returns what ``map.json`` holds."""
    result: dict[str, Any] = {'seeds': list(spec.seeds), 'primary': list(PRIMARY), 'sigma2_floor': SIGMA2_FLOOR,
                              'datasets': {}}
    total = {'runs': 0, 'expected': sum(len(spec.seeds_of(lv, arm)) for lv in spec.levels for arm in spec.arms),
             'seconds': 0.0, 'cpu_seconds': 0.0}
    for dataset in sorted({lv.dataset for lv in spec.levels}):
        levels = {}
        points: dict[str, dict[str, list[tuple[float, float]]]] = {}
        for level in (lv for lv in spec.levels if lv.dataset == dataset):
            runs = read_level(spec, level)
            comparisons = compare_level(spec, runs)
            for label, entry in comparisons.items():
                for key in PRIMARY:
                    points.setdefault(label, {}).setdefault(key, []).extend(
                        (level.level, d) for d in entry[key]['per_seed'].values())
            finished = [r for records in runs.values() for r in records]
            spent = {key: sum(r[key] for r in finished) for key in ('seconds', 'cpu_seconds')}
            total['runs'] += len(finished)
            for key, value in spent.items():
                total[key] += value
            levels[str(level.level)] = {
                'folder': level.folder, 'knobs': knob_values(spec, level),
                'configs': {arm: str(path) for arm, path in level.configs.items()},
                'runs': {arm: len(runs.get(arm, [])) for arm in spec.arms},
                'summary': summarise(runs), 'comparisons': comparisons, **spent}
        trends = {label: {key: trend(pts) for key, pts in by_key.items()} for label, by_key in points.items()}
        axis = trends.get(spec.axis.label, {}).get('mu_late')
        result['datasets'][dataset] = {
            'levels': levels, 'trends': trends,
            'axis_check': {'comparison': spec.axis.label, 'statistic': 'mu_late', 'trend': axis,
                           'passes': bool(axis and axis['excludes_zero'] and axis['ci'][1] < 0)}}
    result['compute'] = total
    return result


# ---------------------------------------------------------------------------------------------------- writing
def _cell(entry: Mapping[str, Any] | None, ratio: bool = False) -> str:
    if entry is None or entry.get('n', 0) < 2 or any(math.isnan(v) for v in entry['ci']):
        return '–'
    if ratio:
        low, high = entry['ci']
        mark = '*' if entry['below_one'] or entry['above_one'] else ''
        return f"{entry['ratio']:.2f} [{low:.2f}, {high:.2f}]{mark}"
    low, high = entry['ci']
    value = entry['mean'] if 'mean' in entry else entry['slope']
    return f"{value:+.2f} [{low:+.2f}, {high:+.2f}]{'*' if entry['excludes_zero'] else ''}"


def _trend_ratio(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A trend of the log ratio as a factor per level (:func:`interval_as_ratio` of its slope)."""
    if entry['n'] < 3 or math.isnan(entry['slope']):
        return {'n': 0}
    return interval_as_ratio({**entry, 'mean': entry['slope']})


def map_markdown(spec: MapSpec, result: Mapping[str, Any]) -> str:
    """The map as markdown tables: the axis, the paired comparisons per level, the trends, the compute."""
    compute = result['compute']
    stage = spec.second_stage
    planned = f'{len(spec.arms)} arms × {len(spec.seeds)} seeds × {len(spec.levels)} levels' + (
        f'; second stage: {len(stage.arms)} arms × {len(stage.seeds)} seeds × {len(stage.levels)} levels'
        if stage else '')
    lines = [f"Runs finished: {compute['runs']} of {compute['expected']} ({planned}); {compute['seconds']:.0f} s of "
             f"run wall time, {compute['cpu_seconds']:.0f} CPU seconds.", '']
    knob_names = list(spec.knobs)
    for dataset, data in result['datasets'].items():
        lines += [f'## {dataset}', '', '| level | ' + ' | '.join(knob_names) + ' | runs per arm | '
                  + f'forgetting gap ({spec.axis.label}, Δ mu_late) |',
                  '|---|' + '---|' * (len(knob_names) + 2)]
        for key, level in data['levels'].items():
            runs = ', '.join(f'{arm} {n}' for arm, n in level['runs'].items())
            gap = level['comparisons'].get(spec.axis.label, {}).get('mu_late')
            lines.append(f'| {key} | ' + ' | '.join(str(level['knobs'][k]) for k in knob_names)
                         + f' | {runs} | {_cell(gap)} |')
        axis = data['axis_check']
        lines += ['', f"Axis check (the gap's trend per level, negative with its interval below 0): "
                      f"{_cell(axis['trend'])}, {'passes' if axis['passes'] else 'does not pass'}.", '',
                  '| level | comparison | seeds | Δ mu_late | Δ final | σ²-late ratio | Δ sigma2_late | Δ worst_drop |',
                  '|---|---|---|---|---|---|---|---|']
        for key, level in data['levels'].items():
            for label, entry in level['comparisons'].items():
                lines.append(f"| {key} | {label} | {len(entry['seeds'])} | {_cell(entry['mu_late'])} | "
                             f"{_cell(entry['final'])} | {_cell(entry['sigma2_late_ratio'], ratio=True)} | "
                             f"{_cell(entry['sigma2_late'])} | {_cell(entry['worst_drop'])} |")
        lines += ['', 'Trend across levels (per-seed paired differences regressed on the level index; slope per '
                      'level):', '', '| comparison | points | slope Δ mu_late | slope Δ final | σ²-late ratio, '
                                     'factor per level |', '|---|---|---|---|---|']
        for label, by_key in data['trends'].items():
            lines.append(f"| {label} | {by_key['mu_late']['n']} | {_cell(by_key['mu_late'])} | "
                         f"{_cell(by_key['final'])} | {_cell(_trend_ratio(by_key['log_sigma2_late']), ratio=True)} |")
        lines.append('')
    lines += ['Δ: paired by seed, arm minus the one it is compared with, in points; mean [95% Student-t interval]; * '
              'the interval excludes 0 (for a ratio: excludes 1). σ²-late ratio: exp of the paired mean of '
              f'log((sigma2_late + {SIGMA2_FLOOR}) / (the other arm\'s + {SIGMA2_FLOOR})), with exp of its '
              'interval. Statistics as defined in docs/study.md (learning evolution).', '']
    return '\n'.join(lines)


def plot_map(spec: MapSpec, result: Mapping[str, Any], path: Path) -> Path:
    """One column per dataset; rows: Δ mu_late, Δ final and the σ²-late ratio against the level, one line per
    comparison with the baseline (95% intervals as error bars)."""
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from .visuals import save_figure

    datasets = list(result['datasets'])
    rows = (('mu_late', 'Δ mu_late (points)'), ('final', 'Δ final (points)'), ('ratio', 'σ²-late ratio'))
    fig, axes = plt.subplots(len(rows), len(datasets), figsize=(4.6 * len(datasets), 9), dpi=110, squeeze=False)
    shown = [c for c in spec.comparisons if c.against == spec.baseline]
    for col, dataset in enumerate(datasets):
        levels = result['datasets'][dataset]['levels']
        for row, (key, name) in enumerate(rows):
            ax = axes[row][col]
            for i, c in enumerate(shown):
                xs, ys, lows, highs = [], [], [], []
                for level, data in levels.items():
                    entry = data['comparisons'].get(c.label)
                    value = None if entry is None else (entry['sigma2_late_ratio'] if key == 'ratio' else entry[key])
                    if value is None or value['n'] < 2:
                        continue
                    middle = value['ratio'] if key == 'ratio' else value['mean']
                    xs.append(int(level) + (i - (len(shown) - 1) / 2) * 0.06)
                    ys.append(middle)
                    lows.append(middle - value['ci'][0])
                    highs.append(value['ci'][1] - middle)
                if xs:
                    ax.errorbar(xs, ys, yerr=[lows, highs], marker='o', capsize=3, label=c.arm)
            ax.axhline(1.0 if key == 'ratio' else 0.0, color='grey', linewidth=0.8)
            if key == 'ratio':
                ax.set_yscale('log')
                ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f'{value:g}'))
                ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xticks([int(level) for level in levels])
            ax.set_xlim(min(map(int, levels)) - 0.3, max(map(int, levels)) + 0.3)
            ax.set_title(f'{dataset}: {name}', fontsize='medium')
            ax.set_xlabel('drift level')
            ax.grid(alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize='small', title=f'vs {spec.baseline}', title_fontsize='small')
    fig.tight_layout()
    return save_figure(fig, path)


def write_map(spec: MapSpec, result: Mapping[str, Any], name: str = 'map') -> list[Path]:
    """``OUT/<name>.json``, ``.md`` and ``.png``."""
    spec.out.mkdir(parents=True, exist_ok=True)
    return [atomic_write_text(spec.out / f'{name}.json', json.dumps(result, indent=2) + '\n'),
            atomic_write_text(spec.out / f'{name}.md', map_markdown(spec, result)),
            plot_map(spec, result, spec.out / f'{name}.png')]
