"""``benchmarks/gpu_check.py``, the GPU acceptance run, in its CPU mode (``--device cpu --tiny``): every section runs
and records sane values, so the script cannot rot between the runs on a GPU. Nothing is asserted on timings beyond
their being positive and the projections following from them."""
from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import ROOT


@pytest.fixture(scope='module')
def gpu_check():
    spec = importlib.util.spec_from_file_location('gpu_check', ROOT / 'benchmarks' / 'gpu_check.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_mode_runs_every_section_and_reports_it(gpu_check, tmp_path, capsys):
    assert gpu_check.main(['--device', 'cpu', '--tiny', '--out', str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / 'gpu_check.json').read_text())
    sections = result['sections']
    assert list(sections) == list(gpu_check.SECTIONS) and result['failed'] == []
    for name, section in sections.items():
        assert section['status'] == 'passed' and section['seconds'] > 0, (name, section)
    assert result['environment']['device'] == 'cpu' and result['environment']['tiny'] is True

    tests = sections['meta_tests']
    assert tests['passed'] > 0 and (tests['failed'], tests['errors']) == (0, 0)
    assert tests['command'].startswith('LRWA_TEST_DEVICE=cpu ')

    rows = {(row['config'], row['precision']): row for row in sections['iterations']['rows']}
    assert set(rows) == {(f'cifar100/{s}', p) for s in gpu_check.STRATEGIES for p in gpu_check.PRECISIONS}
    for (config, precision), row in rows.items():
        assert row['batch_size'] == 8 and row['full_run_iterations'] == 400 * 72, config
        if precision == 'tf32':  # a no-op on the CPU, recorded as such
            assert row['status'] == 'skipped' and 'no-op' in row['reason']
            continue
        assert row['status'] == 'passed' and row['s_per_it'] > 0 and len(row['times_s']) == 1, (config, precision)
        assert row['projected_hours'] == pytest.approx(400 * 72 * row['s_per_it'] / 3600)

    for setting in sections['meta_step']['settings']:
        variants = setting['variants']
        assert list(variants) == ['plain', 'released', 'lrwa_higher']
        assert all(v['median_s'] > 0 for v in variants.values())
        assert setting['released_over_plain'] == pytest.approx(variants['released']['median_s'] /
                                                               variants['plain']['median_s'])
        assert setting['lrwa_over_plain'] == pytest.approx(variants['lrwa_higher']['median_s'] /
                                                           variants['plain']['median_s'])

    determinism = sections['determinism']
    assert determinism['identical'] is True and '-deterministic' in determinism['command']
    assert [run['identical'] for run in determinism['runs']] == [True]

    ranks = sections['ranks']  # gloo on the CPU
    assert (ranks['backend'], ranks['world_size'], ranks['position']) == ('gloo', 2, [2, 0])

    report = (tmp_path / 'gpu_check.md').read_text()
    for title in gpu_check.TITLES.values():
        assert f'## {title}' in report
    assert 'TF32 is a no-op on the CPU' in report and '| `cifar100/lrwa_mb` | float32 | 8 | 2 |' in report
    assert printed.count('\n') <= 10 and 'failed: none' in printed
