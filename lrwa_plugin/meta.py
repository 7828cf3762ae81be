"""The meta student update of "Learning to Retain while Acquiring".

Patel, Mopuri, Qiu, "Learning to Retain while Acquiring: Combating Distribution-Shift in Adversarial Data-Free
Knowledge Distillation", CVPR 2023.

The student is trained on the freshly generated (acquisition) batch and on a replayed (memory) batch, but the memory
loss is taken *after* a virtual SGD step on the acquisition loss, so that the update that acquires new knowledge is
also one that retains the old::

    J(θ) = L_Acq(θ) + L_Ret(θ'),    θ' = θ − α ∇L_Acq(θ)
    ∇J(θ) = ∇L_Acq(θ) + (I − α H_Acq(θ)) ∇L_Ret(θ')

``order='first'`` drops the Hessian term and uses ``∇L_Acq(θ) + ∇_θ' L_Ret(θ')``.

In a torchdistill YAML config::

    meta:
      alpha: 0.9
      backend: higher     # or: functional
      order: second       # or: first

and in code (usable without torchdistill)::

    from lrwa_plugin.meta import retain_while_acquire, RetainWhileAcquire
    l_acq, l_ret = retain_while_acquire(student, acquire=lambda model: crit(model(x), t),
                                        retain=lambda model: crit(model(x_m), t_m),
                                        alpha=0.9, backend='higher', order='second')
    # adds ∇J(θ) into student's .grad like .backward() would; the returned losses are detached.

``acquire`` is called once with a module-like callable running the student at θ, ``retain`` once with one running it
at θ'. Both backends leave the student's buffers (BatchNorm statistics) as a plain forward of the acquisition batch
at θ followed by a plain forward of the memory batch at θ' would, and fire the student's forward (pre-)hooks in both
forwards, so torchdistill's io_dict is filled each time.

The copy_initial_weights pitfall: ``higher.innerloop_ctx`` by default sets ``copy_initial_weights`` to True, which
makes the fast weights *detached copies* of the student's parameters. L_Ret(θ') then has no path back to θ: its
gradient on the student is silently zero and the memory batch has no effect on the update (the paper's released code
has exactly this bug). This module always passes ``copy_initial_weights=False``.

Caveat: gradients are written into ``.grad`` directly, not through ``.backward()``, so a
``DistributedDataParallel`` wrapper's gradient all-reduce is not triggered; the caller must synchronise them.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import higher
import torch
from torch import nn
from torch.func import functional_call

__all__ = ['BACKENDS', 'ORDERS', 'RetainWhileAcquire', 'retain_while_acquire']

BACKENDS: tuple[str, ...] = ('higher', 'functional')
ORDERS: tuple[str, ...] = ('second', 'first')

LossFn = Callable[[Callable[..., Any]], torch.Tensor]
"""A loss closure: receives a module-like callable (``model(x)``) and returns a scalar loss."""

Grads = list[torch.Tensor | None]


class RetainWhileAcquire:
    """Adds ∇_θ[L_Acq(θ) + L_Ret(θ − α∇L_Acq(θ))] into the student's ``.grad``.

    Built once (e.g. from the YAML ``meta`` block) and called at every student step.

    Args:
        alpha: step size of the virtual SGD step; finite and > 0.
        backend: ``'higher'`` (``higher.innerloop_ctx``) or ``'functional'`` (``torch.func.functional_call``).
        order: ``'second'`` for the exact gradient, ``'first'`` to drop the Hessian term.

    Raises:
        ValueError: if an argument is out of range; the message names the argument.
    """

    def __init__(self, alpha: float, backend: str = 'higher', order: str = 'second') -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f'meta alpha must be a finite number > 0, got {alpha!r} ({type(alpha).__name__})')
        if backend not in BACKENDS:
            raise ValueError(f'meta backend must be one of {", ".join(map(repr, BACKENDS))}, got {backend!r}')
        if order not in ORDERS:
            raise ValueError(f'meta order must be one of {", ".join(map(repr, ORDERS))}, got {order!r}')
        self.alpha = float(alpha)
        self.backend = backend
        self.order = order

    def __repr__(self) -> str:
        return f'{type(self).__name__}(alpha={self.alpha}, backend={self.backend!r}, order={self.order!r})'

    def __call__(
        self, student: nn.Module, acquire: LossFn, retain: LossFn | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Performs the meta gradient computation and accumulates it into ``.grad``.

        Args:
            student: the student, possibly wrapped in ``DataParallel`` / ``DistributedDataParallel``.
            acquire: loss closure on the acquisition batch, run at θ.
            retain: loss closure on the memory batch, run at θ'; ``None`` accumulates only ∇L_Acq(θ).

        Returns:
            ``(l_acq, l_ret)``, detached; ``l_ret`` is ``None`` when ``retain`` is ``None``.
        """
        module = _unwrap(student)
        params = [p for _, p in _trainable(module)]
        if not params:
            raise ValueError('meta student has no parameter with requires_grad=True')
        # The caller may sit in a no_grad evaluation context; the step needs a graph regardless.
        with torch.enable_grad():
            if retain is None:
                l_acq = acquire(module)
                grads = list(torch.autograd.grad(l_acq, params, allow_unused=True))
                l_ret = None
            elif self.backend == 'higher':
                l_acq, l_ret, grads = _step_higher(module, acquire, retain, self.alpha, self.order == 'second')
            else:
                l_acq, l_ret, grads = _step_functional(module, acquire, retain, self.alpha, self.order == 'second')
        _accumulate_grads(params, grads)
        return l_acq.detach(), None if l_ret is None else l_ret.detach()


def retain_while_acquire(
    student: nn.Module,
    acquire: LossFn,
    retain: LossFn | None = None,
    alpha: float = 0.9,
    backend: str = 'higher',
    order: str = 'second',
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Functional form of :class:`RetainWhileAcquire`: ``RetainWhileAcquire(alpha, backend, order)(...)``."""
    return RetainWhileAcquire(alpha, backend=backend, order=order)(student, acquire, retain)


def _step_higher(
    module: nn.Module, acquire: LossFn, retain: LossFn, alpha: float, second_order: bool
) -> tuple[torch.Tensor, torch.Tensor, Grads]:
    """The step through ``higher``; returns the losses and ∇J for the trainable parameters."""
    all_params = list(module.parameters())
    trainable = [i for i, p in enumerate(all_params) if p.requires_grad]
    params = [all_params[i] for i in trainable]
    # A dedicated plain SGD: the student's own optimizer (momentum, weight decay, state) must not shape θ'.
    inner_opt = torch.optim.SGD(params, lr=alpha, momentum=0.0, weight_decay=0.0)
    acq_grads: list[Sequence[torch.Tensor | None]] = []

    def keep_acq_grads(grads: Sequence[torch.Tensor | None]) -> Sequence[torch.Tensor | None]:
        acq_grads.append(grads)  # reused below, so L_Acq is backpropagated once
        return grads

    with higher.innerloop_ctx(module, inner_opt, copy_initial_weights=False,
                              track_higher_grads=second_order) as (fmodel, diffopt):
        with _mirrored_forward_hooks(module, fmodel):
            l_acq = acquire(fmodel)
            diffopt.step(l_acq, grad_callback=keep_acq_grads)
            l_ret = retain(fmodel)
        # Second order differentiates through θ' = θ − αg back to the student; first order stops at θ'.
        targets = params if second_order else [fmodel.fast_params[i] for i in trainable]
        ret_grads = torch.autograd.grad(l_ret, targets, allow_unused=True)
        # higher cloned the buffers: hand the updated BatchNorm statistics back to the student.
        _copy_buffers_back(fmodel, module)
    g_acq = [acq_grads[0][i] for i in trainable]
    return l_acq, l_ret, _add_grads(_detached(g_acq), list(ret_grads))


def _step_functional(
    module: nn.Module, acquire: LossFn, retain: LossFn, alpha: float, second_order: bool
) -> tuple[torch.Tensor, torch.Tensor, Grads]:
    """The step through ``torch.func.functional_call``; returns the losses and ∇J for the trainable parameters."""
    names, params = zip(*_trainable(module))
    l_acq = acquire(module)
    g_acq = list(torch.autograd.grad(l_acq, params, create_graph=second_order, allow_unused=True))
    g_or_zero = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_acq)]
    with torch.set_grad_enabled(second_order):
        # θ + (−α·g) with two roundings, as higher's SGD computes it, so both backends agree bit for bit.
        fast = torch._foreach_add(params, torch._foreach_mul(g_or_zero, -alpha))
    if not second_order:
        fast = [t.requires_grad_() for t in fast]  # fresh leaves: θ' is a constant of θ
    l_ret = retain(_FunctionalModel(module, dict(zip(names, fast))))
    ret_grads = torch.autograd.grad(l_ret, params if second_order else fast, allow_unused=True)
    return l_acq, l_ret, _add_grads(_detached(g_acq), list(ret_grads))


class _FunctionalModel:
    """Module-like callable running ``module`` with substituted parameters.

    Buffers are deliberately not substituted: the module's own tensors are used and updated in place, and hooks on the
    real submodules fire, exactly as in a plain forward.
    """

    def __init__(self, module: nn.Module, params: dict[str, torch.Tensor]) -> None:
        self.module = module
        self.params = params

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.module, self.params, args, kwargs)


@contextmanager
def _mirrored_forward_hooks(module: nn.Module, fmodel: nn.Module) -> Iterator[None]:
    """Re-registers ``module``'s forward (pre-)hooks on the same-named ``fmodel`` submodules while active.

    higher's patched submodules start with empty hook dicts, so e.g. torchdistill's io_dict hooks would stay silent.
    """
    fmodules = dict(fmodel.named_modules(remove_duplicate=False))
    handles = []
    try:
        for name, sub in module.named_modules(remove_duplicate=False):
            target = fmodules[name]
            pre_kwargs = getattr(sub, '_forward_pre_hooks_with_kwargs', {})
            for hook_id, hook in list(sub._forward_pre_hooks.items()):
                handles.append(target.register_forward_pre_hook(hook, with_kwargs=hook_id in pre_kwargs))
            with_kwargs = getattr(sub, '_forward_hooks_with_kwargs', {})
            always = getattr(sub, '_forward_hooks_always_called', {})
            for hook_id, hook in list(sub._forward_hooks.items()):
                handles.append(target.register_forward_hook(
                    hook, with_kwargs=hook_id in with_kwargs, always_call=hook_id in always))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def _copy_buffers_back(fmodel: nn.Module, module: nn.Module) -> None:
    """Copies ``fmodel``'s buffers into ``module``'s same-named buffers, in place."""
    fbuffers = dict(fmodel.named_buffers())
    pairs = [(b, fbuffers[name]) for name, b in module.named_buffers() if name in fbuffers]
    if pairs:
        dst, src = zip(*pairs)
        torch._foreach_copy_(list(dst), list(src))


def _unwrap(student: nn.Module) -> nn.Module:
    if isinstance(student, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return student.module
    return student


def _trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in module.named_parameters() if p.requires_grad]


def _detached(grads: Sequence[torch.Tensor | None]) -> Grads:
    return [None if g is None else g.detach() for g in grads]


def _add_grads(a: Grads, b: Grads) -> Grads:
    """Element-wise a + b where ``None`` counts as zero; stays ``None`` only where both are."""
    out = [x if y is None else y if x is None else None for x, y in zip(a, b)]
    both = [i for i, (x, y) in enumerate(zip(a, b)) if x is not None and y is not None]
    if both:
        for i, s in zip(both, torch._foreach_add([a[i] for i in both], [b[i] for i in both])):
            out[i] = s
    return out


@torch.no_grad()
def _accumulate_grads(params: Sequence[nn.Parameter], grads: Grads) -> None:
    """Adds ``grads`` into ``.grad`` like ``.backward()``: accumulate where present, create where ``None``."""
    present = [(p.grad, g) for p, g in zip(params, grads) if g is not None and p.grad is not None]
    if present:
        dst, src = zip(*present)
        torch._foreach_add_(list(dst), list(src))
    for p, g in zip(params, grads):
        if g is not None and p.grad is None:
            p.grad = g
