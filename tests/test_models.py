"""Digits CNNs, generators (DAFL, DCGAN), the replay VAE and the generator/teacher shape check."""
from __future__ import annotations

import math

import pytest
import torch
from torchdistill.models.registry import get_model

import lrwa_plugin  # noqa: F401  (registers the models)
from lrwa_plugin.models.sample_shape import check_generator_fits_teacher


@pytest.mark.parametrize('key', ['DigitsTeacherCNN', 'DigitsStudentCNN'])
def test_digits_cnns_map_digits_to_logits(key):
    model = get_model(key, num_classes=10)
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.parametrize('img_size, nc', [(8, 1), (32, 3)])
def test_dafl_generator_output_shape_and_standardised_channels(img_size, nc):
    generator = get_model('DAFLGenerator', nz=16, img_size=img_size, nc=nc, ngf=16)
    x = generator(generator.sample_latent(32))
    assert x.shape == (32, nc, img_size, img_size) == (32, *generator.output_shape)
    # the final BatchNorm without affine standardises each channel of a training batch
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(nc), atol=1e-4)
    assert not generator.block2[-1].affine


def test_dafl_generator_rejects_sizes_it_cannot_make():
    with pytest.raises(ValueError, match='img_size'):
        get_model('DAFLGenerator', img_size=10)


# ---------------------------------------------------------------------------------------- spectral norm
def test_dafl_generator_spectral_norm_bounds_every_conv_and_linear_weight():
    torch.manual_seed(0)
    generator = get_model('DAFLGenerator', nz=8, img_size=8, nc=1, ngf=16, spectral_norm=True)
    layers = [m for m in generator.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) == 4 and all(torch.nn.utils.parametrize.is_parametrized(m, 'weight') for m in layers)
    for _ in range(30):  # each training-mode forward runs one power iteration per layer
        x = generator(generator.sample_latent(4))
    assert x.shape == (4, 1, 8, 8)
    for layer in layers:
        sigma = torch.linalg.matrix_norm(layer.weight.detach().flatten(1), ord=2)
        assert sigma.item() == pytest.approx(1.0, abs=0.05)
    plain = get_model('DAFLGenerator', nz=8, img_size=8, nc=1, ngf=16)
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in plain.modules())


# ------------------------------------------------------------------------------------------------ DCGAN
@pytest.mark.parametrize('img_size, nc', [(8, 1), (16, 3), (32, 3), (64, 3)])
def test_dcgan_generator_shapes_and_tanh_range(img_size, nc):
    torch.manual_seed(0)
    generator = get_model('DCGANGenerator', nz=16, img_size=img_size, nc=nc, ngf=8)
    x = generator(generator.sample_latent(3))
    assert x.shape == (3, nc, img_size, img_size) == (3, *generator.output_shape)
    assert x.abs().max() <= 1.0 and x.std() > 0
    transposed = [m for m in generator.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(transposed) == 1 + round(math.log2(img_size // 4))


def test_dcgan_generator_with_spectral_norm_and_bad_sizes():
    generator = get_model('DCGANGenerator', nz=4, img_size=16, nc=1, ngf=4, spectral_norm=True)
    assert all(torch.nn.utils.parametrize.is_parametrized(m, 'weight') for m in generator.modules()
               if isinstance(m, torch.nn.ConvTranspose2d))
    for size in (4, 12, 24):
        with pytest.raises(ValueError, match='4 times a power of two'):
            get_model('DCGANGenerator', img_size=size)


# ------------------------------------------------------------------------------- generator fits teacher
def test_generator_that_fits_the_teacher_passes_and_changes_nothing():
    teacher = get_model('DigitsTeacherCNN', num_classes=10).train()
    generator = get_model('DAFLGenerator', nz=8, img_size=8, nc=1, ngf=16).train()
    rng = torch.get_rng_state()
    running = generator.bn0.running_mean.clone()
    assert check_generator_fits_teacher(generator, teacher) == (1, 8, 8)
    assert torch.equal(torch.get_rng_state(), rng)  # a run draws the same numbers with or without the check
    assert torch.equal(generator.bn0.running_mean, running)  # eval mode: no BatchNorm statistics moved
    assert generator.training and teacher.training


def test_channel_mismatch_with_a_plain_teacher_names_both_shapes():
    teacher = get_model('DigitsTeacherCNN', num_classes=10)
    generator = get_model('DCGANGenerator', nz=8, img_size=8, nc=3, ngf=8)
    with pytest.raises(ValueError) as info:
        check_generator_fits_teacher(generator, teacher, 'train.data_free.generator')
    message = str(info.value)
    assert message.startswith('train.data_free.generator.kwargs.nc: ') and '\n' not in message
    assert '3x8x8' in message and '1x?x? (its first convolution)' in message


def test_timm_teacher_shape_from_its_config():
    from lrwa_plugin.models.timm_model import timm_model
    vit = timm_model('test_vit', num_classes=10)  # fixed input size: 3x160x160
    with pytest.raises(ValueError, match=r'shape 3x32x32 but the teacher expects 3x160x160 \(its timm config\)'):
        check_generator_fits_teacher(get_model('DCGANGenerator', nz=8, img_size=32, nc=3, ngf=4), vit)
    resnet = timm_model('test_resnet', num_classes=10)  # a CNN: any size its pooling takes, but 3 channels
    assert check_generator_fits_teacher(get_model('DCGANGenerator', nz=8, img_size=32, nc=3, ngf=4), resnet) \
        == (3, 32, 32)
    with pytest.raises(ValueError, match=r'shape 1x32x32 but the teacher expects 3x160x160'):
        check_generator_fits_teacher(get_model('DCGANGenerator', nz=8, img_size=32, nc=1, ngf=4), resnet)


# -------------------------------------------------------------------------------------------------- VAE
def test_replay_vae_reconstructs_and_decodes_generator_shaped_samples():
    torch.manual_seed(0)
    vae = get_model('ReplayVAE', nz=8, img_size=8, nc=1, nef=8, ngf=16)
    x = torch.randn(5, 1, 8, 8)
    reconstruction, mu, log_var = vae(x)
    assert reconstruction.shape == x.shape and mu.shape == log_var.shape == (5, 8)
    assert vae.decode(vae.sample_latent(3)).shape == (3, *vae.output_shape)
    dcgan = get_model('ReplayVAE', nz=8, img_size=16, nc=3,
                      decoder={'key': 'DCGANGenerator', 'kwargs': {'nz': 8, 'img_size': 16, 'nc': 3, 'ngf': 4}})
    assert dcgan.decode(dcgan.sample_latent(2)).abs().max() <= 1.0
    with pytest.raises(ValueError, match="decoder.kwargs.nz: 4 must equal the VAE's nz"):
        get_model('ReplayVAE', nz=8, img_size=8, nc=1, decoder={'key': 'DAFLGenerator', 'kwargs': {'nz': 4}})
