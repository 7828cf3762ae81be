"""Strategies: how the student gradient is formed from the acquisition and the retention losses.

One box, one YAML; only ``train.strategy`` differs, and the paper's baselines come for free:

=========  =============================================  ====================================
strategy   student gradient                               replay (``replay_kinds``)
=========  =============================================  ====================================
dfad       ∇L_Acq(θ)                                      none
mb_dfkd    ∇[L_Acq(θ) + L_Ret(θ)]                         MemoryBank
pre_dfkd   ∇[L_Acq(θ) + L_Ret(θ)]                         GenerativeReplay
lrwa       ∇[L_Acq(θ) + L_Ret(θ − α∇L_Acq(θ))]            MemoryBank or GenerativeReplay
=========  =============================================  ====================================

Each strategy names the replay memories it accepts (registry keys of :mod:`lrwa_plugin.replay`) in its class
attribute ``replay_kinds``; the box refuses any other. Until the memory holds samples, every strategy falls back to
∇L_Acq. A strategy gets two closures, ``acquire`` and ``retain``, that run a student callable on the current batch
and on the replay batch and return the pipeline's own torchdistill criterion; it leaves the gradient in the student's
``.grad`` and returns the loss values.

.. code-block:: yaml

    train:
      strategy: 'lrwa'
      data_free:
        meta: {alpha: 0.9, backend: 'higher', order: 'second'}
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from .meta import RetainWhileAcquire
from .registry import register_strategy

LossClosure = Callable[[Callable[..., Any]], Tensor]


class Strategy:
    """Base strategy. ``replay_kinds``: the replay memories (``train.data_free.replay.key``) it accepts; none: it
    uses no replay."""

    replay_kinds: tuple[str, ...] = ('MemoryBank', 'GenerativeReplay')

    def __init__(self, meta: dict[str, Any] | None = None) -> None:
        if meta is not None:
            raise ValueError(f"train.data_free.meta is only used by strategy 'lrwa', not by '{self.key}'")

    @property
    def key(self) -> str:
        return type(self).__name__

    def backward(self, student: nn.Module, acquire: LossClosure,
                 retain: LossClosure | None) -> dict[str, float]:
        """Accumulates the student gradient into ``.grad``; returns ``{'acq': L_Acq, 'ret': L_Ret}`` as floats."""
        raise NotImplementedError


def _loss_values(l_acq: Tensor, l_ret: Tensor | None) -> dict[str, float]:
    values = {'acq': float(l_acq.detach())}
    if l_ret is not None:
        values['ret'] = float(l_ret.detach())
    return values


@register_strategy(key='dfad')
class AcquireOnly(Strategy):
    """DFAD (Fang et al., "Data-Free Adversarial Distillation", 2019): the student only acquires, ``∇L_Acq(θ)``.

    No replay: ``train.data_free.replay`` must be absent.

    .. code-block:: yaml

        train: {strategy: 'dfad'}
    """

    replay_kinds = ()
    key = 'dfad'

    def backward(self, student: nn.Module, acquire: LossClosure, retain: LossClosure | None) -> dict[str, float]:
        l_acq = acquire(student)
        l_acq.backward()
        return _loss_values(l_acq, None)


@register_strategy(key='mb_dfkd')
class JointReplay(Strategy):
    """MB-DFKD (Binici et al., WACV 2022): ``∇[L_Acq(θ) + L_Ret(θ)]``, replay and new samples weighted alike.

    .. code-block:: yaml

        train:
          strategy: 'mb_dfkd'
          data_free:
            replay: {key: 'MemoryBank', kwargs: {capacity: 640, push_size: 64, push_every_epochs: 5}}
    """

    replay_kinds = ('MemoryBank',)
    key = 'mb_dfkd'

    def backward(self, student: nn.Module, acquire: LossClosure, retain: LossClosure | None) -> dict[str, float]:
        l_acq = acquire(student)
        l_ret = retain(student) if retain is not None else None
        (l_acq if l_ret is None else l_acq + l_ret).backward()
        return _loss_values(l_acq, l_ret)


@register_strategy(key='pre_dfkd')
class PseudoReplay(JointReplay):
    """PRE-DFKD (Binici et al., "Robust and Resource-Efficient Data-Free Knowledge Distillation by Generative Pseudo
    Replay", AAAI 2022): ``∇[L_Acq(θ) + L_Ret(θ)]`` with replay from a VAE of the generated samples.

    The gradient is MB-DFKD's; the memory is :class:`lrwa_plugin.replay.GenerativeReplay`.

    .. code-block:: yaml

        train:
          strategy: 'pre_dfkd'
          data_free:
            replay: {key: 'GenerativeReplay', kwargs: {vae: {key: 'ReplayVAE', kwargs: {nz: 64, img_size: 8, nc: 1}}}}
    """

    replay_kinds = ('GenerativeReplay',)
    key = 'pre_dfkd'


@register_strategy(key='lrwa')
class LearnToRetainWhileAcquiring(Strategy):
    """LRWA (Patel, Mopuri, Qiu, CVPR 2023): ``∇[L_Acq(θ) + L_Ret(θ − α∇L_Acq(θ))]``, see :mod:`lrwa_plugin.meta`.

    Replays from a ``MemoryBank`` (the paper's) or a ``GenerativeReplay`` (its experiments on top of PRE-DFKD).

    Args:
        meta: ``{alpha, backend, order}`` of :class:`lrwa_plugin.meta.RetainWhileAcquire`.

    .. code-block:: yaml

        train:
          strategy: 'lrwa'
          data_free:
            replay: {key: 'MemoryBank', kwargs: {capacity: 640, push_size: 64, push_every_epochs: 5}}
            meta: {alpha: 0.9, backend: 'higher', order: 'second'}
    """

    replay_kinds = ('MemoryBank', 'GenerativeReplay')
    key = 'lrwa'

    def __init__(self, meta: dict[str, Any] | None = None) -> None:
        self.meta = RetainWhileAcquire(**(meta or {}))

    def backward(self, student: nn.Module, acquire: LossClosure, retain: LossClosure | None) -> dict[str, float]:
        l_acq, l_ret = self.meta(student, acquire, retain)
        return _loss_values(l_acq, l_ret)
