"""Learning-evolution statistics, the per-run JSON, sample grids, TensorBoard events and the comparison runner."""
from __future__ import annotations

import json
import math

import pytest
from conftest import DIGITS_CONFIGS, SHORT_RUN, run_cli, write_config
from PIL import Image

from lrwa_plugin.compare import main as compare_main
from lrwa_plugin.evolution import DEFINITION, evolution_stats, summarise, summary_markdown


def test_statistics_of_a_known_accuracy_list():
    stats = evolution_stats([10.0, 50.0, 40.0, 80.0, 70.0, 90.0])
    assert stats['mu'] == pytest.approx(340 / 6)
    # population variance: mean of squared deviations from 56.67
    assert stats['sigma2'] == pytest.approx(sum((a - 340 / 6) ** 2 for a in [10, 50, 40, 80, 70, 90]) / 6)
    assert stats['acc_max'] == 90.0 and stats['final'] == 90.0
    assert stats['mu_late'] == pytest.approx(80.0)  # second half: 80, 70, 90
    assert stats['sigma2_late'] == pytest.approx(200 / 3)
    assert stats['worst_drop'] == 10.0  # 50 -> 40 and 80 -> 70


def test_monotone_run_has_no_drop_and_single_epoch_is_defined():
    assert evolution_stats([1.0, 2.0, 3.0])['worst_drop'] == 0.0
    single = evolution_stats([42.0])
    assert single['sigma2'] == 0.0 and single['mu_late'] == 42.0
    with pytest.raises(ValueError):
        evolution_stats([])


def test_summary_is_mean_and_std_over_seeds_with_the_definition():
    runs = {'a': [evolution_stats([10.0, 20.0]) | {'seed': 0}, evolution_stats([30.0, 40.0]) | {'seed': 1}]}
    summary = summarise(runs)
    assert summary['a']['final'] == {'mean': 30.0, 'std': 10.0}
    table = summary_markdown(summary)
    assert '| a | 2 | ' in table and DEFINITION in table


def test_two_epoch_run_writes_evolution_json_sample_grids_and_tensorboard_events(work):
    config = write_config(DIGITS_CONFIGS / 'lrwa_mb.yaml', work / 'run.yaml', SHORT_RUN)
    assert run_cli(config, '--log_dir', str(work / 'tb')) == 0
    record = json.loads((work / 'resource/ckpt/digits/lrwa_mb.evolution.json').read_text())
    assert len(record['accuracy']) == 2 and all(0 <= a <= 100 for a in record['accuracy'])
    assert record['mu'] == pytest.approx(sum(record['accuracy']) / 2)
    assert record['definition'] == DEFINITION and record['seed'] == 0 and record['config'].endswith('run.yaml')
    assert {'sigma2', 'acc_max', 'final', 'mu_late', 'sigma2_late', 'worst_drop'} <= set(record)
    samples = work / 'resource/ckpt/digits/lrwa_mb.samples'
    for name in ('epoch_000_generated.png', 'epoch_001_generated.png', 'epoch_001_replayed.png'):
        with Image.open(samples / name) as image:
            assert image.size[0] > 100
    events = list((work / 'tb').glob('events.out.tfevents.*'))
    assert len(events) == 1 and events[0].stat().st_size > 1000


def test_compare_runs_configs_over_seeds_and_writes_the_three_files(work, capsys):
    configs = [write_config(DIGITS_CONFIGS / f'{name}.yaml', work / f'{name}.yaml',
                            {**SHORT_RUN, 'iterations_per_epoch: 3': 'iterations_per_epoch: 1',
                             'student_steps: 2': 'student_steps: 1'})
               for name in ('dfad', 'lrwa_mb')]
    out = work / 'cmp'
    argv = ['--configs', *map(str, configs), '--seeds', '0', '1', '--out', str(out)]
    assert compare_main(argv) == 0
    summary = json.loads((out / 'summary.json').read_text())
    assert set(summary['configs']) == {'dfad', 'lrwa_mb'} and summary['failed_runs'] == []
    assert all(entry['runs'] == 2 and entry['seeds'] == [0, 1] for entry in summary['configs'].values())
    table = (out / 'summary.md').read_text().splitlines()
    assert [line.split('|')[1].strip() for line in table if line.startswith('| ') and 'runs' not in line] == \
        ['dfad', 'lrwa_mb']
    with Image.open(out / 'evolution.png') as image:
        image.verify()
    # finished runs are not run again: a second call only re-reads them
    stamps = {p: p.stat().st_mtime for p in out.glob('*/seed*/student.pt')}
    assert compare_main(argv) == 0
    assert all(p.stat().st_mtime == t for p, t in stamps.items())
    assert not math.isnan(summary['configs']['lrwa_mb']['final']['mean'])
