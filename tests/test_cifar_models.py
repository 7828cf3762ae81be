"""The CIFAR / Tiny-ImageNet networks: registered with torchdistill and timm, checkpoints in the published key layout
load strictly (and a mismatching one is a clear error), and the forward passes are the published ones."""
from __future__ import annotations

import re

import pytest
import timm
import torch
from conftest import ROOT, run_cli, write_config
from torch.nn import functional as F
from torchdistill.models.registry import get_model

import lrwa_plugin  # noqa: F401  (registers the models)
from lrwa_plugin.models.timm_compat import MODEL_NAMES
from lrwa_plugin.models.timm_model import input_shape_of, timm_model
from lrwa_plugin.run.checkpoint import atomic_save, load_weights_strictly

EXPECTED_NAMES = ['resnet18_cifar', 'resnet34_cifar', 'wrn_16_1', 'wrn_16_2', 'wrn_40_1', 'wrn_40_2',
                  'mobilenetv2_cifar', 'resnet18_tinyimagenet', 'resnet34_tinyimagenet']


def bn(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {f'{prefix}.weight': (channels,), f'{prefix}.bias': (channels,), f'{prefix}.running_mean': (channels,),
            f'{prefix}.running_var': (channels,), f'{prefix}.num_batches_tracked': ()}


def published_resnet_layout(num_blocks: list[int], num_classes: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of DAFL's ``resnet.py`` (DFAD ``ResNet*_8x``, CMI ``resnet18/34``, PRE-DFKD/LRWA ``ResNet18/34``),
    written out from that code's structure, independently of lrwa_plugin.models.resnet_cifar."""
    layout = {'conv1.weight': (64, 3, 3, 3), **bn('bn1', 64)}
    in_planes = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), num_blocks), start=1):
        for block in range(blocks):
            stride = 2 if stage > 1 and block == 0 else 1
            prefix = f'layer{stage}.{block}'
            layout.update({f'{prefix}.conv1.weight': (planes, in_planes, 3, 3), **bn(f'{prefix}.bn1', planes),
                           f'{prefix}.conv2.weight': (planes, planes, 3, 3), **bn(f'{prefix}.bn2', planes)})
            if stride != 1 or in_planes != planes:
                layout.update({f'{prefix}.shortcut.0.weight': (planes, in_planes, 1, 1),
                               **bn(f'{prefix}.shortcut.1', planes)})
            in_planes = planes
    layout.update({'linear.weight': (num_classes, 512), 'linear.bias': (num_classes,)})
    return layout


def published_wrn_layout(depth: int, widen: int, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of ZSKT's ``wresnet.py`` (CMI, Fast-DFKD, LRWA ``wrn_*``)."""
    widths = [16, 16 * widen, 32 * widen, 64 * widen]
    layout = {'conv1.weight': (16, 3, 3, 3)}
    for stage in range(1, 4):
        for block in range((depth - 4) // 6):
            in_planes = widths[stage - 1] if block == 0 else widths[stage]
            out = widths[stage]
            prefix = f'block{stage}.layer.{block}'
            layout.update({**bn(f'{prefix}.bn1', in_planes), f'{prefix}.conv1.weight': (out, in_planes, 3, 3),
                           **bn(f'{prefix}.bn2', out), f'{prefix}.conv2.weight': (out, out, 3, 3)})
            if in_planes != out:
                layout[f'{prefix}.convShortcut.weight'] = (out, in_planes, 1, 1)
    layout.update({**bn('bn1', widths[3]), 'fc.weight': (num_classes, widths[3]), 'fc.bias': (num_classes,)})
    return layout


def published_tiny_layout(num_classes: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the LRWA code's ``MyResNet34``: torchvision's resnet34 inside ``.resnet``, 3x3 stem with bias."""
    from torchvision.models import resnet34
    with torch.device('meta'):
        reference = resnet34(num_classes=num_classes).state_dict()
    layout = {f'resnet.{k}': tuple(v.shape) for k, v in reference.items()}
    layout.update({'resnet.conv1.weight': (64, 3, 3, 3), 'resnet.conv1.bias': (64,)})
    return layout


def random_state_dict(layout: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in layout.items():
        if key.endswith('num_batches_tracked'):
            state[key] = torch.tensor(7)
        elif key.endswith('running_var'):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(shape, generator=generator) * 0.1
    return state


LAYOUTS = {
    'resnet18_cifar': lambda: published_resnet_layout([2, 2, 2, 2], 100),
    'resnet34_cifar': lambda: published_resnet_layout([3, 4, 6, 3], 100),
    'wrn_16_1': lambda: published_wrn_layout(16, 1, 100),
    'wrn_16_2': lambda: published_wrn_layout(16, 2, 100),
    'wrn_40_1': lambda: published_wrn_layout(40, 1, 100),
    'wrn_40_2': lambda: published_wrn_layout(40, 2, 100),
    'resnet34_tinyimagenet': lambda: published_tiny_layout(100),
}


def test_every_network_is_registered_with_torchdistill_and_timm():
    assert MODEL_NAMES == EXPECTED_NAMES
    for name in EXPECTED_NAMES:
        assert timm.is_model(name)
    assert set(timm.list_models('*_cifar')) >= {'resnet18_cifar', 'resnet34_cifar', 'mobilenetv2_cifar'}


@pytest.mark.parametrize('name', EXPECTED_NAMES)
def test_networks_classify_their_input_and_describe_it_like_timm_models(name):
    tiny = 'tinyimagenet' in name
    model = get_model(name, num_classes=7).eval()
    assert input_shape_of(model) == ((3, 64, 64) if tiny else (3, 32, 32))
    cfg = model.pretrained_cfg
    assert cfg['num_classes'] == model.num_classes == 7 and model.in_chans == 3
    assert cfg['mean'] == ((0.485, 0.456, 0.406) if tiny else (0.4914, 0.4822, 0.4465))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (2, 7)
        assert torch.equal(model.forward_head(model.forward_features(x)), logits)
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == \
            (2, model.get_classifier().in_features)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.pretrained_cfg['num_classes'] == model.num_classes == 3
    built = timm.create_model(name, num_classes=5)
    assert type(built) is type(model) and built.num_classes == 5
    with pytest.raises(ValueError, match='pretrained=True is refused'):
        timm.create_model(name, pretrained=True)


@pytest.mark.parametrize('name', list(LAYOUTS))
def test_checkpoint_in_the_published_layout_loads_strictly(name, tmp_path):
    layout = LAYOUTS[name]()
    state = random_state_dict(layout)
    path = tmp_path / f'{name}.pth'
    atomic_save({'state_dict': state, 'epoch': 200, 'best_acc': 0.78}, path)  # CMI / LRWA checkpoints' container
    with torch.device('meta'):
        model = get_model(name, num_classes=100)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == layout
    model = get_model(name, num_classes=100)
    load_weights_strictly(model, path, what='teacher')
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_mobilenetv2_has_the_torchvision_keys_with_a_stride_one_stem():
    from torchvision.models import mobilenet_v2
    with torch.device('meta'):
        reference = {k: tuple(v.shape) for k, v in mobilenet_v2(num_classes=100).state_dict().items()}
        model = get_model('mobilenetv2_cifar', num_classes=100)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == reference
    assert model.features[0][0].stride == (1, 1)
    assert get_model('mobilenetv2_cifar', num_classes=10).forward_features(torch.randn(1, 3, 32, 32)).shape == \
        (1, 1280, 2, 2)  # 32 / 16: four stride-2 layers, ImageNet's MobileNetV2 has five


def test_timm_model_factory_loads_a_published_checkpoint(tmp_path):
    path = tmp_path / 'wrn.pth'
    state = random_state_dict(published_wrn_layout(16, 2, 10))
    atomic_save(state, path)
    model = timm_model('wrn_16_2', num_classes=10, checkpoint_path=path)
    assert torch.equal(model.state_dict()['fc.weight'], state['fc.weight'])


def test_checkpoint_in_another_layout_is_a_clear_error(tmp_path):
    layout = published_resnet_layout([2, 2, 2, 2], 10)
    state = random_state_dict(layout)
    state['fc.weight'], state['fc.bias'] = state.pop('linear.weight'), state.pop('linear.bias')  # torchvision naming
    path = tmp_path / 'teacher.pth'
    atomic_save(state, path)
    model = get_model('resnet18_cifar', num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_weights_strictly(model, path, what='teacher')
    message = str(info.value)
    assert '\n' not in message and 'does not match the model' in message
    assert 'missing keys [linear.weight, linear.bias]' in message and 'unexpected keys [fc.weight, fc.bias]' in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # left untouched
    wrong_classes = random_state_dict(published_resnet_layout([2, 2, 2, 2], 100))
    atomic_save(wrong_classes, path)
    with pytest.raises(ValueError, match=re.escape('linear.weight: ckpt (100, 512) vs model (10, 512)')):
        load_weights_strictly(model, path, what='teacher')


def test_runner_refuses_a_teacher_in_another_layout_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    state = random_state_dict(published_resnet_layout([3, 4, 6, 3], 100))
    state['fc.weight'], state['fc.bias'] = state.pop('linear.weight'), state.pop('linear.bias')
    atomic_save(state, tmp_path / 'resource/ckpt/cifar100/teacher_resnet34.pt')
    fake = ("!import_call {key: 'torchvision.datasets.FakeData', init: {kwargs: {size: 1, image_size: [3, 32, 32], "
            "num_classes: 100}}}")
    config = write_config(ROOT / 'examples/configs/cifar100/lrwa_mb.yaml', tmp_path / 'run.yaml', {
        "cifar100/test: !import_call\n    key: 'lrwa_plugin.datasets.cifar'\n    init:\n      kwargs: {name: "
        "'cifar100', root: '~/datasets/cifar100', split: 'test', download: False}": f'cifar100/test: {fake}'})
    assert run_cli(config) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1, err
    assert 'teacher_resnet34.pt' in err and 'missing keys [linear.weight, linear.bias]' in err
    assert not (tmp_path / 'resource/ckpt/cifar100/lrwa_mb.pt').exists()


# --------------------------------------------------------------------------- the published forward passes
def _bn(x: torch.Tensor, state: dict, prefix: str) -> torch.Tensor:
    return F.batch_norm(x, state[f'{prefix}.running_mean'], state[f'{prefix}.running_var'], state[f'{prefix}.weight'],
                        state[f'{prefix}.bias'], training=False)


def published_resnet_forward(state: dict, x: torch.Tensor, num_blocks: list[int]) -> torch.Tensor:
    """DAFL's ``ResNet.forward`` in eval mode, from the state dict: relu(bn1(conv1)), BasicBlocks
    ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``, ``avg_pool2d(out, 4)``, ``linear``."""
    out = F.relu(_bn(F.conv2d(x, state['conv1.weight'], padding=1), state, 'bn1'))
    for stage, blocks in enumerate(num_blocks, start=1):
        for block in range(blocks):
            p = f'layer{stage}.{block}'
            stride = 2 if stage > 1 and block == 0 else 1
            y = F.relu(_bn(F.conv2d(out, state[f'{p}.conv1.weight'], stride=stride, padding=1), state, f'{p}.bn1'))
            y = _bn(F.conv2d(y, state[f'{p}.conv2.weight'], padding=1), state, f'{p}.bn2')
            shortcut = out if f'{p}.shortcut.0.weight' not in state else \
                _bn(F.conv2d(out, state[f'{p}.shortcut.0.weight'], stride=stride), state, f'{p}.shortcut.1')
            out = F.relu(y + shortcut)
    out = F.avg_pool2d(out, 4).flatten(1)
    return F.linear(out, state['linear.weight'], state['linear.bias'])


def published_wrn_forward(state: dict, x: torch.Tensor, depth: int) -> torch.Tensor:
    """ZSKT's ``WideResNet.forward`` in eval mode: when a block changes width, BN-ReLU is applied to its input once and
    both branches read it; otherwise the identity shortcut reads the raw input."""
    out = F.conv2d(x, state['conv1.weight'], padding=1)
    for stage in range(1, 4):
        for block in range((depth - 4) // 6):
            p = f'block{stage}.layer.{block}'
            stride = 2 if stage > 1 and block == 0 else 1
            activated = F.relu(_bn(out, state, f'{p}.bn1'))
            if f'{p}.convShortcut.weight' in state:
                out = activated
            y = F.relu(_bn(F.conv2d(activated, state[f'{p}.conv1.weight'], stride=stride, padding=1), state,
                           f'{p}.bn2'))
            y = F.conv2d(y, state[f'{p}.conv2.weight'], padding=1)
            shortcut = out if f'{p}.convShortcut.weight' not in state else \
                F.conv2d(out, state[f'{p}.convShortcut.weight'], stride=stride)
            out = shortcut + y
    out = F.relu(_bn(out, state, 'bn1'))
    out = F.adaptive_avg_pool2d(out, 1).flatten(1)
    return F.linear(out, state['fc.weight'], state['fc.bias'])


@pytest.mark.parametrize('name, reference', [
    ('resnet18_cifar', lambda state, x: published_resnet_forward(state, x, [2, 2, 2, 2])),
    ('wrn_16_2', lambda state, x: published_wrn_forward(state, x, 16)),
])
def test_forward_is_the_published_one(name, reference):
    torch.manual_seed(0)
    model = get_model(name, num_classes=10).eval()
    state = random_state_dict({k: tuple(v.shape) for k, v in model.state_dict().items()}, seed=1)
    model.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), reference(state, x), rtol=1e-4, atol=1e-5)


def test_tiny_imagenet_resnet_is_torchvisions_with_a_small_stem():
    from torchvision.models import resnet18
    model = get_model('resnet18_tinyimagenet', num_classes=200).eval()
    reference = resnet18(num_classes=200)
    reference.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1)
    reference.maxpool = torch.nn.Identity()
    reference.load_state_dict({k.removeprefix('resnet.'): v for k, v in model.state_dict().items()})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), reference.eval()(x), rtol=1e-4, atol=1e-5)
    assert model.forward_features(x).shape == (1, 512, 8, 8)  # no max-pool: 64 / 8
