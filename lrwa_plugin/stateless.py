"""Running one module at other values of its parameters, with its forward hooks and buffers intact.

The meta step (:mod:`lrwa_plugin.meta`) evaluates the student at θ and at θ' = θ − α∇L_Acq(θ) (and, finite
difference, at θ + εv) without ever writing θ' into the student. Two backends do that: higher's patched module
(``higher.monkeypatch``, handed each set of fast weights) and ``torch.func.functional_call``. This module holds what
both need beyond the arithmetic:

* :class:`PreparedModule`: what can be built once per student (parameter lists, higher's patched twin with the
  student's own buffers) and a check that the student still holds the same tensors;
* :class:`AtParameters`: the student at θ or at other values of its trainable parameters, per backend, with the
  student's forward (pre-)hooks mirrored onto higher's twin (torchdistill's io_dict hooks keep firing);
* :func:`buffers_kept`: forwards that leave the BatchNorm running statistics exactly as they were.

The same separation as learn2learn's ``utils`` and TorchOpt's ``nn/stateless.py``: the gradient knows nothing of how a
module is run at other parameters, and this module knows nothing of the gradient.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import higher
import torch
from torch import nn
from torch.func import functional_call

__all__ = ['PreparedModule', 'AtParameters', 'buffers_kept']


class AtParameters:
    """Runs the student at θ (its own parameters) or at other values of its trainable parameters, per backend.

    ``higher``: the patched module, handed each set of fast weights (and θ again when the step ends), with the
    student's forward hooks mirrored onto it while :meth:`active`. ``functional``: the student itself at θ, and
    ``torch.func.functional_call`` with the substituted trainable parameters elsewhere (buffers and hooks are the
    student's own, so both behave as in a plain forward).
    """

    def __init__(self, state: PreparedModule, backend: str) -> None:
        self.state = state
        self.higher = backend == 'higher'

    @contextmanager
    def active(self) -> Iterator[None]:
        if not self.higher:
            yield
            return
        with mirrored_forward_hooks(self.state.module_pairs):
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
        return FunctionalModel(state.module, dict(zip(state.trainable_names, trainable)))


@contextmanager
def buffers_kept(state: PreparedModule, keep: bool) -> Iterator[None]:
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


class PreparedModule:
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


class FunctionalModel:
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
def mirrored_forward_hooks(module_pairs: Sequence[tuple[nn.Module, nn.Module]]) -> Iterator[None]:
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
