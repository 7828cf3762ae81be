"""Wide ResNets WRN-16-1, WRN-16-2, WRN-40-1 and WRN-40-2 for 32x32 CIFAR images: the WRN teacher / student pairs
of the LRWA code (and of CMI and Fast-DFKD, whose usual teacher is WRN-40-2).

Origin: Zagoruyko & Komodakis (2016) in ZSKT's ``wresnet.py`` layout, reused by CMI, Fast-DFKD and the LRWA code:
pre-activation blocks, stage widths ``16k, 32k, 64k`` after a 16-channel stem, the published initialisation.
State-dict layout, the published one, so a published checkpoint loads strictly with ``src_ckpt``::

    conv1, block1..3.layer.<i>.{bn1,conv1,bn2,conv2,convShortcut}, bn1, fc

.. code-block:: yaml

    models:
      teacher_model: {key: 'wrn_40_2', kwargs: {num_classes: 10}, src_ckpt: 'cifar10_wrn_40_2.pth'}
      student_model: {key: 'wrn_16_1', kwargs: {num_classes: 10}, dst_ckpt: 'student.pt'}
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F

from ..datasets import CIFAR_MEAN, CIFAR_STD
from .timm_compat import TimmCompatible, checked_kwargs, register_both

__all__ = ['WideBasicBlock', 'WideResNet']


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


class WideResNet(TimmCompatible):
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


def _wrn(name: str, depth: int, widen_factor: int, pretrained: bool, num_classes: int,
         kwargs: dict[str, Any]) -> WideResNet:
    kwargs = checked_kwargs(name, pretrained, kwargs)
    return WideResNet(depth, widen_factor, num_classes=num_classes, name=name, **kwargs)


@register_both
def wrn_16_1(pretrained: bool = False, num_classes: int = 10, **kwargs: Any) -> WideResNet:
    """WRN-16-1 for 32x32 images (a student in the LRWA code), layout ``conv1 ... fc``.

    .. code-block:: yaml

        student_model: {key: 'wrn_16_1', kwargs: {num_classes: 100}, dst_ckpt: 'student.pt'}
    """
    return _wrn('wrn_16_1', 16, 1, pretrained, num_classes, kwargs)


@register_both
def wrn_16_2(pretrained: bool = False, num_classes: int = 10, **kwargs: Any) -> WideResNet:
    """WRN-16-2 for 32x32 images (a student in the LRWA code), layout ``conv1 ... fc``.

    .. code-block:: yaml

        student_model: {key: 'wrn_16_2', kwargs: {num_classes: 100}, dst_ckpt: 'student.pt'}
    """
    return _wrn('wrn_16_2', 16, 2, pretrained, num_classes, kwargs)


@register_both
def wrn_40_1(pretrained: bool = False, num_classes: int = 10, **kwargs: Any) -> WideResNet:
    """WRN-40-1 for 32x32 images (a student in the LRWA code), layout ``conv1 ... fc``.

    .. code-block:: yaml

        student_model: {key: 'wrn_40_1', kwargs: {num_classes: 100}, dst_ckpt: 'student.pt'}
    """
    return _wrn('wrn_40_1', 40, 1, pretrained, num_classes, kwargs)


@register_both
def wrn_40_2(pretrained: bool = False, num_classes: int = 10, **kwargs: Any) -> WideResNet:
    """WRN-40-2 for 32x32 images (the usual teacher of WRN students in CMI / Fast-DFKD), layout ``conv1 ... fc``.

    .. code-block:: yaml

        teacher_model: {key: 'wrn_40_2', kwargs: {num_classes: 10}, src_ckpt: 'cifar10_wrn_40_2.pth'}
    """
    return _wrn('wrn_40_2', 40, 2, pretrained, num_classes, kwargs)
