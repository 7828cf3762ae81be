"""The seams: a new memory and a new strategy are one file each (here: this test file), torchdistill's post-forward
and post-epoch processes run in data-free runs, and a run modifies neither its flags nor its config."""
from __future__ import annotations

import argparse
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DIGITS_CONFIGS, SHORT_RUN, child_env, run_cli, run_flags, write_config
from torchdistill.core.interfaces.post_forward_proc import default_post_forward_process
from torchdistill.core.interfaces.registry import POST_FORWARD_PROC_FUNC_DICT, register_post_forward_proc_func

from lrwa_plugin.errors import ConfigError
from lrwa_plugin.registry import REPLAY_DICT, STRATEGY_DICT, register_replay, register_strategy
from lrwa_plugin.replay import MemoryBank, Replayed, ReplayMemory
from lrwa_plugin.run import cli, loading, runner
from lrwa_plugin.run.resume import read_training_state
from lrwa_plugin.strategies import StepClosures, Strategy, loss_values

ONE_ITERATION = {**SHORT_RUN, 'num_epochs: 2': 'num_epochs: 1', 'iterations_per_epoch: 3': 'iterations_per_epoch: 1'}
REPLAY_BLOCK = ("    replay:\n      key: 'MemoryBank'\n"
                "      kwargs: {capacity: 1024, push_size: 128, push_every_epochs: 1, batch_size: 64}\n")
CALLS: list[str] = []


@pytest.fixture
def registered():
    """Registers the toy memory and the toy strategy below for one test, then removes them again."""
    CALLS.clear()
    memory = register_replay(LastBatch)
    strategy = register_strategy(key='toy_joint')(ToyJoint)
    yield memory, strategy
    REPLAY_DICT.pop('LastBatch')
    STRATEGY_DICT.pop('toy_joint')


class LastBatch(ReplayMemory):
    """A toy memory: replays the newest generated batch it was shown."""

    def __init__(self, batch_size: int = 16, seed: int = 0) -> None:
        super().__init__(seed)
        self.batch_size, self.last = batch_size, None

    def __len__(self) -> int:
        return 0 if self.last is None else len(self.last)

    def observe(self, x: torch.Tensor, epoch: int, iteration: int) -> None:
        CALLS.append('observe')
        self.last = x.detach()

    def sample(self, n: int | None = None, device: torch.device | str | None = None) -> Replayed | None:
        if self.last is None:
            return None
        CALLS.append('sample')
        return Replayed(self.last[: n or self.batch_size].to(device))

    def extra_state(self) -> dict:
        return {'last': self.last}

    def load_extra_state(self, state: dict) -> None:
        self.last = state['last']


class ToyJoint(Strategy):
    """A toy strategy with its own setting: ``∇[L_Acq + w · L_Ret]`` on a memory bank."""

    accepts = (MemoryBank,)

    def __init__(self, retain_weight: float = 1.0) -> None:
        if not retain_weight >= 0:  # a ConfigError's path names the argument: the runner puts it below its block
            raise ConfigError('retain_weight', f'must be >= 0, got {retain_weight}')
        self.retain_weight = retain_weight

    def backward(self, student: torch.nn.Module, losses: StepClosures) -> dict[str, float]:
        CALLS.append(f'toy_joint {self.retain_weight} {losses.retain is not None}')
        l_acq = losses.acquire(student)
        l_ret = losses.retain(student) if losses.retain is not None else None
        (l_acq if l_ret is None else l_acq + self.retain_weight * l_ret).backward()
        return loss_values(acq=l_acq, ret=l_ret)


def test_a_memory_registered_outside_the_package_runs_with_lrwa(registered, work):
    config = write_config(DIGITS_CONFIGS / 'lrwa_mb.yaml', work / 'run.yaml', {
        **ONE_ITERATION, REPLAY_BLOCK: "    replay: {key: 'LastBatch', kwargs: {batch_size: 8}}\n"})
    assert run_cli(config, sample_grids=True) == 0
    # two student steps: the first has nothing to replay, the second replays the first's batch; then the sample grid
    assert CALLS == ['observe', 'sample', 'observe', 'sample']
    state = read_training_state('resource/ckpt/digits/lrwa_mb.last.pt')
    assert state['ranks'][0]['replay']['last'].shape == (32, 1, 8, 8)


def test_a_strategy_registered_outside_the_package_takes_its_own_kwargs(registered, work, capsys):
    config = write_config(DIGITS_CONFIGS / 'mb_dfkd.yaml', work / 'run.yaml', {
        **ONE_ITERATION, 'num_epochs: 1': 'num_epochs: 2', "strategy: 'mb_dfkd'":
            "strategy: {key: 'toy_joint', kwargs: {retain_weight: 0.25}}"})
    assert run_cli(config) == 0
    assert CALLS == ['toy_joint 0.25 False'] * 2 + ['toy_joint 0.25 True'] * 2  # the memory fills after epoch 0
    bad = write_config(config, work / 'bad.yaml', {'retain_weight: 0.25': 'retain_weight: -1.0'})
    assert run_cli(bad) == 2
    assert capsys.readouterr().err == 'error: train.strategy.kwargs.retain_weight: must be >= 0, got -1.0\n'
    wrong_memory = write_config(DIGITS_CONFIGS / 'lrwa_gr.yaml', work / 'gr.yaml', {
        **ONE_ITERATION, "strategy: 'lrwa'": "strategy: 'toy_joint'",
        "    meta: {alpha_per_lr: 1.0, backend: 'higher', order: 'second'}\n": ''})
    assert run_cli(wrong_memory) == 2
    err = capsys.readouterr().err
    assert "train.data_free.replay.key: 'GenerativeReplay' cannot be used with strategy 'toy_joint'" in err, err


@pytest.fixture
def counting_post_forward():
    """A post-forward process registered with torchdistill that counts its calls and then does the default."""
    calls = []

    @register_post_forward_proc_func(key='counting_post_forward')
    def counting(self, loss, metrics=None, **kwargs):
        calls.append(float(loss.detach()))
        return default_post_forward_process(self, loss, metrics=metrics, **kwargs)

    yield calls
    POST_FORWARD_PROC_FUNC_DICT.pop('counting_post_forward')


def test_a_custom_post_forward_process_steps_every_data_free_student_step(counting_post_forward, work):
    config = write_config(DIGITS_CONFIGS / 'lrwa_mb.yaml', work / 'run.yaml', {
        **SHORT_RUN,
        "\n  optimizer:\n    key: 'SGD'":
            "\n  post_forward_process: 'counting_post_forward'\n  optimizer:\n    key: 'SGD'"})
    assert run_cli(config) == 0
    assert len(counting_post_forward) == 2 * 3 * 2  # epochs x iterations x student steps
    assert all(math.isfinite(v) and v > 0 for v in counting_post_forward)  # the step's loss value
    state = read_training_state('resource/ckpt/digits/lrwa_mb.last.pt')
    assert state['box']['stage_grad_count'] == 12


@pytest.mark.parametrize('scheduler, expected', [
    # Epoch-level plateau scheduling needs the validation accuracy as its metric (torchdistill's post-epoch process).
    ("{key: 'ReduceLROnPlateau', kwargs: {mode: 'max', factor: 0.5, patience: 0, threshold: 0.0}, scheduling_step: 0}",
     'plateau'),
    ("{key: 'CosineAnnealingWarmRestarts', kwargs: {T_0: 2, eta_min: 0.0}, scheduling_step: 0}", 'restarts'),
])
def test_epoch_level_schedulers_of_torchdistill_work_in_data_free_runs(scheduler, expected, work):
    config = write_config(DIGITS_CONFIGS / 'lrwa_mb.yaml', work / 'run.yaml', {
        **SHORT_RUN, 'num_epochs: 2': 'num_epochs: 3',
        "  scheduler:\n    key: 'CosineAnnealingLR'\n    kwargs: {T_max: 12}\n    scheduling_step: 0\n":
            f'  scheduler: {scheduler}\n'})
    assert run_cli(config) == 0
    state = read_training_state('resource/ckpt/digits/lrwa_mb.last.pt')
    lr = state['box']['optimizer']['param_groups'][0]['lr']
    if expected == 'plateau':
        history = state['history']
        worse = sum(1 for e, a in enumerate(history) if a <= max(history[:e], default=-1.0))
        assert lr == pytest.approx(0.1 * 0.5 ** worse)
        assert state['box']['lr_scheduler']['best'] == max(history)
    else:  # after 3 epochs: epoch 3 of a period of 2 is the middle of the second cycle
        assert lr == pytest.approx(0.1 * (1 + math.cos(math.pi * 1 / 2)) / 2)


def test_a_run_modifies_neither_its_flags_nor_its_config(work, monkeypatch):
    config_path = write_config(DIGITS_CONFIGS / 'lrwa_mb.yaml', work / 'run.yaml', {
        **SHORT_RUN, 'num_epochs: 2': 'num_epochs: 1',
        "    requires_grad: False": "    requires_grad: False\n    wrapper: 'DistributedDataParallel'"})
    args = cli.get_argparser().parse_args(['--config', str(config_path), '--device', 'cpu', '-no_progress',
                                           '--dst_ckpt', 'out/student.pt'])
    before = argparse.Namespace(**vars(args))
    run = runner.set_up(config_path, args)
    fresh = loading.load_config(config_path)
    runner.execute(run)
    assert vars(args) == vars(before)
    for block in ('train', 'models', 'test'):
        assert run.config[block] == fresh[block], block  # e.g. the wrapper and the learning rate are as written


#: A user's own components, as a user writes them: a module of their own, imported by torchdistill because the
#: config lists it under ``dependencies`` (docs/extending.md). It leaves a trace of every call in ``calls.txt``.
USER_MODULE = '''
import torch

from lrwa_plugin.errors import ConfigError
from lrwa_plugin.registry import register_replay, register_strategy
from lrwa_plugin.replay import Replayed, ReplayMemory
from lrwa_plugin.strategies import Strategy, loss_values


def trace(line):
    with open('calls.txt', 'a') as f:
        f.write(line + '\\n')


@register_replay
class NewestBatch(ReplayMemory):
    def __init__(self, batch_size: int = 16, seed: int = 0) -> None:
        super().__init__(seed)
        self.batch_size, self.last = batch_size, None

    def __len__(self):
        return 0 if self.last is None else len(self.last)

    def observe(self, x, epoch, iteration):
        trace('observe')
        self.last = x.detach()

    def sample(self, n=None, device=None):
        if self.last is None:
            return None
        trace('sample')
        return Replayed(self.last[: n or self.batch_size].to(device))

    def extra_state(self):
        return {'last': self.last}

    def load_extra_state(self, state):
        self.last = state['last']


@register_strategy(key='weighted_joint')
class WeightedJoint(Strategy):
    def __init__(self, retain_weight: float = 1.0) -> None:
        if not retain_weight >= 0:
            raise ConfigError('retain_weight', f'must be >= 0, got {retain_weight}')
        self.retain_weight = retain_weight

    def backward(self, student, losses):
        trace(f'weighted_joint {self.retain_weight} {losses.retain is not None}')
        l_acq = losses.acquire(student)
        l_ret = losses.retain(student) if losses.retain is not None else None
        (l_acq if l_ret is None else l_acq + self.retain_weight * l_ret).backward()
        return loss_values(acq=l_acq, ret=l_ret)
'''


def test_components_in_a_users_module_under_dependencies_run_from_the_command_line(work):
    """The path a user takes: their module on disk, listed under ``dependencies:``, run by ``python -m lrwa_plugin``
    from the folder that holds it (the runner's working directory is on its import path)."""
    (work / 'my_components.py').write_text(USER_MODULE)
    edits = {**ONE_ITERATION, 'num_epochs: 1': 'num_epochs: 2', REPLAY_BLOCK:
             "    replay: {key: 'NewestBatch', kwargs: {batch_size: 8}}\n",
             "  - name: 'lrwa_plugin'\n": "  - name: 'lrwa_plugin'\n  - name: 'my_components'\n",
             "strategy: 'mb_dfkd'": "strategy: {key: 'weighted_joint', kwargs: {retain_weight: 0.5}}"}
    config = write_config(DIGITS_CONFIGS / 'mb_dfkd.yaml', work / 'run.yaml', edits)

    def run(path: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, '-m', 'lrwa_plugin', '--config', path.name, *run_flags()], cwd=work,
                              env=child_env(), capture_output=True, text=True, timeout=600)

    done = run(config)
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'Summary [' in done.stdout
    # two epochs of one iteration, two student steps each: nothing to replay at the very first step, then the newest
    assert (work / 'calls.txt').read_text().split('\n')[:4] == ['weighted_joint 0.5 False', 'observe',
                                                               'sample', 'weighted_joint 0.5 True']
    bad = run(write_config(config, work / 'bad.yaml', {'retain_weight: 0.5': 'retain_weight: -1.0'}))
    # the log goes to stderr too: the error is its last line, and the only one that says error
    assert bad.returncode == 2 and bad.stderr.splitlines()[-1] == \
        'error: train.strategy.kwargs.retain_weight: must be >= 0, got -1.0', bad.stderr[-2000:]
    missing = run(write_config(config, work / 'missing.yaml', {"name: 'my_components'": "name: 'my_componets'"}))
    last = missing.stderr.splitlines()[-1]
    assert missing.returncode == 2 and last.startswith('error: dependencies: ') and 'my_componets' in last, last
