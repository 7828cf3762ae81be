"""LeNet-5 and LeNet-5-half for ``1x32x32`` MNIST: the teacher / student pair of DAFL and DFAD on MNIST.

As in DAFL's ``lenet.py`` (Chen et al., "Data-Free Learning of Student Networks", ICCV 2019), which DFAD (Fang et
al., 2019) reuses: a LeNet-5 (LeCun et al., 1998) with ReLU and max pooling, ``conv 1->6 k5, ReLU, maxpool 2, conv
6->16 k5, ReLU, maxpool 2, conv 16->120 k5, ReLU, fc 120->84, ReLU, fc 84->10`` (61,706 parameters); LeNet-5-half
has half the channels in every layer (``3, 8, 60, 42``; 15,738 parameters). The last linear layer is ``fc`` (DAFL's
``fc2``), whose input ``ActivationNormLoss`` hooks by default.

``batch_norm: True`` adds a ``BatchNorm2d`` after each convolution (before its ReLU), a deviation from DAFL, whose
LeNets have none: BN-statistics matching (``BNStatMatchingLoss``, as in DeepInversion, Yin et al., CVPR 2020) needs
BatchNorm in the teacher, and the shipped ``examples/configs/mnist`` use it in both models (the runs behind that
choice: docs/datasets_and_paper_scale.md). With ``batch_norm: False`` each model is exactly DAFL's.

.. code-block:: yaml

    models:
      teacher_model:
        key: 'LeNet5'
        kwargs: {num_classes: 10, batch_norm: True}
        src_ckpt: 'resource/ckpt/mnist/teacher.pt'
      student_model:
        key: 'LeNet5Half'
        kwargs: {num_classes: 10, batch_norm: True}
        dst_ckpt: 'resource/ckpt/mnist/lrwa_mb.pt'
"""
from __future__ import annotations

from torch import Tensor, nn
from torchdistill.models.registry import register_model

__all__ = ['LeNet5', 'LeNet5Half']


class _LeNet(nn.Module):
    """DAFL's LeNet-5 layout with the given widths ``(conv1, conv2, conv3, fc1)``, optionally with BatchNorm."""

    def __init__(self, widths: tuple[int, int, int, int], num_classes: int, in_channels: int,
                 batch_norm: bool) -> None:
        super().__init__()
        c1, c2, c3, f1 = widths

        def norm(channels: int) -> nn.Module:
            return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()

        self.conv1 = nn.Conv2d(in_channels, c1, kernel_size=5)
        self.bn1 = norm(c1)
        self.relu1 = nn.ReLU()
        self.maxpool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=5)
        self.bn2 = norm(c2)
        self.relu2 = nn.ReLU()
        self.maxpool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.conv3 = nn.Conv2d(c2, c3, kernel_size=5)
        self.bn3 = norm(c3)
        self.relu3 = nn.ReLU()
        self.fc1 = nn.Linear(c3, f1)
        self.relu4 = nn.ReLU()
        self.fc = nn.Linear(f1, num_classes)
        self.batch_norm = batch_norm

    def forward(self, x: Tensor) -> Tensor:
        out = self.maxpool1(self.relu1(self.bn1(self.conv1(x))))
        out = self.maxpool2(self.relu2(self.bn2(self.conv2(out))))
        out = self.relu3(self.bn3(self.conv3(out))).flatten(1)  # 32x32 input: conv3's map is 1x1
        return self.fc(self.relu4(self.fc1(out)))


@register_model
class LeNet5(_LeNet):
    """LeNet-5 as DAFL's MNIST teacher (Chen et al., ICCV 2019): 6-16-120 conv channels, 84 hidden units; takes
    ``1x32x32`` inputs. 61,706 parameters (61,990 with ``batch_norm``).

    Args:
        num_classes: number of classes.
        in_channels: input channels.
        batch_norm: a ``BatchNorm2d`` after each convolution (not in DAFL; BN-statistics matching needs it).

    .. code-block:: yaml

        teacher_model: {key: 'LeNet5', kwargs: {num_classes: 10, batch_norm: True}}
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, batch_norm: bool = False) -> None:
        super().__init__((6, 16, 120, 84), num_classes, in_channels, batch_norm)


@register_model
class LeNet5Half(_LeNet):
    """LeNet-5-half, DAFL's MNIST student (Chen et al., ICCV 2019): LeNet-5 with half the channels (3-8-60 conv
    channels, 42 hidden units). 15,738 parameters (15,880 with ``batch_norm``).

    Args:
        num_classes: number of classes.
        in_channels: input channels.
        batch_norm: a ``BatchNorm2d`` after each convolution (not in DAFL; the shipped configs use it, see the module).

    .. code-block:: yaml

        student_model: {key: 'LeNet5Half', kwargs: {num_classes: 10, batch_norm: True}}
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, batch_norm: bool = False) -> None:
        super().__init__((3, 8, 60, 42), num_classes, in_channels, batch_norm)
