"""Runs or analyses the drift map of docs/drift_map.md: five arms, paired by seed, at several levels of drift.

    python examples/drift_map.py run        # the grid (finished runs are re-read; stopped ones resume)
    python examples/drift_map.py analyse    # examples/results/drift_map/map.{json,md,png}
"""
import sys

from lrwa_plugin.run.drift_map import main

if __name__ == '__main__':
    sys.exit(main())
