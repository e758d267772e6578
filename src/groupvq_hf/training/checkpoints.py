"""Training checkpoints: save (atomic, marked complete last), list, rotate, resolve ``--resume_from_checkpoint``,
per-rank state and the resume check of the run's arguments."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import torch

from ..configuration_groupvq import GroupVQConfig
from ..data.stream import ResumableBatches  # noqa: F401  (re-exported: moved next to the data code)
from ..fileio import atomic_file
from ..shells import RUN_ARGS_FILE  # defined beside the save it belongs to; training's modules import it from here

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "training_state_rank{rank}.json"
VALIDATION_LOG_FILE = "validation_log.jsonl"  # held-out usage at every validation step, in --output_dir
COMPLETE_FILE = "checkpoint_complete.json"  # written last: a checkpoint without it is incomplete and never resumed
EMA_WEIGHTS_FILE = "ema.safetensors"  # the EMA's shadow weights, keyed by parameter name (main process)
EMA_STATE_FILE = "ema_state.json"  # the EMA's counters and settings (decay, optimization_step, ...)
# The earlier release's EMA: accelerate's custom state, a pickle (read here only with weights_only=True).
LEGACY_EMA_FILE = "custom_checkpoint_0.pkl"
# Arguments that do not change what a run computes (or that a resume may extend): never compared on resume.
# (``model_config`` names a preset or a file: what it resolved to is compared, as ``model_config_resolved``.)
RESUME_CHANGES_ALWAYS_ALLOWED = (
    "output_dir", "resume_from_checkpoint", "model_config", "allow_resume_changes", "max_train_steps", "num_epochs",
    "checkpointing_steps", "checkpoints_total_limit", "report_to", "tracker_project_name", "logging_steps",
    "validation_steps", "num_validation_images", "num_validation_usage_images", "log_example_keys",
    "max_nonfinite_steps", "lpips_weights", "torch_compile",
    "init_from_commit",  # the Hub commit --init_from resolved to: a resume takes every weight from the checkpoint
)  # fmt: skip


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a finished checkpoint (its ``COMPLETE_FILE`` marker is written last)."""
    return (Path(path) / COMPLETE_FILE).is_file()


# What every checkpoint of the first release held (accelerate's files and ours), before COMPLETE_FILE existed.
LEGACY_CHECKPOINT_FILES = (STATE_FILE.format(rank=0), "optimizer.bin", "scheduler.bin", "random_states_0.pkl")


def is_legacy_checkpoint(path: str | os.PathLike) -> bool:
    """A checkpoint written before ``COMPLETE_FILE`` and ``RUN_ARGS_FILE`` existed that holds every file such a
    checkpoint had (weights included). `latest` never picks one (a half-deleted folder of that version can look
    whole); named explicitly with ``--resume_from_checkpoint PATH`` it resumes."""
    path = Path(path)
    if (path / COMPLETE_FILE).exists() or (path / RUN_ARGS_FILE).exists():
        return False
    weights = (path / "model.safetensors").is_file() or (path / "pytorch_model.bin").is_file()
    return weights and all((path / name).is_file() for name in LEGACY_CHECKPOINT_FILES)


def list_checkpoints(checkpoint_dir: str | os.PathLike, complete_only: bool = True) -> list[Path]:
    """Checkpoints (``checkpoint-<step>``) in ``checkpoint_dir``, oldest step first; only complete ones by default."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
    if complete_only:
        found = [p for p in found if is_complete_checkpoint(p)]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    """The step of a ``checkpoint-<step>`` folder."""
    return int(path.name[len(CHECKPOINT_PREFIX) :])


DELETING_PREFIX = ".deleting-"  # a rotated checkpoint is renamed so before it is deleted


def rotate_checkpoints(checkpoint_dir: str | os.PathLike, total_limit: int | None) -> list[Path]:
    """Delete the oldest checkpoints so at most ``total_limit`` remain; returns the deleted folders.

    Each is first renamed out of the ``checkpoint-<step>`` names (``.deleting-checkpoint-<step>``), so that a kill in
    the middle of its deletion leaves no half-deleted folder that ``latest`` or its name would still resume; what
    such a kill leaves is deleted by the next call (every checkpoint makes one, with a limit or without)."""
    root = Path(checkpoint_dir)
    for leftover in root.glob(f"{DELETING_PREFIX}{CHECKPOINT_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if total_limit is None:
        return []
    checkpoints = list_checkpoints(checkpoint_dir)
    removed = checkpoints[: max(0, len(checkpoints) - total_limit)]
    for path in removed:
        doomed = path.with_name(f"{DELETING_PREFIX}{path.name}.{uuid.uuid4().hex[:8]}")
        os.replace(path, doomed)
        shutil.rmtree(doomed)
    return removed


def set_aside_later_checkpoints(checkpoint_dir: str | os.PathLike, step: int) -> list[Path]:
    """Move the checkpoints past ``step`` into ``checkpoint_dir/set-aside-<UTC time>-at-step-<step>/``; returns
    their new paths (none moved: empty).

    A run that starts at ``step`` (0 for a fresh run, the resumed step otherwise) in a folder holding later
    checkpoints did not write them: another run's, or the abandoned continuation of a run resumed from an earlier
    checkpoint. Left in place, `latest` would resume them after a crash, and [`rotate_checkpoints`], which keeps the
    highest steps, would delete this run's new checkpoints first. Moved aside, nothing is lost."""
    root = Path(checkpoint_dir)
    later = [p for p in list_checkpoints(root, complete_only=False) if checkpoint_step(p) > step]
    if not later:
        return []
    aside = root / f"set-aside-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-at-step-{step}"
    aside.mkdir(exist_ok=True)
    moved = []
    for path in later:
        os.replace(path, aside / path.name)
        moved.append(aside / path.name)
    return moved


def resolve_resume_path(resume_from_checkpoint: str | None, checkpoint_dir: str | os.PathLike) -> Path | None:
    """``"latest"`` -> newest complete checkpoint in ``checkpoint_dir`` (None when there is none); a path must
    exist and be complete."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(checkpoint_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise ValueError(
            f"`--resume_from_checkpoint` must be 'latest' or an existing checkpoint folder, got {str(path)!r}."
        )
    legacy = is_legacy_checkpoint(path)
    if (path / STATE_FILE.format(rank=0)).is_file() and not is_complete_checkpoint(path) and not legacy:
        raise ValueError(
            f"`--resume_from_checkpoint` {str(path)!r} is incomplete (no {COMPLETE_FILE}: its save was interrupted); "
            "resume from an earlier checkpoint or 'latest' (the newest complete one)."
        )
    return path


def save_checkpoint(
    accelerator,
    checkpoint_dir: Path,
    step: int,
    rank_state: dict,
    total_limit: int | None,
    run_args: dict | None = None,
    write_extra=None,
) -> Path:
    """``accelerator.save_state`` into a temporary folder, then swapped in atomically as ``checkpoint-<step>``.

    Every process writes its RNG state and ``training_state_rank<r>.json`` (step, data position); the main process
    then writes ``run_args`` (the arguments that define the run, see [`run_arguments`]), calls ``write_extra(folder)``
    (state kept outside accelerate, such as the EMA's [`save_ema_state`]) and, last, the
    ``COMPLETE_FILE`` marker, and swaps the folder in with ``fileio.replace_directory`` (old aside, new in, old
    deleted). A kill at any moment leaves the newest complete checkpoint for ``latest``. Old checkpoints are
    rotated to ``total_limit`` after the new one is in place. Needs a file system shared by all processes.
    """
    from ..fileio import replace_directory

    final = checkpoint_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = checkpoint_dir / f".tmp-{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        state_file = tmp / STATE_FILE.format(rank=accelerator.process_index)
        state_file.write_text(json.dumps(rank_state))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if run_args is not None:
                (tmp / RUN_ARGS_FILE).write_text(json.dumps(run_args, indent=2, sort_keys=True))
            if write_extra is not None:
                write_extra(tmp)
            (tmp / COMPLETE_FILE).write_text(json.dumps({"step": step, "time": time.time()}))  # last: the marker
    except (OSError, RuntimeError) as error:
        full = disk_full_error(error, tmp, checkpoint_dir)
        if full is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back; the newest complete checkpoint stays
        raise full from error
    if accelerator.is_main_process:
        replace_directory(tmp, final)
        rotate_checkpoints(checkpoint_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


# ------------------------------------------------------------------------------------------ state that runs no code
def save_ema_state(ema, names: list[str], folder: str | os.PathLike) -> None:
    """Write ``ema`` (diffusers' ``EMAModel`` of the parameters called ``names``) as ``EMA_WEIGHTS_FILE``
    (safetensors, one tensor per parameter name) and ``EMA_STATE_FILE`` (JSON counters): nothing to unpickle."""
    _write_ema_files(ema.state_dict(), names, folder)


def _write_ema_files(state: dict, names: list[str], folder: str | os.PathLike) -> None:
    """`save_ema_state`'s files from an ``EMAModel.state_dict()``-shaped ``state`` (``shadow_params`` in the order
    of ``names``, the other keys JSON counters)."""
    from safetensors.torch import save_file

    state = dict(state)
    shadow = state.pop("shadow_params")
    if len(shadow) != len(names):
        raise ValueError(f"The EMA holds {len(shadow)} tensors for {len(names)} parameter names.")
    tensors = {name: t.detach().cpu().contiguous() for name, t in zip(names, shadow)}
    # the counters first: `load_ema_state` takes a folder holding the weights file for one in this format; each file
    # whole or absent (a legacy conversion writes them into a complete checkpoint)
    with atomic_file(Path(folder) / EMA_STATE_FILE) as tmp:
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    with atomic_file(Path(folder) / EMA_WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp))


def _checked_ema_state(ema, names: list[str], tensors: dict, counters, weights_file: Path, state_file: Path) -> dict:
    """The ``ema.load_state_dict`` argument, after checking names, shapes and dtypes against the running EMA and
    the counters' types; ValueError naming the file that does not match. The checkpoint gives the weights and the
    step count (``optimization_step``, the one key required); the settings (decay, warm-up...) are this run's, the
    same when nothing changed, so a resume that allows ``--ema_decay`` to change uses the new decay. A setting the
    file lacks or one this version of ``EMAModel`` does not know (a checkpoint of another diffusers release) is
    therefore no reason to refuse it; one it holds with the wrong type is."""
    expected = {key: value for key, value in ema.state_dict().items() if key != "shadow_params"}
    step = counters.get("optimization_step") if isinstance(counters, dict) else None
    if type(step) is not int or step < 0:
        got = f"{step!r} among the keys {sorted(counters)}" if isinstance(counters, dict) else type(counters).__name__
        raise ValueError(
            f"`{state_file}` does not hold an EMA state: an `optimization_step` (an integer >= 0) expected, got {got}."
        )
    for key, value in expected.items():
        if key not in counters:
            continue
        if type(counters[key]) is not type(value) and not (isinstance(value, float) and type(counters[key]) is int):
            raise ValueError(f"`{state_file}`: `{key}` must be a {type(value).__name__}, got {counters[key]!r}.")
    if set(tensors) != set(names):
        missing, unexpected = sorted(set(names) - set(tensors)), sorted(set(tensors) - set(names))
        raise ValueError(
            f"`{weights_file}` does not hold this run's EMA weights: missing {missing[:5]} ({len(missing)} in all), "
            f"unexpected {unexpected[:5]} ({len(unexpected)} in all)."
        )
    shadow = []
    for name, current in zip(names, ema.shadow_params):
        tensor = tensors[name]
        if tensor.shape != current.shape or tensor.dtype != current.dtype:
            raise ValueError(
                f"`{weights_file}`: `{name}` is {tuple(tensor.shape)} {tensor.dtype}; this run's EMA holds "
                f"{tuple(current.shape)} {current.dtype}."
            )
        shadow.append(tensor.to(current.device))
    settings = {key: value for key, value in expected.items() if key != "optimization_step"}
    return {"optimization_step": step, **settings, "shadow_params": shadow}


def load_ema_state(ema, names: list[str], folder: str | os.PathLike) -> dict | None:
    """Restore ``ema`` from `save_ema_state`'s files in ``folder`` (checked: ValueError naming a file that does not
    match this run) and return None. A checkpoint of the earlier release holds ``LEGACY_EMA_FILE`` instead: it is
    read with ``torch.load(weights_only=True)`` (no code runs) and checked the same way; then its checked keys are
    returned as they were saved (its own decay, not this run's), and once every process has read it the main process
    passes them to [`convert_legacy_ema`] (accelerate refuses a folder holding the pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    weights_file, state_file, legacy = folder / EMA_WEIGHTS_FILE, folder / EMA_STATE_FILE, folder / LEGACY_EMA_FILE
    if weights_file.is_file() or not legacy.is_file():
        for path in (weights_file, state_file):
            if not path.is_file():
                raise ValueError(
                    f"`--resume_from_checkpoint` {str(folder)!r} has no {path.name}: this run keeps an EMA."
                )
        try:
            tensors = load_file(str(weights_file))
        except (SafetensorError, OSError) as error:
            raise ValueError(f"`{weights_file}` is not a readable safetensors file ({error}).") from None
        try:
            counters = json.loads(state_file.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(f"`{state_file}` is not JSON ({error}).") from None
        if legacy.is_file():  # never unpickled; which EMA would be meant is not for us to guess
            raise ValueError(
                f"`{legacy}` (a pickle) lies beside {EMA_WEIGHTS_FILE}: this version never unpickles it. If it was "
                "left by an interrupted conversion of an older checkpoint, delete it to resume."
            )
        ema.load_state_dict(_checked_ema_state(ema, names, tensors, counters, weights_file, state_file))
        return None
    import pickle

    import torch

    try:
        state = torch.load(legacy, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as error:
        raise ValueError(
            f"`{legacy}` is not a plain EMA state (refused by torch.load(weights_only=True), which runs no code: "
            f"{str(error).splitlines()[0]})."
        ) from None
    shadow = state.get("shadow_params") if isinstance(state, dict) else None
    if not isinstance(shadow, list) or len(shadow) != len(names) or not all(torch.is_tensor(t) for t in shadow):
        raise ValueError(f"`{legacy}` does not hold this run's EMA ({len(names)} shadow tensors expected).")
    counters = {key: value for key, value in state.items() if key != "shadow_params"}
    ema.load_state_dict(_checked_ema_state(ema, names, dict(zip(names, shadow)), counters, legacy, legacy))
    # what the conversion writes: the checked keys only (of plain, JSON-ready types), not whatever else it held
    known = {key for key in ema.state_dict() if key != "shadow_params"}
    return {key: value for key, value in state.items() if key in known or key == "shadow_params"}


def convert_legacy_ema(saved_state: dict, names: list[str], folder: str | os.PathLike) -> None:
    """Rewrite a checkpoint's ``LEGACY_EMA_FILE`` as `save_ema_state`'s files, holding ``saved_state`` (the
    pickle's state as [`load_ema_state`] returned it, so the checkpoint keeps its own settings even when the run
    resuming it changed ``--ema_decay``): the safe files first, then the pickle goes. Main process only."""
    _write_ema_files(saved_state, names, folder)
    (Path(folder) / LEGACY_EMA_FILE).unlink()


def plain_parameter_name(name: str) -> str:
    """A state-dict key without the ``_orig_mod.`` segments ``torch.compile(module)`` wrappers add (the first
    release compiled the encoder and decoder that way: ``encoder._orig_mod.conv_in.weight``)."""
    return re.sub(r"(^|\.)_orig_mod\.", r"\1", name)


def check_checkpoint_files(folder: str | os.PathLike, models: list, process_index: int) -> list[Path]:
    """Before ``accelerator.load_state``: every model file (``model.safetensors``, ``model_<i>.safetensors``) holds
    exactly the keys and shapes of the run's ``models``, and this process's RNG file loads with
    ``weights_only=True`` (accelerate would skip an unreadable one silently). ValueError naming the file otherwise.

    Returns the model files whose keys match only once their ``_orig_mod.`` segments are dropped (a checkpoint of the
    first release's ``--torch_compile``): [`rename_compiled_keys`] rewrites them before they are loaded."""
    import pickle

    from accelerate.utils import load
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    compiled = []
    for i, model in enumerate(models):
        path = folder / f"model{'' if i == 0 else f'_{i}'}.safetensors"
        if not path.is_file():
            continue  # a .bin checkpoint: accelerate loads it with weights_only=True
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        try:
            with safe_open(str(path), framework="pt") as file:
                found = {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}
        except (SafetensorError, OSError) as error:
            raise ValueError(f"`{path}` is not a readable safetensors file ({error}).") from None
        plain = {plain_parameter_name(name): shape for name, shape in found.items()}
        if plain != found and len(plain) == len(found) and set(plain) == set(expected):
            compiled.append(path)
            found = plain
        wrong = sorted(name for name in set(expected) & set(found) if expected[name] != found[name])
        missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        if missing or unexpected or wrong:
            raise ValueError(
                f"`{path}` does not match this run's {type(model).__name__}: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}, other shapes {wrong[:5]}."
            )
    rng = folder / f"random_states_{process_index}.pkl"
    if rng.is_file():
        try:
            states = load(rng)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:  # not plain values
            raise ValueError(
                f"`{rng}` is not a plain RNG state (refused by torch.load(weights_only=True), which runs no code: "
                f"{str(error).splitlines()[0]})."
            ) from None
        needed = {"random_state", "numpy_random_seed", "torch_manual_seed"}
        if not isinstance(states, dict) or not needed <= set(states):
            raise ValueError(f"`{rng}` does not hold the random states accelerate writes.")
    return compiled


def rename_compiled_keys(path: Path) -> None:
    """Rewrite the safetensors file ``path`` with `plain_parameter_name` keys (same tensors, same metadata), through
    a temporary file renamed over it (`atomic_file`). Main process only, after every process has checked the
    checkpoint."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
        tensors = {plain_parameter_name(name): file.get_tensor(name) for name in file.keys()}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


# torch's zip writer reports a full disk as a RuntimeError "[enforce fail at inline_container.cc...] unexpected pos"
_TORCH_WRITE_FAILURES = ("enforce fail", "file write failed", "unexpected pos")


def disk_full_error(error: BaseException, folder: Path, checkpoint_dir: Path) -> OSError | None:
    """An ``OSError(ENOSPC)`` saying which file of the checkpoint being written into ``folder`` could not be
    written, the free space, and the space a checkpoint needs (the newest complete one's size, else more than what
    was written), when ``error`` is a full disk (ENOSPC, or torch's failed write); None for any other error."""
    import errno

    if isinstance(error, OSError):
        if error.errno != errno.ENOSPC:
            return None
    elif not any(text in str(error) for text in _TORCH_WRITE_FAILURES):
        return None
    written = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
    name = getattr(error, "filename", None) or (max(written, key=lambda p: p.stat().st_mtime_ns) if written else folder)
    done = sum(p.stat().st_size for p in written)
    previous = list_checkpoints(checkpoint_dir)
    if previous:
        size = sum(p.stat().st_size for p in previous[-1].rglob("*") if p.is_file())
        needed = f"about {size:,} bytes (the size of {previous[-1].name})"
    else:
        needed = f"more than the {done:,} bytes written before the disk filled"
    free = shutil.disk_usage(checkpoint_dir).free
    return OSError(
        errno.ENOSPC,
        f"No space left on device: could not write {name} ({free:,} bytes free in {checkpoint_dir}; a checkpoint of "
        f"this run needs {needed}). Free some space (or lower --checkpoints_total_limit) and resume with "
        "--resume_from_checkpoint latest.",
    )


def load_rank_state(checkpoint: Path, rank: int) -> dict:
    """This process's saved step and data position (rank 0's when the number of processes changed)."""
    path = checkpoint / STATE_FILE.format(rank=rank)
    if not path.is_file():
        path = checkpoint / STATE_FILE.format(rank=0)
    if not path.is_file():
        raise ValueError(
            f"`--resume_from_checkpoint` {str(checkpoint)!r} has no {STATE_FILE.format(rank=0)}: not a groupvq checkpoint."
        )
    return json.loads(path.read_text())


def run_arguments(args: argparse.Namespace, config: GroupVQConfig, world_size: int) -> dict:
    """What defines a run, as recorded in every checkpoint: every argument (JSON values), the number of processes
    and the resolved model config (so a changed config file behind the same ``--model_config`` path is seen)."""
    record = {k: v for k, v in vars(args).items() if v is None or isinstance(v, (bool, int, float, str))}
    model_config = config.to_dict()
    for volatile in ("transformers_version", "_name_or_path"):
        model_config.pop(volatile, None)
    record.update(world_size=int(world_size), model_config_resolved=json.loads(json.dumps(model_config)))
    return record


def run_argument_differences(saved: dict, current: dict, allowed: str | list[str] = "") -> list[str]:
    """``"name: checkpoint A, now B"`` for every argument that differs, except ``RESUME_CHANGES_ALWAYS_ALLOWED``
    and the comma-separated names in ``allowed``; keys of ``model_config_resolved`` are compared one by one."""
    if isinstance(allowed, str):
        allowed = [name for name in allowed.split(",") if name]
    skip = set(RESUME_CHANGES_ALWAYS_ALLOWED) | set(allowed)
    lines = []
    for name in sorted(set(saved) | set(current)):
        if name in skip:
            continue
        old, new = saved.get(name, "<not set>"), current.get(name, "<not set>")
        if isinstance(old, dict) and isinstance(new, dict):
            lines += [
                f"{name}.{key}: checkpoint {old.get(key, '<not set>')!r}, now {new.get(key, '<not set>')!r}"
                for key in sorted(set(old) | set(new))
                if old.get(key, "<not set>") != new.get(key, "<not set>")
            ]
        elif old != new:
            lines.append(f"{name}: checkpoint {old!r}, now {new!r}")
    return lines


def check_resume_arguments(checkpoint: Path, current: dict, allowed: str = "") -> list[str]:
    """Raise ValueError when ``checkpoint`` was written by a run with other arguments (listing them); returns
    a warning line list (empty when all is well, one line for a checkpoint that recorded no arguments)."""
    path = Path(checkpoint) / RUN_ARGS_FILE
    if not path.is_file():
        return [f"{checkpoint} records no run arguments (written by an older groupvq-hf): cannot check that it belongs to this run."]
    differences = run_argument_differences(json.loads(path.read_text()), current, allowed)
    if differences:
        names = ",".join(sorted({line.split(":")[0].split(".")[0] for line in differences}))
        raise ValueError(
            f"`--resume_from_checkpoint` {str(checkpoint)!r} belongs to a run with other arguments:\n  "
            + "\n  ".join(differences)
            + f"\nResume with the checkpoint's arguments, start in a new `--output_dir`, or allow these changes "
            f"deliberately with `--allow_resume_changes {names}`."
        )
    return []



def saved_run_args(checkpoint: Path) -> dict:
    """The run arguments recorded in ``checkpoint`` (``RUN_ARGS_FILE``); empty for a checkpoint that has none."""
    path = Path(checkpoint) / RUN_ARGS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def optimizer_settings(optimizer) -> list[dict]:
    """Each parameter group's settings (rate, initial rate, betas, weight decay...; not its parameters)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    return [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]


def restore_run_settings(optimizer, scheduler, settings: list[dict]) -> None:
    """After a checkpoint's optimizer and scheduler states are loaded: this run's group ``settings``
    (`optimizer_settings` before the load) and its schedule's base rates, which the load had replaced by the
    checkpoint's, so a resume that allows ``--learning_rate`` (betas, weight decay...) to change trains with the
    new value; the same values when nothing changed. `rescale_schedule` then sets the rates at the step resumed."""
    optimizer = getattr(optimizer, "optimizer", optimizer)
    scheduler = getattr(scheduler, "scheduler", scheduler)
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]


def rescale_schedule(scheduler, saved_world_size: int, world_size: int) -> None:
    """Move a loaded learning-rate schedule (a diffusers ``LambdaLR``) to the same optimizer step for this run's
    number of processes, and set its optimizer's rates to this run's schedule at that step.

    A prepared scheduler steps once per process at each optimizer step, so its position (``last_epoch``) is
    optimizer steps x the world size of the run that saved it; this run counts in its own world size. Without the
    rescale, a run resumed on 2 processes from a 1-process checkpoint at step 2 read step 1 of its schedule (and
    the other way round, ran past the schedule's end). The loaded optimizer holds the rates of the checkpoint's
    schedule; they are the same number when the schedule is (a resume with the same arguments stays exact), and
    this run's when ``--max_train_steps`` changed its span."""
    scheduler = getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler wraps it
    steps = scheduler.last_epoch // saved_world_size
    scheduler.last_epoch = steps * world_size
    rates = [base * rate(scheduler.last_epoch) for base, rate in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, rate in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates


def check_optimizer_states(folder: str | os.PathLike, optimizers: list) -> None:
    """After ``accelerator.load_state``: every per-parameter tensor of each optimizer's state (Adam's ``exp_avg``,
    ``exp_avg_sq``) has its parameter's shape. A ValueError naming the file (``optimizer.bin``,
    ``optimizer_<i>.bin``) otherwise, instead of torch's error at the first step."""
    for i, optimizer in enumerate(optimizers):
        name = "optimizer.bin" if i == 0 else f"optimizer_{i}.bin"
        for group in optimizer.param_groups:
            for param in group["params"]:
                for key, value in optimizer.state.get(param, {}).items():
                    if torch.is_tensor(value) and value.dim() and value.shape != param.shape:
                        raise ValueError(
                            f"`{Path(folder) / name}` does not match this run's optimizer: its `{key}` state has "
                            f"shape {tuple(value.shape)} for a parameter of shape {tuple(param.shape)}."
                        )


__all__ = [
    "check_optimizer_states",
    "checkpoint_step",
    "CHECKPOINT_PREFIX",
    "COMPLETE_FILE",
    "EMA_STATE_FILE",
    "EMA_WEIGHTS_FILE",
    "LEGACY_CHECKPOINT_FILES",
    "LEGACY_EMA_FILE",
    "RESUME_CHANGES_ALWAYS_ALLOWED",
    "RUN_ARGS_FILE",
    "STATE_FILE",
    "VALIDATION_LOG_FILE",
    "check_checkpoint_files",
    "plain_parameter_name",
    "rename_compiled_keys",
    "optimizer_settings",
    "rescale_schedule",
    "restore_run_settings",
    "saved_run_args",
    "set_aside_later_checkpoints",
    "check_resume_arguments",
    "convert_legacy_ema",
    "disk_full_error",
    "is_complete_checkpoint",
    "is_legacy_checkpoint",
    "list_checkpoints",
    "load_ema_state",
    "load_rank_state",
    "resolve_resume_path",
    "rotate_checkpoints",
    "run_argument_differences",
    "run_arguments",
    "save_checkpoint",
    "save_ema_state",
]
