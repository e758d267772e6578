#!/usr/bin/env python
"""Train a Group-VQ tokenizer; the defaults are SimVQ's recipe, which the paper follows (section 4.1).

    accelerate launch scripts/train.py --output_dir outputs/demo --perceptual_weight 0 ...

All logic lives in ``groupvq_hf.training`` (see ``--help``).
"""

import os
import sys

# scripts/ holds evaluate.py, named like the `evaluate` library: keep this folder off the import path.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]


from groupvq_hf.training import main

if __name__ == "__main__":
    main()
