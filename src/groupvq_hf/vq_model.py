"""Group-VQ as a diffusers model: ``GroupVQVAE``, a drop-in ``diffusers.VQModel``.

``GroupVQVAE`` is ``VQModel`` with its ``quantize`` replaced by the ``GroupVectorQuantizer`` (paper Eq. 7, Algorithm
1) that the transformers ``GroupVQModel`` also uses; every other block, name and behaviour is ``VQModel``'s, so the
pipelines that take a ``VQModel`` (LDM, LDM super-resolution, Kandinsky 2.2's ``movq``, aMUSEd, VQ-Diffusion) take it
unchanged. State dicts map 1:1 to ``GroupVQModel``'s (``quantize.*`` <-> ``quantizer.*``).

This file travels to the Hub as remote code next to the model files it imports (``REMOTE_CODE_FILES``, computed from
its relative imports): it imports each of them directly, since diffusers copies just the direct relative imports of the
file named in ``auto_map``.
"""

from __future__ import annotations

import os
import shutil

import torch
from diffusers import ModelMixin, VQModel  # noqa: F401  (pipelines look `ModelMixin` up in this module's namespace)
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.utils.accelerate_utils import apply_forward_hook

from .fileio import relative_import_files
from .quantizer import (
    QUANTIZER_CONFIG_KEYS,
    GroupVectorQuantizer,
    check_trained_group_sizes,
    fill_legacy_core_std,
)
from .shells import (
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

# Files a saved GroupVQVAE folder carries so `AutoModel.from_pretrained(folder, trust_remote_code=True)` and a
# pipeline custom component load without groupvq_hf: this file and its relative imports.
REMOTE_CODE_FILES = tuple(relative_import_files(__file__))
# Config keys that change nothing in the weights: the only ones `from_groupvq`/`from_vqmodel` let a caller override.
RUNTIME_CONFIG_KEYS = ("lookup_from_codebook", "force_upcast", "scaling_factor", "sample_size")
VQMODEL_CONFIG_KEYS = (
    "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels", "layers_per_block",
    "act_fn", "latent_channels", "sample_size", "num_vq_embeddings", "norm_num_groups", "vq_embed_dim",
    "scaling_factor", "norm_type", "mid_block_add_attention", "lookup_from_codebook", "force_upcast",
)


def _shape_of(value) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


class GroupVQVAE(VQModel):
    r"""
    A diffusers [`VQModel`] whose quantizer is a Group-VQ codebook of `num_groups` independently reparameterised
    groups `G_j = core_j @ W_j + b_j` (paper Eq. 7).

    Takes every `VQModel` argument with `VQModel`'s defaults (`num_vq_embeddings` is the codebook size n,
    `vq_embed_dim` the code dimension d, defaulting to `latent_channels`), plus:

    Parameters:
        num_groups (`int`, defaults to 1): number of uniform groups k (1 = SimVQ, n = vanilla VQ); with `group_sizes`,
            1 or their number (another value raises).
        codebook_rank (`int`, *optional*): rank r of every group's frozen core; defaults to the code dimension.
        group_sizes (`list[int]`, *optional*): heterogeneous group sizes n_j (Algorithm 1), summing to
            `num_vq_embeddings`.
        group_ranks (`list[int]`, *optional*): heterogeneous ranks r_j, one per group.
        projector (`str`, defaults to `"linear"`): `"linear"`, `"mlp"` or `"linear+mlp"` (Table 3).
        commitment_beta (`float`, defaults to 0.25): weight of the commitment (encoder) term of
            `commitment_beta * ||z - sg(q)||^2 + ||sg(z) - q||^2`; the codebook term has weight 1 (the paper's Eq. 3
            gamma, with its beta = 1).
        trained_group_sizes (`list[int]`, *optional*): after `resize_codebook`, how many leading codes of each group
            were trained (self-extension keeps them, resampling leaves none); None for a model as trained.

    The quantizer stays fp32 when loaded with `torch_dtype=torch.bfloat16`/`float16` (`_keep_in_fp32_modules`): the
    search (Eq. 1) sees the codebook as trained. `check_finite` (default True) makes `encode`, `decode` and
    `forward` raise ValueError on NaN/inf input; an empty batch raises ValueError.

    `encode(x).latents` are the latents before quantisation; `decode(h)` quantises them (unless
    `force_not_quantize`), or with `lookup_from_codebook=True` and `force_not_quantize=True` decodes token indices
    `h` (B, h, w) through `quantize.get_codebook_entry`; `forward(sample)` returns `DecoderOutput(sample,
    commit_loss)` with the Group-VQ commitment loss.
    """

    _keep_in_fp32_modules = ["quantize"]  # cores, projectors, biases: as GroupVQModel's `_keep_in_fp32_modules_strict`

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
        up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",),
        block_out_channels: tuple[int, ...] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 3,
        sample_size: int = 32,
        num_vq_embeddings: int = 256,
        norm_num_groups: int = 32,
        vq_embed_dim: int | None = None,
        scaling_factor: float = 0.18215,
        norm_type: str = "group",
        mid_block_add_attention: bool = True,
        lookup_from_codebook: bool = False,
        force_upcast: bool = False,
        num_groups: int = 1,
        codebook_rank: int | None = None,
        group_sizes: list[int] | None = None,
        group_ranks: list[int] | None = None,
        projector: str = "linear",
        commitment_beta: float = 0.25,
        core_std: float | None = None,
        trained_group_sizes: list[int] | None = None,
    ):
        for name, value in (("num_vq_embeddings", num_vq_embeddings), ("latent_channels", latent_channels)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        if vq_embed_dim is not None and (not isinstance(vq_embed_dim, int) or vq_embed_dim < 1):
            raise ValueError(
                f"`vq_embed_dim` must be a positive int or None (= latent_channels), got {vq_embed_dim!r}."
            )
        if norm_type not in ("group", "spatial"):
            raise ValueError(f"`norm_type` must be 'group' or 'spatial', got {norm_type!r}.")
        code_dim = latent_channels if vq_embed_dim is None else vq_embed_dim
        try:
            arguments = quantizer_arguments(locals())  # QUANTIZER_CONFIG_KEYS, as GroupVQModel passes them
            quantize = GroupVectorQuantizer(num_vq_embeddings, code_dim, **arguments)
        except ValueError as err:
            raise ValueError(
                f"{err} (in GroupVQVAE `num_vq_embeddings` is the codebook size and `vq_embed_dim` the code dimension)"
            ) from err
        # VQModel builds the encoder, the 1x1 convs and the decoder (every argument passed by name, so its own
        # config registration records the same values as ours); its VectorQuantizer is then replaced.
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            down_block_types=down_block_types,
            up_block_types=up_block_types,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            act_fn=act_fn,
            latent_channels=latent_channels,
            sample_size=sample_size,
            num_vq_embeddings=num_vq_embeddings,
            norm_num_groups=norm_num_groups,
            vq_embed_dim=vq_embed_dim,
            scaling_factor=scaling_factor,
            norm_type=norm_type,
            mid_block_add_attention=mid_block_add_attention,
            lookup_from_codebook=lookup_from_codebook,
            force_upcast=force_upcast,
        )
        self.quantize = quantize
        self.register_to_config(core_std=quantize.core_std)  # None resolves to d^-1/2: save the value in use
        trained = check_trained_group_sizes(trained_group_sizes, quantize.group_sizes)
        if trained_group_sizes is not None:
            self.register_to_config(trained_group_sizes=trained)
        if group_sizes is not None and num_groups != len(group_sizes):
            self.register_to_config(num_groups=len(group_sizes))  # heterogeneous groups: the list decides

    # ----------------------------------------------------------------------------------------- layout
    @property
    def downsample_factor(self) -> int:
        """Spatial reduction f of the encoder (each block but the last halves the resolution)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def codebook_dim(self) -> int:
        """Code dimension d (`vq_embed_dim`, or `latent_channels` when that is None)."""
        return self.quantize.codebook_dim

    @property
    def check_finite(self) -> bool:
        """Raise ValueError on NaN/inf input or latents (one reduction each); False skips the shell's and the
        quantizer's checks."""
        return self.quantize.check_finite

    @check_finite.setter
    def check_finite(self, value: bool) -> None:
        self.quantize.check_finite = bool(value)

    # ----------------------------------------------------------------------------------------- checks
    def _check_sample(self, x, name: str = "x") -> torch.Tensor:
        """The rule GroupVQModel applies too (`groupvq_hf.shells.prepare_pixels`): shape, dtype, size, batch, NaN/inf,
        range (a warning); returns `x` in the encoder's dtype (float64 / fp16 / bf16 pixels are converted)."""
        dtype = self.encoder.conv_in.weight.dtype
        return prepare_pixels(x, name, self.config.in_channels, self.downsample_factor, dtype, self, self.check_finite)

    def _check_latents(self, h, check_finite: bool = True) -> None:
        d = self.codebook_dim
        if not isinstance(h, torch.Tensor) or h.ndim != 4 or not h.is_floating_point() or h.shape[1] != d:
            raise ValueError(
                f"`h` must be a float tensor of shape (batch, {d}, h, w) (vq_embed_dim={d}), got {_shape_of(h)}."
            )
        check_input(h, "h", check_finite and self.check_finite)

    def _token_shape(self, h, shape) -> tuple[int, int, int, int]:
        """The (B, h, w, d) shape for token indices `h`, checked against `shape` when the caller passes one."""
        d = self.codebook_dim
        if not isinstance(h, torch.Tensor) or h.is_floating_point() or h.is_complex() or h.dtype == torch.bool:
            raise ValueError(
                "With `lookup_from_codebook=True` and `force_not_quantize=True`, `h` must be an integer tensor of "
                f"code indices, got {getattr(h, 'dtype', type(h).__name__)}."
            )
        if h.ndim:
            check_input(h, "h")
        if shape is None:
            if h.ndim != 3:
                raise ValueError(
                    f"`h` of token indices must have shape (batch, h, w) when `shape` is None, got {_shape_of(h)}."
                )
            return (*h.shape, d)
        shape = tuple(int(s) for s in shape)
        # aMUSEd passes `latent_channels` as the last entry; VQ-Diffusion passes `vq_embed_dim`: both mean "d".
        valid = len(shape) == 4 and shape[-1] in (d, self.config.latent_channels)
        if not valid or shape[0] * shape[1] * shape[2] != h.numel():
            raise ValueError(
                f"`shape` must be (batch, h, w, {d}) with batch*h*w = {h.numel()} (the number of indices in `h`), "
                f"got {shape}."
            )
        return (*shape[:3], d)

    # ----------------------------------------------------------------------------------------- VQModel API
    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Pre-quantisation latents (B, d, h, w) of pixels `x` (B, C, H, W); as `VQModel.encode`."""
        return super().encode(self._check_sample(x), return_dict=return_dict)

    @apply_forward_hook
    def decode(self, h: torch.Tensor, force_not_quantize: bool = False, return_dict: bool = True, shape=None):
        """As `VQModel.decode`: quantise `h` (B, d, h, w) and decode; with `force_not_quantize=True` decode `h` as is,
        or, when `config.lookup_from_codebook`, look integer token indices `h` up in the codebook first.

        `VQModel.decode` with the looked-up codes (fp32, from the fp32 quantizer) cast to the decoder's dtype, so a
        bf16/fp16 model decodes tokens too."""
        if force_not_quantize and self.config.lookup_from_codebook:
            codes = self.quantize.get_codebook_entry(h, self._token_shape(h, shape))
            quant, commit_loss = codes.to(self.post_quant_conv.weight.dtype), torch.zeros(h.shape[0]).to(h)
        else:
            self._check_latents(h, check_finite=not force_not_quantize)  # NaN/inf latents have no nearest code
            if force_not_quantize:
                quant, commit_loss = h, torch.zeros(h.shape[0]).to(h)
            else:
                quant, commit_loss, _ = self.quantize(h)
        dec = self.decoder(self.post_quant_conv(quant), quant if self.config.norm_type == "spatial" else None)
        if not return_dict:
            return dec, commit_loss
        return DecoderOutput(sample=dec, commit_loss=commit_loss)

    def forward(self, sample: torch.Tensor, return_dict: bool = True):
        """As `VQModel.forward`: `DecoderOutput(sample, commit_loss)`; `sample` is checked as `encode` checks `x`."""
        sample = self._check_sample(sample, "sample")
        dec = self.decode(super().encode(sample).latents)  # VQModel.forward, with `sample` checked once
        return dec if return_dict else (dec.sample, dec.commit_loss)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """`ModelMixin.from_pretrained`, refusing a checkpoint without the quantizer's frozen cores
        (`groupvq_hf.shells.check_loaded_cores`, as GroupVQModel) instead of drawing new ones."""
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        check_loaded_cores(info, pretrained_model_name_or_path)
        return (model, info) if wants_info else model

    # ----------------------------------------------------------------------------------------- Group-VQ
    def resize_codebook(self, new_size, mode: str = "extend", seed: int | None = None) -> list[int]:
        """Resize the codebook without training (Algorithm 2, Eq. 11) and update the config, so `save_pretrained`
        / `from_pretrained` round-trip it. See `GroupVectorQuantizer.resize_codebook`; returns the new group sizes.

        The same path as `GroupVQModel.resize_codebook` (`groupvq_hf.shells.resize_codebook`): it records
        `trained_group_sizes` too."""
        sizes, update = resize_quantizer(self.quantize, self.config.trained_group_sizes, new_size, mode, seed)
        self.register_to_config(**{DIFFUSERS_CONFIG_NAMES.get(key, key): value for key, value in update.items()})
        return sizes

    @classmethod
    def _from_parts(cls, config: dict, state_dict: dict, strict: bool, like):
        """Build from `config`, load `state_dict`, match `like`'s device, dtype and train/eval mode.

        Returns `(model, load_state_dict result)`."""
        vae = cls(**config)
        # assign=True keeps each tensor's own dtype and device: a quantizer kept in fp32 beside a bf16 VQGAN stays so.
        result = vae.load_state_dict({k: v.detach().clone() for k, v in state_dict.items()}, strict=strict, assign=True)
        param = next(like.parameters(), None)
        if param is not None:  # what the state dict did not hold (from_vqmodel's new quantizer) follows the device
            for name, tensor in [*vae.named_parameters(), *vae.named_buffers()]:
                if name not in state_dict:
                    tensor.data = tensor.data.to(param.device)
        vae.train(getattr(like, "training", True))
        return vae, result

    @staticmethod
    def _runtime_overrides(overrides: dict) -> dict:
        bad = sorted(set(overrides) - set(RUNTIME_CONFIG_KEYS))
        if bad:
            raise ValueError(f"Only {RUNTIME_CONFIG_KEYS} may be overridden (they leave the weights valid), got {bad}.")
        return overrides

    @classmethod
    def from_groupvq(cls, model, **overrides) -> GroupVQVAE:
        """Lossless conversion from a transformers `GroupVQModel`: same weights, same codebook, identical outputs.

        Duck-typed on `model.config` (GroupVQConfig names) and `model.state_dict()` (`quantizer.*` -> `quantize.*`).
        `overrides` may set the diffusers-only keys `lookup_from_codebook`, `force_upcast`, `scaling_factor`,
        `sample_size`.
        """
        quantizer = getattr(model, "quantizer", None)
        if not hasattr(quantizer, "resize_codebook") or not hasattr(model, "config"):
            raise ValueError("`model` must be a GroupVQModel (with `config` and a GroupVectorQuantizer `quantizer`).")
        cfg = model.config
        if getattr(cfg, "backbone", "vqgan") != "vqgan":
            raise ValueError(
                f"`model` has backbone={cfg.backbone!r}; GroupVQVAE is built on diffusers' VQModel Encoder/Decoder "
                "blocks (what diffusers pipelines expect), so only backbone='vqgan' models convert. Use GroupVQModel "
                "/ AutoModel."
            )
        if getattr(cfg, "l2_normalize_codes", False):
            raise ValueError("`model` uses l2_normalize_codes=True (factorised lookup), which GroupVQVAE does not implement.")
        config = {key: getattr(cfg, key) for key in VQMODEL_CONFIG_KEYS if hasattr(cfg, key)}
        # every Group-VQ key (QUANTIZER_CONFIG_KEYS and trained_group_sizes), the group layout as the quantizer holds it
        config.update(quantizer_config(cfg, quantizer))
        config.update(num_vq_embeddings=quantizer.codebook_size, vq_embed_dim=quantizer.codebook_dim)
        config.update(cls._runtime_overrides(overrides))
        for key in ("down_block_types", "up_block_types", "block_out_channels", "group_sizes", "group_ranks"):
            if config.get(key) is not None:
                config[key] = list(config[key])
        state = rename_quantizer_keys(model.state_dict(), to="diffusers")
        return cls._from_parts(config, state, strict=True, like=model)[0]

    @classmethod
    def from_vqmodel(cls, vae, num_vq_embeddings: int | None = None, seed: int | None = None, **kwargs) -> GroupVQVAE:
        """A `GroupVQVAE` from a plain diffusers `VQModel`: encoder, decoder and 1x1 convs keep their weights, the
        Group-VQ quantizer is newly initialised (a starting point for fine-tuning).

        `num_vq_embeddings` defaults to the sum of `group_sizes` if given, else the VQModel's codebook size;
        `kwargs` take the Group-VQ arguments (`num_groups`, `codebook_rank`, `group_sizes`, `group_ranks`,
        `projector`, `commitment_beta`) and the runtime keys of `from_groupvq`. `seed` makes the new cores and
        projectors reproducible.
        """
        if not hasattr(vae, "config") or not hasattr(vae, "state_dict") or "num_vq_embeddings" not in vae.config:
            raise ValueError("`vae` must be a diffusers VQModel (its config must have `num_vq_embeddings`).")
        quantizer_kwargs = {k: kwargs.pop(k) for k in QUANTIZER_CONFIG_KEYS if k in kwargs}
        config = {key: vae.config[key] for key in VQMODEL_CONFIG_KEYS if key in vae.config}
        config.update(cls._runtime_overrides(kwargs), **quantizer_kwargs)
        if num_vq_embeddings is None and quantizer_kwargs.get("group_sizes") is not None:
            num_vq_embeddings = sum(quantizer_kwargs["group_sizes"])
        if num_vq_embeddings is not None:
            config["num_vq_embeddings"] = num_vq_embeddings
        state = {k: v for k, v in vae.state_dict().items() if not k.startswith("quantize.")}
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            new, result = cls._from_parts(config, state, strict=False, like=vae)
        unexpected = list(result.unexpected_keys)
        missing = [k for k in result.missing_keys if not k.startswith("quantize.")]
        if unexpected or missing:
            raise ValueError(f"`vae` does not match a VQModel layout: missing {missing}, unexpected {unexpected}.")
        return new

    # ----------------------------------------------------------------------------------------- saving
    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # `auto_map` (written for remote code) is no init argument: drop it instead of warning on every load.
        config_dict = {key: value for key, value in config_dict.items() if key != "auto_map"}
        return super().extract_init_dict(fill_legacy_core_std(config_dict, kwargs), **kwargs)

    def save_code(self, save_directory: str | os.PathLike) -> list[str]:
        """Copy this file and its relative imports (`REMOTE_CODE_FILES`) into `save_directory` (for `auto_map` /
        custom components)."""
        os.makedirs(save_directory, exist_ok=True)
        here = os.path.dirname(os.path.abspath(__file__))
        copied = []
        for name in REMOTE_CODE_FILES:
            target = os.path.join(save_directory, name)
            if os.path.abspath(target) != os.path.join(here, name):
                shutil.copyfile(os.path.join(here, name), target)
            copied.append(target)
        return copied

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        save_function=None,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str = "10GB",
        push_to_hub: bool = False,
        use_flashpack: bool = False,
        **kwargs,
    ):
        """`ModelMixin.save_pretrained`, with the model's code (`REMOTE_CODE_FILES`) written first so the folder, and
        what `push_to_hub` uploads from it, loads with `trust_remote_code=True` without groupvq_hf.
        Same signature as `ModelMixin.save_pretrained` (pipelines pass `safe_serialization`/`variant` by name).

        The main process writes into a temporary folder swapped into place (`groupvq_hf.shells.save_folder`): a
        reader, or a second save at the same time, never leaves a config of one save beside the weights of another
        (with `push_to_hub=True` diffusers uploads from the folder itself, which is then written in place)."""
        if use_flashpack:
            kwargs["use_flashpack"] = use_flashpack
        save_model = super().save_pretrained

        def write(folder):
            if is_main_process and not os.path.isfile(folder):
                self.save_code(folder)
            return save_model(
                folder,
                is_main_process=is_main_process,
                save_function=save_function,
                safe_serialization=safe_serialization,
                variant=variant,
                max_shard_size=max_shard_size,
                push_to_hub=push_to_hub,
                **kwargs,
            )

        if is_main_process and not push_to_hub:
            return save_folder(save_directory, write, "diffusion_pytorch_model.safetensors")
        return write(save_directory)

GroupVQVAE.register_for_auto_class("AutoModel")

__all__ = ["GroupVQVAE"]
