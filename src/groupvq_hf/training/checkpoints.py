"""Training checkpoints: save (atomic, marked complete last), list, rotate, resolve ``--resume_from_checkpoint``,
per-rank state and the resume check of the run's arguments."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time
from pathlib import Path

from ..configuration_groupvq import GroupVQConfig
from ..data.stream import ResumableBatches  # noqa: F401  (re-exported: moved next to the data code)

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "training_state_rank{rank}.json"
VALIDATION_LOG_FILE = "validation_log.jsonl"  # held-out usage at every validation step, in --output_dir
RUN_ARGS_FILE = "run_args.json"  # the arguments that define the run, in every checkpoint and next to the export
COMPLETE_FILE = "checkpoint_complete.json"  # written last: a checkpoint without it is incomplete and never resumed
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
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def rotate_checkpoints(checkpoint_dir: str | os.PathLike, total_limit: int | None) -> list[Path]:
    """Delete the oldest checkpoints so at most ``total_limit`` remain; returns the deleted folders."""
    if total_limit is None:
        return []
    checkpoints = list_checkpoints(checkpoint_dir)
    removed = checkpoints[: max(0, len(checkpoints) - total_limit)]
    for path in removed:
        shutil.rmtree(path)
    return removed


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
) -> Path:
    """``accelerator.save_state`` into a temporary folder, then swapped in atomically as ``checkpoint-<step>``.

    Every process writes its RNG state and ``training_state_rank<r>.json`` (step, data position); the main process
    then writes ``run_args`` (the arguments that define the run, see [`run_arguments`]) and, last, the
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
    accelerator.save_state(str(tmp))
    state_file = tmp / STATE_FILE.format(rank=accelerator.process_index)
    state_file.write_text(json.dumps(rank_state))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if run_args is not None:
            (tmp / RUN_ARGS_FILE).write_text(json.dumps(run_args, indent=2, sort_keys=True))
        (tmp / COMPLETE_FILE).write_text(json.dumps({"step": step, "time": time.time()}))  # last: the marker
        replace_directory(tmp, final)
        rotate_checkpoints(checkpoint_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


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


__all__ = [
    "CHECKPOINT_PREFIX",
    "COMPLETE_FILE",
    "LEGACY_CHECKPOINT_FILES",
    "RESUME_CHANGES_ALWAYS_ALLOWED",
    "RUN_ARGS_FILE",
    "STATE_FILE",
    "VALIDATION_LOG_FILE",
    "check_resume_arguments",
    "is_complete_checkpoint",
    "is_legacy_checkpoint",
    "list_checkpoints",
    "load_rank_state",
    "resolve_resume_path",
    "rotate_checkpoints",
    "run_argument_differences",
    "run_arguments",
    "save_checkpoint",
]
