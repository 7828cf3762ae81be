"""The paper-scale configs (CIFAR-10, CIFAR-100, Tiny-ImageNet): the published setting, a smoke run of each through the
runner with the full models on FakeData of the same shapes, the teacher configs, and the dataset factories' errors.

The real datasets cannot be downloaded here, so every run swaps the shipped dataset entry for torchvision's
``FakeData`` and shrinks only sizes (batch sizes, iterations, student steps, epochs, memory period; loader workers 0)
by textual edits that must apply; every other key runs as shipped.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import yaml
from conftest import DATA_FREE, ROOT, load_plain, run_cli, without_strategy, write_config
from PIL import Image
from torchdistill.models.registry import get_model

import lrwa_plugin.datasets as lrwa_datasets
from lrwa_plugin.datasets import cifar, reorganize_tiny_imagenet_val, tiny_imagenet
from lrwa_plugin.registry import STRATEGY_DICT
from lrwa_plugin.run.checkpoint import atomic_save, load_state_dict_file

CONFIGS = ROOT / 'examples' / 'configs'
#: dataset directory -> (classes, image size, evaluation split, teacher key, student key, dataset factory, root)
DATASETS = {
    'cifar10': (10, 32, 'test', 'resnet34_cifar', 'resnet18_cifar', 'cifar', '~/datasets/cifar10'),
    'cifar100': (100, 32, 'test', 'resnet34_cifar', 'resnet18_cifar', 'cifar', '~/datasets/cifar100'),
    'tiny_imagenet': (200, 64, 'val', 'resnet34_tinyimagenet', 'resnet18_tinyimagenet', 'tiny_imagenet',
                      '~/datasets/tiny-imagenet-200'),
}
TEACHER_CKPT = 'resource/ckpt/{key}/teacher_resnet34.pt'


def shipped_dataset(key: str, split: str) -> str:
    """The dataset entry as the shipped YAMLs write it (so a changed entry fails the edit loudly)."""
    _, _, _, _, _, factory, root = DATASETS[key]
    kwargs = (f"{{name: '{key}', root: '{root}', split: '{split}', download: False}}" if factory == 'cifar' else
              f"{{root: '{root}', split: '{split}', download: False, reorganize: False}}")
    return (f"  {key}/{split}: !import_call\n    key: 'lrwa_plugin.datasets.{factory}'\n    init:\n"
            f"      kwargs: {kwargs}")


def fake_dataset(key: str, split: str, size: int = 1) -> str:
    classes, img = DATASETS[key][:2]
    return (f"  {key}/{split}: !import_call {{key: 'torchvision.datasets.FakeData', init: {{kwargs: {{size: {size}, "
            f"image_size: [3, {img}, {img}], num_classes: {classes}, transform: !import_call "
            "{key: 'torchvision.transforms.ToTensor', init: {}}}}}")


def smoke_edits(key: str, name: str) -> dict[str, str]:
    """Two iterations of one student step on generated batches of 1 (replayed: 2), one-image datasets, everything
    else as shipped.

    A memory bank only pushes at the end of an epoch, so its configs run two epochs of one iteration with a push
    after each (the second step replays); the others one epoch of two iterations (a VAE is trained on step 0, so the
    second step replays).
    """
    replay = DATA_FREE[name][1]
    epochs, iterations = (2, 1) if replay == 'MemoryBank' else (1, 2)
    edits = {
        shipped_dataset(key, DATASETS[key][2]): fake_dataset(key, DATASETS[key][2]),
        'num_epochs: 400': f'num_epochs: {epochs}',
        'iterations_per_epoch: 72': f'iterations_per_epoch: {iterations}',
        'batch_size: 512\n    student_steps: 10': 'batch_size: 1\n    student_steps: 1',
        'kwargs: {batch_size: 512, num_workers: 4}': 'kwargs: {batch_size: 1, num_workers: 0}',
    }
    if replay == 'MemoryBank':
        edits['push_every_epochs: 5, batch_size: 64'] = 'push_every_epochs: 1, batch_size: 2'
    elif replay == 'GenerativeReplay':
        edits.update({'train_size: 256': 'train_size: 1', 'self_replay: 64': 'self_replay: 1',
                      'batch_size: 64             #': 'batch_size: 2              #'})
    elif replay == 'MomentumGenerator':
        edits['momentum: 0.95, batch_size: 64'] = 'momentum: 0.95, batch_size: 2'
    return edits


@pytest.fixture(scope='module')
def memory_dir(tmp_path_factory) -> Iterator[Path]:
    """Where the runs write: RAM (``/dev/shm``) when there is one, since every run saves a few hundred MB of student,
    optimizer and generator state with fsync, which only costs time here."""
    shm = Path('/dev/shm')
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path_factory.mktemp('paper_runs')
        return
    with tempfile.TemporaryDirectory(prefix='lrwa_paper_configs_', dir=shm) as directory:
        yield Path(directory)


@pytest.fixture
def work_dir(memory_dir, request, monkeypatch) -> Path:
    directory = memory_dir / request.node.name.replace('[', '_').replace(']', '')
    directory.mkdir()
    monkeypatch.chdir(directory)
    return directory


@pytest.fixture(scope='module')
def teacher_checkpoints(memory_dir) -> dict[str, Path]:
    """One randomly initialised ResNet-34 teacher checkpoint per dataset, written once for the module."""
    paths = {}
    for key, (classes, _, _, teacher, *_) in DATASETS.items():
        torch.manual_seed(0)
        paths[key] = memory_dir / f'teacher_{key}.pt'
        atomic_save(get_model(teacher, num_classes=classes).state_dict(), paths[key])
    return paths


@pytest.fixture
def strategy_calls(monkeypatch) -> list[tuple[str, bool]]:
    """Records, for every student step, the strategy that formed the gradient and whether it had a replay batch."""
    calls: list[tuple[str, bool]] = []

    def spying(backward):
        def spy(self, student, losses):
            calls.append((self.key, losses.retain is not None))
            return backward(self, student, losses)
        return spy

    for cls in {cls for cls in STRATEGY_DICT.values() if 'backward' in vars(cls)}:  # subclasses inherit the spy
        monkeypatch.setattr(cls, 'backward', spying(vars(cls)['backward']))
    # The per-epoch sample grids (tested in test_evolution) cost more here than the two iterations: 32 generated and 32
    # replayed samples through the ResNet-34 teacher, the VAE's latent refinement, matplotlib figures.
    monkeypatch.setattr('lrwa_plugin.run.trainers.DataFreeTrainer.after_evaluation', lambda *args, **kwargs: None)
    return calls


# ------------------------------------------------------------------------------------------- smoke runs
# Every strategy on CIFAR-100; one on each other dataset (lrwa_gr on Tiny-ImageNet: the meta step and the VAE at
# 64 px): their five files are the CIFAR-100 ones but for the strategy and replay blocks
# (test_configs_hold_the_published_setting_and_differ_only_in_strategy_and_replay).
SMOKE_RUNS = [*(('cifar100', name) for name in DATA_FREE), ('cifar10', 'lrwa_mb'), ('tiny_imagenet', 'lrwa_gr')]


@pytest.mark.parametrize(('key', 'name'), SMOKE_RUNS)
def test_data_free_config_runs_with_the_full_models(key, name, teacher_checkpoints, strategy_calls, work_dir, capsys):
    ckpt = work_dir / TEACHER_CKPT.format(key=key)
    ckpt.parent.mkdir(parents=True)
    os.symlink(teacher_checkpoints[key], ckpt)
    config = write_config(CONFIGS / key / f'{name}.yaml', work_dir / 'run.yaml', smoke_edits(key, name))
    assert run_cli(config) == 0
    out = capsys.readouterr().out
    assert 'Summary' in out and 'student_top1' in out and 'teacher_top1' in out
    student = load_state_dict_file(work_dir / f'resource/ckpt/{key}/{name}.pt')
    classes, _, _, _, student_key, *_ = DATASETS[key]
    with torch.device('meta'):
        assert set(student) == set(get_model(student_key, num_classes=classes).state_dict())
    strategy, replay = DATA_FREE[name]
    assert [call[0] for call in strategy_calls] == [strategy, strategy]
    # the first step has an empty memory and the second replays (a pushed batch, or the VAE trained on step 0);
    # the momentum generator replays from the first generator step on
    assert [call[1] for call in strategy_calls] == [replay == 'MomentumGenerator', replay is not None]


@pytest.mark.parametrize('key', ['cifar100'])  # the others are the same file: see the next two tests
def test_teacher_config_trains_and_writes_the_checkpoint_the_data_free_configs_read(key, work_dir):
    classes, _, split, teacher, *_ = DATASETS[key]
    config = write_config(CONFIGS / key / 'teacher.yaml', work_dir / 'teacher.yaml', {
        shipped_dataset(key, 'train'): fake_dataset(key, 'train', size=2),
        shipped_dataset(key, split): fake_dataset(key, split),
        'num_epochs: 200': 'num_epochs: 1',
        'kwargs: {batch_size: 128, num_workers: 4, drop_last: True}': 'kwargs: {batch_size: 2, num_workers: 0, '
                                                                    'drop_last: True}',
        'kwargs: {batch_size: 512, num_workers: 4}': 'kwargs: {batch_size: 1, num_workers: 0}',
    })
    assert run_cli(config) == 0
    written = load_state_dict_file(work_dir / TEACHER_CKPT.format(key=key))
    with torch.device('meta'):
        assert set(written) == set(get_model(teacher, num_classes=classes).state_dict())


@pytest.mark.parametrize('name', ['teacher', *DATA_FREE])
def test_cifar10_configs_are_the_cifar100_ones_with_ten_classes(name):
    def ten_classes(value, key=None):
        if isinstance(value, dict):
            return {ten_classes(k): ten_classes(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [ten_classes(v) for v in value]
        if isinstance(value, str):
            return value.replace('cifar100', 'cifar10')
        if key == 'num_classes':
            return 10
        return 0.1 if key == 'weight' and value == 0.01 else value  # the adversarial weight 1 / classes

    assert load_plain(CONFIGS / 'cifar10' / f'{name}.yaml') == ten_classes(load_plain(CONFIGS / 'cifar100' /
                                                                                      f'{name}.yaml'))


def test_tiny_imagenet_teacher_config_is_the_cifar100_one_on_its_data_and_network():
    def without_data(key: str) -> dict:
        config = load_plain(CONFIGS / key / 'teacher.yaml')
        text = yaml.safe_dump({k: v for k, v in config.items() if k != 'datasets'})
        split = DATASETS[key][2]
        return yaml.safe_load(text.replace(f'{key}/{split}', 'DATA/eval').replace(key, 'DATA'))

    tiny, cifar100 = without_data('tiny_imagenet'), without_data('cifar100')
    assert tiny['models'].pop('model') == {'key': 'resnet34_tinyimagenet', 'kwargs': {'num_classes': 200},
                                           'dst_ckpt': 'resource/ckpt/DATA/teacher_resnet34.pt'}
    assert cifar100['models'].pop('model')['key'] == 'resnet34_cifar'
    assert tiny == cifar100
    datasets = load_plain(CONFIGS / 'tiny_imagenet' / 'teacher.yaml')['datasets']
    assert [entry['key'] for entry in datasets.values()] == ['lrwa_plugin.datasets.tiny_imagenet'] * 2


@pytest.mark.parametrize('key', list(DATASETS))
def test_every_data_free_config_reads_the_teacher_its_teacher_config_writes(key):
    teacher = load_plain(CONFIGS / key / 'teacher.yaml')['models']['model']
    assert teacher['dst_ckpt'] == TEACHER_CKPT.format(key=key)
    for name in DATA_FREE:
        config = load_plain(CONFIGS / key / f'{name}.yaml')
        assert config['models']['teacher_model']['src_ckpt'] == teacher['dst_ckpt']
        assert config['models']['teacher_model']['key'] == teacher['key']
        assert config['models']['teacher_model']['kwargs'] == teacher['kwargs']


# ----------------------------------------------------------------------------------- the published setting
@pytest.mark.parametrize('key', list(DATASETS))
def test_configs_hold_the_published_setting_and_differ_only_in_strategy_and_replay(key):
    classes, img, split, teacher, student, factory, _ = DATASETS[key]
    configs = {name: load_plain(CONFIGS / key / f'{name}.yaml') for name in DATA_FREE}
    for name, config in configs.items():
        strategy, replay = DATA_FREE[name]
        train, data_free = config['train'], config['train']['data_free']
        assert train['strategy'] == strategy and train['num_epochs'] == 400
        assert (data_free['iterations_per_epoch'], data_free['batch_size'], data_free['student_steps']) == (72, 512, 10)
        generator = data_free['generator']
        assert generator['key'] == 'DAFLGenerator' and generator['steps'] == 1
        assert generator['kwargs'] == {'nz': 1000, 'img_size': img, 'nc': 3, 'ngf': 128, 'spectral_norm': True}
        assert generator['optimizer'] == {'key': 'Adam', 'kwargs': {'lr': 0.02}}
        terms = generator['criterion']['kwargs']['sub_terms']
        assert {name: term['weight'] for name, term in terms.items()} == \
            {'adv': pytest.approx(1 / classes), 'onehot': 1.0, 'ie': pytest.approx(5 / np.log(10)), 'act': 0.1}
        assert terms['adv']['criterion']['kwargs'] == {'kind': 'js', 'temperature': 3.0, 'clamp': [0.01, 0.99]}
        assert train['optimizer'] == {'key': 'SGD', 'kwargs': {'lr': 0.1, 'momentum': 0.9, 'weight_decay': 0.0005}}
        assert train['scheduler'] == {'key': 'CosineAnnealingLR', 'kwargs': {'T_max': 400}, 'scheduling_step': 0}
        assert list(train['criterion']['kwargs']['sub_terms']) == ['l1']
        assert config['models']['teacher_model']['key'] == teacher
        assert config['models']['student_model']['key'] == student
        assert config['models']['student_model']['kwargs'] == {'num_classes': classes}
        assert list(config['datasets']) == [f'{key}/{split}']
        assert ('meta' in data_free) == (strategy == 'lrwa')
        if strategy == 'lrwa':
            assert data_free['meta'] == {'alpha_per_lr': 1.0, 'backend': 'higher', 'order': 'second'}
        assert (data_free.get('replay') or {}).get('key') == replay
        if replay == 'MemoryBank':
            assert data_free['replay']['kwargs'] == {'capacity': 640, 'push_size': 64, 'push_every_epochs': 5,
                                                     'batch_size': 64, 'policy': 'fifo'}
        elif replay == 'GenerativeReplay':
            kwargs = data_free['replay']['kwargs']
            assert kwargs['optimizer'] == {'key': 'Adam', 'kwargs': {'lr': 0.0005}}
            assert (kwargs['train_every'], kwargs['train_steps'], kwargs['batch_size']) == (10, 4, 64)
            assert (kwargs['train_size'], kwargs['self_replay']) == (256, 64)
            assert kwargs['vae']['kwargs']['nz'] == 1000 and kwargs['vae']['kwargs']['img_size'] == img
        elif replay == 'MomentumGenerator':
            assert data_free['replay']['kwargs'] == {'momentum': 0.95, 'batch_size': 64}

    reference = without_strategy(configs['dfad'])
    assert all(without_strategy(config) == reference for config in configs.values())


# --------------------------------------------------------------------------------------------- datasets
def test_absent_cifar_is_a_one_line_error_of_the_runner(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = write_config(CONFIGS / 'cifar100' / 'lrwa_mb.yaml', tmp_path / 'run.yaml',
                          {"root: '~/datasets/cifar100'": "root: 'data'"})
    assert run_cli(config) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1, err
    assert ("CIFAR-100 not found under 'data': pass download: True on a machine with internet, or put the extracted "
            "'cifar-100-python' folder there") in err


def test_absent_tiny_imagenet_is_a_one_line_error_of_the_runner(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = write_config(CONFIGS / 'tiny_imagenet' / 'lrwa_gr.yaml', tmp_path / 'run.yaml',
                          {"root: '~/datasets/tiny-imagenet-200'": "root: 'data'"})
    assert run_cli(config) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1, err
    assert "Tiny-ImageNet not found under 'data': pass download: True" in err


def test_cifar_that_cannot_be_downloaded_or_is_corrupted_says_so(tmp_path, monkeypatch):
    def offline(self):
        raise URLError('[Errno -3] Temporary failure in name resolution')
    monkeypatch.setattr(lrwa_datasets.tv_datasets.CIFAR10, 'download', offline)
    with pytest.raises(FileNotFoundError, match=r"CIFAR-10 not found under '.*' and could not be downloaded "
                                                r"\(URLError: .*name resolution.*\): put the extracted "
                                                r"'cifar-10-batches-py' folder there"):
        cifar('cifar10', tmp_path, 'test', download=True)
    (tmp_path / 'cifar-10-batches-py').mkdir()
    with pytest.raises(FileNotFoundError, match='CIFAR-10 under .* is incomplete or corrupted'):
        cifar('cifar10', tmp_path, 'test')
    with pytest.raises(ValueError, match="name: unknown name 'cifar1000' .*expected one of: cifar10, cifar100"):
        cifar('cifar1000', tmp_path, 'test')
    with pytest.raises(ValueError, match="split: unknown split 'val'; expected one of: train, test"):
        cifar('cifar100', tmp_path, 'val')


def test_cifar_reads_torchvision_files_normalised(tmp_path, monkeypatch):
    """A CIFAR-100 folder in torchvision's format (checksums bypassed: the files are made up)."""
    monkeypatch.setattr('torchvision.datasets.cifar.check_integrity', lambda *args, **kwargs: True)
    folder = tmp_path / 'cifar-100-python'
    folder.mkdir()
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(6, 3072), dtype=np.uint8)
    for split in ('train', 'test'):
        with open(folder / split, 'wb') as f:
            pickle.dump({'data': data, 'fine_labels': [0, 1, 2, 3, 4, 99]}, f)
    with open(folder / 'meta', 'wb') as f:
        pickle.dump({'fine_label_names': [f'class{i}' for i in range(100)]}, f)
    dataset = cifar('cifar100', tmp_path, 'test')
    x, y = dataset[5]
    assert len(dataset) == 6 and x.shape == (3, 32, 32) and y == 99
    raw = torch.from_numpy(data[5].reshape(3, 32, 32)).float() / 255
    mean, std = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2023, 0.1994, 0.2010])
    assert torch.allclose(x, (raw - mean[:, None, None]) / std[:, None, None], atol=1e-5)
    assert cifar('cifar100', tmp_path, 'train')[0][0].shape == (3, 32, 32)  # augmented: crop + flip


def make_tiny_imagenet(root: Path, wnids: tuple[str, ...] = ('n01443537', 'n09999999'), per_class: int = 2) -> Path:
    """A miniature ``tiny-imagenet-200`` in the archive's layout (val/ not yet sorted into class folders)."""
    folder = root / 'tiny-imagenet-200'
    lines = []
    for c, wnid in enumerate(wnids):
        (folder / 'train' / wnid / 'images').mkdir(parents=True)
        for i in range(per_class):
            image = Image.new('RGB', (64, 64), (40 * c, 10 * i, 0))
            image.save(folder / 'train' / wnid / 'images' / f'{wnid}_{i}.JPEG')
    (folder / 'val' / 'images').mkdir(parents=True)
    for i in range(per_class * len(wnids)):
        wnid = wnids[i % len(wnids)]
        Image.new('RGB', (64, 64), (0, 0, 30 * i)).save(folder / 'val' / 'images' / f'val_{i}.JPEG')
        lines.append(f'val_{i}.JPEG\t{wnid}\t0\t0\t63\t63')
    (folder / 'val' / 'val_annotations.txt').write_text('\n'.join(lines) + '\n')
    return folder


def test_tiny_imagenet_val_must_be_sorted_into_class_folders_and_then_reads_like_train(tmp_path):
    folder = make_tiny_imagenet(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"val/ under '.*tiny-imagenet-200' is not sorted into class folders: "
                                                r"pass reorganize: True once"):
        tiny_imagenet(tmp_path, 'val')
    val = tiny_imagenet(tmp_path, 'val', reorganize=True)  # the parent folder is accepted too
    train = tiny_imagenet(folder, 'train')
    assert val.classes == train.classes == ['n01443537', 'n09999999']
    assert sorted(Path(path).name for path, _ in val.samples) == [f'val_{i}.JPEG' for i in range(4)]
    assert all(int(Path(path).stem.split('_')[1]) % 2 == label for path, label in val.samples)
    assert val[0][0].shape == (3, 64, 64)
    assert not (folder / 'val' / 'images').exists()
    assert reorganize_tiny_imagenet_val(folder) == 0  # already sorted: nothing moves
    assert len(tiny_imagenet(folder, 'val')) == 4


def test_tiny_imagenet_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="Tiny-ImageNet not found under '.*': pass download: True on a machine "
                                                "with internet, or put the extracted 'tiny-imagenet-200' folder there"):
        tiny_imagenet(tmp_path, 'val')

    def offline(*args, **kwargs):
        raise URLError('[Errno -3] Temporary failure in name resolution')
    monkeypatch.setattr(lrwa_datasets, 'download_and_extract_archive', offline)
    with pytest.raises(FileNotFoundError, match=r'could not be downloaded \(URLError: .*\): put the extracted'):
        tiny_imagenet(tmp_path, 'val', download=True)
    folder = make_tiny_imagenet(tmp_path)
    reorganize_tiny_imagenet_val(folder)
    (folder / 'train' / 'n11111111').mkdir()
    with pytest.raises(FileNotFoundError, match='val/ and train/ have different class folders'):
        tiny_imagenet(folder, 'val')
    with pytest.raises(ValueError, match="split: unknown split 'test'; expected one of: train, val"):
        tiny_imagenet(folder, 'test')
