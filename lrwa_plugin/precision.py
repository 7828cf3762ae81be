"""The numeric precision of a data-free run: float32 (the default), or mixed precision for GPUs.

``--amp bfloat16`` or ``--amp float16`` autocasts the forwards of an iteration — the generator step (generator,
teacher, student), the teacher and replay forwards of the student steps and every forward a strategy runs, the meta
step's at θ, θ' and θ + εv included — while the parameters, their gradients, the optimizers, the BatchNorm running
statistics and the losses stay float32: each forward's outputs are cast to float32 before the criterion reduces them,
and the BatchNorm-statistics prior reads the teacher's BatchNorm inputs in float32. Float32 runs none of this and is
bit-identical to a run without the option.

float16's narrow range needs a loss scale (:class:`LossScale`, the schedule of ``torch.amp.GradScaler``): every
backward is of ``s × loss``, the gradients are divided by ``s`` before anything reads them (clipping, the optimizer,
the non-finite guard), and a step whose scaled gradients overflow is skipped — no optimizer step, no step-wise
scheduler step — for the student and the generator alike, each with its own scale. The meta step's inner step
``θ' = θ − α ∇L_Acq`` uses the unscaled gradient (:class:`lrwa_plugin.meta.RetainWhileAcquire` takes the scale).
Both scales are part of the training state, so a resumed run continues exactly.

.. code-block:: bash

    python examples/run_torchdistill.py --config examples/configs/cifar100/lrwa_mb.yaml --amp bfloat16 -tf32
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .util import tree_map

#: ``--amp`` choices and the autocast dtype of each.
AMP_DTYPES: dict[str, torch.dtype] = {'bfloat16': torch.bfloat16, 'float16': torch.float16}


class LossScale:
    """A dynamic loss scale for float16: starts at ``2**16``, halves (and the step is skipped) when the scaled
    gradients overflow, doubles after ``growth_interval`` steps in a row without overflow (``torch.amp.GradScaler``'s
    schedule), for steps whose gradient is formed by hand rather than by one ``loss.backward()``."""

    def __init__(self, init_scale: float = 2.0 ** 16, growth_interval: int = 2000) -> None:
        self.scale = float(init_scale)
        self.growth_interval = growth_interval
        self.good_steps = 0
        self.skipped = 0

    def unscale_(self, parameters: Iterable[nn.Parameter]) -> bool:
        """Divides the gradients by the scale; returns whether they are all finite (if not, the caller skips the
        step: the scale halves and the gradients are dropped)."""
        grads = [p.grad for p in parameters if p.grad is not None]
        if grads:
            torch._foreach_div_(grads, self.scale)
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        if finite:
            self.good_steps += 1
            if self.good_steps == self.growth_interval:
                self.scale, self.good_steps = self.scale * 2.0, 0
        else:
            self.scale, self.good_steps, self.skipped = self.scale / 2.0, 0, self.skipped + 1
            for g in grads:
                g.zero_()
        return finite

    def state_dict(self) -> dict[str, Any]:
        return {'scale': self.scale, 'good_steps': self.good_steps, 'skipped': self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale, self.good_steps, self.skipped = float(state['scale']), int(state['good_steps']), \
            int(state['skipped'])


class Precision:
    """What a run computes in: ``amp`` None (float32), ``'bfloat16'`` or ``'float16'`` on ``device_type``.

    Attributes:
        student_scale, generator_scale: the float16 loss scales (None otherwise).
    """

    def __init__(self, amp: str | None = None, device_type: str = 'cpu') -> None:
        if amp is not None and amp not in AMP_DTYPES:
            raise ValueError(f"amp: expected one of {', '.join(AMP_DTYPES)} or None, got {amp!r}")
        self.amp, self.device_type = amp, device_type
        self.dtype = AMP_DTYPES.get(amp) if amp is not None else None
        self.student_scale = LossScale() if amp == 'float16' else None
        self.generator_scale = LossScale() if amp == 'float16' else None

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    @property
    def name(self) -> str:
        return self.amp or 'float32'

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to the run's dtype (a no-op for float32)."""
        return torch.autocast(self.device_type, dtype=self.dtype) if self.enabled else contextlib.nullcontext()

    def to_float32(self, tree: Any) -> Any:
        """Every floating tensor of a tree (an I/O dict, a batch) in float32; float32 runs get the tree itself."""
        if not self.enabled:
            return tree
        return tree_map(lambda t: t.float() if t.is_floating_point() else t, tree)

    def state_dict(self) -> dict[str, Any]:
        return {'amp': self.amp,
                'student_scale': None if self.student_scale is None else self.student_scale.state_dict(),
                'generator_scale': None if self.generator_scale is None else self.generator_scale.state_dict()}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        state = state or {'amp': None}
        if state.get('amp') != self.amp:
            raise ValueError(f"the checkpoint was written with --amp {state.get('amp') or 'none (float32)'}, "
                             f"this run has {self.amp or 'none (float32)'}")
        for scale, key in ((self.student_scale, 'student_scale'), (self.generator_scale, 'generator_scale')):
            if scale is not None:
                scale.load_state_dict(state[key])


def set_backend_flags(device: torch.device, tf32: bool = False, deterministic: bool = False,
                      cudnn_benchmark: bool = True) -> None:
    """The process-wide switches: TF32 matrix products and convolutions on Ampere+ GPUs (``-tf32``: float32 inputs
    rounded to 10 mantissa bits inside the product, about 3 significant digits), and deterministic kernels
    (``-deterministic``: ``torch.use_deterministic_algorithms``, cuBLAS's fixed workspace, cuDNN without autotuning;
    slower, and an op with no deterministic kernel is an error). Both off by default."""
    if deterministic:
        # cuBLAS reads this when it creates its handle: set it before the first CUDA matrix product.
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = cudnn_benchmark and not deterministic
    if device.type == 'cuda' or tf32:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def to_channels_last(*modules: nn.Module | None) -> None:
    """``-channels_last``: the modules' 4-d parameters and buffers in NHWC memory order (faster convolutions on
    tensor cores; the convolutions then return NHWC activations)."""
    for module in modules:
        if module is not None:
            module.to(memory_format=torch.channels_last)
