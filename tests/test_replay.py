"""MemoryBank: bounded, FIFO by pushed batch, push schedule, sampling, state round trip."""
from __future__ import annotations

import pytest
import torch

from lrwa_plugin.registry import get_replay
from lrwa_plugin.replay import MemoryBank


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
    held = set(memory.sample().unique().tolist())
    assert held == {2.0, 3.0}


def test_push_keeps_only_push_size_samples_on_cpu_detached():
    memory = MemoryBank(capacity=8, push_size=3)
    x = torch.randn(10, 1, 2, 2, requires_grad=True)
    memory.push(x * 2)
    assert len(memory) == 3
    sample = memory.sample(5)
    assert sample.shape == (5, 1, 2, 2) and not sample.requires_grad and sample.device.type == 'cpu'


def test_observe_pushes_at_the_end_of_every_nth_epoch():
    memory = MemoryBank(capacity=100, push_size=4, push_every_epochs=2)
    for epoch in range(4):
        for iteration in range(3):
            memory.observe(batch(float(epoch)), epoch, iteration, last_iteration=iteration == 2)
    assert len(memory) == 8
    assert set(memory.sample(64).unique().tolist()) == {1.0, 3.0}


def test_sampling_is_seeded_and_state_round_trips():
    a, b = MemoryBank(capacity=32, push_size=16, seed=3), MemoryBank(capacity=32, push_size=16, seed=3)
    data = torch.arange(16.0).view(16, 1, 1, 1)
    a.push(data)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.sample(8), b.sample(8))


@pytest.mark.parametrize('kwargs, match', [
    ({'capacity': 0}, 'capacity'),
    ({'push_size': -1}, 'push_size'),
    ({'batch_size': 2.5}, 'batch_size'),
    ({'capacity': 4, 'push_size': 8}, 'exceed'),
    ({'policy': 'lifo'}, "policy 'lifo'"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MemoryBank(**kwargs)


def test_registry_builds_and_rejects_unknown_keys():
    assert isinstance(get_replay('MemoryBank', capacity=4, push_size=2), MemoryBank)
    with pytest.raises(ValueError, match='MemoryBank'):
        get_replay('MemoryBnak')
