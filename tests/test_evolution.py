"""Learning-evolution statistics, the per-run JSON, sample grids, TensorBoard events and the comparison runner."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import DIGITS_CONFIGS, SHORT_RUN, run_cli, write_config
from PIL import Image

from lrwa_plugin.run.compare import main as compare_main
from lrwa_plugin.run.evolution import (
    DEFINITION,
    PAIRED_DEFINITION,
    evolution_stats,
    summarise,
    summary_markdown,
    write_evolution,
)
from lrwa_plugin.run.loading import config_digest


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


def test_summary_is_mean_and_sample_std_over_seeds_with_the_definition():
    runs = {'a': [evolution_stats([10.0, 20.0]) | {'seed': 0}, evolution_stats([30.0, 40.0]) | {'seed': 1}]}
    summary = summarise(runs)
    assert summary['a']['final'] == {'mean': 30.0, 'std': pytest.approx(math.sqrt(200))}  # n - 1 = 1
    table = summary_markdown(summary)
    assert '| a | 2 | ' in table and DEFINITION in table


def test_two_epoch_run_writes_evolution_json_sample_grids_and_tensorboard_events(work):
    config = write_config(DIGITS_CONFIGS / 'lrwa_mb.yaml', work / 'run.yaml', SHORT_RUN)
    assert run_cli(config, '--log_dir', str(work / 'tb'), sample_grids=True) == 0
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


def _hand_made_run(out, config: Path, seed: int, accuracy: list[float]) -> None:
    """A finished run as compare leaves it: its result record (with its config's digest and thread count, so it is
    reused) and its evolution file (so nothing is run)."""
    label = config.stem
    run_dir = out / label / f'seed{seed}'
    run_dir.mkdir(parents=True)
    (run_dir / 'result.json').write_text(json.dumps({'config': f'{label}.yaml', 'seed': seed, 'exit_status': 0,
                                                     'seconds': 10.0, 'threads': 1,
                                                     'config_digest': config_digest(config)}))
    (run_dir / 'student.evolution.json').write_text(json.dumps(evolution_stats(accuracy) | {
        'accuracy': accuracy, 'seed': seed, 'definition': DEFINITION, 'config': f'{label}.yaml'}))


def test_paired_differences_have_the_known_mean_and_student_t_interval(tmp_path, capsys):
    """Finals (= last epoch) per seed: base 90, 91, 92, 93; better = base + 1.0, 1.2, 0.8, 1.1 (mean 1.025, sd
    0.17078, t(0.975, 3) = 3.18245: interval [0.7533, 1.2967], excludes 0); noisy = base + 1, 2, 3, -6 (mean 0,
    interval [-6.50, 6.50])."""
    out = tmp_path / 'cmp'
    shifts = {'base': [0, 0, 0, 0], 'better': [1.0, 1.2, 0.8, 1.1], 'noisy': [1.0, 2.0, 3.0, -6.0]}
    configs = []
    for label, shift in shifts.items():
        (tmp_path / f'{label}.yaml').write_text('# hand-made: never run\n')
        configs.append(str(tmp_path / f'{label}.yaml'))
        for seed in range(4):
            _hand_made_run(out, tmp_path / f'{label}.yaml', seed, [50.0, 90.0 + seed + shift[seed]])
    assert compare_main(['--configs', *configs, '--seeds', '0', '1', '2', '3', '--out', str(out),
                         '--baseline', configs[0]]) == 0
    summary = json.loads((out / 'summary.json').read_text())
    better = summary['paired']['configs']['better']['final']
    assert better['n'] == 4 and better['mean'] == pytest.approx(1.025)
    assert better['ci'] == pytest.approx([1.025 - 3.182446 * 0.170783 / 2, 1.025 + 3.182446 * 0.170783 / 2], abs=1e-5)
    assert better['excludes_zero'] and better['per_seed'] == pytest.approx({'0': 1.0, '1': 1.2, '2': 0.8, '3': 1.1})
    noisy = summary['paired']['configs']['noisy']['final']
    assert noisy['mean'] == pytest.approx(0.0) and not noisy['excludes_zero']
    assert noisy['ci'][1] == pytest.approx(3.182446 * math.sqrt(50 / 3) / 2, abs=1e-4)
    assert summary['paired']['baseline'] == 'base' and summary['seconds'] == {'base': 40.0, 'better': 40.0,
                                                                              'noisy': 40.0}
    table = (out / 'summary.md').read_text()
    assert 'Paired differences to base' in table and PAIRED_DEFINITION in table and '+1.02 [+0.75, +1.30]*' in table
    bad = compare_main(['--configs', *configs, '--out', str(out), '--baseline', str(tmp_path / 'other.yaml')])
    assert bad == 2 and '--baseline' in capsys.readouterr().err
    assert compare_main(['--configs', *configs, '--out', str(out), '--jobs', '0']) == 2
    assert '--jobs: expected a positive integer, got 0' in capsys.readouterr().err


def test_compare_runs_configs_and_writes_the_three_files(work, capsys):
    configs = [write_config(DIGITS_CONFIGS / f'{name}.yaml', work / f'{name}.yaml',
                            {**SHORT_RUN, 'iterations_per_epoch: 3': 'iterations_per_epoch: 1',
                             'student_steps: 2': 'student_steps: 1'})
               for name in ('dfad', 'lrwa_mb')]
    out = work / 'cmp'
    argv = ['--configs', *map(str, configs), '--seeds', '0', '--out', str(out), '--baseline', str(configs[0]),
            '--jobs', '2']
    assert compare_main(argv) == 0
    summary = json.loads((out / 'summary.json').read_text())
    # both runs went at once, each on one thread, and their records say so and carry the child's own CPU time
    records = [json.loads((out / name / 'seed0/result.json').read_text()) for name in ('dfad', 'lrwa_mb')]
    assert all(r['threads'] == 1 and 0 < r['cpu_seconds'] for r in records) and summary['threads'] == ['1']
    assert set(summary['configs']) == {'dfad', 'lrwa_mb'} and summary['failed_runs'] == []
    assert all(entry['runs'] == 1 and entry['seeds'] == [0] for entry in summary['configs'].values())
    assert set(summary['paired']['configs']) == {'lrwa_mb'}
    table = (out / 'summary.md').read_text().splitlines()
    assert [line.split('|')[1].strip() for line in table if line.startswith('| ') and 'runs' not in line
            and 'seeds' not in line][:2] == ['dfad', 'lrwa_mb']
    with Image.open(out / 'evolution.png') as image:
        image.verify()
    assert not list(out.glob('*/seed0/student.samples'))  # compare's runs write no sample grids by default
    # finished runs are not run again: a second call only re-reads them
    stamps = {p: p.stat().st_mtime for p in out.glob('*/seed*/student.pt')}
    assert compare_main(argv) == 0
    assert all(p.stat().st_mtime == t for p, t in stamps.items())
    assert not math.isnan(summary['configs']['lrwa_mb']['final']['mean'])


def test_compare_reuses_a_finished_run_only_for_the_same_config_threads_and_precision(tmp_path, capsys):
    """A finished run is never silently reused for an edited config, another thread count or another --amp; one
    written before digests existed is reused once --adopt_legacy has recorded its digest. Nothing runs here: every
    case is refused (or reused) before a run would start."""
    config = write_config(DIGITS_CONFIGS / 'mb_dfkd.yaml', tmp_path / 'arm.yaml', {})
    run_dir = tmp_path / 'out' / 'arm' / 'seed0'
    run_dir.mkdir(parents=True)
    write_evolution(run_dir / 'student.pt', [50.0, 60.0], str(config), 0)
    legacy = {'config': str(config), 'seed': 0, 'exit_status': 0, 'seconds': 1.0, 'cpu_seconds': 1.0, 'threads': 1}
    (run_dir / 'result.json').write_text(json.dumps(legacy))
    argv = ['--configs', str(config), '--seeds', '0', '--out', str(tmp_path / 'out')]

    def refused(*extra: str) -> str:
        capsys.readouterr()
        assert compare_main([*argv, *extra]) == 2
        return capsys.readouterr().err

    assert 'without a config digest' in refused() and '--adopt_legacy' in refused()
    assert compare_main([*argv, '--adopt_legacy']) == 0  # reused as it is: nothing ran
    record = json.loads((run_dir / 'result.json').read_text())
    assert record['config_digest'] and record['seconds'] == 1.0 and not (run_dir / 'student.pt').exists()
    assert '--threads 1 -> 2' in refused('--threads', '2')
    assert '--amp none -> bfloat16' in refused('--amp', 'bfloat16')
    write_config(config, config, {'lr: 0.1,': 'lr: 0.05,'})  # the config edited after its run finished
    err = refused()
    assert err.startswith(f'error: --out: {run_dir} holds a finished run of another setting (its config changed '
                          'since (digest ') and err.count('\n') == 1, err


def test_the_same_seed_gives_every_arm_the_same_initial_student_and_generator(work):
    """What pairs runs by seed: whatever the strategy and memory, a seed builds the same student and generator."""
    from lrwa_plugin.run import cli, runner
    weights = {}
    for name in ('dfad', 'mb_dfkd', 'lrwa_gr'):
        config = write_config(DIGITS_CONFIGS / f'{name}.yaml', work / f'{name}.yaml', SHORT_RUN)
        args = cli.get_argparser().parse_args(['--config', str(config), '--device', 'cpu', '--seed', '3'])
        run = runner.set_up(config, args)
        weights[name] = (run.student.state_dict(), run.trainer.box.generator.state_dict())
        run.trainer.close()
    for name in ('mb_dfkd', 'lrwa_gr'):
        for reference, other in zip(weights['dfad'], weights[name]):
            assert all(torch.equal(reference[k], other[k]) for k in reference), name


@pytest.mark.parametrize('name', ['lrwa_mb', 'lrwa_gr'])
def test_sample_grids_change_nothing_the_run_computes(name, work):
    config = write_config(DIGITS_CONFIGS / f'{name}.yaml', work / 'run.yaml', SHORT_RUN)
    assert run_cli(config, '--dst_ckpt', 'grids/student.pt', sample_grids=True) == 0
    assert run_cli(config, '--dst_ckpt', 'none/student.pt') == 0
    from conftest import assert_same

    from lrwa_plugin.run.resume import read_training_state
    with_grids, without = (read_training_state(f'{d}/student.last.pt') for d in ('grids', 'none'))
    assert_same(with_grids['box'], without['box'])
    assert_same(with_grids['ranks'], without['ranks'])
    assert (work / 'grids/student.samples').is_dir() and not (work / 'none/student.samples').exists()


def test_a_stopped_comparison_keeps_its_runs_and_continues_them_and_has_its_out_to_itself(work, capsys):
    """Ctrl-C to compare: the running child stops at its next boundary with a training state, compare says so in one
    line (exit 130), and the same command continues: finished runs re-read, the stopped one resumed. A second
    compare into the same --out meanwhile is refused in one line."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import child_env
    config = write_config(DIGITS_CONFIGS / 'mb_dfkd.yaml', work / 'arm.yaml', {
        **SHORT_RUN, 'num_epochs: 2': 'num_epochs: 4', 'iterations_per_epoch: 3': 'iterations_per_epoch: 40'})
    out = work / 'cmp'
    argv = ['--configs', str(config), '--seeds', '0', '1', '--out', str(out), '--jobs', '1']
    process = subprocess.Popen([sys.executable, '-m', 'lrwa_plugin.run.compare', *argv], env=child_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300

        def wait_for(path: Path) -> None:
            while not path.exists() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)

        wait_for(out / 'compare.lock')
        capsys.readouterr()
        assert compare_main(argv) == 2  # a second comparison into the same --out, while the first holds it
        second = capsys.readouterr().err
        assert second.startswith('error: --out: another run (pid ') and 'give this comparison another --out' in second
        state = out / 'arm' / 'seed1' / 'student.last.pt'
        wait_for(out / 'arm/seed0/result.json')
        wait_for(state)
        process.send_signal(signal.SIGINT)  # seed 1 has three epochs left
        _, err = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 130 and err.splitlines()[-1].startswith(
        f"stopped: SIGINT; the finished runs in '{out}' are kept"), err[-2000:]
    assert 'Traceback' not in err
    assert (out / 'arm/seed0/result.json').is_file() and not (out / 'arm/seed1/result.json').is_file()
    assert state.is_file() and not (out / 'compare.lock').exists()
    stopped = json.loads((out / 'arm/seed1/attempts.json').read_text())
    assert [a['exit_status'] for a in stopped] == [130] and stopped[0]['seconds'] > 0
    assert compare_main(argv) == 0
    assert 'Resuming at epoch' in (out / 'arm/seed1/stdout.txt').read_text()
    record = json.loads((out / 'arm/seed1/result.json').read_text())
    assert record['exit_status'] == 0 and record['attempts'] == 2  # the stopped attempt's seconds are counted too
    assert record['seconds'] > stopped[0]['seconds'] and record['cpu_seconds'] > stopped[0]['cpu_seconds']
    assert 'attempts' not in json.loads((out / 'arm/seed0/result.json').read_text())
