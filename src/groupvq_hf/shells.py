"""Rules both model shells share: the transformers `GroupVQModel` and the diffusers `GroupVQVAE`.

- input checks: pixel batches (`check_pixels`), a non-empty batch, finite values (`check_input`);
- the quantizer's arguments from a config (`quantizer_arguments`);
- one resize path: resize the quantizer and compute the config update, `trained_group_sizes` included
  (`resize_codebook`);
- the quantizer part of a config, carried generically by the conversions between the shells (`quantizer_config`);
- saving into a temporary folder swapped into place, so a reader never sees a mixed folder (`save_folder`).

This file travels to the Hub as remote code beside both shells: it imports torch, `.quantizer` and `.fileio` only.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from .fileio import atomic_directory
from .quantizer import QUANTIZER_CONFIG_KEYS

# Every Group-VQ config key the conversions carry: the quantizer's arguments and the resize record.
CARRIED_CONFIG_KEYS = (*QUANTIZER_CONFIG_KEYS, "trained_group_sizes")
# GroupVQConfig name -> GroupVQVAE (diffusers VQModel) config name; every other config key has the same name in both.
DIFFUSERS_CONFIG_NAMES = {"codebook_size": "num_vq_embeddings", "codebook_dim": "vq_embed_dim"}
# The quantizer's state dict prefix in each shell: GroupVQModel (transformers) and GroupVQVAE (diffusers' `quantize`).
TRANSFORMERS_QUANTIZER_PREFIX, DIFFUSERS_QUANTIZER_PREFIX = "quantizer.", "quantize."


def rename_quantizer_keys(state_dict: Mapping, to: str) -> dict:
    """A shell's state dict with the quantizer's keys renamed for the other shell (`to`: "transformers" or
    "diffusers"); every other key is the same in both, so this is the whole conversion of the weights."""
    new, old = (
        (TRANSFORMERS_QUANTIZER_PREFIX, DIFFUSERS_QUANTIZER_PREFIX) if to == "transformers"
        else (DIFFUSERS_QUANTIZER_PREFIX, TRANSFORMERS_QUANTIZER_PREFIX)
    )  # fmt: skip
    return {(new + k[len(old):] if k.startswith(old) else k): v for k, v in state_dict.items()}


# ---------------------------------------------------------------------------------------------------------- inputs
def check_pixels(pixels, name: str, in_channels: int, downsample_factor: int, check_finite: bool = True) -> None:
    """Raise ValueError naming `name` unless `pixels` is a float (batch, `in_channels`, H, W) tensor with H and W
    multiples of `downsample_factor`, holding at least one sample (and, if `check_finite`, no NaN/inf)."""
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4:
        got = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ValueError(f"`{name}` must be a 4-D tensor (batch, {in_channels}, H, W), got {got}.")
    if pixels.shape[1] != in_channels:
        raise ValueError(
            f"`{name}` must have {in_channels} channels (config.in_channels), "
            f"got {pixels.shape[1]} (shape {tuple(pixels.shape)})."
        )
    if not pixels.is_floating_point():
        raise ValueError(
            f"`{name}` must be a floating-point tensor in [-1, 1], got {pixels.dtype} "
            "(use GroupVQImageProcessor to convert uint8 images)."
        )
    h, w = pixels.shape[-2:]
    if h % downsample_factor or w % downsample_factor:
        raise ValueError(
            f"`{name}` height and width must be divisible by the downsampling factor {downsample_factor}, got {h}x{w}."
        )
    check_input(pixels, name, check_finite)


def check_input(tensor: torch.Tensor, name: str, check_finite: bool = True) -> None:
    """Raise ValueError naming `name` when `tensor` holds no sample (batch size 0), has an empty grid (a zero height
    or width) or, if `check_finite`, NaN/inf.

    The finiteness check is one reduction over the input; `model.check_finite = False` skips it (and the quantizer's).
    """
    if tensor.shape[0] == 0:
        raise ValueError(f"`{name}` must hold at least one sample, got batch size 0 (shape {tuple(tensor.shape)}).")
    if tensor.numel() == 0:
        raise ValueError(
            f"`{name}` has an empty grid (shape {tuple(tensor.shape)}): height and width must be at least 1, at least "
            "one token per sample."
        )
    if check_finite and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        samples = sorted({int(i) for i in (~torch.isfinite(tensor)).flatten(1).any(1).nonzero().flatten()})
        raise ValueError(
            f"`{name}` holds NaN or inf ({bad} of {tensor.numel()} values, in sample(s) {samples[:8]}); "
            "such an input has no nearest code. Set `model.check_finite = False` to skip this check."
        )


# Pixels beyond this magnitude are clearly not in [-1, 1] (a reconstruction fed back may overshoot 1 a little).
PIXEL_RANGE_LIMIT = 1.5


def prepare_pixels(pixels, name: str, in_channels: int, downsample_factor: int, dtype: torch.dtype, owner,
                   check_finite: bool = True) -> torch.Tensor:
    """`check_pixels`, then `pixels` for the encoder whose weights are `dtype`: float64 / fp16 / bf16 pixels are
    converted to `dtype` (as diffusers' pipelines cast their inputs) instead of failing inside the first
    convolution; float32 pixels pass as they are (under diffusers' layerwise casting the weights are stored in a
    lower precision but compute in float32). With
    `check_finite`, pixels clearly outside [-1, 1] (beyond +-`PIXEL_RANGE_LIMIT`, e.g. [0, 255]) warn once per
    `owner` (the model): the model still encodes them, but it was trained on [-1, 1]."""
    check_pixels(pixels, name, in_channels, downsample_factor, check_finite)
    if check_finite and not getattr(owner, "_warned_pixel_range", False):
        low, high = (float(v) for v in pixels.aminmax())
        if low < -PIXEL_RANGE_LIMIT or high > PIXEL_RANGE_LIMIT:
            import warnings

            warnings.warn(
                f"`{name}` holds values in [{low:.4g}, {high:.4g}], clearly not in [-1, 1] where the model expects "
                "pixels (GroupVQImageProcessor maps images there; for values in [0, 255] use x / 127.5 - 1). "
                "This warning is given once per model.",
                UserWarning,
                stacklevel=3,
            )
            owner._warned_pixel_range = True
    return pixels if pixels.dtype == torch.float32 else pixels.to(dtype)


def check_loaded_cores(loading_info: dict, source) -> None:
    """Raise ValueError when a loaded checkpoint lacked a quantizer core (`quantizer.core`, `quantize.core_3`, ...)
    or held one of another shape (``ignore_mismatched_sizes=True``): the frozen cores are the codebook (Eq. 7), so a
    fresh draw, or the uninitialised buffer the loader leaves, would silently give other codes. ``loading_info`` is
    what ``from_pretrained(..., output_loading_info=True)`` returns (transformers and diffusers alike)."""
    is_core = re.compile(r"(.+\.)?quantiz\w*\.core(_\d+)?").fullmatch
    missing = sorted(key for key in loading_info.get("missing_keys", ()) if is_core(key))
    if missing:
        raise ValueError(
            f"The checkpoint {str(source)!r} has no {', '.join(missing)}: the frozen cores are the codebook (Eq. 7), "
            "and a fresh draw would give other codes. Load a complete checkpoint."
        )
    mismatched = sorted(
        (key, tuple(saved), tuple(wanted)) for key, saved, wanted in loading_info.get("mismatched_keys", ()) if is_core(key)
    )
    if mismatched:
        shapes = ", ".join(f"{key} {list(saved)} (the model wants {list(wanted)})" for key, saved, wanted in mismatched)
        raise ValueError(
            f"The checkpoint {str(source)!r} holds {shapes}: a codebook of another size or number of groups. Load "
            "it with the config it was saved with; for another codebook size, resize it after loading, without "
            "training: `model.resize_codebook(new_size, mode, seed)` (Algorithm 2)."
        )


# ---------------------------------------------------------------------------------------------------------- resize
def resize_codebook(quantizer, trained_group_sizes, new_size, mode: str = "extend", seed: int | None = None):
    """Resize `quantizer` (Algorithm 2) and return `(new group sizes, config update)`.

    The update holds `codebook_size`, `num_groups`, `group_sizes` (None for uniform groups) and
    `trained_group_sizes`: self-extension keeps the trained leading codes of each group (the count recorded before,
    or every code of a model as trained); resampling leaves none. Each shell maps the names to its own config.
    """
    old_sizes = quantizer.group_sizes
    sizes = quantizer.resize_codebook(new_size, mode=mode, seed=seed)
    trained = list(trained_group_sizes or old_sizes) if mode == "extend" else [0] * len(sizes)
    update = {
        "codebook_size": sum(sizes),
        "num_groups": len(sizes),
        "group_sizes": None if quantizer.uniform else list(sizes),
        "trained_group_sizes": trained,
    }
    return sizes, update


# ---------------------------------------------------------------------------------------------------------- convert
def _setting(config, key: str):
    """`config[key]` of a mapping, `config.key` of a config object; None when absent."""
    return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)


def quantizer_arguments(config) -> dict:
    """The Group-VQ keyword arguments of `GroupVectorQuantizer` (`QUANTIZER_CONFIG_KEYS`: all but the codebook size
    and dimension, whose names differ between the shells) from `config` (attributes or a mapping)."""
    return {key: _setting(config, key) for key in QUANTIZER_CONFIG_KEYS}


def quantizer_config(config, quantizer) -> dict:
    """Every key of `CARRIED_CONFIG_KEYS` from `config` (attributes or a mapping), the group layout from `quantizer`."""
    carried = {key: _setting(config, key) for key in CARRIED_CONFIG_KEYS}
    carried.update(num_groups=quantizer.num_groups, group_sizes=None if quantizer.uniform else quantizer.group_sizes)
    return {key: list(value) if isinstance(value, tuple) else value for key, value in carried.items()}


# ---------------------------------------------------------------------------------------------------------- save
# Files training writes beside a model's save (`training.save_export`): they belong to those weights, so a conversion
# that replaces the model leaves them behind (`hub.conversion.save_converted`).
DISCRIMINATOR_FILE = "discriminator.safetensors"  # the GAN discriminator trained with the model (--init_from loads it)
RUN_ARGS_FILE = "run_args.json"  # the arguments that define the run, in every checkpoint and next to the export


def _weights_family(weights_name: str) -> re.Pattern:
    """Files a save of `weights_name` owns: its variants, shards and index (stale ones are never carried over)."""
    stem = re.escape(weights_name.split(".")[0])
    return re.compile(rf"^{stem}([.-].*)?\.(safetensors|bin)(\.index(\.[^.]+)?\.json)?$")


def save_folder(
    save_directory: str | os.PathLike, write: Callable[[str], object], weights_name: str, replaces: tuple[str, ...] = ()
):
    """Run `write(folder)` (a `save_pretrained`) into a temporary folder and swap it into `save_directory`.

    A reader then sees the old folder or the new one, never a config of one save and weights of another. Files of
    an existing folder that the save does not write (a README, results) are carried over (hard links, else copies),
    except stale weight files of the same name family, which the libraries' in-place save deletes too, and the files
    `replaces` names (weights names, whose families are left behind as well, and other file names): what belongs to
    the weights a conversion replaces (the other library's weights, a discriminator trained with them). A symlink,
    a mount point, the working directory (or a folder above it) and a folder whose parent is read-only are written
    in place, as the libraries do.
    """
    path = Path(save_directory)
    own_family, replaced_families = _weights_family(weights_name), [_weights_family(name) for name in replaces]

    def replaced(name: str) -> bool:
        return name in replaces or any(family.match(name) for family in replaced_families)

    if path.exists() and (
        not path.is_dir()
        or path.is_symlink()
        or os.path.ismount(path)
        or Path.cwd().resolve().is_relative_to(path.resolve())
        or not os.access(path.resolve().parent, os.W_OK)
    ):
        if path.is_dir() and replaces:  # in place: what `replaces` names goes first (not atomic, as the libraries)
            for entry in path.iterdir():
                if entry.is_file() and replaced(entry.name):
                    entry.unlink()
        return write(str(path))
    with atomic_directory(path) as tmp:
        result = write(str(tmp))
        if path.is_dir():
            for entry in path.iterdir():
                target = tmp / entry.name
                if target.exists() or own_family.match(entry.name) or replaced(entry.name):
                    continue
                try:
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
                    else:
                        _link_or_copy(entry, target)
                except (FileNotFoundError, shutil.Error):  # another writer swapped the folder meanwhile: not ours
                    continue
    return result


def _link_or_copy(src, dst):
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)
    return dst


__all__ = [
    "DIFFUSERS_CONFIG_NAMES",
    "DISCRIMINATOR_FILE",
    "RUN_ARGS_FILE",
    "rename_quantizer_keys",
    "CARRIED_CONFIG_KEYS",
    "PIXEL_RANGE_LIMIT",
    "check_input",
    "check_loaded_cores",
    "check_pixels",
    "prepare_pixels",
    "quantizer_arguments",
    "quantizer_config",
    "resize_codebook",
    "save_folder",
]
