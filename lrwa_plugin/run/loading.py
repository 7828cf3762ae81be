"""The config file and the models of a run, loaded: a file that cannot be read, a model that cannot be built from its
kwargs, or a checkpoint that does not fit is one :class:`~lrwa_plugin.errors.ConfigError` naming the flag or key.

.. code-block:: yaml

    models:
      teacher_model: {key: 'DigitsTeacherCNN', kwargs: {num_classes: 10}, src_ckpt: 'resource/ckpt/digits/teacher.pt'}
      student_model: {key: 'DigitsStudentCNN', kwargs: {num_classes: 10}, dst_ckpt: 'resource/ckpt/digits/lrwa_mb.pt'}
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torchdistill.common import yaml_util
from torchdistill.models.official import get_image_classification_model
from torchdistill.models.registry import MODEL_DICT, get_model

from ..config.checks import check_kwargs
from ..errors import ConfigError
from ..util import first_line
from .checkpoint import load_weights_strictly


def load_config(path: str | os.PathLike) -> dict:
    """Loads a torchdistill YAML (running its ``!import_call`` tags); a file that cannot be is a ConfigError."""
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise ConfigError('--config', f"file '{path}' does not exist")
    _refuse_duplicate_keys(path)
    try:
        config = yaml_util.load_yaml_file(path)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f' at line {mark.line + 1}, column {mark.column + 1}' if mark is not None else ''
        what = error.problem or error.context or first_line(error)
        raise ConfigError('--config', f"'{path}' is not valid YAML: {what}{where}") from error
    except (yaml.YAMLError, ImportError, AttributeError, ValueError, TypeError, KeyError, OSError) as error:
        # Loading runs the !import_call / !import_get tags (datasets, transforms): a wrong name fails here.
        raise ConfigError('--config', f"'{path}' could not be loaded: {first_line(error)}") from error
    if not isinstance(config, dict):
        raise ConfigError('--config', f"'{path}' is not a YAML mapping")
    return config


class PlainLoader(yaml.SafeLoader):
    """Reads torchdistill YAML without running its ``!import_call`` tags: a tag becomes ``{'!tag': value}``."""


def _construct_tagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    if isinstance(node, yaml.MappingNode):
        value: Any = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return {f'!{suffix}': value}


PlainLoader.add_multi_constructor('!', _construct_tagged)


def read_plain(text: str) -> Any:
    """A config's text as plain data (its tags not run): what two configs are compared by."""
    return yaml.load(text, Loader=PlainLoader)


def config_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a config as plain data (comments and layout do not count; every value does)."""
    data = read_plain(Path(os.path.expanduser(os.fspath(path))).read_text(encoding='utf-8'))
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode('utf-8')).hexdigest()


class _KeyCounter(PlainLoader):
    """Finds a key given twice in one mapping (PyYAML keeps the last one silently: a user who pasted a block would
    see one value and train with the other)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key == '<<' or not isinstance(key, Hashable):
            continue
        if key in seen:
            raise _DuplicateKey(f'key {key!r} is given twice in one mapping (lines {seen[key]} and '
                                f'{key_node.start_mark.line + 1}); YAML keeps only the last')
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


class _DuplicateKey(Exception):
    pass


_KeyCounter.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _refuse_duplicate_keys(path: str) -> None:
    try:
        with open(path, encoding='utf-8') as f:
            yaml.load(f, Loader=_KeyCounter)
    except _DuplicateKey as error:
        raise ConfigError('--config', f"'{path}': {error}") from error
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return  # not YAML that this check can read: the real load says what is wrong


def load_model(model_config: dict, role: str, device: torch.device, distributed: bool) -> nn.Module:
    """Builds ``models.<role>`` (torchvision first, then torchdistill's registry) and loads ``src_ckpt`` strictly."""
    if 'key' not in model_config:
        raise ConfigError(f'models.{role}', 'missing key `key` (the registered model name)')
    kwargs = model_config.get('kwargs') or {}
    factory = MODEL_DICT.get(model_config['key'])
    if factory is not None:  # a registered model: its arguments checked by name and type before it is built
        check_kwargs(factory, kwargs, f'models.{role}.kwargs', model_config['key'])
    try:
        model = get_image_classification_model(model_config, distributed)
        if model is None:
            model = get_model(model_config['key'], model_config.get('repo_or_dir'), **kwargs)
    except ConfigError as error:  # the model's own check: its path names the argument
        raise error.under(f'models.{role}.kwargs') from error
    except (ValueError, TypeError, RuntimeError, FileNotFoundError) as error:
        raise ConfigError(f'models.{role}', first_line(error, limit=None)) from error
    src_ckpt = model_config.get('src_ckpt')
    if src_ckpt is not None:
        # torchdistill only logs a missing src_ckpt and trains on: here it is an error.
        what = f'models.{role}.src_ckpt'
        try:
            load_weights_strictly(model, os.path.expanduser(src_ckpt), what='')
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(what, first_line(error, limit=None)) from error
    return model.to(device)


def has_weights(model_config: dict) -> bool:
    return model_config.get('src_ckpt') is not None or model_config.get('kwargs', {}).get('checkpoint_path') is not None
