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


# ---------------------------------------------------------------------------------- AdversarialLoss kl / js
# One row, two classes: teacher p = [1/4, 3/4] (logits [0, ln 3]), student q = [1/2, 1/2] (logits [0, 0]).
P, Q, M = (0.25, 0.75), (0.5, 0.5), (0.375, 0.625)
KL_PQ = sum(p * math.log(p / q) for p, q in zip(P, Q))
JS_PQ = 0.5 * sum(p * math.log(p / m) for p, m in zip(P, M)) + 0.5 * sum(q * math.log(q / m) for q, m in zip(Q, M))


def two_class(temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits whose softmax at ``temperature`` is Q and P."""
    return torch.zeros(1, 2), torch.tensor([[0.0, temperature * math.log(3.0)]])


@pytest.mark.parametrize('temperature', [1.0, 2.0])
def test_adversarial_kl_is_minus_t_squared_kl_teacher_to_student(temperature):
    student, teacher = two_class(temperature)
    value = loss('AdversarialLoss', kind='kl', temperature=temperature)(io(student), io(teacher))
    assert value.item() == pytest.approx(-temperature ** 2 * KL_PQ, rel=1e-5)
    kl_qp = sum(q * math.log(q / p) for p, q in zip(P, Q))  # the other direction differs: the test tells them apart
    assert abs(kl_qp - KL_PQ) > 1e-2


def test_adversarial_kl_averages_rows_and_reaches_both_sides():
    student, teacher = two_class(1.0)
    student = torch.cat([student, torch.zeros(1, 2)]).requires_grad_()  # a second row with KL 0
    teacher = torch.cat([teacher, torch.zeros(1, 2)]).requires_grad_()
    value = loss('AdversarialLoss', kind='kl')(io(student), io(teacher))
    assert value.item() == pytest.approx(-KL_PQ / 2, rel=1e-5)
    value.backward()
    assert teacher.grad.abs().sum() > 0 and student.grad.abs().sum() > 0


@pytest.mark.parametrize('temperature', [1.0, 3.0])
def test_adversarial_js_is_minus_jensen_shannon_at_temperature(temperature):
    student, teacher = two_class(temperature)
    value = loss('AdversarialLoss', kind='js', temperature=temperature)(io(student), io(teacher))
    assert value.item() == pytest.approx(-JS_PQ, rel=1e-5)
    swapped = loss('AdversarialLoss', kind='js', temperature=temperature)(io(teacher), io(student))
    assert swapped.item() == pytest.approx(value.item(), rel=1e-5)  # symmetric, unlike KL


@pytest.mark.parametrize('clamp, q_logs', [
    ((1e-7, 1.0), (math.log(1e-7), 0.0)),
    ((0.01, 0.99), (math.log(0.01), math.log(0.99))),  # the released PRE-DFKD/LRWA range
])
def test_adversarial_js_clamps_probabilities_before_the_logs(clamp, q_logs):
    # The student's softmax underflows to exactly [0, 1] in float32: without the clamp, 0 * log 0 = nan.
    student = torch.tensor([[0.0, 200.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, math.log(3.0)]], requires_grad=True)
    q = student.softmax(dim=1)
    assert q[0, 0].item() == 0.0
    naive_m = 0.5 * (q + teacher.softmax(dim=1))
    assert torch.isnan((q * (q.log() - naive_m.log())).sum())
    value = loss('AdversarialLoss', kind='js', clamp=list(clamp))(io(student), io(teacher))
    m = (0.125, 0.875)  # (p + q)/2, inside both clamp ranges
    p_logs = tuple(math.log(min(max(v, clamp[0]), clamp[1])) for v in P)
    expected = 0.5 * sum(p * (lp - math.log(mv)) for p, lp, mv in zip(P, p_logs, m)) \
        + 0.5 * (0.0 * (q_logs[0] - math.log(m[0])) + 1.0 * (q_logs[1] - math.log(m[1])))
    assert value.item() == pytest.approx(-expected, rel=1e-5)
    value.backward()
    assert torch.isfinite(student.grad).all() and torch.isfinite(teacher.grad).all()


@pytest.mark.parametrize('kwargs, match', [
    ({'kind': 'kl', 'temperature': 0.0}, 'temperature'),
    ({'kind': 'js', 'clamp': [0.0, 1.0]}, 'clamp'),
    ({'kind': 'js', 'clamp': [0.5, 0.1]}, 'clamp'),
])
def test_adversarial_rejects_bad_temperature_and_clamp(kwargs, match):
    with pytest.raises(ValueError, match=match):
        loss('AdversarialLoss', **kwargs)


# --------------------------------------------------------------------------------------- ActivationNormLoss
def test_activation_norm_is_minus_mean_absolute_feature():
    features = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    value = loss('ActivationNormLoss')(io(STUDENT), {'fc': {'input': features}})
    assert value.item() == pytest.approx(-(1 + 2 + 3 + 0) / 4)


def test_activation_norm_reads_torchdistill_forward_hook_on_fc_input():
    from torchdistill.core.forward_hook import ForwardHookManager
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module('body', nn.Linear(3, 4))
    net.add_module('fc', nn.Linear(4, 2))
    x = torch.randn(5, 3, requires_grad=True)
    manager = ForwardHookManager(torch.device('cpu'))
    manager.add_hook(net, 'fc', requires_input=True, requires_output=False)
    net(x)
    value = loss('ActivationNormLoss', teacher_module_path='fc', teacher_module_io='input')(
        io(STUDENT), manager.pop_io_dict())
    assert value.item() == pytest.approx(-net.body(x).abs().mean().item(), rel=1e-6)
    value.backward()  # the generator reaches x through the hooked features
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_activation_norm_without_the_hook_says_how_to_add_it():
    with pytest.raises(KeyError, match=r"forward_hook: \{input: \['fc'\]\} under train.teacher"):
        loss('ActivationNormLoss')(io(STUDENT), io(TEACHER))


# ----------------------------------------------------------------------------- every term from its YAML block
@pytest.mark.parametrize('key, kwargs, student, teacher_io, expected', [
    ('AdversarialLoss', {'kind': 'l1'}, STUDENT, io(TEACHER), -7 / 6),
    ('AdversarialLoss', {'kind': 'kl', 'temperature': 2.0}, torch.zeros(1, 2), io(two_class(2.0)[1]), -4 * KL_PQ),
    ('AdversarialLoss', {'kind': 'js', 'temperature': 3.0}, torch.zeros(1, 2), io(two_class(3.0)[1]), -JS_PQ),
    ('OneHotLoss', {}, STUDENT, io(torch.tensor([[2.0, 0.0]])), math.log(1 + math.exp(-2.0))),
    ('InformationEntropyLoss', {}, STUDENT, io(torch.tensor([[50.0, 0.0], [0.0, 50.0]])), -math.log(2)),
    ('ActivationNormLoss', {'teacher_module_path': 'fc', 'teacher_module_io': 'input'}, STUDENT,
     {'fc': {'input': torch.tensor([[-2.0, 4.0]])}}, -3.0),
])
def test_each_generator_term_in_a_weighted_sum_from_yaml(key, kwargs, student, teacher_io, expected):
    criterion = get_high_level_loss({'key': 'WeightedSumLoss', 'kwargs': {'sub_terms': {
        'term': {'criterion': {'key': key, 'kwargs': kwargs}, 'weight': 0.5}}}})
    total = criterion({'student': io(student), 'teacher': teacher_io}, {}, None)
    assert total.item() == pytest.approx(0.5 * expected, rel=1e-5, abs=1e-6)
