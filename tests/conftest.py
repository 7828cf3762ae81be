"""Shared fixtures: one thread (tiny models run far faster so on a loaded 2-core machine), shipped configs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DIGITS_CONFIGS = ROOT / 'examples' / 'configs' / 'digits'


@pytest.fixture(scope='session', autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_config(src: Path, dst: Path, replacements: dict[str, str]) -> Path:
    """Copies a shipped YAML with textual edits, each of which must apply (so a stale edit fails loudly)."""
    text = src.read_text()
    for old, new in replacements.items():
        assert old in text, f'{old!r} not in {src.name}'
        text = text.replace(old, new)
    dst.write_text(text)
    return dst
