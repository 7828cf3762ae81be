"""Tests for lrwa_plugin.meta: both backends against each other, against finite differences, and for side effects.

The nets and tensors live on ``LRWA_TEST_DEVICE`` (default ``cpu``); ``benchmarks/gpu_check.py`` runs this file with
``LRWA_TEST_DEVICE=cuda``.
"""
from __future__ import annotations

import copy
import functools
import os

import higher
import pytest
import torch
from conftest import deterministic_off
from torch import nn
from torch.func import functional_call
from torchdistill.core.forward_hook import get_device_index, register_forward_hook_with_dict

from lrwa_plugin.meta import RetainWhileAcquire, retain_while_acquire
from lrwa_plugin.precision import set_backend_flags

DEVICE = torch.device(os.environ.get('LRWA_TEST_DEVICE', 'cpu'))
IO_KEY = get_device_index(torch.empty(0, device=DEVICE))  # where torchdistill's hooks file a tensor of DEVICE
F64 = torch.float64
ALPHA = 0.9
N_ACQ, N_MEM = 4, 6  # distinct batch sizes tell the θ and θ' forwards apart in hooks


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )
    return net.to(DEVICE, F64).train()


def make_data(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same values on every device
    data = {
        'x': torch.randn(N_ACQ, 3, 8, 8, generator=g, dtype=F64),
        't': torch.randn(N_ACQ, 5, generator=g, dtype=F64),
        'x_m': torch.randn(N_MEM, 3, 8, 8, generator=g, dtype=F64) + 0.5,
        't_m': torch.randn(N_MEM, 5, generator=g, dtype=F64),
    }
    return {key: value.to(DEVICE) for key, value in data.items()}


@pytest.fixture(scope='module', autouse=True)
def _deterministic_kernels_on_a_gpu():
    """On a GPU, deterministic kernels: some tests compare two computations bit for bit, which cuDNN's and cuBLAS's
    atomics would otherwise separate by roundoff (the CPU kernels are deterministic already)."""
    if DEVICE.type != 'cuda':
        yield
        return
    flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    with deterministic_off():
        set_backend_flags(DEVICE, deterministic=True)
        yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags


def crit(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    return (logits - teacher_logits).abs().mean()


def closures(d: dict[str, torch.Tensor]):
    return (lambda model: crit(model(d['x']), d['t'])), (lambda model: crit(model(d['x_m']), d['t_m']))


def grads_of(net: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in net.parameters()]


@functools.cache
def run(backend: str, order: str, retain: bool = True) -> tuple[nn.Module, list[torch.Tensor]]:
    """One meta step on a fresh net; cached across tests, so callers must not modify the result."""
    net, d = make_net(), make_data()
    acquire, ret = closures(d)
    retain_while_acquire(net, acquire, ret if retain else None, alpha=ALPHA, backend=backend, order=order)
    return net, grads_of(net)


def assert_grads_close(a: list[torch.Tensor], b: list[torch.Tensor], rtol: float = 1e-8) -> None:
    # Relative to the largest entry overall: conv biases before BatchNorm have gradients that are 0 up to roundoff.
    assert len(a) == len(b)
    scale = max(y.abs().max().item() for y in b)
    assert scale > 0
    for x, y in zip(a, b):
        assert torch.allclose(x, y, rtol=rtol, atol=rtol * scale), (x - y).abs().max()


def rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    fa, fb = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return ((fa - fb).norm() / fb.norm()).item()


def assert_same_buffers(a: nn.Module, b: nn.Module) -> None:
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
    assert ba.keys() == bb.keys() and len(ba) == 6
    for name in ba:
        assert torch.equal(ba[name], bb[name]), name


# 1. backends agree, and BatchNorm statistics end as after two plain forwards


def plain_forwards(net: nn.Module, d: dict[str, torch.Tensor]) -> nn.Module:
    """A deepcopy after a plain train-mode forward of the acquisition batch at θ, then of the memory batch at θ'.

    The memory forward of the meta step runs at θ' = θ − α∇L_Acq(θ), so that is where its BatchNorm statistics come
    from; θ' is formed as θ + (−α·g), the rounding higher's SGD uses.
    """
    ref = copy.deepcopy(net)
    g = torch.autograd.grad(crit(ref(d['x']), d['t']), list(ref.parameters()))
    with torch.no_grad():
        for p, gi in zip(ref.parameters(), g):
            p.copy_(p + (-ALPHA * gi))
        ref(d['x_m'])
    return ref


@pytest.mark.parametrize('order', ['second', 'first'])
def test_backends_agree_on_grads_and_buffers(order: str) -> None:
    net_h, g_h = run('higher', order)
    net_f, g_f = run('functional', order)
    assert_grads_close(g_h, g_f)
    assert_same_buffers(net_h, net_f)

    ref = plain_forwards(make_net(), make_data())
    assert_same_buffers(net_h, ref)
    assert ref[1].num_batches_tracked.item() == 2
    assert not torch.equal(ref[1].running_mean, make_net()[1].running_mean)
    # the statistics are not those of two forwards at θ
    at_theta, d = make_net(), make_data()
    with torch.no_grad():
        at_theta(d['x'])
        at_theta(d['x_m'])
    assert not torch.equal(at_theta[4].running_mean, net_h[4].running_mean)


# 2. the second-order gradient is the exact gradient of J


def objective(net: nn.Module, flat: torch.Tensor, d: dict[str, torch.Tensor]) -> torch.Tensor:
    """J(θ) = L_Acq(θ) + L_Ret(θ − α∇L_Acq(θ)), written independently of lrwa_plugin.meta."""
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    theta = list(torch.split(flat, [s.numel() for s in shapes]))
    theta = [t.view(s) for t, s in zip(theta, shapes)]
    l_acq = crit(functional_call(net, dict(zip(names, theta)), (d['x'],)), d['t'])
    g = torch.autograd.grad(l_acq, theta, create_graph=True)
    fast = [t - ALPHA * gi for t, gi in zip(theta, g)]
    return l_acq + crit(functional_call(net, dict(zip(names, fast)), (d['x_m'],)), d['t_m'])


@pytest.mark.parametrize('backend', ['higher', 'functional'])
def test_second_order_matches_finite_differences(backend: str) -> None:
    _, g = run(backend, 'second')
    flat_grad = torch.cat([t.flatten() for t in g])
    ref, d = make_net(), make_data()
    theta0 = torch.cat([p.detach().flatten() for p in ref.parameters()])
    torch.manual_seed(123)
    eps = 1e-6
    for _ in range(4):
        v = torch.randn_like(theta0)
        v /= v.norm()
        j_plus = objective(ref, (theta0 + eps * v).requires_grad_(), d).item()
        j_minus = objective(ref, (theta0 - eps * v).requires_grad_(), d).item()
        fd = (j_plus - j_minus) / (2 * eps)
        analytic = flat_grad.dot(v).item()
        assert abs(fd - analytic) <= 1e-6 * abs(analytic) + 1e-9, (fd, analytic)
    # the finite-difference check must be able to tell the first-order gradient from the exact one
    _, g_first = run(backend, 'first')
    v = flat_grad - torch.cat([t.flatten() for t in g_first])
    v /= v.norm()
    fd = (objective(ref, (theta0 + eps * v).requires_grad_(), d).item()
          - objective(ref, (theta0 - eps * v).requires_grad_(), d).item()) / (2 * eps)
    assert abs(fd - flat_grad.dot(v).item()) <= 1e-6 * abs(fd) + 1e-9
    assert abs(fd - torch.cat([t.flatten() for t in g_first]).dot(v).item()) > 1e-4 * abs(fd)


# 3. the retention term really reaches the student


@pytest.mark.parametrize('backend', ['higher', 'functional'])
def test_retention_term_reaches_student(backend: str) -> None:
    _, g_second = run(backend, 'second')
    _, g_first = run(backend, 'first')
    _, g_acq_only = run(backend, 'second', retain=False)
    assert rel_diff(g_second, g_acq_only) > 1e-2
    assert rel_diff(g_first, g_acq_only) > 1e-2
    assert rel_diff(g_second, g_first) > 1e-4  # the Hessian term

    # retain=None gives exactly ∇L_Acq(θ) of a plain backward
    net, d = make_net(), make_data()
    crit(net(d['x']), d['t']).backward()
    assert_grads_close(g_acq_only, grads_of(net), rtol=1e-12)


@pytest.mark.parametrize('copy_initial_weights', [True, False])
def test_copy_initial_weights_true_cuts_retention_gradient(copy_initial_weights: bool) -> None:
    """Documents the published defect: higher's default copy_initial_weights=True detaches θ' from θ."""
    net, d = make_net(), make_data()
    acquire, retain = closures(d)
    params = list(net.parameters())
    with higher.innerloop_ctx(net, torch.optim.SGD(params, lr=ALPHA),
                              copy_initial_weights=copy_initial_weights) as (fmodel, diffopt):
        diffopt.step(acquire(fmodel))
        grads = torch.autograd.grad(retain(fmodel), params, allow_unused=True)
    norm = sum(0.0 if g is None else g.norm().item() for g in grads)
    if copy_initial_weights:
        assert norm == 0.0
    else:
        assert norm > 1e-3


# 4. forward hooks fire for θ and θ', and leave nothing behind


HOOK_DICTS = ('_forward_hooks', '_forward_pre_hooks', '_forward_hooks_with_kwargs',
              '_forward_hooks_always_called', '_forward_pre_hooks_with_kwargs')


def hook_snapshot(net: nn.Module) -> dict[str, dict]:
    return {f'{name}:{attr}': dict(getattr(m, attr)) for name, m in net.named_modules() for attr in HOOK_DICTS}


@pytest.mark.parametrize('order', ['second', 'first'])
@pytest.mark.parametrize('backend', ['higher', 'functional'])
def test_forward_hooks_fire_for_both_forwards(backend: str, order: str) -> None:
    net, d = make_net(), make_data()
    io_dict: dict = {}
    register_forward_hook_with_dict(net[4], '4', False, True, io_dict)
    register_forward_hook_with_dict(net[8], '8', True, True, io_dict)
    kw_calls: list[str] = []
    net[3].register_forward_pre_hook(lambda m, args, kwargs: kw_calls.append('pre'), with_kwargs=True)
    net[3].register_forward_hook(lambda m, args, kwargs, out: kw_calls.append('post'), with_kwargs=True)
    before = hook_snapshot(net)
    seen: list[tuple[str, int, int, int]] = []
    models: list = []

    def observe(tag: str, model, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        for entry in io_dict.values():
            entry.clear()
        models.append(model)
        loss = crit(model(x), t)
        bn_out, fc_in = io_dict['4']['output'][IO_KEY], io_dict['8']['input'][IO_KEY]
        assert isinstance(bn_out, torch.Tensor) and isinstance(fc_in, torch.Tensor)
        seen.append((tag, bn_out.shape[0], fc_in.shape[0], len(kw_calls)))
        return loss

    retain_while_acquire(net, lambda m: observe('acq', m, d['x'], d['t']),
                         lambda m: observe('ret', m, d['x_m'], d['t_m']),
                         alpha=ALPHA, backend=backend, order=order)
    assert seen == [('acq', N_ACQ, N_ACQ, 2), ('ret', N_MEM, N_MEM, 4)]
    assert hook_snapshot(net) == before
    # higher hands both closures its patched copy, so the hooks really fired there; none may survive on it
    fmodels = [m for m in models if isinstance(m, nn.Module) and m is not net]
    assert len(fmodels) == (2 if backend == 'higher' else 0)
    for fmodel in fmodels:
        for m in fmodel.modules():
            assert not m._forward_hooks and not m._forward_pre_hooks


def test_acquisition_loss_backpropagated_once() -> None:
    class CountBackward(torch.autograd.Function):
        calls = 0

        @staticmethod
        def forward(ctx, x: torch.Tensor) -> torch.Tensor:
            return x.clone()

        @staticmethod
        def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
            CountBackward.calls += 1
            return grad

    for backend in ('higher', 'functional'):
        for order in ('second', 'first'):
            CountBackward.calls = 0
            net, d = make_net(), make_data()
            acq_calls: list[int] = []

            def acquire(model, d=d, acq_calls=acq_calls):
                acq_calls.append(1)
                return CountBackward.apply(crit(model(d['x']), d['t']))

            retain_while_acquire(net, acquire, closures(d)[1], alpha=ALPHA, backend=backend, order=order)
            assert (len(acq_calls), CountBackward.calls) == (1, 1), (backend, order)


# 5. accumulation, frozen parameters, validation


@pytest.mark.parametrize('backend', ['higher', 'functional'])
def test_accumulates_and_skips_frozen(backend: str) -> None:
    _, g_once = run(backend, 'second')
    net, d = make_net(), make_data()
    acquire, retain = closures(d)
    net[0].weight.requires_grad_(False)
    meta = RetainWhileAcquire(ALPHA, backend=backend)
    l_acq, l_ret = meta(net, acquire, retain)
    assert net[0].weight.grad is None
    assert l_acq.grad_fn is None and l_ret.grad_fn is None
    first = [p.grad.clone() for p in list(net.parameters())[1:]]
    # the frozen conv weight must not move θ': the gradient differs from the all-trainable one
    assert rel_diff(first, g_once[1:]) > 1e-6

    net2 = make_net()
    net2[0].weight.requires_grad_(False)
    meta(net2, acquire, retain)
    meta(net2, acquire, retain)
    assert net2[0].weight.grad is None
    # the second call sees BN buffers already advanced by the first; train-mode BN makes that irrelevant
    assert_grads_close([p.grad for p in list(net2.parameters())[1:]], [2 * g for g in first], rtol=1e-12)


@pytest.mark.parametrize('kwargs, name', [
    ({'alpha': 0.9, 'backend': 'jax'}, 'backend'),
    ({'alpha': 0.9, 'order': 'third'}, 'order'),
    ({'alpha': 0.0}, 'alpha'),
    ({'alpha': -1.0}, 'alpha'),
    ({'alpha': float('nan')}, 'alpha'),
    ({'alpha': float('inf')}, 'alpha'),
    ({'alpha': '0.9'}, 'alpha'),
    ({'alpha': 0.9, 'inner_bn': 'freeze'}, 'inner_bn'),
    ({'alpha': 0.9, 'order': 'finite_difference', 'fd_eps': 0.0}, 'fd_eps'),
    ({'alpha': 0.9, 'fd_eps': float('nan')}, 'fd_eps'),
])
def test_invalid_arguments_raise(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name) as info:
        RetainWhileAcquire(**kwargs)
    assert '\n' not in str(info.value)
    assert repr(kwargs.get(name, 0.9))[:3] in str(info.value)


def test_works_inside_no_grad() -> None:
    _, g_ref = run('higher', 'second')
    net, d = make_net(), make_data()
    with torch.no_grad():
        retain_while_acquire(net, *closures(d), alpha=ALPHA)
    assert_grads_close(grads_of(net), g_ref, rtol=1e-12)


def test_valid_arguments_are_kept() -> None:
    meta = RetainWhileAcquire(1, backend='functional', order='first')
    assert (meta.alpha, meta.backend, meta.order) == (1.0, 'functional', 'first')
    assert RetainWhileAcquire(0.9).backend == 'higher' and RetainWhileAcquire(0.9).order == 'second'


# 6. wrapped students


@pytest.mark.parametrize('backend', ['higher', 'functional'])
def test_data_parallel_student(backend: str) -> None:
    _, g_plain = run(backend, 'second')
    net, d = make_net(), make_data()
    wrapped = nn.DataParallel(net, device_ids=[DEVICE] if DEVICE.type == 'cuda' else None)  # one device: one batch
    acquire, retain = closures(d)
    retain_while_acquire(wrapped, acquire, retain, alpha=ALPHA, backend=backend)
    assert_grads_close(grads_of(net), g_plain, rtol=1e-12)


# 7. what a RetainWhileAcquire builds once per student is reused, and rebuilt whenever the student changes


def count_patches(monkeypatch) -> list[int]:
    """Counts the patched modules higher builds (higher.monkeypatch calls) from now on."""
    calls: list[int] = []
    original = higher.monkeypatch

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(higher, 'monkeypatch', counting)
    return calls


@pytest.mark.parametrize('backend', ['higher', 'functional'])
def test_cached_state_is_reused_across_calls(backend: str, monkeypatch) -> None:
    _, g_once = run(backend, 'second')
    patches = count_patches(monkeypatch)
    net, d = make_net(), make_data()
    meta = RetainWhileAcquire(ALPHA, backend=backend)
    meta(net, *closures(d))
    state = meta._state
    assert_grads_close(grads_of(net), g_once, rtol=0)  # bit for bit a fresh instance's
    meta(net, *closures(d))
    assert meta._state is state and len(patches) == (1 if backend == 'higher' else 0)
    assert_grads_close(grads_of(net), [2 * g for g in g_once], rtol=1e-12)
    if backend == 'higher':
        # between calls the patched module holds θ itself, so it keeps neither θ' nor the graph behind it alive
        params = list(state.fmodel.parameters())
        assert len(params) == 10 and all(a is b for a, b in zip(params, net.parameters()))
        assert state.fmodel[3].weight is net[3].weight and state.fmodel[8].bias is net[8].bias

    # attributes the student changes between calls (train/eval) reach the cached patched module too
    net.eval()
    ref = copy.deepcopy(net).eval()
    net.zero_grad(set_to_none=True)
    meta(net, *closures(d))
    RetainWhileAcquire(ALPHA, backend=backend)(ref, *closures(d))
    assert meta._state is state and len(patches) == (2 if backend == 'higher' else 0)  # one build for ref
    assert_grads_close(grads_of(net), grads_of(ref), rtol=0)
    assert_same_buffers(net, ref)
    assert ref[1].num_batches_tracked.item() == 4  # as the two train-mode calls left them: eval mode updates none


@pytest.mark.parametrize('backend', ['higher', 'functional'])
def test_cached_state_is_rebuilt_when_the_student_changes(backend: str) -> None:
    net, d = make_net(), make_data()
    meta = RetainWhileAcquire(ALPHA, backend=backend)
    meta(net, *closures(d))
    state, old_params = meta._state, list(net.parameters())
    for p in old_params:
        p.grad = None

    # new parameter and buffer tensors: the gradient must reach them, and the statistics must move on them
    net.load_state_dict(make_net(seed=3).state_dict(), assign=True)
    assert not any(a is b for a, b in zip(net.parameters(), old_params))
    ref = make_net(seed=3)
    meta(net, *closures(d))
    RetainWhileAcquire(ALPHA, backend=backend)(ref, *closures(d))
    assert meta._state is not state
    assert all(p.grad is None for p in old_params)
    assert_grads_close(grads_of(net), grads_of(ref), rtol=0)
    assert_same_buffers(net, ref)

    # .to(dtype) keeps the Parameter objects but replaces the buffers
    state = meta._state
    d32 = {k: v.float() for k, v in d.items()}
    for model in (net, ref):
        model.zero_grad(set_to_none=True)
        model.to(torch.float32)
    meta(net, *closures(d32))
    RetainWhileAcquire(ALPHA, backend=backend)(ref, *closures(d32))
    assert meta._state is not state
    assert all(p.grad.dtype == torch.float32 for p in net.parameters())
    assert_grads_close(grads_of(net), grads_of(ref), rtol=0)
    assert_same_buffers(net, ref)

    # freezing a parameter changes the trainable set
    state = meta._state
    for model in (net, ref):
        model.zero_grad(set_to_none=True)
        model[0].weight.requires_grad_(False)
    meta(net, *closures(d32))
    RetainWhileAcquire(ALPHA, backend=backend)(ref, *closures(d32))
    assert meta._state is not state and net[0].weight.grad is None
    assert_grads_close([p.grad for p in list(net.parameters())[1:]], [p.grad for p in list(ref.parameters())[1:]],
                       rtol=0)


# 7. where the BatchNorm statistics come from at θ' (inner_bn), and the finite-difference Hessian


def plain_forward_at_theta(net: nn.Module, d: dict[str, torch.Tensor]) -> nn.Module:
    """A deepcopy after one plain train-mode forward of the acquisition batch at θ (what inner_bn 'keep' leaves)."""
    ref = copy.deepcopy(net)
    with torch.no_grad():
        ref(d['x'])
    return ref


@pytest.mark.parametrize('order', ['second', 'first', 'finite_difference'])
@pytest.mark.parametrize('backend', ['higher', 'functional'])
def test_inner_bn_keep_leaves_only_the_acquisition_forward_in_the_statistics(backend: str, order: str) -> None:
    d = make_data()
    kept, updated = make_net(), make_net()
    retain_while_acquire(kept, *closures(d), alpha=ALPHA, backend=backend, order=order, inner_bn='keep')
    retain_while_acquire(updated, *closures(d), alpha=ALPHA, backend=backend, order=order, inner_bn='update')
    assert_same_buffers(kept, plain_forward_at_theta(make_net(), d))
    assert kept[1].num_batches_tracked.item() == 1
    assert_same_buffers(updated, plain_forwards(make_net(), d))  # 'update': θ, then θ' (the finite difference's
    # third forward, at θ + εv, never counts)
    # train-mode BatchNorm normalises with batch statistics: the gradient does not depend on the policy
    assert_grads_close(grads_of(kept), grads_of(updated), rtol=1e-12)


def smooth_net(seed: int = 0) -> nn.Module:
    """``make_net`` with tanh for ReLU: a twice-differentiable network, where the one-sided difference's error is
    O(ε). (With ReLU and L1 a step of θ by εv can cross kinks, whose jumps autograd's Hessian does not see.)"""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Tanh(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Tanh(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    ).to(DEVICE, F64).train()


def squared_closures(d: dict[str, torch.Tensor]):
    def squared(x: torch.Tensor, t: torch.Tensor):
        return lambda model: (model(x) - t).pow(2).mean()
    return squared(d['x'], d['t']), squared(d['x_m'], d['t_m'])


def smooth_gradient(order: str, fd_eps: float = 0.01, backend: str = 'functional') -> list[torch.Tensor]:
    net = smooth_net()
    retain_while_acquire(net, *squared_closures(make_data()), alpha=ALPHA, backend=backend, order=order,
                         fd_eps=fd_eps)
    return grads_of(net)


def finite_difference_gradient(backend: str, fd_eps: float) -> tuple[nn.Module, list[torch.Tensor]]:
    net, d = make_net(), make_data()
    retain_while_acquire(net, *closures(d), alpha=ALPHA, backend=backend, order='finite_difference', fd_eps=fd_eps)
    return net, grads_of(net)


def test_finite_difference_error_shrinks_linearly_with_fd_eps() -> None:
    """The one-sided difference [∇L_Acq(θ + εv) − ∇L_Acq(θ)] / ε is H v up to O(ε): on a smooth float64 network the
    error against the exact gradient falls about tenfold with every tenfold smaller fd_eps."""
    exact = smooth_gradient('second')
    errors = [rel_diff(smooth_gradient('finite_difference', eps), exact) for eps in (1e-1, 1e-2, 1e-3, 1e-4)]
    for coarse, fine in zip(errors, errors[1:]):
        assert 7 < coarse / fine < 13, errors
    assert errors[1] < 0.01 < 0.1 < rel_diff(smooth_gradient('first'), exact)  # far closer than no Hessian term


def test_finite_difference_backends_agree_and_leave_the_student_as_the_exact_step_does() -> None:
    assert_grads_close(smooth_gradient('finite_difference', backend='higher'), smooth_gradient('finite_difference'),
                       rtol=1e-10)
    net_h, g_h = finite_difference_gradient('higher', 0.01)
    net_f, g_f = finite_difference_gradient('functional', 0.01)
    assert_same_buffers(net_h, plain_forwards(make_net(), make_data()))  # θ and θ' only
    assert_same_buffers(net_f, net_h)
    untouched = make_net()
    for a, b in zip(net_h.parameters(), untouched.parameters()):
        assert torch.equal(a, b)  # the shifted forward does not move the parameters


@pytest.mark.parametrize('backend', ['higher', 'functional'])
def test_finite_difference_runs_the_acquisition_closure_again_with_hooks(backend: str) -> None:
    net, d = make_net(), make_data()
    io_dict: dict = {}
    register_forward_hook_with_dict(net[8], '8', True, False, io_dict)
    seen = []

    def observe(tag: str, model, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        io_dict['8'].clear()
        loss = crit(model(x), t)
        seen.append((tag, io_dict['8']['input'][IO_KEY].shape[0]))
        return loss

    l_acq, _ = retain_while_acquire(net, lambda m: observe('acq', m, d['x'], d['t']),
                                    lambda m: observe('ret', m, d['x_m'], d['t_m']), alpha=ALPHA, backend=backend,
                                    order='finite_difference')
    assert seen == [('acq', N_ACQ), ('ret', N_MEM), ('acq', N_ACQ)]
    assert l_acq == crit(make_net()(d['x']), d['t'])  # the returned L_Acq is the one at θ
