"""The package works installed, not only from this checkout: a wheel in a fresh virtual environment finds its shipped
configs (the demo's among them) and, from a folder holding only a teacher checkpoint, compare runs one of them
through the installed runner (``python -m lrwa_plugin``).

The fresh venv sees the dependencies of the interpreter running the tests (a ``.pth`` file listing its import
folders), never the base interpreter's site-packages: on a new user's machine those hold no torch, and a venv built
with ``system_site_packages`` passed only where someone had installed torch into the base interpreter by hand."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from conftest import ROOT, SHORT_RUN, TEACHER_CKPT, dependency_paths, write_config


@pytest.fixture(scope='module')
def installed(tmp_path_factory) -> Path:
    """The python of a fresh venv holding a non-editable install of this checkout (dependencies from the running
    interpreter's import folders: nothing is downloaded)."""
    base = tmp_path_factory.mktemp('install')
    wheels = base / 'wheels'
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w', str(wheels),
                    str(ROOT)], check=True, cwd=base)
    venv.EnvBuilder(system_site_packages=False, with_pip=False).create(base / 'venv')
    python = base / 'venv' / 'bin' / 'python'
    site_packages = subprocess.run([str(python), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                                   check=True, capture_output=True, text=True).stdout.strip()
    # Plain folder lines: appended after the venv's own site-packages (so the installed copy wins) and, not being
    # site dirs, their own .pth files (an editable install of this checkout among them) are not read.
    (Path(site_packages) / 'test_dependencies.pth').write_text('\n'.join(dependency_paths()) + '\n')
    wheel = next(wheels.glob('lrwa_plugin-*.whl'))
    subprocess.run([sys.executable, '-m', 'pip', '--python', str(python), 'install', '--no-deps', '-q', str(wheel)],
                   check=True, cwd=base)
    return python


def _run(python: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    return subprocess.run([str(python), *args], cwd=cwd, env={**env, 'OMP_NUM_THREADS': '1'}, capture_output=True,
                          text=True, timeout=600)


def test_the_fresh_venv_takes_its_dependencies_from_the_running_interpreter(installed, tmp_path):
    where = _run(installed, tmp_path, '-c', 'import json, sys, torch; '
                 'print(json.dumps([torch.__file__, sys.base_prefix, sys.prefix]))')
    assert where.returncode == 0, where.stderr
    torch_file, base_prefix, prefix = json.loads(where.stdout)
    import torch
    assert Path(torch_file) == Path(torch.__file__)  # the tests' own torch, not the base interpreter's
    assert Path(prefix) == installed.parent.parent and Path(base_prefix) != Path(prefix)


def test_an_installed_package_finds_its_configs_and_runs_them(installed, teacher_dir, tmp_path):
    where = _run(installed, tmp_path, '-c', 'import json, lrwa_plugin; from lrwa_plugin.run.cli import shipped_config; '
                 "print(json.dumps([lrwa_plugin.__file__, str(shipped_config('digits', 'teacher')), "
                 "str(shipped_config('digits', 'lrwa_mb'))]))")
    assert where.returncode == 0, where.stderr
    package, teacher, student = (Path(p) for p in json.loads(where.stdout))
    venv_dir = installed.parent.parent
    assert venv_dir in package.parents and venv_dir in teacher.parents, (package, teacher)  # not this checkout
    assert ROOT not in package.parents
    assert teacher.is_file() and student.is_file()
    (tmp_path / TEACHER_CKPT).parent.mkdir(parents=True)
    shutil.copy(teacher_dir / TEACHER_CKPT, tmp_path / TEACHER_CKPT)
    short = write_config(student, tmp_path / 'short.yaml', {**SHORT_RUN, 'num_epochs: 2': 'num_epochs: 1'})
    compared = _run(installed, tmp_path, '-m', 'lrwa_plugin.run.compare', '--configs', str(short), '--seeds', '0',
                    '--out', 'runs')
    assert compared.returncode == 0, compared.stderr[-2000:]
    assert json.loads((tmp_path / 'runs/summary.json').read_text())['configs']['short']['runs'] == 1
    assert 'Summary' in (tmp_path / 'runs/short/seed0/stdout.txt').read_text()
