"""Small CNNs for scikit-learn's ``1x8x8`` digits: a teacher and a smaller student for the offline demo.

Both use BatchNorm, so the teacher's running statistics can guide the generator (BN-statistics matching, as in
DeepInversion, Yin et al., CVPR 2020) and the student exercises the BatchNorm policy of the meta step.

.. code-block:: yaml

    models:
      teacher_model: {key: 'DigitsTeacherCNN', kwargs: {num_classes: 10}, src_ckpt: 'resource/ckpt/digits/teacher.pt'}
      student_model: {key: 'DigitsStudentCNN', kwargs: {num_classes: 10}, dst_ckpt: 'resource/ckpt/digits/lrwa_mb.pt'}
"""
from __future__ import annotations

from torch import Tensor, nn
from torchdistill.models.registry import register_model


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class _DigitsCNN(nn.Module):
    def __init__(self, widths: tuple[int, ...], num_classes: int, in_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for i, width in enumerate(widths):
            layers.append(_conv_bn_relu(channels, width))
            if i == 1:
                layers.append(nn.MaxPool2d(2))
            channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


@register_model
class DigitsTeacherCNN(_DigitsCNN):
    """Teacher for 8x8 digits: 32-64-128 channels, about 93k parameters, ~98% top-1 after a minute on a CPU.

    Args:
        num_classes: number of classes.
        in_channels: input channels.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__((32, 64, 128), num_classes, in_channels)


@register_model
class DigitsStudentCNN(_DigitsCNN):
    """Student for 8x8 digits: 16-32 channels, about 5k parameters.

    Args:
        num_classes: number of classes.
        in_channels: input channels.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__((16, 32), num_classes, in_channels)
