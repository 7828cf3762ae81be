"""Hand-computed values of the registered losses on tiny inputs."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchdistill.losses.registry import get_high_level_loss, get_mid_level_loss

from lrwa_plugin.losses import BN_STATS_PATH, BNStatMatchingLoss, TeacherBNStatistics

STUDENT = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
TEACHER = torch.tensor([[0.0, 2.0, 2.0], [1.0, 0.0, 0.0]])


def io(logits: torch.Tensor) -> dict:
    return {'.': {'output': logits}}


def loss(key: str, **kwargs) -> nn.Module:
    return get_mid_level_loss({'key': key, 'kwargs': kwargs})


def test_logits_l1_is_mean_absolute_difference():
    # |1|+|0|+|2| + |1|+|0|+|3| = 7 over 6 entries
    assert loss('LogitsL1Loss')(io(STUDENT), io(TEACHER)).item() == pytest.approx(7 / 6)


def test_logits_l1_treats_teacher_as_constant():
    student, teacher = STUDENT.clone().requires_grad_(), TEACHER.clone().requires_grad_()
    loss('LogitsL1Loss')(io(student), io(teacher)).backward()
    assert teacher.grad is None and student.grad is not None


def test_adversarial_is_negative_l1_and_reaches_both_sides():
    student, teacher = STUDENT.clone().requires_grad_(), TEACHER.clone().requires_grad_()
    value = loss('AdversarialLoss', kind='l1')(io(student), io(teacher))
    assert value.item() == pytest.approx(-7 / 6)
    value.backward()
    assert teacher.grad is not None and student.grad is not None


def test_adversarial_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind 'kl2'"):
        loss('AdversarialLoss', kind='kl2')


def test_one_hot_is_cross_entropy_against_teacher_argmax():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    expected = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-1.0))) / 2
    assert loss('OneHotLoss')(io(STUDENT), io(logits)).item() == pytest.approx(expected)


def test_information_entropy_is_negative_entropy_of_mean_prediction():
    # mean prediction of two opposite confident rows is uniform over 2 classes: -log 2 (its minimum)
    balanced = torch.tensor([[50.0, 0.0], [0.0, 50.0]])
    skewed = torch.tensor([[50.0, 0.0], [50.0, 0.0]])
    term = loss('InformationEntropyLoss')
    assert term(io(STUDENT), io(balanced)).item() == pytest.approx(-math.log(2), abs=1e-6)
    assert term(io(STUDENT), io(skewed)).item() == pytest.approx(0.0, abs=1e-6)


def _bn_teacher() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    net(torch.randn(5, 2, 4, 4))
    return net.eval()


def test_bn_statistics_collected_only_when_enabled_and_loss_matches_by_hand():
    teacher = _bn_teacher()
    bn = teacher[1]
    bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
    bn.running_var.copy_(torch.tensor([1.0, 2.0, 0.5]))
    stats = TeacherBNStatistics(teacher)
    x = torch.randn(6, 2, 4, 4)
    teacher(x)
    assert stats.pop() == []
    stats.enabled = True
    teacher(x)
    recorded = stats.pop()
    assert len(recorded) == 1
    features = teacher[0](x)
    mean = features.mean(dim=(0, 2, 3))
    var = features.var(dim=(0, 2, 3), unbiased=False)
    expected = (mean - bn.running_mean).norm() + (var - bn.running_var).norm()
    value = BNStatMatchingLoss()(io(STUDENT), {BN_STATS_PATH: {'output': recorded}})
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    stats.remove()
    stats.enabled = True
    teacher(x)
    assert stats.pop() == []


def test_bn_loss_is_zero_when_batch_has_the_running_statistics():
    teacher = _bn_teacher()
    x = torch.randn(8, 2, 4, 4)
    features = teacher[0](x).detach()
    teacher[1].running_mean.copy_(features.mean(dim=(0, 2, 3)))
    teacher[1].running_var.copy_(features.var(dim=(0, 2, 3), unbiased=False))
    stats = TeacherBNStatistics(teacher)
    stats.enabled = True
    teacher(x)
    value = BNStatMatchingLoss()(io(STUDENT), {BN_STATS_PATH: {'output': stats.pop()}})
    assert value.item() == pytest.approx(0.0, abs=1e-5)


def test_bn_loss_without_statistics_says_where_it_belongs():
    with pytest.raises(KeyError, match='generator'):
        BNStatMatchingLoss()(io(STUDENT), io(TEACHER))


def test_generator_terms_combine_in_torchdistill_weighted_sum():
    criterion = get_high_level_loss({'key': 'WeightedSumLoss', 'kwargs': {'sub_terms': {
        'adv': {'criterion': {'key': 'AdversarialLoss', 'kwargs': {}}, 'weight': 2.0},
        'onehot': {'criterion': {'key': 'OneHotLoss', 'kwargs': {}}, 'weight': 0.5},
    }}})
    total = criterion({'student': io(STUDENT), 'teacher': io(TEACHER)}, {}, None)
    expected = 2.0 * (-7 / 6) + 0.5 * loss('OneHotLoss')(io(STUDENT), io(TEACHER)).item()
    assert total.item() == pytest.approx(expected)
