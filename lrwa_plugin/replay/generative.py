"""``GenerativeReplay``: generative pseudo replay (PRE-DFKD, Binici et al., AAAI 2022), a VAE of the generated samples.

.. code-block:: yaml

    train:
      data_free:
        replay:
          key: 'GenerativeReplay'
          kwargs: {vae: {key: 'ReplayVAE', kwargs: {nz: 64, img_size: 32, nc: 3}}}
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchdistill.common.constant import SELF_MODULE_PATH
from torchdistill.models.registry import get_model
from torchdistill.optim.registry import get_optimizer

from ..config.checks import choice, count, finite
from ..errors import ConfigError
from ..losses import InformationEntropyLoss, OneHotLoss
from ..models.sample_shape import check_generator_fits_teacher
from ..registry import register_replay
from ..util import did_you_mean, modes_kept
from .base import ReplayContext, Replayed, ReplayMemory

DECODE_BN = ('batch', 'running')

#: Default VAE optimizer of GenerativeReplay (the PRE-DFKD code: Adam, its generator learning rate / 40).
DEFAULT_VAE_OPTIMIZER = {'key': 'Adam', 'kwargs': {'lr': 5e-4}}
#: The generator losses the latents' refinement reuses (PRE-DFKD's objective: DAFL's one-hot and entropy terms).
_ONE_HOT, _ENTROPY = OneHotLoss(), InformationEntropyLoss()
REFINE_KEYS = ('steps', 'lr', 'onehot', 'ie')


@register_replay
class GenerativeReplay(ReplayMemory):
    """Generative pseudo replay (PRE-DFKD, Binici et al., AAAI 2022): a VAE learns the generated samples.

    **Training.** Student steps are counted from 0 over the whole run; the VAE takes one optimizer step on the batch
    of student step ``k`` when ``k mod train_every < train_steps``. The PRE-DFKD/LRWA code trains it on the first 4
    of the 10 student steps of every iteration: ``train_every: 10, train_steps: 4`` with 10 student steps per
    iteration; ``train_every: 5, train_steps: 2`` is the same fraction for 5. Its
    batch is the first ``train_size`` generated samples plus, once it has been trained, ``self_replay`` samples it
    decodes itself (pseudo replay: the VAE rehearses its own memory while it learns the new samples, so it forgets
    the old generator distributions slowly). Its loss, for the batch ``x`` and its reconstruction ``x̂``::

        |x̂ − x|₁  +  |T(x̂) − T(x)|₁  +  β · mean_i KL(q(z|x_i) ‖ N(0, I))

    (both L1 terms are means over elements, ``T`` the frozen teacher's logits; β = 1e-5 in the PRE-DFKD code). Only
    the VAE's parameters move, with its own optimizer (``{key, kwargs}`` through torchdistill's ``get_optimizer``;
    Adam with lr 5e-4 by default).

    **Replay.** ``sample(n)`` decodes ``z ~ N(0, I)``, with the decoder's BatchNorm layers in training mode (batch
    statistics, ``decode_bn: 'batch'``), as the data-free generator makes its own samples: the running statistics
    describe the encoder's posterior, not the prior, and in eval mode the prior's samples collapse onto a few teacher
    classes (digits, after 300 VAE steps on a trained generator's samples: 413 of 512 replayed samples of teacher
    class 0 in eval mode; all ten classes, none above 210, with batch statistics). ``decode_bn: 'running'`` decodes
    in eval mode, as the released PRE-DFKD / LRWA code does (``self.mem_generator.eval()`` in
    ``distill_knowledge``); it is offered for parity, not recommended. With ``refine: {steps: s, lr, onehot, ie}``,
    ``z`` first takes ``s`` Adam steps on ``onehot · CE(T(x), argmax T(x)) + ie · Σ p̄ log p̄ + mean (var(z) − 1)² +
    mean mean(z)²`` as the PRE-DFKD code does (s = 1 there; it uses ``log10``); this costs a teacher forward and
    backward per step, so it is off by default. Nothing is returned until the VAE has been trained once, so the
    strategy falls back to ``∇L_Acq``. ``len()`` is the number of generated samples the VAE has been trained on.

    Needs :meth:`attach` (the data-free box calls it) before ``observe``: it uses the run's teacher.

    Args:
        vae: ``{key, kwargs}`` of the VAE model (:class:`lrwa_plugin.models.vae.ReplayVAE`); its samples must have
            the generator's shape, which :meth:`attach` checks against the teacher.
        optimizer: ``{key, kwargs}`` of the VAE's optimizer.
        batch_size: replay batch size.
        train_every: period of the training schedule, in student steps.
        train_steps: student steps of each period on which the VAE trains (``<= train_every``).
        train_size: generated samples per VAE step (None: the whole batch).
        self_replay: samples the VAE decodes for its own batch once trained (0: none).
        beta: weight of the KL term.
        refine: latent refinement at replay time, ``{steps, lr, onehot, ie}`` (see above); None: none.
        decode_bn: BatchNorm statistics of the decoder when replaying: ``'batch'`` or ``'running'`` (eval mode).
        seed: seed of the memory's random generator (latents and reparameterisation noise).

    .. code-block:: yaml

        replay:
          key: 'GenerativeReplay'
          kwargs:
            vae: {key: 'ReplayVAE', kwargs: {nz: 64, img_size: 8, nc: 1}}
            optimizer: {key: 'Adam', kwargs: {lr: 0.0005}}
            train_every: 10
            train_steps: 4
            batch_size: 64
            beta: 0.00001
            self_replay: 16
            refine: {steps: 1, lr: 0.01, onehot: 1.0, ie: 5.0}
    """

    def __init__(self, vae: dict[str, Any] | None = None, optimizer: dict[str, Any] | None = None,
                 batch_size: int = 64, train_every: int = 10, train_steps: int = 4, train_size: int | None = None,
                 self_replay: int = 0, beta: float = 1e-5, refine: dict[str, Any] | None = None,
                 decode_bn: str = 'batch', seed: int = 0) -> None:
        super().__init__(seed)
        self.batch_size = count(batch_size, 'batch_size')
        self.train_every = count(train_every, 'train_every')
        self.train_steps = count(train_steps, 'train_steps')
        if self.train_steps > self.train_every:
            raise ConfigError('train_steps', f'{train_steps} must not exceed train_every ({train_every})')
        self.train_size = None if train_size is None else count(train_size, 'train_size')
        self.self_replay = count(self_replay, 'self_replay', minimum=0)
        self.beta = finite(beta, 'beta', low=0, low_open=False)
        self.refine = self._refine_config(refine)
        self.decode_bn = choice(decode_bn, DECODE_BN, 'decode_bn')
        vae = vae or {'key': 'ReplayVAE', 'kwargs': {}}
        self.vae: nn.Module = get_model(vae['key'], **vae.get('kwargs', {}))
        optimizer = optimizer or DEFAULT_VAE_OPTIMIZER
        self.optimizer = get_optimizer(self.vae, optimizer['key'], **optimizer.get('kwargs', {}))
        self.teacher: nn.Module | None = None
        self.device = torch.device('cpu')
        self._step = 0  # student steps observed
        self._trained_samples = 0
        self._last_loss = float('nan')

    @staticmethod
    def _refine_config(refine: dict[str, Any] | None) -> dict[str, float] | None:
        if not refine:
            return None
        unknown = sorted(set(refine) - set(REFINE_KEYS))
        if unknown:
            raise ConfigError(f'refine.{unknown[0]}', f"unknown key{did_you_mean(unknown[0], REFINE_KEYS)}; "
                                                      f"allowed: {', '.join(REFINE_KEYS)}")
        config = {'steps': 1, 'lr': 0.01, 'onehot': 1.0, 'ie': 5.0, **refine}
        count(config['steps'], 'refine.steps', minimum=0)
        return config

    def __len__(self) -> int:
        return self._trained_samples

    def modules(self) -> list[nn.Module]:
        return [self.vae]

    def attach(self, context: ReplayContext) -> None:
        """Keeps the frozen teacher, moves the VAE to the run's device and checks its samples fit the teacher."""
        super().attach(context)
        self.teacher, self.device = context.teacher, torch.device(context.device)
        self.vae.to(self.device)
        check_generator_fits_teacher(getattr(self.vae, 'decoder', self.vae), self.teacher,
                                     where='train.data_free.replay.kwargs.vae')

    def _teacher(self) -> nn.Module:
        if self.teacher is None:
            raise RuntimeError('GenerativeReplay: call attach(ReplayContext(teacher, device)) before observe/sample '
                               '(the data-free box does)')
        return self.teacher

    def trains_on_step(self, step: int) -> bool:
        """Whether the VAE trains on student step ``step`` (counted from 0 over the run)."""
        return step % self.train_every < self.train_steps

    def observe(self, x: Tensor, epoch: int, iteration: int) -> None:
        step, self._step = self._step, self._step + 1
        if self.trains_on_step(step):
            self.train_step(x)

    def train_step(self, x: Tensor) -> float:
        """One VAE update on the generated batch ``x`` (plus self-replay); returns the loss."""
        teacher = self._teacher()
        x = x.detach()[: self.train_size].to(self.device)
        new_samples = len(x)
        if self.self_replay and self._trained_samples:
            x = torch.cat([x, self._decode(self.self_replay)])
        self.vae.train()
        with torch.no_grad():
            target_logits = teacher(x)
        reconstruction, mu, log_var = self.vae(x, generator=self.rng)
        kl = (-0.5 * (1 + log_var - mu.pow(2) - log_var.exp()).sum(dim=1)).mean()
        loss = F.l1_loss(reconstruction, x) + F.l1_loss(teacher(reconstruction), target_logits) + self.beta * kl
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=[p for p in self.vae.parameters() if p.requires_grad])
        self.optimizer.step()
        self._trained_samples += new_samples
        self._last_loss = float(loss.detach())
        return self._last_loss

    def _decode(self, n: int) -> Tensor:
        """Decodes ``n`` latents ``z ~ N(0, I)`` (refined if configured) without gradient, with the decoder's
        BatchNorm statistics of ``decode_bn``; the VAE is left in training mode."""
        z = self.vae.sample_latent(n, device=self.device, generator=self.rng)
        if self.refine is not None and self.refine['steps'] > 0 and n > 1:
            z = self._refined(z)
        self.vae.train()
        with torch.no_grad(), modes_kept(self.vae, eval_mode=self.decode_bn == 'running'):
            return self.vae.decode(z)

    def refine_objective(self, z: Tensor) -> Tensor:
        """PRE-DFKD's objective of the latents (``refine``): confident, class-balanced teacher outputs and
        ``z``'s batch moments near those of ``N(0, I)``."""
        config = self.refine or {'onehot': 1.0, 'ie': 5.0}
        teacher_io = {SELF_MODULE_PATH: {'output': self._teacher()(self.vae.decode(z))}}
        moments = F.mse_loss(z.var(dim=0), torch.ones_like(z[0])) + z.mean(dim=0).pow(2).mean()
        return config['onehot'] * _ONE_HOT({}, teacher_io) + config['ie'] * _ENTROPY({}, teacher_io) + moments

    def _refined(self, z: Tensor) -> Tensor:
        """``refine.steps`` Adam steps of the latents on :meth:`refine_objective`."""
        z = z.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([z], lr=self.refine['lr'])
        self.vae.train()
        with torch.enable_grad(), modes_kept(self.vae, eval_mode=self.decode_bn == 'running'):
            for _ in range(int(self.refine['steps'])):
                z.grad, = torch.autograd.grad(self.refine_objective(z), [z])
                optimizer.step()
        return z.detach()

    def sample(self, n: int | None = None, device: torch.device | str | None = None) -> Replayed | None:
        if not self._trained_samples:
            return None
        return Replayed(self._decode(n or self.batch_size).to(device))

    def log_values(self) -> dict[str, float]:
        return {'memory': float(len(self)), 'vae': self._last_loss}

    def extra_state(self) -> dict[str, Any]:
        return {'vae': self.vae.state_dict(), 'optimizer': self.optimizer.state_dict(), 'step': self._step,
                'trained_samples': self._trained_samples}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.vae.load_state_dict(state['vae'])
        self.optimizer.load_state_dict(state['optimizer'])
        self._step, self._trained_samples = int(state['step']), int(state['trained_samples'])
