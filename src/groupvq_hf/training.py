"""Training with accelerate: argument parser, resumable data stream, checkpoints, EMA and the VQGAN loop.

``scripts/train.py`` is a thin command line over [`main`]. One GPU, DDP over GPUs or nodes and 2-process CPU runs
(gloo, ``Accelerator(cpu=True)`` when there is no CUDA) share the same code; every rank reads its own part of the
stream (``split_dataset_by_node``) through a plain DataLoader that is not passed to ``accelerator.prepare``.
Exact resume: checkpoints hold model, EMA, discriminator, optimizers, schedulers, RNG, step and each rank's
data-stream position (epoch, batches read in it); a stream resumes by replaying its epoch up to that position, with
the same shuffle seed and augmentation RNG, so stopping at step s and resuming to t equals one run to t.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .configuration_groupvq import PRESETS, GroupVQConfig
from .stream import ResumableBatches  # noqa: F401  (re-exported: moved next to the data code)

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "training_state_rank{rank}.json"
VALIDATION_LOG_FILE = "validation_log.jsonl"  # held-out usage at every validation step, in --output_dir
RUN_ARGS_FILE = "run_args.json"  # the arguments that define the run, in every checkpoint and next to the export
COMPLETE_FILE = "checkpoint_complete.json"  # written last: a checkpoint without it is incomplete and never resumed
# Arguments that do not change what a run computes (or that a resume may extend): never compared on resume.
# (``model_config`` names a preset or a file: what it resolved to is compared, as ``model_config_resolved``.)
RESUME_CHANGES_ALWAYS_ALLOWED = (
    "output_dir", "resume_from_checkpoint", "model_config", "allow_resume_changes", "max_train_steps", "num_epochs",
    "checkpointing_steps", "checkpoints_total_limit", "report_to", "tracker_project_name", "logging_steps",
    "validation_steps", "num_validation_images", "num_validation_usage_images", "log_example_keys",
    "max_nonfinite_steps", "lpips_weights", "torch_compile",
)  # fmt: skip
DEFAULT_DEMO_STEPS = 300
# The CPU-scale recipe: what `--dataset demo` changes in SimVQ's recipe when the flag is not given. A few hundred steps
# are ~1,000x fewer than the paper's, so (measured in benchmarks/trends/RESULTS.md) the projectors need a 100x larger
# learning rate to travel as far relative to the encoder, and the EMA a warm-up, else the export is mostly the
# initial weights (0.999^300 = 0.74 of them).
DEMO_RECIPE = {"quantizer_learning_rate": 1e-2, "ema_warmup": True}


def _flag_value(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# ---------------------------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    """The command line of ``scripts/train.py``, in four groups: data, model and loss, optimisation, checkpoints
    and logging."""
    p = argparse.ArgumentParser(description="Train a Group-VQ tokenizer (VQGAN recipe of the paper) with accelerate.")
    _add_data_arguments(p.add_argument_group("data"))
    _add_model_arguments(p.add_argument_group("model and loss"))
    _add_optimisation_arguments(p.add_argument_group("optimisation"))
    _add_checkpoint_arguments(p.add_argument_group("checkpoints and logging"))
    return p


def _add_data_arguments(g) -> None:
    g.add_argument(
        "--dataset",
        default="demo",
        help="demo | imagenet | imagenet-wds | coco | 'imagenet:0.7+coco:0.3' | Hub repo id | local path",
    )
    g.add_argument("--image_column", default=None, help="column holding the images (guessed when not given)")
    g.add_argument("--dataset_split", default="train")
    g.add_argument("--validation_split", default="validation", help="split the reconstruction grids are drawn from")
    g.add_argument("--resolution", type=int, default=128)
    g.add_argument(
        "--max_train_samples",
        type=int,
        default=None,
        help="cap on the images each process (each DataLoader worker when workers are used) reads per epoch",
    )
    g.add_argument("--shuffle_buffer_size", type=int, default=1000)
    g.add_argument("--dataloader_num_workers", type=int, default=4)


def _add_model_arguments(g) -> None:
    g.add_argument(
        "--model_config",
        default=None,
        help=f"preset ({', '.join(PRESETS)}) or config JSON / model folder; default: tiny for demo, coco for coco, else imagenet",
    )
    g.add_argument(
        "--perceptual_weight", type=float, default=1.0, help="LPIPS(VGG16) weight; 0 turns it off (no weights needed)"
    )
    g.add_argument(
        "--lpips_weights",
        default=None,
        help="local VGG16/LPIPS weights file when the standard download is not reachable",
    )
    g.add_argument(
        "--generator_loss",
        default="non_saturating",
        choices=["non_saturating", "hinge"],
        help="GAN loss of the generator: SimVQ's non-saturating softplus(-mean logit per image) (default) or "
        "VQGAN's hinge -mean D(x_rec); the discriminator always uses the hinge loss",
    )
    g.add_argument(
        "--disc_weight",
        type=float,
        default=0.1,
        help="weight of the generator's GAN loss: fixed (SimVQ's gen_loss_weight 0.1), or with "
        "--adaptive_disc_weight the factor on VQGAN's adaptive weight (taming-transformers used 0.8); 0 turns the GAN off",
    )
    g.add_argument(
        "--adaptive_disc_weight",
        action="store_true",
        help="scale the GAN loss by VQGAN's adaptive weight ||grad L_rec|| / ||grad L_G|| at the decoder's last layer",
    )
    g.add_argument("--disc_start", type=int, default=0, help="step at which the discriminator and the GAN loss start")
    g.add_argument("--disc_layers", type=int, default=3)
    g.add_argument("--disc_channels", type=int, default=64)
    g.add_argument("--commitment_weight", type=float, default=1.0)


def _add_optimisation_arguments(g) -> None:
    g.add_argument("--train_batch_size", type=int, default=32, help="per process")
    g.add_argument("--max_train_steps", type=int, default=None)
    g.add_argument(
        "--num_epochs",
        type=int,
        default=None,
        help="train this many epochs (stop once a process starts epoch num_epochs). Without --max_train_steps, "
        "learning-rate schedules span num_epochs x the steps of one epoch (the dataset's size // (batch x processes "
        "x accumulation)), so the size must be known (named sources, local files, the demo), else give "
        "--max_train_steps; with both, schedules span --max_train_steps and training stops at whichever comes first",
    )
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument(
        "--quantizer_learning_rate",
        type=float,
        default=None,
        help="learning rate of the codebook projectors W_j, b_j; default: --learning_rate (SimVQ's single rate), "
        f"{DEMO_RECIPE['quantizer_learning_rate']:g} with --dataset demo (see DEMO_RECIPE)",
    )
    g.add_argument("--disc_learning_rate", type=float, default=None, help="default: --learning_rate")
    g.add_argument("--adam_beta1", type=float, default=0.5)
    g.add_argument("--adam_beta2", type=float, default=0.9)
    g.add_argument("--adam_weight_decay", type=float, default=0.0)
    g.add_argument(
        "--lr_scheduler",
        default="constant",
        help="diffusers scheduler name (constant, constant_with_warmup, cosine, ...)",
    )
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument(
        "--max_grad_norm", type=float, default=0.0, help="clip gradient norms to this value; 0 (default, SimVQ) disables"
    )
    g.add_argument("--ema_decay", type=float, default=0.999, help="EMA decay, fixed from the first step (SimVQ)")
    g.add_argument(
        "--ema_warmup",
        nargs="?",
        const=True,
        default=None,
        type=_flag_value,
        help="ramp the EMA decay as diffusers' EMAModel does by default: min(ema_decay, (1 + t) / (10 + t)); "
        "'--ema_warmup false' keeps it fixed; default: fixed (SimVQ), ramped with --dataset demo (see DEMO_RECIPE)",
    )
    g.add_argument("--no_ema", action="store_true", help="export the raw weights instead of the EMA")
    g.add_argument("--max_nonfinite_steps", type=int, default=20, help="consecutive NaN/inf steps before the run stops")
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--torch_compile", action="store_true", help="torch.compile the encoder and decoder")
    g.add_argument("--seed", type=int, default=0)


def _add_checkpoint_arguments(g) -> None:
    g.add_argument("--output_dir", default="outputs/groupvq")
    g.add_argument("--checkpointing_steps", type=int, default=5000)
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="'latest' (the newest complete checkpoint in <output_dir>/checkpoints) or a checkpoint folder; the "
        "run's arguments must match the checkpoint's (see --allow_resume_changes)",
    )
    g.add_argument(
        "--allow_resume_changes",
        default="",
        help="comma-separated arguments that may differ from the checkpoint's on resume (e.g. 'learning_rate,seed'); "
        f"always allowed: {', '.join(RESUME_CHANGES_ALWAYS_ALLOWED)}",
    )
    g.add_argument("--report_to", default="tensorboard", help="tensorboard | wandb | all | none")
    g.add_argument("--tracker_project_name", default="groupvq")
    g.add_argument("--logging_steps", type=int, default=50)
    g.add_argument(
        "--validation_steps",
        type=int,
        default=1000,
        help="every N steps (0: only at the end) the EMA model's reconstruction grid and its codebook usage on "
        "held-out images",
    )
    g.add_argument("--num_validation_images", type=int, default=8, help="images in the reconstruction grid")
    g.add_argument(
        "--num_validation_usage_images",
        type=int,
        default=256,
        help="held-out images (--validation_split, center crops) over which codebook usage is counted at each "
        "validation; 0 turns the measurement off",
    )
    g.add_argument(
        "--log_example_keys",
        action="store_true",
        help="write each process's example keys and weight hash to <output_dir>/example_keys/",
    )


# The loss and optimiser settings that make up the recipe, and how the model card names them.
RECIPE_ARGUMENTS = (
    "perceptual_weight", "generator_loss", "disc_weight", "adaptive_disc_weight", "disc_start", "commitment_weight",
    "learning_rate", "quantizer_learning_rate", "disc_learning_rate", "adam_beta1", "adam_beta2", "adam_weight_decay", "lr_scheduler",
    "lr_warmup_steps", "max_grad_norm", "ema_decay", "ema_warmup", "no_ema",
)  # fmt: skip
SIMVQ_RECIPE = (
    "SimVQ's released recipe (`configs/imagenet_simvq_128_B.yaml`, which the paper's section 4.1 follows), the "
    "default of `scripts/train.py` in groupvq-hf: L1 + LPIPS (VGG16, weight 1) reconstruction loss; a PatchGAN "
    "discriminator from step 0 with the hinge loss; the non-saturating generator loss (softplus of minus each "
    "image's mean patch logit) with a fixed weight 0.1 (no adaptive weight); the Group-VQ commitment loss "
    "`0.25*||z - sg(q)||^2 + ||sg(z) - q||^2` (Eq. 3) with weight 1; Adam, learning rate 1e-4 constant, betas "
    "(0.5, 0.9), no gradient clipping; only the projectors W_j, b_j of the codebook train, the cores stay frozen "
    "(Algorithm 1). The exported weights are an EMA of the trained ones with a fixed decay 0.999."
)


def describe_recipe(training: dict | None) -> str:
    """The model card's training summary: SimVQ's recipe, and which of its settings ``training`` (the arguments
    of ``scripts/train.py``, e.g. its ``run_args.json``) changed."""
    if not training or not any(name in training for name in RECIPE_ARGUMENTS):
        return SIMVQ_RECIPE + " The training arguments of this checkpoint were not supplied."
    parser = build_parser()
    changed = []
    for name in RECIPE_ARGUMENTS:
        default = parser.get_default(name)
        if name in ("disc_learning_rate", "quantizer_learning_rate"):
            default = training.get("learning_rate", parser.get_default("learning_rate"))
        elif name == "ema_warmup":
            default = False
        if name in training and training[name] != default:
            changed.append(f"`--{name} {training[name]}`")
    if not changed:
        return "Trained with " + SIMVQ_RECIPE
    return f"Trained with {SIMVQ_RECIPE} **Changed from that recipe for this run:** {', '.join(changed)}."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; bad values raise ValueError naming the flag."""
    args = build_parser().parse_args(argv)
    positive = (
        "resolution",
        "train_batch_size",
        "gradient_accumulation_steps",
        "logging_steps",
        "num_validation_images",
    )
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name}` must be >= 1, got {getattr(args, name)}.")
    for name in ("max_train_steps", "num_epochs", "max_train_samples", "checkpoints_total_limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"`--{name}` must be >= 1, got {value}.")
    for name in (
        "checkpointing_steps", "validation_steps", "dataloader_num_workers", "disc_start", "lr_warmup_steps",
        "num_validation_usage_images",
    ):  # fmt: skip
        if getattr(args, name) < 0:
            raise ValueError(f"`--{name}` must be >= 0, got {getattr(args, name)}.")
    for name in ("perceptual_weight", "disc_weight", "commitment_weight", "max_grad_norm", "learning_rate"):
        if getattr(args, name) < 0:
            raise ValueError(f"`--{name}` must be >= 0, got {getattr(args, name)}.")
    if not 0.0 <= args.ema_decay < 1.0:
        raise ValueError(f"`--ema_decay` must be in [0, 1), got {args.ema_decay}.")
    if args.max_train_steps is None and args.num_epochs is None:
        if args.dataset != "demo":
            raise ValueError("Give `--max_train_steps` or `--num_epochs`.")
        args.max_train_steps = DEFAULT_DEMO_STEPS
    if args.model_config is None:
        first = args.dataset.split("+")[0].split(":")[0]
        args.model_config = {"demo": "tiny", "coco": "coco"}.get(first, "imagenet")
    if args.dataset == "demo":
        for name, value in DEMO_RECIPE.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
    if args.quantizer_learning_rate is None:
        args.quantizer_learning_rate = args.learning_rate
    if args.quantizer_learning_rate < 0:
        raise ValueError(f"`--quantizer_learning_rate` must be >= 0, got {args.quantizer_learning_rate}.")
    args.ema_warmup = bool(args.ema_warmup)
    if args.disc_learning_rate is None:
        args.disc_learning_rate = args.learning_rate
    allowed = [name.strip().lstrip("-") for name in args.allow_resume_changes.split(",") if name.strip()]
    unknown = sorted(set(allowed) - set(vars(args)) - {"world_size", "model_config_resolved"})
    if unknown:
        raise ValueError(
            f"`--allow_resume_changes` names unknown arguments {unknown}; expected names of this script's arguments "
            "(e.g. learning_rate,seed) or world_size."
        )
    args.allow_resume_changes = ",".join(allowed)
    return args


def resolve_model_config(model_config: str, resolution: int) -> GroupVQConfig:
    """A preset name or a config JSON / saved model folder, with ``sample_size`` set to ``resolution``."""
    if model_config in PRESETS:
        config = GroupVQConfig.from_preset(model_config)
    elif os.path.isdir(model_config):
        config = GroupVQConfig.from_pretrained(model_config)
    elif os.path.isfile(model_config):
        config = GroupVQConfig.from_json_file(model_config)
    else:
        raise ValueError(
            f"`--model_config` must be a preset ({', '.join(PRESETS)}), a config JSON or a model folder, got {model_config!r}."
        )
    if resolution % config.downsample_factor:
        raise ValueError(
            f"`--resolution` {resolution} must be divisible by the model's downsampling factor {config.downsample_factor}."
        )
    config.sample_size = resolution
    return config


# ---------------------------------------------------------------------------------------------------- epochs
# Images per split of the named sources (ImageNet-1k: ILSVRC 2012; COCO: 2017 images), for schedules in epochs.
KNOWN_DATASET_SIZES = {
    ("imagenet", "train"): 1_281_167, ("imagenet", "validation"): 50_000,
    ("imagenet-wds", "train"): 1_281_167, ("imagenet-wds", "validation"): 50_000,
    ("coco", "train"): 118_287, ("coco", "validation"): 5_000,
}  # fmt: skip


def _count_local_rows(kind: str, files: list[str]) -> int:
    """Rows of local parquet files (from their metadata), images of an image folder, or images in tar shards."""
    from .data import IMAGE_EXTENSIONS

    if kind == "parquet":
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(f).metadata.num_rows for f in files if f.endswith(".parquet"))
    if kind == "webdataset":
        import tarfile

        total = 0
        for f in files:
            with tarfile.open(f) as tar:
                total += sum(1 for m in tar if m.isfile() and m.name.lower().endswith(IMAGE_EXTENSIONS))
        return total
    return sum(1 for f in files if f.lower().endswith(IMAGE_EXTENSIONS))


def dataset_num_examples(dataset: str, split: str = "train") -> int | None:
    """Examples in one epoch of ``dataset``'s ``split``, or None when it cannot be known without reading it all.

    Named sources: their published sizes (or the rows of a local mirror named by ``GROUPVQ_<NAME>_PATH``); local
    files: parquet metadata, image files, images in tar shards (the split resolved as ``datasets`` resolves it);
    the demo: the rows of its source (cheap, nothing is decoded); Hub repo ids: the split sizes of the dataset's
    info when it has them (needs the network). Mixed specs (``a+b``) have a random epoch length: None.
    """
    from .data import SOURCES, SPLIT_ALIASES, _local_loader, load_image_source, parse_dataset_spec

    parts = parse_dataset_spec(dataset)
    if len(parts) != 1:
        return None
    name = parts[0][0]
    if name == "demo":
        return sum(1 for _ in load_image_source("demo", split))
    source = SOURCES.get(name)
    path = Path(source.location() if source is not None else name).expanduser()
    if path.exists():
        import datasets

        kind, kwargs = _local_loader(path)
        builder = datasets.load_dataset_builder(kind, **kwargs)
        files = builder.config.data_files or {}
        wanted = "train" if path.is_file() else (source.split(split) if source is not None else split)
        # the split the stream reads (data._local_split): itself, an alias, or the only split there is
        candidates = [wanted, *SPLIT_ALIASES.get(wanted, ()), *(files if len(files) == 1 else ())]
        for candidate in candidates:
            if candidate in files:
                return _count_local_rows(kind, [str(f) for f in files[candidate]])
        return None
    if source is not None:
        return KNOWN_DATASET_SIZES.get((name, split))
    try:  # a Hub repo id: the split sizes its card or parquet export publish (needs the network)
        import datasets

        splits = datasets.load_dataset_builder(name).info.splits or {}
        size = splits[split].num_examples if split in splits else 0
        return int(size) or None
    except Exception:  # offline, gated, or no such information
        return None


def steps_per_epoch(args: argparse.Namespace, world_size: int) -> int:
    """Optimizer steps in one epoch: the dataset's size (capped by ``--max_train_samples`` per process and loader
    worker) // (batch x processes) // accumulation. ValueError when the size is unknown or too small."""
    size = dataset_num_examples(args.dataset, args.dataset_split)
    if size is None:
        raise ValueError(
            f"`--num_epochs` needs the number of images in `--dataset` {args.dataset!r} (split "
            f"{args.dataset_split!r}) to decay the learning-rate schedule over the run, and it is not known without "
            "reading the whole stream; give `--max_train_steps` instead (or as well)."
        )
    per_process = size // world_size
    if args.max_train_samples is not None:
        per_process = min(per_process, args.max_train_samples * max(1, args.dataloader_num_workers))
    steps = per_process // args.train_batch_size // args.gradient_accumulation_steps
    if steps < 1:
        raise ValueError(
            f"`--dataset` {args.dataset!r} has {size} images in split {args.dataset_split!r}: less than one step of "
            f"`--train_batch_size` {args.train_batch_size} x {world_size} processes x "
            f"`--gradient_accumulation_steps` {args.gradient_accumulation_steps} per epoch."
        )
    return steps


# ---------------------------------------------------------------------------------------------------- checkpoints
def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a finished checkpoint (its ``COMPLETE_FILE`` marker is written last)."""
    return (Path(path) / COMPLETE_FILE).is_file()


# What every checkpoint of the first release held (accelerate's files and ours), before COMPLETE_FILE existed.
LEGACY_CHECKPOINT_FILES = (STATE_FILE.format(rank=0), "optimizer.bin", "scheduler.bin", "random_states_0.pkl")


def is_legacy_checkpoint(path: str | os.PathLike) -> bool:
    """A checkpoint written before ``COMPLETE_FILE`` and ``RUN_ARGS_FILE`` existed that holds every file such a
    checkpoint had (weights included). `latest` never picks one (a half-deleted folder of that version can look
    whole); named explicitly with ``--resume_from_checkpoint PATH`` it resumes."""
    path = Path(path)
    if (path / COMPLETE_FILE).exists() or (path / RUN_ARGS_FILE).exists():
        return False
    weights = (path / "model.safetensors").is_file() or (path / "pytorch_model.bin").is_file()
    return weights and all((path / name).is_file() for name in LEGACY_CHECKPOINT_FILES)


def list_checkpoints(checkpoint_dir: str | os.PathLike, complete_only: bool = True) -> list[Path]:
    """Checkpoints (``checkpoint-<step>``) in ``checkpoint_dir``, oldest step first; only complete ones by default."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
    if complete_only:
        found = [p for p in found if is_complete_checkpoint(p)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def rotate_checkpoints(checkpoint_dir: str | os.PathLike, total_limit: int | None) -> list[Path]:
    """Delete the oldest checkpoints so at most ``total_limit`` remain; returns the deleted folders."""
    if total_limit is None:
        return []
    checkpoints = list_checkpoints(checkpoint_dir)
    removed = checkpoints[: max(0, len(checkpoints) - total_limit)]
    for path in removed:
        shutil.rmtree(path)
    return removed


def resolve_resume_path(resume_from_checkpoint: str | None, checkpoint_dir: str | os.PathLike) -> Path | None:
    """``"latest"`` -> newest complete checkpoint in ``checkpoint_dir`` (None when there is none); a path must
    exist and be complete."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(checkpoint_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise ValueError(
            f"`--resume_from_checkpoint` must be 'latest' or an existing checkpoint folder, got {str(path)!r}."
        )
    legacy = is_legacy_checkpoint(path)
    if (path / STATE_FILE.format(rank=0)).is_file() and not is_complete_checkpoint(path) and not legacy:
        raise ValueError(
            f"`--resume_from_checkpoint` {str(path)!r} is incomplete (no {COMPLETE_FILE}: its save was interrupted); "
            "resume from an earlier checkpoint or 'latest' (the newest complete one)."
        )
    return path


def save_checkpoint(
    accelerator,
    checkpoint_dir: Path,
    step: int,
    rank_state: dict,
    total_limit: int | None,
    run_args: dict | None = None,
) -> Path:
    """``accelerator.save_state`` into a temporary folder, then swapped in atomically as ``checkpoint-<step>``.

    Every process writes its RNG state and ``training_state_rank<r>.json`` (step, data position); the main process
    then writes ``run_args`` (the arguments that define the run, see [`run_arguments`]) and, last, the
    ``COMPLETE_FILE`` marker, and swaps the folder in with ``fileio.replace_directory`` (old aside, new in, old
    deleted). A kill at any moment leaves the newest complete checkpoint for ``latest``. Old checkpoints are
    rotated to ``total_limit`` after the new one is in place. Needs a file system shared by all processes.
    """
    from .fileio import replace_directory

    final = checkpoint_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = checkpoint_dir / f".tmp-{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    state_file = tmp / STATE_FILE.format(rank=accelerator.process_index)
    state_file.write_text(json.dumps(rank_state))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if run_args is not None:
            (tmp / RUN_ARGS_FILE).write_text(json.dumps(run_args, indent=2, sort_keys=True))
        (tmp / COMPLETE_FILE).write_text(json.dumps({"step": step, "time": time.time()}))  # last: the marker
        replace_directory(tmp, final)
        rotate_checkpoints(checkpoint_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def load_rank_state(checkpoint: Path, rank: int) -> dict:
    """This process's saved step and data position (rank 0's when the number of processes changed)."""
    path = checkpoint / STATE_FILE.format(rank=rank)
    if not path.is_file():
        path = checkpoint / STATE_FILE.format(rank=0)
    if not path.is_file():
        raise ValueError(
            f"`--resume_from_checkpoint` {str(checkpoint)!r} has no {STATE_FILE.format(rank=0)}: not a groupvq checkpoint."
        )
    return json.loads(path.read_text())


def run_arguments(args: argparse.Namespace, config: GroupVQConfig, world_size: int) -> dict:
    """What defines a run, as recorded in every checkpoint: every argument (JSON values), the number of processes
    and the resolved model config (so a changed config file behind the same ``--model_config`` path is seen)."""
    record = {k: v for k, v in vars(args).items() if v is None or isinstance(v, (bool, int, float, str))}
    model_config = config.to_dict()
    for volatile in ("transformers_version", "_name_or_path"):
        model_config.pop(volatile, None)
    record.update(world_size=int(world_size), model_config_resolved=json.loads(json.dumps(model_config)))
    return record


def run_argument_differences(saved: dict, current: dict, allowed: str | list[str] = "") -> list[str]:
    """``"name: checkpoint A, now B"`` for every argument that differs, except ``RESUME_CHANGES_ALWAYS_ALLOWED``
    and the comma-separated names in ``allowed``; keys of ``model_config_resolved`` are compared one by one."""
    if isinstance(allowed, str):
        allowed = [name for name in allowed.split(",") if name]
    skip = set(RESUME_CHANGES_ALWAYS_ALLOWED) | set(allowed)
    lines = []
    for name in sorted(set(saved) | set(current)):
        if name in skip:
            continue
        old, new = saved.get(name, "<not set>"), current.get(name, "<not set>")
        if isinstance(old, dict) and isinstance(new, dict):
            lines += [
                f"{name}.{key}: checkpoint {old.get(key, '<not set>')!r}, now {new.get(key, '<not set>')!r}"
                for key in sorted(set(old) | set(new))
                if old.get(key, "<not set>") != new.get(key, "<not set>")
            ]
        elif old != new:
            lines.append(f"{name}: checkpoint {old!r}, now {new!r}")
    return lines


def check_resume_arguments(checkpoint: Path, current: dict, allowed: str = "") -> list[str]:
    """Raise ValueError when ``checkpoint`` was written by a run with other arguments (listing them); returns
    a warning line list (empty when all is well, one line for a checkpoint that recorded no arguments)."""
    path = Path(checkpoint) / RUN_ARGS_FILE
    if not path.is_file():
        return [f"{checkpoint} records no run arguments (written by an older groupvq-hf): cannot check that it belongs to this run."]
    differences = run_argument_differences(json.loads(path.read_text()), current, allowed)
    if differences:
        names = ",".join(sorted({line.split(":")[0].split(".")[0] for line in differences}))
        raise ValueError(
            f"`--resume_from_checkpoint` {str(checkpoint)!r} belongs to a run with other arguments:\n  "
            + "\n  ".join(differences)
            + f"\nResume with the checkpoint's arguments, start in a new `--output_dir`, or allow these changes "
            f"deliberately with `--allow_resume_changes {names}`."
        )
    return []


# ---------------------------------------------------------------------------------------------------- helpers
def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers (names, dtypes and bytes), to compare replicas and runs."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def reconstruction_grid(pixels: torch.Tensor, reconstruction: torch.Tensor):
    """A PIL image: originals on the top row, reconstructions below (inputs in [-1, 1])."""
    from PIL import Image
    from torchvision.utils import make_grid

    images = torch.cat([pixels.detach().float().cpu(), reconstruction.detach().float().cpu()])
    grid = make_grid((images.clamp(-1, 1) + 1) / 2, nrow=pixels.shape[0], padding=2, pad_value=1.0)
    return Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))


@torch.no_grad()
def reconstruct(model, pixels: torch.Tensor) -> torch.Tensor:
    """Reconstruction of ``pixels`` in eval mode, without touching the quantizer's usage counts; the model's mode is
    restored."""
    was_training = model.training
    model.eval()
    try:
        with model.quantizer.counting_usage(False):
            return model(pixels).reconstruction
    finally:
        model.train(was_training)


class NonFiniteGuard:
    """Counts consecutive non-finite updates and stops the run after ``limit`` of them."""

    def __init__(self, limit: int):
        self.limit = limit
        self.consecutive = 0
        self.total = 0

    def check(self, value: torch.Tensor, step: int, what: str) -> bool:
        """True when ``value`` is finite; otherwise count it and raise RuntimeError past the limit."""
        if bool(torch.isfinite(value).all()):
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total += 1
        if self.consecutive >= self.limit:
            raise RuntimeError(
                f"{self.consecutive} consecutive steps had a non-finite {what} (last at step {step}); stopping. "
                "Lower --learning_rate, prefer --mixed_precision bf16 over fp16, or check the data."
            )
        return False


@functools.cache
def _fixed_decay_ema_class():
    from diffusers.training_utils import EMAModel

    class FixedDecayEMAModel(EMAModel):
        """diffusers' ``EMAModel`` whose decay is ``decay`` from the first update on (SimVQ's EMA); the parent ramps
        it as ``min(decay, (1 + t) / (10 + t))`` and copies the weights at the first update."""

        def get_decay(self, optimization_step: int) -> float:
            return self.decay

    return FixedDecayEMAModel


def build_loss_fn(args: argparse.Namespace, perceptual=None):
    """The [`VQGANLoss`] the arguments describe (SimVQ's recipe by default; see ``--generator_loss``,
    ``--adaptive_disc_weight``)."""
    from .losses import VQGANLoss

    return VQGANLoss(
        perceptual, args.perceptual_weight, args.disc_weight, args.disc_start, args.commitment_weight,
        adaptive_weight=args.adaptive_disc_weight, generator_loss=args.generator_loss,
    )  # fmt: skip


def save_export(model, model_dir: Path, run_args: dict) -> Path:
    """``model.save_pretrained`` plus ``RUN_ARGS_FILE`` into a temporary folder swapped in as ``model_dir``
    (``fileio.atomic_directory``): a kill or an error leaves the previous export or this one, never a mix."""
    from .fileio import atomic_directory

    with atomic_directory(model_dir) as tmp:
        model.save_pretrained(tmp)
        (tmp / RUN_ARGS_FILE).write_text(json.dumps(run_args, indent=2, sort_keys=True))
    return Path(model_dir)


def build_ema(parameters, decay: float, warmup: bool = False):
    """An EMA of ``parameters``: fixed ``decay`` (default), or diffusers' ramped decay with ``warmup``."""
    if warmup:
        from diffusers.training_utils import EMAModel

        return EMAModel(parameters, decay=decay)
    return _fixed_decay_ema_class()(parameters, decay=decay)


def tracker_config(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}


# ---------------------------------------------------------------------------------------------------- training
# `train` reads top to bottom as its steps: `setup_training` builds everything into a `TrainingRun`,
# `resume_training` restores a checkpoint into it and returns the `LoopState` the loop moves, then per batch
# `optimisation_step` (generator, then discriminator) and, after each optimizer step, `log_window`,
# `save_training_checkpoint` and `validate`; `finish_training` checks the replicas and exports the model.
def build_accelerator(args: argparse.Namespace):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    report_to = None if args.report_to == "none" else args.report_to
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "logs")
        ),
        # The quantizer's frozen cores are large persistent buffers, identical on every rank: never broadcast them.
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )


@dataclass
class TrainingRun:
    """Everything [`train`] builds before its loop ([`setup_training`]).

    ``model``, ``discriminator``, the optimizers and schedulers are as ``accelerator.prepare`` returned them
    (DDP-wrapped in a distributed run); ``plain_model`` and ``plain_disc`` are the modules inside. ``resume`` is the
    checkpoint to resume from (None: a fresh run). ``eval_pixels`` (reconstruction grids, on the device) and
    ``usage_pixels`` (held-out usage, CPU) are set on the main process only ([`load_validation_images`]).
    """

    args: argparse.Namespace
    accelerator: Any
    logger: Any
    config: GroupVQConfig
    model: torch.nn.Module
    discriminator: torch.nn.Module
    plain_model: torch.nn.Module
    plain_disc: torch.nn.Module
    loss_fn: Any
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    sched_g: Any
    sched_d: Any
    ema: Any
    batches: ResumableBatches
    run_args: dict
    resume: Path | None
    eval_pixels: torch.Tensor | None = None
    usage_pixels: torch.Tensor | None = None

    @property
    def output_dir(self) -> Path:
        return Path(self.args.output_dir)

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    @property
    def validation_log(self) -> Path:
        return self.output_dir / VALIDATION_LOG_FILE

    @property
    def images_per_step(self) -> int:
        """Images of one optimizer step: batch x processes x accumulation."""
        args = self.args
        return args.train_batch_size * self.accelerator.num_processes * args.gradient_accumulation_steps

    @property
    def clip(self) -> float:
        """The gradient-norm clip (``--max_grad_norm``; 0 means none: infinity)."""
        return self.args.max_grad_norm if self.args.max_grad_norm > 0 else float("inf")

    @property
    def scaled(self) -> bool:
        """Whether fp16 loss scaling is on (its GradScaler skips an overflowing step itself)."""
        return self.accelerator.scaler is not None


@dataclass
class LoopState:
    """What the training loop moves: the step, the image counters, the running sums of the logged terms since the
    last log (``loss_sums``/``loss_counts``), the non-finite guards and the progress bar."""

    guard_g: NonFiniteGuard  # generator and discriminator gradients (--max_nonfinite_steps)
    guard_d: NonFiniteGuard
    global_step: int = 0
    skipped_images: int = 0
    converted_images: int = 0
    local_counts: torch.Tensor = field(default_factory=lambda: torch.zeros(2, dtype=torch.long))  # since last sum
    loss_sums: dict = field(default_factory=dict)
    loss_counts: Counter = field(default_factory=Counter)
    keys_seen: list = field(default_factory=list)
    postfix: dict = field(default_factory=dict)
    t_log: float = field(default_factory=time.perf_counter)
    progress: Any = None

    def add_logs(self, logs: dict) -> None:
        """Add one accumulation step's logged tensors to the window's sums."""
        for key, value in logs.items():
            self.loss_sums[key] = self.loss_sums.get(key, 0.0) + value.detach().float()
            self.loss_counts[key] += 1

    def sum_image_counts(self, accelerator) -> None:
        """Add every process's skipped and converted images since the last call (a collective: all ranks call it)."""
        self.skipped_images, self.converted_images = _add_counts(
            accelerator, self.local_counts, self.skipped_images, self.converted_images
        )


def setup_training(args: argparse.Namespace) -> TrainingRun:
    """Build the run: accelerator, models and loss (same seed on every rank: identical initial weights), optimizers,
    schedules, EMA, this rank's data stream, the run's arguments and the checkpoint to resume from."""
    from accelerate.utils import set_seed

    accelerator, logger = start_accelerator(args)
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(args.seed)
    config = resolve_model_config(args.model_config, args.resolution)
    model, discriminator, loss_fn = build_models(args, config, accelerator.device)
    opt_g, opt_d = build_optimizers(args, model, discriminator)
    if args.max_train_steps is None:  # --num_epochs alone: the schedule spans the epochs' real number of steps
        epoch_steps = steps_per_epoch(args, world)
        args.max_train_steps = args.num_epochs * epoch_steps
        logger.info(f"{args.num_epochs} epochs of {epoch_steps} steps: {args.max_train_steps} steps.")
    sched_g, sched_d = build_schedulers(args, (opt_g, opt_d), world)
    ema = None if args.no_ema else build_ema(model.parameters(), args.ema_decay, args.ema_warmup)
    model, discriminator, opt_g, opt_d, sched_g, sched_d = accelerator.prepare(
        model, discriminator, opt_g, opt_d, sched_g, sched_d
    )
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    batches = build_batches(args, rank, world)
    run_args = run_arguments(args, config, world)
    resume = resolve_resume_path(args.resume_from_checkpoint, Path(args.output_dir) / "checkpoints")
    return TrainingRun(
        args=args, accelerator=accelerator, logger=logger, config=config, model=model, discriminator=discriminator,
        plain_model=accelerator.unwrap_model(model), plain_disc=accelerator.unwrap_model(discriminator),
        loss_fn=loss_fn, opt_g=opt_g, opt_d=opt_d, sched_g=sched_g, sched_d=sched_d, ema=ema, batches=batches,
        run_args=run_args, resume=resume,
    )  # fmt: skip


def start_accelerator(args: argparse.Namespace):
    """The [`build_accelerator`] of the run and its logger; TF32 when asked; the output folder (main process)."""
    import logging

    from accelerate.logging import get_logger

    logger = get_logger("groupvq_hf.train", log_level="INFO")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    accelerator = build_accelerator(args)
    logger.info(accelerator.state)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    return accelerator, logger


def build_models(args: argparse.Namespace, config: GroupVQConfig, device):
    """``(model, discriminator, loss_fn)``: the [`GroupVQModel`] of ``config``, the PatchGAN discriminator and the
    [`build_loss_fn`] loss (LPIPS on ``device`` when ``--perceptual_weight`` > 0). With ``--torch_compile`` the
    encoder and decoder are compiled in place."""
    from .losses import PatchGANDiscriminator
    from .modeling_groupvq import GroupVQModel

    model = GroupVQModel(config)
    # A NaN/inf step is the NonFiniteGuard's to skip (and fp16's GradScaler's), on every rank alike: no ValueError
    # on one rank while the others wait in the all-reduce. The export turns the check back on.
    model.check_finite = False
    discriminator = PatchGANDiscriminator(config.out_channels, args.disc_channels, args.disc_layers)
    perceptual = None
    if args.perceptual_weight > 0:
        from .pretrained import lpips_network

        try:
            perceptual = lpips_network(args.lpips_weights).to(device)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err} Or train without the perceptual loss: --perceptual_weight 0.") from err
    loss_fn = build_loss_fn(args, perceptual)
    if args.torch_compile:
        # The adaptive GAN weight takes autograd.grad(..., retain_graph=True) through the decoder, which compiled
        # backwards with donated buffers refuse.
        torch._functorch.config.donated_buffer = False
        # Module.compile() compiles in place: parameter names (checkpoints, exports) carry no `_orig_mod.`, so a
        # compiled run's checkpoint resumes without --torch_compile and the other way round.
        model.encoder.compile()
        model.decoder.compile()
    return model, discriminator, loss_fn


def build_optimizers(args: argparse.Namespace, model, discriminator) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """The generator's [`build_generator_optimizer`] and the discriminator's Adam (``--disc_learning_rate``)."""
    opt_g = build_generator_optimizer(model, args)
    betas = (args.adam_beta1, args.adam_beta2)
    opt_d = torch.optim.Adam(
        discriminator.parameters(), lr=args.disc_learning_rate, betas=betas, weight_decay=args.adam_weight_decay
    )
    return opt_g, opt_d


def build_schedulers(args: argparse.Namespace, optimizers, world_size: int) -> list:
    """One diffusers ``--lr_scheduler`` per optimizer over ``--max_train_steps`` (counted in scheduler calls: a
    prepared scheduler steps once per process)."""
    from diffusers.optimization import get_scheduler

    return [
        get_scheduler(
            args.lr_scheduler,
            opt,
            num_warmup_steps=args.lr_warmup_steps * world_size,
            num_training_steps=args.max_train_steps * world_size,
        )
        for opt in optimizers
    ]


def build_batches(args: argparse.Namespace, rank: int, world_size: int) -> ResumableBatches:
    """This rank's batches: its own shard of one shuffled stream, read through a plain DataLoader (not prepared)."""
    from .data import build_image_dataset

    stream = build_image_dataset(
        args.dataset, args.dataset_split, args.resolution, train=True, image_column=args.image_column,
        seed=args.seed, rank=rank, world_size=world_size, max_samples=args.max_train_samples,
        shuffle_buffer_size=args.shuffle_buffer_size,
    )  # fmt: skip
    return ResumableBatches(stream, args.train_batch_size, args.dataloader_num_workers, args.seed, rank)


def resume_training(run: TrainingRun) -> LoopState:
    """The loop's starting state: step 0, or ``run.resume`` loaded (model, EMA, discriminator, optimizers,
    schedulers, RNG; this rank's step, image counts and data position) after checking its run arguments. Warns
    when a fresh run starts in a folder that holds checkpoints."""
    args, accelerator, logger = run.args, run.accelerator, run.logger
    state = LoopState(NonFiniteGuard(args.max_nonfinite_steps), NonFiniteGuard(args.max_nonfinite_steps))
    if run.resume is not None:
        saved = load_rank_state(run.resume, accelerator.process_index)  # first: a clear error for a foreign folder
        for warning in check_resume_arguments(run.resume, run.run_args, args.allow_resume_changes):
            logger.warning(warning)
        accelerator.load_state(str(run.resume))
        state.global_step, state.skipped_images = int(saved["global_step"]), int(saved.get("skipped_images", 0))
        state.converted_images = int(saved.get("converted_images", 0))
        run.batches.load_state_dict(saved["data"])
        if run.ema is not None:
            run.ema.to(accelerator.device)
        logger.info(f"Resumed from {run.resume} at step {state.global_step} (data position {saved['data']}).")
    elif args.resume_from_checkpoint:
        logger.info(f"No checkpoint in {run.checkpoint_dir}; starting from scratch.")
    if run.resume is None and list_checkpoints(run.checkpoint_dir, complete_only=False):
        found = ", ".join(p.name for p in list_checkpoints(run.checkpoint_dir, complete_only=False))
        logger.warning(
            f"{run.checkpoint_dir} already holds checkpoints of an earlier run ({found}) and this run starts from "
            "scratch: its checkpoints replace those of the same steps. To continue that run pass "
            "`--resume_from_checkpoint latest`; to keep the runs apart use another `--output_dir`."
        )
    return state


def load_validation_images(run: TrainingRun, step: int) -> None:
    """Main process: keep ``VALIDATION_LOG_FILE`` up to ``step``; load the held-out images for codebook usage
    (``run.usage_pixels``) and the first of them for the reconstruction grids (``run.eval_pixels``)."""
    args = run.args
    if not run.accelerator.is_main_process:
        return
    trim_validation_log(run.validation_log, step)
    pixels, split = validation_images(args, max(args.num_validation_images, args.num_validation_usage_images))
    run.eval_pixels = pixels[: args.num_validation_images].to(run.accelerator.device)
    if args.num_validation_usage_images:
        run.usage_pixels = pixels[: args.num_validation_usage_images]
        run.logger.info(
            f"Codebook usage is measured on {len(run.usage_pixels)} images of split {split!r} "
            f"({'held out' if split != args.dataset_split else 'the training split: the source has no other'})."
        )


def start_progress(run: TrainingRun, state: LoopState) -> None:
    """Start the trackers (main process), log what is trained on what, and open the progress bar."""
    from tqdm.auto import tqdm

    args, accelerator = run.args, run.accelerator
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config(args))
    trainable = sum(p.numel() for p in run.plain_model.parameters() if p.requires_grad)
    run.logger.info(
        f"Training {args.model_config} ({trainable:,} trainable parameters) on {args.dataset} at {args.resolution}px; "
        f"{run.images_per_step} images per step ({args.train_batch_size} x {accelerator.num_processes} processes x "
        f"{args.gradient_accumulation_steps} accumulation), up to {args.max_train_steps or 'unlimited'} steps"
        f"{'' if args.num_epochs is None else f' / {args.num_epochs} epochs'}."
    )
    state.progress = tqdm(
        total=args.max_train_steps,
        initial=state.global_step,
        desc="steps",
        disable=not accelerator.is_local_main_process,
    )


def training_batches(run: TrainingRun, state: LoopState):
    """The run's batches from its position; none once ``--max_train_steps`` is reached, and the end once any process
    starts epoch ``--num_epochs``. Counts each batch's skipped and converted images (and keys, when logged)."""
    args = run.args
    if args.max_train_steps is not None and state.global_step >= args.max_train_steps:
        return
    for batch in run.batches:
        if args.num_epochs is not None and _any_process(run.accelerator, run.batches.epoch >= args.num_epochs):
            return
        state.local_counts += torch.tensor([batch["num_skipped"], batch.get("num_converted", 0)])
        if args.log_example_keys:
            state.keys_seen.extend(batch["keys"])
        yield batch


def optimisation_step(run: TrainingRun, state: LoopState, batch: dict) -> tuple[dict, bool]:
    """One accumulation step on ``batch``: [`generator_step`], then [`discriminator_step`] once the GAN is active
    (``--disc_start``); the optimizers step when gradients sync. Returns the step's logged tensors and whether the
    generator's update was applied with finite gradients (the EMA follows only those)."""
    accelerator = run.accelerator
    pixels = batch["pixel_values"].to(accelerator.device, non_blocking=True)
    gan = run.loss_fn.discriminator_active(state.global_step)
    with accelerator.accumulate(run.model, run.discriminator):
        reconstruction, logs, g_ok = generator_step(run, state, pixels, gan)
        if gan:
            logs.update(discriminator_step(run, state, pixels, reconstruction))
    return logs, g_ok


def generator_step(run: TrainingRun, state: LoopState, pixels: torch.Tensor, gan: bool):
    """Generator loss (the quantizer counts this forward's code hits for the window usage), backward and, when
    gradients sync, clip, guard and step. Returns ``(reconstruction, logs, applied)``."""
    accelerator, plain_disc = run.accelerator, run.plain_disc
    # the discriminator is used frozen and outside DDP, so its gradients stay untouched
    plain_disc.requires_grad_(False)
    with accelerator.autocast():
        with run.plain_model.quantizer.counting_usage():
            out = run.model(pixels)
        g_loss, logs = run.loss_fn.generator_loss(
            pixels,
            out.reconstruction,
            out.commitment_loss,
            state.global_step,
            plain_disc if gan else None,
            run.plain_model.decoder.conv_out.weight,
        )
    plain_disc.requires_grad_(True)
    accelerator.backward(g_loss)
    applied = True
    if accelerator.sync_gradients:
        g_norm = accelerator.clip_grad_norm_(run.model.parameters(), run.clip)
        applied = state.guard_g.check(g_norm, state.global_step, "generator gradient")
        logs["grad_norm"] = g_norm.detach().float() if torch.is_tensor(g_norm) else torch.tensor(float(g_norm))
    if applied or run.scaled:  # under fp16 the GradScaler skips an overflowing step itself and lowers its scale
        run.opt_g.step()
        run.sched_g.step()
        applied = not (run.scaled and run.opt_g.step_was_skipped)
    run.opt_g.zero_grad(set_to_none=True)
    return out.reconstruction, logs, applied


def discriminator_step(run: TrainingRun, state: LoopState, pixels: torch.Tensor, reconstruction: torch.Tensor) -> dict:
    """Discriminator hinge loss on real ``pixels`` and the (detached) ``reconstruction``, backward and, when
    gradients sync, clip, guard and step. Returns its logs."""
    accelerator = run.accelerator
    with accelerator.autocast():
        d_loss, d_logs = run.loss_fn.discriminator_loss(run.discriminator, pixels, reconstruction)
    accelerator.backward(d_loss)
    applied = True
    if accelerator.sync_gradients:
        d_norm = accelerator.clip_grad_norm_(run.discriminator.parameters(), run.clip)
        applied = state.guard_d.check(d_norm, state.global_step, "discriminator gradient")
    if applied or run.scaled:
        run.opt_d.step()
        run.sched_d.step()
    run.opt_d.zero_grad(set_to_none=True)
    return d_logs


def end_optimizer_step(run: TrainingRun, state: LoopState, applied: bool) -> None:
    """After an optimizer step: the EMA follows an applied generator update; the step counter advances."""
    if run.ema is not None and applied:
        run.ema.step(run.plain_model.parameters())
    state.global_step += 1
    state.progress.update(1)


def window_statistics(run: TrainingRun, state: LoopState) -> dict:
    """The tracker entries since the last log, and the window reset (a collective: every rank calls it).

    ``train/<term>``: each logged term's mean over the window's accumulation steps and the processes;
    ``train/window_codebook_usage`` and ``train/window_group_usage/group_<j>``: usage of the codes the training
    batches hit since the last log, summed over processes (not held-out usage); the learning rate, throughput,
    image counts, epoch and non-finite steps.
    """
    accelerator, args, quantizer = run.accelerator, run.args, run.plain_model.quantizer
    sums, counts = state.loss_sums, state.loss_counts
    means = accelerator.reduce(torch.stack([sums[k].to(accelerator.device) / counts[k] for k in sums]), "mean")
    stats = {f"train/{k}": float(v) for k, v in zip(sums, means)}
    state.sum_image_counts(accelerator)
    window = quantizer.usage_statistics(sync=True)
    usage, groups = window["codebook_usage"], window["group_usage"]
    quantizer.reset_usage()
    elapsed = time.perf_counter() - state.t_log
    stats.update(
        {
            "train/lr": run.sched_g.get_last_lr()[0],
            "train/window_codebook_usage": usage,
            "train/samples_per_second": run.images_per_step * args.logging_steps / max(elapsed, 1e-9),
            "data/skipped_images": state.skipped_images,
            "data/converted_images": state.converted_images,
            "data/epoch": run.batches.epoch,
            "train/nonfinite_steps": state.guard_g.total + state.guard_d.total,
        }
    )
    stats.update({f"train/window_group_usage/group_{j:03d}": u for j, u in enumerate(groups)})
    sums.clear()
    counts.clear()
    return stats


def log_window(run: TrainingRun, state: LoopState) -> dict:
    """Log [`window_statistics`] to the trackers and the progress bar (every rank calls it); returns them."""
    stats = window_statistics(run, state)
    run.accelerator.log(stats, step=state.global_step)
    state.postfix.update(
        loss=f"{stats.get('train/loss', float('nan')):.4f}", window_usage=f"{stats['train/window_codebook_usage']:.2f}"
    )
    state.progress.set_postfix(state.postfix)
    state.t_log = time.perf_counter()
    return stats


def save_training_checkpoint(run: TrainingRun, state: LoopState) -> Path:
    """[`save_checkpoint`] of the run at its step, with this rank's step, data position and image counts (every
    rank calls it)."""
    state.sum_image_counts(run.accelerator)
    rank_state = {
        "global_step": state.global_step, "data": run.batches.state_dict(), "skipped_images": state.skipped_images,
        "converted_images": state.converted_images,
        "world_size": run.accelerator.num_processes,
    }  # fmt: skip
    path = save_checkpoint(
        run.accelerator, run.checkpoint_dir, state.global_step, rank_state, run.args.checkpoints_total_limit,
        run.run_args,
    )  # fmt: skip
    run.logger.info(f"Saved checkpoint {path}")
    return path


def validate(run: TrainingRun, state: LoopState) -> dict | None:
    """Main process: the EMA model's reconstruction grid to the trackers and, with usage images, its held-out
    [`validation_usage`] to the trackers, ``VALIDATION_LOG_FILE`` and the progress bar (returned)."""
    ema_model = export_model(run.plain_model, run.ema)
    log_reconstructions(run.accelerator, ema_model, run.eval_pixels, state.global_step)
    val_usage = None
    if run.usage_pixels is not None:
        val_usage = validation_usage(ema_model, run.usage_pixels, run.args.train_batch_size)
        run.accelerator.log(usage_stats(val_usage), step=state.global_step)
        append_validation_log(run.validation_log, state.global_step, val_usage)
        state.postfix["val_usage"] = f"{val_usage['codebook_usage']:.2f}"
        state.progress.set_postfix(state.postfix)
    del ema_model
    return val_usage


def finish_training(run: TrainingRun, state: LoopState) -> dict:
    """The end: replicas must agree (RuntimeError otherwise); example keys when logged; the main process exports the
    EMA weights and a reconstruction grid ([`export_final_model`]). Returns the run's counters and paths."""
    accelerator, args = run.accelerator, run.args
    accelerator.wait_for_everyone()
    digest = weights_digest(run.plain_model)
    digests = _gather_strings(accelerator, digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"Model replicas diverged across processes: {digests}")
    run.logger.info(f"Weights in sync across {accelerator.num_processes} processes (sha256 {digest[:16]}).")
    state.sum_image_counts(accelerator)
    if args.log_example_keys:
        keys_dir = run.output_dir / "example_keys"
        keys_dir.mkdir(parents=True, exist_ok=True)
        record = {"keys": state.keys_seen, "weights_sha256": digest}
        (keys_dir / f"rank{accelerator.process_index}.json").write_text(json.dumps(record))
    result = {
        "global_step": state.global_step, "skipped_images": state.skipped_images,
        "converted_images": state.converted_images, "weights_sha256": digest,
        "resumed_from": None if run.resume is None else str(run.resume), "learning_rate": run.sched_g.get_last_lr()[0],
    }  # fmt: skip
    if accelerator.is_main_process:
        result.update(export_final_model(run, state))
        # Printed also without trackers (--report_to none): every process has the totals.
        print(
            f"Training images skipped (undecodable or too small): {state.skipped_images}; converted to RGB: "
            f"{state.converted_images}."
        )
    accelerator.end_training()
    return result


def export_final_model(run: TrainingRun, state: LoopState) -> dict:
    """Main process: [`save_export`] of the EMA model to ``<output_dir>/model``, its reconstruction grid
    (``reconstructions.png`` and the trackers) and its held-out usage. Returns ``model_dir``, ``grid_path`` and,
    with usage images, ``validation_codebook_usage`` and ``validation_group_usage``."""
    final = export_model(run.plain_model, run.ema)
    model_dir = save_export(final, run.output_dir / "model", run.run_args)
    grid_path = run.output_dir / "reconstructions.png"
    grid = reconstruction_grid(run.eval_pixels, reconstruct(final, run.eval_pixels))
    grid.save(grid_path)
    log_reconstructions(run.accelerator, final, run.eval_pixels, state.global_step, grid)
    print(f"Model saved to {model_dir.resolve()} (training arguments in {RUN_ARGS_FILE})")
    print(f"Reconstruction grid (top: originals, bottom: reconstructions) saved to {grid_path.resolve()}")
    result = {}
    if run.usage_pixels is not None:
        val_usage = validation_usage(final, run.usage_pixels, run.args.train_batch_size)
        run.accelerator.log(usage_stats(val_usage), step=state.global_step)
        groups = val_usage["group_usage"]
        print(
            f"Codebook usage of the EMA model on {val_usage['num_images']} held-out images: "
            f"{val_usage['codebook_usage']:.3f} (per group: min {min(groups):.3f}, max {max(groups):.3f})"
        )
        result.update(validation_codebook_usage=val_usage["codebook_usage"], validation_group_usage=groups)
    result.update(model_dir=str(model_dir), grid_path=str(grid_path))
    return result


def train(args: argparse.Namespace) -> dict:
    """Run training as described by ``args``; returns paths and counters (main process: model and grid paths).

    Build ([`setup_training`]), resume ([`resume_training`]), then per batch one [`optimisation_step`] and, after
    each optimizer step, the log, checkpoint and validation steps their ``--*_steps`` ask for; the end checks the
    replicas and exports ([`finish_training`]).
    """
    run = setup_training(args)
    state = resume_training(run)
    load_validation_images(run, state.global_step)
    start_progress(run, state)
    run.model.train()
    run.discriminator.train()
    for batch in training_batches(run, state):
        logs, applied = optimisation_step(run, state, batch)
        state.add_logs(logs)
        if not run.accelerator.sync_gradients:
            continue  # accumulating: no optimizer step yet
        end_optimizer_step(run, state, applied)
        step = state.global_step
        if step % args.logging_steps == 0:
            log_window(run, state)  # a collective: every rank logs
        if args.checkpointing_steps and step % args.checkpointing_steps == 0:
            save_training_checkpoint(run, state)
        if run.accelerator.is_main_process and args.validation_steps and step % args.validation_steps == 0:
            validate(run, state)
        if args.max_train_steps is not None and step >= args.max_train_steps:
            break
    state.progress.close()
    return finish_training(run, state)


def _add_counts(accelerator, local_counts: torch.Tensor, skipped: int, converted: int) -> tuple[int, int]:
    """Add the image counts of every process since the last call (a collective: all ranks call it) and zero them."""
    total = local_counts.to(accelerator.device, copy=True)
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total, "sum")
    local_counts.zero_()
    return skipped + int(total[0]), converted + int(total[1])


def _any_process(accelerator, flag: bool) -> bool:
    value = torch.tensor(float(flag), device=accelerator.device)
    return bool(accelerator.reduce(value, "sum") > 0) if accelerator.num_processes > 1 else bool(flag)


def _gather_strings(accelerator, text: str) -> list[str]:
    if accelerator.num_processes == 1:
        return [text]
    from accelerate.utils import gather_object

    return list(gather_object([text]))


def export_model(plain_model, ema):
    """A copy of the model holding the EMA weights (or the raw weights without EMA), on the model's device."""
    final = copy.deepcopy(plain_model)
    if hasattr(final.encoder, "_orig_mod"):
        final.encoder = final.encoder._orig_mod
    if hasattr(final.decoder, "_orig_mod"):
        final.decoder = final.decoder._orig_mod
    if ema is not None:
        ema.copy_to(final.parameters())
    final.quantizer.reset_usage()
    final.check_finite = True
    return final.eval()


def validation_images(args: argparse.Namespace, num_images: int) -> tuple[torch.Tensor, str]:
    """The first ``num_images`` center crops of ``--validation_split`` (CPU), and the split they came from: the
    training split only when the source has no validation split (then they are not held out)."""
    from .data import build_image_dataset, collate_pixels

    kwargs = dict(resolution=args.resolution, train=False, image_column=args.image_column, max_samples=num_images)
    error = None
    for split in (args.validation_split, args.dataset_split):
        try:
            stream = build_image_dataset(args.dataset, split, **kwargs)
            examples = list(stream)
        except Exception as err:  # no such split in this source (the error type depends on the source's format)
            examples, error = [], err
            continue
        examples = [example for example in examples if example.get("pixel_values") is not None]  # no bad images
        if examples:
            # a local source with a single split reads it for any split (with a note): that is the training split
            return collate_pixels(examples), (args.dataset_split if getattr(stream, "notes", None) else split)
    raise ValueError(
        f"`--dataset` {args.dataset!r} yielded no validation image (split {args.validation_split!r})."
    ) from error


@torch.no_grad()
def validation_usage(model, pixels: torch.Tensor, batch_size: int) -> dict:
    """Codebook usage (overall and per group) of ``model`` on ``pixels``, counted in this process only.

    ``analysis.count_code_usage`` encodes in eval mode (the quantizer's own counters untouched, the mode restored)
    and ``usage_statistics`` reads the counts: no collective, safe on the main process of a distributed run.
    Returns ``codebook_usage``, ``group_usage`` and ``num_images``.
    """
    from .analysis import count_code_usage
    from .quantizer import usage_statistics

    counts, num_images = count_code_usage(model, pixels.split(batch_size))
    stats = usage_statistics(counts, model.quantizer.group_sizes)
    return {"codebook_usage": stats["codebook_usage"], "group_usage": stats["group_usage"], "num_images": num_images}


def build_generator_optimizer(model, args: argparse.Namespace) -> torch.optim.Adam:
    """Adam over the model: encoder, decoder and convs at ``--learning_rate`` (group 0), the quantizer's projectors
    W_j, b_j at ``--quantizer_learning_rate`` (group 1; the cores are frozen buffers)."""
    quantizer_params = list(model.quantizer.parameters())
    quantizer_ids = {id(param) for param in quantizer_params}
    groups = [
        {"params": [param for param in model.parameters() if id(param) not in quantizer_ids]},
        {"params": quantizer_params, "lr": args.quantizer_learning_rate},
    ]
    betas = (args.adam_beta1, args.adam_beta2)
    return torch.optim.Adam(groups, lr=args.learning_rate, betas=betas, weight_decay=args.adam_weight_decay)


def trim_validation_log(path: Path, step: int) -> None:
    """Keep the entries of ``VALIDATION_LOG_FILE`` up to ``step`` (all of a resumed run's, none of a fresh one's)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def append_validation_log(path: Path, step: int, usage: dict) -> None:
    """One JSON line per validation step: the EMA model's held-out usage (overall and per group)."""
    record = {"step": step, "codebook_usage": usage["codebook_usage"], "group_usage": usage["group_usage"]}
    with open(path, "a") as log:
        log.write(json.dumps(record) + "\n")


def usage_stats(usage: dict) -> dict:
    """Tracker entries of [`validation_usage`]: ``val/codebook_usage`` and ``val/group_usage/group_<j>``."""
    stats = {"val/codebook_usage": usage["codebook_usage"]}
    stats.update({f"val/group_usage/group_{j:03d}": u for j, u in enumerate(usage["group_usage"])})
    return stats


def log_reconstructions(accelerator, model, pixels, step: int, grid=None) -> None:
    if grid is None:
        grid = reconstruction_grid(pixels, reconstruct(model, pixels))
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"reconstructions": np.asarray(grid)[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({"reconstructions": [grid]}, step=step)


def main(argv: list[str] | None = None) -> dict:
    return train(parse_args(argv))


__all__ = [
    "KNOWN_DATASET_SIZES",
    "LoopState",
    "NonFiniteGuard",
    "ResumableBatches",
    "TrainingRun",
    "build_ema",
    "build_generator_optimizer",
    "build_loss_fn",
    "build_parser",
    "check_resume_arguments",
    "dataset_num_examples",
    "describe_recipe",
    "discriminator_step",
    "export_model",
    "finish_training",
    "generator_step",
    "is_complete_checkpoint",
    "list_checkpoints",
    "log_window",
    "main",
    "optimisation_step",
    "parse_args",
    "resolve_model_config",
    "resolve_resume_path",
    "resume_training",
    "rotate_checkpoints",
    "run_argument_differences",
    "run_arguments",
    "save_checkpoint",
    "save_export",
    "save_training_checkpoint",
    "setup_training",
    "steps_per_epoch",
    "train",
    "validate",
    "validation_images",
    "validation_usage",
    "weights_digest",
    "window_statistics",
]
