"""Training state that cannot run code, kills at awkward moments, a full disk (issue 19, items 2, 6, 7)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT / "src"))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_kill_during_the_final_export_leaves_no_model_copy_behind(tmp_path):
    """Killed (SIGKILL) while `save_pretrained` writes inside the export's temporary folder: the next export
    leaves only `model` (no `.tmp-` folder of either save, nested or not)."""
    killed = _python(
        """
        import os, signal, torch
        from groupvq_hf import GroupVQConfig, GroupVQModel
        from groupvq_hf.training import save_export
        model = GroupVQModel(GroupVQConfig.from_preset("tiny"))
        save_export(model, "out/model", {"seed": 0})
        model.config.save_pretrained = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        save_export(model, "out/model", {"seed": 1})
        """,
        tmp_path,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    again = _python(
        """
        from groupvq_hf import GroupVQConfig, GroupVQModel
        from groupvq_hf.training import save_export
        save_export(GroupVQModel(GroupVQConfig.from_preset("tiny")), "out/model", {"seed": 2})
        """,
        tmp_path,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model"]
    assert json.loads((tmp_path / "out" / "model" / "run_args.json").read_text()) == {"seed": 2}


def test_nested_atomic_directories_write_once_and_stale_nested_leftovers_are_cleaned(tmp_path):
    from groupvq_hf.fileio import atomic_directory, recover_directory

    with atomic_directory(tmp_path / "model") as outer:
        with atomic_directory(outer) as inner:
            assert inner == outer  # already invisible to readers: written in place, not copied once more
            (inner / "weights").write_text("w")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and (tmp_path / "model" / "weights").is_file()
    # a leftover of an earlier version's nested save, by a process that no longer runs (pid 0 never is ours)
    stale = tmp_path / ".tmp-.tmp-model.999999999.0123abcd.999999999.4567cdef"
    stale.mkdir()
    recover_directory(tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
