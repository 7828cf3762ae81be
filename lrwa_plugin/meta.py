"""The meta student update of "Learning to Retain while Acquiring".

Patel, Mopuri, Qiu, "Learning to Retain while Acquiring: Combating Distribution-Shift in Adversarial Data-Free
Knowledge Distillation", CVPR 2023.

The student is trained on the freshly generated (acquisition) batch and on a replayed (memory) batch, but the memory
loss is taken *after* a virtual SGD step on the acquisition loss, so that the update that acquires new knowledge is
also one that retains the old::

    J(θ) = L_Acq(θ) + L_Ret(θ'),    θ' = θ − α ∇L_Acq(θ)
    ∇J(θ) = ∇L_Acq(θ) + (I − α H_Acq(θ)) v,    v = ∇L_Ret(θ')

Orders (``order``):

* ``'second'``: the exact gradient; ``H_Acq v`` by differentiating the kept graph of ``∇L_Acq`` (reverse over
  reverse), about two more gradients of L_Acq of work;
* ``'first'``: drops the Hessian term, ``∇L_Acq(θ) + v``: the plain step's work;
* ``'finite_difference'``: ``H_Acq v ≈ [∇L_Acq(θ + εv) − ∇L_Acq(θ)] / ε`` with ``ε = fd_eps / ‖v‖`` (the
  approximation of DARTS, Liu, Simonyan, Yang, ICLR 2019, whose ``fd_eps`` default 0.01 is kept): one more
  gradient of L_Acq instead of two, no graph kept through the inner step. The trade: the one-sided difference has an
  error of order ``ε ‖v‖² · ‖∇³L_Acq‖`` in ``H v`` (it shrinks linearly with ``fd_eps``, tests/test_meta.py), and a
  third forward of the acquisition batch, at ``θ + εv``, which must not move the student: its BatchNorm running
  statistics are restored after it and its torchdistill I/O dict is its own.

In a torchdistill YAML config::

    meta:
      alpha: 0.9            # or alpha_per_lr: 1.0 (the lrwa strategy: α = c × the student's learning rate)
      backend: higher       # or: functional
      order: second         # or: first, finite_difference
      inner_bn: update      # or: keep
      fd_eps: 0.01          # order finite_difference only

and in code (usable without torchdistill)::

    from lrwa_plugin.meta import RetainWhileAcquire
    meta = RetainWhileAcquire(alpha=0.9, backend='higher', order='second')   # once
    l_acq, l_ret = meta(student, acquire=lambda model: crit(model(x), t),     # every step
                        retain=lambda model: crit(model(x_m), t_m))
    # adds ∇J(θ) into student's .grad like .backward() would; the returned losses are detached.

``acquire`` is called with a module-like callable running the student at θ (and, finite difference, once more at
``θ + εv``), ``retain`` once with one running it at θ'. Both backends fire the student's forward (pre-)hooks in every
forward, so torchdistill's io_dict is filled each time.

BatchNorm running statistics (``inner_bn``): with ``'update'`` they end as a plain forward of the acquisition batch at
θ followed by a plain forward of the memory batch at θ' would leave them; with ``'keep'`` the θ' forward leaves them
as they were, so only the acquisition batch at θ moves them.

Cost. ``∇L_Acq(θ)`` is backpropagated once and reused as the inner step's direction and as the first term of ∇J; the
acquisition batch has one forward (finite difference: two). A :class:`RetainWhileAcquire` builds what can be built once
per student (parameter lists, higher's patched module) on its first call and reuses it while the student's modules,
parameters and buffers are the same objects; the functional form :func:`retain_while_acquire` builds them on every
call.

The copy_initial_weights pitfall: ``higher.innerloop_ctx`` and ``higher.monkeypatch`` by default set
``copy_initial_weights`` to True, which makes the fast weights *detached copies* of the student's parameters.
L_Ret(θ') then has no path back to θ: its gradient on the student is silently zero and the memory batch has no
effect on the update (the paper's released code has exactly this bug). This module always passes
``copy_initial_weights=False``, and the patched module runs the student's own parameters.

Caveat: gradients are accumulated by ``torch.autograd.backward`` (so ``.grad`` is formed, and gradient hooks fire, as
with ``.backward()``), but the forwards run the unwrapped module, not a ``DistributedDataParallel`` wrapper, so DDP's
gradient all-reduce is not prepared; the caller must synchronise the gradients.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .config.checks import choice, finite
from .stateless import AtParameters, PreparedModule, buffers_kept
from .util import unwrap

__all__ = ['BACKENDS', 'ORDERS', 'INNER_BN', 'LossClosure', 'RetainWhileAcquire', 'retain_while_acquire']

BACKENDS: tuple[str, ...] = ('higher', 'functional')
ORDERS: tuple[str, ...] = ('second', 'first', 'finite_difference')
INNER_BN: tuple[str, ...] = ('update', 'keep')
# The defaults, stated once (the YAML ``meta`` block, RetainWhileAcquire, retain_while_acquire and the lrwa strategy
# all take them from here).
DEFAULT_BACKEND = 'higher'
DEFAULT_ORDER = 'second'
DEFAULT_INNER_BN = 'update'
#: ``fd_eps`` default: DARTS' ``0.01 / ‖v‖`` (Liu, Simonyan, Yang, ICLR 2019).
DEFAULT_FD_EPS = 0.01

LossClosure = Callable[[Callable[..., Any]], torch.Tensor]
"""A loss closure: receives a module-like callable (``model(x)``, the student at the parameters in use) and returns
a scalar loss."""

Grads = list[torch.Tensor | None]


class RetainWhileAcquire:
    """Adds ∇_θ[L_Acq(θ) + L_Ret(θ − α∇L_Acq(θ))] into the student's ``.grad``.

    Built once (e.g. from the YAML ``meta`` block) and called at every student step: it keeps what it built for the
    last student it was called with (see :class:`PreparedModule`) and rebuilds it when that student's modules,
    parameters, buffers or trainable set change.

    Args:
        alpha: step size of the virtual SGD step; finite and > 0. None: every call passes its own ``alpha``.
        backend: ``'higher'`` (higher's patched module) or ``'functional'`` (``torch.func.functional_call``).
        order: ``'second'`` (exact), ``'first'`` (no Hessian term) or ``'finite_difference'`` (see the module
            docstring).
        inner_bn: ``'update'`` or ``'keep'``: whether the θ' forward moves the BatchNorm running statistics.
        fd_eps: ``ε = fd_eps / ‖v‖`` of ``order='finite_difference'``; finite and > 0.

    Raises:
        ValueError: if an argument is out of range; the message names the argument.
    """

    def __init__(self, alpha: float | None = None, backend: str = DEFAULT_BACKEND, order: str = DEFAULT_ORDER,
                 inner_bn: str = DEFAULT_INNER_BN, fd_eps: float = DEFAULT_FD_EPS) -> None:
        self.alpha = None if alpha is None else finite(alpha, 'alpha', low=0)
        self.backend = choice(backend, BACKENDS, 'backend')
        self.order = choice(order, ORDERS, 'order')
        self.inner_bn = choice(inner_bn, INNER_BN, 'inner_bn')
        self.fd_eps = finite(fd_eps, 'fd_eps', low=0)
        self._state: PreparedModule | None = None

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(alpha={self.alpha}, backend={self.backend!r}, order={self.order!r}, '
                f'inner_bn={self.inner_bn!r}, fd_eps={self.fd_eps})')

    def __call__(
        self, student: nn.Module, acquire: LossClosure, retain: LossClosure | None = None, alpha: float | None = None,
        loss_scale: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Performs the meta gradient computation and accumulates it into ``.grad``.

        Args:
            student: the student, possibly wrapped in ``DataParallel`` / ``DistributedDataParallel``.
            acquire: loss closure on the acquisition batch, run at θ.
            retain: loss closure on the memory batch, run at θ'; ``None`` accumulates only ∇L_Acq(θ).
            alpha: this step's α (finite, >= 0: α = 0 evaluates L_Ret at θ), instead of the one given at construction.
            loss_scale: float16's loss scale ``s`` (:mod:`lrwa_plugin.precision`): every backward is of ``s × loss``,
                so ``.grad`` receives ``s ∇J(θ)``; the inner step uses the unscaled ``∇L_Acq`` (``α/s`` times the
                scaled one: ``s`` is a power of two, so θ' is exactly that of an unscaled step).

        Returns:
            ``(l_acq, l_ret)``, detached; ``l_ret`` is ``None`` when ``retain`` is ``None``.
        """
        if alpha is None:
            if self.alpha is None:
                raise ValueError('meta: no alpha: give it when building RetainWhileAcquire or with every call')
            alpha = self.alpha
        else:
            alpha = finite(alpha, 'alpha', low=0, low_open=False)
        module = unwrap(student)
        state = self._state_for(module, patched=retain is not None and self.backend == 'higher')
        params = state.trainable
        if not params:
            raise ValueError('meta student has no parameter with requires_grad=True')
        # The caller may sit in a no_grad evaluation context; the step needs a graph regardless.
        with torch.enable_grad():
            if retain is None:
                l_acq = acquire(module)
                torch.autograd.backward(_scaled(l_acq, loss_scale), inputs=params)
                return l_acq.detach(), None
            runner = AtParameters(state, self.backend)
            with runner.active():
                if self.order == 'finite_difference':
                    l_acq, l_ret = _finite_difference_step(runner, acquire, retain, alpha, self.fd_eps,
                                                           self.inner_bn == 'keep', loss_scale)
                    return l_acq.detach(), l_ret.detach()
                l_acq, l_ret, g_acq = _exact_step(runner, acquire, retain, alpha, self.order == 'second',
                                                  self.inner_bn == 'keep', loss_scale)
            # ∇L_Ret through θ' (to θ' only, or on through the inner step) plus the reused ∇L_Acq(θ), summed and
            # accumulated into .grad by autograd itself, exactly as .backward() accumulates.
            present = [(p, g.detach()) for p, g in zip(params, g_acq) if g is not None]
            torch.autograd.backward([_scaled(l_ret, loss_scale), *(p for p, _ in present)],
                                    [None, *(g for _, g in present)], inputs=params)
        return l_acq.detach(), l_ret.detach()

    def _state_for(self, module: nn.Module, patched: bool) -> PreparedModule:
        state = self._state
        if state is None or not state.matches(module):
            state = self._state = PreparedModule(module)
        if patched:
            state.sync_patched()
        return state


def retain_while_acquire(
    student: nn.Module,
    acquire: LossClosure,
    retain: LossClosure | None = None,
    *,
    alpha: float,
    backend: str = DEFAULT_BACKEND,
    order: str = DEFAULT_ORDER,
    inner_bn: str = DEFAULT_INNER_BN,
    fd_eps: float = DEFAULT_FD_EPS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Functional form of :class:`RetainWhileAcquire`: ``RetainWhileAcquire(alpha, backend, order, ...)(...)``.

    It builds the per-student state on every call; to reuse it across steps, build a :class:`RetainWhileAcquire`
    once and call it.
    """
    return RetainWhileAcquire(alpha, backend=backend, order=order, inner_bn=inner_bn, fd_eps=fd_eps)(
        student, acquire, retain)


def _scaled(loss: torch.Tensor, scale: float) -> torch.Tensor:
    return loss if scale == 1.0 else loss * scale


def _exact_step(
    runner: AtParameters, acquire: LossClosure, retain: LossClosure, alpha: float, second_order: bool, keep_bn: bool,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, Grads]:
    """Orders second and first: both losses and ``scale ×`` ∇L_Acq(θ) (with its graph kept when second order)."""
    params = runner.state.trainable
    l_acq = acquire(runner.at())
    g_acq = _acquisition_grads(_scaled(l_acq, scale), params, second_order)
    fast = _inner_step(params, g_acq, alpha / scale, second_order)
    with buffers_kept(runner.state, keep_bn):
        l_ret = retain(runner.at(fast))
    return l_acq, l_ret, g_acq


def _finite_difference_step(
    runner: AtParameters, acquire: LossClosure, retain: LossClosure, alpha: float, fd_eps: float, keep_bn: bool,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Order finite_difference: accumulates ``v + (g − α [∇L_Acq(θ + εv) − g] / ε)`` into ``.grad``; returns the
    losses.

    Parameter-sized buffers are the cost here (the activations of a small batch are not): ``v`` goes into ``.grad``
    first, θ' and θ + εv are dropped as soon as their gradient is taken, and the difference quotient and the sum are
    formed in place, so at most three such buffers live beside ``.grad``. With a loss ``scale`` ``s``, ``g`` and ``v``
    are ``s`` times the true ones, the shift ``εv`` and the quotient's divisor are the unscaled ones, so ``.grad``
    receives ``s`` times the unscaled result.
    """
    state = runner.state
    params = state.trainable
    l_acq = acquire(runner.at())
    g = _dense(params, _acquisition_grads(_scaled(l_acq, scale), params, second_order=False))
    with torch.no_grad():
        fast = [t.requires_grad_() for t in _inner_step(params, g, alpha / scale, second_order=False)]
    with buffers_kept(state, keep_bn):
        l_ret = retain(runner.at(fast))
    v = _dense(fast, list(torch.autograd.grad(_scaled(l_ret, scale), fast, allow_unused=True)))
    del fast
    norm = float(torch.nn.utils.get_total_norm(v)) / scale
    torch.autograd.backward(params, v)  # into .grad, as .backward() accumulates (v is read, never written, below)
    if norm > 0:
        eps = fd_eps / norm
        shifted = [t.requires_grad_() for t in
                   torch._foreach_add([p.detach() for p in params], v, alpha=eps / scale)]
        del v
        # The extra forward only measures the slope: the student's running statistics stay as they were.
        with buffers_kept(state, True):
            l_shifted = acquire(runner.at(shifted))
        slope = _dense(shifted, list(torch.autograd.grad(_scaled(l_shifted, scale), shifted, allow_unused=True)))
        del shifted, l_shifted
        torch._foreach_sub_(slope, g)
        torch._foreach_div_(slope, eps)  # H v
        torch._foreach_add_(g, slope, alpha=-alpha)
        del slope
    torch.autograd.backward(params, g)
    return l_acq, l_ret


def _dense(params: Sequence[torch.Tensor], grads: Grads) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]


def _acquisition_grads(l_acq: torch.Tensor, params: Sequence[torch.Tensor], second_order: bool) -> Grads:
    """∇L_Acq(θ), the one backward of the acquisition loss; with its graph kept when the Hessian term needs it."""
    return list(torch.autograd.grad(l_acq, params, create_graph=second_order, allow_unused=True))


def _inner_step(params: Sequence[torch.Tensor], grads: Grads, alpha: float, second_order: bool) -> list[torch.Tensor]:
    """θ' = θ + (−α·g), as a differentiable function of θ.

    Two roundings (a multiply, then an add), as higher's SGD and the tests' plain reference compute it; a fused
    ``add(alpha=)`` would round once and move θ' (and the BatchNorm statistics of the memory forward) by an ulp.
    First order keeps ``−α·g`` out of the graph, so the backward of L_Ret reaches θ through the add alone: the
    identity, with no Hessian term and no separate gradient buffers to sum. The add is in place on ``−α·g``: the
    out-of-place ``_foreach_add`` would save ``−α·g`` for its backward, a parameter-sized copy held until the end.
    """
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    with torch.set_grad_enabled(second_order):
        fast = list(torch._foreach_mul(grads, -alpha))
    torch._foreach_add_(fast, params)
    return fast


