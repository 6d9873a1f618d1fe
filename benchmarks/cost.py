"""Cost of the importance step, memory-light (layerwise) path against the plain full backward, on one model and
one set of calibration windows: writes benchmarks/results/cost.json and cost.md.

    OMP_NUM_THREADS=1 python benchmarks/cost.py [--calib-samples 64] [--scale 4] [--repeats 1] [--model ...]
"""

import sys

from harness.cost import main

if __name__ == "__main__":
    sys.exit(main())
