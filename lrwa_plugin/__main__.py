"""``python -m lrwa_plugin [--config X.yaml ...]``: the runner of :mod:`lrwa_plugin.cli` (no ``--config``: the demo)."""
import sys

from .cli import main

if __name__ == '__main__':
    sys.exit(main())
