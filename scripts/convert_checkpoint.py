#!/usr/bin/env python
"""Convert Group-VQ checkpoints between transformers and diffusers, import a diffusers VQModel, or switch a saved
pipeline's GroupVQVAE components between library and remote-code form. Logic: `groupvq_hf.hub.conversion`.

    # transformers GroupVQModel <-> diffusers GroupVQVAE (lossless; direction read from config.json)
    python scripts/convert_checkpoint.py groupvq-tiny groupvq-tiny-diffusers
    python scripts/convert_checkpoint.py groupvq-tiny-diffusers groupvq-tiny-transformers
    # a pipeline's VQModel -> GroupVQVAE (encoder/decoder kept, new Group-VQ quantizer) for fine-tuning
    python scripts/convert_checkpoint.py amused-256 vqvae-groupvq --subfolder vqvae --num_groups 8 --seed 0
    # a saved pipeline whose GroupVQVAE loads with trust_remote_code=True and no groupvq_hf
    python scripts/convert_checkpoint.py my-pipeline my-pipeline-remote --pipeline_components remote_code
    # a SimVQ Lightning checkpoint (youngsheen/SimVQ) -> a k = 1 GroupVQModel with the "simvq" backbone
    # (EMA weights by default when the checkpoint has them; --no_ema for the raw ones). Logic: groupvq_hf.hub.simvq_conversion
    python scripts/convert_checkpoint.py --from_simvq simvq.ckpt --config imagenet_simvq_128_B.yaml simvq-groupvq
    # ... keeping SimVQ's discriminator (discriminator.safetensors) for `scripts/train.py --init_from simvq-groupvq`
    python scripts/convert_checkpoint.py --from_simvq simvq.ckpt --config imagenet_simvq_128_B.yaml simvq-groupvq \\
        --keep_discriminator
"""

from __future__ import annotations

import os
import sys

# scripts/ holds evaluate.py, named like the `evaluate` library: keep this folder off the import path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse
import json

from groupvq_hf.hub import convert_checkpoint, copy_pipeline
from groupvq_hf.hub import convert_simvq


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", nargs="?", help="saved model (or pipeline) folder; with --from_simvq: the output folder")
    parser.add_argument("dst", nargs="?", help="output folder")
    parser.add_argument("--to", choices=["groupvq_vae", "groupvq_model"], default=None,
                        help="target format (default: the other one; a VQModel always becomes a groupvq_vae)")
    parser.add_argument("--subfolder", default=None, help="model subfolder inside a pipeline folder, e.g. vqvae")
    parser.add_argument("--pipeline_components", choices=["remote_code", "library"], default=None,
                        help="copy the pipeline folder SRC to DST with its GroupVQVAE components in this form")
    simvq = parser.add_argument_group("SimVQ Lightning checkpoint (--from_simvq CKPT --config YAML OUTPUT_DIR)")
    simvq.add_argument("--from_simvq", metavar="CKPT", default=None, help="SimVQ .ckpt (read with weights_only=True)")
    simvq.add_argument("--config", metavar="YAML", default=None, help="the SimVQ YAML config the checkpoint was trained with")
    ema = simvq.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_true", default=None,
                     help="use the EMA weights (model_ema.*); the default when the checkpoint has them")
    ema.add_argument("--no_ema", dest="ema", action="store_false", help="use the raw (non-EMA) weights")
    simvq.add_argument("--keep_discriminator", action="store_true",
                       help="also keep SimVQ's discriminator (loss.discriminator.*) as discriminator.safetensors, "
                            "which scripts/train.py --init_from loads")
    group = parser.add_argument_group("new Group-VQ quantizer (importing a plain VQModel)")
    group.add_argument("--num_vq_embeddings", type=int, default=None, help="codebook size (default: the VQModel's)")
    group.add_argument("--num_groups", type=int, default=None)
    group.add_argument("--codebook_rank", type=int, default=None)
    group.add_argument("--group_sizes", type=int, nargs="+", default=None)
    group.add_argument("--group_ranks", type=int, nargs="+", default=None)
    group.add_argument("--projector", choices=["linear", "mlp", "linear+mlp"], default=None)
    group.add_argument("--commitment_beta", type=float, default=None)
    group.add_argument("--seed", type=int, default=None, help="seed of the new cores and projectors")
    args = parser.parse_args(argv)
    if args.from_simvq is not None:
        if args.config is None or args.src is None or args.dst is not None:
            parser.error("--from_simvq needs --config YAML and exactly one positional OUTPUT_DIR.")
    elif args.src is None or args.dst is None:
        parser.error("the arguments SRC and DST are required (or --from_simvq CKPT --config YAML OUTPUT_DIR).")
    elif args.config is not None or args.ema is not None or args.keep_discriminator:
        parser.error("--config, --ema/--no_ema and --keep_discriminator apply to --from_simvq only.")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.from_simvq is not None:
        summary = convert_simvq(args.from_simvq, args.config, args.src, ema=args.ema,
                                keep_discriminator=args.keep_discriminator)
        print(json.dumps(summary))
        return
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
