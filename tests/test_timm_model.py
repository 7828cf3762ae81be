"""Tests for lrwa_plugin.run.checkpoint and the ``timm_model`` factory (tiny timm models, CPU, no downloads)."""
from __future__ import annotations

import argparse
import os
import pathlib
import re

import pytest
import safetensors.torch
import timm
import torch
from torch import nn
from torchdistill.common.main_util import save_ckpt
from torchdistill.models.registry import MODEL_DICT, get_model

from lrwa_plugin.errors import ConfigError
from lrwa_plugin.models.timm_model import input_shape_of, timm_model
from lrwa_plugin.run.checkpoint import atomic_save, load_state_dict_file, load_weights_strictly

ARCH = 'test_resnet'
NUM_CLASSES = 10


def _distinctive_model() -> nn.Module:
    """A test_resnet whose classifier and BN statistics are far from any fresh initialisation."""
    torch.manual_seed(1234)
    model = timm.create_model(ARCH, pretrained=False, num_classes=NUM_CLASSES)
    with torch.no_grad():
        model.fc.weight.copy_(torch.linspace(-3.0, 3.0, model.fc.weight.numel()).view_as(model.fc.weight))
        model.fc.bias.copy_(torch.arange(NUM_CLASSES, dtype=torch.float32))
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(7)
    return model.eval()



@pytest.fixture(scope='module')
def source() -> nn.Module:
    return _distinctive_model()


@pytest.fixture(scope='module')
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _save_layout(model: nn.Module, layout: str, directory: pathlib.Path) -> pathlib.Path:
    state_dict = model.state_dict()
    if layout == 'pth':
        path = directory / 'weights.pth'
        torch.save(state_dict, path)
    elif layout == 'safetensors':
        path = directory / 'weights.safetensors'
        safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    elif layout == 'torchdistill':
        # The real torchdistill writer, with optimizer state, scheduler state and an argparse.Namespace.
        path = directory / 'ckpt.pt'
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()  # zero gradients: momentum state is created, weights stay the same
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
        args = argparse.Namespace(config='cfg.yaml', seed=1, run_log=None)
        save_ckpt(model, optimizer, scheduler, 1.0, args, str(path))
    elif layout == 'ddp':
        path = directory / 'ddp.pt'
        torch.save({'module.' + k: v for k, v in state_dict.items()}, path)
    else:
        raise AssertionError(layout)
    return path


def _assert_same_weights(loaded: nn.Module, expected: nn.Module) -> None:
    expected_sd, loaded_sd = expected.state_dict(), loaded.state_dict()
    assert list(loaded_sd) == list(expected_sd)
    for key, value in expected_sd.items():
        assert torch.equal(loaded_sd[key], value), key


def test_timm_model_is_registered_in_torchdistill():
    assert MODEL_DICT['timm_model'] is timm_model
    model = get_model('timm_model', model_name=ARCH, num_classes=NUM_CLASSES)
    assert model.num_classes == NUM_CLASSES
    assert model.pretrained_cfg['architecture'] == ARCH
    assert {'input_size', 'mean', 'std', 'num_classes'} <= set(model.pretrained_cfg)


@pytest.mark.parametrize('layout', ['pth', 'safetensors', 'torchdistill', 'ddp'])
def test_checkpoint_layouts_load_identically(layout, source, images, tmp_path):
    path = _save_layout(source, layout, tmp_path)
    model = get_model('timm_model', model_name=ARCH, num_classes=NUM_CLASSES, checkpoint_path=str(path)).eval()
    _assert_same_weights(model, source)
    with torch.no_grad():
        assert torch.equal(model(images), source(images))


def test_classifier_is_exactly_the_files(source, tmp_path):
    """timm's pretrained_cfg_overlay=dict(file=...) path would re-initialise fc here (num_classes != 1000)."""
    path = _save_layout(source, 'pth', tmp_path)
    fresh = timm_model(ARCH, num_classes=NUM_CLASSES)
    assert not torch.equal(fresh.fc.weight, source.fc.weight)  # the check below is meaningful
    model = timm_model(ARCH, num_classes=NUM_CLASSES, checkpoint_path=path)
    assert torch.equal(model.fc.weight, source.fc.weight)
    assert torch.equal(model.fc.bias, source.fc.bias)


def test_plain_weights_preferred_over_ema_unless_only_ema(source, tmp_path):
    plain = source.state_dict()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in plain.items()}
    both, only_ema = tmp_path / 'both.pt', tmp_path / 'ema.pt'
    torch.save({'state_dict': plain, 'state_dict_ema': ema, 'epoch': 3}, both)
    torch.save({'model_ema': ema, 'epoch': 3}, only_ema)
    assert torch.equal(load_state_dict_file(both)['fc.bias'], plain['fc.bias'])
    assert torch.equal(load_state_dict_file(only_ema)['fc.bias'], ema['fc.bias'])


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / 'nope' / 'teacher.pth'
    with pytest.raises(ConfigError, match=re.escape(f"checkpoint_path: checkpoint '{path}' does not exist")):
        get_model('timm_model', model_name=ARCH, num_classes=NUM_CLASSES, checkpoint_path=str(path))
    with pytest.raises(FileNotFoundError, match=re.escape(f"teacher checkpoint '{path}' does not exist")):
        load_state_dict_file(path, what='teacher')


def test_other_num_classes_is_refused_and_model_untouched(source, tmp_path):
    path = _save_layout(source, 'pth', tmp_path)
    target = timm.create_model(ARCH, pretrained=False, num_classes=5)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_weights_strictly(target, path, what='teacher')
    message = str(info.value)
    assert '\n' not in message
    assert message.startswith(f"teacher checkpoint '{path}' does not match the model: ")
    assert 'missing keys []; unexpected keys []; shape mismatches [' in message
    assert 'fc.weight: ckpt (10, 96) vs model (5, 96)' in message
    assert 'fc.bias: ckpt (10) vs model (5)' in message
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_other_architecture_is_refused_with_key_lists(tmp_path):
    other = timm.create_model('test_efficientnet', pretrained=False, num_classes=NUM_CLASSES)
    path = tmp_path / 'effnet.safetensors'
    safetensors.torch.save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(ValueError) as info:
        timm_model(ARCH, num_classes=NUM_CLASSES, checkpoint_path=path)
    message = str(info.value)
    expected_keys, found_keys = set(timm_model(ARCH, num_classes=NUM_CLASSES).state_dict()), set(other.state_dict())
    n_missing, n_unexpected = len(expected_keys - found_keys), len(found_keys - expected_keys)
    assert '\n' not in message
    assert f"checkpoint_path: checkpoint '{path}' does not match the model: missing keys [conv1.0.weight" in message
    missing = re.search(r'missing keys \[([^]]*)\]', message).group(1).split(', ')
    unexpected = re.search(r'unexpected keys \[([^]]*)\]', message).group(1).split(', ')
    assert missing[-1] == f'+{n_missing - 5} more' and set(missing[:-1]) <= expected_keys - found_keys
    assert unexpected[-1] == f'+{n_unexpected - 5} more' and set(unexpected[:-1]) <= found_keys - expected_keys
    assert len(missing) == len(unexpected) == 6
    assert 'shape mismatches [bn1.weight: ckpt (24) vs model (32), ' in message


@pytest.mark.parametrize('name, content', [
    ('random.pth', os.urandom(4096)),
    ('random.safetensors', os.urandom(4096)),
    ('empty.pt', b''),
])
def test_corrupted_file_is_a_value_error(name, content, tmp_path):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"checkpoint_path: checkpoint '{path}' could not be read: ")):
        timm_model(ARCH, num_classes=NUM_CLASSES, checkpoint_path=path)


def test_truncated_torch_file_is_a_value_error(source, tmp_path):
    good = _save_layout(source, 'pth', tmp_path)
    path = tmp_path / 'truncated.pth'
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"checkpoint '.*truncated\.pth' could not be read: RuntimeError: ") as info:
        load_state_dict_file(path)
    assert '\n' not in str(info.value)


def test_non_state_dict_content_is_a_value_error(tmp_path):
    path = tmp_path / 'list.pt'
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match='could not be read: it holds a list, not a state dict'):
        load_state_dict_file(path)


class _Payload:
    """Unpickling this with weights_only=False would create ``marker`` (code execution)."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), 'w')


def test_pickled_code_is_never_executed(tmp_path):
    marker = tmp_path / 'executed'
    path = tmp_path / 'evil.pt'
    torch.save({'model': {'w': torch.zeros(1)}, 'args': _Payload(marker)}, path)
    with pytest.raises(ValueError, match=r'could not be read: .*weights_only=True refuses \(.*open') as info:
        load_state_dict_file(path, what='teacher')
    assert '\n' not in str(info.value)
    assert not marker.exists()


def test_pretrained_true_is_refused():
    with pytest.raises(ValueError, match=r'pretrained: true is refused.*checkpoint_path'):
        get_model('timm_model', model_name=ARCH, num_classes=NUM_CLASSES, pretrained=True)


def test_unknown_model_name_is_refused_with_suggestion():
    with pytest.raises(ValueError, match=r"unknown timm model 'test_resnett'; did you mean .*'test_resnet'"):
        timm_model('test_resnett', num_classes=NUM_CLASSES)


def test_hub_model_name_is_refused():
    with pytest.raises(ValueError, match='Hugging Face Hub'):
        timm_model('hf-hub:timm/resnet18.a1_in1k', num_classes=NUM_CLASSES)


def test_input_shape_of_honours_in_chans():
    model = timm_model(ARCH, num_classes=NUM_CLASSES, in_chans=1)
    assert model.pretrained_cfg['input_size'] == (3, 160, 160)  # timm keeps the registry's value
    assert input_shape_of(model) == (1, 160, 160)
    assert input_shape_of(timm_model(ARCH, num_classes=NUM_CLASSES)) == (3, 160, 160)
    assert input_shape_of(nn.Linear(2, 2)) is None


def test_atomic_save_writes_and_replaces(tmp_path):
    path = tmp_path / 'a' / 'b' / 'ckpt.pt'
    atomic_save({'w': torch.ones(3)}, path)
    atomic_save({'w': torch.full((3,), 2.0)}, path)
    assert torch.equal(torch.load(path, map_location='cpu', weights_only=True)['w'], torch.full((3,), 2.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ['ckpt.pt']


def test_atomic_save_failure_leaves_existing_file_and_no_temp(tmp_path):
    path = tmp_path / 'ckpt.pt'
    atomic_save({'w': torch.ones(3)}, path)
    original = path.read_bytes()
    with pytest.raises(Exception, match='pickle'):
        atomic_save({'w': torch.zeros(3), 'fn': lambda x: x}, path)
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt.pt']
