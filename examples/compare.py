"""Compares data-free configs over seeds: mu, sigma2, Acc_max, final and the late-run figures, plus a plot.

    python examples/compare.py --configs examples/configs/digits/dfad.yaml examples/configs/digits/lrwa_mb.yaml \\
        --seeds 0 1 2 --out runs/digits
"""
import sys

from lrwa_plugin.run.compare import main

if __name__ == '__main__':
    sys.exit(main())
