"""The small-image networks of the data-free distillation literature, with the published checkpoints' key layout.

DAFL, DFAD, CMI, Fast-DFKD, MB-DFKD, PRE-DFKD and the LRWA paper (Patel, Mopuri, Qiu, CVPR 2023) all distil between
the same CIFAR networks, and their released teachers are state dicts of exactly these modules. Each builder is
registered twice, under the same name: with torchdistill's ``register_model`` (``key: 'resnet34_cifar'`` in a YAML)
and with timm's ``register_model`` (``timm.create_model('resnet34_cifar', num_classes=100)``, hence also
``{key: 'timm_model', kwargs: {model_name: 'resnet34_cifar'}}``). Every model carries a timm-style ``pretrained_cfg``
(``input_size``, ``mean``, ``std``, ``num_classes``, ...) plus ``num_classes`` and ``in_chans``, so
:func:`lrwa_plugin.models.timm_model.input_shape_of` and timm's data config helpers read their input from the model.

===========================  ===================================================================================
name                         layout (state-dict keys) and origin
===========================  ===================================================================================
``resnet18_cifar``,          ResNet with BasicBlocks 64-128-256-512, 3x3 stride-1 stem, no max-pool, global
``resnet34_cifar``           average pooling: ``conv1, bn1, layer1..4.<i>.{conv1,bn1,conv2,bn2,shortcut.0,
                             shortcut.1}, linear`` (DAFL's ``resnet.py``, reused by DFAD ``ResNet*_8x``, CMI and
                             Fast-DFKD ``resnet18/34``, PRE-DFKD and LRWA ``ResNet18/34``)
``wrn_16_1``, ``wrn_16_2``,  pre-activation wide ResNet: ``conv1, block1..3.layer.<i>.{bn1,conv1,bn2,conv2,
``wrn_40_1``, ``wrn_40_2``   convShortcut}, bn1, fc`` (ZSKT's ``wresnet.py``, reused by CMI, Fast-DFKD and LRWA)
``mobilenetv2_cifar``        torchvision's MobileNetV2 with a stride-1 first convolution: ``features.*,
                             classifier.1`` (PRE-DFKD / LRWA ``MobileNetV2``)
``resnet18_tinyimagenet``,   torchvision's ResNet inside ``.resnet`` with a 3x3 stride-1 stem convolution *with*
``resnet34_tinyimagenet``    bias and no max-pool: ``resnet.conv1.{weight,bias}, resnet.bn1, resnet.layer1..4.<i>.
                             {conv1,bn1,conv2,bn2,downsample.0,downsample.1}, resnet.fc`` (the LRWA code's
                             ``MyResNet34``, its Tiny-ImageNet teacher, 64x64 inputs)
===========================  ===================================================================================

The forward passes compute exactly what the published code computes (global average pooling is the published
``avg_pool2d(out, 4)`` at 32x32 and also works at 64x64), so a published checkpoint loads strictly with
``src_ckpt`` (:func:`lrwa_plugin.run.checkpoint.load_weights_strictly`) and gives the published accuracy.

.. code-block:: yaml

    models:
      teacher_model: {key: 'resnet34_cifar', kwargs: {num_classes: 100}, src_ckpt: 'cifar100_resnet34.pth'}
      student_model: {key: 'resnet18_cifar', kwargs: {num_classes: 100}, dst_ckpt: 'student.pt'}
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import register_model as timm_register_model
from torch import Tensor, nn
from torch.nn import functional as F
from torchdistill.models.registry import register_model
from torchvision.models import mobilenet_v2, resnet18, resnet34

__all__ = ['CifarResNet', 'WideResNet', 'CifarMobileNetV2', 'TinyImageNetResNet', 'CIFAR_MEAN', 'CIFAR_STD',
           'MODEL_NAMES']

#: The normalisation of the DFKD code bases (DAFL, DFAD, PRE-DFKD, LRWA) for CIFAR-10 *and* CIFAR-100. (The std is the
#: widely copied per-pixel value, not the per-channel 0.2470, 0.2435, 0.2616; the published teachers expect it.)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)

#: Every name this module registers with torchdistill and with timm.
MODEL_NAMES: list[str] = []


def _pretrained_cfg(name: str, num_classes: int, in_chans: int, img_size: int, mean: tuple[float, ...],
                    std: tuple[float, ...], first_conv: str, classifier: str) -> dict[str, Any]:
    """A timm-style ``pretrained_cfg`` describing the data the network expects (no weights to download)."""
    return {'architecture': name, 'num_classes': num_classes, 'input_size': (in_chans, img_size, img_size),
            'fixed_input_size': False, 'mean': mean, 'std': std, 'interpolation': 'bilinear', 'crop_pct': 1.0,
            'first_conv': first_conv, 'classifier': classifier, 'license': 'apache-2.0'}


class _TimmCompatible(nn.Module):
    """What timm code reads from a model: ``pretrained_cfg`` (alias ``default_cfg``), ``num_classes``, ``in_chans``,
    ``get_classifier`` / ``reset_classifier`` and ``forward_features`` / ``forward_head``."""

    #: Attribute path of the final linear layer (also the ``ActivationNormLoss`` module path of DAFL's ``f_T``).
    classifier_path: str = 'linear'
    pretrained_cfg: dict[str, Any]

    def _set_cfg(self, name: str, num_classes: int, in_chans: int, img_size: int, mean: tuple[float, ...],
                 std: tuple[float, ...], first_conv: str) -> None:
        self.num_classes, self.in_chans = num_classes, in_chans
        self.pretrained_cfg = _pretrained_cfg(name, num_classes, in_chans, img_size, mean, std, first_conv,
                                              self.classifier_path)
        self.default_cfg = self.pretrained_cfg

    def get_classifier(self) -> nn.Linear:
        return self.get_submodule(self.classifier_path)

    def reset_classifier(self, num_classes: int) -> None:
        """Replaces the final linear layer by a freshly initialised one with ``num_classes`` outputs."""
        old = self.get_classifier()
        parent_path, _, name = self.classifier_path.rpartition('.')
        parent = self.get_submodule(parent_path) if parent_path else self
        setattr(parent, name, nn.Linear(old.in_features, num_classes))
        self.num_classes = num_classes
        self.pretrained_cfg = {**self.pretrained_cfg, 'num_classes': num_classes}
        self.default_cfg = self.pretrained_cfg

    def forward_features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Global average pooling of the feature map, then (unless ``pre_logits``) the final linear layer."""
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# --------------------------------------------------------------------------------------------- CIFAR ResNet
class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut (a 1x1 conv-BN when the shape changes, else the identity)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(_TimmCompatible):
    """ResNet for small images (DAFL / DFAD / CMI / PRE-DFKD / LRWA): a 3x3 stride-1 stem, no max-pool, four stages
    of BasicBlocks with 64-128-256-512 channels (strides 1, 2, 2, 2), global average pooling and ``linear``.

    Args:
        num_blocks: BasicBlocks per stage (``[2, 2, 2, 2]`` ResNet-18, ``[3, 4, 6, 3]`` ResNet-34).
        num_classes: outputs of ``linear``.
        in_chans: input channels.
        name: architecture name recorded in ``pretrained_cfg``.
    """

    def __init__(self, num_blocks: list[int], num_classes: int = 10, in_chans: int = 3,
                 name: str = 'cifar_resnet') -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes = 64
        for index, (planes, blocks) in enumerate(zip((64, 128, 256, 512), num_blocks)):
            layers = []
            for block in range(blocks):
                layers.append(BasicBlock(in_planes, planes, stride=2 if index > 0 and block == 0 else 1))
                in_planes = planes
            setattr(self, f'layer{index + 1}', nn.Sequential(*layers))
        self.linear = nn.Linear(512, num_classes)
        self._set_cfg(name, num_classes, in_chans, 32, CIFAR_MEAN, CIFAR_STD, 'conv1')

    def forward_features(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(out))))


# --------------------------------------------------------------------------------------------- wide ResNet
class WideBasicBlock(nn.Module):
    """Pre-activation block of ZSKT's ``wresnet.py``. When the width changes, BN-ReLU is applied to the input once and
    both the residual branch and the 1x1 ``convShortcut`` read the activated input (the published code's quirk)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout_rate)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        activated = F.relu(self.bn1(x))
        out = self.conv2(self.dropout(F.relu(self.bn2(self.conv1(activated)))))
        return out + (x if self.convShortcut is None else self.convShortcut(activated))


class _NetworkBlock(nn.Module):
    def __init__(self, blocks: int, in_planes: int, out_planes: int, stride: int, dropout_rate: float) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[WideBasicBlock(in_planes if i == 0 else out_planes, out_planes,
                                                    stride if i == 0 else 1, dropout_rate) for i in range(blocks)])

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(_TimmCompatible):
    """Wide ResNet WRN-d-k for 32x32 images (Zagoruyko & Komodakis, 2016) in the layout of ZSKT / CMI / LRWA.

    Args:
        depth: ``6n + 4`` (16, 40, ...).
        widen_factor: ``k``; stage widths ``16k, 32k, 64k`` after a 16-channel stem.
        num_classes: outputs of ``fc``.
        dropout_rate: dropout between the two convolutions of a block.
        in_chans: input channels.
        name: architecture name recorded in ``pretrained_cfg``.
    """

    classifier_path = 'fc'

    def __init__(self, depth: int, widen_factor: int = 1, num_classes: int = 10, dropout_rate: float = 0.0,
                 in_chans: int = 3, name: str = 'wrn') -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f'WideResNet: depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}')
        blocks = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.block1 = _NetworkBlock(blocks, widths[0], widths[1], 1, dropout_rate)
        self.block2 = _NetworkBlock(blocks, widths[1], widths[2], 2, dropout_rate)
        self.block3 = _NetworkBlock(blocks, widths[2], widths[3], 2, dropout_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        for module in self.modules():  # the published initialisation
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, (2.0 / fan_out) ** 0.5)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        self._set_cfg(name, num_classes, in_chans, 32, CIFAR_MEAN, CIFAR_STD, 'conv1')

    def forward_features(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        return F.relu(self.bn1(out))


# ------------------------------------------------------------------------------------------- MobileNetV2
class CifarMobileNetV2(_TimmCompatible):
    """MobileNetV2 (Sandler et al., 2018) for 32x32 images: torchvision's network with a stride-1 first convolution
    (the PRE-DFKD / LRWA ``MobileNetV2``; same keys ``features.*``, ``classifier.1``).

    Args:
        num_classes: outputs of the classifier.
        in_chans: input channels.
        width_mult: torchvision's width multiplier.
        name: architecture name recorded in ``pretrained_cfg``.
    """

    classifier_path = 'classifier.1'

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width_mult: float = 1.0,
                 name: str = 'mobilenetv2_cifar') -> None:
        super().__init__()
        network = mobilenet_v2(weights=None, num_classes=num_classes, width_mult=width_mult)
        first = network.features[0][0]
        network.features[0][0] = nn.Conv2d(in_chans, first.out_channels, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(network.features[0][0].weight, mode='fan_out')
        self.features, self.classifier = network.features, network.classifier
        self._set_cfg(name, num_classes, in_chans, 32, CIFAR_MEAN, CIFAR_STD, 'features.0.0')

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return x if pre_logits else self.classifier(x)  # with its dropout, as published


# ---------------------------------------------------------------------------------------- Tiny-ImageNet
class TinyImageNetResNet(_TimmCompatible):
    """torchvision's ResNet for 64x64 images as in the LRWA code's Tiny-ImageNet teacher (``MyResNet34``): held in
    ``.resnet``, its stem a 3x3 stride-1 convolution with bias, no max-pool, global average pooling, ``resnet.fc``.

    Args:
        depth: 18 or 34.
        num_classes: outputs of ``resnet.fc`` (200 for Tiny-ImageNet).
        in_chans: input channels.
        name: architecture name recorded in ``pretrained_cfg``.
    """

    classifier_path = 'resnet.fc'

    def __init__(self, depth: int = 34, num_classes: int = 200, in_chans: int = 3,
                 name: str = 'tinyimagenet_resnet') -> None:
        super().__init__()
        builders = {18: resnet18, 34: resnet34}
        if depth not in builders:
            raise ValueError(f'TinyImageNetResNet: depth must be 18 or 34, got {depth}')
        self.resnet = builders[depth](weights=None, num_classes=num_classes)
        self.resnet.conv1 = nn.Conv2d(in_chans, 64, 3, 1, 1)  # with bias, as published
        self.resnet.maxpool = nn.Identity()
        self._set_cfg(name, num_classes, in_chans, 64, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD,
                      'resnet.conv1')

    def forward_features(self, x: Tensor) -> Tensor:
        r = self.resnet
        x = r.relu(r.bn1(r.conv1(x)))
        return r.layer4(r.layer3(r.layer2(r.layer1(x))))


# --------------------------------------------------------------------------------------------- registration
def _register(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Registers ``builder`` with torchdistill and timm under its function name."""
    MODEL_NAMES.append(builder.__name__)
    return register_model(key=builder.__name__)(timm_register_model(builder))


def _checked(name: str, pretrained: bool, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Refuses ``pretrained=True`` (nothing is downloaded) and drops the arguments timm's factory always passes."""
    if pretrained:
        raise ValueError(f'{name}: pretrained=True is refused: there are no weights to download; load a local '
                         'checkpoint instead (src_ckpt, or timm_model with checkpoint_path)')
    for key in ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir'):
        kwargs.pop(key, None)
    return kwargs


@_register
def resnet18_cifar(pretrained: bool = False, num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """ResNet-18 for 32x32 images (the paper's CIFAR student), published layout ``conv1 ... linear``.

    .. code-block:: yaml

        student_model: {key: 'resnet18_cifar', kwargs: {num_classes: 100}, dst_ckpt: 'student.pt'}
    """
    kwargs = _checked('resnet18_cifar', pretrained, kwargs)
    return CifarResNet([2, 2, 2, 2], num_classes=num_classes, name='resnet18_cifar', **kwargs)


@_register
def resnet34_cifar(pretrained: bool = False, num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """ResNet-34 for 32x32 images (the paper's CIFAR teacher), published layout ``conv1 ... linear``.

    .. code-block:: yaml

        teacher_model: {key: 'resnet34_cifar', kwargs: {num_classes: 100}, src_ckpt: 'cifar100_resnet34.pth'}
    """
    kwargs = _checked('resnet34_cifar', pretrained, kwargs)
    return CifarResNet([3, 4, 6, 3], num_classes=num_classes, name='resnet34_cifar', **kwargs)


def _wrn(name: str, depth: int, widen_factor: int, pretrained: bool, num_classes: int,
         kwargs: dict[str, Any]) -> WideResNet:
    kwargs = _checked(name, pretrained, kwargs)
    return WideResNet(depth, widen_factor, num_classes=num_classes, name=name, **kwargs)


@_register
def wrn_16_1(pretrained: bool = False, num_classes: int = 10, **kwargs: Any) -> WideResNet:
    """WRN-16-1 for 32x32 images (a student in the LRWA code), layout ``conv1 ... fc``.

    .. code-block:: yaml

        student_model: {key: 'wrn_16_1', kwargs: {num_classes: 100}, dst_ckpt: 'student.pt'}
    """
    return _wrn('wrn_16_1', 16, 1, pretrained, num_classes, kwargs)


@_register
def wrn_16_2(pretrained: bool = False, num_classes: int = 10, **kwargs: Any) -> WideResNet:
    """WRN-16-2 for 32x32 images (a student in the LRWA code), layout ``conv1 ... fc``.

    .. code-block:: yaml

        student_model: {key: 'wrn_16_2', kwargs: {num_classes: 100}, dst_ckpt: 'student.pt'}
    """
    return _wrn('wrn_16_2', 16, 2, pretrained, num_classes, kwargs)


@_register
def wrn_40_1(pretrained: bool = False, num_classes: int = 10, **kwargs: Any) -> WideResNet:
    """WRN-40-1 for 32x32 images (a student in the LRWA code), layout ``conv1 ... fc``.

    .. code-block:: yaml

        student_model: {key: 'wrn_40_1', kwargs: {num_classes: 100}, dst_ckpt: 'student.pt'}
    """
    return _wrn('wrn_40_1', 40, 1, pretrained, num_classes, kwargs)


@_register
def wrn_40_2(pretrained: bool = False, num_classes: int = 10, **kwargs: Any) -> WideResNet:
    """WRN-40-2 for 32x32 images (the usual teacher of WRN students in CMI / Fast-DFKD), layout ``conv1 ... fc``.

    .. code-block:: yaml

        teacher_model: {key: 'wrn_40_2', kwargs: {num_classes: 10}, src_ckpt: 'cifar10_wrn_40_2.pth'}
    """
    return _wrn('wrn_40_2', 40, 2, pretrained, num_classes, kwargs)


@_register
def mobilenetv2_cifar(pretrained: bool = False, num_classes: int = 10, **kwargs: Any) -> CifarMobileNetV2:
    """MobileNetV2 for 32x32 images (a student in the PRE-DFKD / LRWA code), layout ``features ... classifier.1``.

    .. code-block:: yaml

        student_model: {key: 'mobilenetv2_cifar', kwargs: {num_classes: 100}, dst_ckpt: 'student.pt'}
    """
    kwargs = _checked('mobilenetv2_cifar', pretrained, kwargs)
    return CifarMobileNetV2(num_classes=num_classes, name='mobilenetv2_cifar', **kwargs)


@_register
def resnet18_tinyimagenet(pretrained: bool = False, num_classes: int = 200, **kwargs: Any) -> TinyImageNetResNet:
    """ResNet-18 for 64x64 Tiny-ImageNet images (the paper's student), LRWA code layout ``resnet.*``.

    .. code-block:: yaml

        student_model: {key: 'resnet18_tinyimagenet', kwargs: {num_classes: 200}, dst_ckpt: 'student.pt'}
    """
    kwargs = _checked('resnet18_tinyimagenet', pretrained, kwargs)
    return TinyImageNetResNet(18, num_classes=num_classes, name='resnet18_tinyimagenet', **kwargs)


@_register
def resnet34_tinyimagenet(pretrained: bool = False, num_classes: int = 200, **kwargs: Any) -> TinyImageNetResNet:
    """ResNet-34 for 64x64 Tiny-ImageNet images (the paper's teacher, ``MyResNet34``), layout ``resnet.*``.

    .. code-block:: yaml

        teacher_model: {key: 'resnet34_tinyimagenet', kwargs: {num_classes: 200}, src_ckpt: 'teacher.pth'}
    """
    kwargs = _checked('resnet34_tinyimagenet', pretrained, kwargs)
    return TinyImageNetResNet(34, num_classes=num_classes, name='resnet34_tinyimagenet', **kwargs)
