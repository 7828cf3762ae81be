"""Generators that synthesise pseudo-samples ``x = G(z)`` for data-free distillation.

``DAFLGenerator`` follows the generator of DAFL (Chen et al., "Data-Free Learning of Student Networks", ICCV 2019),
which DFAD, MB-DFKD, PRE-DFKD and the LRWA paper (Patel, Mopuri, Qiu, CVPR 2023) all reuse: a linear projection of
``z`` to a ``128 x s/4 x s/4`` map, two nearest-neighbour upsamplings with conv-BN-LeakyReLU blocks, a ``tanh`` and a
final BatchNorm without affine parameters, so that a batch of samples is standardised per channel like the
teacher's normalised inputs.

.. code-block:: yaml

    train:
      data_free:
        generator:
          key: 'DAFLGenerator'
          kwargs: {nz: 256, img_size: 8, nc: 1}
          optimizer: {key: 'Adam', kwargs: {lr: 0.001}}
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchdistill.models.registry import register_model


@register_model
class DAFLGenerator(nn.Module):
    """DAFL-style generator ``G: z -> x``.

    Args:
        nz: latent size (the paper uses 1000 on CIFAR).
        img_size: output height and width; must be a multiple of 4.
        nc: output channels.
        ngf: channels of the first feature map.
    """

    def __init__(self, nz: int = 100, img_size: int = 32, nc: int = 3, ngf: int = 128) -> None:
        super().__init__()
        if img_size % 4 != 0 or img_size <= 0:
            raise ValueError(f'DAFLGenerator: img_size must be a positive multiple of 4, got {img_size}')
        self.nz, self.img_size, self.nc = nz, img_size, nc
        self.init_size = img_size // 4
        self.project = nn.Linear(nz, ngf * self.init_size ** 2)
        self.bn0 = nn.BatchNorm2d(ngf)
        self.block1 = nn.Sequential(
            nn.Conv2d(ngf, ngf, 3, padding=1, bias=False), nn.BatchNorm2d(ngf), nn.LeakyReLU(0.2, inplace=True)
        )
        self.block2 = nn.Sequential(
            nn.Conv2d(ngf, ngf // 2, 3, padding=1, bias=False), nn.BatchNorm2d(ngf // 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ngf // 2, nc, 3, padding=1), nn.Tanh(), nn.BatchNorm2d(nc, affine=False),
        )

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """The shape ``(C, H, W)`` of one generated sample."""
        return self.nc, self.img_size, self.img_size

    def sample_latent(self, batch_size: int, device: torch.device | str | None = None,
                      generator: torch.Generator | None = None) -> Tensor:
        """Draws ``z ~ N(0, I)`` of shape ``(batch_size, nz)``."""
        return torch.randn(batch_size, self.nz, device=device, generator=generator)

    def forward(self, z: Tensor) -> Tensor:
        out = self.project(z).view(z.shape[0], -1, self.init_size, self.init_size)
        out = F.interpolate(self.bn0(out), scale_factor=2)
        out = F.interpolate(self.block1(out), scale_factor=2)
        return self.block2(out)
