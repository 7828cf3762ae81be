"""Training state and --resume: a killed run continues bit for bit; bad states are refused before training."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import DIGITS_CONFIGS, ROOT, assert_same, child_env, run_cli, run_flags, write_config

from lrwa_plugin.run import checkpoint
from lrwa_plugin.run.resume import last_checkpoint_path, read_training_state

TINY = {'num_epochs: 12': 'num_epochs: 3', 'iterations_per_epoch: 25': 'iterations_per_epoch: 4',
        'student_steps: 5': 'student_steps: 2', 'batch_size: 128': 'batch_size: 32'}


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob('*')) if p.is_file()}


def command(config: Path, dst: str, *flags: str) -> list[str]:
    return [sys.executable, str(ROOT / 'examples' / 'run_torchdistill.py'), '--config', str(config), *run_flags(),
            '--dst_ckpt', dst, *flags]


@pytest.mark.parametrize('name', ['lrwa_mb', 'mad'])
def test_sigkill_then_resume_is_bit_identical(name: str, work: Path) -> None:
    """N iterations straight == killed (SIGKILL) after k < N iterations + resumed: student, generator, memory (a
    memory bank's samples; the momentum generator's EMA weights and its z stream)."""
    config = write_config(DIGITS_CONFIGS / f'{name}.yaml', work / 'run.yaml', TINY)
    assert run_cli(config, '--dst_ckpt', 'straight/student.pt', '--save_every', '1') == 0

    killed = last_checkpoint_path('killed/student.pt')
    env = child_env()
    process = subprocess.Popen(command(config, 'killed/student.pt', '--save_every', '1'), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Kill once a state from the second epoch exists: the memory bank then holds epoch 0's batch.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            if killed.is_file() and read_training_state(killed)['epoch'] >= 1:
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        assert process.wait(timeout=60) == -signal.SIGKILL, 'the run ended before it could be killed'
    finally:
        process.kill()
    stopped = read_training_state(killed)
    assert (stopped['epoch'], stopped['iteration']) < (3, 0)
    memory = stopped['ranks'][0]['replay']
    assert len(memory['batches']) >= 1 if name == 'lrwa_mb' else memory['updates'] >= 4

    assert run_cli(config, '--dst_ckpt', 'killed/student.pt', '--save_every', '1', '--resume', str(killed)) == 0
    straight, resumed = (read_training_state(p) for p in (last_checkpoint_path('straight/student.pt'), killed))
    assert (resumed['epoch'], resumed['iteration']) == (3, 0)
    assert_same(straight['box'], resumed['box'])  # student, generator, optimizers, schedulers
    assert_same(straight['ranks'], resumed['ranks'])  # memory bank (samples and sampling stream), RNG states
    assert straight['history'] == resumed['history']
    best_straight = torch.load('straight/student.pt', weights_only=True)['model']
    assert_same(best_straight, torch.load('killed/student.pt', weights_only=True)['model'])


@pytest.mark.parametrize('name, edits', [
    ('lrwa_gr', {}),
    # α follows the learning rate (the shipped policy), which the restored scheduler sets: nothing new in the
    # state, the same run
    ('lrwa_mb', {}),
])
def test_extending_a_finished_run_equals_the_longer_run(name: str, edits: dict, work: Path) -> None:
    """train.num_epochs may grow on resume (epoch-boundary resume; in process)."""
    three = write_config(DIGITS_CONFIGS / f'{name}.yaml', work / 'three.yaml', {
        **TINY, 'iterations_per_epoch: 25': 'iterations_per_epoch: 3', **edits})
    assert run_cli(three, '--dst_ckpt', 'a/student.pt') == 0
    two = write_config(three, work / 'two.yaml', {'num_epochs: 3': 'num_epochs: 2'})
    assert run_cli(two, '--dst_ckpt', 'b/student.pt') == 0
    assert run_cli(three, '--dst_ckpt', 'b/student.pt', '--resume', 'b/student.last.pt') == 0
    a, b = (read_training_state(f'{d}/student.last.pt') for d in 'ab')
    assert_same(a['box'], b['box'])
    assert_same(a['ranks'], b['ranks'])  # generative replay: VAE, its optimizer and stream
    assert a['history'] == b['history'] and len(a['history']) == 3


@pytest.fixture
def finished(work: Path) -> Path:
    """A finished 1-epoch run: its config, best student and training state."""
    config = write_config(DIGITS_CONFIGS / 'lrwa_mb.yaml', work / 'run.yaml',
                          {**TINY, 'num_epochs: 12': 'num_epochs: 1', 'iterations_per_epoch: 25':
                           'iterations_per_epoch: 2'})
    assert run_cli(config, '--dst_ckpt', 'out/student.pt') == 0
    return config


@pytest.mark.parametrize(('edit', 'expected'), [
    (lambda c: c.replace('batch_size: 32', 'batch_size: 16'), 'train.data_free.batch_size: 32 -> 16'),
    (lambda c: c.replace("backend: 'higher'", "backend: 'functional'"),
     "train.data_free.meta.backend: 'higher' -> 'functional'"),
    (lambda c: c.replace('alpha_per_lr: 1.0', 'alpha_per_lr: 0.25'),
     'train.data_free.meta.alpha_per_lr: 1.0 -> 0.25'),
])
def test_resume_refuses_a_different_config(finished: Path, work: Path, capsys, edit, expected) -> None:
    other = work / 'other.yaml'
    other.write_text(edit(finished.read_text()))
    before = snapshot(work / 'out')
    assert run_cli(other, '--dst_ckpt', 'out/student.pt', '--resume', 'out/student.last.pt') == 2
    error = capsys.readouterr().err.strip()
    assert error.count('\n') == 0 and error.startswith("error: --resume: checkpoint 'out/student.last.pt' was "
                                                       'written by a different run') and expected in error, error
    assert snapshot(work / 'out') == before


def test_resume_refuses_another_seed(finished: Path, capsys) -> None:
    assert run_cli(finished, '--dst_ckpt', 'out/student.pt', '--resume', 'out/student.last.pt', '--seed', '1') == 2
    assert '--seed: 0 -> 1' in capsys.readouterr().err


@pytest.mark.parametrize(('damage', 'expected'), [
    (lambda p: p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2]), 'could not be read'),
    (lambda p: p.write_bytes(b''), 'could not be read: the file is empty'),
    (lambda p: p.unlink(), 'does not exist'),
    (lambda p: p.write_bytes(Path('out/student.pt').read_bytes()), 'is not a training state'),
])
def test_resume_reports_a_bad_checkpoint_in_one_line(finished: Path, work: Path, capsys, damage, expected) -> None:
    damage(work / 'out' / 'student.last.pt')
    before = snapshot(work / 'out')
    assert run_cli(finished, '--dst_ckpt', 'out/student.pt', '--resume', 'out/student.last.pt') == 2
    error = capsys.readouterr().err.strip()
    assert error.count('\n') == 0 and error.startswith("error: --resume: checkpoint 'out/student.last.pt'") \
        and expected in error, error
    assert snapshot(work / 'out') == before


def test_interrupted_write_leaves_the_previous_state(finished: Path, work: Path, monkeypatch) -> None:
    """A write that dies half way (truncated temporary file) leaves the last complete state loadable."""
    path = work / 'out' / 'student.last.pt'
    before = path.read_bytes()
    real_save = torch.save

    def dies_half_way(obj: object, f) -> None:
        real_save(obj, f)
        f.flush()
        f.truncate(f.tell() // 2)
        raise KeyboardInterrupt('killed while writing')

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(checkpoint.torch, 'save', dies_half_way)
        checkpoint.atomic_save({'format': 'anything'}, path)
    assert path.read_bytes() == before and read_training_state(path)['epoch'] == 1
    assert [p.name for p in path.parent.iterdir() if p.name.endswith('.tmp')] == []
    # A SIGKILL mid-write leaves the truncated temporary file behind: it is ignored, the run resumes and extends.
    (path.parent / f'.{path.name}.12345.deadbeef.tmp').write_bytes(before[:len(before) // 3])
    longer = write_config(finished, work / 'longer.yaml', {'num_epochs: 1': 'num_epochs: 2'})
    assert run_cli(longer, '--dst_ckpt', 'out/student.pt', '--resume', str(path)) == 0
    assert read_training_state(path)['epoch'] == 2


def test_save_every_and_resume_need_a_data_free_run(work: Path, capsys) -> None:
    teacher = write_config(DIGITS_CONFIGS / 'teacher.yaml', work / 'teacher.yaml', {'num_epochs: 10': 'num_epochs: 1'})
    assert run_cli(teacher, '--dst_ckpt', 'x.pt', '--save_every', '5') == 2
    assert capsys.readouterr().err.strip() == ('error: --save_every: only data-free runs (train.strategy) write and '
                                               'resume training states')
    assert not Path('x.pt').exists()


@pytest.mark.parametrize(('flags', 'expected'), [
    (['--save_every', '-1'], 'error: --save_every: expected a number of iterations >= 0 (0: only at epoch ends), '
                             'got -1'),
    (['--resume', 'out/student.last.pt', '--start_epoch', '1'],
     'error: --start_epoch: not with --resume (the training state says where the run continues)'),
])
def test_flag_mistakes_are_one_line_before_training(finished: Path, work: Path, capsys, flags, expected) -> None:
    before = snapshot(work / 'out')
    assert run_cli(finished, '--dst_ckpt', 'out/student.pt', *flags) == 2
    assert capsys.readouterr().err.strip() == expected
    assert snapshot(work / 'out') == before


def test_a_state_that_does_not_fit_the_models_is_one_line(finished: Path, work: Path, capsys) -> None:
    path = work / 'out' / 'student.last.pt'
    state = torch.load(path, weights_only=True)
    state['box']['student'].pop(next(iter(state['box']['student'])))
    torch.save(state, path)
    before = snapshot(work / 'out')
    assert run_cli(finished, '--dst_ckpt', 'out/student.pt', '--resume', str(path)) == 2
    error = capsys.readouterr().err.strip()
    assert error.count('\n') == 0 and error.startswith('error: --resume: the checkpoint does not fit the models built '
                                                       'from the config: '), error
    assert snapshot(work / 'out') == before


def _wait_for_state(path: Path, process: subprocess.Popen, epoch: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if path.is_file() and read_training_state(path)['epoch'] >= epoch:
            return
        time.sleep(0.01)
    raise AssertionError(f'no training state of epoch {epoch} before the run ended')


def test_sigint_and_sigterm_stop_with_a_resumable_state_and_one_line(work: Path) -> None:
    """Stopped by SIGINT in epoch 1, resumed, stopped by SIGTERM in epoch 2, resumed to the end: bit for bit the run
    that was never stopped. Each stop prints one line naming the state file and the command that continues."""
    config = write_config(DIGITS_CONFIGS / 'lrwa_mb.yaml', work / 'run.yaml', {
        **TINY, 'iterations_per_epoch: 25': 'iterations_per_epoch: 12'})
    assert run_cli(config, '--dst_ckpt', 'straight/student.pt') == 0
    state = last_checkpoint_path('stopped/student.pt')
    env = child_env()
    flags: tuple[str, ...] = ()
    for signum, epoch in ((signal.SIGINT, 1), (signal.SIGTERM, 2)):
        process = subprocess.Popen(command(config, 'stopped/student.pt', *flags), env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            _wait_for_state(state, process, epoch)
            process.send_signal(signum)
            _, err = process.communicate(timeout=120)
        finally:
            process.kill()
        assert process.returncode == 128 + signum, err
        lines = [line for line in err.splitlines() if not line[:4].isdigit()]  # not the log lines
        assert len(lines) == 1 and lines[0].startswith(f'stopped: stopped by {signum.name} before epoch '), lines
        assert f"the training state is '{state}'" in lines[0]
        resume = lines[0].split('continue the run with: ')[1]
        assert resume.endswith(f'--resume {state}') and '--dst_ckpt stopped/student.pt' in resume
        stopped = read_training_state(state)
        assert stopped['epoch'] == epoch and 0 < stopped['iteration'] < 12  # at an iteration boundary, mid-epoch
        flags = ('--resume', str(state))
    assert run_cli(config, '--dst_ckpt', 'stopped/student.pt', *flags) == 0
    straight, resumed = (read_training_state(p) for p in (last_checkpoint_path('straight/student.pt'), state))
    assert_same(straight['box'], resumed['box'])
    assert_same(straight['ranks'], resumed['ranks'])
    assert straight['history'] == resumed['history']


def test_a_state_resumed_under_another_runs_dst_ckpt_is_refused_and_both_runs_kept(finished: Path, work: Path,
                                                                                   capsys) -> None:
    """A run made with --dst_ckpt mine/mine.pt, resumed with --resume mine/mine.last.pt but without --dst_ckpt: the
    config's own dst_ckpt (another run's files) would have been written over; it is refused, nothing moves."""
    theirs = work / 'resource' / 'ckpt' / 'digits'
    assert run_cli(finished) == 0  # the config's own run, at its own dst_ckpt
    assert run_cli(finished, '--dst_ckpt', 'mine/mine.pt') == 0
    longer = write_config(finished, work / 'longer.yaml', {'num_epochs: 1': 'num_epochs: 2'})
    before = snapshot(theirs), snapshot(work / 'mine')
    capsys.readouterr()
    assert run_cli(longer, '--resume', 'mine/mine.last.pt') == 2
    err = capsys.readouterr().err
    assert err == ("error: --resume: 'mine/mine.last.pt' is not the training state of this run "
                   "(models.student_model.dst_ckpt 'resource/ckpt/digits/lrwa_mb.pt' keeps it in "
                   "'resource/ckpt/digits/lrwa_mb.last.pt'); resume with --dst_ckpt 'mine/mine.pt', so that the "
                   "resumed run writes its own files\n"), err
    assert (snapshot(theirs), snapshot(work / 'mine')) == before
    assert run_cli(longer, '--resume', 'mine/mine.last.pt', '--dst_ckpt', 'mine/mine.pt') == 0
    assert read_training_state(work / 'mine' / 'mine.last.pt')['epoch'] == 2
    assert snapshot(theirs) == before[0]


def test_resuming_a_state_with_nothing_left_to_train_is_refused(finished: Path, work: Path, capsys) -> None:
    """A finished 2-epoch state resumed with num_epochs 1 (or 2): no training to do, so no silent exit 0."""
    two = write_config(finished, work / 'two.yaml', {'num_epochs: 1': 'num_epochs: 2'})
    assert run_cli(two, '--dst_ckpt', 'out/student.pt', '--resume', 'out/student.last.pt') == 0  # extended to 2
    for config in (finished, two):
        before = snapshot(work / 'out')
        capsys.readouterr()
        assert run_cli(config, '--dst_ckpt', 'out/student.pt', '--resume', 'out/student.last.pt') == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --resume: the training state 'out/student.last.pt' is at the end of epoch 1, "
                              'and train.num_epochs is ') and 'nothing is left to train' in err \
            and err.count('\n') == 1, err
        assert snapshot(work / 'out') == before


def test_a_state_pins_its_teacher_and_thread_count(finished: Path, work: Path, capsys) -> None:
    """Resuming with another teacher (same config, other weights) or another CPU thread count is refused in one
    line: either changes what the run computes."""
    state = read_training_state(work / 'out' / 'student.last.pt')
    assert len(state['teacher_digest']) == 64 and state['threads'] == torch.get_num_threads()
    longer = write_config(finished, work / 'longer.yaml', {'num_epochs: 1': 'num_epochs: 2'})
    teacher = work / 'resource' / 'ckpt' / 'digits' / 'teacher.pt'
    weights = torch.load(teacher, weights_only=True)
    original = teacher.read_bytes()
    key = next(k for k, v in weights['model'].items() if v.is_floating_point())
    weights['model'][key] = weights['model'][key] + 1.0
    torch.save(weights, teacher)
    before = snapshot(work / 'out')
    capsys.readouterr()
    assert run_cli(longer, '--dst_ckpt', 'out/student.pt', '--resume', 'out/student.last.pt') == 2
    assert "was written by a different run (teacher's weights: " in capsys.readouterr().err
    teacher.write_bytes(original)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert run_cli(longer, '--dst_ckpt', 'out/student.pt', '--resume', 'out/student.last.pt') == 2
    finally:
        torch.set_num_threads(threads)
    assert f'(CPU threads: {threads} -> {threads + 1})' in capsys.readouterr().err
    assert snapshot(work / 'out') == before
    assert run_cli(longer, '--dst_ckpt', 'out/student.pt', '--resume', 'out/student.last.pt') == 0


def test_two_signals_during_training_leave_a_resumable_state_and_say_so(work: Path) -> None:
    """Two Ctrl-C 50 ms apart during epoch 0: the run stops at once (or at the boundary the first reached), says which
    training state it leaves, and that state continues to exactly the run that was never stopped."""
    # the shipped batch and student steps: an iteration takes longer than 50 ms, so the second signal comes mid-step
    config = write_config(DIGITS_CONFIGS / 'lrwa_mb.yaml', work / 'run.yaml', {
        'num_epochs: 12': 'num_epochs: 1', 'iterations_per_epoch: 25': 'iterations_per_epoch: 12'})
    assert run_cli(config, '--dst_ckpt', 'straight/student.pt') == 0
    state = last_checkpoint_path('stopped/student.pt')
    process = subprocess.Popen(command(config, 'stopped/student.pt', '--save_every', '3'), env=child_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not state.is_file() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    lines = [line for line in err.splitlines() if not line[:4].isdigit()]  # not the log lines
    assert process.returncode == 130 and len(lines) == 1, err[-2000:]
    assert 'outside training' not in lines[0] and f"'{state}'" in lines[0], lines
    assert lines[0].startswith(('stopped: stopped at once by a second SIGINT while training; the last training '
                                'state written is', 'stopped: stopped by SIGINT before epoch 0, iteration ')), lines
    assert read_training_state(state)['epoch'] == 0
    assert run_cli(config, '--dst_ckpt', 'stopped/student.pt', '--resume', str(state)) == 0
    straight, resumed = (read_training_state(p) for p in (last_checkpoint_path('straight/student.pt'), state))
    assert_same(straight['box'], resumed['box'])
    assert straight['history'] == resumed['history']


def test_a_second_signal_waits_for_the_state_being_written_and_no_state_is_said_truthfully() -> None:
    from lrwa_plugin.run.cli import stopped_message
    from lrwa_plugin.run.stopping import RunStopped, StoppedAtOnce, StopRequest
    request = StopRequest()
    request.handle(signal.SIGINT, None)
    with pytest.raises(StoppedAtOnce):
        with request.writing():
            request.handle(signal.SIGINT, None)  # deferred: the write completes first
            written = True
    assert written
    with pytest.raises(StoppedAtOnce):
        request.handle(signal.SIGTERM, None)  # outside a write: at once
    message = stopped_message(RunStopped(signal.SIGINT, '', None, at_once=True), ['--config', 'x.yaml'])
    assert message == ('stopped: stopped at once by a second SIGINT while training, before its first training state '
                       'was written (they are written at every epoch end, and with --save_every): there is nothing to '
                       'resume; start the run again')
