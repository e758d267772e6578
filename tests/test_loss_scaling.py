"""fp16 loss scaling with gradient accumulation and two optimizers: each optimizer's gradients are unscaled once.

No CPU runs fp16 autocast with a GradScaler, so the accelerator gets a real ``torch.amp.GradScaler`` with autocast
off: only the loss scaling differs from an unscaled run, and since the scale is a power of two, scaling and
unscaling are exact in float32. The weights after one step must then equal the unscaled run's bit for bit."""

import pytest
import torch
from conftest import train_in_process
from safetensors.torch import load_file
from test_training import TINY_RUN

import groupvq_hf.training.loop as loop


def _loss_scaled(build_accelerator):
    def build(args):
        accelerator = build_accelerator(args)

        class LossScaled(type(accelerator)):
            mixed_precision = property(lambda self: "fp16")

        from accelerate.utils import AutocastKwargs

        accelerator.__class__ = LossScaled
        accelerator.autocast_handler = AutocastKwargs(enabled=False)
        accelerator.native_amp, accelerator.scaler = True, torch.amp.GradScaler("cpu", init_scale=2.0**10)
        return accelerator

    return build


def _one_step(output_dir, accumulation: int) -> list[dict]:
    train_in_process([
        "--output_dir", str(output_dir), *TINY_RUN, "--max_train_steps", "1", "--num_validation_usage_images", "0",
        "--disc_start", "0", "--no_ema", "--checkpointing_steps", "1", "--disc_channels", "8", "--disc_layers", "2",
        "--gradient_accumulation_steps", str(accumulation), "--train_batch_size", "2",
    ])  # fmt: skip
    checkpoint = output_dir / "checkpoints" / "checkpoint-1"
    return [load_file(str(checkpoint / name)) for name in ("model.safetensors", "model_1.safetensors")]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_loss_scaled_steps_equal_unscaled_steps_for_generator_and_discriminator(accumulation, tmp_path, monkeypatch):
    """With accumulation 2, accelerate's ``clip_grad_norm_`` for the generator used to unscale the discriminator's
    first micro-step too, which its own clip then unscaled again: the discriminator's weights differed."""
    plain = _one_step(tmp_path / "plain", accumulation)
    monkeypatch.setattr(loop, "build_accelerator", _loss_scaled(loop.build_accelerator))
    scaled = _one_step(tmp_path / "scaled", accumulation)
    for name, want, got in zip(("generator", "discriminator"), plain, scaled):
        assert want.keys() == got.keys()
        changed = [key for key in want if not torch.equal(want[key], got[key])]
        assert not changed, f"{name}: {len(changed)} tensors differ, e.g. {changed[0]}"
