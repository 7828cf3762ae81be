"""MobileNetV2 for 32x32 CIFAR images: a lightweight student of the PRE-DFKD and LRWA code.

Origin: Sandler et al. (2018), torchvision's ``mobilenet_v2`` with a stride-1 first convolution, as the PRE-DFKD /
LRWA ``MobileNetV2``. State-dict layout, torchvision's, so a published checkpoint loads strictly with ``src_ckpt``::

    features.*, classifier.1

.. code-block:: yaml

    models:
      teacher_model: {key: 'resnet34_cifar', kwargs: {num_classes: 100}, src_ckpt: 'cifar100_resnet34.pth'}
      student_model: {key: 'mobilenetv2_cifar', kwargs: {num_classes: 100}, dst_ckpt: 'student.pt'}
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models import mobilenet_v2

from ..datasets import CIFAR_MEAN, CIFAR_STD
from .timm_compat import TimmCompatible, checked_kwargs, register_both

__all__ = ['CifarMobileNetV2']


class CifarMobileNetV2(TimmCompatible):
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


@register_both
def mobilenetv2_cifar(pretrained: bool = False, num_classes: int = 10, **kwargs: Any) -> CifarMobileNetV2:
    """MobileNetV2 for 32x32 images (a student in the PRE-DFKD / LRWA code), layout ``features ... classifier.1``.

    .. code-block:: yaml

        student_model: {key: 'mobilenetv2_cifar', kwargs: {num_classes: 100}, dst_ckpt: 'student.pt'}
    """
    kwargs = checked_kwargs('mobilenetv2_cifar', pretrained, kwargs)
    return CifarMobileNetV2(num_classes=num_classes, name='mobilenetv2_cifar', **kwargs)
