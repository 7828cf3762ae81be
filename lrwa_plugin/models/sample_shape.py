"""Whether a generator's samples fit what they are fed to: one rule, two targets.

A fully convolutional teacher takes inputs of any size, so a generator of the wrong ``img_size`` (or ``nc``) trains
without an error on samples unlike anything the student is evaluated on. :func:`check_sample_shape` is the one rule
(channels always; height and width where the target fixes them), applied to the teacher when the box is built
(:func:`check_generator_fits_teacher`: its timm config, or its first convolution and one forward) and to the
evaluation data before the first step (:func:`lrwa_plugin.run.trainers.check_models_agree`).

.. code-block:: yaml

    train:
      data_free:
        generator: {key: 'DAFLGenerator', kwargs: {nz: 256, img_size: 8, nc: 1}}   # must make 1x8x8 digits
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..util import first_line, modes_kept, shape_text
from .timm_model import input_shape_of

__all__ = ['check_sample_shape', 'check_generator_fits_teacher']


def check_sample_shape(generated: tuple[int, ...], expected: tuple[int | str, ...] | None, where: str,
                       target: str, source: str, spatial: bool = True) -> None:
    """Refuses samples of shape ``generated`` where ``expected`` is wanted: the channels always, height and width
    when ``spatial``. The error is at ``<where>.kwargs.nc`` or ``.img_size`` (the generator's argument to change) and
    names both shapes; ``target`` says what wants ``expected`` (``'the teacher expects'``, ...) and ``source``
    where that shape comes from; ``expected`` may hold ``'?'`` for what is unknown."""
    if expected is None:
        return
    if len(generated) != len(expected) or generated[0] != expected[0]:
        key = 'nc'
    elif spatial and tuple(generated[1:]) != tuple(expected[1:]):
        key = 'img_size'
    else:
        return
    raise ConfigError(f'{where}.kwargs.{key}', f'the generator makes samples of shape {shape_text(generated)} but '
                                               f'{target} {shape_text(expected)} ({source}): set nc and img_size to '
                                               'match')


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

    Runs ``G`` on two latents in eval mode and applies :func:`check_sample_shape` with the teacher's shape: from
    timm's config (:func:`lrwa_plugin.models.timm_model.input_shape_of`) when it has one, height and width only when
    the config says ``fixed_input_size`` (ViTs: otherwise the config's size is merely the pretraining resolution and
    a CNN with global pooling takes others); else from its first convolution. In every case but a fixed timm size
    the teacher is also tried on the two samples (eval mode, no gradient), which catches what it cannot process.

    Both models are put back in their modes and the global random generator is left untouched, so a run draws the
    same numbers with or without the check.

    Args:
        generator: has ``sample_latent(n, device=...)`` and ``forward(z)``.
        teacher: the (unwrapped) teacher.
        where: the generator's config key, e.g. ``train.data_free.generator``.

    Raises:
        ConfigError: one line naming the generated shape and the teacher's expected one.
    """
    device = next((p.device for p in generator.parameters()), torch.device('cpu'))
    expected, fixed, source = _expected_shape(teacher)
    with torch.random.fork_rng(devices=[]), torch.no_grad(), modes_kept(generator, teacher, eval_mode=True):
        x = generator(generator.sample_latent(2, device='cpu').to(device))
        sample_shape = tuple(x.shape[1:])
        check_sample_shape(sample_shape, expected, where, 'the teacher expects', source, spatial=fixed)
        if fixed:
            return sample_shape
        try:
            teacher(x)
        except (RuntimeError, ValueError) as error:
            expected_text = f'{shape_text(expected)} ({source})' if expected is not None else 'an unknown shape'
            raise ConfigError(where, f'makes samples of shape {shape_text(sample_shape)} but the teacher expects '
                                     f'{expected_text}, and the teacher fails on them ({first_line(error)}); set the '
                                     'generator kwargs (nc, img_size) to match') from error
    return sample_shape
