#!/usr/bin/env python
"""Tokenize a dataset into a `datasets` dataset of Group-VQ token grids (parquet shards + dataset card).

    accelerate launch scripts/tokenize_dataset.py --model PATH_OR_REPO --dataset imagenet --split train \\
        --resolution 128 --output_dir tokens/imagenet-128 --augment ten_crop [--codebook_size 131072]

All logic lives in ``groupvq_hf.tokens`` (see ``--help``).
"""

import os
import sys

# scripts/ holds evaluate.py, named like the `evaluate` library: keep this folder off the import path.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]


from groupvq_hf.tokens import main

if __name__ == "__main__":
    main()
