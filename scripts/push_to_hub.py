#!/usr/bin/env python
"""Publish a trained Group-VQ tokenizer on the Hugging Face Hub with its code and model card.

    python scripts/push_to_hub.py --model outputs/model --repo_id you/groupvq-imagenet \
        --eval_results results.json [--resize_study resize_study.json] [--private] \
        [--codebook_size 131072 --resize_mode extend] [--diffusers] [--include_discriminator] [--timeout 60]

Uses HF_TOKEN or the saved login (`hf auth login`) and HF_ENDPOINT. Every failure (no or read-only token, an endpoint
that refuses, drops or never answers a request within --timeout seconds, an HTTP error) ends in one line on stderr
naming it, with exit code 1; a failed upload changes nothing on the Hub, so running the command again completes it.
The logic lives in `groupvq_hf.hub.publishing`.
"""

import os
import sys

# scripts/ holds evaluate.py, named like the `evaluate` library: keep this folder off the import path.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]

from groupvq_hf.hub import publish_main as main  # noqa: E402

if __name__ == "__main__":
    main()
