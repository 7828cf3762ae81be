"""Generators that synthesise pseudo-samples ``x = G(z)`` for data-free distillation.

* ``DAFLGenerator`` follows the generator of DAFL (Chen et al., "Data-Free Learning of Student Networks", ICCV 2019),
  which DFAD, MB-DFKD, PRE-DFKD and the LRWA paper (Patel, Mopuri, Qiu, CVPR 2023) all reuse: a linear projection of
  ``z`` to a ``128 x s/4 x s/4`` map, two nearest-neighbour upsamplings with conv-BN-LeakyReLU blocks, a ``tanh`` and
  a final BatchNorm without affine parameters, so that a batch of samples is standardised per channel like the
  teacher's normalised inputs. ``spectral_norm: true`` puts spectral normalisation (Miyato et al., ICLR 2018) on its
  convolutions and its linear layer, as the PRE-DFKD/LRWA code does on its convolutions.
* ``DCGANGenerator`` is the generator of DCGAN (Radford, Metz, Chintala, ICLR 2016): transposed convolutions that
  double the resolution from ``4 x 4``, BatchNorm and ReLU, and a ``tanh`` output in ``[-1, 1]``.

Both draw ``z ~ N(0, I)`` with ``sample_latent`` and tell their sample shape with ``output_shape``; whether their
samples fit the teacher and the evaluation data is checked by :mod:`lrwa_plugin.models.sample_shape`.

.. code-block:: yaml

    train:
      data_free:
        generator:
          key: 'DAFLGenerator'          # or 'DCGANGenerator'
          kwargs: {nz: 256, img_size: 8, nc: 1, spectral_norm: false}
          optimizer: {key: 'Adam', kwargs: {lr: 0.001}}
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchdistill.models.registry import register_model

from ..config.checks import count
from ..errors import ConfigError

__all__ = ['DAFLGenerator', 'DCGANGenerator']


def _with_spectral_norm(module: nn.Module) -> None:
    """Spectral normalisation on the weight of every convolution (also transposed) and linear layer of ``module``."""
    for child in list(module.modules()):
        if isinstance(child, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.utils.parametrizations.spectral_norm(child)


class _LatentGenerator(nn.Module):
    """What the data-free box needs of a generator: ``sample_latent``, ``output_shape`` and ``forward(z)``."""

    def __init__(self, nz: int, img_size: int, nc: int) -> None:
        super().__init__()
        self.nz, self.img_size, self.nc = count(nz, 'nz'), count(img_size, 'img_size'), count(nc, 'nc')

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """The shape ``(C, H, W)`` of one generated sample."""
        return self.nc, self.img_size, self.img_size

    def sample_latent(self, batch_size: int, device: torch.device | str | None = None,
                      generator: torch.Generator | None = None) -> Tensor:
        """Draws ``z ~ N(0, I)`` of shape ``(batch_size, nz)``."""
        return torch.randn(batch_size, self.nz, device=device, generator=generator)


@register_model
class DAFLGenerator(_LatentGenerator):
    """DAFL-style generator ``G: z -> x`` (DAFL, Chen et al., ICCV 2019).

    Args:
        nz: latent size (the paper uses 1000 on CIFAR).
        img_size: output height and width; must be a multiple of 4.
        nc: output channels.
        ngf: channels of the first feature map.
        spectral_norm: spectral normalisation on every convolution and the linear projection.

    .. code-block:: yaml

        generator:
          key: 'DAFLGenerator'
          kwargs: {nz: 64, img_size: 8, nc: 1, ngf: 64, spectral_norm: true}
    """

    def __init__(self, nz: int = 100, img_size: int = 32, nc: int = 3, ngf: int = 128,
                 spectral_norm: bool = False) -> None:
        super().__init__(nz, img_size, nc)
        if img_size % 4 != 0:
            raise ConfigError('img_size', f'must be a positive multiple of 4, got {img_size}')
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
        if spectral_norm:
            _with_spectral_norm(self)

    def forward(self, z: Tensor) -> Tensor:
        out = self.project(z).view(z.shape[0], -1, self.init_size, self.init_size)
        out = F.interpolate(self.bn0(out), scale_factor=2)
        out = F.interpolate(self.block1(out), scale_factor=2)
        return self.block2(out)


@register_model
class DCGANGenerator(_LatentGenerator):
    """DCGAN generator (Radford, Metz, Chintala, ICLR 2016): ``z`` as a ``1 x 1`` map, transposed convolutions.

    A ``4 x 4`` transposed convolution makes a ``4 x 4`` map of ``ngf · 2^(k-1)`` channels, then ``k`` stride-2
    transposed convolutions (``4 x 4`` kernels) halve the channels and double the resolution up to ``img_size =
    4 · 2^k``; BatchNorm and ReLU between them, ``tanh`` at the end, so samples lie in ``[-1, 1]``. Weights are
    initialised as in DCGAN (``N(0, 0.02)``; BatchNorm scales ``N(1, 0.02)``).

    Args:
        nz: latent size.
        img_size: output height and width: 8, 16, 32, 64, ... (4 times a power of two, at least 8).
        nc: output channels.
        ngf: channels of the last hidden map (64 in DCGAN).
        spectral_norm: spectral normalisation on every transposed convolution.

    .. code-block:: yaml

        generator:
          key: 'DCGANGenerator'
          kwargs: {nz: 100, img_size: 32, nc: 3, ngf: 64}
    """

    def __init__(self, nz: int = 100, img_size: int = 32, nc: int = 3, ngf: int = 64,
                 spectral_norm: bool = False) -> None:
        super().__init__(nz, img_size, nc)
        doublings = round(math.log2(img_size / 4)) if img_size >= 8 else 0
        if doublings < 1 or 4 * 2 ** doublings != img_size:
            raise ConfigError('img_size', 'must be 4 times a power of two (8, 16, 32, 64, ...), '
                             f'got {img_size}')
        channels = ngf * 2 ** (doublings - 1)
        layers: list[nn.Module] = [nn.ConvTranspose2d(nz, channels, 4, 1, 0, bias=False), nn.BatchNorm2d(channels),
                                   nn.ReLU(inplace=True)]
        for _ in range(doublings - 1):
            layers += [nn.ConvTranspose2d(channels, channels // 2, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(channels // 2), nn.ReLU(inplace=True)]
            channels //= 2
        layers += [nn.ConvTranspose2d(channels, nc, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.ConvTranspose2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)
        if spectral_norm:
            _with_spectral_norm(self)

    def forward(self, z: Tensor) -> Tensor:
        return self.main(z.view(z.shape[0], self.nz, 1, 1))


