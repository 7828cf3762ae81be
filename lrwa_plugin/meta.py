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

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import higher
import torch
from torch import nn
from torch.func import functional_call

from .config.checks import choice, finite
from .util import unwrap

__all__ = ['BACKENDS', 'ORDERS', 'INNER_BN', 'RetainWhileAcquire', 'retain_while_acquire']

BACKENDS: tuple[str, ...] = ('higher', 'functional')
ORDERS: tuple[str, ...] = ('second', 'first', 'finite_difference')
INNER_BN: tuple[str, ...] = ('update', 'keep')
#: ``fd_eps`` default: DARTS' ``0.01 / ‖v‖`` (Liu, Simonyan, Yang, ICLR 2019).
DEFAULT_FD_EPS = 0.01

LossFn = Callable[[Callable[..., Any]], torch.Tensor]
"""A loss closure: receives a module-like callable (``model(x)``) and returns a scalar loss."""

Grads = list[torch.Tensor | None]


class RetainWhileAcquire:
    """Adds ∇_θ[L_Acq(θ) + L_Ret(θ − α∇L_Acq(θ))] into the student's ``.grad``.

    Built once (e.g. from the YAML ``meta`` block) and called at every student step: it keeps what it built for the
    last student it was called with (see :class:`_StudentState`) and rebuilds it when that student's modules,
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

    def __init__(self, alpha: float | None = None, backend: str = 'higher', order: str = 'second',
                 inner_bn: str = 'update', fd_eps: float = DEFAULT_FD_EPS) -> None:
        self.alpha = None if alpha is None else finite(alpha, 'alpha', low=0)
        self.backend = choice(backend, BACKENDS, 'backend')
        self.order = choice(order, ORDERS, 'order')
        self.inner_bn = choice(inner_bn, INNER_BN, 'inner_bn')
        self.fd_eps = finite(fd_eps, 'fd_eps', low=0)
        self._state: _StudentState | None = None

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(alpha={self.alpha}, backend={self.backend!r}, order={self.order!r}, '
                f'inner_bn={self.inner_bn!r}, fd_eps={self.fd_eps})')

    def __call__(
        self, student: nn.Module, acquire: LossFn, retain: LossFn | None = None, alpha: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Performs the meta gradient computation and accumulates it into ``.grad``.

        Args:
            student: the student, possibly wrapped in ``DataParallel`` / ``DistributedDataParallel``.
            acquire: loss closure on the acquisition batch, run at θ.
            retain: loss closure on the memory batch, run at θ'; ``None`` accumulates only ∇L_Acq(θ).
            alpha: this step's α (finite, >= 0: α = 0 evaluates L_Ret at θ), instead of the one given at construction.

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
                torch.autograd.backward(l_acq, inputs=params)
                return l_acq.detach(), None
            evaluator = _Evaluator(state, self.backend)
            with evaluator.active():
                if self.order == 'finite_difference':
                    l_acq, l_ret = _finite_difference_step(evaluator, acquire, retain, alpha, self.fd_eps,
                                                           self.inner_bn == 'keep')
                    return l_acq.detach(), l_ret.detach()
                l_acq, l_ret, g_acq = _exact_step(evaluator, acquire, retain, alpha, self.order == 'second',
                                                  self.inner_bn == 'keep')
            # ∇L_Ret through θ' (to θ' only, or on through the inner step) plus the reused ∇L_Acq(θ), summed and
            # accumulated into .grad by autograd itself, exactly as .backward() accumulates.
            present = [(p, g.detach()) for p, g in zip(params, g_acq) if g is not None]
            torch.autograd.backward([l_ret, *(p for p, _ in present)], [None, *(g for _, g in present)],
                                    inputs=params)
        return l_acq.detach(), l_ret.detach()

    def _state_for(self, module: nn.Module, patched: bool) -> _StudentState:
        state = self._state
        if state is None or not state.matches(module):
            state = self._state = _StudentState(module)
        if patched:
            state.sync_patched()
        return state


def retain_while_acquire(
    student: nn.Module,
    acquire: LossFn,
    retain: LossFn | None = None,
    alpha: float = 0.9,
    backend: str = 'higher',
    order: str = 'second',
    inner_bn: str = 'update',
    fd_eps: float = DEFAULT_FD_EPS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Functional form of :class:`RetainWhileAcquire`: ``RetainWhileAcquire(alpha, backend, order, ...)(...)``.

    It builds the per-student state on every call; to reuse it across steps, build a :class:`RetainWhileAcquire`
    once and call it.
    """
    return RetainWhileAcquire(alpha, backend=backend, order=order, inner_bn=inner_bn, fd_eps=fd_eps)(
        student, acquire, retain)


class _Evaluator:
    """Runs the student at θ (its own parameters) or at other values of its trainable parameters, per backend.

    ``higher``: the patched module, handed each set of fast weights (and θ again when the step ends), with the
    student's forward hooks mirrored onto it while :meth:`active`. ``functional``: the student itself at θ, and
    ``torch.func.functional_call`` with the substituted trainable parameters elsewhere (buffers and hooks are the
    student's own, so both behave as in a plain forward).
    """

    def __init__(self, state: _StudentState, backend: str) -> None:
        self.state = state
        self.higher = backend == 'higher'

    @contextmanager
    def active(self) -> Iterator[None]:
        if not self.higher:
            yield
            return
        with _mirrored_forward_hooks(self.state.module_pairs):
            try:
                yield
            finally:
                # Back to θ, so the cached module keeps neither θ' nor the graph behind it.
                self.state.fmodel.update_params(self.state.params)

    def at(self, trainable: list[torch.Tensor] | None = None) -> Callable[..., Any]:
        """The student at θ (``None``) or with its trainable parameters replaced by ``trainable``."""
        state = self.state
        if self.higher:
            state.fmodel.update_params(state.params if trainable is None else state.all_with_trainable(trainable))
            return state.fmodel
        if trainable is None:
            return state.module
        return _FunctionalModel(state.module, dict(zip(state.trainable_names, trainable)))


def _exact_step(
    evaluator: _Evaluator, acquire: LossFn, retain: LossFn, alpha: float, second_order: bool, keep_bn: bool
) -> tuple[torch.Tensor, torch.Tensor, Grads]:
    """Orders second and first: both losses and ∇L_Acq(θ) (with its graph kept when second order)."""
    params = evaluator.state.trainable
    l_acq = acquire(evaluator.at())
    g_acq = _acquisition_grads(l_acq, params, second_order)
    fast = _inner_step(params, g_acq, alpha, second_order)
    with _buffers_kept(evaluator.state, keep_bn):
        l_ret = retain(evaluator.at(fast))
    return l_acq, l_ret, g_acq


def _finite_difference_step(
    evaluator: _Evaluator, acquire: LossFn, retain: LossFn, alpha: float, fd_eps: float, keep_bn: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Order finite_difference: accumulates ``v + (g − α [∇L_Acq(θ + εv) − g] / ε)`` into ``.grad``; returns the
    losses.

    Parameter-sized buffers are the cost here (the activations of a small batch are not): ``v`` goes into ``.grad``
    first, θ' and θ + εv are dropped as soon as their gradient is taken, and the difference quotient and the sum are
    formed in place, so at most three such buffers live beside ``.grad``.
    """
    state = evaluator.state
    params = state.trainable
    l_acq = acquire(evaluator.at())
    g = _dense(params, _acquisition_grads(l_acq, params, second_order=False))
    with torch.no_grad():
        fast = [t.requires_grad_() for t in _inner_step(params, g, alpha, second_order=False)]
    with _buffers_kept(state, keep_bn):
        l_ret = retain(evaluator.at(fast))
    v = _dense(fast, list(torch.autograd.grad(l_ret, fast, allow_unused=True)))
    del fast
    norm = float(torch.nn.utils.get_total_norm(v))
    torch.autograd.backward(params, v)  # into .grad, as .backward() accumulates (v is read, never written, below)
    if norm > 0:
        eps = fd_eps / norm
        shifted = [t.requires_grad_() for t in torch._foreach_add([p.detach() for p in params], v, alpha=eps)]
        del v
        # The extra forward only measures the slope: the student's running statistics stay as they were.
        with _buffers_kept(state, True):
            l_shifted = acquire(evaluator.at(shifted))
        slope = _dense(shifted, list(torch.autograd.grad(l_shifted, shifted, allow_unused=True)))
        del shifted, l_shifted
        torch._foreach_sub_(slope, g)
        torch._foreach_div_(slope, eps)  # H v
        torch._foreach_add_(g, slope, alpha=-alpha)
        del slope
    torch.autograd.backward(params, g)
    return l_acq, l_ret


def _dense(params: Sequence[torch.Tensor], grads: Grads) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]


@contextmanager
def _buffers_kept(state: _StudentState, keep: bool) -> Iterator[None]:
    """With ``keep``, the forwards inside run on copies of the student's buffers (BatchNorm running statistics), so
    the student's own are left exactly as they were.

    The copies take the buffers' places in the student's submodules (and in higher's patched twins) for the duration;
    the student's tensors are never written to, so graphs that saved them stay valid.
    """
    if not keep:
        yield
        return
    holders = [sub._buffers for sub in state.module.modules()] + [fsub._buffers for _, fsub in state.module_pairs]
    originals = [dict(buffers) for buffers in holders]
    copies: dict[int, torch.Tensor] = {}
    try:
        for buffers in holders:
            for name, tensor in buffers.items():
                if tensor is not None:
                    buffers[name] = copies.setdefault(id(tensor), tensor.clone())
        yield
    finally:
        for buffers, original in zip(holders, originals):
            buffers.update(original)


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


class _StudentState:
    """What every step needs from one student and can be built once.

    The parameters in ``module.parameters()`` order (higher's order of fast weights), the trainable ones and their
    names, and (backend higher) higher's patched module with its submodules paired to the student's. ``matches``
    compares, by identity, every module, parameter (and its ``requires_grad``) and buffer of the student with those
    seen when this was built, so anything replaced (``load_state_dict(..., assign=True)``, ``.to(dtype)`` on buffers,
    a swapped submodule, a frozen parameter) makes the caller build a new one: a gradient can never be computed for
    tensors the student no longer holds.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.signature = _signature(module)
        named = list(module.named_parameters())
        self.params = [p for _, p in named]
        self._trainable_index = [i for i, (_, p) in enumerate(named) if p.requires_grad]
        self.trainable = [self.params[i] for i in self._trainable_index]
        self.trainable_names = [named[i][0] for i in self._trainable_index]
        self.fmodel: nn.Module | None = None
        self.module_pairs: list[tuple[nn.Module, nn.Module]] = []

    def matches(self, module: nn.Module) -> bool:
        if module is not self.module:
            return False
        signature = _signature(module)
        return len(signature) == len(self.signature) and all(a is b for a, b in zip(signature, self.signature))

    def all_with_trainable(self, trainable: list[torch.Tensor]) -> list[torch.Tensor]:
        """All parameters, the trainable ones replaced by ``trainable`` (the frozen ones stay where they are)."""
        if len(trainable) == len(self.params):
            return trainable
        full = list(self.params)
        for i, tensor in zip(self._trainable_index, trainable):
            full[i] = tensor
        return full

    def sync_patched(self) -> None:
        """Builds higher's patched module on first use; afterwards re-copies the student's plain attributes into it.

        higher copies each submodule's ``__dict__`` (``training``, BatchNorm ``momentum``, ...) once; the student may
        have changed them since (``.eval()``), so they are copied again before every step.
        """
        if self.fmodel is None:
            self._patch()
            return
        for sub, fsub in self.module_pairs:
            fsub.__dict__.update({k: v for k, v in sub.__dict__.items() if k not in _NOT_COPIED_BY_HIGHER})

    def _patch(self) -> None:
        module = self.module
        # copy_initial_weights=False: the fast weights must stay functions of θ (the published defect, see above).
        # track_higher_grads=False: the module only holds the fast weights it is handed (the inner step itself keeps
        # or drops the graph); with True, higher appends every set it is handed to a list the cache would keep.
        fmodel = higher.monkeypatch(module, copy_initial_weights=False, track_higher_grads=False)
        fmodules = dict(fmodel.named_modules(remove_duplicate=False))
        self.module_pairs = [(sub, fmodules[name]) for name, sub in module.named_modules(remove_duplicate=False)]
        for sub, fsub in self.module_pairs:
            # The student's own buffers, not higher's copies: BatchNorm statistics are updated in place on the student.
            fsub._buffers.update(sub._buffers)
        fmodel.update_params(self.params)
        self.fmodel = fmodel


#: The ``nn.Module`` attributes higher's patch gives each patched submodule its own of (higher.patch._internal_attrs).
_NOT_COPIED_BY_HIGHER = frozenset({
    '_backend', '_parameters', '_buffers', '_backward_hooks', '_forward_hooks', '_forward_pre_hooks',
    '_state_dict_hooks', '_load_state_dict_pre_hooks', '_modules'})


def _signature(module: nn.Module) -> list[Any]:
    """Every submodule, parameter, parameter ``requires_grad`` flag and buffer of ``module``, in a fixed order."""
    signature: list[Any] = []
    for sub in module.modules():
        signature.append(sub)
        for p in sub._parameters.values():
            signature += (p, None if p is None else p.requires_grad)
        signature += sub._buffers.values()
    return signature


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
def _mirrored_forward_hooks(module_pairs: Sequence[tuple[nn.Module, nn.Module]]) -> Iterator[None]:
    """Re-registers each student submodule's forward (pre-)hooks on its patched twin while active.

    higher's patched submodules start with empty hook dicts, so e.g. torchdistill's io_dict hooks would stay silent.
    """
    handles = []
    try:
        for sub, target in module_pairs:
            if sub._forward_pre_hooks:
                pre_kwargs = getattr(sub, '_forward_pre_hooks_with_kwargs', {})
                for hook_id, hook in list(sub._forward_pre_hooks.items()):
                    handles.append(target.register_forward_pre_hook(hook, with_kwargs=hook_id in pre_kwargs))
            if sub._forward_hooks:
                with_kwargs = getattr(sub, '_forward_hooks_with_kwargs', {})
                always = getattr(sub, '_forward_hooks_always_called', {})
                for hook_id, hook in list(sub._forward_hooks.items()):
                    handles.append(target.register_forward_hook(
                        hook, with_kwargs=hook_id in with_kwargs, always_call=hook_id in always))
        yield
    finally:
        for handle in handles:
            handle.remove()
