"""Digits CNNs and the DAFL generator: shapes, registration, argument checks."""
from __future__ import annotations

import pytest
import torch
from torchdistill.models.registry import get_model

import lrwa_plugin  # noqa: F401  (registers the models)


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
