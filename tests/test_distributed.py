"""Data parallelism on the CPU (gloo): ranks stay bit-identical, draw their own z, keep their own memories."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import DIGITS_CONFIGS, ROOT, assert_same, child_env, run_cli, run_flags, write_config

from lrwa_plugin.run.distributed import World, _buckets
from lrwa_plugin.run.resume import read_training_state

TINY = {'num_epochs: 12': 'num_epochs: 1', 'iterations_per_epoch: 25': 'iterations_per_epoch: 3',
        'student_steps: 5': 'student_steps: 2', 'batch_size: 128': 'batch_size: 32'}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, ports: list[int], two_epochs: str, one_epoch: str, work: str) -> None:
    """One rank, started as torchrun would start it, running three runs in turn (each its own process group):

    ``a/``: two epochs straight, keeping the student and generator at the start and at the end (``rank{r}.pt``);
    ``b/``: one epoch, then resumed from its training state to two epochs.
    """
    os.chdir(work)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR='127.0.0.1')
    torch.set_num_threads(1)
    from lrwa_plugin.run import cli, runner
    real_train = runner.train

    def keeping_weights(run):
        box = run.trainer.box
        start = {'student': {k: v.clone() for k, v in run.student.state_dict().items()},
                 'generator': {k: v.clone() for k, v in box.generator.state_dict().items()}}
        result = real_train(run)
        torch.save({'start': start, 'student': run.student.state_dict(), 'generator': box.generator.state_dict()},
                   f'rank{rank}.pt')
        return result

    runs = [(two_epochs, 'a', [], keeping_weights), (one_epoch, 'b', [], real_train),
            (two_epochs, 'b', ['--resume', 'b/student.last.pt'], real_train)]
    for port, (config, out, flags, train) in zip(ports, runs):
        os.environ['MASTER_PORT'] = str(port)
        runner.train = train
        status = cli.main(['--config', config, *run_flags(), '--world_size',
                           str(world_size), '--dst_ckpt', f'{out}/student.pt', *flags])
        if status != 0:
            raise SystemExit(status)


def test_two_gloo_ranks_stay_bit_identical_and_resume_exactly(work: Path) -> None:
    two = write_config(DIGITS_CONFIGS / 'lrwa_mb.yaml', work / 'two.yaml', {**TINY, 'num_epochs: 12': 'num_epochs: 2'})
    one = write_config(two, work / 'one.yaml', {'num_epochs: 2': 'num_epochs: 1'})
    mp.spawn(_rank_main, args=(2, [free_port() for _ in range(3)], str(two), str(one), str(work)), nprocs=2,
             join=True)
    ranks = [torch.load(work / f'rank{r}.pt', weights_only=True) for r in (0, 1)]
    for model in ('student', 'generator'):
        for name, value in ranks[0][model].items():
            assert torch.equal(value, ranks[1][model][name]), f'{model}.{name} differs across ranks'
        moved = [n for n, v in ranks[0][model].items() if v.is_floating_point()
                 and not torch.equal(v, ranks[0]['start'][model][n])]
        assert moved, f'the {model} did not train'
    # Each rank drew its own z and keeps its own memory: the pushed batches differ.
    straight = read_training_state(work / 'a' / 'student.last.pt')
    assert straight['world_size'] == 2 and len(straight['ranks']) == 2
    memories = [rank['replay']['batches'][0] for rank in straight['ranks']]
    assert memories[0].shape == memories[1].shape and not torch.equal(*memories)
    # Stopped after one epoch and resumed: both ranks' memories and random streams, and the weights, are exact.
    resumed = read_training_state(work / 'b' / 'student.last.pt')
    assert_same(straight['box'], resumed['box'])
    assert_same(straight['ranks'], resumed['ranks'])
    assert straight['history'] == resumed['history']


def _poisoned_rank_main(rank: int, world_size: int, port: int, config: str, work: str) -> None:
    """One rank of a 2-rank run in which rank 1's first generated batch is NaN; writes its status and stderr."""
    import contextlib
    import io
    os.chdir(work)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from lrwa_plugin.generator import AdversarialGenerator
    from lrwa_plugin.run import cli
    if rank == 1:
        real_sample = AdversarialGenerator.sample

        def poisoned(self, n):
            return real_sample(self, n) * float('nan')
        AdversarialGenerator.sample = poisoned
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = cli.main(['--config', config, *run_flags(), '--world_size',
                           str(world_size), '--dst_ckpt', 'out/student.pt'])
    errors = [line for line in stderr.getvalue().splitlines() if line.startswith('error: ')]
    Path(f'status{rank}.txt').write_text(f'{status}\n' + '\n'.join(errors))


def test_a_non_finite_loss_on_one_rank_stops_every_rank(work: Path) -> None:
    config = write_config(DIGITS_CONFIGS / 'lrwa_mb.yaml', work / 'run.yaml', TINY)
    mp.spawn(_poisoned_rank_main, args=(2, free_port(), str(config), str(work)), nprocs=2, join=True)
    statuses = [(work / f'status{r}.txt').read_text().splitlines() for r in (0, 1)]
    assert [s[0] for s in statuses] == ['3', '3']
    assert statuses[1][1].startswith('error: rank 1: non-finite loss at epoch 0, iteration 0, generator step 0: '
                                     'gen = nan')
    assert statuses[0][1].startswith('error: rank 0: another rank saw a non-finite loss at epoch 0, iteration 0, '
                                     'generator step 0')
    assert not (work / 'out' / 'student.pt').exists()


def test_a_ddp_wrapper_in_the_yaml_is_replaced_with_a_warning(work: Path, caplog) -> None:
    config = write_config(DIGITS_CONFIGS / 'lrwa_mb.yaml', work / 'run.yaml', {
        **TINY, "  student:\n    forward_proc: 'forward_batch_only'":
        "  student:\n    wrapper: 'DistributedDataParallel'\n    forward_proc: 'forward_batch_only'"})
    assert run_cli(config) == 0
    assert "train.student.wrapper 'DistributedDataParallel' is not used" in caplog.text


@pytest.mark.parametrize('name', ['lrwa_gr', 'lrwa_mad'])
def test_torchrun_runs_the_cli_on_two_cpu_ranks(name: str, work: Path) -> None:
    config = write_config(DIGITS_CONFIGS / f'{name}.yaml', work / 'run.yaml', TINY)
    # torchrun of the interpreter running the tests (a `torchrun` on PATH may be another environment's, or none)
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                             '--master_port', str(free_port()),
                             str(ROOT / 'examples' / 'run_torchdistill.py'), '--config', str(config), '--device', 'cpu',
                             '--seed', '0', '-no_progress', '--world_size', '2', '--dst_ckpt', 'out/student.pt'],
                            env=child_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count('Summary [') == 1  # rank 0 speaks
    state = read_training_state(work / 'out' / 'student.last.pt')
    assert state['world_size'] == 2 and (state['epoch'], state['iteration']) == (1, 0)
    if name == 'lrwa_gr':
        vaes = [rank['replay']['vae'] for rank in state['ranks']]
        assert any(not torch.equal(v, vaes[1][k]) for k, v in vaes[0].items())  # per-rank generative replay
    else:  # the momentum generator follows the averaged generator: the same EMA on every rank, its own z stream
        emas = [rank['replay']['ema'] for rank in state['ranks']]
        assert all(torch.equal(v, emas[1][k]) for k, v in emas[0].items())
        assert not torch.equal(*(rank['replay']['rng'] for rank in state['ranks']))
    assert (work / 'out' / 'student.pt').is_file() and (work / 'out' / 'student.evolution.json').is_file()


def test_world_size_without_torchrun_is_one_line(work: Path, capsys) -> None:
    from lrwa_plugin.run.cli import main
    config = write_config(DIGITS_CONFIGS / 'lrwa_mb.yaml', work / 'run.yaml', TINY)
    assert main(['--config', str(config), '--device', 'cpu', '--world_size', '2']) == 2
    assert capsys.readouterr().err.strip() == ('error: --world_size: 2 processes asked for, but RANK/WORLD_SIZE are '
                                               'not set; start the run with torchrun --nproc_per_node 2 ...')


def test_buckets_group_consecutive_tensors_up_to_the_size() -> None:
    tensors = [torch.zeros(10), torch.zeros(10), torch.zeros(30), torch.zeros(5, dtype=torch.float64), torch.zeros(1)]
    buckets = _buckets(tensors, bucket_bytes=100)  # float32: 40, 40, 120 bytes
    assert [[t.numel() for t in b] for b in buckets] == [[10, 10], [30], [5], [1]]
    assert World().distributed is False and World(1, 2).is_main is False
