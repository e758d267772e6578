"""The command lines of the Hub subpackage: ``scripts/convert_checkpoint.py`` (``groupvq-convert-checkpoint``,
`convert_main`) and ``scripts/push_to_hub.py`` (``groupvq-push-to-hub``, `publish_main`). Their logic lives in
`conversion`, `simvq_conversion` and `publishing`; this module only parses arguments and reports."""

from __future__ import annotations

import json
import math
import sys

from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

from ..quantizer import RESIZE_MODES
from . import publishing
from .cards import read_json
from .conversion import convert_checkpoint, copy_pipeline
from .publishing import DEFAULT_TIMEOUT, HubAccessError, HubConnectionError
from .simvq_conversion import convert_simvq


def convert_parser():
    """Arguments of ``scripts/convert_checkpoint.py`` and the ``groupvq-convert-checkpoint`` command (the checks
    between them run in `convert_main`)."""
    import argparse

    parser = argparse.ArgumentParser(
        description="""Convert Group-VQ checkpoints between transformers and diffusers, import a diffusers VQModel, or switch a saved
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
""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    return parser


def convert_main(argv: list[str] | None = None) -> None:
    """``scripts/convert_checkpoint.py`` and the ``groupvq-convert-checkpoint`` command; prints a JSON summary."""
    parser = convert_parser()
    args = parser.parse_args(argv)
    if args.from_simvq is not None:
        if args.config is None or args.src is None or args.dst is not None:
            parser.error("--from_simvq needs --config YAML and exactly one positional OUTPUT_DIR.")
    elif args.src is None or args.dst is None:
        parser.error("the arguments SRC and DST are required (or --from_simvq CKPT --config YAML OUTPUT_DIR).")
    elif args.config is not None or args.ema is not None or args.keep_discriminator:
        parser.error("--config, --ema/--no_ema and --keep_discriminator apply to --from_simvq only.")
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


def publish_parser():
    """Arguments of ``scripts/push_to_hub.py`` and the ``groupvq-push-to-hub`` command (the checks between them run
    in `publish_main`)."""
    import argparse

    parser = argparse.ArgumentParser(
        description="Publish a trained Group-VQ tokenizer on the Hugging Face Hub with its code and model card."
    )
    parser.add_argument("--model", required=True, help="Folder saved by GroupVQModel/GroupVQVAE.save_pretrained.")
    parser.add_argument("--repo_id", required=True, help="Hub repository, 'namespace/name'.")
    parser.add_argument("--private", action="store_true", help="Create the repository as private.")
    parser.add_argument("--eval_results", default=None, help="JSON written by scripts/evaluate.py (model-index).")
    parser.add_argument("--resize_study", default=None, help="Resize study table (.json rows or .md) for the card.")
    parser.add_argument("--training_args", default=None, help="JSON of training settings to list in the card.")
    parser.add_argument("--datasets", nargs="*", default=None, help="Training datasets (Hub ids, or imagenet/coco).")
    parser.add_argument("--codebook_size", type=int, default=None, help="Resize the codebook before publishing.")
    parser.add_argument("--resize_mode", choices=RESIZE_MODES, default="extend")
    parser.add_argument("--resize_seed", type=int, default=0, help="Seed of the newly sampled codes.")
    parser.add_argument("--diffusers", action="store_true", help="Publish the diffusers GroupVQVAE format.")
    parser.add_argument("--include_discriminator", action="store_true",
                        help="Also upload the training run's discriminator.safetensors from --model (named in the "
                             "card), so `scripts/train.py --init_from REPO` continues the GAN.")
    parser.add_argument("--commit_message", default="Upload Group-VQ tokenizer")
    parser.add_argument("--timeout", type=float, default=None,
                        help="Seconds each Hub request may wait to connect, send or receive "
                             "(default: groupvq_hf.hub.DEFAULT_TIMEOUT, 60).")
    return parser


def publish_main(argv: list[str] | None = None) -> None:
    """``scripts/push_to_hub.py`` and the ``groupvq-push-to-hub`` command. Every failure ends in one line on stderr
    (``push_to_hub: error: ...``) with exit code 1; a bad argument in argparse's usage error (exit code 2)."""
    from huggingface_hub import constants

    parser = publish_parser()
    args = parser.parse_args(argv)
    if args.resize_mode != "extend" and args.codebook_size is None:
        parser.error("--resize_mode needs --codebook_size")
    if args.timeout is not None and (not math.isfinite(args.timeout) or args.timeout <= 0):
        parser.error(f"--timeout must be a positive number of seconds, got {args.timeout}")
    try:
        training = read_json(args.training_args, "training_args")
        commit = publishing.publish(
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
    except OfflineModeIsEnabled:
        sys.exit("push_to_hub: error: offline mode is on (HF_HUB_OFFLINE=1): unset it to upload.")
    except (LocalTokenNotFoundError, HubAccessError, HubConnectionError, ValueError) as err:
        sys.exit(f"push_to_hub: error: {err}")
    except HfHubHTTPError as err:  # a server error (5xx, ...) after its retries: one line, no traceback
        sys.exit(f"push_to_hub: error: the Hub at {constants.ENDPOINT} answered: {' '.join(str(err).split())}")
    print(f"Published {args.repo_id}: {commit.commit_url}")


__all__ = ["convert_main", "convert_parser", "publish_main", "publish_parser"]
