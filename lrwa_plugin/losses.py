"""Losses of adversarial data-free distillation, registered as torchdistill mid-level losses.

Each term reads torchdistill's I/O dicts (``io_dict[module_path][io]``; ``'.'`` is the model's own output), so any
of them can be a ``sub_terms`` entry of torchdistill's ``WeightedSumLoss``: the student criterion of the pipeline,
or the generator criterion under ``train.data_free.generator.criterion``.

Student side (knowledge acquisition and retention, Patel, Mopuri, Qiu, CVPR 2023):
``LogitsL1Loss`` — the L1 distance between student and teacher logits of DFAD (Fang et al., 2019) and the paper.

Generator side (minimised by the generator):
``AdversarialLoss`` (−discrepancy, L1 | KL | JS: the generator seeks samples the student gets wrong, DFAD and
PRE-DFKD), ``BNStatMatchingLoss`` (DeepInversion, Yin et al., CVPR 2020), ``OneHotLoss``, ``InformationEntropyLoss``
and ``ActivationNormLoss`` (DAFL, Chen et al., ICCV 2019).

.. code-block:: yaml

    criterion:
      key: 'WeightedSumLoss'
      kwargs:
        sub_terms:
          adv: {criterion: {key: 'AdversarialLoss', kwargs: {kind: 'l1'}}, weight: 1.0}
          bn: {criterion: {key: 'BNStatMatchingLoss', kwargs: {}}, weight: 10.0}
          onehot: {criterion: {key: 'OneHotLoss', kwargs: {}}, weight: 1.0}
          ie: {criterion: {key: 'InformationEntropyLoss', kwargs: {}}, weight: 5.0}
          act: {criterion: {key: 'ActivationNormLoss', kwargs: {}}, weight: 0.1}   # needs the teacher's fc hook
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torchdistill.common.constant import SELF_MODULE_PATH
from torchdistill.losses.registry import register_mid_level_loss

from .config.checks import choice, finite
from .errors import ConfigError

#: Where the box puts the teacher's BatchNorm statistics in the teacher I/O dict during a generator step.
BN_STATS_PATH = 'bn_stats'


def _logits(io_dict: dict[str, dict[str, Any]], module_path: str, io: str) -> Tensor:
    return io_dict[module_path][io]


class _TeacherStudentLoss(nn.Module):
    """Base of the losses that compare a student tensor with a teacher tensor of the I/O dicts."""

    def __init__(self, student_module_path: str = SELF_MODULE_PATH, student_module_io: str = 'output',
                 teacher_module_path: str = SELF_MODULE_PATH, teacher_module_io: str = 'output') -> None:
        super().__init__()
        self.student_module_path, self.student_module_io = student_module_path, student_module_io
        self.teacher_module_path, self.teacher_module_io = teacher_module_path, teacher_module_io

    def pair(self, student_io_dict: dict, teacher_io_dict: dict) -> tuple[Tensor, Tensor]:
        return (_logits(student_io_dict, self.student_module_path, self.student_module_io),
                _logits(teacher_io_dict, self.teacher_module_path, self.teacher_module_io))


@register_mid_level_loss
class LogitsL1Loss(_TeacherStudentLoss):
    """Mean absolute difference between student and teacher logits, ``mean |s − t|`` (the paper's L_Acq / L_Ret).

    The teacher logits are treated as constants.

    .. code-block:: yaml

        l1: {criterion: {key: 'LogitsL1Loss', kwargs: {}}, weight: 1.0}
    """

    def forward(self, student_io_dict: dict, teacher_io_dict: dict, *args: Any, **kwargs: Any) -> Tensor:
        student_logits, teacher_logits = self.pair(student_io_dict, teacher_io_dict)
        return F.l1_loss(student_logits, teacher_logits.detach())


ADVERSARIAL_KINDS = ('l1', 'kl', 'js')

#: Probabilities are clamped to this range before their logarithm is taken ('js'): an underflowed softmax entry
#: would otherwise give ``0 * log 0 = nan`` in the value or the gradient.
JS_CLAMP = (1e-7, 1.0)


def kl_discrepancy(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``T² · mean_i KL(softmax(t_i/T) ‖ softmax(s_i/T))``: teacher → student, as Hinton et al.'s KD term."""
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_q, log_p, reduction='batchmean', log_target=True) * temperature ** 2


def js_discrepancy(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
                   clamp: tuple[float, float] = JS_CLAMP) -> Tensor:
    """``mean_i ½ KL(p_i ‖ m_i) + ½ KL(q_i ‖ m_i)``, ``m = (p + q)/2``, ``p``/``q`` teacher/student at temperature T.

    ``p``, ``q`` and ``m`` are clamped to ``clamp`` before the logarithms (the weights in front of them are not).
    """
    p = F.softmax(teacher_logits / temperature, dim=1)
    q = F.softmax(student_logits / temperature, dim=1)
    m = 0.5 * (p + q)
    low, high = clamp
    log_p, log_q, log_m = (torch.log(v.clamp(low, high)) for v in (p, q, m))
    return (0.5 * (p * (log_p - log_m)).sum(dim=1) + 0.5 * (q * (log_q - log_m)).sum(dim=1)).mean()


@register_mid_level_loss
class AdversarialLoss(_TeacherStudentLoss):
    """The generator's adversarial term: the negative teacher–student discrepancy ``−D(t, s)`` (DFAD).

    Minimising it drives the generator towards samples on which the student disagrees with the teacher. Both sides
    keep their gradient: the generator reaches ``x`` through the teacher and through the student.

    * ``'l1'``: ``D = mean |s − t|`` over all logits (DFAD, Fang et al., 2019; MB-DFKD; the LRWA paper).
    * ``'kl'``: ``D = T² · mean_i KL(softmax(t_i/T) ‖ softmax(s_i/T))``, teacher → student, summed over classes and
      averaged over the batch; the factor ``T²`` (Hinton et al., 2015) keeps the gradient's scale roughly independent
      of T.
    * ``'js'``: ``D = mean_i JS(p_i, q_i) = ½ KL(p ‖ m) + ½ KL(q ‖ m)``, ``m = (p + q)/2``, ``p``/``q`` the
      teacher/student softmax at temperature T (the PRE-DFKD generator, Binici et al., AAAI 2022, with T = 3; the
      LRWA code reuses it). The probabilities are clamped to ``clamp`` (default ``[1e-7, 1]``) before the logs, so a
      saturated softmax gives a finite value and gradient. No factor ``T²``. Differences from the released
      PRE-DFKD/LRWA function ``JS_divergence``, which is kept out on purpose: it clamps to ``[0.01, 0.99]`` (set
      ``clamp: [0.01, 0.99]`` to match), computes ``D' = ½ KL(m ‖ p) + ½ KL(m ‖ q)`` (the arguments of
      ``nn.KLDivLoss`` are swapped, so it is not the Jensen–Shannon divergence), averages over batch *and* classes,
      and returns ``1 − clamp(D', 0, 1)`` (the gradient of ``−D'`` while ``0 < D' < 1``).

    Args:
        kind: discrepancy; ``'l1'``, ``'kl'`` or ``'js'``.
        temperature: softmax temperature T of ``'kl'`` and ``'js'`` (ignored by ``'l1'``).
        clamp: ``[min, max]`` of the probabilities before the logs of ``'js'``.
        **kwargs: the module paths of :class:`LogitsL1Loss` (default: both models' own output).

    .. code-block:: yaml

        adv: {criterion: {key: 'AdversarialLoss', kwargs: {kind: 'l1'}}, weight: 1.0}
        adv: {criterion: {key: 'AdversarialLoss', kwargs: {kind: 'kl', temperature: 4.0}}, weight: 1.0}
        adv: {criterion: {key: 'AdversarialLoss', kwargs: {kind: 'js', temperature: 3.0}}, weight: 1.0}
    """

    def __init__(self, kind: str = 'l1', temperature: float = 1.0, clamp: tuple[float, float] | list[float] = JS_CLAMP,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        choice(kind, ADVERSARIAL_KINDS, 'kind')
        finite(temperature, 'temperature', positive=True)
        if len(clamp) != 2 or not 0 < clamp[0] < clamp[1] <= 1:
            raise ConfigError('clamp', f'expected [min, max] with 0 < min < max <= 1, got {clamp}')
        self.kind, self.temperature, self.clamp = kind, float(temperature), (float(clamp[0]), float(clamp[1]))

    def forward(self, student_io_dict: dict, teacher_io_dict: dict, *args: Any, **kwargs: Any) -> Tensor:
        student_logits, teacher_logits = self.pair(student_io_dict, teacher_io_dict)
        if self.kind == 'kl':
            return -kl_discrepancy(student_logits, teacher_logits, self.temperature)
        if self.kind == 'js':
            return -js_discrepancy(student_logits, teacher_logits, self.temperature, self.clamp)
        return -F.l1_loss(student_logits, teacher_logits)


@register_mid_level_loss
class ActivationNormLoss(nn.Module):
    """Activation loss of DAFL (Chen et al., "Data-Free Learning of Student Networks", ICCV 2019): ``−mean |f|``.

    ``f`` are teacher features on the generated batch, by default the input of the teacher's final linear layer
    (DAFL's ``f_T``): real images excite the teacher's features strongly, so the generator is pushed towards large
    activations. The mean is over the batch *and* the feature dimension, as in the DAFL/PRE-DFKD/LRWA code (the
    paper's ``−(1/n) Σ_i ‖f_i‖₁`` divided by the feature size, which only rescales the weight).

    The features come from torchdistill's forward hook, so the teacher must declare it under ``train.teacher``; a
    missing hook is a ``KeyError`` that says so.

    Args:
        teacher_module_path: teacher module whose input or output is ``f`` (``'fc'`` for timm ResNets and the digits
            CNNs; ``'head.fc'`` or ``'classifier'`` for other timm models).
        teacher_module_io: ``'input'`` or ``'output'``.

    .. code-block:: yaml

        train:
          teacher:
            forward_proc: 'forward_batch_only'
            requires_grad: False
            forward_hook: {input: ['fc'], output: []}
          data_free:
            generator:
              criterion:
                key: 'WeightedSumLoss'
                kwargs:
                  sub_terms:
                    act: {criterion: {key: 'ActivationNormLoss',
                                      kwargs: {teacher_module_path: 'fc', teacher_module_io: 'input'}}, weight: 0.1}
    """

    def __init__(self, teacher_module_path: str = 'fc', teacher_module_io: str = 'input') -> None:
        super().__init__()
        self.teacher_module_path, self.teacher_module_io = teacher_module_path, teacher_module_io

    def forward(self, student_io_dict: dict, teacher_io_dict: dict, *args: Any, **kwargs: Any) -> Tensor:
        features = teacher_io_dict.get(self.teacher_module_path, {}).get(self.teacher_module_io)
        if features is None:
            path, io = self.teacher_module_path, self.teacher_module_io
            raise KeyError(f"ActivationNormLoss needs the teacher's '{path}' {io}: add "
                           f"forward_hook: {{{io}: ['{path}']}} under train.teacher")
        return -features.abs().mean()


@register_mid_level_loss
class OneHotLoss(nn.Module):
    """Cross-entropy of the teacher's logits against their own argmax (DAFL): samples the teacher is sure of.

    .. code-block:: yaml

        onehot: {criterion: {key: 'OneHotLoss', kwargs: {}}, weight: 1.0}
    """

    def __init__(self, teacher_module_path: str = SELF_MODULE_PATH, teacher_module_io: str = 'output') -> None:
        super().__init__()
        self.teacher_module_path, self.teacher_module_io = teacher_module_path, teacher_module_io

    def forward(self, student_io_dict: dict, teacher_io_dict: dict, *args: Any, **kwargs: Any) -> Tensor:
        logits = _logits(teacher_io_dict, self.teacher_module_path, self.teacher_module_io)
        return F.cross_entropy(logits, logits.argmax(dim=1))


@register_mid_level_loss
class InformationEntropyLoss(nn.Module):
    """Negative entropy of the batch-mean teacher prediction, ``Σ_k p̄_k log p̄_k`` (DAFL): balances the classes.

    Natural logarithm; the DAFL/PRE-DFKD/LRWA code uses ``log10``, i.e. this term times ``1/ln 10`` (scale the weight).

    .. code-block:: yaml

        ie: {criterion: {key: 'InformationEntropyLoss', kwargs: {}}, weight: 5.0}
    """

    def __init__(self, teacher_module_path: str = SELF_MODULE_PATH, teacher_module_io: str = 'output') -> None:
        super().__init__()
        self.teacher_module_path, self.teacher_module_io = teacher_module_path, teacher_module_io

    def forward(self, student_io_dict: dict, teacher_io_dict: dict, *args: Any, **kwargs: Any) -> Tensor:
        logits = _logits(teacher_io_dict, self.teacher_module_path, self.teacher_module_io)
        mean_prob = logits.softmax(dim=1).mean(dim=0)
        return (mean_prob * torch.log(mean_prob.clamp_min(1e-12))).sum()


@register_mid_level_loss
class BNStatMatchingLoss(nn.Module):
    """BatchNorm-statistics matching (DeepInversion): ``Σ_l ‖μ_l(x) − μ_l^run‖₂ + ‖σ²_l(x) − σ²_l^run‖₂``.

    ``μ_l(x)``, ``σ²_l(x)`` are the per-channel mean and (biased) variance of the input of the teacher's BatchNorm
    layer ``l`` on the generated batch; the running statistics are the teacher's. The box collects them with
    :class:`TeacherBNStatistics` and places them at ``teacher_io_dict['bn_stats']['output']``.

    .. code-block:: yaml

        bn: {criterion: {key: 'BNStatMatchingLoss', kwargs: {}}, weight: 10.0}
    """

    def forward(self, student_io_dict: dict, teacher_io_dict: dict, *args: Any, **kwargs: Any) -> Tensor:
        if BN_STATS_PATH not in teacher_io_dict:
            raise KeyError('BNStatMatchingLoss needs the teacher BatchNorm statistics that the data-free box '
                           'collects; it is a generator loss (train.data_free.generator.criterion)')
        stats = teacher_io_dict[BN_STATS_PATH]['output']
        if len(stats) == 0:
            raise ValueError('BNStatMatchingLoss: the teacher has no BatchNorm layer with running statistics')
        return sum(torch.linalg.vector_norm(mean - run_mean) + torch.linalg.vector_norm(var - run_var)
                   for mean, var, run_mean, run_var in stats)


class TeacherBNStatistics:
    """Forward hooks on every BatchNorm layer of the teacher that record the statistics of its input.

    Only while :attr:`enabled` (the generator step): the student steps run the teacher without paying for it.
    """

    def __init__(self, teacher: nn.Module) -> None:
        self.enabled = False
        self._stats: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        self._handles = [module.register_forward_hook(self._hook) for module in teacher.modules()
                         if isinstance(module, _BatchNorm) and module.track_running_stats]

    def __len__(self) -> int:
        return len(self._handles)

    def _hook(self, module: _BatchNorm, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if not self.enabled:
            return
        x = inputs[0]
        if x.dtype in (torch.float16, torch.bfloat16):  # mixed precision: the statistics in float32
            x = x.float()
        dims = [0] + list(range(2, x.dim()))
        var, mean = torch.var_mean(x, dim=dims, unbiased=False)
        self._stats.append((mean, var, module.running_mean, module.running_var))

    def pop(self) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Returns the statistics recorded since the last call and forgets them."""
        stats, self._stats = self._stats, []
        return stats

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
