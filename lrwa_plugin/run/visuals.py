"""What a researcher watches while a data-free run goes: TensorBoard scalars and sample grids.

- :class:`TensorBoardLogger` (only with the runner's ``--log_dir``; ``tensorboard`` is imported only then): per-epoch
  test accuracy, per-iteration loss terms of generator and student, the replay memory's fill, and the sample grids.
- :func:`save_sample_grid`: a PNG grid of samples with the teacher's predicted class under each, written at every
  evaluation for the newest generated batch and for a replayed batch.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.utils import make_grid

from ..util import atomic_write


def _grid(images: Tensor, columns: int, padding: int = 2) -> Tensor:
    images = images.detach().float().cpu()
    if images.shape[1] not in (1, 3):
        images = images[:, :3]
    return make_grid(images, nrow=columns, padding=padding, normalize=True, scale_each=True, pad_value=1.0)


def save_sample_grid(images: Tensor, labels: Tensor, path: str | os.PathLike, title: str = '',
                     columns: int = 8) -> Path:
    """Writes ``images`` as a grid with ``labels`` (e.g. the teacher's predicted classes) under each image."""
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt

    n = len(images)
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    height, width = images.shape[-2:]
    padding = max(2, height // 2)  # room for the label under each image
    grid = _grid(images, columns, padding).permute(1, 2, 0).numpy()
    fig, ax = plt.subplots(figsize=(1.0 * columns + 0.4, 1.3 * rows + 0.6), dpi=100)
    ax.imshow(grid, cmap='gray' if images.shape[1] == 1 else None, interpolation='nearest')
    for i, label in enumerate(labels.tolist()):
        row, col = divmod(i, columns)
        ax.text(padding + col * (width + padding) + width / 2, (row + 1) * (height + padding) + padding / 2,
                str(label), ha='center', va='center', fontsize=8, color='tab:red')
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Writes a matplotlib figure to ``path`` atomically (parents created; the format is the suffix's) and closes it."""
    from matplotlib import pyplot as plt

    fig.tight_layout()
    path = Path(path)
    try:
        atomic_write(path, lambda f: fig.savefig(f, format=path.suffix.lstrip('.') or 'png'))
    finally:
        plt.close(fig)
    return path


class TensorBoardLogger:
    """A thin TensorBoard ``SummaryWriter``; the import happens here, so only runs that ask for it need it.

    Args:
        log_dir: the event-file directory (the runner's ``--log_dir``).
    """

    def __init__(self, log_dir: str | os.PathLike) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError("--log_dir needs the tensorboard package: pip install -e '.[tensorboard]'") from error
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f'{prefix}/{name}', value, step)

    def image(self, tag: str, images: Tensor, step: int, columns: int = 8) -> None:
        self.writer.add_image(tag, _grid(images, min(columns, len(images))), step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def teacher_predictions(teacher: Any, images: Tensor) -> Tensor:
    """The teacher's predicted class of each image (no gradient, eval mode assumed)."""
    with torch.no_grad():
        return teacher(images).argmax(dim=1).cpu()
