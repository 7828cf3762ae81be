"""MemoryBank (fifo, reservoir, float16) and GenerativeReplay: capacity, schedules, sampling, uniformity, state."""
from __future__ import annotations

import pytest
import torch

from lrwa_plugin.registry import get_replay
from lrwa_plugin.replay import GenerativeReplay, MemoryBank, ReplayContext


def batch(value: float, n: int = 4) -> torch.Tensor:
    return torch.full((n, 1, 2, 2), value)


def test_empty_memory_samples_nothing():
    assert MemoryBank(capacity=8, push_size=4).sample(3) is None


def test_capacity_is_never_exceeded_and_oldest_batches_leave_first():
    memory = MemoryBank(capacity=8, push_size=4, batch_size=64)
    memory.push(batch(1.0))
    memory.push(batch(2.0))
    assert len(memory) == 8  # exactly at capacity: nothing dropped
    memory.push(batch(3.0))
    assert len(memory) == 8
    held = set(memory.sample().x.unique().tolist())
    assert held == {2.0, 3.0}


def test_push_keeps_only_push_size_samples_on_cpu_detached():
    memory = MemoryBank(capacity=8, push_size=3)
    x = torch.randn(10, 1, 2, 2, requires_grad=True)
    memory.push(x * 2)
    assert len(memory) == 3
    sample = memory.sample(5).x
    assert sample.shape == (5, 1, 2, 2) and not sample.requires_grad and sample.device.type == 'cpu'


def observe_epochs(memory: MemoryBank, epochs: int) -> None:
    """What the box tells a memory over ``epochs`` epochs of 3 iterations x 2 student steps; the epoch's last student
    batch is tagged ``epoch + 0.5``, the others ``epoch``."""
    for epoch in range(epochs):
        for iteration in range(3):
            for step in range(2):  # the box calls observe after every student step
                end = iteration == 2 and step == 1
                memory.observe(batch(epoch + (0.5 if end else 0.0)), epoch, iteration)
        memory.end_epoch(epoch)


def test_the_last_student_batch_is_pushed_after_every_nth_epoch():
    memory = MemoryBank(capacity=100, push_size=4, push_every_epochs=2)
    observe_epochs(memory, 4)
    assert len(memory) == 8
    assert set(memory.sample(64).x.unique().tolist()) == {1.5, 3.5}  # after epochs 1 and 3: the end of each period


def test_released_schedule_pushes_after_epochs_0_5_10_and_draws_one_whole_batch():
    memory = MemoryBank(capacity=100, push_size=4, push_every_epochs=5, first_push_epoch=0, draw='batch')
    assert [e for e in range(16) if memory.pushes_after(e)] == [0, 5, 10, 15]
    observe_epochs(memory, 11)
    assert set(memory.sample(64).x.unique().tolist()) <= {0.5, 5.5, 10.5}
    draws = [memory.sample() for _ in range(60)]
    assert all(len(d.x) == 4 and len(set(d.x.flatten().tolist())) == 1 for d in draws)  # one stored batch each
    assert {d.x.flatten()[0].item() for d in draws} == {0.5, 5.5, 10.5}  # every stored batch is drawn
    assert len(memory.sample(2).x) == 2


def test_cached_teacher_outputs_equal_a_fresh_teacher_forward():
    """A memory bank keeps the teacher's I/O dict of its samples (computed once, at push time, on the stored
    samples): a replay batch's cached entries equal those of a fresh teacher forward of the replayed samples."""
    teacher = tiny_teacher()
    hooked: dict = {}
    handle = teacher.fc.register_forward_hook(lambda m, i, o: hooked.update(fc_input=i[0]))

    def teacher_io(x: torch.Tensor) -> dict:
        out = teacher(x)
        return {'.': {'output': out}, 'fc': {'input': hooked['fc_input']}}

    for dtype in (None, 'float16'):
        memory = MemoryBank(capacity=24, push_size=8, policy='fifo', dtype=dtype, seed=3)
        memory.attach(ReplayContext(teacher, torch.device('cpu'), teacher_io=teacher_io))
        for k in range(4):
            memory.push(torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(k)))
        replayed = memory.sample(16)
        fresh = teacher_io(replayed.x)
        assert torch.equal(replayed.teacher_io['.']['output'], fresh['.']['output'])
        assert torch.equal(replayed.teacher_io['fc']['input'], fresh['fc']['input'])
    reservoir = MemoryBank(capacity=10, push_size=8, policy='reservoir', seed=1)
    reservoir.attach(ReplayContext(teacher, torch.device('cpu'), teacher_io=teacher_io))
    for k in range(5):
        reservoir.push(torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(k)))
    replayed = reservoir.sample(32)
    assert torch.equal(replayed.teacher_io['.']['output'], teacher_io(replayed.x)['.']['output'])
    handle.remove()
    uncached = MemoryBank(capacity=8, push_size=8, cache_teacher=False)
    uncached.attach(ReplayContext(teacher, torch.device('cpu'), teacher_io=teacher_io))
    uncached.push(torch.randn(8, 1, 8, 8))
    assert uncached.sample(4).teacher_io is None


def test_sampling_is_seeded_and_state_round_trips():
    a, b = MemoryBank(capacity=32, push_size=16, seed=3), MemoryBank(capacity=32, push_size=16, seed=3)
    data = torch.arange(16.0).view(16, 1, 1, 1)
    a.push(data)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.sample(8).x, b.sample(8).x)


@pytest.mark.parametrize('kwargs, match', [
    ({'capacity': 0}, 'capacity'),
    ({'push_size': -1}, 'push_size'),
    ({'batch_size': 2.5}, 'batch_size'),
    ({'capacity': 4, 'push_size': 8}, 'exceed'),
    ({'policy': 'lifo'}, "policy 'lifo'"),
    ({'draw': 'batch', 'policy': 'reservoir'}, "draw: 'batch' replays whole pushed batches"),
    ({'first_push_epoch': -1}, 'first_push_epoch'),
    ({'cache_teacher': 'yes'}, 'cache_teacher'),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MemoryBank(**kwargs)


def test_registry_builds_and_rejects_unknown_keys():
    assert isinstance(get_replay('MemoryBank', capacity=4, push_size=2), MemoryBank)
    with pytest.raises(ValueError, match='MemoryBank'):
        get_replay('MemoryBnak')


# -------------------------------------------------------------------------------------------- reservoir
def items(start: int, n: int) -> torch.Tensor:
    """``n`` samples tagged by their value ``start, start + 1, ...``."""
    return torch.arange(start, start + n, dtype=torch.float32).view(n, 1, 1, 1)


def held(memory: MemoryBank) -> list[int]:
    return sorted(int(v) for batch in memory.state_dict()['batches'] for v in batch.flatten())


@pytest.mark.parametrize('policy', ['fifo', 'reservoir'])
def test_memory_fills_to_capacity_and_never_beyond(policy):
    memory = MemoryBank(capacity=8, push_size=4, policy=policy)
    sizes = []
    for k in range(6):
        memory.push(items(4 * k, 4))
        sizes.append(len(memory))
    assert sizes == [4, 8, 8, 8, 8, 8]  # exactly full after two pushes, never more
    assert len(set(held(memory))) == 8  # eight distinct samples, no duplicates from replacement
    tight = MemoryBank(capacity=4, push_size=4, policy=policy)  # push_size == capacity: the boundary
    for k in range(3):
        tight.push(items(4 * k, 4))
        assert len(tight) == 4


def test_reservoir_keeps_each_pushed_sample_with_equal_probability():
    """Chi-square over which of 40 pushed samples survive in a memory of 10, over 300 seeds.

    Uniform: each survives with probability 10/40, expected count 75. The threshold is the chi-square quantile for
    independent counts; the survivors of one run are drawn without replacement, which only lowers the statistic
    (here about 18), so it is conservative. FIFO keeps the last pushes only and fails it by far.
    """
    n_items, capacity, push_size, trials = 40, 10, 4, 300
    threshold = 72.05  # chi-square 0.999 quantile, 39 degrees of freedom

    def statistic(policy: str) -> float:
        counts = torch.zeros(n_items)
        for seed in range(trials):
            memory = MemoryBank(capacity=capacity, push_size=push_size, policy=policy, seed=seed)
            for start in range(0, n_items, push_size):
                memory.push(items(start, push_size))
            counts[held(memory)] += 1
        expected = trials * len(memory) / n_items
        return float(((counts - expected) ** 2 / expected).sum())

    assert statistic('reservoir') < threshold
    assert statistic('fifo') > threshold  # the test can tell a biased memory


def test_reservoir_state_round_trips_and_continues_identically():
    a = MemoryBank(capacity=6, push_size=4, policy='reservoir', seed=5)
    for k in range(3):
        a.push(items(4 * k, 4))
    b = MemoryBank(capacity=6, push_size=4, policy='reservoir', seed=99)
    b.load_state_dict(a.state_dict())
    for k in range(3, 6):
        a.push(items(4 * k, 4))
        b.push(items(4 * k, 4))
    assert held(a) == held(b) and torch.equal(a.sample(16).x, b.sample(16).x)


@pytest.mark.parametrize('policy', ['fifo', 'reservoir'])
def test_float16_storage_returns_the_callers_dtype(policy):
    memory = MemoryBank(capacity=8, push_size=8, policy=policy, dtype='float16')
    x = torch.randn(8, 1, 2, 2, dtype=torch.float64)
    memory.push(x)
    assert all(b.dtype == torch.float16 for b in memory.state_dict()['batches'])
    sample = memory.sample(32).x
    assert sample.dtype == torch.float64
    stored = set(x.to(torch.float16).to(torch.float64).flatten().tolist())
    assert set(sample.flatten().tolist()) <= stored and not set(sample.flatten().tolist()) <= set(x.flatten().tolist())
    copy = MemoryBank(capacity=8, push_size=8, policy=policy, dtype='float16')
    copy.load_state_dict(memory.state_dict())
    assert copy.sample(4).x.dtype == torch.float64


def test_bad_dtype_names_the_allowed_ones():
    with pytest.raises(ValueError, match="dtype: unknown dtype 'half'; expected one of: float32, float16, bfloat16"):
        MemoryBank(dtype='half')


# ------------------------------------------------------------------------------------- GenerativeReplay
def tiny_teacher() -> torch.nn.Module:
    from lrwa_plugin.models.digits import DigitsStudentCNN
    torch.manual_seed(0)
    teacher = DigitsStudentCNN(num_classes=10).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def source_generator() -> torch.nn.Module:
    """A fixed generator whose samples the VAE learns (the data-free generator of a short run)."""
    from lrwa_plugin.models.generators import DAFLGenerator
    torch.manual_seed(1)
    return DAFLGenerator(nz=8, img_size=8, nc=1, ngf=16)


def generated(generator: torch.nn.Module, n: int, seed: int) -> torch.Tensor:
    with torch.no_grad():
        return generator(generator.sample_latent(n, generator=torch.Generator().manual_seed(seed)))


VAE = {'key': 'ReplayVAE', 'kwargs': {'nz': 8, 'img_size': 8, 'nc': 1, 'nef': 8, 'ngf': 16}}


def replay(**kwargs) -> GenerativeReplay:
    memory = GenerativeReplay(**{'vae': VAE, 'batch_size': 16, 'train_every': 1, 'train_steps': 1, **kwargs})
    memory.attach(ReplayContext(tiny_teacher(), torch.device('cpu')))
    return memory


def reconstruction_l1(memory: GenerativeReplay, x: torch.Tensor) -> float:
    memory.vae.eval()
    with torch.no_grad():
        return float((memory.vae.decode(memory.vae.encode(x)[0]) - x).abs().mean())


def test_vae_reconstruction_loss_falls_when_trained_on_generated_samples():
    source, memory = source_generator(), replay(optimizer={'key': 'Adam', 'kwargs': {'lr': 0.005}})
    held_out = generated(source, 64, seed=1000)
    before = reconstruction_l1(memory, held_out)
    for step in range(40):
        memory.observe(generated(source, 32, seed=step), epoch=0, iteration=step)
    after = reconstruction_l1(memory, held_out)
    assert after < 0.7 * before, (before, after)
    assert len(memory) == 40 * 32 and memory.log_values()['vae'] > 0


def test_vae_trains_on_a_deterministic_fraction_of_student_steps():
    memory = replay(train_every=5, train_steps=2, train_size=3)
    assert [memory.trains_on_step(k) for k in range(10)] == [True, True, False, False, False] * 2
    source = source_generator()
    assert memory.sample(4) is None  # nothing learnt yet: the strategy falls back to acquisition only
    for step in range(10):
        memory.observe(generated(source, 8, seed=step), 0, step)
    assert len(memory) == 4 * 3  # steps 0, 1, 5, 6, three samples each


def test_replayed_samples_have_the_generators_shape_and_range():
    source, memory = source_generator(), replay(self_replay=4)
    for step in range(2):
        memory.observe(generated(source, 8, seed=step), 0, step)
    sample = memory.sample().x
    assert sample.shape == (16, *source.output_shape) and not sample.requires_grad
    # DAFL decoder with batch statistics, like the generator: its last BatchNorm standardises every replayed batch
    assert torch.allclose(sample.mean(dim=(0, 2, 3)), torch.zeros(1), atol=1e-4)
    assert torch.allclose(sample.var(dim=(0, 2, 3), unbiased=False), torch.ones(1), atol=1e-2)
    dcgan = {'key': 'ReplayVAE', 'kwargs': {'nz': 8, 'img_size': 8, 'nc': 1, 'nef': 8,
                                            'decoder': {'key': 'DCGANGenerator',
                                                        'kwargs': {'nz': 8, 'img_size': 8, 'nc': 1, 'ngf': 8}}}}
    memory = replay(vae=dcgan)
    memory.observe(generated(source, 8, seed=0), 0, 0)
    sample = memory.sample(5).x
    assert sample.shape == (5, 1, 8, 8) and sample.abs().max() <= 1.0  # DCGAN decoder: tanh range


def test_latent_refinement_lowers_its_objective():
    source, memory = source_generator(), replay(refine={'steps': 5, 'lr': 0.05})
    memory.observe(generated(source, 8, seed=0), 0, 0)
    z = memory.vae.sample_latent(32, generator=torch.Generator().manual_seed(0))
    assert memory.refine_objective(memory._refined(z)) < memory.refine_objective(z)
    assert memory.sample(8).x.shape == (8, 1, 8, 8)


def test_generative_replay_needs_attach_and_refuses_a_decoder_the_teacher_cannot_take():
    memory = GenerativeReplay(vae=VAE)
    with pytest.raises(RuntimeError, match='attach'):
        memory.observe(torch.zeros(2, 1, 8, 8), 0, 0)
    wrong = GenerativeReplay(vae={'key': 'ReplayVAE', 'kwargs': {'nz': 8, 'img_size': 8, 'nc': 3}})
    with pytest.raises(ValueError, match=r'train.data_free.replay.kwargs.vae.kwargs.nc: the generator makes samples '
                                         r'of shape 3x8x8'):
        wrong.attach(ReplayContext(tiny_teacher(), torch.device('cpu')))


def test_generative_replay_state_round_trips():
    source = source_generator()
    a, b = replay(seed=1), replay(seed=2)
    for step in range(3):
        a.observe(generated(source, 8, seed=step), 0, step)
    b.load_state_dict(a.state_dict())
    assert len(b) == len(a) and torch.equal(a.sample(4).x, b.sample(4).x)
    x = generated(source, 8, seed=9)
    assert a.train_step(x) == b.train_step(x)


@pytest.mark.parametrize('kwargs, match', [
    ({'train_every': 2, 'train_steps': 3}, 'train_steps'),
    ({'beta': -1.0}, 'beta'),
    ({'self_replay': -1}, 'self_replay'),
    ({'refine': {'stpes': 1}}, "refine.stpes: unknown key \\(did you mean 'steps'\\?\\)"),
])
def test_generative_replay_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GenerativeReplay(vae=VAE, **kwargs)


def test_registry_builds_generative_replay_with_its_optimizer_from_yaml():
    memory = get_replay('GenerativeReplay', vae=VAE, optimizer={'key': 'SGD', 'kwargs': {'lr': 0.1}})
    assert isinstance(memory.optimizer, torch.optim.SGD)
    assert {id(p) for g in memory.optimizer.param_groups for p in g['params']} == \
        {id(p) for p in memory.vae.parameters()}


def test_a_push_size_above_one_student_batch_is_said_in_one_warning(caplog):
    """It still trains (each push stores one batch), so it is a warning, not a refusal."""
    from types import SimpleNamespace
    config = SimpleNamespace(batch_size=32, num_epochs=3)
    with caplog.at_level('WARNING'):
        MemoryBank.check_config({'push_size': 128, 'push_every_epochs': 1}, config)
        MemoryBank.check_config({'push_size': 32, 'push_every_epochs': 1}, config)
    warned = [r.getMessage() for r in caplog.records if 'push_size' in r.getMessage()]
    assert warned == ['train.data_free.replay.kwargs.push_size: 128 is more than a push can store (one student '
                      'batch, train.data_free.batch_size 32); each push stores 32']
