"""Strategies: how the student gradient is formed from the acquisition and the retention losses.

One box, one YAML; only ``train.strategy`` differs, and the paper's baselines come for free:

=========  =============================================  ==========================================
strategy   student gradient                               replay memories it accepts (``accepts``)
=========  =============================================  ==========================================
dfad       ∇L_Acq(θ)                                      none
mb_dfkd    ∇[L_Acq(θ) + L_Ret(θ)]                         MemoryBank
pre_dfkd   ∇[L_Acq(θ) + L_Ret(θ)]                         GenerativeReplay
mad        ∇[L_Acq(θ) + L_Ret(θ)]                         MomentumGenerator
lrwa       ∇[L_Acq(θ) + L_Ret(θ − α∇L_Acq(θ))]            any :class:`~lrwa_plugin.replay.ReplayMemory`
=========  =============================================  ==========================================

A strategy names the memories it accepts by type (:attr:`Strategy.accepts`), so a new memory that subclasses an
accepted type needs no edit here. Until the memory holds samples, every strategy falls back to ∇L_Acq. At each
student step the box hands the strategy a :class:`StepClosures`: closures that run a student callable on the current
batch (``acquire``), on the replay batch (``retain``) and on both concatenated (``joint``), each returning the
pipeline's own torchdistill criterion, and the student's current learning rate. The strategy leaves the gradient in
the student's ``.grad`` and returns the loss values; torchdistill's post-forward process then steps the optimizer.

Settings: a strategy's constructor arguments come from ``train.strategy: {key, kwargs}`` (a plain
``strategy: 'key'`` takes none), or, for the strategies that take the meta step (``takes_meta_step = True``), from
``train.data_free.meta``.

.. code-block:: yaml

    train:
      strategy: 'lrwa'
      data_free:
        meta: {alpha: 0.9, backend: 'higher', order: 'second'}
    # the released code's update, one forward of cat(new, replayed) (Patel et al.'s "LRWA" as it trained):
    train:
      strategy: {key: 'mb_dfkd', kwargs: {combine: 'concat'}}
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from .config.checks import choice, finite
from .errors import ConfigError
from .meta import (
    DEFAULT_BACKEND,
    DEFAULT_FD_EPS,
    DEFAULT_INNER_BN,
    DEFAULT_ORDER,
    LossClosure,
    RetainWhileAcquire,
)
from .registry import REPLAY_DICT, STRATEGY_DICT, register_strategy
from .replay import GenerativeReplay, MemoryBank, MomentumGenerator, ReplayMemory

COMBINES = ('sum', 'concat')


@dataclass
class StepClosures:
    """What a strategy is given at one student step.

    Attributes:
        acquire: the criterion on the newly generated batch (L_Acq).
        retain: the criterion on the replay batch (L_Ret); None while the memory holds nothing.
        joint: the criterion on ``cat(new, replayed)``, one forward and one mean over all rows (None without replay).
        lr: the student optimizer's current learning rate (its first parameter group).
        loss_scale: the float16 loss scale (``--amp float16``; 1 otherwise): a strategy backpropagates through
            :meth:`backward`, which applies it (the box unscales the gradients before anything reads them).
    """

    acquire: LossClosure
    retain: LossClosure | None = None
    joint: LossClosure | None = None
    lr: float | None = None
    loss_scale: float = 1.0

    def backward(self, loss: Tensor) -> None:
        """``loss.backward()``, scaled by :attr:`loss_scale` under float16."""
        (loss if self.loss_scale == 1.0 else loss * self.loss_scale).backward()


class Strategy(ABC):
    """A way of forming the student gradient (see the module docstring).

    Attributes:
        key: set by :func:`lrwa_plugin.registry.register_strategy`.
        accepts: the replay memory types it uses; ``()``: it uses none.
        takes_meta_step: whether it takes the meta step: its constructor arguments are then the settings written
            in ``train.data_free.meta`` (otherwise in ``train.strategy.kwargs``).
    """

    key: ClassVar[str]
    accepts: ClassVar[tuple[type[ReplayMemory], ...]] = (ReplayMemory,)
    takes_meta_step: ClassVar[bool] = False

    @abstractmethod
    def backward(self, student: nn.Module, losses: StepClosures) -> dict[str, float]:
        """Accumulates the student gradient into ``.grad``; returns the loss values (``acq``, ``ret``, ...)."""

    @classmethod
    def accepted_keys(cls) -> list[str]:
        """The registered replay memories this strategy accepts."""
        return sorted(key for key, memory in REPLAY_DICT.items() if issubclass(memory, cls.accepts))

    @classmethod
    def check_replay(cls, replay_key: str | None, path: str = 'train.data_free.replay') -> None:
        """Raises :class:`~lrwa_plugin.errors.ConfigError` if the memory ``replay_key`` (None: no ``replay`` block)
        cannot be used with this strategy."""
        if not cls.accepts:
            if replay_key is not None:
                replaying = sorted(key for key, strategy in STRATEGY_DICT.items() if strategy.accepts)
                raise ConfigError(path, f"strategy '{cls.key}' uses no replay memory: remove this block, or choose a "
                                        f"strategy that replays ({', '.join(replaying)})")
            return
        allowed = ', '.join(cls.accepted_keys()) or 'none registered'
        if replay_key is None:
            raise ConfigError(path, f"missing: strategy '{cls.key}' replays from a memory (key one of: {allowed})")
        if not issubclass(REPLAY_DICT[replay_key], cls.accepts):
            raise ConfigError(f'{path}.key', f"'{replay_key}' cannot be used with strategy '{cls.key}'; "
                                             f'allowed: {allowed}')


def loss_values(**losses: Tensor | None) -> dict[str, float]:
    """The given losses as floats (None entries left out)."""
    return {name: float(loss.detach()) for name, loss in losses.items() if loss is not None}


@register_strategy(key='dfad')
class AcquireOnly(Strategy):
    """DFAD (Fang et al., "Data-Free Adversarial Distillation", 2019): the student only acquires, ``∇L_Acq(θ)``.

    No replay: ``train.data_free.replay`` must be absent.

    .. code-block:: yaml

        train: {strategy: 'dfad'}
    """

    accepts = ()

    def backward(self, student: nn.Module, losses: StepClosures) -> dict[str, float]:
        l_acq = losses.acquire(student)
        losses.backward(l_acq)
        return loss_values(acq=l_acq)


@register_strategy(key='mb_dfkd')
class JointReplay(Strategy):
    """MB-DFKD (Binici et al., WACV 2022): ``∇[L_Acq(θ) + L_Ret(θ)]`` on new and replayed samples.

    Args:
        combine: ``'sum'`` (default): two forwards and two criteria, L_Acq on the new batch plus
            ``retain_weight × L_Ret`` on the replay batch, so both weigh alike whatever their sizes. ``'concat'``:
            one forward of ``cat(new, replayed)`` and one criterion over all rows, as the papers' released code does
            (MB-DFKD, PRE-DFKD, and the "LRWA" runs of Patel et al., whose meta step never reached the student:
            ``distill_knowledge_meta7`` in ``src/agents/predfkd_meta_memory.py`` of github.com/gaurav104/LRA). Then
            new and replayed samples weigh by their counts (512 : 64 = 8 : 1 there) and share the BatchNorm batch
            statistics.
        retain_weight: the weight of L_Ret with ``combine: 'sum'`` (>= 0; 1 by default).

    .. code-block:: yaml

        train:
          strategy: 'mb_dfkd'                                       # or {key: 'mb_dfkd', kwargs: {combine: 'concat'}}
          data_free:
            replay: {key: 'MemoryBank', kwargs: {capacity: 640, push_size: 64, push_every_epochs: 5}}
    """

    accepts = (MemoryBank,)

    def __init__(self, combine: str = 'sum', retain_weight: float = 1.0) -> None:
        self.combine = choice(combine, COMBINES, 'combine')
        self.retain_weight = finite(retain_weight, 'retain_weight', low=0, low_open=False)
        if self.combine == 'concat' and self.retain_weight != 1.0:
            raise ConfigError('retain_weight', "is not used with combine 'concat' (new and replayed rows weigh by "
                                               'their counts)')

    def backward(self, student: nn.Module, losses: StepClosures) -> dict[str, float]:
        if losses.retain is None:
            l_acq = losses.acquire(student)
            losses.backward(l_acq)
            return loss_values(acq=l_acq)
        if self.combine == 'concat':
            l_joint = losses.joint(student)
            losses.backward(l_joint)
            return loss_values(joint=l_joint)
        l_acq = losses.acquire(student)
        l_ret = losses.retain(student)
        losses.backward(l_acq + (l_ret if self.retain_weight == 1.0 else self.retain_weight * l_ret))
        return loss_values(acq=l_acq, ret=l_ret)


@register_strategy(key='pre_dfkd')
class PseudoReplay(JointReplay):
    """PRE-DFKD (Binici et al., "Robust and Resource-Efficient Data-Free Knowledge Distillation by Generative Pseudo
    Replay", AAAI 2022): ``∇[L_Acq(θ) + L_Ret(θ)]`` with replay from a VAE of the generated samples.

    The gradient is MB-DFKD's (``combine`` too); the memory is :class:`lrwa_plugin.replay.GenerativeReplay`.

    .. code-block:: yaml

        train:
          strategy: 'pre_dfkd'
          data_free:
            replay: {key: 'GenerativeReplay', kwargs: {vae: {key: 'ReplayVAE', kwargs: {nz: 64, img_size: 8, nc: 1}}}}
    """

    accepts = (GenerativeReplay,)


@register_strategy(key='mad')
class MomentumReplay(JointReplay):
    """MAD (Do, Le, Nguyen, Nguyen, Harikumar, Tran, Rana, Venkatesh, "Momentum Adversarial Distillation: Handling
    Large Distribution Shifts in Data-Free Knowledge Distillation", NeurIPS 2022): ``∇[L_Acq(θ) + w L_Ret(θ)]`` with
    L_Ret on samples of an exponential moving average of the generator.

    The gradient is MB-DFKD's (``combine``, ``retain_weight``); the memory is
    :class:`lrwa_plugin.replay.MomentumGenerator`. With ``strategy: 'lrwa'`` the same memory gives the
    retain-while-acquire step on the momentum generator's samples.

    .. code-block:: yaml

        train:
          strategy: 'mad'
          data_free:
            replay: {key: 'MomentumGenerator', kwargs: {momentum: 0.95, batch_size: 64}}
    """

    accepts = (MomentumGenerator,)


@register_strategy(key='lrwa')
class LearnToRetainWhileAcquiring(Strategy):
    """LRWA (Patel, Mopuri, Qiu, CVPR 2023): ``∇[L_Acq(θ) + L_Ret(θ − α∇L_Acq(θ))]``, see :mod:`lrwa_plugin.meta`.

    Replays from any memory: a ``MemoryBank`` (the paper's), a ``GenerativeReplay`` (its experiments on top of
    PRE-DFKD), or another registered one. Its settings are ``train.data_free.meta``.

    Args:
        alpha: a constant inner step α (> 0).
        alpha_per_lr: instead of ``alpha``, ``c`` with α = c × the student optimizer's current learning rate at every
            student step, so the virtual step shrinks with the schedule (> 0). Exactly one of the two.
        backend, order, inner_bn, fd_eps: of :class:`lrwa_plugin.meta.RetainWhileAcquire`.

    .. code-block:: yaml

        train:
          strategy: 'lrwa'
          data_free:
            replay: {key: 'MemoryBank', kwargs: {capacity: 640, push_size: 64, push_every_epochs: 5}}
            meta: {alpha_per_lr: 1.0, backend: 'higher', order: 'second', inner_bn: 'update'}
    """

    takes_meta_step = True

    def __init__(self, alpha: float | None = None, alpha_per_lr: float | None = None,
                 backend: str = DEFAULT_BACKEND, order: str = DEFAULT_ORDER, inner_bn: str = DEFAULT_INNER_BN,
                 fd_eps: float = DEFAULT_FD_EPS) -> None:
        if (alpha is None) == (alpha_per_lr is None):
            raise ConfigError('alpha', "give exactly one of alpha (a constant inner step) and alpha_per_lr (α = "
                                       "alpha_per_lr × the student's learning rate)")
        self.alpha_per_lr = None if alpha_per_lr is None else finite(alpha_per_lr, 'alpha_per_lr', low=0)
        self.meta = RetainWhileAcquire(alpha, backend=backend, order=order, inner_bn=inner_bn, fd_eps=fd_eps)

    @classmethod
    def check_config(cls, kwargs: dict[str, Any], config: Any) -> None:
        """A setting the chosen order does not read is a mistake: ``fd_eps`` is only read by ``finite_difference``."""
        order = kwargs.get('order', DEFAULT_ORDER)
        if 'fd_eps' in kwargs and order != 'finite_difference':
            raise ConfigError('fd_eps', f"is only read with order 'finite_difference', not {order!r}: remove it, or "
                                        "set order: 'finite_difference'")

    def alpha(self, lr: float | None) -> float:
        """This step's α: the constant, or ``alpha_per_lr × lr``."""
        if self.alpha_per_lr is None:
            return self.meta.alpha
        if lr is None:
            raise ValueError("meta: alpha_per_lr needs the student's learning rate at every step")
        return self.alpha_per_lr * lr

    def backward(self, student: nn.Module, losses: StepClosures) -> dict[str, float]:
        alpha = self.alpha(losses.lr)
        l_acq, l_ret = self.meta(student, losses.acquire, losses.retain, alpha=alpha, loss_scale=losses.loss_scale)
        return loss_values(acq=l_acq, ret=l_ret)
