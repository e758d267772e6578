"""SimVQ Lightning checkpoints (`youngsheen/SimVQ`) -> a k = 1 `GroupVQModel` with the "simvq" backbone.

SimVQ is Group-VQ with one group: its frozen codebook `quantize.embedding.weight` (n x d, drawn from N(0, 1/d)) is
the core, its trained `quantize.embedding_proj` (codebook = E W^T + b) the projector. The conversion is

    encoder.* / decoder.*              -> encoder.* / decoder.* (same names: `simvq_backbone.py` keeps SimVQ's)
    quantize.embedding.weight  (n, d)  -> quantizer.core   (1, n, d)    rank r = d
    quantize.embedding_proj.weight (W) -> quantizer.weight (1, d, d) = W^T
    quantize.embedding_proj.bias   (b) -> quantizer.bias   (1, d)

with `core_std = d**-0.5` recorded in the config, so Algorithm 2 (`resize_codebook`) draws new core rows from SimVQ's
own N(0, 1/d). The EMA weights (`model_ema.<parameter name without dots>`, SimVQ's `LitEma`) replace the trained
parameters by default when the checkpoint has them; the frozen core has no shadow and is taken as stored.
The discriminator and LPIPS weights (`loss.*`, their shadows, `lpips_*`/`inception_model`) are dropped (the raw
discriminator is kept, checked key by key, with `keep_discriminator` / `--keep_discriminator`); any other
key, or a key the model needs and the checkpoint lacks, is an error naming it. Checkpoints are read with
`torch.load(..., weights_only=True)`: one holding pickled objects other than tensors and plain containers is refused.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from functools import partial

import torch

from ..configuration_groupvq import GroupVQConfig
from ..modeling_groupvq import GroupVQModel
from ..training.finetune import checked_state_dict, discriminator_settings, patchgan_settings, save_discriminator
from ..training.losses import PatchGANDiscriminator
from .conversion import save_converted

EMA_PREFIX = "model_ema."
# LitEma's own counters, stored beside the shadows.
EMA_COUNTERS = ("model_ema.decay", "model_ema.num_updates")
# Training-only modules of SimVQ's Lightning model: the GAN/LPIPS loss (`loss.*`) and metric networks.
DROPPED_PREFIXES = ("loss.", "lpips_vgg.", "lpips_alex.", "inception_model.")
QUANTIZER_RENAMES = {
    "quantize.embedding.weight": "quantizer.core",
    "quantize.embedding_proj.weight": "quantizer.weight",
    "quantize.embedding_proj.bias": "quantizer.bias",
}
FROZEN_KEYS = ("quantize.embedding.weight",)  # no EMA shadow
DISCRIMINATOR_PREFIX = "loss.discriminator."  # kept with keep_discriminator (taming's NLayerDiscriminator)


def _model_section(config: Mapping) -> Mapping:
    """The `VQModel` arguments of a SimVQ YAML: `model.init_args` (LightningCLI), `model.params`, or the mapping."""
    section = config.get("model", config)
    if isinstance(section, Mapping):
        section = section.get("init_args", section.get("params", section))
    if not isinstance(section, Mapping) or "ddconfig" not in section or "quantconfig" not in section:
        raise ValueError(
            "`config` must be a SimVQ config with `model.init_args.ddconfig` and `model.init_args.quantconfig` "
            "(as SimVQ's configs/imagenet_simvq_128_B.yaml)."
        )
    return section


def simvq_config(config: str | os.PathLike | Mapping) -> GroupVQConfig:
    """The k = 1 "simvq"-backbone `GroupVQConfig` of a SimVQ YAML config (a path or the loaded mapping)."""
    if not isinstance(config, Mapping):
        import yaml

        with open(config, encoding="utf-8") as f:
            config = yaml.safe_load(f)
        if not isinstance(config, Mapping):
            raise ValueError("`config` must be a YAML mapping (a SimVQ config file).")
    section = _model_section(config)
    dd, quant = section["ddconfig"], section["quantconfig"]
    target = str(quant.get("target", ""))
    if target.rsplit(".", 1)[-1] != "SimVQ":
        raise ValueError(f"`quantconfig.target` must be SimVQ's quantizer (taming...quantize.SimVQ), got {target!r}.")
    params = quant.get("params", {})
    for key in ("n_e", "e_dim"):
        if key not in params:
            raise ValueError(f"`quantconfig.params` lacks {key!r}.")
    if params.get("legacy", True):  # SimVQ's default is legacy=True
        raise ValueError(
            "`quantconfig.params.legacy` is true (SimVQ's default): that loss is mean((sg(q) - z)^2) + "
            "beta*mean((q - sg(z))^2), beta on the other term; GroupVectorQuantizer implements legacy=false, "
            "beta*mean((z - sg(q))^2) + mean((sg(z) - q)^2). Set `legacy: false` in the YAML to convert anyway "
            "(encodings and reconstructions are the same; only the training loss differs)."
        )
    if dd.get("double_z", False):
        raise ValueError("`ddconfig.double_z` must be false (SimVQ's encoder outputs `z_channels` channels).")
    ch_mult = list(dd.get("ch_mult", (1, 2, 2, 4)))
    if not ch_mult or ch_mult[0] != 1:
        raise ValueError(f"`ddconfig.ch_mult` must start with 1 (conv_in outputs `ch` channels), got {ch_mult}.")
    e_dim = int(params["e_dim"])
    if int(dd["z_channels"]) != e_dim:
        raise ValueError(
            f"`ddconfig.z_channels` ({dd['z_channels']}) must equal `quantconfig.params.e_dim` ({e_dim}): SimVQ "
            "quantises the encoder output directly."
        )
    return GroupVQConfig(
        backbone="simvq",
        in_channels=int(dd.get("in_channels", 3)),
        out_channels=int(dd.get("out_ch", 3)),
        block_out_channels=[int(dd["ch"]) * int(m) for m in ch_mult],
        layers_per_block=int(dd["num_res_blocks"]),
        latent_channels=e_dim,
        norm_num_groups=32,  # SimVQ's GroupNorm(32, ...)
        mid_block_add_attention=False,
        sample_size=int(dd.get("resolution", 128)),
        codebook_size=int(params["n_e"]),
        num_groups=1,
        codebook_rank=e_dim,
        codebook_dim=e_dim,
        commitment_beta=float(params.get("beta", 0.25)),
        core_std=e_dim**-0.5,
    )


def load_simvq_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The `state_dict` of a SimVQ Lightning checkpoint, read with `weights_only=True` (a bare state dict also works)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"`checkpoint` {str(path)!r} holds pickled objects other than tensors and plain containers, which are "
            "never unpickled here (torch.load weights_only=True). In an environment you trust, keep only its "
            "weights: torch.save({'state_dict': torch.load(path, weights_only=False)['state_dict']}, 'clean.ckpt'). "
            f"torch said: {str(err).splitlines()[0]}"
        ) from None
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"`checkpoint` {str(path)!r} must hold a SimVQ Lightning checkpoint with a `state_dict`.")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"`checkpoint` state_dict entry {bad[0]!r} is a {type(state[bad[0]]).__name__}, not a tensor.")
    return dict(state)


def _dropped(key: str) -> bool:
    """LitEma's counters, the training-only modules and their shadows (`model_ema.lossdiscriminator...`)."""
    if key in EMA_COUNTERS or key.startswith(DROPPED_PREFIXES):
        return True
    dotless_prefixes = tuple(prefix.replace(".", "") for prefix in DROPPED_PREFIXES)
    return key.startswith(EMA_PREFIX) and key[len(EMA_PREFIX):].startswith(dotless_prefixes)


def simvq_state_dict(
    state: Mapping[str, torch.Tensor], model: GroupVQModel, ema: bool | None = None
) -> tuple[dict[str, torch.Tensor], bool]:
    """Map a SimVQ state dict onto `model`'s names (see the module docstring); returns `(state_dict, used_ema)`.

    `ema`: True uses the `model_ema.*` shadows (every trainable parameter must have one), False the raw weights,
    None the shadows when the checkpoint has any. Raises ValueError naming the first unknown, missing or misshapen key.
    """
    expected = model.state_dict()
    to_simvq = {ours: theirs for theirs, ours in QUANTIZER_RENAMES.items()}
    wanted = {to_simvq.get(key, key): key for key in expected}  # SimVQ name -> our name
    model_keys = [k for k in state if not _dropped(k) and not k.startswith(EMA_PREFIX)]
    unknown = [k for k in model_keys if k not in wanted]
    if unknown:
        raise ValueError(f"`checkpoint` key {unknown[0]!r} has no place in the config's model (unknown keys: {unknown}).")
    missing = [k for k in wanted if k not in state]
    if missing:
        raise ValueError(f"`checkpoint` lacks {missing[0]!r}, which the config's model needs (missing: {missing}).")
    # LitEma names a shadow by its parameter's name with the dots removed; the frozen core has none.
    by_dotless: dict[str, str] = {}
    for key in wanted:
        if key in FROZEN_KEYS:
            continue
        dotless = key.replace(".", "")
        if dotless in by_dotless:
            raise ValueError(f"Parameters {by_dotless[dotless]!r} and {key!r} share the EMA name {dotless!r}.")
        by_dotless[dotless] = key
    shadows = {k for k in state if k.startswith(EMA_PREFIX) and not _dropped(k)}
    stray = sorted(s for s in shadows if s[len(EMA_PREFIX):] not in by_dotless)
    if stray:
        raise ValueError(f"`checkpoint` EMA key {stray[0]!r} shadows no parameter of the model (unknown: {stray}).")
    use_ema = bool(shadows) if ema is None else bool(ema)
    source = dict(state)
    if use_ema:
        lacking = [EMA_PREFIX + d for d in by_dotless if EMA_PREFIX + d not in shadows]
        if lacking:
            owner = by_dotless[lacking[0][len(EMA_PREFIX):]]
            hint = " (it has no EMA weights: convert the raw ones with ema=False / --no_ema)" if not shadows else ""
            raise ValueError(f"`checkpoint` lacks the EMA shadow {lacking[0]!r} of parameter {owner!r}{hint}.")
        source.update({key: state[EMA_PREFIX + d] for d, key in by_dotless.items()})
    mapped = {}
    for theirs, ours in wanted.items():
        value = source[theirs]
        if theirs == "quantize.embedding_proj.weight":
            value = value.t()  # codebook = E W^T + b = core @ weight + bias
        value = value.unsqueeze(0) if theirs in QUANTIZER_RENAMES else value  # one group
        if value.shape != expected[ours].shape:
            drop = 1 if theirs in QUANTIZER_RENAMES else 0
            raise ValueError(
                f"`checkpoint` key {theirs!r} has shape {tuple(source[theirs].shape)}, but the config's model needs "
                f"{tuple(expected[ours].shape[drop:])}{' (transposed)' if theirs.endswith('proj.weight') else ''}."
            )
        mapped[ours] = value.to(expected[ours].dtype)
    return mapped, use_ema


def from_simvq(
    checkpoint: str | os.PathLike, config: str | os.PathLike | Mapping, ema: bool | None = None
) -> GroupVQModel:
    """A `GroupVQModel` (backbone "simvq", k = 1) holding a SimVQ checkpoint's weights, in eval mode.

    `checkpoint`: SimVQ's Lightning `.ckpt`; `config`: its YAML (path or mapping); `ema`: see `simvq_state_dict`.
    The model's encoder, quantizer and decoder reproduce SimVQ's `encode`/`decode` (indices exactly).
    """
    return _from_simvq(load_simvq_checkpoint(checkpoint), config, ema)[0]


def _from_simvq(state, config, ema) -> tuple[GroupVQModel, bool]:
    model = GroupVQModel(simvq_config(config))
    mapped, used_ema = simvq_state_dict(state, model, ema=ema)
    model.load_state_dict(mapped, strict=True)
    return model.eval(), used_ema


def simvq_discriminator(state: Mapping[str, torch.Tensor]) -> PatchGANDiscriminator:
    """The `PatchGANDiscriminator` holding a SimVQ state dict's discriminator (`loss.discriminator.*`, the raw
    weights: taming's `NLayerDiscriminator`, which has its layout key for key).

    Its settings (input and base channels, layers) are read from the keys (`training.finetune.patchgan_settings`);
    every key must then be one of the discriminator's with its shape: ValueError naming the first unknown, missing or
    misshapen `loss.discriminator.` key.
    """
    source = "`checkpoint` discriminator (`loss.discriminator.*`)"
    weights = {k[len(DISCRIMINATOR_PREFIX):]: v for k, v in state.items() if k.startswith(DISCRIMINATOR_PREFIX)}
    if not weights:
        raise ValueError("`checkpoint` holds no discriminator (`loss.discriminator.*` keys) to keep.")
    try:
        settings = patchgan_settings(weights)
    except ValueError as err:
        raise ValueError(f"{source} is {err}") from None
    discriminator = PatchGANDiscriminator(settings["in_channels"], settings["disc_channels"], settings["disc_layers"])
    discriminator.load_state_dict(checked_state_dict(discriminator, weights, source, prefix=DISCRIMINATOR_PREFIX))
    return discriminator


def convert_simvq(
    checkpoint: str | os.PathLike, config: str | os.PathLike | Mapping, output_dir: str | os.PathLike,
    ema: bool | None = None, keep_discriminator: bool = False,
) -> dict:
    """Convert a SimVQ checkpoint (see `from_simvq`) and `save_pretrained` it to `output_dir`, written atomically;
    with `keep_discriminator`, SimVQ's discriminator too (`simvq_discriminator`), as the `discriminator.safetensors`
    that `scripts/train.py --init_from` loads.

    Returns a summary: `{"saved": output_dir, "ema": whether the EMA weights were used, "codebook_size": n,
    "codebook_dim": d, "discriminator": its settings or None}`.
    """
    state = load_simvq_checkpoint(checkpoint)
    model, used_ema = _from_simvq(state, config, ema)
    discriminator = simvq_discriminator(state) if keep_discriminator else None  # checked before anything is written
    save_converted(model, output_dir, None if discriminator is None else partial(save_discriminator, discriminator))
    return {"saved": str(output_dir), "ema": used_ema, "codebook_size": model.config.codebook_size,
            "codebook_dim": model.config.codebook_dim,
            "discriminator": None if discriminator is None else discriminator_settings(discriminator)}


__all__ = [
    "convert_simvq", "from_simvq", "load_simvq_checkpoint", "simvq_config", "simvq_discriminator", "simvq_state_dict",
]
