"""Folders and files that readers never see half-written: write into a temporary sibling, then swap it into place.

``atomic_directory(path)`` yields a fresh temporary folder next to ``path``; when the block ends without an
exception the old ``path`` (if any) is renamed aside, the new folder is renamed in, and the old one is deleted.
A kill at any moment leaves either the old complete folder, or the new complete folder, at ``path`` (at worst
beside a ``.old-``/``.tmp-`` sibling that the next write cleans up). An exception deletes the temporary folder and
leaves ``path`` untouched. Renames are atomic on one POSIX file system. ``atomic_file(path)`` does the same for one
file (``os.replace``: no old copy to set aside); it is the one way the package replaces a file.

What is swapped in is flushed to disk first (``fsync`` of its files and folders, then of the folder it is renamed in),
so that after a power loss the newest name never points at data the disk has not received, while the older copies it
replaces (and, for checkpoints, rotates away) are gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

TMP_PREFIX, OLD_PREFIX = ".tmp-", ".old-"
_TMP_SUFFIX = r"\.(\d+)\.[0-9a-f]{8}"  # .<pid>.<random>: what `atomic_directory` appends to a temporary folder


def _siblings(path: Path, prefix: str) -> list[Path]:
    return [p for p in path.parent.glob(f"{prefix}{path.name}.*") if p.is_dir()]


def is_temporary_directory(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a temporary folder of `atomic_directory` (``.tmp-<name>.<pid>.<random>``): readers never
    look there, so a save into it is already atomic."""
    return re.fullmatch(rf"{re.escape(TMP_PREFIX)}.+{_TMP_SUFFIX}", Path(path).name) is not None


def _stale_temporaries(path: Path) -> list[Path]:
    """Temporary folders of ``path`` (nested ones too: ``.tmp-.tmp-<name>...`` left by an earlier version's save
    inside a save) whose writing process no longer runs."""
    pattern = re.compile(rf"(?:{re.escape(TMP_PREFIX)})+{re.escape(path.name)}{_TMP_SUFFIX}(?:{_TMP_SUFFIX})*")
    stale = []
    for candidate in path.parent.glob(f"{TMP_PREFIX}*{path.name}.*"):
        match = pattern.fullmatch(candidate.name)
        if match and candidate.is_dir() and not _pid_alive(int(match.group(1))):
            stale.append(candidate)
    return stale


def fsync(path: str | os.PathLike) -> None:
    """Flush a regular file's or a folder's (its entries') written data to disk; anything else (a FIFO, a socket, a
    link) is left alone, as is a folder where folders cannot be opened (Windows)."""
    mode = os.lstat(path).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return
    try:  # Windows flushes only a descriptor open for writing
        fd = os.open(path, os.O_RDWR if os.name == "nt" and stat.S_ISREG(mode) else os.O_RDONLY)
    except (IsADirectoryError, PermissionError):  # a folder on Windows; a file we may not open
        return
    try:
        os.fsync(fd)
    except OSError:  # a file system without fsync for this kind of file
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """`fsync` of every file and folder under ``folder``, then of ``folder`` itself."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            fsync(os.path.join(root, name))
        fsync(root)


def replace_directory(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Move the complete folder ``tmp`` to ``path``: old aside, new in, old deleted (never a moment without one);
    ``tmp`` is flushed to disk before it is renamed in, and the rename before the old folder is deleted."""
    tmp, path = Path(tmp), Path(path)
    fsync_tree(tmp)
    set_aside = []
    for attempt in range(10):  # another writer may put its folder in between our two renames: set it aside too
        if path.exists():
            old = path.parent / f"{OLD_PREFIX}{path.name}.{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            set_aside.append(old)
        try:
            os.replace(tmp, path)
            break
        except OSError:
            if attempt == 9 or not tmp.is_dir():  # only a folder put in by another writer is worth another try
                raise
    fsync(path.parent)
    for old in set_aside:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_directory(path: str | os.PathLike) -> Path | None:
    """After a kill between "old aside" and "new in", put the set-aside folder back; returns it when one was restored.

    Temporary folders of ``path`` left by processes that no longer run are deleted.
    """
    path = Path(path)
    for stale in _stale_temporaries(path):
        shutil.rmtree(stale, ignore_errors=True)
    restored = None
    for old in sorted(_siblings(path, OLD_PREFIX), key=lambda p: p.stat().st_mtime, reverse=True):  # newest first
        if not path.exists():
            os.replace(old, path)
            restored = path
        else:
            shutil.rmtree(old, ignore_errors=True)
    return restored


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_directory("out/model") as tmp: model.save_pretrained(tmp)``: ``out/model`` changes all at once.

    Inside an enclosing atomic write (``path`` is itself one of its temporary folders, see `is_temporary_directory`)
    the folder is written in place: it is invisible to readers already, and a second temporary copy would be a
    full model copy that a kill leaves where no recovery looks.
    """
    path = Path(path)
    if is_temporary_directory(path) and path.is_dir():
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    tmp = path.parent / f"{TMP_PREFIX}{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, single_writer: bool = False) -> Iterator[Path]:
    """``with atomic_file("out/w.safetensors") as tmp: save_file(tensors, tmp)``: the file at ``path`` is replaced
    all at once when the block ends without an exception; the temporary sibling is removed in every case but a kill.

    The temporary sibling is ``.tmp-<name>.<pid>.<random>``, so concurrent writers never share one. A file that only
    one process ever writes (``single_writer=True``: a shard of one worker, a run's record) gets the fixed name
    ``.tmp-<name>`` instead, so a rerun after a kill overwrites what the kill left rather than adding another.
    """
    path = Path(path)
    suffix = "" if single_writer else f".{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp = path.parent / f"{TMP_PREFIX}{path.name}{suffix}"
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(data, path: str | os.PathLike, *, single_writer: bool = False, indent: int | None = 2) -> Path:
    """Write ``data`` as JSON to ``path`` (its folder made) through `atomic_file` (``single_writer`` as there),
    indented (``indent=None``: on one line, for large records); non-finite floats as ``Infinity``/``NaN``, as
    Python's json reads them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, single_writer=single_writer) as tmp:
        tmp.write_text(json.dumps(data, indent=indent) + "\n", encoding="utf-8")
    return path


def weights_digest(module) -> str:
    """SHA-256 of a ``torch.nn.Module``'s parameters and buffers (names, dtypes and bytes), to compare replicas,
    runs and the model a token dataset was made with."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def relative_import_files(module_file: str | os.PathLike) -> list[str]:
    """File names of ``module_file`` and, transitively, of every module it imports relatively (``from .x import``):
    the code a saved model folder must carry for ``trust_remote_code`` (the model files import only each other)."""
    folder, todo, found = Path(module_file).resolve().parent, [Path(module_file).name], []
    while todo:
        name = todo.pop(0)
        if name in found:
            continue
        found.append(name)
        text = (folder / name).read_text(encoding="utf-8")
        todo += [f"{module}.py" for module in re.findall(r"^\s*from \.(\w+) import", text, flags=re.M)]
    return found


__all__ = [
    "atomic_directory", "atomic_file", "fsync", "fsync_tree", "is_temporary_directory", "recover_directory",
    "relative_import_files", "replace_directory", "weights_digest", "write_json",
]
