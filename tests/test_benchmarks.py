"""The step benchmark runs and reports what the speed issue asks for; its work counts (not its times) are checked.

Nothing here asserts on wall-clock time: floating-point operation counts are machine-independent.
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope='module')
def bench_meta_step():
    spec = importlib.util.spec_from_file_location('bench_meta_step', ROOT / 'benchmarks' / 'bench_meta_step.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_meta_step_json(bench_meta_step, capsys):
    assert bench_meta_step.main(['--img_size', '16', '--acq_batch', '8', '--mem_batch', '2', '--steps', '1',
                                 '--warmup', '0', '--threads', '1', '--hvp_modes', '--json']) == 0
    result = json.loads(capsys.readouterr().out)
    variants = result['variants']
    assert list(variants) == ['plain', 'released', 'lrwa_higher', 'lrwa_functional', 'lrwa_first', 'lrwa_fd']
    for name, variant in variants.items():
        assert variant['median_s'] > 0 and variant['peak_bytes'] > 0 and variant['flops'] > 0, name
    settings = result['settings']
    assert (settings['model'], settings['acq_batch'], settings['mem_batch'], settings['threads']) == \
        ('resnet18', 8, 2, 1)

    flops = {name: variant['flops'] for name, variant in variants.items()}
    # first order: exactly the plain step's arithmetic (∇L_Acq(θ) reused, one backward of L_Ret at θ')
    assert flops['lrwa_first'] == flops['plain']
    # both backends run the same arithmetic; the Hessian-vector product costs two more gradients of L_Acq,
    # and nothing beyond it: the released pattern adds a whole extra joint forward and backward on top
    assert flops['lrwa_higher'] == flops['lrwa_functional']
    assert 2.0 * flops['plain'] < flops['lrwa_higher'] < 3.0 * flops['plain']
    assert flops['released'] == pytest.approx(flops['lrwa_higher'] + flops['plain'], rel=0.02)
    # the second-order step keeps its memory below the released pattern's
    assert variants['lrwa_higher']['peak_bytes'] < variants['released']['peak_bytes']

    # the floor under the second-order step: it is the plain step's work plus one H·v (reverse-over-reverse, as
    # both backends compute it) and nothing more, and in neither autodiff mode does H·v cost less than two gradients
    hvp = result['hvp_flops']
    assert flops['lrwa_higher'] == flops['plain'] + hvp['hvp_reverse_over_reverse']
    for mode in ('hvp_reverse_over_reverse', 'hvp_forward_over_reverse'):
        assert 2.0 * hvp['gradient'] <= hvp[mode] < 2.2 * hvp['gradient'], mode
    # the finite-difference step: the plain step's work plus exactly one gradient of L_Acq (at θ + εv)
    assert flops['lrwa_fd'] == pytest.approx(flops['plain'] + hvp['gradient'], rel=1e-3)
    # every variant's gradient is compared with the exact one on the same step
    assert variants['lrwa_functional']['grad_cosine_to_exact'] == pytest.approx(1.0)
    assert variants['lrwa_higher']['grad_rel_error_to_exact'] == 0.0  # the two backends agree bit for bit
    for name, variant in variants.items():
        assert -1.0 <= variant['grad_cosine_to_exact'] <= 1.0 + 1e-6 and variant['grad_rel_error_to_exact'] >= 0, name
    # no accuracy bound on this net: a ReLU/max-pool ResNet's gradient jumps where a unit flips between θ and θ + εv,
    # so the difference quotient is far from autograd's H·v here (measured: cosine ≈ 0.1); the linear error on a smooth
    # net is tests/test_meta.py::test_finite_difference_error_shrinks_linearly_with_fd_eps
    assert math.isfinite(variants['lrwa_fd']['grad_rel_error_to_exact'])
