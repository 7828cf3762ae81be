"""Runs a torchdistill config, data-free with ``train.strategy``; with no ``--config``, the offline digits demo.

    python examples/run_torchdistill.py                                  # the digits demo (LRWA)
    python examples/run_torchdistill.py --config examples/configs/digits/lrwa_mb.yaml --device cpu

(``python -m lrwa_plugin`` is the same runner, from an installed package.)
"""
import sys

from lrwa_plugin.run.cli import main

if __name__ == '__main__':
    sys.exit(main())
