"""``ReplayVAE``: the variational autoencoder behind generative replay (PRE-DFKD, Binici et al., AAAI 2022).

A convolutional encoder maps a generated sample to ``q(z|x) = N(μ, diag σ²)``; the decoder is a *generator*
(``DAFLGenerator`` by default, the same architecture as the PRE-DFKD/LRWA "memory generator"), so the replayed
samples have the shape and the value range of the samples the student is trained on. Replay decodes ``z ~ N(0, I)``.
It is trained by :class:`lrwa_plugin.replay.GenerativeReplay`, which also owns its optimizer and loss.

.. code-block:: yaml

    train:
      data_free:
        replay:
          key: 'GenerativeReplay'
          kwargs:
            vae: {key: 'ReplayVAE', kwargs: {nz: 64, img_size: 8, nc: 1, nef: 32, ngf: 64}}
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchdistill.models.registry import get_model, register_model

from ..errors import ConfigError
from .generators import DAFLGenerator

__all__ = ['ReplayVAE']


def _conv_block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3 if stride == 1 else 4, stride, 1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.LeakyReLU(0.2, inplace=True))


@register_model
class ReplayVAE(nn.Module):
    """VAE with a convolutional encoder and a generator as decoder (PRE-DFKD's encoder + memory generator).

    Encoder: a stride-1 and two stride-2 conv-BN-LeakyReLU blocks (``img_size → img_size/4``), average-pooled to at
    most ``4 x 4``, then two linear heads for ``μ`` and ``log σ²``.

    Args:
        nz: latent size.
        img_size: sample height and width (a multiple of 4).
        nc: sample channels.
        nef: channels of the encoder's first block (doubled by the strided ones).
        ngf: ``ngf`` of the default ``DAFLGenerator`` decoder.
        decoder: ``{key, kwargs}`` of another registered generator as decoder (its ``nz`` must equal ``nz``);
            default ``DAFLGenerator(nz, img_size, nc, ngf)``.

    .. code-block:: yaml

        vae: {key: 'ReplayVAE', kwargs: {nz: 64, img_size: 32, nc: 3,
                                         decoder: {key: 'DCGANGenerator', kwargs: {nz: 64, img_size: 32, nc: 3}}}}
    """

    def __init__(self, nz: int = 64, img_size: int = 32, nc: int = 3, nef: int = 32, ngf: int = 64,
                 decoder: dict[str, Any] | None = None) -> None:
        super().__init__()
        if img_size <= 0 or img_size % 4 != 0:
            raise ConfigError('img_size', f'must be a positive multiple of 4, got {img_size}')
        self.nz, self.img_size, self.nc = nz, img_size, nc
        pooled = min(img_size // 4, 4)
        self.encoder = nn.Sequential(_conv_block(nc, nef, 1), _conv_block(nef, 2 * nef, 2),
                                     _conv_block(2 * nef, 2 * nef, 2), nn.AdaptiveAvgPool2d(pooled), nn.Flatten())
        self.fc_mu = nn.Linear(2 * nef * pooled ** 2, nz)
        self.fc_log_var = nn.Linear(2 * nef * pooled ** 2, nz)
        if decoder is None:
            self.decoder: nn.Module = DAFLGenerator(nz=nz, img_size=img_size, nc=nc, ngf=ngf)
        else:
            self.decoder = get_model(decoder['key'], **decoder.get('kwargs', {}))
            if getattr(self.decoder, 'nz', nz) != nz:
                raise ConfigError('decoder.kwargs.nz', f"{self.decoder.nz} must equal the VAE's nz ({nz})")

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """The shape ``(C, H, W)`` of one decoded sample."""
        return self.nc, self.img_size, self.img_size

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns ``(μ, log σ²)`` of ``q(z|x)``."""
        h = self.encoder(x)
        return self.fc_mu(h), self.fc_log_var(h)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Reconstructs ``x`` through ``z = μ + σ ε`` (``ε`` from ``generator``); returns ``(x̂, μ, log σ²)``."""
        mu, log_var = self.encode(x)
        eps = torch.randn(mu.shape, generator=generator, device='cpu' if generator is not None else mu.device)
        z = mu + torch.exp(0.5 * log_var) * eps.to(mu.device)
        return self.decoder(z), mu, log_var

    def sample_latent(self, batch_size: int, device: torch.device | str | None = None,
                      generator: torch.Generator | None = None) -> Tensor:
        """Draws ``z ~ N(0, I)`` of shape ``(batch_size, nz)`` (on CPU when ``generator`` is given, then moved)."""
        z = torch.randn(batch_size, self.nz, generator=generator, device=None if generator is not None else device)
        return z.to(device)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)
