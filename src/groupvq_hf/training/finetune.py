"""Fine-tuning from trained weights: ``scripts/train.py --init_from PATH_OR_REPO`` (issue 22).

A run starts from a saved `GroupVQModel` or `GroupVQVAE` (a folder, a pipeline's component with ``--subfolder``, or a
Hub repo: its commit is recorded) with that model's config, optionally resizes its codebook first (Algorithm 2, the
model's own `resize_codebook`; ``--codebook_size``, ``--resize_mode``, ``--resize_seed``), trains the parts
``--trainable`` names (frozen parameters get no optimizer state and stay bit-identical), and loads the PatchGAN
discriminator saved beside the model (``DISCRIMINATOR_FILE``; ``--no_init_discriminator`` skips it).

The discriminator file is a safetensors file of `PatchGANDiscriminator`'s state dict whose metadata holds its settings
(``in_channels``, ``disc_channels``, ``disc_layers``); the export of a run with a GAN writes it, ``push_to_hub
--include_discriminator`` uploads it and the SimVQ converter writes it with ``--keep_discriminator``.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..fileio import atomic_file
from ..quantizer import RESIZE_MODES
from ..shells import DISCRIMINATOR_FILE  # defined beside the save it belongs to; training's modules import it from here
from .losses import PatchGANDiscriminator

DISCRIMINATOR_SETTINGS = ("in_channels", "disc_channels", "disc_layers")  # its metadata, named as train.py's flags
TRAINABLE_CHOICES = ("all", "quantizer", "decoder", "quantizer+decoder")
# Parameter-name prefixes of the parts --trainable names ("quantizer": the projectors W_j, b_j; the cores are buffers,
# always frozen). The encoder side (encoder, quant_conv) trains only with "all".
PART_PREFIXES = {"quantizer": ("quantizer.",), "decoder": ("decoder.", "post_quant_conv.")}


# ---------------------------------------------------------------------------------------------------- discriminator
def discriminator_settings(discriminator: PatchGANDiscriminator) -> dict:
    """``{"in_channels", "disc_channels", "disc_layers"}`` of a `PatchGANDiscriminator`."""
    return {"in_channels": discriminator.in_channels, "disc_channels": discriminator.base_channels,
            "disc_layers": discriminator.num_layers}  # fmt: skip


def save_discriminator(discriminator: PatchGANDiscriminator, folder: str | os.PathLike) -> Path:
    """Write ``DISCRIMINATOR_FILE`` into ``folder`` (a temporary name, then renamed: never half-written), its
    settings in the safetensors metadata."""
    from safetensors.torch import save_file

    path = Path(folder) / DISCRIMINATOR_FILE
    state = {key: value.detach().cpu().contiguous() for key, value in discriminator.state_dict().items()}
    metadata = {key: str(value) for key, value in discriminator_settings(discriminator).items()}
    with atomic_file(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return path


def load_discriminator(path: str | os.PathLike) -> PatchGANDiscriminator:
    """The `PatchGANDiscriminator` a ``DISCRIMINATOR_FILE`` holds (settings from its metadata, every key checked)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # a truncated or foreign file
        raise ValueError(f"{str(path)!r} is not a readable safetensors file: {err}") from err
    missing = [key for key in DISCRIMINATOR_SETTINGS if key not in metadata]
    if missing:
        raise ValueError(f"{str(path)!r} lacks the discriminator settings {missing} in its metadata.")
    settings = {key: int(metadata[key]) for key in DISCRIMINATOR_SETTINGS}
    discriminator = PatchGANDiscriminator(settings["in_channels"], settings["disc_channels"], settings["disc_layers"])
    discriminator.load_state_dict(checked_state_dict(discriminator, state, str(path)))
    return discriminator


def checked_state_dict(module: torch.nn.Module, state: dict, source: str, prefix: str = "") -> dict:
    """``state`` when it holds exactly ``module``'s keys, each with its shape and dtype kind; else ValueError naming
    the first unknown, missing or misshapen key (as ``source`` names it: ``prefix`` + key)."""
    expected = module.state_dict()
    unknown = [prefix + key for key in state if key not in expected]
    if unknown:
        raise ValueError(f"{source}: key {unknown[0]!r} has no place in the discriminator (unknown: {unknown}).")
    missing = [prefix + key for key in expected if key not in state]
    if missing:
        raise ValueError(f"{source}: lacks {missing[0]!r}, which the discriminator needs (missing: {missing}).")
    for key, value in state.items():
        want = expected[key]
        if tuple(value.shape) != tuple(want.shape) or value.dtype.is_floating_point != want.dtype.is_floating_point:
            raise ValueError(
                f"{source}: key {prefix + key!r} is {value.dtype} {tuple(value.shape)}, the discriminator needs "
                f"{want.dtype} {tuple(want.shape)}."
            )
    return {key: value.to(expected[key].dtype) for key, value in state.items()}


def patchgan_settings(state: dict) -> dict:
    """The settings of a PatchGAN (pix2pix / taming-transformers ``NLayerDiscriminator``) state dict, read from its
    keys: input and base channels from the first convolution, layers = its BatchNorm layers."""
    first = state.get("main.0.weight")
    if first is None or first.ndim != 4:
        raise ValueError("not a PatchGAN discriminator: it has no first convolution 'main.0.weight'.")
    layers = sum(1 for key in state if key.endswith(".running_mean"))
    if layers < 1:
        raise ValueError(
            "not a PatchGAN discriminator with BatchNorm layers (taming's NLayerDiscriminator with "
            f"use_actnorm=False): keys {sorted(state)}."
        )
    return {"in_channels": int(first.shape[1]), "disc_channels": int(first.shape[0]), "disc_layers": layers}


# ---------------------------------------------------------------------------------------------------- trainable parts
def trainable_prefixes(trainable: str) -> tuple[str, ...] | None:
    """Parameter-name prefixes of the parts ``trainable`` names; None for "all"."""
    if trainable not in TRAINABLE_CHOICES:
        raise ValueError(f"`--trainable` must be one of {', '.join(TRAINABLE_CHOICES)}, got {trainable!r}.")
    if trainable == "all":
        return None
    return tuple(prefix for part in trainable.split("+") for prefix in PART_PREFIXES[part])


def freeze_parts(model: torch.nn.Module, trainable: str) -> list[str]:
    """Freeze (``requires_grad=False``) every parameter outside the ``trainable`` parts; returns the frozen names."""
    prefixes = trainable_prefixes(trainable)
    frozen = []
    for name, param in model.named_parameters():
        train = prefixes is None or name.startswith(prefixes)
        param.requires_grad_(train)
        if not train:
            frozen.append(name)
    return frozen


# ---------------------------------------------------------------------------------------------------- loading
@dataclass
class InitSource:
    """Where ``--init_from`` points: ``folder`` holds the model (``--subfolder`` applied); ``repo_id`` and ``commit``
    are set when it came from the Hub; ``kind`` is "groupvq_model" or "groupvq_vae"."""

    init_from: str
    folder: Path
    kind: str
    repo_id: str | None = None
    commit: str | None = None


def resolve_init_source(init_from: str, subfolder: str | None = None) -> InitSource:
    """An existing folder, else a Hub repo id (downloaded with ``snapshot_download``; the snapshot's folder is named
    by its commit). ValueError, before any training, for anything that is not a saved model."""
    path = Path(init_from).expanduser()
    repo_id = commit = None
    if path.exists():
        if not path.is_dir():
            raise ValueError(
                f"`--init_from` {init_from!r} is a file; expected a folder saved with `save_pretrained` or a Hub "
                "repo id."
            )
        root = path
    else:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(init_from)
        except Exception:
            raise ValueError(
                f"`--init_from` {init_from!r} is neither an existing folder nor a Hub repo id ('namespace/name')."
            ) from None
        try:
            root = Path(snapshot_download(init_from))
        except Exception as err:
            raise ValueError(
                f"`--init_from` {init_from!r}: cannot download it from the Hub ({type(err).__name__}: {err})."
            ) from err
        repo_id, commit = init_from, root.name  # <cache>/snapshots/<commit>
    folder = root / subfolder if subfolder else root
    kind = model_kind(folder, init_from, subfolder)
    return InitSource(init_from=init_from, folder=folder, kind=kind, repo_id=repo_id, commit=commit)


def model_kind(folder: Path, init_from: str, subfolder: str | None) -> str:
    """"groupvq_model" or "groupvq_vae" (``hub.conversion.checkpoint_kind`` reads ``config.json``); ValueError naming
    ``--init_from`` for a folder that is not one of them (no config, a pipeline root, a plain VQModel, ...)."""
    from ..hub.conversion import checkpoint_kind

    where = f"`--init_from` {init_from!r}" + (f" (`--subfolder` {subfolder!r})" if subfolder else "")
    if not folder.is_dir():
        raise ValueError(f"{where}: no folder {str(folder)!r}.")
    if not (folder / "config.json").is_file() and (folder / "model_index.json").is_file():
        raise ValueError(
            f"{where} is a diffusers pipeline folder: name its Group-VQ component with `--subfolder` (e.g. vqvae)."
        )
    try:
        kind = checkpoint_kind(folder)
    except (ValueError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{where} is not a saved GroupVQModel or GroupVQVAE: {err}") from None
    if kind == "vqmodel":
        raise ValueError(
            f"{where} is a plain diffusers VQModel: give it a Group-VQ quantizer first (scripts/convert_checkpoint.py "
            "SRC DST --subfolder vqvae --num_groups K), then fine-tune DST."
        )
    return kind


def load_init_model(source: InitSource):
    """The `GroupVQModel` of ``source`` (a `GroupVQVAE` converted with `GroupVQModel.from_diffusers`, 1:1), fp32;
    ValueError when its weights are unreadable or do not fill the model exactly."""
    from ..modeling_groupvq import GroupVQModel

    try:
        if source.kind == "groupvq_vae":
            from ..vq_model import GroupVQVAE

            vae, info = GroupVQVAE.from_pretrained(source.folder, output_loading_info=True)
            model = GroupVQModel.from_diffusers(vae)
        else:
            model, info = GroupVQModel.from_pretrained(source.folder, output_loading_info=True)
    except Exception as err:
        raise ValueError(
            f"`--init_from` {source.init_from!r}: cannot load the model in {str(source.folder)!r} "
            f"({type(err).__name__}: {' '.join(str(err).split())[:500]})."
        ) from err
    problems = {key: value for key, value in info.items() if key != "error_msgs" and value}
    if problems or info.get("error_msgs"):
        detail = problems or info["error_msgs"]
        raise ValueError(f"`--init_from` {source.init_from!r}: its weights do not match its config: {detail}.")
    return model.float()


@dataclass
class InitWeights:
    """What ``--init_from`` loaded: the model (resized when asked) and, when the run uses a GAN and the folder has one,
    the discriminator."""

    source: InitSource
    model: torch.nn.Module
    discriminator: PatchGANDiscriminator | None = None


# Model config keys that say nothing about the weights (or that a run sets itself): never compared.
VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "architectures", "auto_map", "sample_size",
                        "torch_dtype", "dtype")  # fmt: skip


def config_differences(given, loaded) -> list[str]:
    """``"key: --model_config A, --init_from B"`` for every config value that differs (``VOLATILE_CONFIG_KEYS``
    aside)."""
    a, b = given.to_dict(), loaded.to_dict()
    keys = sorted((set(a) | set(b)) - set(VOLATILE_CONFIG_KEYS))
    return [f"{k}: --model_config {a.get(k, '<not set>')!r}, --init_from {b.get(k, '<not set>')!r}"
            for k in keys if a.get(k, "<not set>") != b.get(k, "<not set>")]  # fmt: skip


def load_initial_weights(args: argparse.Namespace, model_config=None) -> InitWeights:
    """Load ``--init_from`` (see [`resolve_init_source`], [`load_init_model`]), check it against ``model_config``
    (the resolved ``--model_config``, when given), resize its codebook when ``--codebook_size`` asks (Algorithm 2,
    ``trained_group_sizes`` recorded by the model's own `resize_codebook`), and load its discriminator when the run
    uses a GAN (``--disc_weight`` > 0), the folder has one and ``--no_init_discriminator`` is not set; the saved
    settings fill ``--disc_channels`` / ``--disc_layers`` when they were not given. Sets ``args.init_from_commit``.
    """
    source = resolve_init_source(args.init_from, args.subfolder)
    model = load_init_model(source)
    args.init_from_commit = source.commit
    if model_config is not None:
        differences = config_differences(model_config, model.config)
        if differences:
            raise ValueError(
                f"`--model_config` {args.model_config!r} disagrees with the config of `--init_from` {args.init_from!r}:"
                "\n  " + "\n  ".join(differences) + "\nDrop `--model_config` (the loaded model's config is used)."
            )
    if args.codebook_size is not None:
        try:
            with torch.no_grad():
                model.resize_codebook(args.codebook_size, mode=args.resize_mode, seed=args.resize_seed)
        except ValueError as err:
            raise ValueError(f"`--codebook_size` {args.codebook_size}: {err}") from err
    discriminator = None
    disc_path = source.folder / DISCRIMINATOR_FILE
    if args.disc_weight > 0 and not args.no_init_discriminator and disc_path.is_file():
        discriminator = load_discriminator(disc_path)
        saved = discriminator_settings(discriminator)
        for name in ("disc_channels", "disc_layers"):
            given = getattr(args, name)
            if given is not None and given != saved[name]:
                raise ValueError(
                    f"`--{name}` {given} does not match the discriminator of `--init_from` {args.init_from!r} "
                    f"({name} {saved[name]}; saved settings {saved}). Drop the flag to use the saved settings, or "
                    "pass `--no_init_discriminator` to train a new discriminator."
                )
            setattr(args, name, saved[name])
        if saved["in_channels"] != model.config.out_channels:
            raise ValueError(
                f"The discriminator of `--init_from` {args.init_from!r} reads {saved['in_channels']} channels, the "
                f"model outputs {model.config.out_channels}; pass `--no_init_discriminator`."
            )
    fill_discriminator_defaults(args)
    return InitWeights(source=source, model=model, discriminator=discriminator)


# ---------------------------------------------------------------------------------------------------- arguments
DEFAULT_DISC_CHANNELS, DEFAULT_DISC_LAYERS = 64, 3
INIT_ONLY_FLAGS = ("subfolder", "resize_mode", "resize_seed", "no_init_discriminator")


def add_init_arguments(g) -> None:
    """The flags of ``scripts/train.py`` that start a run from trained weights."""
    g.add_argument(
        "--init_from",
        default=None,
        help="start from a saved GroupVQModel or GroupVQVAE (folder or Hub repo id) with its config and, when present, "
        f"its {DISCRIMINATOR_FILE}; --model_config is then optional and must agree with it",
    )
    g.add_argument(
        "--subfolder", default=None, help="the model's subfolder in --init_from (a diffusers pipeline: vqvae)"
    )
    g.add_argument(
        "--codebook_size",
        type=int,
        default=None,
        help="with --init_from: resize the loaded codebook to this size before the first step (Algorithm 2)",
    )
    g.add_argument("--resize_mode", choices=RESIZE_MODES, default=None, help="default: extend")
    g.add_argument("--resize_seed", type=int, default=None, help="seed of the newly sampled codes; default: 0")
    g.add_argument(
        "--trainable",
        default="all",
        help=f"the parts that train: {' | '.join(TRAINABLE_CHOICES)} ('quantizer': the projectors W_j, b_j; the "
        "cores are always frozen). Frozen parts get no optimizer state; the discriminator trains whenever the GAN "
        "is on",
    )
    g.add_argument(
        "--no_init_discriminator",
        action="store_true",
        help=f"with --init_from: do not load its {DISCRIMINATOR_FILE} (a new discriminator is trained)",
    )


def fill_discriminator_defaults(args: argparse.Namespace) -> None:
    if args.disc_channels is None:
        args.disc_channels = DEFAULT_DISC_CHANNELS
    if args.disc_layers is None:
        args.disc_layers = DEFAULT_DISC_LAYERS


def check_init_arguments(args: argparse.Namespace) -> None:
    """Check the fine-tuning flags (ValueError naming the flag) and fill their defaults. Without ``--init_from``
    (or when its discriminator is not loaded) ``--disc_channels`` / ``--disc_layers`` get their defaults here;
    otherwise [`load_initial_weights`] fills them from the saved discriminator."""
    trainable_prefixes(args.trainable)
    for name in ("disc_channels", "disc_layers"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"`--{name}` must be >= 1, got {getattr(args, name)}.")
    if args.init_from is None:
        if args.codebook_size is not None:
            raise ValueError(
                "`--codebook_size` resizes a model loaded with `--init_from`; the codebook size of a fresh model is "
                "set in `--model_config` (its `codebook_size`)."
            )
        given = [name for name in INIT_ONLY_FLAGS if getattr(args, name) not in (None, False)]
        if given:
            raise ValueError(f"`--{given[0]}` applies to `--init_from` only.")
    if args.codebook_size is None:
        for name in ("resize_mode", "resize_seed"):
            if getattr(args, name) is not None:
                raise ValueError(f"`--{name}` needs `--codebook_size` (the size to resize the loaded codebook to).")
    else:
        if args.codebook_size < 1:
            raise ValueError(f"`--codebook_size` must be >= 1, got {args.codebook_size}.")
        args.resize_mode = args.resize_mode or "extend"
        args.resize_seed = 0 if args.resize_seed is None else args.resize_seed
    decoder_trains = args.trainable in ("all", "decoder", "quantizer+decoder")
    if args.adaptive_disc_weight and not decoder_trains:
        raise ValueError(
            f"`--adaptive_disc_weight` takes gradients at the decoder's last layer, which `--trainable "
            f"{args.trainable}` freezes; use --trainable all, decoder or quantizer+decoder."
        )
    if args.trainable == "quantizer" and args.commitment_weight == 0:
        raise ValueError(
            "`--trainable quantizer` trains the projectors through the commitment loss only, which "
            "`--commitment_weight 0` turns off: nothing would train."
        )
    args.init_from_commit = None
    if args.init_from is None or args.no_init_discriminator or args.disc_weight == 0:
        fill_discriminator_defaults(args)


__all__ = [
    "DISCRIMINATOR_FILE",
    "InitSource",
    "InitWeights",
    "TRAINABLE_CHOICES",
    "add_init_arguments",
    "check_init_arguments",
    "checked_state_dict",
    "config_differences",
    "discriminator_settings",
    "freeze_parts",
    "load_discriminator",
    "load_init_model",
    "load_initial_weights",
    "patchgan_settings",
    "resolve_init_source",
    "save_discriminator",
    "trainable_prefixes",
]
