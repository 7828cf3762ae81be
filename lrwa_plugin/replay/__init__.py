"""Replay memories: where the student's earlier pseudo-samples come back from (knowledge retention, L_Ret).

Every memory is a :class:`ReplayMemory` (:mod:`lrwa_plugin.replay.base`: the calls it receives, its random stream,
what its state may hold), one file each:

* ``MemoryBank`` (:mod:`.memory_bank`): the memory of MB-DFKD (Binici et al., WACV 2022) and of the LRWA paper
  (Patel, Mopuri, Qiu, CVPR 2023): a bounded store of generated samples and the teacher's outputs for them;
* ``GenerativeReplay`` (:mod:`.generative`): the generative pseudo replay of PRE-DFKD (Binici et al., AAAI 2022):
  a VAE trained on the generated samples, decoding ``z ~ N(0, I)`` to replay;
* ``MomentumGenerator`` (:mod:`.momentum`): the momentum generator of MAD (Do et al., NeurIPS 2022): an exponential
  moving average of the generator's weights, replaying its samples.

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
