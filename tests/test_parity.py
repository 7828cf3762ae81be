"""Released-code parity: what the paper's released "LRWA" step really does, reproduced bit for bit, and the
``*_released.yaml`` configs that train as the released code trained."""
from __future__ import annotations

import copy
from pathlib import Path

import higher
import pytest
import torch
import yaml
from conftest import DIGITS_CONFIGS, ROOT, SHORT_RUN, write_config
from torch.nn import functional as F
from torchdistill.common import yaml_util
from torchdistill.models.registry import get_model

from lrwa_plugin.box import DataFreeDistillationBox

CONFIGS = ROOT / 'examples' / 'configs'


def build_box(tmp_path: Path, name: str) -> DataFreeDistillationBox:
    config = yaml_util.load_yaml_file(str(write_config(DIGITS_CONFIGS / f'{name}.yaml', tmp_path / 'box.yaml',
                                                       SHORT_RUN)))
    torch.manual_seed(0)
    models = config['models']
    teacher = get_model(models['teacher_model']['key'], **models['teacher_model']['kwargs'])
    student = get_model(models['student_model']['key'], **models['student_model']['kwargs'])
    return DataFreeDistillationBox(teacher, student, config['datasets'], config['train'], torch.device('cpu'),
                                   None, False)


def released_step(student: torch.nn.Module, teacher: torch.nn.Module, x: torch.Tensor, x_m: torch.Tensor) -> None:
    """``distill_knowledge_meta7`` of github.com/gaurav104/LRA (src/agents/predfkd_meta_memory.py), line for line:
    higher's innerloop_ctx with its defaults and the lr_S_in 0.9 inner SGD with momentum and weight decay, the
    retention loss after the inner step, and the extra forward of the concatenated batch."""
    optimizer_inner = torch.optim.SGD(student.parameters(), lr=0.9, momentum=0.9, weight_decay=5e-4)
    with torch.no_grad():
        outputs_t = teacher(x).detach()
        outputs_t_replay = teacher(x_m).detach()
    optimizer_inner.zero_grad()
    with higher.innerloop_ctx(student, optimizer_inner) as (fmodel_s, diffopt):
        inner_loss = F.l1_loss(fmodel_s(x), outputs_t)
        diffopt.step(inner_loss)
        outer_loss1 = F.l1_loss(fmodel_s(x_m), outputs_t_replay)
        outputs_s_cat = student(torch.cat((x, x_m)))
        loss_kd = F.l1_loss(outputs_s_cat, torch.cat((outputs_t, outputs_t_replay)))
        total_loss = outer_loss1 + loss_kd
        total_loss.backward()


def test_the_parity_step_gives_the_released_steps_gradient_and_batchnorm_statistics_bit_for_bit(tmp_path):
    """``strategy: {key: mb_dfkd, kwargs: {combine: concat}}`` through the box (torchdistill's criterion and forward
    hooks, the memory's cached teacher outputs) equals the released step on a copy of the student, in float64."""
    box = build_box(tmp_path, 'lrwa_mb_released')
    assert box.strategy.combine == 'concat'
    student, teacher = box.student_model.double().train(), box.teacher_model.double().eval()
    reference = copy.deepcopy(student)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 8, 8, generator=generator, dtype=torch.float64)
    x_m = torch.randn(4, 1, 8, 8, generator=generator, dtype=torch.float64) + 0.5
    with torch.no_grad():
        teacher_io, teacher_io_m = box.teacher_io(x), box.teacher_io(x_m)
    losses = box.strategy.backward(student, box.student_closures(x, teacher_io, x_m, teacher_io_m))
    released_step(reference, teacher, x, x_m)
    assert set(losses) == {'joint'}
    for (name, p), q in zip(student.named_parameters(), reference.parameters()):
        assert q.grad is not None and torch.equal(p.grad, q.grad), name
    for (name, b), c in zip(student.named_buffers(), reference.buffers()):
        assert torch.equal(b, c), name  # one forward of the concatenated batch moved them, in both
    # the released step's meta loss never reached the student: its gradient is the concatenated forward's alone
    for p in reference.parameters():
        p.grad = None
    with torch.no_grad():
        targets = torch.cat((teacher(x), teacher(x_m)))
    F.l1_loss(reference(torch.cat((x, x_m))), targets).backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(student.parameters(), reference.parameters()))


class _Tags(yaml.SafeLoader):
    pass


_Tags.add_multi_constructor('!', lambda loader, suffix, node: None)


def _load(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_Tags)


#: released config -> (its base config, the batch setting, the replay memory's expected kwargs or GR changes)
RELEASED = {'lrwa_mb_released': 'mb_dfkd', 'mb_dfkd_released': 'mb_dfkd', 'lrwa_gr_released': 'pre_dfkd',
            'pre_dfkd_released': 'pre_dfkd'}


@pytest.mark.parametrize('dataset', ['digits', 'cifar10', 'cifar100', 'tiny_imagenet'])
def test_released_configs_differ_from_their_baselines_only_in_the_released_update(dataset):
    directory = CONFIGS / dataset
    for name, base_name in RELEASED.items():
        config, base = _load(directory / f'{name}.yaml'), _load(directory / f'{base_name}.yaml')
        train, base_train = config['train'], base['train']
        assert train.pop('strategy') == {'key': base_train.pop('strategy'), 'kwargs': {'combine': 'concat'}}, name
        data_free, base_data_free = train['data_free'], base_train['data_free']
        replay, base_replay = data_free.pop('replay')['kwargs'], base_data_free.pop('replay')['kwargs']
        batch, iterations = data_free['batch_size'], data_free['iterations_per_epoch']
        if name.startswith('lrwa'):  # the LRWA batch setting
            assert (batch, iterations) == (base_data_free['batch_size'], base_data_free['iterations_per_epoch'])
        else:  # the released baselines: twice the batch, half the iterations
            assert batch == 2 * base_data_free['batch_size']
            assert abs(iterations - base_data_free['iterations_per_epoch'] / 2) <= 0.5
        for key in ('batch_size', 'iterations_per_epoch'):
            data_free.pop(key), base_data_free.pop(key)
        if base_name == 'mb_dfkd':
            assert replay == {'capacity': 10 * batch // 8, 'push_size': batch // 8, 'push_every_epochs': 5,
                              'first_push_epoch': 0, 'draw': 'batch', 'batch_size': batch // 8,
                              **({'policy': 'fifo'} if 'policy' in replay else {})}, name
        else:
            assert replay.pop('decode_bn') == 'running' and replay.pop('batch_size') == batch // 8
            assert (replay.pop('train_size'), replay.pop('self_replay')) == (batch // 2, batch // 8)
            assert replay.pop('refine')['steps'] == 1
            for key in ('batch_size', 'train_size', 'self_replay', 'refine'):
                base_replay.pop(key, None)
            assert replay == base_replay, name
        config['models']['student_model'].pop('dst_ckpt'), base['models']['student_model'].pop('dst_ckpt')
        assert config == base, name  # everything else as the baseline
