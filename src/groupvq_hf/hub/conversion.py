"""Checkpoint conversion between the transformers `GroupVQModel`, the diffusers `GroupVQVAE` and a plain `VQModel`,
and switching a saved pipeline's `GroupVQVAE` components between library and remote-code (custom component) form.

The weight conversions themselves live on the models (`GroupVQVAE.from_groupvq`, `GroupVQModel.from_diffusers`,
`GroupVQVAE.from_vqmodel`); this module reads and writes folders. Its command line is `groupvq_hf.hub.cli.convert_main`
(`scripts/convert_checkpoint.py`, `groupvq-convert-checkpoint`).
"""

from __future__ import annotations

import json
import os
import shutil

from ..fileio import atomic_file
from ..modeling_groupvq import GroupVQModel
from ..shells import DISCRIMINATOR_FILE, RUN_ARGS_FILE, save_folder
from ..vq_model import REMOTE_CODE_FILES, GroupVQVAE

# The weights file of each model class's save (transformers', diffusers').
WEIGHTS_NAMES = {GroupVQModel: "model.safetensors", GroupVQVAE: "diffusion_pytorch_model.safetensors"}
# The kind each source converts to when `to` is not given (kinds as `checkpoint_kind` names them).
DEFAULT_TARGET = {"groupvq_model": "groupvq_vae", "groupvq_vae": "groupvq_model", "vqmodel": "groupvq_vae"}
# `model_index.json` entry of a GroupVQVAE component: loaded from the installed package, or from code in its folder.
LIBRARY_ENTRY = ["groupvq_hf.vq_model", "GroupVQVAE"]
REMOTE_CODE_ENTRY = [os.path.splitext(REMOTE_CODE_FILES[0])[0], "GroupVQVAE"]


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def checkpoint_kind(path: str | os.PathLike, subfolder: str | None = None) -> str:
    """"groupvq_model" (transformers `GroupVQModel`), "groupvq_vae" (diffusers `GroupVQVAE`) or "vqmodel" (a plain
    diffusers `VQModel`), read from the folder's `config.json`. Raises ValueError for anything else."""
    folder = os.path.join(path, subfolder) if subfolder else str(path)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        hint = " It is a pipeline folder: pass `subfolder` (e.g. 'vqvae')." if os.path.isfile(
            os.path.join(folder, "model_index.json")
        ) else ""
        raise ValueError(f"`path` must be a saved model folder with a config.json; {folder!r} has none.{hint}")
    config = _read_json(config_path)
    if config.get("model_type") == "groupvq":
        return "groupvq_model"
    class_name = config.get("_class_name")
    if class_name == "GroupVQVAE":
        return "groupvq_vae"
    if class_name == "VQModel":
        return "vqmodel"
    raise ValueError(
        f"{config_path} is neither a GroupVQModel (model_type 'groupvq') nor a diffusers GroupVQVAE/VQModel "
        f"(_class_name {class_name!r})."
    )


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str | None = None,
    subfolder: str | None = None,
    seed: int | None = None,
    **vq_kwargs,
) -> str:
    """Convert the model saved in `src` (optionally its `subfolder`) and save it to `dst`; returns the kind written.

    - "groupvq_model" <-> "groupvq_vae": lossless (same weights, identical outputs).
    - "vqmodel" -> "groupvq_vae": encoder/decoder weights kept, a new Group-VQ quantizer initialised from `seed`
      with `vq_kwargs` (`num_vq_embeddings`, `num_groups`, `codebook_rank`, `group_sizes`, `group_ranks`,
      `projector`, `commitment_beta`, and the runtime keys of `GroupVQVAE.from_groupvq`).
    """
    source = os.path.join(src, subfolder) if subfolder else src
    if os.path.realpath(source) == os.path.realpath(dst):
        raise ValueError(
            f"`dst` {str(dst)!r} is the same folder as `src` {str(source)!r}: converting in place would replace the "
            "model it reads with a model of another format; pass a new output folder."
        )
    kind = checkpoint_kind(src, subfolder)
    to = DEFAULT_TARGET[kind] if to is None else to
    allowed = ("groupvq_model", "groupvq_vae") if kind != "vqmodel" else ("groupvq_vae",)
    if to not in allowed:
        raise ValueError(f"`to` must be one of {allowed} for a {kind!r} checkpoint, got {to!r}.")
    if vq_kwargs and kind != "vqmodel" and not (kind == "groupvq_model" and to == "groupvq_vae"):
        raise ValueError(f"Quantizer options {sorted(vq_kwargs)} only apply when importing a plain VQModel.")
    load_kwargs = {"subfolder": subfolder} if subfolder else {}
    if kind == "vqmodel":
        from diffusers import VQModel

        model = GroupVQVAE.from_vqmodel(VQModel.from_pretrained(src, **load_kwargs), seed=seed, **vq_kwargs)
    elif kind == "groupvq_model":
        model = GroupVQModel.from_pretrained(src, **load_kwargs)
        model = GroupVQVAE.from_groupvq(model, **vq_kwargs) if to == "groupvq_vae" else model
    else:
        model = GroupVQVAE.from_pretrained(src, **load_kwargs)
        model = GroupVQModel.from_diffusers(model) if to == "groupvq_model" else model
    save_converted(model, dst)
    return to


def save_converted(model: GroupVQModel | GroupVQVAE, dst: str | os.PathLike, write_extra=None) -> None:
    """``model.save_pretrained(dst)``, then ``write_extra(folder)`` when given (SimVQ's discriminator), for a model
    that replaces whatever ``dst`` held: all written beside and swapped in at once (`shells.save_folder`). Other files
    of an existing ``dst`` are kept (a README, results), but not what belonged to the model it held: either
    library's weights, its ``DISCRIMINATOR_FILE`` and its training run's ``RUN_ARGS_FILE``."""

    def write(folder):
        model.save_pretrained(folder)  # a temporary folder of save_folder's: written in place
        if write_extra is not None:
            write_extra(folder)

    weights_name = WEIGHTS_NAMES[type(model)]
    others = tuple(name for name in WEIGHTS_NAMES.values() if name != weights_name)
    save_folder(dst, write, weights_name, replaces=(*others, DISCRIMINATOR_FILE, RUN_ARGS_FILE))


def set_pipeline_component_source(pipeline_dir: str | os.PathLike, remote_code: bool = True) -> list[str]:
    """Rewrite a saved pipeline's `model_index.json` so its `GroupVQVAE` components load from code in their own
    folder (`remote_code=True`: ``["vq_model", "GroupVQVAE"]``, a custom component needing
    `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` but not groupvq_hf) or from the installed
    package (``["groupvq_hf.vq_model", "GroupVQVAE"]``; `import groupvq_hf.vq_model` before loading).

    Returns the names of the components rewritten. Each component folder must hold the code files, which
    `GroupVQVAE.save_pretrained` writes.
    """
    index_path = os.path.join(pipeline_dir, "model_index.json")
    if not os.path.isfile(index_path):
        raise ValueError(
            f"`pipeline_dir` must be a saved pipeline folder with a model_index.json, got {str(pipeline_dir)!r}."
        )
    index = _read_json(index_path)
    target = REMOTE_CODE_ENTRY if remote_code else LIBRARY_ENTRY
    changed = []
    for name, entry in index.items():
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1] == "GroupVQVAE") or list(entry) == target:
            continue
        missing = [f for f in REMOTE_CODE_FILES if not os.path.isfile(os.path.join(pipeline_dir, name, f))]
        if remote_code and missing:
            raise ValueError(f"Component {name!r} lacks {missing}; save it with GroupVQVAE.save_pretrained first.")
        index[name] = list(target)
        changed.append(name)
    with atomic_file(index_path) as tmp:  # diffusers' layout of the file; a kill keeps the old index whole
        tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return changed


def copy_pipeline(src: str | os.PathLike, dst: str | os.PathLike, remote_code: bool = True) -> list[str]:
    """Copy a saved pipeline folder to `dst` and set its GroupVQVAE components' source there (see
    `set_pipeline_component_source`); returns the components rewritten."""
    if os.path.abspath(src) != os.path.abspath(dst):
        shutil.copytree(src, dst, dirs_exist_ok=True)
    return set_pipeline_component_source(dst, remote_code=remote_code)


__all__ = [
    "checkpoint_kind",
    "convert_checkpoint",
    "copy_pipeline",
    "save_converted",
    "set_pipeline_component_source",
]
