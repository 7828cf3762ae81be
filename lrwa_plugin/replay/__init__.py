"""Replay memories: where the student's earlier pseudo-samples come back from for the retention loss L_Ret.

A strategy that replays (``mb_dfkd``, ``pre_dfkd``, ``mad``, ``lrwa``) draws a batch from the memory named by
``train.data_free.replay`` before every student step and shows it every generated batch after it; ``lrwa`` takes any
memory, the joint strategies the type they accept. The registered keys are ``MemoryBank`` (MB-DFKD, Binici et al.,
WACV 2022; the LRWA paper), ``GenerativeReplay`` (PRE-DFKD, Binici et al., AAAI 2022) and ``MomentumGenerator`` (MAD,
Do et al., NeurIPS 2022); a new memory subclasses :class:`ReplayMemory` and is registered with
:func:`lrwa_plugin.registry.register_replay`.

.. code-block:: yaml

    train:
      data_free:
        replay: {key: 'MemoryBank', kwargs: {capacity: 640, push_size: 64, push_every_epochs: 5, batch_size: 64}}
        # or
        replay: {key: 'GenerativeReplay', kwargs: {vae: {key: 'ReplayVAE', kwargs: {nz: 64, img_size: 32, nc: 3}}}}
        # or
        replay: {key: 'MomentumGenerator', kwargs: {momentum: 0.95, batch_size: 64}}
"""
from .base import ReplayContext, Replayed, ReplayMemory
from .generative import GenerativeReplay
from .memory_bank import MemoryBank
from .momentum import MomentumGenerator

__all__ = ['ReplayContext', 'Replayed', 'ReplayMemory', 'MemoryBank', 'GenerativeReplay', 'MomentumGenerator']
