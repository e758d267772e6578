#!/usr/bin/env python
"""The paper's codebook resize study (Table 2 / Figure 4) of a trained model; see `groupvq_hf.evaluation`.

    accelerate launch scripts/resize_study.py --model PATH_OR_REPO --dataset imagenet --split validation \\
        --min_power -1 --max_power 4 --output_dir resize_study
"""

import os
import sys

# scripts/evaluate.py is named like the `evaluate` library: keep this folder off the import path.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]

from groupvq_hf.evaluation import resize_study_main as main  # noqa: E402

if __name__ == "__main__":
    main()
