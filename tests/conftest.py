"""Shared fixtures: one thread (tiny models run far faster so on a loaded 2-core machine), shipped configs, the runner's
flags for test runs, and the two test tiers.

Tiers: a test that goes through the real runner on a teacher checkpoint (it requests ``teacher_dir``, directly or
through ``work``, or ``teacher_checkpoints``) or runs a benchmark script is marked ``e2e`` here (:data:`E2E_FIXTURES`),
so every new end-to-end test is tagged by construction;
``python -m pytest -m "not e2e"`` is the fast unit tier, ``python -m pytest`` runs both. Hypothesis runs its ``dev``
profile (a few examples) unless ``CI`` is set, when it runs the thorough ``ci`` profile.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import settings

from lrwa_plugin.run.cli import main

ROOT = Path(__file__).resolve().parent.parent
DIGITS_CONFIGS = ROOT / 'examples' / 'configs' / 'digits'


settings.register_profile('ci', max_examples=30)
settings.register_profile('dev', max_examples=6)
settings.load_profile('ci' if os.environ.get('CI') else 'dev')

#: Fixtures that mean a test runs the real runner on a teacher checkpoint (a trained digits teacher, the paper-scale
#: teachers) or a benchmark script end to end: such a test is ``e2e``.
E2E_FIXTURES = ('teacher_dir', 'teacher_checkpoints', 'bench_meta_step', 'gpu_check')


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(name in getattr(item, 'fixturenames', ()) for name in E2E_FIXTURES):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope='session', autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a Python process a test starts with ``sys.executable`` (the interpreter running the tests,
    whatever it is: a venv, a conda env, the system's): one torch thread, and this checkout first on ``PYTHONPATH``
    (ahead of whatever the user's ``PYTHONPATH`` already holds), so the child imports the code under test."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get('PYTHONPATH', '')) if p)
    return {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': path, **extra}


def dependency_paths() -> list[str]:
    """The running interpreter's import folders less this checkout: where the tests' own torch, torchdistill, higher
    ... were found. A fresh venv given these (a ``.pth`` file) imports the same dependencies without the base
    interpreter's site-packages, which on a new user's machine hold none of them."""
    paths = []
    for entry in sys.path:
        path = Path(entry or '.').resolve()
        if path.is_dir() and path != ROOT and ROOT not in path.parents and str(path) not in paths:
            paths.append(str(path))
    return paths


@contextlib.contextmanager
def deterministic_off() -> Iterator[None]:
    """Restores ``torch.use_deterministic_algorithms`` after the block (for tests that switch it on)."""
    before = torch.are_deterministic_algorithms_enabled()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def write_config(src: Path, dst: Path, replacements: dict[str, str]) -> Path:
    """Copies a shipped YAML with textual edits, each of which must apply (so a stale edit fails loudly)."""
    text = src.read_text()
    for old, new in replacements.items():
        assert old in text, f'{old!r} not in {src.name}'
        text = text.replace(old, new)
    dst.write_text(text)
    return dst


class _TagsAsMappings(yaml.SafeLoader):
    """Reads a config without running its ``!import_call`` / ``!import_get`` tags (which would build datasets)."""


for _tag in ('!import_call', '!import_get'):
    _TagsAsMappings.add_constructor(_tag, lambda loader, node: loader.construct_mapping(node, deep=True))


def load_plain(path: Path) -> dict:
    """A shipped YAML as plain data, its torchdistill tags read as mappings."""
    return yaml.load(path.read_text(), Loader=_TagsAsMappings)


#: The data-free configs every dataset ships: config stem -> (train.strategy, replay key or None).
DATA_FREE = {
    'dfad': ('dfad', None),
    'mb_dfkd': ('mb_dfkd', 'MemoryBank'),
    'pre_dfkd': ('pre_dfkd', 'GenerativeReplay'),
    'lrwa_mb': ('lrwa', 'MemoryBank'),
    'lrwa_gr': ('lrwa', 'GenerativeReplay'),
    'mad': ('mad', 'MomentumGenerator'),
    'lrwa_mad': ('lrwa', 'MomentumGenerator'),
}


def without_strategy(config: dict) -> dict:
    """A copy of a loaded data-free config without what its strategy chooses (``train.strategy``, the
    ``data_free`` ``replay`` and ``meta`` blocks) and without the student's ``dst_ckpt``: what the arms of one
    comparison must share."""
    config = yaml.safe_load(yaml.safe_dump(config))
    config['train'].pop('strategy')
    for name in ('replay', 'meta'):
        config['train']['data_free'].pop(name, None)
    config['models']['student_model'].pop('dst_ckpt')
    return config


TEACHER_CKPT = 'resource/ckpt/digits/teacher.pt'
DIGITS_TEST_DATASET = ("digits/test: !import_call\n    key: 'lrwa_plugin.datasets.SklearnDigits'\n    init:\n"
                       "      kwargs: {split: 'test'}")
SHORT_RUN = {
    'num_epochs: 12': 'num_epochs: 2',
    'iterations_per_epoch: 25': 'iterations_per_epoch: 3',
    'student_steps: 5': 'student_steps: 2',
    'batch_size: 128': 'batch_size: 32',
}


@pytest.fixture(scope='session')
def teacher_dir(tmp_path_factory) -> Path:
    """A digits teacher (trained once per session, two epochs, plain torchdistill config, through the runner)."""
    work = tmp_path_factory.mktemp('teacher')
    config = write_config(DIGITS_CONFIGS / 'teacher.yaml', work / 'teacher.yaml',
                          {'num_epochs: 10': 'num_epochs: 2'})
    cwd = os.getcwd()
    os.chdir(work)
    try:
        assert main(['--config', str(config), '--device', 'cpu', '--seed', '0', '-no_progress']) == 0
    finally:
        os.chdir(cwd)
    assert (work / TEACHER_CKPT).is_file()
    return work


@pytest.fixture
def work(teacher_dir: Path, tmp_path: Path, monkeypatch) -> Path:
    """A fresh working directory holding the trained teacher at the configs' relative path."""
    (tmp_path / TEACHER_CKPT).parent.mkdir(parents=True)
    shutil.copy(teacher_dir / TEACHER_CKPT, tmp_path / TEACHER_CKPT)
    monkeypatch.chdir(tmp_path)
    return tmp_path


#: The runner's flags for a test run: CPU, seed 0, no progress bars, no sample grids (rendering them is a large share
#: of a tiny run; the tests of the grids ask for them with ``sample_grids=True``).
RUN_FLAGS = ('--device', 'cpu', '--seed', '0', '-no_progress', '-no_sample_grids')


def run_flags(sample_grids: bool = False) -> list[str]:
    return [flag for flag in RUN_FLAGS if sample_grids is False or flag != '-no_sample_grids']


def run_cli(config: Path, *flags: str, sample_grids: bool = False) -> int:
    """Runs the command line in this process (the runner's own code path, one line per error) on ``config``."""
    return main(['--config', str(config), *run_flags(sample_grids), *flags])


def assert_same(a: object, b: object, path: str = 'state') -> None:
    """Recursive bit-for-bit equality of two loaded states (tensors with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), path
        for key in a:
            assert_same(a[key], b[key], f'{path}.{key}')
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f'{path}[{i}]')
    else:
        assert a == b or (a != a and b != b), f'{path}: {a!r} != {b!r}'  # nan == nan
