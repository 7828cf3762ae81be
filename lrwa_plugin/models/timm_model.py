"""The ``timm_model`` factory: any timm architecture as a torchdistill model, weights only from a local file.

Data-free distillation needs a trained teacher and, usually, a freshly initialised student of a timm architecture.
This module registers :func:`timm_model` in torchdistill's model registry, so a torchdistill YAML can say::

    models:
      teacher_model:
        key: 'timm_model'
        kwargs: {model_name: 'resnet18', num_classes: 10, checkpoint_path: 'teacher.pth'}

and ``torchdistill.models.registry.get_model('timm_model', **kwargs)`` builds it. Without ``checkpoint_path`` the
network is randomly initialised (a student); with it, the file must exist and match the architecture exactly
(:func:`lrwa_plugin.run.checkpoint.load_weights_strictly`), so a typo never yields a silently random teacher. Nothing is
ever downloaded: ``pretrained=True`` and ``hf-hub:`` names are refused.

Known timm pitfall, avoided here: ``timm.create_model(name, pretrained=True, num_classes=10,
pretrained_cfg_overlay=dict(file='teacher.pth'))`` goes through ``timm.models._builder.load_pretrained``, which
compares ``num_classes`` with the *registry* config's ``num_classes`` (1000 unless the overlay sets it) and, when they
differ, drops the classifier weights from the file and loads non-strictly: the backbone is the file's but the
classifier is random. We build with ``pretrained=False`` and load the file ourselves, strictly.

The model keeps timm's ``pretrained_cfg`` (``input_size``, ``mean``, ``std``, ...) for other code to read. Beware that
it describes the *registry* weights: its ``num_classes`` stays 1000 and its ``input_size`` keeps 3 channels even when
``num_classes``/``in_chans`` are overridden; use ``model.num_classes`` and :func:`input_shape_of` instead.
"""
from __future__ import annotations

import difflib
import logging
import os
from typing import Any

import timm
from timm.models import get_model_input_config, parse_model_name, split_model_name_tag
from torch import nn
from torchdistill.models.registry import register_model

from ..errors import ConfigError
from ..run.checkpoint import load_weights_strictly
from ..util import first_line

logger = logging.getLogger(__name__)

__all__ = ['timm_model', 'input_shape_of']

_MAX_SUGGESTIONS = 5


def _check_model_name(model_name: str) -> None:
    """Refuses names that would need the network or are not timm architectures (with close matches)."""
    source, model_id = parse_model_name(model_name)
    if source == 'hf-hub':
        raise ConfigError('model_name', f"'{model_name}' would be fetched from the Hugging Face Hub, but nothing "
                                        "can be downloaded; use the architecture name (e.g. 'resnet18') plus a local "
                                        'checkpoint_path')
    if source is not None:
        return  # local-dir: timm reads the config from that folder
    arch, _ = split_model_name_tag(model_id)
    if timm.is_model(arch):
        return
    matches = difflib.get_close_matches(arch, timm.list_models(), n=_MAX_SUGGESTIONS, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(m) for m in matches)}?" if matches else '; see timm.list_models()'
    raise ConfigError('model_name', f"unknown timm model '{model_name}'{hint}")


@register_model(key='timm_model')
def timm_model(model_name: str, num_classes: int | None = None, checkpoint_path: str | os.PathLike | None = None,
               pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Builds a timm model and, if given, loads its weights strictly from a local checkpoint.

    Args:
        model_name: timm architecture, e.g. ``'resnet18'`` (a pretrained tag such as ``'resnet18.a1_in1k'`` only
            selects the ``pretrained_cfg``; no weights are fetched).
        num_classes: Classifier size; ``None`` keeps timm's default (usually 1000).
        checkpoint_path: Local ``.pth``/``.pt``/``.safetensors`` file (bare state dict, torchdistill ``save_ckpt``
            layout, DDP ``module.`` prefix all accepted). ``None`` means random initialisation.
        pretrained: Must stay False: nothing can be downloaded. Pass ``checkpoint_path`` instead.
        **kwargs: Passed to :func:`timm.create_model` (``in_chans``, ``drop_rate``, ``img_size``, ...).

    Returns:
        The model, with timm's ``pretrained_cfg`` attribute.

    Raises:
        ValueError: ``pretrained=True``, an unknown or remote ``model_name``, or an unreadable/mismatching checkpoint.
        ConfigError: an argument that cannot work, e.g. a ``checkpoint_path`` that does not exist or does not fit
            (its ``path`` names the argument).
    """
    if pretrained:
        raise ConfigError('pretrained', 'true is refused because nothing can be downloaded; set pretrained: False '
                                        'and pass checkpoint_path to a local weights file instead')
    _check_model_name(model_name)
    if num_classes is not None:
        kwargs['num_classes'] = num_classes
    model = timm.create_model(model_name, pretrained=False, **kwargs)
    if checkpoint_path is None:
        logger.info('timm_model %s: no checkpoint_path, weights are randomly initialised', model_name)
    else:
        try:
            load_weights_strictly(model, checkpoint_path)
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError('checkpoint_path', first_line(error, limit=None)) from error
        logger.info("timm_model %s: loaded weights from '%s'", model_name, os.fspath(checkpoint_path))
    return model


def input_shape_of(model: nn.Module) -> tuple[int, int, int] | None:
    """Returns the ``(channels, height, width)`` input a timm model expects, or None if it does not say.

    Starts from ``pretrained_cfg['input_size']`` and honours what the model was actually built with, which
    ``pretrained_cfg`` does not reflect: ``in_chans`` (e.g. ``in_chans=1``) and ``img_size`` when one was passed
    (via :func:`timm.models.get_model_input_config`).

    Args:
        model: Typically the result of :func:`timm_model`.

    Returns:
        The input shape, or None when the model has no ``pretrained_cfg['input_size']`` (e.g. not a timm model).
    """
    cfg = getattr(model, 'pretrained_cfg', None)
    if not isinstance(cfg, dict) or cfg.get('input_size') is None:
        return None
    channels, height, width = (int(v) for v in get_model_input_config(model)['input_size'])
    return channels, height, width
