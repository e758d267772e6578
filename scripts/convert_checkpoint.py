#!/usr/bin/env python
"""Convert Group-VQ checkpoints between transformers and diffusers, import a diffusers VQModel or a SimVQ checkpoint,
or switch a saved pipeline's GroupVQVAE components between library and remote-code form. Examples: `--help`
(`groupvq_hf.hub.cli.convert_parser`); the same command is installed as `groupvq-convert-checkpoint`."""

import os
import sys

# scripts/ holds evaluate.py, named like the `evaluate` library: keep this folder off the import path.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]

from groupvq_hf.hub import convert_main as main  # noqa: E402

if __name__ == "__main__":
    main()
