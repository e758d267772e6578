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

from __future__ import annotations

import os
import sys

# scripts/ holds evaluate.py, named like the `evaluate` library: keep this folder off the import path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse
import math


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Folder saved by GroupVQModel/GroupVQVAE.save_pretrained.")
    parser.add_argument("--repo_id", required=True, help="Hub repository, 'namespace/name'.")
    parser.add_argument("--private", action="store_true", help="Create the repository as private.")
    parser.add_argument("--eval_results", default=None, help="JSON written by scripts/evaluate.py (model-index).")
    parser.add_argument("--resize_study", default=None, help="Resize study table (.json rows or .md) for the card.")
    parser.add_argument("--training_args", default=None, help="JSON of training settings to list in the card.")
    parser.add_argument("--datasets", nargs="*", default=None, help="Training datasets (Hub ids, or imagenet/coco).")
    parser.add_argument("--codebook_size", type=int, default=None, help="Resize the codebook before publishing.")
    parser.add_argument("--resize_mode", choices=("extend", "resample"), default="extend")
    parser.add_argument("--resize_seed", type=int, default=0, help="Seed of the newly sampled codes.")
    parser.add_argument("--diffusers", action="store_true", help="Publish the diffusers GroupVQVAE format.")
    parser.add_argument("--include_discriminator", action="store_true",
                        help="Also upload the training run's discriminator.safetensors from --model (named in the "
                             "card), so `scripts/train.py --init_from REPO` continues the GAN.")
    parser.add_argument("--commit_message", default="Upload Group-VQ tokenizer")
    parser.add_argument("--timeout", type=float, default=None,
                        help="Seconds each Hub request may wait to connect, send or receive "
                             "(default: groupvq_hf.hub.DEFAULT_TIMEOUT, 60).")
    args = parser.parse_args(argv)
    if args.resize_mode != "extend" and args.codebook_size is None:
        parser.error("--resize_mode needs --codebook_size")
    if args.timeout is not None and (not math.isfinite(args.timeout) or args.timeout <= 0):
        parser.error(f"--timeout must be a positive number of seconds, got {args.timeout}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    from groupvq_hf.hub import DEFAULT_TIMEOUT, HubAccessError, HubConnectionError, publish, read_json

    try:
        training = read_json(args.training_args, "training_args")
        commit = publish(
            args.model,
            args.repo_id,
            private=args.private or None,
            eval_results=args.eval_results,
            resize_study=args.resize_study,
            training=training,
            datasets=args.datasets,
            codebook_size=args.codebook_size,
            resize_mode=args.resize_mode,
            resize_seed=args.resize_seed,
            diffusers=args.diffusers,
            commit_message=args.commit_message,
            timeout=DEFAULT_TIMEOUT if args.timeout is None else args.timeout,
            include_discriminator=args.include_discriminator,
        )
    except (LocalTokenNotFoundError, HubAccessError, HubConnectionError, ValueError) as err:
        sys.exit(f"push_to_hub: error: {err}")
    except HfHubHTTPError as err:  # a server error (5xx, ...) after its retries: one line, no traceback
        sys.exit(f"push_to_hub: error: the Hub at {constants.ENDPOINT} answered: {' '.join(str(err).split())}")
    print(f"Published {args.repo_id}: {commit.commit_url}")


if __name__ == "__main__":
    main()
