"""ViT-VQGAN pieces (Yu et al. 2021, "Vector-quantized Image Modeling with Improved VQGAN").

- `ViTEncoder`: patches (`conv_in`, a stride-p convolution) + learned position embeddings -> pre-norm
  transformer blocks (torch's `nn.TransformerEncoderLayer`, GELU MLP) -> LayerNorm -> the paper's output
  feed-forward (Linear, tanh, Linear) -> a (B, C, H/p, W/p) latent map, like diffusers' `Encoder`.
- `ViTDecoder`: the mirror: per-token Linear -> position embeddings -> blocks -> LayerNorm -> Linear, tanh ->
  `conv_out` (a stride-p transposed convolution, i.e. a per-token linear map to a p x p pixel patch).
  The last layer is named `conv_out` like diffusers' `Decoder`, so `decoder.conv_out.weight` is the last layer
  for the adaptive GAN weight with either backbone.
- `L2NormalizedGroupVectorQuantizer`: ViT-VQGAN's factorised code lookup (section 3.2): latents and codes are
  l2-normalised and Eq. 1 is searched there; the low-dimensional part is the model's `quant_conv`, which projects
  `latent_channels` to a small `codebook_dim`.

Position embeddings are stored for the `image_size / patch_size` grid; other (divisible) input sizes use a
bicubic interpolation of them, as transformers' ViT does with `interpolate_pos_encoding=True`.

This file imports only torch and the relative quantizer and configuration modules: it travels to the Hub as remote
code.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .configuration_groupvq import check_vit_settings
from .quantizer import GroupVectorQuantizer

LAYER_NORM_EPS = 1e-6


class _ViTBackbone(nn.Module):
    """Learned position embeddings + pre-norm transformer blocks + final LayerNorm over a (B, h*w, hidden) grid."""

    def __init__(self, image_size, patch_size, hidden_size, num_layers, num_heads, mlp_ratio):
        super().__init__()
        check_vit_settings(image_size, patch_size, hidden_size, num_layers, num_heads, mlp_ratio)
        self.patch_size = patch_size
        self.grid_size = image_size // patch_size
        self.position_embedding = nn.Parameter(torch.empty(1, self.grid_size**2, hidden_size))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                hidden_size,
                num_heads,
                dim_feedforward=int(hidden_size * mlp_ratio),
                dropout=0.0,
                activation="gelu",
                layer_norm_eps=LAYER_NORM_EPS,
                batch_first=True,
                norm_first=True,
            )
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)
        # Set by `PreTrainedModel.gradient_checkpointing_enable` (with `_gradient_checkpointing_func`), as in diffusers.
        self.gradient_checkpointing = False
        nn.init.trunc_normal_(self.position_embedding, std=0.02)

    def position_embeddings(self, height: int, width: int) -> torch.Tensor:
        """(1, height*width, hidden) embeddings: the stored grid, bicubically resized when the grid differs."""
        if (height, width) == (self.grid_size, self.grid_size):
            return self.position_embedding
        grid = self.position_embedding.reshape(1, self.grid_size, self.grid_size, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(height, width), mode="bicubic", align_corners=False)
        return grid.to(self.position_embedding.dtype).flatten(2).transpose(1, 2)

    def transform(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Tokens (B, height*width, hidden) of a height x width grid -> transformed, normalised tokens."""
        hidden = tokens + self.position_embeddings(height, width)
        for layer in self.layers:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                ckpt = getattr(self, "_gradient_checkpointing_func", None) or partial(checkpoint, use_reentrant=False)
                hidden = ckpt(layer, hidden)
            else:
                hidden = layer(hidden)
        return self.norm(hidden)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """All weights: position embeddings ~ N(0, 0.02) truncated (as ViT), torch's own init everywhere else."""
        nn.init.trunc_normal_(self.position_embedding, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.MultiheadAttention):
                module._reset_parameters()
            elif isinstance(module, (nn.Linear, nn.LayerNorm, nn.Conv2d, nn.ConvTranspose2d)):
                module.reset_parameters()


class ViTEncoder(_ViTBackbone):
    """ViT-VQGAN encoder: images (B, in_channels, H, W) -> latents (B, out_channels, H/p, W/p).

    Args:
        in_channels: image channels. out_channels: latent channels (the model's `latent_channels`).
        image_size: side of the training images (`sample_size`); sets the stored position-embedding grid.
        patch_size: p, the downsampling factor. hidden_size, num_layers, num_heads, mlp_ratio: transformer width,
        depth, attention heads and MLP width / hidden_size.
    """

    def __init__(
        self, in_channels, out_channels, image_size, patch_size, hidden_size, num_layers, num_heads, mlp_ratio
    ):
        super().__init__(image_size, patch_size, hidden_size, num_layers, num_heads, mlp_ratio)
        self.conv_in = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        # ViT-VQGAN's output head: a two-layer feed-forward with tanh in the middle, no activation on the output.
        self.head = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.Tanh(), nn.Linear(hidden_size, out_channels))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h, w = pixel_values.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"`pixel_values` height and width must be divisible by `patch_size`={self.patch_size}, got {h}x{w}."
            )
        patches = self.conv_in(pixel_values)  # (B, hidden, h, w)
        b, _, gh, gw = patches.shape
        hidden = self.transform(patches.flatten(2).transpose(1, 2), gh, gw)
        return self.head(hidden).transpose(1, 2).reshape(b, -1, gh, gw)


class ViTDecoder(_ViTBackbone):
    """ViT-VQGAN decoder, the encoder's mirror: latents (B, in_channels, h, w) -> images (B, out_channels, h*p, w*p).

    Arguments as [`ViTEncoder`], with `in_channels` the latent channels and `out_channels` the image channels.
    """

    def __init__(
        self, in_channels, out_channels, image_size, patch_size, hidden_size, num_layers, num_heads, mlp_ratio
    ):
        super().__init__(image_size, patch_size, hidden_size, num_layers, num_heads, mlp_ratio)
        self.token_in = nn.Linear(in_channels, hidden_size)
        self.head = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.Tanh())
        # A per-token linear map to a p x p pixel patch; named like diffusers' Decoder's last layer.
        self.conv_out = nn.ConvTranspose2d(hidden_size, out_channels, kernel_size=patch_size, stride=patch_size)

    def forward(self, latents: torch.Tensor, latent_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if latent_embeds is not None:
            raise ValueError("`latent_embeds` (diffusers' spatial norm) is not used by the ViT decoder; pass None.")
        b, _, h, w = latents.shape
        hidden = self.transform(self.token_in(latents.flatten(2).transpose(1, 2)), h, w)
        return self.conv_out(self.head(hidden).transpose(1, 2).reshape(b, -1, h, w))


class L2NormalizedGroupVectorQuantizer(GroupVectorQuantizer):
    """Group-VQ searched in ViT-VQGAN's l2-normalised lookup space (factorised codes, Yu et al. 2021 section 3.2).

    Eq. 1 becomes ``argmin_i ||l2(z) - l2(c_i)||^2`` (cosine similarity); Eq. 2-3 use the normalised vectors, and
    `codebook()` returns the normalised codes, so `get_codebook_entry` and decoding agree with `forward`.
    Parameters, usage statistics and `resize_codebook` are those of [`GroupVectorQuantizer`].
    """

    def codebook(self) -> torch.Tensor:
        return F.normalize(super().codebook(), dim=-1)

    def quantize_tokens(self, z: torch.Tensor):
        z_q, loss, indices = super().quantize_tokens(F.normalize(z.float(), dim=-1))
        return z_q.to(z.dtype), loss, indices

    def extra_repr(self) -> str:
        return super().extra_repr() + ", l2_normalized=True"


__all__ = ["L2NormalizedGroupVectorQuantizer", "ViTDecoder", "ViTEncoder"]
