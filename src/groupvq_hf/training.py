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
import hashlib
import json
import os
import re
import shutil
import time
from collections import Counter
from pathlib import Path

import torch

from .configuration_groupvq import PRESETS, GroupVQConfig
from .stream import ResumableBatches  # noqa: F401  (re-exported: moved next to the data code)

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "training_state_rank{rank}.json"
DEFAULT_DEMO_STEPS = 300


# ---------------------------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a Group-VQ tokenizer (VQGAN recipe of the paper) with accelerate.")
    g = p.add_argument_group("data")
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
    g = p.add_argument_group("model and loss")
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
    g.add_argument("--disc_weight", type=float, default=0.8)
    g.add_argument("--disc_start", type=int, default=0, help="step at which the discriminator and the GAN loss start")
    g.add_argument("--disc_layers", type=int, default=3)
    g.add_argument("--disc_channels", type=int, default=64)
    g.add_argument("--commitment_weight", type=float, default=1.0)
    g = p.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=32, help="per process")
    g.add_argument("--max_train_steps", type=int, default=None)
    g.add_argument(
        "--num_epochs",
        type=int,
        default=None,
        help="stop once a process starts epoch num_epochs (when no --max_train_steps)",
    )
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--learning_rate", type=float, default=1e-4)
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
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--ema_decay", type=float, default=0.999)
    g.add_argument("--no_ema", action="store_true", help="export the raw weights instead of the EMA")
    g.add_argument("--max_nonfinite_steps", type=int, default=20, help="consecutive NaN/inf steps before the run stops")
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--torch_compile", action="store_true", help="torch.compile the encoder and decoder")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--output_dir", default="outputs/groupvq")
    g.add_argument("--checkpointing_steps", type=int, default=5000)
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    g.add_argument("--report_to", default="tensorboard", help="tensorboard | wandb | all | none")
    g.add_argument("--tracker_project_name", default="groupvq")
    g.add_argument("--logging_steps", type=int, default=50)
    g.add_argument(
        "--validation_steps", type=int, default=1000, help="reconstruction grid every N steps (0: only at the end)"
    )
    g.add_argument("--num_validation_images", type=int, default=8)
    g.add_argument(
        "--log_example_keys",
        action="store_true",
        help="write each process's example keys and weight hash to <output_dir>/example_keys/",
    )
    return p


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
    for name in ("checkpointing_steps", "validation_steps", "dataloader_num_workers", "disc_start", "lr_warmup_steps"):
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
    if args.disc_learning_rate is None:
        args.disc_learning_rate = args.learning_rate
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


# ---------------------------------------------------------------------------------------------------- checkpoints
def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """Finished checkpoints (``checkpoint-<step>``) in ``checkpoint_dir``, oldest step first."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
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
    """``"latest"`` -> newest checkpoint in ``checkpoint_dir`` (None when there is none); a path must exist."""
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
    return path


def save_checkpoint(accelerator, checkpoint_dir: Path, step: int, rank_state: dict, total_limit: int | None) -> Path:
    """``accelerator.save_state`` into a temporary folder, then an atomic rename to ``checkpoint-<step>``.

    Every process writes its RNG state and ``training_state_rank<r>.json`` (step, data position). Old checkpoints
    are rotated to ``total_limit`` after the new one is complete. Needs a file system shared by all processes.
    """
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
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
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
    """Reconstruction of ``pixels`` without touching the quantizer's usage counts."""
    quantizer = model.quantizer
    track, quantizer.track_usage = quantizer.track_usage, False
    was_training = model.training
    model.eval()
    try:
        return model(pixels).reconstruction
    finally:
        quantizer.track_usage = track
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


def tracker_config(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}


# ---------------------------------------------------------------------------------------------------- training
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


def train(args: argparse.Namespace) -> dict:
    """Run training as described by ``args``; returns paths and counters (main process: model and grid paths)."""
    from accelerate.logging import get_logger
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from .data import build_image_dataset
    from .losses import PatchGANDiscriminator, VQGANLoss
    from .modeling_groupvq import GroupVQModel

    logger = get_logger("groupvq_hf.train", log_level="INFO")
    import logging

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    accelerator = build_accelerator(args)
    logger.info(accelerator.state)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    output_dir, checkpoint_dir = Path(args.output_dir), Path(args.output_dir) / "checkpoints"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    rank, world = accelerator.process_index, accelerator.num_processes

    # ---- models, loss, optimisers (same seed on every rank: identical initial weights)
    set_seed(args.seed)
    config = resolve_model_config(args.model_config, args.resolution)
    model = GroupVQModel(config)
    discriminator = PatchGANDiscriminator(config.out_channels, args.disc_channels, args.disc_layers)
    perceptual = None
    if args.perceptual_weight > 0:
        from .pretrained import lpips_network

        try:
            perceptual = lpips_network(args.lpips_weights).to(accelerator.device)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err} Or train without the perceptual loss: --perceptual_weight 0.") from err
    loss_fn = VQGANLoss(perceptual, args.perceptual_weight, args.disc_weight, args.disc_start, args.commitment_weight)
    if args.torch_compile:
        # The adaptive GAN weight takes autograd.grad(..., retain_graph=True) through the decoder, which compiled
        # backwards with donated buffers refuse.
        torch._functorch.config.donated_buffer = False
        model.encoder = torch.compile(model.encoder)
        model.decoder = torch.compile(model.decoder)
    betas = (args.adam_beta1, args.adam_beta2)
    opt_g = torch.optim.Adam(
        model.parameters(), lr=args.learning_rate, betas=betas, weight_decay=args.adam_weight_decay
    )
    opt_d = torch.optim.Adam(
        discriminator.parameters(), lr=args.disc_learning_rate, betas=betas, weight_decay=args.adam_weight_decay
    )
    total_steps = args.max_train_steps or 10**9
    sched_g, sched_d = (
        get_scheduler(
            args.lr_scheduler,
            opt,
            num_warmup_steps=args.lr_warmup_steps * world,
            num_training_steps=total_steps * world,
        )
        for opt in (opt_g, opt_d)
    )
    ema = None if args.no_ema else EMAModel(model.parameters(), decay=args.ema_decay)
    model, discriminator, opt_g, opt_d, sched_g, sched_d = accelerator.prepare(
        model, discriminator, opt_g, opt_d, sched_g, sched_d
    )
    plain_model, plain_disc = accelerator.unwrap_model(model), accelerator.unwrap_model(discriminator)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    last_layer = plain_model.decoder.conv_out.weight

    # ---- data: each rank its own shard of one shuffled stream, a plain DataLoader (not prepared)
    stream = build_image_dataset(
        args.dataset, args.dataset_split, args.resolution, train=True, image_column=args.image_column,
        seed=args.seed, rank=rank, world_size=world, max_samples=args.max_train_samples,
        shuffle_buffer_size=args.shuffle_buffer_size,
    )  # fmt: skip
    batches = ResumableBatches(stream, args.train_batch_size, args.dataloader_num_workers, args.seed, rank)
    global_step, skipped_images = 0, 0

    resume = resolve_resume_path(args.resume_from_checkpoint, checkpoint_dir)
    if resume is not None:
        state = load_rank_state(resume, rank)  # first: a clear error for a folder that is no checkpoint of ours
        accelerator.load_state(str(resume))
        global_step, skipped_images = int(state["global_step"]), int(state.get("skipped_images", 0))
        batches.load_state_dict(state["data"])
        if ema is not None:
            ema.to(accelerator.device)
        logger.info(f"Resumed from {resume} at step {global_step} (data position {state['data']}).")
    elif args.resume_from_checkpoint:
        logger.info(f"No checkpoint in {checkpoint_dir}; starting from scratch.")

    # A fixed batch for the reconstruction grids (main process only).
    eval_pixels = None
    if accelerator.is_main_process:
        eval_pixels = fixed_eval_batch(args).to(accelerator.device)

    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config(args))
    samples_per_step = args.train_batch_size * world * args.gradient_accumulation_steps
    logger.info(
        f"Training {args.model_config} ({sum(p.numel() for p in plain_model.parameters() if p.requires_grad):,} "
        f"trainable parameters) on {args.dataset} at {args.resolution}px; {samples_per_step} images per step "
        f"({args.train_batch_size} x {world} processes x {args.gradient_accumulation_steps} accumulation), "
        f"up to {args.max_train_steps or 'unlimited'} steps{'' if args.num_epochs is None else f' / {args.num_epochs} epochs'}."
    )
    progress = tqdm(
        total=args.max_train_steps, initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
    )
    guard_g, guard_d = NonFiniteGuard(args.max_nonfinite_steps), NonFiniteGuard(args.max_nonfinite_steps)
    scaled = accelerator.scaler is not None  # fp16 loss scaling
    sums: dict[str, torch.Tensor] = {}
    counts: Counter = Counter()
    local_skipped, t_log = 0, time.perf_counter()
    keys_seen: list[str] = []
    clip = args.max_grad_norm if args.max_grad_norm > 0 else float("inf")
    model.train()
    discriminator.train()

    done = args.max_train_steps is not None and global_step >= args.max_train_steps
    for batch in iter(batches) if not done else iter(()):
        if args.num_epochs is not None and _any_process(accelerator, batches.epoch >= args.num_epochs):
            break
        pixels = batch["pixel_values"].to(accelerator.device, non_blocking=True)
        local_skipped += batch["num_skipped"]
        if args.log_example_keys:
            keys_seen.extend(batch["keys"])
        gan = loss_fn.discriminator_active(global_step)
        with accelerator.accumulate(model, discriminator):
            # generator: the discriminator is used frozen and outside DDP, so its gradients stay untouched
            plain_disc.requires_grad_(False)
            with accelerator.autocast():
                out = model(pixels)
                g_loss, logs = loss_fn.generator_loss(
                    pixels,
                    out.reconstruction,
                    out.commitment_loss,
                    global_step,
                    plain_disc if gan else None,
                    last_layer,
                )
            plain_disc.requires_grad_(True)
            accelerator.backward(g_loss)
            g_ok = True
            if accelerator.sync_gradients:
                g_norm = accelerator.clip_grad_norm_(model.parameters(), clip)
                g_ok = guard_g.check(g_norm, global_step, "generator gradient")
                logs["grad_norm"] = g_norm.detach().float() if torch.is_tensor(g_norm) else torch.tensor(float(g_norm))
            if g_ok or scaled:  # under fp16 the GradScaler skips an overflowing step itself and lowers its scale
                opt_g.step()
                sched_g.step()
                g_ok = not (scaled and opt_g.step_was_skipped)
            opt_g.zero_grad(set_to_none=True)
            if gan:
                with accelerator.autocast():
                    d_loss, d_logs = loss_fn.discriminator_loss(discriminator, pixels, out.reconstruction)
                logs.update(d_logs)
                accelerator.backward(d_loss)
                d_ok = True
                if accelerator.sync_gradients:
                    d_ok = guard_d.check(
                        accelerator.clip_grad_norm_(discriminator.parameters(), clip),
                        global_step,
                        "discriminator gradient",
                    )
                if d_ok or scaled:
                    opt_d.step()
                    sched_d.step()
                opt_d.zero_grad(set_to_none=True)
        for key, value in logs.items():
            sums[key] = sums.get(key, 0.0) + value.detach().float()
            counts[key] += 1
        if not accelerator.sync_gradients:
            continue

        if ema is not None and g_ok:
            ema.step(plain_model.parameters())
        global_step += 1
        progress.update(1)
        if global_step % args.logging_steps == 0:
            means = accelerator.reduce(torch.stack([sums[k].to(accelerator.device) / counts[k] for k in sums]), "mean")
            stats = {f"train/{k}": float(v) for k, v in zip(sums, means)}
            skipped_images += int(accelerator.reduce(torch.tensor(local_skipped, device=accelerator.device), "sum"))
            usage = plain_model.quantizer.codebook_usage()  # all-reduced over processes: called on every rank
            groups = plain_model.quantizer.group_usage()
            plain_model.quantizer.reset_usage()
            elapsed = time.perf_counter() - t_log
            stats.update(
                {
                    "train/lr": sched_g.get_last_lr()[0],
                    "train/codebook_usage": usage,
                    "train/samples_per_second": samples_per_step * args.logging_steps / max(elapsed, 1e-9),
                    "data/skipped_images": skipped_images,
                    "data/epoch": batches.epoch,
                    "train/nonfinite_steps": guard_g.total + guard_d.total,
                }
            )
            stats.update({f"codebook_usage/group_{j:03d}": u for j, u in enumerate(groups)})
            accelerator.log(stats, step=global_step)
            progress.set_postfix(loss=f"{stats.get('train/loss', float('nan')):.4f}", usage=f"{usage:.2f}")
            sums.clear()
            counts.clear()
            local_skipped, t_log = 0, time.perf_counter()
        if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
            rank_state = {
                "global_step": global_step, "data": batches.state_dict(), "skipped_images": skipped_images,
                "world_size": world,
            }  # fmt: skip
            path = save_checkpoint(accelerator, checkpoint_dir, global_step, rank_state, args.checkpoints_total_limit)
            logger.info(f"Saved checkpoint {path}")
        if accelerator.is_main_process and args.validation_steps and global_step % args.validation_steps == 0:
            log_reconstructions(accelerator, export_model(plain_model, ema), eval_pixels, global_step)
        if args.max_train_steps is not None and global_step >= args.max_train_steps:
            break
    progress.close()

    # ---- end: replicas must agree; export the EMA weights and a reconstruction grid
    accelerator.wait_for_everyone()
    digest = weights_digest(plain_model)
    digests = _gather_strings(accelerator, digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"Model replicas diverged across processes: {digests}")
    logger.info(f"Weights in sync across {world} processes (sha256 {digest[:16]}).")
    if args.log_example_keys:
        keys_dir = output_dir / "example_keys"
        keys_dir.mkdir(parents=True, exist_ok=True)
        (keys_dir / f"rank{rank}.json").write_text(json.dumps({"keys": keys_seen, "weights_sha256": digest}))
    result = {
        "global_step": global_step, "skipped_images": skipped_images, "weights_sha256": digest,
        "resumed_from": None if resume is None else str(resume),
    }  # fmt: skip
    if accelerator.is_main_process:
        final = export_model(plain_model, ema)
        model_dir = output_dir / "model"
        final.save_pretrained(model_dir)
        grid_path = output_dir / "reconstructions.png"
        grid = reconstruction_grid(eval_pixels, reconstruct(final, eval_pixels))
        grid.save(grid_path)
        log_reconstructions(accelerator, final, eval_pixels, global_step, grid)
        print(f"Model saved to {model_dir.resolve()}")
        print(f"Reconstruction grid (top: originals, bottom: reconstructions) saved to {grid_path.resolve()}")
        result.update(model_dir=str(model_dir), grid_path=str(grid_path))
    accelerator.end_training()
    return result


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
    return final.eval()


def fixed_eval_batch(args: argparse.Namespace) -> torch.Tensor:
    """``--num_validation_images`` center-cropped images of the validation split (train split when it has none)."""
    from .data import build_image_dataset, collate_pixels

    kwargs = dict(
        resolution=args.resolution, train=False, image_column=args.image_column, max_samples=args.num_validation_images
    )
    try:
        examples = list(build_image_dataset(args.dataset, args.validation_split, **kwargs))
    except Exception:  # no such split in this source (the error type depends on the source's format)
        examples = []
    if not examples:
        examples = list(build_image_dataset(args.dataset, args.dataset_split, **kwargs))
    return collate_pixels(examples)


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
    "NonFiniteGuard",
    "ResumableBatches",
    "build_parser",
    "export_model",
    "list_checkpoints",
    "main",
    "parse_args",
    "resolve_model_config",
    "resolve_resume_path",
    "rotate_checkpoints",
    "save_checkpoint",
    "train",
    "weights_digest",
]
