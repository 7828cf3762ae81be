"""Runs a torchdistill config, data-free with ``train.strategy``; with no ``--config``, the offline digits demo.

    python examples/run_torchdistill.py                                  # the digits demo (LRWA)
    python examples/run_torchdistill.py --config examples/configs/digits/lrwa_mb.yaml --device cpu
"""
import sys
from pathlib import Path

from lrwa_plugin.cli import main

if __name__ == '__main__':
    sys.exit(main(demo_config_dir=Path(__file__).resolve().parent / 'configs' / 'digits'))
