#!/usr/bin/env python
"""Convert Group-VQ checkpoints between transformers and diffusers, import a diffusers VQModel, or switch a saved
pipeline's GroupVQVAE components between library and remote-code form. Logic: `groupvq_hf.conversion`.

    # transformers GroupVQModel <-> diffusers GroupVQVAE (lossless; direction read from config.json)
    python scripts/convert_checkpoint.py groupvq-tiny groupvq-tiny-diffusers
    python scripts/convert_checkpoint.py groupvq-tiny-diffusers groupvq-tiny-transformers
    # a pipeline's VQModel -> GroupVQVAE (encoder/decoder kept, new Group-VQ quantizer) for fine-tuning
    python scripts/convert_checkpoint.py amused-256 vqvae-groupvq --subfolder vqvae --num_groups 8 --seed 0
    # a saved pipeline whose GroupVQVAE loads with trust_remote_code=True and no groupvq_hf
    python scripts/convert_checkpoint.py my-pipeline my-pipeline-remote --pipeline_components remote_code
"""

from __future__ import annotations

import argparse
import json

from groupvq_hf.conversion import convert_checkpoint, copy_pipeline


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="saved model (or pipeline) folder")
    parser.add_argument("dst", help="output folder")
    parser.add_argument("--to", choices=["groupvq_vae", "groupvq_model"], default=None,
                        help="target format (default: the other one; a VQModel always becomes a groupvq_vae)")
    parser.add_argument("--subfolder", default=None, help="model subfolder inside a pipeline folder, e.g. vqvae")
    parser.add_argument("--pipeline_components", choices=["remote_code", "library"], default=None,
                        help="copy the pipeline folder SRC to DST with its GroupVQVAE components in this form")
    group = parser.add_argument_group("new Group-VQ quantizer (importing a plain VQModel)")
    group.add_argument("--num_vq_embeddings", type=int, default=None, help="codebook size (default: the VQModel's)")
    group.add_argument("--num_groups", type=int, default=None)
    group.add_argument("--codebook_rank", type=int, default=None)
    group.add_argument("--group_sizes", type=int, nargs="+", default=None)
    group.add_argument("--group_ranks", type=int, nargs="+", default=None)
    group.add_argument("--projector", choices=["linear", "mlp", "linear+mlp"], default=None)
    group.add_argument("--commitment_beta", type=float, default=None)
    group.add_argument("--seed", type=int, default=None, help="seed of the new cores and projectors")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.pipeline_components:
        changed = copy_pipeline(args.src, args.dst, remote_code=args.pipeline_components == "remote_code")
        print(json.dumps({"pipeline": args.dst, "components": changed, "form": args.pipeline_components}))
        return
    vq_kwargs = {
        key: getattr(args, key)
        for key in ("num_vq_embeddings", "num_groups", "codebook_rank", "group_sizes", "group_ranks", "projector",
                    "commitment_beta")
        if getattr(args, key) is not None
    }
    kind = convert_checkpoint(args.src, args.dst, to=args.to, subfolder=args.subfolder, seed=args.seed, **vq_kwargs)
    print(json.dumps({"saved": args.dst, "kind": kind}))


if __name__ == "__main__":
    main()
