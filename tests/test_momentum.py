"""MomentumGenerator (MAD's momentum generator): the EMA update by hand, its samples, its state; the mad strategy."""
from __future__ import annotations

import pytest
import torch
from conftest import DIGITS_CONFIGS, SHORT_RUN, run_cli, write_config

from lrwa_plugin.models.generators import DAFLGenerator
from lrwa_plugin.registry import STRATEGY_DICT
from lrwa_plugin.replay import MomentumGenerator, ReplayContext
from lrwa_plugin.run.resume import read_training_state


def attached(momentum: float = 0.9, seed: int = 0) -> tuple[MomentumGenerator, torch.nn.Module]:
    torch.manual_seed(0)
    generator = DAFLGenerator(nz=4, img_size=4, nc=1, ngf=8, spectral_norm=True).double().train()
    memory = MomentumGenerator(momentum=momentum, batch_size=6, seed=seed)
    memory.attach(ReplayContext(teacher=torch.nn.Identity(), device=torch.device('cpu'), generator=generator))
    return memory, generator


def step(generator: torch.nn.Module, scale: float) -> None:
    """A stand-in for a generator optimizer step: every parameter moves, and a forward moves the buffers."""
    with torch.no_grad():
        for p in generator.parameters():
            p.add_(scale * torch.randn_like(p))
        generator(generator.sample_latent(5).double())


def test_the_ema_update_is_the_hand_computed_average_of_the_generators_weights():
    memory, generator = attached(momentum=0.9)
    names = [name for name, _ in generator.named_parameters()]
    theta = [{n: p.detach().clone() for n, p in generator.named_parameters()}]
    for k in range(3):
        step(generator, 0.1 * (k + 1))
        theta.append({n: p.detach().clone() for n, p in generator.named_parameters()})
        memory.after_generator_step()
    expected = dict(theta[0])
    for t in theta[1:]:  # ema <- m ema + (1 - m) theta, after every generator step
        expected = {n: 0.9 * expected[n] + 0.1 * t[n] for n in names}
    ema = dict(memory.ema.named_parameters())
    for n in names:
        assert torch.allclose(ema[n], expected[n], rtol=1e-12, atol=1e-15), n
        assert not torch.equal(ema[n], theta[-1][n])  # an average, not the generator
    for mine, theirs in zip(memory.ema.buffers(), generator.buffers()):
        assert torch.equal(mine, theirs)  # buffers copied (BatchNorm statistics, spectral-norm vectors)
    assert len(memory) == 3 and not any(p.requires_grad for p in memory.ema.parameters())


def test_samples_have_the_generators_shape_come_from_its_own_stream_and_move_no_statistics():
    memory, generator = attached()
    assert memory.sample() is None  # nothing averaged yet
    step(generator, 0.1)
    memory.after_generator_step()
    before = {n: b.clone() for n, b in memory.ema.named_buffers() if 'running' in n}
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in memory.state_dict().items()}
    state['ema'] = {k: v.clone() for k, v in state['ema'].items()}
    before_global = torch.random.get_rng_state()
    replayed = memory.sample()
    assert replayed.x.shape == (6, *generator.output_shape) and not replayed.x.requires_grad
    assert replayed.teacher_io is None  # the box runs the teacher on new samples
    assert torch.equal(before_global, torch.random.get_rng_state())  # z from the memory's stream
    after = dict(memory.ema.named_buffers())
    assert before and all(torch.equal(b, after[n]) for n, b in before.items())  # BatchNorm statistics unmoved
    twin, _ = attached(seed=5)
    twin.load_state_dict(state)
    assert torch.equal(twin.sample().x, replayed.x)  # its state (weights, buffers, stream) gives the same batch


def test_state_round_trips_through_a_weights_only_load(tmp_path):
    memory, generator = attached(seed=3)
    for _ in range(2):
        step(generator, 0.05)
        memory.after_generator_step()
    torch.save(memory.state_dict(), tmp_path / 'state.pt')
    other, _ = attached(seed=7)
    other.load_state_dict(torch.load(tmp_path / 'state.pt', weights_only=True))
    assert len(other) == 2 and torch.equal(other.sample().x, memory.sample().x)


@pytest.mark.parametrize('momentum', [0.0, 1.0, -0.5, 1.5, float('nan'), 'high'])
def test_momentum_outside_the_open_unit_interval_is_refused(momentum):
    with pytest.raises(ValueError, match='momentum'):
        MomentumGenerator(momentum=momentum)


def test_mad_accepts_only_the_momentum_generator_and_lrwa_accepts_it_too():
    assert STRATEGY_DICT['mad'].accepted_keys() == ['MomentumGenerator']
    assert 'MomentumGenerator' in STRATEGY_DICT['lrwa'].accepted_keys()


@pytest.mark.parametrize('name', ['mad', 'lrwa_mad'])
def test_digits_momentum_configs_run_and_replay_from_the_first_iteration(name, work):
    config = write_config(DIGITS_CONFIGS / f'{name}.yaml', work / 'run.yaml', SHORT_RUN)
    assert run_cli(config, sample_grids=True) == 0
    state = read_training_state(f'resource/ckpt/digits/{name}.last.pt')
    assert state['ranks'][0]['replay']['updates'] == 2 * 3  # one generator step per iteration
    assert (work / f'resource/ckpt/digits/{name}.samples/epoch_000_replayed.png').is_file()
