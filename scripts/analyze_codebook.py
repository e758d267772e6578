#!/usr/bin/env python
"""Figures and numbers of the paper's section 4.2 / appendix D for a Group-VQ model.

    python scripts/analyze_codebook.py --model PATH_OR_REPO --output_dir DIR \
        [--dataset demo --split train --max_samples 256] [--trained_codebook_size 1024]

Writes norm_statistics.png (Fig. 5 left), group_frequency.png (Fig. 5 right, with --dataset),
cosine_similarity.png (Fig. 6), random_projection.png (Fig. 7), pca_projection.png (Fig. 9) and
codebook_analysis.json. All logic lives in `groupvq_hf.evaluation`.
"""

import os
import sys

# scripts/ holds evaluate.py, named like the `evaluate` library: keep this folder off the import path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from groupvq_hf.evaluation import analyze_main as main  # noqa: E402

if __name__ == "__main__":
    main()
