"""The plugin's part of a torchdistill config: the ``data_free`` block parsed once into typed objects
(:mod:`.data_free`), the checks of torchdistill's own ``train`` block that data-free runs rely on (:mod:`.train_block`)
and the checking engine both use (:mod:`.checks`)."""
from .data_free import Component, DataFreeConfig, GeneratorConfig, check_data_free, parse_data_free, validate_config

__all__ = ['Component', 'GeneratorConfig', 'DataFreeConfig', 'parse_data_free', 'check_data_free', 'validate_config']
