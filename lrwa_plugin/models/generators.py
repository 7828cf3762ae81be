"""Generators that synthesise pseudo-samples ``x = G(z)`` for data-free distillation, and the check that their samples
fit the teacher.

* ``DAFLGenerator`` follows the generator of DAFL (Chen et al., "Data-Free Learning of Student Networks", ICCV 2019),
  which DFAD, MB-DFKD, PRE-DFKD and the LRWA paper (Patel, Mopuri, Qiu, CVPR 2023) all reuse: a linear projection of
  ``z`` to a ``128 x s/4 x s/4`` map, two nearest-neighbour upsamplings with conv-BN-LeakyReLU blocks, a ``tanh`` and
  a final BatchNorm without affine parameters, so that a batch of samples is standardised per channel like the
  teacher's normalised inputs. ``spectral_norm: true`` puts spectral normalisation (Miyato et al., ICLR 2018) on its
  convolutions and its linear layer, as the PRE-DFKD/LRWA code does on its convolutions.
* ``DCGANGenerator`` is the generator of DCGAN (Radford, Metz, Chintala, ICLR 2016): transposed convolutions that
  double the resolution from ``4 x 4``, BatchNorm and ReLU, and a ``tanh`` output in ``[-1, 1]``.

Both draw ``z ~ N(0, I)`` with ``sample_latent`` and tell their sample shape with ``output_shape``.
:func:`check_generator_fits_teacher` (called by the data-free box when it is built) refuses a generator whose samples
the teacher cannot take, in one line naming both shapes.

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
from .timm_model import input_shape_of

__all__ = ['DAFLGenerator', 'DCGANGenerator', 'check_generator_fits_teacher']


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


def _shape(shape: tuple[int | str, ...]) -> str:
    return 'x'.join(str(v) for v in shape)


def _expected_shape(teacher: nn.Module) -> tuple[tuple[int | str, ...] | None, bool, str]:
    """The teacher's input shape as far as it is known, whether its height and width are fixed, and the source."""
    shape = input_shape_of(teacher)
    if shape is not None:
        cfg = getattr(teacher, 'pretrained_cfg', {})
        return shape, bool(cfg.get('fixed_input_size', False)), 'its timm config'
    first_conv = next((m for m in teacher.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is not None:
        return (first_conv.in_channels, '?', '?'), False, 'its first convolution'
    return None, False, ''


def check_generator_fits_teacher(generator: nn.Module, teacher: nn.Module, where: str = 'generator') -> tuple[int, ...]:
    """Checks that the generator's samples have the input shape the teacher expects; returns the sample shape.

    Runs ``G`` on two latents in eval mode and compares the sample shape ``C x H x W`` with the teacher's:

    * from timm's config (:func:`lrwa_plugin.models.timm_model.input_shape_of`) when the teacher has one. The channels
      must agree; height and width only when the config says ``fixed_input_size`` (ViTs): otherwise the config's
      size is merely the pretraining resolution and a CNN with global pooling takes others (a CIFAR-size resnet);
    * in every case but a fixed timm size, the teacher is also tried on the two samples (eval mode, no gradient),
      which catches what it cannot process at all (the first convolution names the channels it wants).

    Both models are put back in their modes and the global random generator is left untouched, so a run draws the
    same numbers with or without the check.

    Args:
        generator: has ``sample_latent(n, device=...)`` and ``forward(z)``.
        teacher: the (unwrapped) teacher.
        where: how the message names the generator, e.g. its config key ``train.data_free.generator``.

    Returns:
        The shape ``(C, H, W)`` of one generated sample.

    Raises:
        ConfigError: one line (at ``where``) naming the generated shape and the teacher's expected one.
    """
    modes = [(module, module.training) for module in (generator, teacher)]
    device = next((p.device for p in generator.parameters()), torch.device('cpu'))
    expected, fixed, source = _expected_shape(teacher)
    expected_text = f'{_shape(expected)} ({source})' if expected is not None else 'an unknown shape'
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            generator.eval()
            x = generator(generator.sample_latent(2, device='cpu').to(device))
            sample_shape = tuple(x.shape[1:])
            mismatch = f'makes samples of shape {_shape(sample_shape)} but the teacher expects {expected_text}'
            if expected is not None and (len(sample_shape) != len(expected) or sample_shape[0] != expected[0]
                                         or fixed and sample_shape[1:] != tuple(expected[1:])):
                raise ConfigError(where, f'{mismatch}; set the generator kwargs (nc, img_size) to match')
            if fixed:
                return sample_shape
            teacher.eval()
            try:
                teacher(x)
            except (RuntimeError, ValueError) as error:
                reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
                raise ConfigError(where, f'{mismatch}, and the teacher fails on them ({reason}); set the generator '
                                         'kwargs (nc, img_size) to match') from error
    finally:
        for module, mode in modes:
            module.train(mode)
    return sample_shape
