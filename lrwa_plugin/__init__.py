"""lrwa_plugin: adversarial data-free knowledge distillation with *Learning to Retain while Acquiring*.

Patel, Mopuri, Qiu, "Learning to Retain while Acquiring: Combating Distribution-Shift in Adversarial Data-Free
Knowledge Distillation", CVPR 2023. Importing the package registers every component with torchdistill's registries
(models, losses) and with the plugin's own (strategies, replay memories), so a torchdistill YAML only needs

.. code-block:: yaml

    dependencies:
      - name: 'lrwa_plugin'
"""
from . import datasets, losses, models, replay, strategies  # noqa: F401  (imports register the components)
from .box import DataFreeDistillationBox  # noqa: F401
from .meta import RetainWhileAcquire, retain_while_acquire  # noqa: F401

__version__ = '0.1.0'
