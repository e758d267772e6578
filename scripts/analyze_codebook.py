#!/usr/bin/env python
"""Figures and numbers of the paper's section 4.2 / appendix D for a Group-VQ model. Usage and outputs: `--help`
(`groupvq_hf.evaluation.analysis_parser`); the same command is installed as `groupvq-analyze-codebook`."""

import os
import sys

# scripts/ holds evaluate.py, named like the `evaluate` library: keep this folder off the import path.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]

from groupvq_hf.evaluation import analyze_main as main  # noqa: E402

if __name__ == "__main__":
    main()
