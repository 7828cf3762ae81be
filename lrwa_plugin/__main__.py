"""``python -m lrwa_plugin [--config X.yaml ...]``: the runner of :mod:`lrwa_plugin.run.cli` (no ``--config``: demo)."""
import sys

from .run.cli import main

if __name__ == '__main__':
    sys.exit(main())
