"""Checkpoint conversion between the transformers `GroupVQModel`, the diffusers `GroupVQVAE` and a plain `VQModel`,
and switching a saved pipeline's `GroupVQVAE` components between library and remote-code (custom component) form.

The weight conversions themselves live on the models (`GroupVQVAE.from_groupvq`, `GroupVQModel.from_diffusers`,
`GroupVQVAE.from_vqmodel`); this module reads and writes folders. `convert_main` is its command line
(`scripts/convert_checkpoint.py`, `groupvq-convert-checkpoint`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

from ..modeling_groupvq import GroupVQModel
from ..vq_model import REMOTE_CODE_FILES, GroupVQVAE

# The kind each source converts to when `to` is not given (kinds as `checkpoint_kind` names them).
DEFAULT_TARGET = {"groupvq_model": "groupvq_vae", "groupvq_vae": "groupvq_model", "vqmodel": "groupvq_vae"}
# `model_index.json` entry of a GroupVQVAE component: loaded from the installed package, or from code in its folder.
LIBRARY_ENTRY = ["groupvq_hf.vq_model", "GroupVQVAE"]
REMOTE_CODE_ENTRY = [os.path.splitext(REMOTE_CODE_FILES[0])[0], "GroupVQVAE"]


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def checkpoint_kind(path: str | os.PathLike, subfolder: str | None = None) -> str:
    """"groupvq_model" (transformers `GroupVQModel`), "groupvq_vae" (diffusers `GroupVQVAE`) or "vqmodel" (a plain
    diffusers `VQModel`), read from the folder's `config.json`. Raises ValueError for anything else."""
    folder = os.path.join(path, subfolder) if subfolder else str(path)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        hint = " It is a pipeline folder: pass `subfolder` (e.g. 'vqvae')." if os.path.isfile(
            os.path.join(folder, "model_index.json")
        ) else ""
        raise ValueError(f"`path` must be a saved model folder with a config.json; {folder!r} has none.{hint}")
    config = _read_json(config_path)
    if config.get("model_type") == "groupvq":
        return "groupvq_model"
    class_name = config.get("_class_name")
    if class_name == "GroupVQVAE":
        return "groupvq_vae"
    if class_name == "VQModel":
        return "vqmodel"
    raise ValueError(
        f"{config_path} is neither a GroupVQModel (model_type 'groupvq') nor a diffusers GroupVQVAE/VQModel "
        f"(_class_name {class_name!r})."
    )


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str | None = None,
    subfolder: str | None = None,
    seed: int | None = None,
    **vq_kwargs,
) -> str:
    """Convert the model saved in `src` (optionally its `subfolder`) and save it to `dst`; returns the kind written.

    - "groupvq_model" <-> "groupvq_vae": lossless (same weights, identical outputs).
    - "vqmodel" -> "groupvq_vae": encoder/decoder weights kept, a new Group-VQ quantizer initialised from `seed`
      with `vq_kwargs` (`num_vq_embeddings`, `num_groups`, `codebook_rank`, `group_sizes`, `group_ranks`,
      `projector`, `commitment_beta`, and the runtime keys of `GroupVQVAE.from_groupvq`).
    """
    source = os.path.join(src, subfolder) if subfolder else src
    if os.path.realpath(source) == os.path.realpath(dst):
        raise ValueError(
            f"`dst` {str(dst)!r} is the same folder as `src` {str(source)!r}: converting in place would replace the "
            "model it reads with a model of another format; pass a new output folder."
        )
    kind = checkpoint_kind(src, subfolder)
    to = DEFAULT_TARGET[kind] if to is None else to
    allowed = ("groupvq_model", "groupvq_vae") if kind != "vqmodel" else ("groupvq_vae",)
    if to not in allowed:
        raise ValueError(f"`to` must be one of {allowed} for a {kind!r} checkpoint, got {to!r}.")
    if vq_kwargs and kind != "vqmodel" and not (kind == "groupvq_model" and to == "groupvq_vae"):
        raise ValueError(f"Quantizer options {sorted(vq_kwargs)} only apply when importing a plain VQModel.")
    load_kwargs = {"subfolder": subfolder} if subfolder else {}
    if kind == "vqmodel":
        from diffusers import VQModel

        model = GroupVQVAE.from_vqmodel(VQModel.from_pretrained(src, **load_kwargs), seed=seed, **vq_kwargs)
    elif kind == "groupvq_model":
        model = GroupVQModel.from_pretrained(src, **load_kwargs)
        model = GroupVQVAE.from_groupvq(model, **vq_kwargs) if to == "groupvq_vae" else model
    else:
        model = GroupVQVAE.from_pretrained(src, **load_kwargs)
        model = GroupVQModel.from_diffusers(model) if to == "groupvq_model" else model
    model.save_pretrained(dst)
    return to


def set_pipeline_component_source(pipeline_dir: str | os.PathLike, remote_code: bool = True) -> list[str]:
    """Rewrite a saved pipeline's `model_index.json` so its `GroupVQVAE` components load from code in their own
    folder (`remote_code=True`: ``["vq_model", "GroupVQVAE"]``, a custom component needing
    `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` but not groupvq_hf) or from the installed
    package (``["groupvq_hf.vq_model", "GroupVQVAE"]``; `import groupvq_hf.vq_model` before loading).

    Returns the names of the components rewritten. Each component folder must hold the code files, which
    `GroupVQVAE.save_pretrained` writes.
    """
    index_path = os.path.join(pipeline_dir, "model_index.json")
    if not os.path.isfile(index_path):
        raise ValueError(
            f"`pipeline_dir` must be a saved pipeline folder with a model_index.json, got {str(pipeline_dir)!r}."
        )
    index = _read_json(index_path)
    target = REMOTE_CODE_ENTRY if remote_code else LIBRARY_ENTRY
    changed = []
    for name, entry in index.items():
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1] == "GroupVQVAE") or list(entry) == target:
            continue
        missing = [f for f in REMOTE_CODE_FILES if not os.path.isfile(os.path.join(pipeline_dir, name, f))]
        if remote_code and missing:
            raise ValueError(f"Component {name!r} lacks {missing}; save it with GroupVQVAE.save_pretrained first.")
        index[name] = list(target)
        changed.append(name)
    with open(index_path, "w", encoding="utf-8") as f:
        f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return changed


def copy_pipeline(src: str | os.PathLike, dst: str | os.PathLike, remote_code: bool = True) -> list[str]:
    """Copy a saved pipeline folder to `dst` and set its GroupVQVAE components' source there (see
    `set_pipeline_component_source`); returns the components rewritten."""
    if os.path.abspath(src) != os.path.abspath(dst):
        shutil.copytree(src, dst, dirs_exist_ok=True)
    return set_pipeline_component_source(dst, remote_code=remote_code)


# ---------------------------------------------------------------------------------------------------- command line
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
        # `hub.simvq_conversion` imports the training code, which imports this module (`checkpoint_kind`): take
        # `convert_simvq` from the package, which imported it already (an import here would close that circle).
        convert_simvq = sys.modules[__package__].convert_simvq
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


__all__ = [
    "checkpoint_kind",
    "convert_checkpoint",
    "convert_main",
    "convert_parser",
    "copy_pipeline",
    "set_pipeline_component_source",
]
