"""ResNet-18 / ResNet-34 for 32x32 CIFAR images: the teacher (ResNet-34) and student (ResNet-18) of the paper's
CIFAR-10 / CIFAR-100 experiments, and of most data-free distillation baselines.

Origin: DAFL's ``resnet.py`` (Chen et al., ICCV 2019), reused by DFAD ``ResNet*_8x``, CMI and Fast-DFKD
``resnet18/34``, PRE-DFKD and the LRWA code ``ResNet18/34``. BasicBlocks with 64-128-256-512 channels, a 3x3 stride-1
stem, no max-pool, global average pooling (the published ``avg_pool2d(out, 4)`` at 32x32). State-dict layout, the
published one, so a published checkpoint loads strictly with ``src_ckpt``
(:func:`lrwa_plugin.run.checkpoint.load_weights_strictly`)::

    conv1, bn1, layer1..4.<i>.{conv1,bn1,conv2,bn2,shortcut.0,shortcut.1}, linear

.. code-block:: yaml

    models:
      teacher_model: {key: 'resnet34_cifar', kwargs: {num_classes: 100}, src_ckpt: 'cifar100_resnet34.pth'}
      student_model: {key: 'resnet18_cifar', kwargs: {num_classes: 100}, dst_ckpt: 'student.pt'}
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F

from ..datasets import CIFAR_MEAN, CIFAR_STD
from .timm_compat import TimmCompatible, checked_kwargs, register_both

__all__ = ['BasicBlock', 'CifarResNet']


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


class CifarResNet(TimmCompatible):
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


@register_both
def resnet18_cifar(pretrained: bool = False, num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """ResNet-18 for 32x32 images (the paper's CIFAR student), published layout ``conv1 ... linear``.

    .. code-block:: yaml

        student_model: {key: 'resnet18_cifar', kwargs: {num_classes: 100}, dst_ckpt: 'student.pt'}
    """
    kwargs = checked_kwargs('resnet18_cifar', pretrained, kwargs)
    return CifarResNet([2, 2, 2, 2], num_classes=num_classes, name='resnet18_cifar', **kwargs)


@register_both
def resnet34_cifar(pretrained: bool = False, num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """ResNet-34 for 32x32 images (the paper's CIFAR teacher), published layout ``conv1 ... linear``.

    .. code-block:: yaml

        teacher_model: {key: 'resnet34_cifar', kwargs: {num_classes: 100}, src_ckpt: 'cifar100_resnet34.pth'}
    """
    kwargs = checked_kwargs('resnet34_cifar', pretrained, kwargs)
    return CifarResNet([3, 4, 6, 3], num_classes=num_classes, name='resnet34_cifar', **kwargs)
