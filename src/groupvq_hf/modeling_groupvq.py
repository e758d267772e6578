"""Group-VQ image tokenizer as a transformers ``PreTrainedModel``.

pixels [-1, 1] (B, 3, H, W) -> Encoder -> quant_conv -> latents (B, d, h, w) -> GroupVectorQuantizer
-> post_quant_conv -> Decoder -> reconstruction. Encoder and Decoder are diffusers' VQGAN blocks (backbone "vqgan"),
a ViT (backbone "vit", vit.py) or SimVQ's network (backbone "simvq", simvq_backbone.py, where quant_conv and
post_quant_conv are identities and the encoder/decoder keys are SimVQ's own); for "vqgan" state-dict
names match diffusers' ``VQModel`` except ``quantizer.*`` <-> ``quantize.*``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from diffusers.models.autoencoders.vae import Decoder, Encoder
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_groupvq import GroupVQConfig
from .image_processing_groupvq import GroupVQImageProcessor
from .quantizer import GroupVectorQuantizer, fill_legacy_core_std
from .shells import (
    CARRIED_CONFIG_KEYS,
    DIFFUSERS_CONFIG_NAMES,
    check_input,
    check_loaded_cores,
    prepare_pixels,
    quantizer_arguments,
    quantizer_config,
    rename_quantizer_keys,
    save_folder,
)
from .shells import resize_codebook as resize_quantizer
from .simvq_backbone import SimVQDecoder, SimVQEncoder
from .vit import L2NormalizedGroupVectorQuantizer, ViTDecoder, ViTEncoder

ARCHITECTURE_KEYS = (
    "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels", "layers_per_block",
    "act_fn", "latent_channels", "norm_num_groups", "norm_type", "mid_block_add_attention", "sample_size",
    "scaling_factor",
)


@dataclass
class GroupVQEncoderOutput(ModelOutput):
    """
    Args:
        latents (`torch.FloatTensor` of shape `(batch, codebook_dim, h, w)`): encoder output before quantisation.
        quantized (`torch.FloatTensor` of shape `(batch, codebook_dim, h, w)`): straight-through quantised latents.
        indices (`torch.LongTensor` of shape `(batch, h, w)`): code index of every latent position.
        commitment_loss (`torch.FloatTensor` scalar): both quantizer terms, `commitment_beta * ||z - sg(q)||^2`
            (commitment, trains the encoder) `+ ||sg(z) - q||^2` (codebook, weight 1, trains the projectors).
        perplexity (`torch.FloatTensor` scalar): exp(entropy) of the batch's code distribution.
    """

    latents: torch.FloatTensor | None = None
    quantized: torch.FloatTensor | None = None
    indices: torch.LongTensor | None = None
    commitment_loss: torch.FloatTensor | None = None
    perplexity: torch.FloatTensor | None = None


@dataclass
class GroupVQModelOutput(ModelOutput):
    """
    Args:
        reconstruction (`torch.FloatTensor` of shape `(batch, out_channels, H, W)`): decoded image in [-1, 1] scale.
        indices (`torch.LongTensor` of shape `(batch, h, w)`): code indices.
        commitment_loss (`torch.FloatTensor` scalar): the quantizer's loss, codebook and commitment terms (Eq. 3
            without the reconstruction term; see [`GroupVQEncoderOutput`]).
        latents, quantized, perplexity: as in [`GroupVQEncoderOutput`].
    """

    reconstruction: torch.FloatTensor | None = None
    indices: torch.LongTensor | None = None
    commitment_loss: torch.FloatTensor | None = None
    latents: torch.FloatTensor | None = None
    quantized: torch.FloatTensor | None = None
    perplexity: torch.FloatTensor | None = None


class GroupVQPreTrainedModel(PreTrainedModel):
    config: GroupVQConfig
    config_class = GroupVQConfig
    base_model_prefix = "groupvq"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["GroupVectorQuantizer"]
    _keep_in_fp32_modules_strict = ["quantizer"]  # codebook generation and search stay fp32 (search: Eq. 1)

    def _init_weights(self, module):
        # PyTorch's own initialisation for the diffusers blocks (as diffusers does), the quantizer's for the
        # projectors; the frozen cores are buffers and are never redrawn here.
        if isinstance(module, (GroupVectorQuantizer, ViTEncoder, ViTDecoder, nn.Conv2d, nn.Linear, nn.GroupNorm, nn.LayerNorm)):
            module.reset_parameters()


class GroupVQModel(GroupVQPreTrainedModel):
    """Group-VQ tokenizer: `encode` pixels to codes, `decode` / `decode_indices` back, `resize_codebook`."""

    def __init__(self, config: GroupVQConfig):
        super().__init__(config)
        if config.backbone == "vit":  # ViT-VQGAN (Yu et al. 2021): patch transformer encoder, mirrored decoder
            vit = dict(
                image_size=config.sample_size, patch_size=config.patch_size, hidden_size=config.hidden_size,
                num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads, mlp_ratio=config.mlp_ratio,
            )
            self.encoder = ViTEncoder(config.in_channels, config.latent_channels, **vit)
        elif config.backbone == "simvq":  # SimVQ's network (Table 1's VQGAN rows): no attention, no quant_conv
            simvq = dict(
                block_out_channels=tuple(config.block_out_channels), layers_per_block=config.layers_per_block,
                norm_num_groups=config.norm_num_groups,
            )
            self.encoder = SimVQEncoder(config.in_channels, config.latent_channels, **simvq)
        else:  # diffusers' VQModel blocks, with the arguments VQModel gives them
            vqgan = dict(
                block_out_channels=tuple(config.block_out_channels), layers_per_block=config.layers_per_block,
                act_fn=config.act_fn, norm_num_groups=config.norm_num_groups,
                mid_block_add_attention=config.mid_block_add_attention,
            )
            self.encoder = Encoder(
                in_channels=config.in_channels, out_channels=config.latent_channels,
                down_block_types=tuple(config.down_block_types), double_z=False, **vqgan,
            )
        has_quant_conv = config.backbone != "simvq"
        self.quant_conv = nn.Conv2d(config.latent_channels, config.codebook_dim, 1) if has_quant_conv else nn.Identity()
        quantizer_class = L2NormalizedGroupVectorQuantizer if config.l2_normalize_codes else GroupVectorQuantizer
        self.quantizer = quantizer_class(config.codebook_size, config.codebook_dim, **quantizer_arguments(config))
        self.post_quant_conv = (
            nn.Conv2d(config.codebook_dim, config.latent_channels, 1) if has_quant_conv else nn.Identity()
        )
        if config.backbone == "vit":
            self.decoder = ViTDecoder(config.latent_channels, config.out_channels, **vit)
        elif config.backbone == "simvq":
            self.decoder = SimVQDecoder(config.latent_channels, config.out_channels, **simvq)
        else:
            self.decoder = Decoder(
                in_channels=config.latent_channels, out_channels=config.out_channels,
                up_block_types=tuple(config.up_block_types), norm_type=config.norm_type, **vqgan,
            )
        self.post_init()

    # ----------------------------------------------------------------------------------------- checks
    def _check_pixels(self, pixel_values) -> torch.Tensor:
        """The rule GroupVQVAE applies too (`groupvq_hf.shells.prepare_pixels`): shape, dtype, size, batch, NaN/inf,
        range (a warning); returns the pixels in the encoder's dtype (float64 / fp16 / bf16 pixels are converted)."""
        config, dtype = self.config, next(self.encoder.parameters()).dtype
        return prepare_pixels(pixel_values, "pixel_values", config.in_channels, config.downsample_factor, dtype, self,
                              self.check_finite)

    @property
    def check_finite(self) -> bool:
        """Raise ValueError on NaN/inf pixels or latents (one reduction each); False skips both checks."""
        return self.quantizer.check_finite

    @check_finite.setter
    def check_finite(self, value: bool) -> None:
        self.quantizer.check_finite = bool(value)

    # ----------------------------------------------------------------------------------------- API
    def encode(self, pixel_values: torch.Tensor, return_dict: bool = True) -> GroupVQEncoderOutput | tuple:
        """Encode pixels in [-1, 1] to latents, quantised latents and (B, h, w) code indices."""
        pixel_values = self._check_pixels(pixel_values)
        latents = self.quant_conv(self.encoder(pixel_values))
        quantized, loss, (perplexity, _, indices) = self.quantizer(latents)
        out = GroupVQEncoderOutput(
            latents=latents, quantized=quantized, indices=indices, commitment_loss=loss, perplexity=perplexity
        )
        return out if return_dict else out.to_tuple()

    def decode(self, quantized: torch.Tensor) -> torch.Tensor:
        """Decode quantised latents (B, codebook_dim, h, w) to images (B, out_channels, H, W)."""
        if not isinstance(quantized, torch.Tensor) or quantized.ndim != 4 or quantized.shape[1] != self.config.codebook_dim:
            got = tuple(quantized.shape) if isinstance(quantized, torch.Tensor) else type(quantized).__name__
            raise ValueError(f"`quantized` must have shape (batch, {self.config.codebook_dim}, h, w), got {got}.")
        if not quantized.is_floating_point():
            raise ValueError(f"`quantized` must be a floating-point tensor, got {quantized.dtype}.")
        check_input(quantized, "quantized", check_finite=False)
        quantized = quantized.to(self.decoder.conv_out.weight.dtype)  # the quantizer stays fp32 in a bf16 model
        hidden = self.post_quant_conv(quantized)
        return self.decoder(hidden, quantized if self.config.norm_type == "spatial" else None)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Decode code indices (B, h, w) to images."""
        if not isinstance(indices, torch.Tensor) or indices.ndim != 3:
            got = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__
            raise ValueError(f"`indices` must be an integer tensor of shape (batch, h, w), got {got}.")
        check_input(indices, "indices")
        b, h, w = indices.shape
        codes = self.quantizer.get_codebook_entry(indices, (b, h, w, self.config.codebook_dim))
        return self.decode(codes)

    def forward(self, pixel_values: torch.Tensor, return_dict: bool = True) -> GroupVQModelOutput | tuple:
        enc = self.encode(pixel_values)
        out = GroupVQModelOutput(
            reconstruction=self.decode(enc.quantized),
            indices=enc.indices,
            commitment_loss=enc.commitment_loss,
            latents=enc.latents,
            quantized=enc.quantized,
            perplexity=enc.perplexity,
        )
        return out if return_dict else out.to_tuple()

    def resize_codebook(self, new_size, mode: str = "extend", seed: int | None = None) -> list[int]:
        """Resize the codebook without training (Algorithm 2) and update the config so save/load round-trips.

        See [`GroupVectorQuantizer.resize_codebook`]. Returns the new group sizes.
        """
        sizes, update = resize_quantizer(self.quantizer, self.config.trained_group_sizes, new_size, mode, seed)
        for key, value in update.items():  # the same update as GroupVQVAE's (groupvq_hf.shells.resize_codebook)
            setattr(self.config, key, value)
        return sizes

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, refusing a checkpoint without the quantizer's frozen cores
        (`groupvq_hf.shells.check_loaded_cores`) instead of drawing new ones."""
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        check_loaded_cores(info, pretrained_model_name_or_path)
        return (model, info) if wants_info else model

    def default_image_processor(self) -> GroupVQImageProcessor:
        """The image processor matching this model's training resolution (`config.sample_size`)."""
        return GroupVQImageProcessor.for_resolution(self.config.sample_size)

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus the image processor (`preprocessor_config.json` and its code)
        when the folder has none, so `push_to_hub` publishes a complete tokenizer. The main process writes into a
        temporary folder swapped into place (`groupvq_hf.shells.save_folder`): a reader, or a second save at the
        same time, never leaves a config of one save beside the weights of another."""
        hub_keys = ("repo_id", "commit_message", "commit_description", "private", "create_pr", "revision")
        hub_kwargs = {key: kwargs.pop(key) for key in hub_keys if key in kwargs}
        is_main = args[0] if args else kwargs.get("is_main_process", True)
        has_processor = os.path.exists(os.path.join(save_directory, "preprocessor_config.json"))
        save_model = super().save_pretrained

        def write(folder):
            result = save_model(folder, *args, **kwargs)
            if is_main and not has_processor:
                self.default_image_processor().save_pretrained(folder)
            return result

        result = save_folder(save_directory, write, "model.safetensors") if is_main else write(save_directory)
        if push_to_hub and is_main:  # after the processor is written (transformers would upload before it)
            repo_id = hub_kwargs.pop("repo_id", None) or os.path.basename(os.path.normpath(save_directory))
            self.push_to_hub(repo_id, token=kwargs.get("token"), **hub_kwargs)
        return result

    # ----------------------------------------------------------------------------------------- diffusers
    @classmethod
    def config_from_diffusers(cls, diffusers_config) -> GroupVQConfig:
        """A `GroupVQConfig` from a `GroupVQVAE` (or `VQModel`) config mapping."""
        cfg = dict(diffusers_config)
        kwargs = {key: cfg[key] for key in ARCHITECTURE_KEYS + CARRIED_CONFIG_KEYS if cfg.get(key) is not None}
        for dst, src in DIFFUSERS_CONFIG_NAMES.items():
            if cfg.get(src) is not None:
                kwargs[dst] = cfg[src]
        kwargs.setdefault("codebook_dim", cfg.get("latent_channels", 3))
        if "num_groups" in cfg:  # a GroupVQVAE config (a plain VQModel's codebook is converted as it is)
            kwargs = fill_legacy_core_std(kwargs, cfg)
        kwargs.setdefault("num_groups", 1)
        kwargs.setdefault("codebook_rank", None)
        return GroupVQConfig(**kwargs)

    @classmethod
    def from_diffusers(cls, vae) -> GroupVQModel:
        """Lossless conversion from a diffusers `GroupVQVAE`: same weights, same codebook, identical outputs."""
        if not hasattr(getattr(vae, "quantize", None), "resize_codebook"):
            raise ValueError("`vae` must be a GroupVQVAE (its `quantize` must be a GroupVectorQuantizer).")
        # the group layout as the quantizer holds it (as GroupVQVAE.from_groupvq: `groupvq_hf.shells.quantizer_config`)
        layout = {**quantizer_config(vae.config, vae.quantize), "num_vq_embeddings": vae.quantize.codebook_size}
        model = cls(cls.config_from_diffusers({**vae.config, **layout}))
        state = rename_quantizer_keys(vae.state_dict(), to="transformers")
        # assign=True keeps each tensor's own dtype and device (a quantizer kept in fp32 beside a bf16 VQGAN stays so).
        model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True, assign=True)
        return model.train(vae.training)


GroupVQModel.register_for_auto_class("AutoModel")

__all__ = ["GroupVQModel", "GroupVQPreTrainedModel", "GroupVQEncoderOutput", "GroupVQModelOutput"]
