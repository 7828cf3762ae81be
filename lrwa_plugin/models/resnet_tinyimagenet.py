"""ResNet-18 / ResNet-34 for 64x64 Tiny-ImageNet images: the teacher (ResNet-34) and student (ResNet-18) of the
paper's Tiny-ImageNet experiments.

Origin: the LRWA code's Tiny-ImageNet teacher ``MyResNet34``: torchvision's ResNet held in ``.resnet``, its stem a
3x3 stride-1 convolution *with* bias, no max-pool, global average pooling; ImageNet normalisation. State-dict layout,
the published one, so a published checkpoint loads strictly with ``src_ckpt``::

    resnet.conv1.{weight,bias}, resnet.bn1, resnet.layer1..4.<i>.{conv1,bn1,conv2,bn2,downsample.0,downsample.1},
    resnet.fc

.. code-block:: yaml

    models:
      teacher_model: {key: 'resnet34_tinyimagenet', kwargs: {num_classes: 200}, src_ckpt: 'teacher.pth'}
      student_model: {key: 'resnet18_tinyimagenet', kwargs: {num_classes: 200}, dst_ckpt: 'student.pt'}
"""
from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn
from torchvision.models import resnet18, resnet34

from .timm_compat import TimmCompatible, checked_kwargs, register_both

__all__ = ['TinyImageNetResNet']


class TinyImageNetResNet(TimmCompatible):
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


@register_both
def resnet18_tinyimagenet(pretrained: bool = False, num_classes: int = 200, **kwargs: Any) -> TinyImageNetResNet:
    """ResNet-18 for 64x64 Tiny-ImageNet images (the paper's student), LRWA code layout ``resnet.*``.

    .. code-block:: yaml

        student_model: {key: 'resnet18_tinyimagenet', kwargs: {num_classes: 200}, dst_ckpt: 'student.pt'}
    """
    kwargs = checked_kwargs('resnet18_tinyimagenet', pretrained, kwargs)
    return TinyImageNetResNet(18, num_classes=num_classes, name='resnet18_tinyimagenet', **kwargs)


@register_both
def resnet34_tinyimagenet(pretrained: bool = False, num_classes: int = 200, **kwargs: Any) -> TinyImageNetResNet:
    """ResNet-34 for 64x64 Tiny-ImageNet images (the paper's teacher, ``MyResNet34``), layout ``resnet.*``.

    .. code-block:: yaml

        teacher_model: {key: 'resnet34_tinyimagenet', kwargs: {num_classes: 200}, src_ckpt: 'teacher.pth'}
    """
    kwargs = checked_kwargs('resnet34_tinyimagenet', pretrained, kwargs)
    return TinyImageNetResNet(34, num_classes=num_classes, name='resnet34_tinyimagenet', **kwargs)
