"""The drift map (lrwa_plugin.run.drift_map and its report, drift_map_report): its spec, its grid's order, its
statistics and its files, on synthetic runs (no training); and the shipped map's levels, whose arms must differ only
in what their names say."""
from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, child_env

from lrwa_plugin.errors import ConfigError
from lrwa_plugin.run import drift_map, drift_map_report
from lrwa_plugin.run.evolution import evolution_stats
from lrwa_plugin.run.loading import config_digest, read_plain

ARMS = ('base', 'arm', 'none')


def make_spec(root: Path, levels=(0, 1, 2), seeds=range(6), teacher: bytes = b'teacher') -> Path:
    """A map of three arms on one dataset; each level a folder of tiny configs (the knob differs by level)."""
    (root / 'teacher.pt').write_bytes(teacher)
    for level in levels:
        folder = root / 'configs' / f'L{level}'
        folder.mkdir(parents=True)
        for arm in ARMS:
            (folder / f'{arm}.yaml').write_text(yaml.safe_dump(
                {'train': {'strategy': arm, 'data_free': {'generator': {'lr': 0.001 * 10 ** level}}}}))
    spec = {'out': str(root / 'out'), 'seeds': list(seeds), 'baseline': 'base', 'arms': list(ARMS),
            'comparisons': [{'arm': 'arm', 'against': 'base'}, {'arm': 'none', 'against': 'base'}],
            'axis': {'arm': 'none', 'against': 'base'}, 'knobs': {'generator_lr': 'train.data_free.generator.lr'},
            'teachers': {'toy': {'file': str(root / 'teacher.pt'), 'at': str(root / 'resource' / 'teacher.pt'),
                                 'sha256': drift_map.sha256_of(root / 'teacher.pt')}},
            'datasets': {'toy': [{'level': level, 'configs': str(root / 'configs' / f'L{level}')}
                                 for level in levels]}}
    path = root / 'map.yaml'
    path.write_text(yaml.safe_dump(spec))
    return path


def write_run(spec: drift_map.MapSpec, level: int, arm: str, seed: int, mu_late: float, spread: float,
              digest: str | None = None, threads: int = 1) -> None:
    """A finished run whose late half is [mu_late - spread, mu_late + spread]: sigma2_late = spread**2."""
    config = next(lv for lv in spec.levels if lv.level == level).configs[arm]
    run_dir = spec.out / f'toy_L{level}' / config.stem / f'seed{seed}'
    run_dir.mkdir(parents=True)
    accuracy = [10.0, 20.0, mu_late - spread, mu_late + spread]
    (run_dir / 'student.evolution.json').write_text(json.dumps({'accuracy': accuracy, **evolution_stats(accuracy),
                                                                'seed': seed}))
    (run_dir / 'result.json').write_text(json.dumps({'config': str(config), 'seed': seed, 'exit_status': 0,
                                                     'seconds': 10.0, 'cpu_seconds': 9.0, 'threads': threads,
                                                     'config_digest': digest or config_digest(config)}))


def fill(spec: drift_map.MapSpec, gain_per_level: float, noise: float = 0.3) -> None:
    """Every arm of every level and seed: 'arm' gains gain_per_level * level points of mu_late on 'base' and half its
    spread; 'none' loses 2 + 2 * level points (forgetting that grows along the axis)."""
    draw = random.Random(0)
    for level in (lv.level for lv in spec.levels):
        for seed in spec.seeds:
            base = 80.0 + draw.gauss(0, 2)
            write_run(spec, level, 'base', seed, base, 2.0)
            write_run(spec, level, 'arm', seed, base + gain_per_level * level + draw.gauss(0, noise), 1.0)
            write_run(spec, level, 'none', seed, base - 2 - 2 * level + draw.gauss(0, noise), 2.0)


def test_analyse_finds_a_gain_that_grows_with_drift_and_writes_the_map(tmp_path):
    spec = drift_map.load_spec(make_spec(tmp_path))
    fill(spec, gain_per_level=1.0)
    result = drift_map_report.analyse(spec)
    toy = result['datasets']['toy']
    slope = toy['trends']['arm vs base']['mu_late']
    assert slope['n'] == 18 and slope['ci'][0] < 1.0 < slope['ci'][1] and slope['excludes_zero']
    at_two = toy['levels']['2']['comparisons']['arm vs base']
    assert at_two['mu_late']['mean'] == pytest.approx(2.0, abs=0.5) and at_two['mu_late']['excludes_zero']
    ratio = at_two['sigma2_late_ratio']  # spread 1 against 2: sigma2_late (1 + 0.01) / (4 + 0.01) for every seed
    assert ratio['ratio'] == pytest.approx(1.01 / 4.01) and ratio['below_one']
    assert toy['levels']['0']['knobs'] == {'generator_lr': 0.001}
    assert toy['axis_check']['passes'] and toy['axis_check']['trend']['slope'] == pytest.approx(-2.0, abs=0.3)
    assert result['compute'] == {'runs': 54, 'expected': 54, 'seconds': 540.0, 'cpu_seconds': 486.0}
    paths = drift_map_report.write_map(spec, result)
    assert [p.name for p in paths] == ['map.json', 'map.md', 'map.png'] and all(p.stat().st_size > 0 for p in paths)
    text = (spec.out / 'map.md').read_text()
    assert 'Runs finished: 54 of 54' in text and 'Axis check' in text and 'passes' in text


def test_a_flat_difference_gives_a_trend_interval_over_zero(tmp_path):
    spec = drift_map.load_spec(make_spec(tmp_path))
    fill(spec, gain_per_level=0.0, noise=1.0)
    slope = drift_map_report.analyse(spec)['datasets']['toy']['trends']['arm vs base']['mu_late']
    assert slope['ci'][0] < 0 < slope['ci'][1] and not slope['excludes_zero']


def test_trend_is_least_squares_with_a_student_t_interval():
    draw = np.random.default_rng(1)
    x = np.repeat([0.0, 1.0, 2.0], 8)
    y = 0.5 * x + draw.normal(0, 1, x.size)
    result = drift_map_report.trend(list(zip(x, y)))
    slope, intercept = np.polyfit(x, y, 1)
    assert result['slope'] == pytest.approx(slope) and result['intercept'] == pytest.approx(intercept)
    residual = y - (slope * x + intercept)
    stderr = math.sqrt(residual @ residual / (x.size - 2) / ((x - x.mean()) @ (x - x.mean())))
    assert result['ci'][1] - result['slope'] == pytest.approx(2.0739 * stderr, rel=1e-3)  # t(0.975, 22)
    assert math.isnan(drift_map_report.trend([(1.0, 2.0), (1.0, 3.0), (1.0, 4.0)])['slope'])  # one level: no slope


def test_unfinished_cells_are_counted_not_guessed(tmp_path):
    spec = drift_map.load_spec(make_spec(tmp_path, levels=(0, 1)))
    write_run(spec, 0, 'base', 0, 80.0, 1.0)
    write_run(spec, 0, 'arm', 0, 81.0, 1.0)
    result = drift_map_report.analyse(spec)
    level = result['datasets']['toy']['levels']['0']
    assert level['runs'] == {'base': 1, 'arm': 1, 'none': 0} and result['compute']['runs'] == 2
    assert '–' in drift_map_report.map_markdown(spec, result)  # one seed: no interval


@pytest.mark.parametrize('digest, threads', [('0' * 64, 1), (None, 2)])
def test_a_run_made_by_another_config_or_thread_count_is_refused(tmp_path, capsys, digest, threads):
    path = make_spec(tmp_path)
    spec = drift_map.load_spec(path)
    write_run(spec, 1, 'arm', 3, 80.0, 1.0, digest=digest, threads=threads)
    assert drift_map.main(['--spec', str(path), 'analyse']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'toy_L1/arm/seed3/result.json' in err and 'another config' in err
    assert not (spec.out / 'map.json').exists()


@pytest.mark.parametrize('change, key', [
    (lambda s: s.update(colour='red'), 'spec.colour'),
    (lambda s: s.pop('axis'), 'spec.axis'),
    (lambda s: s['comparisons'].append({'arm': 'nope', 'against': 'base'}), 'spec.comparisons[2].arm'),
    (lambda s: s['comparisons'].append({'arm': 'base', 'against': 'base'}), 'spec.comparisons[2]'),
    (lambda s: s.update(axis={'arm': 'arm', 'against': 'none'}), 'spec.axis'),
    (lambda s: s.update(seeds=[0, 0]), 'spec.seeds'),
    (lambda s: s.update(baseline='other'), 'spec.baseline'),
    (lambda s: s['datasets']['toy'].append(dict(s['datasets']['toy'][0])), 'spec.datasets.toy[3].level'),
    (lambda s: s['datasets']['toy'][0].update(files={'arm': 'missing'}), 'spec.datasets.toy[0].configs'),
    (lambda s: s['teachers']['toy'].update(file='nowhere.pt'), 'spec.teachers.toy.file'),
])
def test_a_spec_that_cannot_work_is_one_line_and_exit_2(tmp_path, capsys, change, key):
    path = make_spec(tmp_path)
    spec = yaml.safe_load(path.read_text())
    change(spec)
    path.write_text(yaml.safe_dump(spec))
    assert drift_map.main(['--spec', str(path), 'run']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f'error: {key}:'), err
    assert not (tmp_path / 'out').exists() and not (tmp_path / 'resource').exists()


def test_teachers_are_put_in_place_and_a_different_one_is_never_replaced(tmp_path):
    spec = drift_map.load_spec(make_spec(tmp_path))
    target = tmp_path / 'resource' / 'teacher.pt'
    assert 'copied' in drift_map.install_teachers(spec)[0] and target.read_bytes() == b'teacher'
    assert 'checked' in drift_map.install_teachers(spec)[0]
    target.write_bytes(b'another teacher')
    with pytest.raises(ConfigError, match=r'spec\.teachers\.toy\.at: .* holds another teacher'):
        drift_map.install_teachers(spec)
    assert target.read_bytes() == b'another teacher'
    (tmp_path / 'teacher.pt').write_bytes(b'changed')  # the committed file no longer has the spec's digest
    with pytest.raises(ConfigError, match=r'spec\.teachers\.toy\.file'):
        drift_map.install_teachers(spec)


def test_the_grid_runs_seed_major_retries_a_failed_chunk_once_and_stops_when_stopped(tmp_path, monkeypatch):
    spec = drift_map.load_spec(make_spec(tmp_path, levels=(0, 1)))
    calls, statuses = [], iter([0, 1, 0, 0, 130])
    monkeypatch.setattr(drift_map.compare_module, 'main', lambda argv: calls.append(argv) or next(statuses))
    assert drift_map.run_map(spec, spec.levels, (0, 1, 2, 3), chunk=2, jobs=2) == 130
    seeds = [argv[argv.index('--seeds') + 1:argv.index('--baseline')] for argv in calls]
    assert seeds == [['0', '1'], ['0', '1', '2', '3'], ['0', '1', '2', '3'], ['0', '1'], ['0', '1', '2', '3']]
    assert [Path(argv[argv.index('--out') + 1]).name for argv in calls] == ['toy_L0'] * 3 + ['toy_L1'] * 2
    first = calls[0]
    assert [Path(c).stem for c in first[1:first.index('--seeds')]] == ['base', 'arm', 'none']  # baseline first
    assert first[first.index('--threads') + 1] == '1'


def test_the_shipped_map_loads_and_its_arms_differ_only_in_what_their_names_say(monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = drift_map.load_spec('examples/drift_map.yaml')
    assert len(spec.levels) == 5 and spec.baseline == 'mb_dfkd' and len(spec.seeds) >= 10
    for teacher in spec.teachers:
        assert drift_map.sha256_of(teacher.file) == teacher.sha256
    for level in spec.levels:
        shared = []
        for arm, config in level.configs.items():
            data = read_plain(config.read_text())
            data['models']['student_model'].pop('dst_ckpt')
            train = data['train']
            train.pop('strategy')
            for key in ('replay', 'meta'):
                train['data_free'].pop(key, None)
            shared.append(data)
            if 'lrwa' in arm:
                assert config_digest(config) and read_plain(config.read_text())['train']['data_free']['meta'] == \
                    {'alpha_per_lr': 1.0, 'backend': 'higher', 'order': 'second'}, config
        assert all(s == shared[0] for s in shared), level.folder
    knobs = {lv.folder: drift_map_report.knob_values(spec, lv) for lv in spec.levels}
    assert knobs['digits_L2'] == {'student_steps': 2, 'generator_lr': 0.02, 'bn_weight': 0.01, 'memory': 256}
    assert knobs['digits_L0']['memory'] == 1024 and knobs['mnist_L1']['generator_lr'] == 0.005


def test_the_example_script_analyses_a_map(tmp_path):
    spec = drift_map.load_spec(make_spec(tmp_path, levels=(0, 1), seeds=range(3)))
    fill(spec, gain_per_level=1.0)
    script = ROOT / 'examples' / 'drift_map.py'
    done = subprocess.run([sys.executable, str(script), '--spec', str(tmp_path / 'map.yaml'), 'analyse'],
                          capture_output=True, text=True, env=child_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert 'Runs finished: 18 of 18' in done.stdout and (spec.out / 'map.png').is_file()


def with_second_stage(path: Path, **stage) -> Path:
    spec = yaml.safe_load(path.read_text())
    spec['second_stage'] = {'seeds': [10, 11, 12], 'arms': ['base', 'arm'], 'levels': ['toy_L2', 'toy_L1'], **stage}
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_second_stage_adds_seeds_to_its_arms_and_levels_only(tmp_path, monkeypatch):
    spec = drift_map.load_spec(with_second_stage(make_spec(tmp_path, seeds=range(3))))
    level0, level1, level2 = spec.levels
    assert spec.seeds_of(level2, 'arm') == (0, 1, 2, 10, 11, 12) and spec.seeds_of(level2, 'none') == (0, 1, 2)
    assert spec.seeds_of(level0, 'base') == (0, 1, 2)
    for seed in (*spec.seeds, 10, 11, 12):
        write_run(spec, 2, 'base', seed, 80.0 + seed % 3, 2.0)
        write_run(spec, 2, 'arm', seed, 81.0 + seed % 2, 1.0)
    result = drift_map_report.analyse(spec)
    assert result['compute']['expected'] == 3 * 3 * 3 + 2 * 3 * 2 and result['compute']['runs'] == 12
    assert result['datasets']['toy']['levels']['2']['comparisons']['arm vs base']['seeds'] == [0, 1, 2, 10, 11, 12]
    calls = []
    monkeypatch.setattr(drift_map.compare_module, 'main', lambda argv: calls.append(argv) or 0)
    assert drift_map.main(['--spec', str(tmp_path / 'map.yaml'), 'run', '--stage', '2', '--chunk', '3']) == 0
    assert [Path(argv[argv.index('--out') + 1]).name for argv in calls] == ['toy_L2', 'toy_L1']  # the stage's order
    first = calls[0]
    assert [Path(c).stem for c in first[1:first.index('--seeds')]] == ['base', 'arm']
    assert first[first.index('--seeds') + 1:first.index('--baseline')] == ['10', '11', '12']
    assert first[first.index('--name') + 1] == 'stage2'  # the level's summary.* of stage 1 stays


@pytest.mark.parametrize('stage, key', [
    ({'seeds': [2, 10]}, 'spec.second_stage.seeds'),
    ({'arms': ['arm']}, 'spec.second_stage.arms'),
    ({'levels': ['toy_L7']}, 'spec.second_stage.levels[0]'),
    ({'when': 'later'}, 'spec.second_stage.when'),
])
def test_a_second_stage_that_cannot_work_is_refused(tmp_path, capsys, stage, key):
    path = with_second_stage(make_spec(tmp_path, seeds=range(3)), **stage)
    assert drift_map.main(['--spec', str(path), 'run', '--stage', '2']) == 2
    assert capsys.readouterr().err.startswith(f'error: {key}:')


def test_analyse_stage_1_reads_the_specs_seeds_only(tmp_path):
    path = with_second_stage(make_spec(tmp_path, seeds=range(3)))
    spec = drift_map.load_spec(path)
    for seed in (0, 1, 2, 10, 11):
        write_run(spec, 2, 'base', seed, 80.0, 2.0)
        write_run(spec, 2, 'arm', seed, 81.0 + seed % 2, 1.0)
    assert drift_map.main(['--spec', str(path), 'analyse', '--stage', '1']) == 0
    first = json.loads((spec.out / 'map_stage1.json').read_text())
    assert first['datasets']['toy']['levels']['2']['comparisons']['arm vs base']['seeds'] == [0, 1, 2]
    assert first['compute']['expected'] == 27 and not (spec.out / 'map.json').exists()
    assert drift_map.main(['--spec', str(path), 'analyse']) == 0
    every = json.loads((spec.out / 'map.json').read_text())
    assert every['datasets']['toy']['levels']['2']['comparisons']['arm vs base']['seeds'] == [0, 1, 2, 10, 11]
