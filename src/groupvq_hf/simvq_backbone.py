"""SimVQ's convolutional encoder and decoder (Zhu et al. 2024, "Addressing Representation Collapse in Vector Quantized
Models with One Linear Layer"; the network of its `taming/modules/diffusionmodules/improved_model.py`), the network of
the paper's Table 1 VQGAN rows, written for this package.

How it differs from diffusers' VQGAN `Encoder`/`Decoder` (the "vqgan" backbone):

- residual blocks: GroupNorm(32, eps 1e-6) -> swish -> 3x3 conv (no bias), twice; a 1x1 bias-free `nin_shortcut`
  when the channel count changes;
- encoder: a bias-free 3x3 `conv_in`, per level `layers_per_block` residual blocks and (all but the last level) a
  stride-2 3x3 convolution; a mid stage of `layers_per_block` residual blocks, no attention; GroupNorm, swish and a
  1x1 `conv_out` straight to the latent channels (no `quant_conv`);
- decoder: 3x3 `conv_in`, the same mid stage, per level (deepest first) `layers_per_block` residual blocks and an
  upsampler: a 3x3 convolution to 4x the channels followed by depth-to-space in DCR order; GroupNorm, swish,
  3x3 `conv_out` (no `post_quant_conv`).

Parameter names follow SimVQ's (``down.{i}.block.{j}.conv1.weight``, ``up.{i}.upsample.conv1.weight``, ...), so a
SimVQ checkpoint's ``encoder.*`` / ``decoder.*`` keys load unchanged (see `convert_simvq`).

This file imports only torch: it travels to the Hub as remote code beside `modeling_groupvq.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

NORM_EPS = 1e-6


def depth_to_space_dcr(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, s*s*C, H, W) -> (B, C, s*H, s*W) in DCR order: the channel axis splits as (row offset, column offset, C).

    (torch's `pixel_shuffle` splits it as (C, row offset, column offset), the CRD order.)
    """
    b, c, h, w = x.shape
    s = block_size
    if c % (s * s):
        raise ValueError(f"`x` must have a multiple of {s * s} channels for block_size={s}, got {c}.")
    x = x.view(b, s, s, c // (s * s), h, w).permute(0, 3, 4, 1, 5, 2)
    return x.reshape(b, c // (s * s), h * s, w * s)


class SimVQResBlock(nn.Module):
    """x + F(x) with F = conv2(swish(norm2(conv1(swish(norm1(x)))))), bias-free 3x3 convolutions."""

    def __init__(self, in_channels: int, out_channels: int, norm_num_groups: int = 32):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_num_groups, in_channels, eps=NORM_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(norm_num_groups, out_channels, eps=NORM_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.nin_shortcut is None else self.nin_shortcut(x))


class SimVQUpsample(nn.Module):
    """2x upsampling: 3x3 convolution to 4x the channels, then DCR depth-to-space."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 4 * channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depth_to_space_dcr(self.conv1(x), 2)


class SimVQStage(nn.Module):
    """One resolution level: `block` (residual blocks), then an optional `downsample` or `upsample`."""

    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None = None, upsample: nn.Module | None = None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if downsample is not None:
            self.downsample = downsample
        if upsample is not None:
            self.upsample = upsample


class _SimVQNetwork(nn.Module):
    def __init__(self):
        super().__init__()
        # Set by `PreTrainedModel.gradient_checkpointing_enable` (with `_gradient_checkpointing_func`), as in diffusers.
        self.gradient_checkpointing = False

    def _run(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            ckpt = getattr(self, "_gradient_checkpointing_func", None) or partial(checkpoint, use_reentrant=False)
            return ckpt(block, x)
        return block(x)


def _check_channels(block_out_channels: Sequence[int], norm_num_groups: int) -> list[int]:
    channels = [int(c) for c in block_out_channels]
    if not channels:
        raise ValueError("`block_out_channels` must be a non-empty list of positive ints, got [].")
    bad = [c for c in channels if c % norm_num_groups]
    if bad:
        raise ValueError(
            f"`norm_num_groups`={norm_num_groups} must divide every entry of `block_out_channels` {channels}; "
            f"{bad} do not."
        )
    return channels


class SimVQEncoder(_SimVQNetwork):
    """pixels (B, in_channels, H, W) -> latents (B, out_channels, H/f, W/f), f = 2^(levels - 1).

    `block_out_channels` is SimVQ's `ch * ch_mult` (with `ch_mult[0] == 1`), `layers_per_block` its `num_res_blocks`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        block_out_channels: Sequence[int],
        layers_per_block: int,
        norm_num_groups: int = 32,
    ):
        super().__init__()
        channels = _check_channels(block_out_channels, norm_num_groups)
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=False)
        stages, block_in = [], channels[0]
        for level, block_out in enumerate(channels):
            blocks = []
            for _ in range(layers_per_block):
                blocks.append(SimVQResBlock(block_in, block_out, norm_num_groups))
                block_in = block_out
            last = level == len(channels) - 1
            downsample = None if last else nn.Conv2d(block_out, block_out, 3, stride=2, padding=1)
            stages.append(SimVQStage(blocks, downsample=downsample))
        self.down = nn.ModuleList(stages)
        self.mid_block = nn.ModuleList(
            SimVQResBlock(block_in, block_in, norm_num_groups) for _ in range(layers_per_block)
        )
        self.norm_out = nn.GroupNorm(norm_num_groups, block_in, eps=NORM_EPS)
        self.conv_out = nn.Conv2d(block_in, out_channels, 1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(pixel_values)
        for stage in self.down:
            for block in stage.block:
                x = self._run(block, x)
            if hasattr(stage, "downsample"):
                x = stage.downsample(x)
        for block in self.mid_block:
            x = self._run(block, x)
        return self.conv_out(F.silu(self.norm_out(x)))


class SimVQDecoder(_SimVQNetwork):
    """latents (B, in_channels, h, w) -> images (B, out_channels, f*h, f*w); the mirror of `SimVQEncoder`.

    `up[i]` works at level i's resolution (as in SimVQ, `up[0]` is the last stage run); stages run deepest first.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        block_out_channels: Sequence[int],
        layers_per_block: int,
        norm_num_groups: int = 32,
    ):
        super().__init__()
        channels = _check_channels(block_out_channels, norm_num_groups)
        block_in = channels[-1]
        self.conv_in = nn.Conv2d(in_channels, block_in, 3, padding=1)
        self.mid_block = nn.ModuleList(
            SimVQResBlock(block_in, block_in, norm_num_groups) for _ in range(layers_per_block)
        )
        stages = [None] * len(channels)
        for level in reversed(range(len(channels))):
            blocks = []
            for _ in range(layers_per_block):
                blocks.append(SimVQResBlock(block_in, channels[level], norm_num_groups))
                block_in = channels[level]
            stages[level] = SimVQStage(blocks, upsample=SimVQUpsample(block_in) if level > 0 else None)
        self.up = nn.ModuleList(stages)
        self.norm_out = nn.GroupNorm(norm_num_groups, block_in, eps=NORM_EPS)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, latents: torch.Tensor, latent_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """`latent_embeds` (diffusers' SpatialNorm input) is accepted for the decoders' common call and unused."""
        x = self.conv_in(latents)
        for block in self.mid_block:
            x = self._run(block, x)
        for stage in reversed(self.up):
            for block in stage.block:
                x = self._run(block, x)
            if hasattr(stage, "upsample"):
                x = stage.upsample(x)
        return self.conv_out(F.silu(self.norm_out(x)))


__all__ = ["SimVQDecoder", "SimVQEncoder", "SimVQResBlock", "SimVQUpsample", "depth_to_space_dcr"]
