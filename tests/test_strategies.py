"""Strategies: the gradient each one leaves in .grad, and their registry."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lrwa_plugin.meta import retain_while_acquire
from lrwa_plugin.registry import get_strategy
from lrwa_plugin.strategies import StepClosures


def setup():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, x_m = torch.randn(5, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    t, t_m = torch.randn(5, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    return net, (lambda m: (m(x) - t).abs().mean()), (lambda m: (m(x_m) - t_m).abs().mean())


def grads(net):
    return torch.cat([p.grad.flatten() for p in net.parameters()])


def assert_joint_gradient(key: str) -> None:
    """The strategy ``key`` fills the gradient of L_Acq + L_Ret at θ and reports both losses."""
    net, acquire, retain = setup()
    losses = get_strategy(key).backward(net, StepClosures(acquire, retain))
    g_joint = grads(net)
    net.zero_grad()
    (acquire(net) + retain(net)).backward()
    assert torch.allclose(g_joint, grads(net)) and set(losses) == {'acq', 'ret'}


def test_dfad_is_acquisition_only_and_mb_dfkd_is_the_joint_gradient():
    net, acquire, retain = setup()
    get_strategy('dfad').backward(net, StepClosures(acquire, retain))
    g_dfad = grads(net)
    net.zero_grad()
    acquire(net).backward()
    assert torch.equal(g_dfad, grads(net))

    assert_joint_gradient('mb_dfkd')


def test_lrwa_uses_the_meta_step_and_falls_back_to_acquisition_without_memory():
    net, acquire, retain = setup()
    get_strategy('lrwa', alpha=0.7, backend='functional').backward(net, StepClosures(acquire, retain))
    g = grads(net)
    net.zero_grad()
    retain_while_acquire(net, acquire, retain, alpha=0.7, backend='functional')
    assert torch.equal(g, grads(net))

    net.zero_grad()
    losses = get_strategy('lrwa', alpha=0.7).backward(net, StepClosures(acquire))
    g_fallback = grads(net)
    net.zero_grad()
    acquire(net).backward()
    assert torch.allclose(g_fallback, grads(net)) and set(losses) == {'acq'}


def test_strategies_take_only_their_own_settings_and_unknown_strategies_list_the_known_ones():
    with pytest.raises(TypeError, match='alpha'):
        get_strategy('mb_dfkd', alpha=0.5)
    with pytest.raises(ValueError, match='exactly one of alpha'):
        get_strategy('lrwa')
    with pytest.raises(ValueError, match='exactly one of alpha'):
        get_strategy('lrwa', alpha=0.5, alpha_per_lr=1.0)
    with pytest.raises(ValueError, match='dfad, lrwa, mad, mb_dfkd, pre_dfkd'):
        get_strategy('lrwa2')


def test_pre_dfkd_is_the_joint_gradient_and_each_strategy_accepts_memories_by_type():
    from lrwa_plugin.registry import STRATEGY_DICT
    assert_joint_gradient('pre_dfkd')
    accepted = {key: STRATEGY_DICT[key].accepted_keys() for key in ('dfad', 'mb_dfkd', 'pre_dfkd', 'lrwa')}
    assert accepted['dfad'] == [] and accepted['mb_dfkd'] == ['MemoryBank']
    assert accepted['pre_dfkd'] == ['GenerativeReplay']
    assert {'MemoryBank', 'GenerativeReplay'} <= set(accepted['lrwa'])
    assert all(STRATEGY_DICT[key].key == key for key in STRATEGY_DICT)  # register_strategy sets the key


def test_alpha_per_lr_is_the_constant_alpha_at_that_learning_rate():
    net, acquire, retain = setup()
    get_strategy('lrwa', alpha_per_lr=2.5, backend='functional').backward(net, StepClosures(acquire, retain, lr=0.04))
    g = grads(net)
    net.zero_grad()
    get_strategy('lrwa', alpha=0.1, backend='functional').backward(net, StepClosures(acquire, retain, lr=0.5))
    assert torch.allclose(g, grads(net), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="learning rate"):
        get_strategy('lrwa', alpha_per_lr=1.0).backward(net, StepClosures(acquire, retain))


def test_alpha_per_lr_follows_the_students_learning_rate_schedule(work, monkeypatch):
    """α = c × the optimizer's current learning rate at every student step (cosine over 3 epochs, epoch-wise)."""
    import math

    from conftest import DIGITS_CONFIGS, SHORT_RUN, run_cli, write_config

    from lrwa_plugin.meta import RetainWhileAcquire
    seen = []
    call = RetainWhileAcquire.__call__

    def spy(self, student, acquire, retain=None, alpha=None, loss_scale=1.0):
        if retain is not None:
            seen.append(alpha)
        return call(self, student, acquire, retain, alpha, loss_scale)

    monkeypatch.setattr(RetainWhileAcquire, '__call__', spy)
    config = write_config(DIGITS_CONFIGS / 'lrwa_mb.yaml', work / 'run.yaml', {
        **SHORT_RUN, 'num_epochs: 2': 'num_epochs: 3', 'alpha_per_lr: 1.0': 'alpha_per_lr: 2.5',
        'T_max: 12': 'T_max: 3'})
    assert run_cli(config) == 0
    lr = [0.1 * (1 + math.cos(math.pi * epoch / 3)) / 2 for epoch in range(3)]
    # the memory is empty in epoch 0 (nothing to retain), then 3 iterations x 2 student steps per epoch
    assert seen == pytest.approx([2.5 * lr[1]] * 6 + [2.5 * lr[2]] * 6, rel=1e-12)
