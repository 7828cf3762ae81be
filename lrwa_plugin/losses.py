"""Losses of adversarial data-free distillation, registered as torchdistill mid-level losses.

Each term reads torchdistill's I/O dicts (``io_dict[module_path][io]``; ``'.'`` is the model's own output), so any
of them can be a ``sub_terms`` entry of torchdistill's ``WeightedSumLoss``: the student criterion of the pipeline,
or the generator criterion under ``train.data_free.generator.criterion``.

Student side (knowledge acquisition and retention, Patel, Mopuri, Qiu, CVPR 2023):
``LogitsL1Loss`` — the L1 distance between student and teacher logits of DFAD (Fang et al., 2019) and the paper.

Generator side (minimised by the generator):
``AdversarialLoss`` (−discrepancy: the generator seeks samples the student gets wrong, DFAD),
``BNStatMatchingLoss`` (DeepInversion, Yin et al., CVPR 2020), ``OneHotLoss`` and ``InformationEntropyLoss``
(DAFL, Chen et al., ICCV 2019).

.. code-block:: yaml

    criterion:
      key: 'WeightedSumLoss'
      kwargs:
        sub_terms:
          adv: {criterion: {key: 'AdversarialLoss', kwargs: {kind: 'l1'}}, weight: 1.0}
          bn: {criterion: {key: 'BNStatMatchingLoss', kwargs: {}}, weight: 10.0}
          onehot: {criterion: {key: 'OneHotLoss', kwargs: {}}, weight: 1.0}
          ie: {criterion: {key: 'InformationEntropyLoss', kwargs: {}}, weight: 5.0}
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torchdistill.common.constant import SELF_MODULE_PATH
from torchdistill.losses.registry import register_mid_level_loss

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


ADVERSARIAL_KINDS = ('l1',)


@register_mid_level_loss
class AdversarialLoss(_TeacherStudentLoss):
    """The generator's adversarial term: the negative teacher–student discrepancy ``−mean |s − t|`` (DFAD).

    Minimising it drives the generator towards samples on which the student disagrees with the teacher.

    Args:
        kind: discrepancy; ``'l1'``.

    .. code-block:: yaml

        adv: {criterion: {key: 'AdversarialLoss', kwargs: {kind: 'l1'}}, weight: 1.0}
    """

    def __init__(self, kind: str = 'l1', **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if kind not in ADVERSARIAL_KINDS:
            raise ValueError(f"AdversarialLoss: kind '{kind}' is not one of {', '.join(ADVERSARIAL_KINDS)}")
        self.kind = kind

    def forward(self, student_io_dict: dict, teacher_io_dict: dict, *args: Any, **kwargs: Any) -> Tensor:
        student_logits, teacher_logits = self.pair(student_io_dict, teacher_io_dict)
        return -F.l1_loss(student_logits, teacher_logits)


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
