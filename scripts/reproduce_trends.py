#!/usr/bin/env python
"""The paper's trends at CPU scale on the demo photos: usage over training for k = 1, 8, 32, n, final metrics on
held-out crops, the resize curve of the k = 8 model, and the old initialisation as a "before" column.

    python scripts/reproduce_trends.py --output_dir outputs/trends      # about 12 minutes on 2 CPU cores

The driver is an experiment and lives beside its results: `benchmarks/trends/reproduce_trends.py` (see it for what
each run does); results land in OUTPUT_DIR/RESULTS.md, results.json and PNG plots.
"""

import os
import runpy
import sys

# scripts/ holds evaluate.py, named like the `evaluate` library: keep this folder off the import path.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]

if __name__ == "__main__":
    runpy.run_path(os.path.join(_HERE, os.pardir, "benchmarks", "trends", "reproduce_trends.py"), run_name="__main__")
