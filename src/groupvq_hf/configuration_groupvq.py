"""Configuration of the Group-VQ image tokenizer (transformers ``PreTrainedConfig``)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from .quantizer import (
    PROJECTORS,
    check_core_std,
    check_number,
    check_positive_int,
    check_trained_group_sizes,
    default_core_std,
    fill_legacy_core_std,
    is_positive_int,
    resolve_groups,
)

BACKBONES = ("vqgan", "vit", "simvq")
# Uniform groups when neither `num_groups` nor `group_sizes` is given: the paper's ImageNet setting.
DEFAULT_NUM_GROUPS = 64


# The paper's settings (section 4.1, Table 1). Use with ``GroupVQConfig.from_preset(name)``.
PRESETS: dict[str, dict] = {
    # VQGAN, ImageNet-1k, 128x128, f = 8, 16x16x128 latent, 65,536 codes in 64 groups of rank 128.
    "imagenet": dict(codebook_size=65536, num_groups=64, codebook_rank=128, codebook_dim=128),
    # VQGAN, MS-COCO: 4,096 codes in 16 groups.
    "coco": dict(codebook_size=4096, num_groups=16, codebook_rank=128, codebook_dim=128),
    # Ablations (section 4.3): 1,024 codes, 32 groups.
    "ablation": dict(codebook_size=1024, num_groups=32, codebook_rank=128, codebook_dim=128),
    # A few-second CPU model for demos and tests.
    "tiny": dict(
        codebook_size=256,
        num_groups=8,
        codebook_rank=16,
        codebook_dim=16,
        latent_channels=16,
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        mid_block_add_attention=False,
        sample_size=64,
    ),
    # ViT-VQGAN (Yu et al. 2021) on 20% of ImageNet-1k at 128x128 (Table 1): patch 8 -> 16x16 tokens, ViT-VQGAN's
    # "Small" encoder and decoder (width 512, 8 blocks, 8 heads, MLP 2048), 8,192 codes in 8 groups of rank 128.
    "vit-imagenet": dict(
        backbone="vit", patch_size=8, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, mlp_ratio=4.0,
        codebook_size=8192, num_groups=8, codebook_rank=128, codebook_dim=128,
    ),
    # The same with 16 groups (Table 1's other ViT-VQGAN Group-VQ row).
    "vit-imagenet-16": dict(
        backbone="vit", patch_size=8, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, mlp_ratio=4.0,
        codebook_size=8192, num_groups=16, codebook_rank=128, codebook_dim=128,
    ),
    # A few-second CPU ViT model for demos and tests: 32x32 pixels, patch 4 -> 8x8 tokens.
    "vit-tiny": dict(
        backbone="vit", patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2.0,
        codebook_size=256, num_groups=8, codebook_rank=16, codebook_dim=16, latent_channels=16, sample_size=32,
    ),
    # Table 1's VQGAN rows on SimVQ's network (`configs/imagenet_simvq_128_B.yaml`: ch 128, ch_mult [1, 2, 2, 4],
    # 2 residual blocks, z_channels 128, no attention, no quant_conv): 128 px, f = 8, 65,536 codes in 64 groups of
    # rank 128, d 128.
    "simvq-imagenet": dict(
        backbone="simvq", block_out_channels=(128, 256, 256, 512), layers_per_block=2, latent_channels=128,
        norm_num_groups=32, mid_block_add_attention=False, sample_size=128,
        codebook_size=65536, num_groups=64, codebook_rank=128, codebook_dim=128,
    ),
    # The same network with MS-COCO's codebook: 4,096 codes in 16 groups.
    "simvq-coco": dict(
        backbone="simvq", block_out_channels=(128, 256, 256, 512), layers_per_block=2, latent_channels=128,
        norm_num_groups=32, mid_block_add_attention=False, sample_size=128,
        codebook_size=4096, num_groups=16, codebook_rank=128, codebook_dim=128,
    ),
    # A few-second CPU SimVQ-network model (the network of the `simvq-tiny` test fixture): 32x32 pixels, f = 2.
    "simvq-tiny": dict(
        backbone="simvq", block_out_channels=(32, 64), layers_per_block=1, latent_channels=32, norm_num_groups=32,
        mid_block_add_attention=False, sample_size=32,
        codebook_size=256, num_groups=8, codebook_rank=16, codebook_dim=32,
    ),
}


def check_vit_settings(
    image_size: int, patch_size: int, hidden_size: int, num_layers: int, num_heads: int, mlp_ratio: float
) -> None:
    """Raise a ValueError naming the bad ViT setting."""
    for name, value in (
        ("patch_size", patch_size),
        ("hidden_size", hidden_size),
        ("num_hidden_layers", num_layers),
        ("num_attention_heads", num_heads),
        ("sample_size", image_size),
    ):
        check_positive_int(name, value)
    if hidden_size % num_heads:
        raise ValueError(
            f"`hidden_size`={hidden_size} must be divisible by `num_attention_heads`={num_heads}."
        )
    if image_size % patch_size:
        raise ValueError(
            f"`sample_size`={image_size} must be divisible by `patch_size`={patch_size} "
            "(the position embeddings cover the sample_size / patch_size grid)."
        )
    check_number("mlp_ratio", mlp_ratio, strict=True)
    if int(hidden_size * mlp_ratio) < 1:
        raise ValueError(f"`mlp_ratio`={mlp_ratio!r} leaves the MLP no unit: `hidden_size` * `mlp_ratio` must be >= 1.")


@strict
class GroupVQConfig(PreTrainedConfig):
    r"""
    Configuration of a [`GroupVQModel`]: a VQGAN encoder/decoder (diffusers blocks, diffusers `VQModel` names)
    around a [`GroupVectorQuantizer`]. Defaults are the paper's ImageNet setting: 128x128 input, f = 8,
    16x16x128 latent, 65,536 codes in 64 groups of rank 128.

    Args:
        codebook_size (`int`): total number of codes n.
        num_groups (`int`, *optional*): number of groups k (1 = SimVQ, n = vanilla VQ); uniform groups of n/k codes.
            Defaults to 64 (`DEFAULT_NUM_GROUPS`), or with `group_sizes` to their number; given beside `group_sizes`,
            it must be that number (or 1, the quantizer's default): another value raises.
        codebook_dim (`int`): code dimension d (channels of the quantised latent).
        codebook_rank (`int`, *optional*): rank r of every group's core; defaults to `codebook_dim`.
        group_sizes (`list[int]`, *optional*): heterogeneous group sizes n_j (Algorithm 1), summing to `codebook_size`.
        group_ranks (`list[int]`, *optional*): heterogeneous ranks r_j, one per group.
        trained_group_sizes (`list[int]`, *optional*): after a resize, how many leading codes of each group were
            trained (self-extension keeps them; resampling leaves none); None for a model as trained.
        projector (`str`): "linear" (paper default), "mlp" or "linear+mlp" (Table 3).
        commitment_beta (`float`): weight of the commitment (encoder) term of the quantizer loss
            `commitment_beta * ||z - sg(q)||^2 + ||sg(z) - q||^2`, whose codebook term has weight 1. The paper's Eq. 3
            writes `beta ||Q - sg[Z]||^2 + gamma ||Z - sg[Q]||^2`: `commitment_beta` is its gamma, with its beta = 1.
            (The name is kept: saved configs carry it.)
        core_std (`float`, *optional*): the frozen cores' distribution P = N(0, core_std^2 I) (section 3.3), used at
            initialisation and by every resize (Algorithm 2: resampled and self-extended rows come from the same P).
            Defaults to `codebook_dim ** -0.5`, SimVQ's N(0, 1/d), so initial codes have SimVQ's per-coordinate
            std 1/sqrt(3d). A config saved before this field existed loads with 1.0 (N(0, I), as it was trained).
        in_channels, out_channels, down_block_types, up_block_types, block_out_channels, layers_per_block,
        act_fn, latent_channels, norm_num_groups, norm_type, mid_block_add_attention, sample_size, scaling_factor:
            as in diffusers' `VQModel`; block types default to one plain down/up block per `block_out_channels` entry.
            Used by the "vqgan" backbone only (`sample_size` and the channel counts are used by all backbones;
            "simvq" also uses `block_out_channels` (SimVQ's `ch * ch_mult`), `layers_per_block` (its
            `num_res_blocks`) and `norm_num_groups`).
        backbone (`str`): "vqgan" (convolutional, diffusers blocks; default), "vit" (ViT-VQGAN, Yu et al. 2021) or
            "simvq" (SimVQ's convolutional network, `simvq_backbone.py`: bias-free residual blocks, no attention,
            no `quant_conv`/`post_quant_conv`, so `latent_channels` must equal `codebook_dim`).
        patch_size, hidden_size, num_hidden_layers, num_attention_heads, mlp_ratio: the "vit" backbone's patch size
            (its downsampling factor), transformer width, depth, heads and MLP width / `hidden_size`, shared by the
            encoder and its mirrored decoder. Position embeddings cover the `sample_size / patch_size` grid.
        l2_normalize_codes (`bool`): ViT-VQGAN's factorised lookup: latents and codes are l2-normalised and Eq. 1 is
            searched there; with `codebook_dim` < `latent_channels` the lookup space is also low-dimensional.
    """

    model_type = "groupvq"

    codebook_size: int = 65536
    num_groups: int | None = None
    codebook_dim: int = 128
    codebook_rank: int | None = 128
    group_sizes: list[int] | tuple[int, ...] | None = None
    group_ranks: list[int] | tuple[int, ...] | None = None
    trained_group_sizes: list[int] | tuple[int, ...] | None = None
    projector: str = "linear"
    commitment_beta: float | int = 0.25
    core_std: float | int | None = None
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: list[str] | tuple[str, ...] | None = None
    up_block_types: list[str] | tuple[str, ...] | None = None
    block_out_channels: list[int] | tuple[int, ...] = (128, 256, 256, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 128
    norm_num_groups: int = 32
    norm_type: str = "group"
    mid_block_add_attention: bool = True
    sample_size: int = 128
    scaling_factor: float | int = 1.0
    backbone: str = "vqgan"
    patch_size: int = 8
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    mlp_ratio: float | int = 4.0
    l2_normalize_codes: bool = False

    def __post_init__(self, **kwargs):
        # Validation happens before super().__post_init__ so that it surfaces as a plain ValueError under @strict.
        for name in ("codebook_dim", "norm_num_groups", "in_channels", "out_channels", "latent_channels",
                     "layers_per_block", "sample_size"):  # fmt: skip
            check_positive_int(name, getattr(self, name))
        if self.num_groups is None and self.group_sizes is None:
            self.num_groups = DEFAULT_NUM_GROUPS
        # the quantizer's rules (GroupVQVAE's too): entries checked as given, a contradicting `num_groups` refused
        sizes, ranks = resolve_groups(
            self.codebook_size, self.num_groups, self.codebook_rank, self.group_sizes, self.group_ranks, self.codebook_dim
        )
        self.num_groups = len(sizes)
        if self.group_sizes is not None:
            self.group_sizes = sizes
        if self.group_ranks is not None:
            self.group_ranks = ranks
        self.trained_group_sizes = check_trained_group_sizes(self.trained_group_sizes, sizes)
        if self.projector not in PROJECTORS:
            raise ValueError(f"`projector` must be one of {PROJECTORS}, got {self.projector!r}.")
        self.commitment_beta = check_number("commitment_beta", self.commitment_beta)
        self.scaling_factor = check_number("scaling_factor", self.scaling_factor, strict=True)
        self.core_std = default_core_std(self.codebook_dim) if self.core_std is None else check_core_std(self.core_std)
        if not self.block_out_channels or not all(is_positive_int(c) for c in self.block_out_channels):
            raise ValueError(f"`block_out_channels` must be a non-empty list of positive ints, got {self.block_out_channels!r}.")
        self.block_out_channels = [int(c) for c in self.block_out_channels]
        n_blocks = len(self.block_out_channels)
        if self.down_block_types is None:
            self.down_block_types = ["DownEncoderBlock2D"] * n_blocks
        if self.up_block_types is None:
            self.up_block_types = ["UpDecoderBlock2D"] * n_blocks
        self.down_block_types, self.up_block_types = list(self.down_block_types), list(self.up_block_types)
        for name in ("down_block_types", "up_block_types"):
            if len(getattr(self, name)) != n_blocks:
                raise ValueError(
                    f"`{name}` needs one entry per `block_out_channels` entry ({n_blocks}), got {getattr(self, name)}."
                )
        if self.backbone not in BACKBONES:
            raise ValueError(f"`backbone` must be one of {BACKBONES}, got {self.backbone!r}.")
        if self.backbone != "vit" and self.sample_size % self.downsample_factor:  # vit: check_vit_settings
            raise ValueError(
                f"`sample_size`={self.sample_size} must be divisible by the downsampling factor {self.downsample_factor} "
                f"of backbone={self.backbone!r} (2 ** (len(block_out_channels) - 1)): the image processor crops images "
                "to `sample_size` and the encoder takes only multiples of the factor."
            )
        if self.backbone == "vit":
            check_vit_settings(
                self.sample_size, self.patch_size, self.hidden_size, self.num_hidden_layers,
                self.num_attention_heads, self.mlp_ratio,
            )
            if self.norm_type != "group":
                raise ValueError(
                    f"`norm_type`={self.norm_type!r} is a VQGAN decoder option; use 'group' with backbone='vit'."
                )
        if self.backbone == "simvq":
            if self.latent_channels != self.codebook_dim:
                raise ValueError(
                    f"backbone='simvq' has no `quant_conv`: `latent_channels` ({self.latent_channels}) must equal "
                    f"`codebook_dim` ({self.codebook_dim})."
                )
            if self.norm_type != "group":
                raise ValueError(
                    f"`norm_type`={self.norm_type!r} is a VQGAN decoder option; use 'group' with backbone='simvq'."
                )
        # GroupNorms act on the block channels only (the latent is convolved, never normalised).
        bad_norm = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad_norm and self.norm_type == "group" and self.backbone in ("vqgan", "simvq"):
            raise ValueError(
                f"`norm_num_groups`={self.norm_num_groups} must divide every entry of `block_out_channels` "
                f"{self.block_out_channels}; {bad_norm} do not."
            )
        if self.norm_type not in ("group", "spatial"):
            raise ValueError(f"`norm_type` must be 'group' or 'spatial', got {self.norm_type!r}.")
        if self.norm_type == "spatial" and self.codebook_dim != self.latent_channels:
            raise ValueError(
                f"`norm_type`='spatial' feeds the codes to the decoder's SpatialNorm, so `codebook_dim` "
                f"({self.codebook_dim}) must equal `latent_channels` ({self.latent_channels})."
            )
        super().__post_init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        return super().from_dict(fill_legacy_core_std(config_dict, kwargs), **kwargs)

    @property
    def downsample_factor(self) -> int:
        """Spatial reduction f of the encoder: VQGAN halves it in every block but the last; ViT: `patch_size`."""
        if self.backbone == "vit":
            return self.patch_size
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GroupVQConfig:
        """A config from one of the settings in `PRESETS`: "imagenet", "coco", "ablation", "tiny", "vit-imagenet",
        "vit-imagenet-16", "vit-tiny", "simvq-imagenet", "simvq-coco" or "simvq-tiny"."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; expected one of {sorted(PRESETS)}.")
        preset = dict(PRESETS[name])
        if overrides.get("group_sizes") is not None:  # the caller's list decides the number of groups
            preset.pop("num_groups", None)
        return cls(**{**preset, **overrides})


GroupVQConfig.register_for_auto_class()

__all__ = ["GroupVQConfig", "PRESETS"]
