"""What makes the small-image networks usable both as torchdistill models and as timm models.

DAFL, DFAD, CMI, Fast-DFKD, MB-DFKD, PRE-DFKD and the LRWA paper (Patel, Mopuri, Qiu, CVPR 2023) all distil between
the same CIFAR / Tiny-ImageNet networks (:mod:`~lrwa_plugin.models.resnet_cifar`,
:mod:`~lrwa_plugin.models.wide_resnet`, :mod:`~lrwa_plugin.models.mobilenet_cifar`,
:mod:`~lrwa_plugin.models.resnet_tinyimagenet`). Each of their builders is decorated with :func:`register_both`,
which registers it twice, under the same name: with torchdistill's ``register_model`` (``key: 'resnet34_cifar'`` in
a YAML) and with timm's ``register_model`` (``timm.create_model('resnet34_cifar', num_classes=100)``, hence also
``{key: 'timm_model', kwargs: {model_name: 'resnet34_cifar'}}``), and records the name in :data:`MODEL_NAMES`.

Every such model derives from :class:`TimmCompatible`, so it carries a timm-style ``pretrained_cfg`` (``input_size``,
``mean``, ``std``, ``num_classes``, ...) plus ``num_classes`` and ``in_chans``, and
:func:`lrwa_plugin.models.timm_model.input_shape_of` and timm's data config helpers read their input from the model.
No weights are ever downloaded: :func:`checked_kwargs` refuses ``pretrained=True``; a published checkpoint is loaded
strictly from a local file (``src_ckpt``, :func:`lrwa_plugin.run.checkpoint.load_weights_strictly`).

.. code-block:: yaml

    models:
      teacher_model: {key: 'resnet34_cifar', kwargs: {num_classes: 100}, src_ckpt: 'cifar100_resnet34.pth'}
      student_model: {key: 'timm_model', kwargs: {model_name: 'resnet18_cifar', num_classes: 100}}
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from timm.models import register_model as timm_register_model
from torch import Tensor, nn
from torch.nn import functional as F
from torchdistill.models.registry import register_model

__all__ = ['TimmCompatible', 'make_pretrained_cfg', 'register_both', 'checked_kwargs', 'MODEL_NAMES']

#: Every name registered with torchdistill and with timm through :func:`register_both`, in registration order.
MODEL_NAMES: list[str] = []


def make_pretrained_cfg(name: str, num_classes: int, in_chans: int, img_size: int, mean: tuple[float, ...],
                        std: tuple[float, ...], first_conv: str, classifier: str) -> dict[str, Any]:
    """A timm-style ``pretrained_cfg`` describing the data the network expects (no weights to download)."""
    return {'architecture': name, 'num_classes': num_classes, 'input_size': (in_chans, img_size, img_size),
            'fixed_input_size': False, 'mean': mean, 'std': std, 'interpolation': 'bilinear', 'crop_pct': 1.0,
            'first_conv': first_conv, 'classifier': classifier, 'license': 'apache-2.0'}


class TimmCompatible(nn.Module):
    """What timm code reads from a model: ``pretrained_cfg`` (alias ``default_cfg``), ``num_classes``, ``in_chans``,
    ``get_classifier`` / ``reset_classifier`` and ``forward_features`` / ``forward_head``."""

    #: Attribute path of the final linear layer (also the ``ActivationNormLoss`` module path of DAFL's ``f_T``).
    classifier_path: str = 'linear'
    pretrained_cfg: dict[str, Any]

    def _set_cfg(self, name: str, num_classes: int, in_chans: int, img_size: int, mean: tuple[float, ...],
                 std: tuple[float, ...], first_conv: str) -> None:
        self.num_classes, self.in_chans = num_classes, in_chans
        self.pretrained_cfg = make_pretrained_cfg(name, num_classes, in_chans, img_size, mean, std, first_conv,
                                                  self.classifier_path)
        self.default_cfg = self.pretrained_cfg

    def get_classifier(self) -> nn.Linear:
        return self.get_submodule(self.classifier_path)

    def reset_classifier(self, num_classes: int) -> None:
        """Replaces the final linear layer by a freshly initialised one with ``num_classes`` outputs."""
        old = self.get_classifier()
        parent_path, _, name = self.classifier_path.rpartition('.')
        parent = self.get_submodule(parent_path) if parent_path else self
        setattr(parent, name, nn.Linear(old.in_features, num_classes))
        self.num_classes = num_classes
        self.pretrained_cfg = {**self.pretrained_cfg, 'num_classes': num_classes}
        self.default_cfg = self.pretrained_cfg

    def forward_features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Global average pooling of the feature map, then (unless ``pre_logits``) the final linear layer."""
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def register_both(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Registers ``builder`` with torchdistill and timm under its function name."""
    MODEL_NAMES.append(builder.__name__)
    return register_model(key=builder.__name__)(timm_register_model(builder))


def checked_kwargs(name: str, pretrained: bool, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Refuses ``pretrained=True`` (nothing is downloaded) and drops the arguments timm's factory always passes."""
    if pretrained:
        raise ValueError(f'{name}: pretrained=True is refused: there are no weights to download; load a local '
                         'checkpoint instead (src_ckpt, or timm_model with checkpoint_path)')
    for key in ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir'):
        kwargs.pop(key, None)
    return kwargs
