"""Replay memories: where the student's earlier pseudo-samples come back from (knowledge retention, L_Ret).

Every memory has the same small interface (:class:`ReplayMemory`), so the strategies do not care which one they are
given. The data-free box calls

* ``attach(teacher, device)`` once, after building the memory (a generative memory needs the teacher);
* ``observe(x, epoch, iteration, end_of_epoch)`` after *every student step*, with that step's generated batch
  (``end_of_epoch`` is True for the last student step of the epoch's last iteration);
* ``sample(n, device)`` for a replay batch (``None`` while the memory holds nothing);
* ``log_values()`` for the progress bar, and ``state_dict`` / ``load_state_dict``.

Two memories:

* ``MemoryBank``: the memory of MB-DFKD (Binici et al., WACV 2022) and of the LRWA paper (Patel, Mopuri, Qiu,
  CVPR 2023): a bounded store of generated samples, pushed at the end of every few epochs, ``policy: 'fifo'`` (whole
  pushed batches, oldest out first, the paper's) or ``'reservoir'`` (reservoir sampling over single samples).
* ``GenerativeReplay``: the generative pseudo replay of PRE-DFKD (Binici et al., AAAI 2022): a VAE
  (:class:`lrwa_plugin.models.vae.ReplayVAE`) trained on the generated samples, decoding ``z ~ N(0, I)`` to replay.

.. code-block:: yaml

    train:
      data_free:
        replay: {key: 'MemoryBank', kwargs: {capacity: 640, push_size: 64, push_every_epochs: 5, batch_size: 64}}
        # or
        replay: {key: 'GenerativeReplay', kwargs: {vae: {key: 'ReplayVAE', kwargs: {nz: 64, img_size: 32, nc: 3}}}}
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchdistill.models.registry import get_model
from torchdistill.optim.registry import get_optimizer

from .models.generators import check_generator_fits_teacher
from .registry import register_replay


class ReplayMemory:
    """Interface of a replay memory (see the module docstring)."""

    #: Samples a replay batch of this size unless the caller asks otherwise.
    batch_size: int
    #: The seed of ``_rng``, the memory's own random stream (sampling, schedules).
    _seed: int = 0
    _rng: torch.Generator

    def __len__(self) -> int:
        """How many samples the memory holds (0: ``sample`` returns None)."""
        raise NotImplementedError

    def attach(self, teacher: nn.Module, device: torch.device) -> None:
        """Called once by the box after building the memory: the (unwrapped, frozen) teacher and the device."""

    def observe(self, x: Tensor, epoch: int, iteration: int, end_of_epoch: bool) -> None:
        """Sees the generated batch of one student step (every student step of every iteration)."""
        raise NotImplementedError

    def sample(self, n: int | None = None, device: torch.device | str | None = None) -> Tensor | None:
        raise NotImplementedError

    def log_values(self) -> dict[str, float]:
        """Numbers worth a progress-bar column."""
        return {'memory': float(len(self))}

    def modules(self) -> list[nn.Module]:
        """Networks the memory trains (kept identical across ranks at the start of a data-parallel run)."""
        return []

    def seed_rank(self, rank: int) -> None:
        """Gives this rank's memory its own sampling stream (data-parallel runs keep one memory per rank)."""
        if rank and hasattr(self, '_rng'):
            self._rng.manual_seed(self._seed + 1_000_003 * rank)

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError


def _positive_int(owner: str, name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = 'a positive integer' if minimum == 1 else f'an integer >= {minimum}'
        raise ValueError(f'{owner}: {name} must be {what}, got {value!r}')
    return value


MEMORY_POLICIES = ('fifo', 'reservoir')
STORAGE_DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}


@register_replay
class MemoryBank(ReplayMemory):
    """Bounded memory of generated samples (MB-DFKD, Binici et al., WACV 2022; LRWA, Patel et al., CVPR 2023).

    At the end of every ``push_every_epochs``-th epoch the first ``push_size`` samples of the latest generated batch
    are pushed. The memory never holds more than ``capacity`` samples:

    * ``policy: 'fifo'`` (the papers'): pushed batches are kept whole; when more than ``capacity`` samples are held,
      the oldest batches are dropped.
    * ``policy: 'reservoir'``: reservoir sampling over single samples (Vitter's algorithm R): the ``i``-th sample
      ever pushed (from 0) fills a free slot, or once the memory is full replaces a uniformly chosen slot with
      probability ``capacity / (i + 1)``; so the memory is a uniform sample of *everything ever pushed*, old
      generator distributions included, rather than of the newest batches.

    A replay batch is drawn uniformly, with replacement, over the samples held. Both the replacement decisions and
    the replay draws use the memory's own random generator (seeded, saved in the state), so they neither depend on
    nor disturb the run's other random numbers.

    Args:
        capacity: the most samples held (the paper: 10 batches of 64 = 640).
        push_size: samples pushed at a time.
        push_every_epochs: push at the end of every this many epochs.
        batch_size: replay batch size.
        policy: ``'fifo'`` or ``'reservoir'``.
        dtype: storage precision, ``'float16'``, ``'bfloat16'`` or ``'float32'``; ``None`` keeps the pushed dtype.
            Samples come back in the dtype they were pushed in.
        seed: seed of the memory's random generator.

    .. code-block:: yaml

        replay:
          key: 'MemoryBank'
          kwargs: {capacity: 1024, push_size: 128, push_every_epochs: 1, batch_size: 64, policy: 'reservoir',
                   dtype: 'float16'}
    """

    def __init__(self, capacity: int = 640, push_size: int = 64, push_every_epochs: int = 1, batch_size: int = 64,
                 policy: str = 'fifo', dtype: str | None = None, seed: int = 0) -> None:
        if policy not in MEMORY_POLICIES:
            raise ValueError(f"MemoryBank: policy '{policy}' is not one of {', '.join(MEMORY_POLICIES)}")
        if dtype is not None and dtype not in STORAGE_DTYPES:
            raise ValueError(f"MemoryBank: dtype '{dtype}' is not one of {', '.join(STORAGE_DTYPES)} (or null)")
        self.capacity = _positive_int('MemoryBank', 'capacity', capacity)
        self.push_size = _positive_int('MemoryBank', 'push_size', push_size)
        self.push_every_epochs = _positive_int('MemoryBank', 'push_every_epochs', push_every_epochs)
        self.batch_size = _positive_int('MemoryBank', 'batch_size', batch_size)
        if self.push_size > self.capacity:
            raise ValueError(f'MemoryBank: push_size ({push_size}) must not exceed capacity ({capacity})')
        self.policy = policy
        self.storage_dtype = None if dtype is None else STORAGE_DTYPES[dtype]
        self._batches: list[Tensor] = []  # fifo: pushed batches, oldest first; reservoir: one tensor of the slots
        self._seen = 0  # samples ever pushed (reservoir)
        self._sample_dtype: torch.dtype | None = None
        self._seed = seed
        self._rng = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return sum(len(batch) for batch in self._batches)

    def push(self, x: Tensor) -> None:
        """Stores (a detached CPU copy of) the first ``push_size`` samples of ``x`` by the memory's policy."""
        self._sample_dtype = x.dtype
        x = x.detach()[: self.push_size].to('cpu', dtype=self.storage_dtype or x.dtype, copy=True)
        if self.policy == 'fifo':
            self._batches.append(x)
            while len(self) > self.capacity:
                self._batches.pop(0)
        else:
            self._reservoir_push(x)

    def _reservoir_push(self, x: Tensor) -> None:
        held = self._batches[0] if self._batches else x[:0]
        free = min(self.capacity - len(held), len(x))
        if free > 0:
            held = torch.cat([held, x[:free]])
        rest = x[free:]
        if len(rest) > 0:
            # sample number i (counted over all pushes) replaces slot j ~ U{0..i} when j < capacity
            index = torch.arange(self._seen + free, self._seen + len(x), dtype=torch.float64)
            slots = (torch.rand(len(rest), generator=self._rng, dtype=torch.float64) * (index + 1)).long()
            for k in torch.nonzero(slots < self.capacity).flatten().tolist():
                held[slots[k]] = rest[k]  # in push order: a later sample may replace an earlier one of this push
        self._batches = [held]
        self._seen += len(x)

    def observe(self, x: Tensor, epoch: int, iteration: int, end_of_epoch: bool) -> None:
        if end_of_epoch and (epoch + 1) % self.push_every_epochs == 0:
            self.push(x)

    def sample(self, n: int | None = None, device: torch.device | str | None = None) -> Tensor | None:
        if not self._batches:
            return None
        data = torch.cat(self._batches) if len(self._batches) > 1 else self._batches[0]
        index = torch.randint(len(data), (n or self.batch_size,), generator=self._rng)
        return data[index].to(device, dtype=self._sample_dtype)

    def state_dict(self) -> dict[str, Any]:
        dtype = None if self._sample_dtype is None else str(self._sample_dtype).removeprefix('torch.')
        return {'batches': list(self._batches), 'rng': self._rng.get_state(), 'seen': self._seen,
                'sample_dtype': dtype}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._batches = [batch.clone() for batch in state['batches']]
        self._rng.set_state(state['rng'])
        self._seen = int(state.get('seen', len(self)))
        dtype = state.get('sample_dtype')
        self._sample_dtype = None if dtype is None else getattr(torch, dtype)


#: Default VAE optimizer of GenerativeReplay (the PRE-DFKD code: Adam, its generator learning rate / 40).
DEFAULT_VAE_OPTIMIZER = {'key': 'Adam', 'kwargs': {'lr': 5e-4}}
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
    statistics), as the data-free generator makes its own samples: the running statistics describe the encoder's
    posterior, not the prior, and in eval mode the prior's samples collapse onto a few teacher classes (digits, after
    300 VAE steps on a trained generator's samples: 413 of 512 replayed samples of teacher class 0 in eval mode; all
    ten classes, none above 210, with batch statistics). With ``refine: {steps: s, lr, onehot, ie}``,
    ``z`` first takes ``s`` Adam steps on ``onehot · CE(T(x), argmax T(x)) + ie · Σ p̄ log p̄ + mean (var(z) − 1)² +
    mean mean(z)²`` as the PRE-DFKD code does (s = 1 there; it uses ``log10``); this costs a teacher forward and
    backward per step, so it is off by default. Nothing is returned until the VAE has been trained once, so the
    strategy falls back to ``∇L_Acq``. ``len()`` is the number of generated samples the VAE has been trained on.

    Needs :meth:`attach` (the data-free box calls it) before ``observe``.

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
                 seed: int = 0) -> None:
        owner = 'GenerativeReplay'
        self.batch_size = _positive_int(owner, 'batch_size', batch_size)
        self.train_every = _positive_int(owner, 'train_every', train_every)
        self.train_steps = _positive_int(owner, 'train_steps', train_steps)
        if self.train_steps > self.train_every:
            raise ValueError(f'{owner}: train_steps ({train_steps}) must not exceed train_every ({train_every})')
        self.train_size = None if train_size is None else _positive_int(owner, 'train_size', train_size)
        self.self_replay = _positive_int(owner, 'self_replay', self_replay, minimum=0)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
            raise ValueError(f'{owner}: beta must be a finite number >= 0, got {beta!r}')
        self.beta = float(beta)
        self.refine = self._refine_config(refine)
        vae = vae or {'key': 'ReplayVAE', 'kwargs': {}}
        self.vae: nn.Module = get_model(vae['key'], **vae.get('kwargs', {}))
        optimizer = optimizer or DEFAULT_VAE_OPTIMIZER
        self.optimizer = get_optimizer(self.vae, optimizer['key'], **optimizer.get('kwargs', {}))
        self.teacher: nn.Module | None = None
        self.device = torch.device('cpu')
        self._step = 0  # student steps observed
        self._trained_samples = 0
        self._last_loss = float('nan')
        self._seed = seed
        self._rng = torch.Generator().manual_seed(seed)

    @staticmethod
    def _refine_config(refine: dict[str, Any] | None) -> dict[str, float] | None:
        if not refine:
            return None
        unknown = sorted(set(refine) - set(REFINE_KEYS))
        if unknown:
            raise ValueError(f"GenerativeReplay: refine has unknown key '{unknown[0]}' "
                             f"(allowed: {', '.join(REFINE_KEYS)})")
        config = {'steps': 1, 'lr': 0.01, 'onehot': 1.0, 'ie': 5.0, **refine}
        _positive_int('GenerativeReplay', 'refine.steps', config['steps'], minimum=0)
        return config

    def __len__(self) -> int:
        return self._trained_samples

    def modules(self) -> list[nn.Module]:
        return [self.vae]

    def attach(self, teacher: nn.Module, device: torch.device) -> None:
        """Keeps the frozen teacher, moves the VAE to ``device`` and checks its decoder's samples fit the teacher."""
        self.teacher, self.device = teacher, torch.device(device)
        self.vae.to(self.device)
        check_generator_fits_teacher(getattr(self.vae, 'decoder', self.vae), teacher,
                                     where='train.data_free.replay.kwargs.vae')

    def _teacher(self) -> nn.Module:
        if self.teacher is None:
            raise RuntimeError('GenerativeReplay: call attach(teacher, device) before observe/sample '
                               '(the data-free box does)')
        return self.teacher

    def trains_on_step(self, step: int) -> bool:
        """Whether the VAE trains on student step ``step`` (counted from 0 over the run)."""
        return step % self.train_every < self.train_steps

    def observe(self, x: Tensor, epoch: int, iteration: int, end_of_epoch: bool) -> None:
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
        reconstruction, mu, log_var = self.vae(x, generator=self._rng)
        kl = (-0.5 * (1 + log_var - mu.pow(2) - log_var.exp()).sum(dim=1)).mean()
        loss = F.l1_loss(reconstruction, x) + F.l1_loss(teacher(reconstruction), target_logits) + self.beta * kl
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=[p for p in self.vae.parameters() if p.requires_grad])
        self.optimizer.step()
        self._trained_samples += new_samples
        self._last_loss = float(loss.detach())
        return self._last_loss

    def _decode(self, n: int) -> Tensor:
        """Decodes ``n`` latents ``z ~ N(0, I)`` (refined if configured) with batch statistics, without gradient."""
        z = self.vae.sample_latent(n, device=self.device, generator=self._rng)
        if self.refine is not None and self.refine['steps'] > 0 and n > 1:
            z = self._refined(z)
        self.vae.train()
        with torch.no_grad():
            return self.vae.decode(z)

    def refine_objective(self, z: Tensor) -> Tensor:
        """PRE-DFKD's objective of the latents (``refine``): confident, class-balanced teacher outputs and
        ``z``'s batch moments near those of ``N(0, I)``."""
        config = self.refine or {'onehot': 1.0, 'ie': 5.0}
        logits = self._teacher()(self.vae.decode(z))
        mean_prob = logits.softmax(dim=1).mean(dim=0)
        moments = F.mse_loss(z.var(dim=0), torch.ones_like(z[0])) + z.mean(dim=0).pow(2).mean()
        return config['onehot'] * F.cross_entropy(logits, logits.argmax(dim=1)) \
            + config['ie'] * (mean_prob * torch.log(mean_prob.clamp_min(1e-12))).sum() + moments

    def _refined(self, z: Tensor) -> Tensor:
        """``refine.steps`` Adam steps of the latents on :meth:`refine_objective`."""
        z = z.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([z], lr=self.refine['lr'])
        self.vae.train()
        with torch.enable_grad():
            for _ in range(int(self.refine['steps'])):
                z.grad, = torch.autograd.grad(self.refine_objective(z), [z])
                optimizer.step()
        return z.detach()

    def sample(self, n: int | None = None, device: torch.device | str | None = None) -> Tensor | None:
        if not self._trained_samples:
            return None
        return self._decode(n or self.batch_size).to(device)

    def log_values(self) -> dict[str, float]:
        return {'memory': float(len(self)), 'vae': self._last_loss}

    def state_dict(self) -> dict[str, Any]:
        return {'vae': self.vae.state_dict(), 'optimizer': self.optimizer.state_dict(), 'step': self._step,
                'trained_samples': self._trained_samples, 'rng': self._rng.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.vae.load_state_dict(state['vae'])
        self.optimizer.load_state_dict(state['optimizer'])
        self._step, self._trained_samples = int(state['step']), int(state['trained_samples'])
        self._rng.set_state(state['rng'])
