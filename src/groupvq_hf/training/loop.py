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
import json
import os
import pickle
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..configuration_groupvq import GroupVQConfig
from ..data.sizing import dataset_num_examples
from ..data.stream import ResumableBatches
from ..fileio import atomic_file, weights_digest
from ..image_processing_groupvq import to_uint8
from .arguments import (
    check_resolution,
    parse_args,
    resolve_model_config,
    steps_per_epoch,
)
from .checkpoints import (
    LEGACY_EMA_FILE,
    RUN_ARGS_FILE,
    VALIDATION_LOG_FILE,
    check_checkpoint_files,
    check_optimizer_states,
    check_resume_arguments,
    convert_legacy_ema,
    load_ema_state,
    load_rank_state,
    rename_compiled_keys,
    optimizer_settings,
    rescale_schedule,
    resolve_resume_path,
    restore_run_settings,
    run_arguments,
    saved_run_args,
    save_checkpoint,
    save_ema_state,
    set_aside_later_checkpoints,
)
from .finetune import (
    InitWeights,
    freeze_parts,
    load_initial_weights,
    save_discriminator,
)


# ---------------------------------------------------------------------------------------------------- helpers
def reconstruction_grid(pixels: torch.Tensor, reconstruction: torch.Tensor):
    """A PIL image: originals on the top row, reconstructions below (inputs in [-1, 1])."""
    from PIL import Image
    from torchvision.utils import make_grid

    images = torch.cat([pixels.detach().float().cpu(), reconstruction.detach().float().cpu()])
    grid = make_grid((images.clamp(-1, 1) + 1) / 2, nrow=pixels.shape[0], padding=2, pad_value=1.0)
    return Image.fromarray(to_uint8(grid.permute(1, 2, 0)).numpy())


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

    def state_dict(self) -> dict:
        """The counts a checkpoint keeps, so a resumed run stops where the uninterrupted one would."""
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.consecutive, self.total = int(state["consecutive"]), int(state["total"])


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


def save_export(model, model_dir: Path, run_args: dict, discriminator=None) -> Path:
    """``model.save_pretrained`` plus ``RUN_ARGS_FILE`` (and, for a run with a GAN, the ``discriminator``'s
    ``discriminator.safetensors``) into a temporary folder swapped in as ``model_dir`` (``fileio.atomic_directory``):
    a kill or an error leaves the previous export or this one, never a mix."""
    from ..fileio import atomic_directory

    with atomic_directory(model_dir) as tmp:
        model.save_pretrained(tmp)
        (tmp / RUN_ARGS_FILE).write_text(json.dumps(run_args, indent=2, sort_keys=True))
        if discriminator is not None:
            save_discriminator(discriminator, tmp)
    return Path(model_dir)


def ema_parameter_names(model) -> list[str]:
    """Names of ``model.parameters()`` in the order the EMA holds them (its checkpoint keys)."""
    return [name for name, _ in model.named_parameters()]


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
    usage_split: str | None = None  # the split ``usage_pixels`` come from
    dataset_rows: int | None = None  # rows of --dataset's training split when the run started (None: not known)

    @property
    def usage_images(self) -> str:
        """What the usage images are, for messages: held out, or the training split's (a source with no other)."""
        if self.usage_split == self.args.dataset_split:
            return f"images of the training split {self.usage_split!r} (not held out)"
        return "held-out images"

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
    config, init = initial_config(args)
    if args.commitment_weight == 0 and args.trainable in ("all", "quantizer+decoder"):
        logger.warning(
            "`--commitment_weight 0`: the quantizer's projectors learn through the commitment loss's codebook term "
            "only (the straight-through estimator gives the codes no reconstruction gradient), so they keep their "
            "initial values in this run."
        )
    model, discriminator, loss_fn = build_models(args, config, accelerator.device, init)
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
    if ema is not None:  # checkpointed by save_ema_state / load_ema_state (safetensors + JSON), not pickled
        ema.to(accelerator.device)
    batches = build_batches(args, rank, world)
    run_args = run_arguments(args, config, world)
    resume = resolve_resume_path(args.resume_from_checkpoint, Path(args.output_dir) / "checkpoints")
    return TrainingRun(
        args=args, accelerator=accelerator, logger=logger, config=config, model=model, discriminator=discriminator,
        plain_model=accelerator.unwrap_model(model), plain_disc=accelerator.unwrap_model(discriminator),
        loss_fn=loss_fn, opt_g=opt_g, opt_d=opt_d, sched_g=sched_g, sched_d=sched_d, ema=ema, batches=batches,
        run_args=run_args, resume=resume, dataset_rows=count_dataset_rows(args),
    )  # fmt: skip


def count_dataset_rows(args: argparse.Namespace) -> int | None:
    """Rows of ``--dataset``'s training split as [`dataset_num_examples`] counts them (local files by name, named
    sources by their known size; no Hub request at start-up), or None when that is not known; saved in every
    checkpoint so a resume can tell that rows went missing (files deleted) since."""
    try:
        return dataset_num_examples(args.dataset, args.dataset_split, network=False)
    except Exception:  # noqa: BLE001  (a count that cannot be made is simply not compared)
        return None


def start_accelerator(args: argparse.Namespace):
    """The [`build_accelerator`] of the run and its logger; TF32 when asked; the output folder (main process)."""
    import logging

    from accelerate.logging import get_logger

    logger = get_logger("groupvq_hf.train", log_level="INFO")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    accelerator = build_accelerator(args)
    logger.info(accelerator.state)
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        logger.warning("`--mixed_precision fp16` has no autocast on the CPU: this run computes in float32.")
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    return accelerator, logger


def initial_config(args: argparse.Namespace) -> tuple[GroupVQConfig, InitWeights | None]:
    """The run's model config and, with ``--init_from``, the loaded weights ([`load_initial_weights`]: checked
    against ``--model_config`` when given, resized when asked); without it, ``--model_config`` resolved."""
    if args.init_from is None:
        return resolve_model_config(args.model_config, args.resolution), None
    given = None if args.model_config is None else resolve_model_config(args.model_config, args.resolution)
    init = load_initial_weights(args, given)
    config = init.model.config
    check_resolution(config, args.resolution)
    if config.sample_size != args.resolution:  # the export's image processor (and card) follow sample_size
        if config.backbone == "vit":
            raise ValueError(
                f"`--resolution` {args.resolution} differs from the ViT's `sample_size` {config.sample_size}, the grid "
                f"its stored position embeddings cover: fine-tune it at `--resolution {config.sample_size}`."
            )
        config.sample_size = args.resolution  # convolutional backbones: no weight depends on it
    return config, init


def build_models(args: argparse.Namespace, config: GroupVQConfig, device, init: InitWeights | None = None):
    """``(model, discriminator, loss_fn)``: the [`GroupVQModel`] of ``config`` (or ``init``'s loaded model and
    discriminator), only the ``--trainable`` parts trainable, the PatchGAN discriminator and the [`build_loss_fn`]
    loss (LPIPS on ``device`` when ``--perceptual_weight`` > 0). With ``--torch_compile`` the encoder and decoder
    are compiled in place."""
    from ..modeling_groupvq import GroupVQModel
    from .losses import PatchGANDiscriminator

    model = GroupVQModel(config) if init is None else init.model
    freeze_parts(model, args.trainable)
    # A NaN/inf step is the NonFiniteGuard's to skip (and fp16's GradScaler's), on every rank alike: no ValueError
    # on one rank while the others wait in the all-reduce. The export turns the check back on.
    model.check_finite = False
    discriminator = PatchGANDiscriminator(config.out_channels, args.disc_channels, args.disc_layers)
    if init is not None and init.discriminator is not None:
        discriminator = init.discriminator
    perceptual = None
    if args.perceptual_weight > 0:
        from ..evaluation.pretrained import lpips_network

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
    """One diffusers ``--lr_scheduler`` per optimizer (generator, discriminator), counted in scheduler calls (a
    prepared scheduler steps once per process). The generator's spans ``--max_train_steps``; the discriminator's
    spans the steps it trains, from ``--disc_start`` on (it steps only then), so its warm-up starts with it and it
    ends with the run."""
    from diffusers.optimization import get_scheduler

    spans = (args.max_train_steps, max(1, args.max_train_steps - args.disc_start))
    return [
        get_scheduler(
            args.lr_scheduler,
            opt,
            num_warmup_steps=args.lr_warmup_steps * world_size,
            num_training_steps=steps * world_size,
        )
        for opt, steps in zip(optimizers, spans)
    ]


SCHEDULE_ARGUMENTS = ("lr_scheduler", "lr_warmup_steps", "max_train_steps", "disc_start")  # what `build_schedulers` reads


def schedule_span_warning(
    args: argparse.Namespace, scheduler, saved_args: dict, world_size: int, global_step: int
) -> str | None:
    """A warning when a resume changes ``--max_train_steps`` (always allowed) and with it the loaded generator
    schedule (`build_schedulers`: cosine, linear... span ``--max_train_steps``; constant ones do not move), naming
    the first step from the resumed one on where its learning rate differs from the checkpoint's schedule (built
    from the checkpoint's `SCHEDULE_ARGUMENTS` with this run's base rate, over the steps both spans have); None
    otherwise. The schedule does not move on a skipped (non-finite) step, as accelerate's does not on a skipped
    fp16 step, so its position trails ``global_step`` by the steps skipped; the warning names global steps."""
    saved_steps = saved_args.get("max_train_steps")
    if saved_steps is None or saved_steps == args.max_train_steps:
        return None
    scheduler = getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler wraps it
    base, now = scheduler.base_lrs[0], scheduler.lr_lambdas[0]
    saved = argparse.Namespace(**{**vars(args), **{k: saved_args[k] for k in SCHEDULE_ARGUMENTS if k in saved_args}})
    # stand-ins with the real optimizer's default rate (diffusers' polynomial schedule divides by it)
    stand_ins = [torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=scheduler.optimizer.defaults["lr"])] * 2
    was = build_schedulers(saved, stand_ins, world_size)[0].lr_lambdas[0]
    position = scheduler.last_epoch // world_size
    skipped = global_step - position
    for step in range(position, min(saved_steps, args.max_train_steps) - skipped):  # schedule positions trained
        rate, saved_rate = base * now(step * world_size), base * was(step * world_size)
        if f"{rate:.3g}" != f"{saved_rate:.3g}":
            return (
                f"`--max_train_steps` {args.max_train_steps} differs from the checkpoint's run ({saved_steps}): the "
                f"`{args.lr_scheduler}` learning-rate schedule now spans {args.max_train_steps} steps, so at step "
                f"{step + skipped} the generator's learning rate is {rate:.3g} (it would be {saved_rate:.3g} on the "
                f"checkpoint's {saved_steps}-step schedule). Resume with `--max_train_steps {saved_steps}` to keep "
                "that schedule."
            )
    return None


def build_batches(args: argparse.Namespace, rank: int, world_size: int) -> ResumableBatches:
    """This rank's batches: its own shard of one shuffled stream, read through a plain DataLoader (not prepared)."""
    from ..data.stream import build_image_dataset

    stream = build_image_dataset(
        args.dataset, args.dataset_split, args.resolution, train=True, image_column=args.image_column,
        seed=args.seed, rank=rank, world_size=world_size, max_samples=args.max_train_samples,
        shuffle_buffer_size=args.shuffle_buffer_size, full_decode=args.full_decode,
    )  # fmt: skip
    return ResumableBatches(stream, args.train_batch_size, args.dataloader_num_workers, args.seed, rank)


def rewrite_once(accelerator, rewrite) -> None:
    """Once every process has read the checkpoint, the main process rewrites part of it (``rewrite()``: an earlier
    release's file in today's format), and every process waits until it has, before loading it."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        rewrite()
    accelerator.wait_for_everyone()


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
        compiled = check_checkpoint_files(run.resume, [run.plain_model, run.plain_disc], accelerator.process_index)
        for path in compiled:  # the first release's --torch_compile keys (`encoder._orig_mod.`): renamed, then loaded
            rewrite_once(accelerator, functools.partial(rename_compiled_keys, path))
            logger.info(f"Renamed the `_orig_mod.` keys of {path} (torch.compile wrappers') to plain names.")
        if run.ema is not None:
            names = ema_parameter_names(run.plain_model)
            legacy = load_ema_state(run.ema, names, run.resume)
            if legacy is not None:  # the earlier release's pickle, read safely: convert it
                rewrite_once(accelerator, functools.partial(convert_legacy_ema, legacy, names, run.resume))
        elif (run.resume / LEGACY_EMA_FILE).is_file():  # accelerate would unpickle it for a registered EMA only
            raise ValueError(f"`{run.resume / LEGACY_EMA_FILE}` holds an EMA, and this run keeps none (--no_ema).")
        settings = [optimizer_settings(optimizer) for optimizer in (run.opt_g, run.opt_d)]
        try:
            accelerator.load_state(str(run.resume))
        except pickle.UnpicklingError as error:  # torch's message suggests weights_only=False: never here
            pickled = sorted(p.name for p in run.resume.iterdir() if p.suffix in (".bin", ".pkl", ".pt"))
            raise ValueError(
                f"`--resume_from_checkpoint` {str(run.resume)!r}: one of its pickled files {pickled} holds objects "
                "other than tensors and plain containers, which are never unpickled here (torch.load "
                "weights_only=True runs no code). Resume from a checkpoint this package wrote. torch said: "
                f"{str(error).splitlines()[0]}"
            ) from None
        check_optimizer_states(run.resume, [run.opt_g, run.opt_d])
        saved_args = saved_run_args(run.resume)
        saved_world = saved_args.get("world_size") or accelerator.num_processes
        for optimizer, scheduler, own in zip((run.opt_g, run.opt_d), (run.sched_g, run.sched_d), settings):
            restore_run_settings(optimizer, scheduler, own)  # the run's rates, betas...: an allowed change is made
            rescale_schedule(scheduler, saved_world, accelerator.num_processes)  # the rates at the step resumed
        state.global_step, state.skipped_images = int(saved["global_step"]), int(saved.get("skipped_images", 0))
        warning = schedule_span_warning(args, run.sched_g, saved_args, accelerator.num_processes, state.global_step)
        if warning is not None:
            logger.warning(warning)
        # accelerate restored its micro-step count, which syncs at multiples of this run's accumulation: with an
        # allowed change of --gradient_accumulation_steps, the first update would take fewer micro-batches
        accelerator.step = state.global_step * args.gradient_accumulation_steps
        state.converted_images = int(saved.get("converted_images", 0))
        for guard, name in ((state.guard_g, "generator"), (state.guard_d, "discriminator")):
            if name in saved.get("nonfinite", {}):  # checkpoints before this count was kept start from zero
                guard.load_state_dict(saved["nonfinite"][name])
        run.batches.load_state_dict(saved["data"])
        before, now = saved.get("dataset_rows"), run.dataset_rows
        if before is not None and now is not None and now < before:
            logger.warning(
                f"`--dataset` {args.dataset!r} (split {args.dataset_split!r}) has {before - now} rows fewer than when "
                f"{run.resume.name} was written ({before} then, {now} now): files were deleted since, so the resumed "
                "stream is not the one the run was reading (its rows shift)."
            )
        if run.ema is not None:
            run.ema.to(accelerator.device)
        logger.info(f"Resumed from {run.resume} at step {state.global_step} (data position {saved['data']}).")
    elif args.resume_from_checkpoint:
        logger.info(f"No checkpoint in {run.checkpoint_dir}; starting from scratch.")
    set_aside_checkpoints_past_start(run, state.global_step)
    return state


def set_aside_checkpoints_past_start(run: TrainingRun, step: int) -> None:
    """Once every process has loaded its checkpoint, the main process moves the checkpoints past ``step`` that this
    run did not write aside ([`set_aside_later_checkpoints`]), so `latest` and the rotation see this run's only;
    every process waits until it has."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        moved = set_aside_later_checkpoints(run.checkpoint_dir, step)
        if moved:
            whose = "an earlier run's"
            if run.resume is not None:
                whose = f"written after {run.resume.name} by the run this one replaces"
            run.logger.warning(
                f"{run.checkpoint_dir} held checkpoints past step {step} ({', '.join(p.name for p in moved)}): "
                f"{whose}. Moved them aside to {moved[0].parent}, so that "
                "`--resume_from_checkpoint latest` resumes this run. To continue the earlier run instead, move "
                "them back and pass `--resume_from_checkpoint latest`; to keep runs apart use another `--output_dir`."
            )
    accelerator.wait_for_everyone()


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
        run.usage_pixels, run.usage_split = pixels[: args.num_validation_usage_images], split
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
        f"Training {args.model_config or args.init_from} ({trainable:,} trainable parameters) on {args.dataset} at "
        f"{args.resolution}px; "
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


def clip_gradients(accelerator, optimizer, parameters, max_norm: float):
    """``accelerator.clip_grad_norm_`` for the parameters of one ``optimizer``, unscaling only its gradients.

    accelerate's own unscales the gradients of every prepared optimizer (its TODO in ``unscale_gradients``). Under
    fp16 with gradient accumulation, the generator's clip then unscaled the discriminator's gradients of the earlier
    micro-steps, the generator's ``scaler.update()`` forgot it, and the discriminator's clip unscaled them again:
    divided by the loss scale twice (65,536), they vanished. FSDP, DeepSpeed and XLA keep accelerate's path."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.XLA):
        return accelerator.clip_grad_norm_(parameters, max_norm)
    accelerator.unscale_gradients(optimizer=optimizer)
    return torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)


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
        g_norm = clip_gradients(accelerator, run.opt_g, run.model.parameters(), run.clip)
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
        d_norm = clip_gradients(accelerator, run.opt_d, run.discriminator.parameters(), run.clip)
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
        "world_size": run.accelerator.num_processes, "dataset_rows": run.dataset_rows,
        "nonfinite": {"generator": state.guard_g.state_dict(), "discriminator": state.guard_d.state_dict()},
    }  # fmt: skip
    names = ema_parameter_names(run.plain_model)
    write_ema = None if run.ema is None else functools.partial(save_ema_state, run.ema, names)
    path = save_checkpoint(
        run.accelerator, run.checkpoint_dir, state.global_step, rank_state, run.args.checkpoints_total_limit,
        run.run_args, write_ema,
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
        "nonfinite_steps": state.guard_g.total + state.guard_d.total,
    }  # fmt: skip
    if accelerator.is_main_process:
        result.update(export_final_model(run, state))
        # Printed also without trackers (--report_to none): every process has the totals.
        print(
            f"Training images skipped (missing, undecodable or too small): {state.skipped_images}; converted to RGB: "
            f"{state.converted_images}."
        )
    accelerator.end_training()
    return result


def export_final_model(run: TrainingRun, state: LoopState) -> dict:
    """Main process: [`save_export`] of the EMA model to ``<output_dir>/model``, its reconstruction grid
    (``reconstructions.png`` and the trackers) and its held-out usage. Returns ``model_dir``, ``grid_path`` and,
    with usage images, ``validation_codebook_usage`` and ``validation_group_usage``."""
    final = export_model(run.plain_model, run.ema)
    gan = run.plain_disc if run.args.disc_weight > 0 else None  # the discriminator travels with the model
    model_dir = save_export(final, run.output_dir / "model", run.run_args, gan)
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
            f"Codebook usage of the EMA model on {val_usage['num_images']} {run.usage_images}: "
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
    if validation_missing(run, state):  # killed while validating the step it resumes from: validate it now
        validate(run, state)
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
    from ..data.stream import build_image_dataset, collate_pixels

    kwargs = dict(resolution=args.resolution, train=False, image_column=args.image_column, max_samples=num_images)
    kwargs.update(full_decode=True)  # a measurement: the same pixels whatever --full_decode says
    error, why = None, {}  # why each split gave no image -> the splits it applies to
    for split in (args.validation_split, args.dataset_split):
        try:
            stream = build_image_dataset(args.dataset, split, **kwargs)
            examples = list(stream)
        except Exception as err:  # no such split in this source (the error type depends on the source's format)
            error = err
            why.setdefault(str(err).rstrip("."), []).append(split)
            continue
        examples = [example for example in examples if example.get("pixel_values") is not None]  # no bad images
        if examples:
            # a local source with a single split reads it for any split (with a note): that is the training split
            return collate_pixels(examples), (args.dataset_split if getattr(stream, "notes", None) else split)
        counts = ", ".join(f"{count} x {reason}" for reason, count in stream.skipped.items())
        why.setdefault(f"every image was skipped ({counts})" if counts else "no rows", []).append(split)
    reasons = "; ".join(f"{' and '.join(map(repr, dict.fromkeys(splits)))}: {text}" for text, splits in why.items())
    raise ValueError(
        f"`--dataset` {args.dataset!r} yielded no validation image (split {args.validation_split!r}). {reasons}."
    ) from error


@torch.no_grad()
def validation_usage(model, pixels: torch.Tensor, batch_size: int) -> dict:
    """Codebook usage (overall and per group) of ``model`` on ``pixels``, counted in this process only.

    ``analysis.count_code_usage`` encodes in eval mode (the quantizer's own counters untouched, the mode restored)
    and ``usage_statistics`` reads the counts: no collective, safe on the main process of a distributed run.
    Returns ``codebook_usage``, ``group_usage`` and ``num_images``.
    """
    from ..evaluation.analysis import count_code_usage
    from ..quantizer import usage_statistics

    counts, num_images = count_code_usage(model, pixels.split(batch_size))
    stats = usage_statistics(counts, model.quantizer.group_sizes)
    return {"codebook_usage": stats["codebook_usage"], "group_usage": stats["group_usage"], "num_images": num_images}


def build_generator_optimizer(model, args: argparse.Namespace) -> torch.optim.Adam:
    """Adam over the model: encoder, decoder and convs at ``--learning_rate`` (group 0), the quantizer's projectors
    W_j, b_j at ``--quantizer_learning_rate`` (group 1; the cores are frozen buffers); parameters ``--trainable``
    froze are left out."""
    quantizer_params = list(model.quantizer.parameters())
    quantizer_ids = {id(param) for param in quantizer_params}
    # frozen parameters (--trainable) get no optimizer state: a group may be empty
    groups = [
        {"params": [p for p in model.parameters() if id(p) not in quantizer_ids and p.requires_grad]},
        {"params": [p for p in quantizer_params if p.requires_grad], "lr": args.quantizer_learning_rate},
    ]
    betas = (args.adam_beta1, args.adam_beta2)
    return torch.optim.Adam(groups, lr=args.learning_rate, betas=betas, weight_decay=args.adam_weight_decay)


def read_validation_log(path: Path) -> list[dict]:
    """The entries of ``VALIDATION_LOG_FILE`` ([] when there is none). A last line cut short (a kill in the middle
    of an append: no newline after it) is left out; any other line that is not an entry is a ValueError naming the
    file and the line."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")  # the last item is what follows the last newline: "" unless an append was cut short
    entries = []
    for number, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
            raise ValueError(f"{path} line {number} is not a validation entry (a JSON object with an integer "
                             f"'step'): {line[:80]!r}; delete the line or the file to go on.")  # fmt: skip
        entries.append(entry)
    return entries


def trim_validation_log(path: Path, step: int) -> None:
    """Keep the entries of ``VALIDATION_LOG_FILE`` up to ``step`` (all of a resumed run's, none of a fresh one's),
    rewritten atomically (a kill keeps the old file); a last entry cut short by a kill is dropped."""
    if not path.is_file():
        return
    kept = [entry for entry in read_validation_log(path) if entry["step"] <= step]
    with atomic_file(path) as tmp:
        tmp.write_text("".join(json.dumps(entry) + "\n" for entry in kept), encoding="utf-8")


def validation_missing(run: TrainingRun, state: LoopState) -> bool:
    """Main process of a resumed run: whether the checkpoint's step is a validation step that has no entry in
    ``VALIDATION_LOG_FILE`` (the checkpoint of a step is written before its validation, so a kill while validating
    leaves a checkpoint without its entry)."""
    args, step = run.args, state.global_step
    if run.resume is None or run.usage_pixels is None or not args.validation_steps or step % args.validation_steps:
        return False
    return step not in [entry["step"] for entry in read_validation_log(run.validation_log)]


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
    "count_dataset_rows",
    "LoopState",
    "NonFiniteGuard",
    "TrainingRun",
    "append_validation_log",
    "build_accelerator",
    "build_batches",
    "build_ema",
    "build_generator_optimizer",
    "build_loss_fn",
    "build_models",
    "build_optimizers",
    "build_schedulers",
    "ema_parameter_names",
    "discriminator_step",
    "end_optimizer_step",
    "export_final_model",
    "export_model",
    "finish_training",
    "generator_step",
    "load_validation_images",
    "log_reconstructions",
    "log_window",
    "main",
    "optimisation_step",
    "reconstruct",
    "reconstruction_grid",
    "resume_training",
    "save_export",
    "save_training_checkpoint",
    "setup_training",
    "start_accelerator",
    "start_progress",
    "tracker_config",
    "train",
    "training_batches",
    "read_validation_log",
    "trim_validation_log",
    "usage_stats",
    "validate",
    "validation_images",
    "validation_missing",
    "validation_usage",
    "weights_digest",
    "window_statistics",
]
