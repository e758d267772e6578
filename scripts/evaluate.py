#!/usr/bin/env python
"""Evaluate a Group-VQ tokenizer (rFID, LPIPS, PSNR, SSIM, codebook usage); see `groupvq_hf.evaluation`.

    accelerate launch scripts/evaluate.py --model PATH_OR_REPO --dataset imagenet --split validation \\
        --resolution 128 --output results.json

`--protocol simvq` reproduces SimVQ's evaluation.py, `--protocol adm --npz_dir DIR` writes the ADM evaluator's
inputs; `--save_images DIR` writes the PNG pairs (see the README's table of protocols).
"""

import os
import sys

# This file is named like the `evaluate` library: keep its folder off the import path so `import evaluate`
# finds the library, not this script.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]

from groupvq_hf.evaluation import evaluate_main as main  # noqa: E402

if __name__ == "__main__":
    main()
