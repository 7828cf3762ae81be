"""Mixed precision (``--amp``), TF32, channels-last and deterministic kernels, checked on the CPU, where autocast works
in bfloat16 and float16 too: the meta step's gradient under bfloat16 against float32, the loss scale's exactness and
its skip on overflow (student and generator), runs of every digits strategy, and resume under mixed precision."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import DATA_FREE, DIGITS_CONFIGS, SHORT_RUN, assert_same, deterministic_off, run_cli, write_config
from torch import nn
from torch.nn import functional as F
from torchdistill.common import yaml_util
from torchdistill.models.registry import get_model

from lrwa_plugin.box import DataFreeDistillationBox
from lrwa_plugin.meta import ORDERS, RetainWhileAcquire
from lrwa_plugin.precision import LossScale, Precision
from lrwa_plugin.run.resume import read_training_state

TINY = {**SHORT_RUN, 'iterations_per_epoch: 3': 'iterations_per_epoch: 2'}


def smooth_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10))


def meta_gradient(net: nn.Module, precision: Precision, order: str, backend: str, scale: float = 1.0) -> torch.Tensor:
    """∇J of one meta step (α 0.5) on fixed batches, as the box runs it: forwards autocast, losses in float32."""
    generator = torch.Generator().manual_seed(1)
    x, x_m = torch.randn(32, 16, generator=generator), torch.randn(8, 16, generator=generator)
    t, t_m = torch.randn(32, 10, generator=generator), torch.randn(8, 10, generator=generator)

    def closure(inputs: torch.Tensor, target: torch.Tensor):
        def loss(model) -> torch.Tensor:
            with precision.autocast():
                out = precision.to_float32(model(inputs))
            return F.mse_loss(out, target)
        return loss

    net.zero_grad(set_to_none=True)
    RetainWhileAcquire(alpha=0.5, backend=backend, order=order)(net, closure(x, t), closure(x_m, t_m),
                                                                  loss_scale=scale)
    return torch.cat([p.grad.flatten() for p in net.parameters()]) / scale


@pytest.mark.parametrize('backend', ['higher', 'functional'])
@pytest.mark.parametrize('order', ORDERS)
def test_bfloat16_meta_gradient_is_close_to_float32_on_a_smooth_net(order, backend):
    net = smooth_net()
    exact = meta_gradient(net, Precision(None), order, backend)
    bf16 = meta_gradient(net, Precision('bfloat16', 'cpu'), order, backend)
    cosine = float(F.cosine_similarity(exact, bf16, dim=0))
    relative = float((bf16 - exact).norm() / exact.norm())
    # bfloat16 keeps 8 mantissa bits (~2-3 significant digits) in every product of the forwards. Measured here:
    # cosine 0.99999, relative error 0.5% for the exact orders; the finite difference divides the difference of two
    # bfloat16 gradients by a small ε, which amplifies their rounding: cosine 0.997, relative error 8%.
    if order == 'finite_difference':
        assert cosine > 0.99 and relative < 0.2, (cosine, relative)
    else:
        assert cosine > 0.9999 and relative < 0.02, (cosine, relative)
    assert not torch.equal(exact, bf16)  # autocast did run the forwards in bfloat16


@pytest.mark.parametrize('order', ORDERS)
def test_a_power_of_two_loss_scale_changes_nothing_but_the_scale(order):
    """float16's scaled backward: .grad / s is the unscaled meta gradient (θ' from the unscaled ∇L_Acq)."""
    net = smooth_net()
    plain = meta_gradient(net, Precision(None), order, 'higher')
    scaled = meta_gradient(net, Precision(None), order, 'higher', scale=2.0 ** 12)
    # bit for bit: s is a power of two, so every scaled product rounds exactly as the unscaled one
    assert torch.equal(plain, scaled), float((plain - scaled).abs().max())


def test_float32_adds_nothing():
    precision = Precision(None)
    tree = {'x': torch.ones(2)}
    assert precision.to_float32(tree) is tree and not precision.enabled and precision.student_scale is None
    assert precision.state_dict() == {'amp': None, 'student_scale': None, 'generator_scale': None}


def test_loss_scale_halves_and_skips_on_overflow_and_grows_after_good_steps():
    p = nn.Parameter(torch.ones(3))
    scale = LossScale(init_scale=8.0, growth_interval=2)
    p.grad = torch.full((3,), 16.0)
    assert scale.unscale_([p]) and torch.equal(p.grad, torch.full((3,), 2.0)) and scale.scale == 8.0
    p.grad = torch.tensor([1.0, math.inf, 0.0])
    assert not scale.unscale_([p]) and scale.scale == 4.0 and scale.skipped == 1 and not p.grad.any()
    for _ in range(2):
        p.grad = torch.ones(3)
        assert scale.unscale_([p])
    assert scale.scale == 8.0 and scale.good_steps == 0
    restored = LossScale()
    restored.load_state_dict(scale.state_dict())
    assert restored.state_dict() == scale.state_dict()


def float16_box(tmp_path: Path) -> DataFreeDistillationBox:
    config = yaml_util.load_yaml_file(str(write_config(DIGITS_CONFIGS / 'lrwa_mb.yaml', tmp_path / 'box.yaml',
                                                       SHORT_RUN)))
    torch.manual_seed(0)
    models = config['models']
    teacher = get_model(models['teacher_model']['key'], **models['teacher_model']['kwargs'])
    student = get_model(models['student_model']['key'], **models['student_model']['kwargs'])
    return DataFreeDistillationBox(teacher, student, config['datasets'], config['train'], torch.device('cpu'), None,
                                   False, precision=Precision('float16', 'cpu'))


def test_float16_overflow_skips_the_step_for_student_and_generator(tmp_path):
    box = float16_box(tmp_path)
    box.pre_epoch_process(epoch=0)
    student, generator = next(box.student_model.parameters()), next(box.generator.parameters())
    # an overflow in the scaled gradients, forced: the first parameter of each model receives infinities
    hooks = [p.register_hook(lambda g: torch.full_like(g, math.inf)) for p in (student, generator)]
    before = [p.detach().clone() for p in (*box.student_model.parameters(), *box.generator.parameters())]
    scales = box.precision.student_scale.scale, box.precision.generator_scale.scale
    box.generator_step()
    box.student_step()
    after = [p.detach() for p in (*box.student_model.parameters(), *box.generator.parameters())]
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # nothing moved: both steps were skipped
    assert (box.precision.student_scale.scale, box.precision.generator_scale.scale) == (scales[0] / 2, scales[1] / 2)
    assert box.precision.student_scale.skipped == box.precision.generator_scale.skipped == 1
    assert not box.optimizer.state and not box.generation.optimizer.state  # no optimizer step was taken
    for hook in hooks:
        hook.remove()
    box.generator_step()
    box.student_step()
    assert not torch.equal(student.detach(), before[0])  # the next steps apply
    assert box.precision.student_scale.skipped == 1


@pytest.mark.parametrize('name', sorted(DATA_FREE))
def test_every_digits_strategy_runs_under_bfloat16(name, work, capsys):
    config = write_config(DIGITS_CONFIGS / f'{name}.yaml', work / 'run.yaml', TINY)
    assert run_cli(config, '--amp', 'bfloat16') == 0
    assert 'student_top1' in capsys.readouterr().out
    state = read_training_state(f'resource/ckpt/digits/{name}.last.pt')
    assert state['box']['precision']['amp'] == 'bfloat16'
    assert all(t.dtype == torch.float32 for t in state['box']['student'].values() if t.is_floating_point())


@pytest.mark.parametrize('amp', ['bfloat16', 'float16'])
def test_resume_under_mixed_precision_equals_the_uninterrupted_run(amp, work):
    two = write_config(DIGITS_CONFIGS / 'lrwa_mb.yaml', work / 'two.yaml', TINY)
    assert run_cli(two, '--dst_ckpt', 'a/student.pt', '--amp', amp) == 0
    one = write_config(two, work / 'one.yaml', {'num_epochs: 2': 'num_epochs: 1'})
    assert run_cli(one, '--dst_ckpt', 'b/student.pt', '--amp', amp) == 0
    assert run_cli(two, '--dst_ckpt', 'b/student.pt', '--amp', amp, '--resume', 'b/student.last.pt') == 0
    a, b = (read_training_state(f'{d}/student.last.pt') for d in 'ab')
    assert_same(a['box'], b['box'])  # the loss scales (float16) included
    assert_same(a['ranks'], b['ranks'])
    assert a['history'] == b['history']


def test_resume_with_another_precision_is_one_line(work, capsys):
    one = write_config(DIGITS_CONFIGS / 'lrwa_mb.yaml', work / 'one.yaml', {**TINY, 'num_epochs: 2': 'num_epochs: 1'})
    assert run_cli(one, '--dst_ckpt', 'b/student.pt', '--amp', 'bfloat16') == 0
    two = write_config(one, work / 'two.yaml', {'num_epochs: 1': 'num_epochs: 2'})
    capsys.readouterr()
    assert run_cli(two, '--dst_ckpt', 'b/student.pt', '--resume', 'b/student.last.pt') == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: checkpoint 'b/student.last.pt' was written by a different run (--amp: "
                          'bfloat16 -> none (float32))') and err.count('\n') == 1, err


def test_amp_without_a_data_free_strategy_is_refused(work, capsys):
    teacher = write_config(DIGITS_CONFIGS / 'teacher.yaml', work / 'teacher.yaml', {'num_epochs: 10': 'num_epochs: 1'})
    assert run_cli(teacher, '--amp', 'bfloat16') == 2
    assert capsys.readouterr().err.startswith('error: --amp: only data-free runs (train.strategy) autocast')


def test_deterministic_and_channels_last_runs_are_reproducible_on_the_cpu(work):
    config = write_config(DIGITS_CONFIGS / 'lrwa_mb.yaml', work / 'run.yaml', TINY)
    with deterministic_off():
        for out in ('a', 'b'):
            assert run_cli(config, '--dst_ckpt', f'{out}/student.pt', '-deterministic', '-channels_last') == 0
        assert torch.are_deterministic_algorithms_enabled()
    assert not torch.are_deterministic_algorithms_enabled()
    a, b = (read_training_state(f'{d}/student.last.pt') for d in 'ab')
    assert_same(a['box'], b['box'])
