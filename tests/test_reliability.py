"""Mistakes a user makes with flags and paths, refused before anything is built; two runs on one checkpoint."""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import DIGITS_CONFIGS, SHORT_RUN, child_env, run_cli, run_flags, write_config

from lrwa_plugin.run.cli import main
from lrwa_plugin.run.files import RunLock


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


@pytest.fixture
def config(work: Path) -> Path:
    return write_config(DIGITS_CONFIGS / 'lrwa_mb.yaml', work / 'run.yaml', SHORT_RUN)


def _refused(argv: list[str], work: Path, capsys) -> str:
    before = files(work)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1, err
    assert files(work) == before
    return err


@pytest.mark.parametrize('flags, key, text', [
    (['--device', 'gpu'], '--device', "'gpu' is not a device"),
    (['--device', 'cuda'], '--device', 'no CUDA device'),
    (['--seed', '-1'], '--seed', 'from 0 to 2**32 - 1'),
    (['--start_epoch', '2'], '--start_epoch', 'from 0 to train.num_epochs - 1 = 1, got 2'),
    (['--start_epoch', '-1'], '--start_epoch', 'got -1'),
    (['--world_size', '0'], '--world_size', '>= 1, got 0'),
    (['--log_dir', 'run.yaml'], '--log_dir', 'is a file; expected a folder'),
    (['--run_log', 'resource'], '--run_log', 'is a folder'),
    (['--dst_ckpt', 'run.yaml/student.pt'], '--dst_ckpt', 'is a file, not a folder'),
    (['-test_only', '--dst_ckpt', 'nothing/student.pt'], '--dst_ckpt', '-test_only: no trained student at'),
])
def test_flag_mistakes_are_one_line_naming_the_flag(config, work, capsys, flags, key, text):
    err = _refused(['--config', str(config), '-no_progress', *(['--device', 'cpu'] if '--device' not in flags
                                                                else []), *flags], work, capsys)
    assert err.startswith(f'error: {key}: ') and text in err, err


def test_an_output_folder_nobody_may_write_is_refused_before_training(config, work, capsys):
    try:
        with tempfile.TemporaryFile(dir='/sys'):
            pytest.skip('/sys is writable on this machine: no folder here refuses writes to test with')
    except OSError:
        pass
    err = _refused(['--config', str(config), '--device', 'cpu', '--dst_ckpt', '/sys/lrwa_plugin_test/student.pt'],
                   work, capsys)
    assert "error: --dst_ckpt: the file '/sys/lrwa_plugin_test/student.pt' cannot be written: the folder '/sys' is " \
           'not writable' in err


def test_a_training_loader_in_a_data_free_config_is_named_in_one_warning(work, caplog):
    loader = ("  val_data_loader:\n    dataset_id: 'digits/test'")
    config = write_config(DIGITS_CONFIGS / 'lrwa_mb.yaml', work / 'run.yaml', {
        **SHORT_RUN, 'num_epochs: 2': 'num_epochs: 1',
        loader: "  train_data_loader:\n    dataset_id: 'digits/test'\n    kwargs: {batch_size: 16}\n" + loader})
    with caplog.at_level('WARNING', logger='torchdistill'):
        assert run_cli(config) == 0
    warnings = [r.getMessage() for r in caplog.records if 'train_data_loader' in r.getMessage()]
    assert len(warnings) == 1 and 'is not used: a data-free run' in warnings[0], warnings


def _command(config: Path, dst: str) -> list[str]:
    return [sys.executable, '-m', 'lrwa_plugin', '--config', str(config), *run_flags(), '--dst_ckpt', dst]


def test_a_second_run_on_the_same_checkpoint_is_refused_while_the_first_lives(work, capsys):
    long_run = write_config(DIGITS_CONFIGS / 'lrwa_mb.yaml', work / 'long.yaml', {
        **SHORT_RUN, 'iterations_per_epoch: 3': 'iterations_per_epoch: 200'})
    lock = Path('out/student.pt.lock')
    env = child_env()
    first = subprocess.Popen(_command(long_run, 'out/student.pt'), env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not lock.is_file() and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.01)
        assert lock.is_file() and first.poll() is None
        assert lock.read_text().strip() == str(first.pid)
        before = {p: b for p, b in files(work).items() if not p.startswith('out/')}
        assert run_cli(long_run, '--dst_ckpt', 'out/student.pt') == 2
        err = capsys.readouterr().err
        assert err.startswith(f'error: --dst_ckpt: another run (pid {first.pid}) is writing to') and \
            err.count('\n') == 1, err
        assert {p: b for p, b in files(work).items() if not p.startswith('out/')} == before
        first.kill()  # SIGKILL: no exit handler runs, the lock file stays behind ...
        first.wait(timeout=60)
    finally:
        first.kill()
    assert lock.is_file()
    short = write_config(DIGITS_CONFIGS / 'lrwa_mb.yaml', work / 'short.yaml', {**SHORT_RUN, 'num_epochs: 2':
                                                                                'num_epochs: 1'})
    assert run_cli(short, '--dst_ckpt', 'out/student.pt') == 0  # ... but the dead process holds no lock
    assert not lock.exists()  # released (and removed) when the run ends
    assert run_cli(short, '--dst_ckpt', 'out/student.pt') == 0  # and taken again by the next


def test_the_lock_is_exclusive_within_a_process_too(tmp_path):
    with RunLock(tmp_path / 'student.pt', 'models.student_model.dst_ckpt'):
        with pytest.raises(ValueError, match=r'^models.student_model.dst_ckpt: another run \(pid \d+\)'):
            RunLock(tmp_path / 'student.pt', 'models.student_model.dst_ckpt').acquire()
    with RunLock(tmp_path / 'student.pt', 'models.student_model.dst_ckpt'):
        pass


@pytest.mark.parametrize('fault', [
    OSError(28, 'No space left on device'),
    RuntimeError('[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0'),
    PermissionError(13, 'Permission denied'),
])
def test_a_file_that_cannot_be_written_is_one_line_exit_4_and_earlier_files_intact(fault, work, capsys, monkeypatch):
    """A full disk (the OS's errno 28, or torch's zip writer failing) or a destination that cannot be replaced, at
    the second epoch's first write: one line naming the file, exit status 4, the first epoch's files as they were."""
    from lrwa_plugin.run import checkpoint
    from lrwa_plugin.run.resume import read_training_state
    config = write_config(DIGITS_CONFIGS / 'lrwa_mb.yaml', work / 'run.yaml', SHORT_RUN)
    real_save, written = checkpoint.torch.save, []

    def failing_save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get('epoch') == 2:  # the second epoch's training state
            raise fault
        written.append(getattr(f, 'name', f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, 'save', failing_save)
    assert run_cli(config, '--dst_ckpt', 'out/student.pt') == 4
    err = capsys.readouterr().err
    assert err.startswith("error: could not write 'out/student.last.pt' (") and err.count('\n') == 1, err
    assert err.endswith('); it and every file written before are as they were\n') and type(fault).__name__ in err
    assert read_training_state(work / 'out' / 'student.last.pt')['epoch'] == 1  # the first epoch's state, intact
    assert (work / 'out' / 'student.pt').is_file() and written
    assert not [p.name for p in (work / 'out').iterdir() if p.name.endswith('.tmp')]
