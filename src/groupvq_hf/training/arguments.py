"""The command line of ``scripts/train.py``: its argument groups, the demo's CPU-scale recipe, the model config
it resolves to and the schedule's length in steps."""

from __future__ import annotations

import argparse
import os

from ..configuration_groupvq import PRESETS, GroupVQConfig
from ..data.sizing import dataset_num_examples, dataset_num_shards
from ..data.stream import ResumableBatches  # noqa: F401  (re-exported: moved next to the data code)
from .checkpoints import RESUME_CHANGES_ALWAYS_ALLOWED
from .finetune import add_init_arguments, check_init_arguments

DEFAULT_DEMO_STEPS = 300
DEFAULT_EMA_DECAY = 0.999  # SimVQ's, fixed from the first step
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
    """The command line of ``scripts/train.py``, in five groups: data, model and loss, optimisation, checkpoints
    and logging, fine-tuning from trained weights."""
    p = argparse.ArgumentParser(description="Train a Group-VQ tokenizer (VQGAN recipe of the paper) with accelerate.")
    _add_data_arguments(p.add_argument_group("data"))
    _add_model_arguments(p.add_argument_group("model and loss"))
    _add_optimisation_arguments(p.add_argument_group("optimisation"))
    _add_checkpoint_arguments(p.add_argument_group("checkpoints and logging"))
    add_init_arguments(p.add_argument_group("fine-tuning from trained weights"))
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
    g.add_argument(
        "--full_decode",
        action="store_true",
        help="decode training JPEGs in full (default: at the largest DCT scale that still holds every pixel of the "
        "crop, groupvq_hf.data.decode_image); validation images are always decoded in full",
    )


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
    g.add_argument(
        "--disc_layers", type=int, default=None, help="default: 3, or the saved discriminator's (--init_from)"
    )
    g.add_argument(
        "--disc_channels", type=int, default=None, help="default: 64, or the saved discriminator's (--init_from)"
    )
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
    g.add_argument(
        "--ema_decay", type=float, default=None, help="EMA decay, fixed from the first step (SimVQ); default 0.999"
    )
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
    for name in ("shuffle_buffer_size", "max_nonfinite_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name}` must be >= 1, got {getattr(args, name)}.")
    for name in (
        "perceptual_weight", "disc_weight", "commitment_weight", "max_grad_norm", "learning_rate", "disc_learning_rate",
        "adam_weight_decay",
    ):  # fmt: skip
        value = getattr(args, name)
        if value is not None and not value >= 0:  # NaN fails too
            raise ValueError(f"`--{name}` must be >= 0, got {value}.")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise ValueError(f"`--{name}` must be in [0, 1), got {getattr(args, name)}.")
    check_schedule(args.lr_scheduler, args.lr_warmup_steps)
    if args.no_ema:  # demo's recipe fills --ema_warmup below: only what the user gave is a contradiction
        given = [name for name in ("ema_decay", "ema_warmup") if getattr(args, name) is not None]
        if given:
            raise ValueError(f"`--{given[0]}` sets the EMA, which `--no_ema` turns off: give one or the other.")
    if args.ema_decay is None:
        args.ema_decay = DEFAULT_EMA_DECAY
    if not 0.0 <= args.ema_decay < 1.0:
        raise ValueError(f"`--ema_decay` must be in [0, 1), got {args.ema_decay}.")
    if args.max_train_steps is None and args.num_epochs is None:
        if args.dataset != "demo":
            raise ValueError("Give `--max_train_steps` or `--num_epochs`.")
        args.max_train_steps = DEFAULT_DEMO_STEPS
    check_init_arguments(args)
    if args.model_config is None and args.init_from is None:  # with --init_from the loaded model's config is used
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


def check_schedule(name: str, warmup_steps: int) -> None:
    """ValueError unless ``--lr_scheduler`` is a diffusers schedule this script can build (``piecewise_constant``
    needs step rules it has no flag for), and ``--lr_warmup_steps`` is 0 for a schedule without warm-up
    (diffusers' ``constant`` ignores it: use ``constant_with_warmup``)."""
    from diffusers.optimization import SchedulerType

    names = [kind.value for kind in SchedulerType if kind != SchedulerType.PIECEWISE_CONSTANT]
    if name not in names:
        raise ValueError(f"`--lr_scheduler` must be one of {', '.join(names)}; got {name!r}.")
    if name == "constant" and warmup_steps:
        raise ValueError(
            f"`--lr_warmup_steps` {warmup_steps} has no effect with `--lr_scheduler constant`; use "
            "`--lr_scheduler constant_with_warmup` for a constant rate after a warm-up."
        )


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
    check_resolution(config, resolution)
    config.sample_size = resolution
    return config


def check_resolution(config: GroupVQConfig, resolution: int) -> None:
    """ValueError unless ``--resolution`` is divisible by the model's downsampling factor."""
    if resolution % config.downsample_factor:
        raise ValueError(
            f"`--resolution` {resolution} must be divisible by the model's downsampling factor {config.downsample_factor}."
        )


def steps_per_epoch(args: argparse.Namespace, world_size: int) -> int:
    """Optimizer steps in one epoch: each loader worker of a process that gets shards (``datasets`` deals a
    process's shards to its workers) reads its share of the process's rows (an even split), capped by
    ``--max_train_samples``, and drops its last partial batch; the batches of all workers // accumulation. Exact
    when the shares are even; unequal shards make it an estimate, off by less than one batch per worker.
    ValueError when the size is unknown or too small."""
    size = dataset_num_examples(args.dataset, args.dataset_split)
    if size is None:
        raise ValueError(
            f"`--num_epochs` needs the number of images in `--dataset` {args.dataset!r} (split "
            f"{args.dataset_split!r}) to decay the learning-rate schedule over the run, and it is not known without "
            "reading the whole stream; give `--max_train_steps` instead (or as well)."
        )
    per_process, workers = size // world_size, max(1, args.dataloader_num_workers)
    shards = dataset_num_shards(args.dataset, args.dataset_split, args.image_column) if workers > 1 else None
    if shards is not None:  # split_dataset_by_node deals whole shards to processes only when they divide evenly
        workers = min(workers, shards // world_size if shards % world_size == 0 else shards)
    shares = [per_process // workers + (worker < per_process % workers) for worker in range(workers)]
    if args.max_train_samples is not None:
        shares = [min(share, args.max_train_samples) for share in shares]
    steps = sum(share // args.train_batch_size for share in shares) // args.gradient_accumulation_steps
    if steps < 1:
        raise ValueError(
            f"`--dataset` {args.dataset!r} has {size} images in split {args.dataset_split!r}: less than one step of "
            f"`--train_batch_size` {args.train_batch_size} x {world_size} processes x "
            f"`--gradient_accumulation_steps` {args.gradient_accumulation_steps} per epoch."
        )
    return steps


__all__ = [
    "DEFAULT_DEMO_STEPS",
    "DEFAULT_EMA_DECAY",
    "DEMO_RECIPE",
    "build_parser",
    "parse_args",
    "check_resolution",
    "check_schedule",
    "resolve_model_config",
    "steps_per_epoch",
]
