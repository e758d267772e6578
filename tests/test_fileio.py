import os

import pytest

from groupvq_hf.fileio import atomic_directory, atomic_file, recover_directory


def test_atomic_directory_replaces_whole_folder(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as tmp:
        (tmp / "config.json").write_text("old")
        (tmp / "weights").write_text("old")
    with atomic_directory(target) as tmp:
        assert not (tmp / "config.json").exists()  # a fresh folder, not a copy of the old one
        (tmp / "config.json").write_text("new")
    assert sorted(os.listdir(target)) == ["config.json"]
    assert (target / "config.json").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_atomic_directory_failure_leaves_old_folder(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as tmp:
        (tmp / "config.json").write_text("old")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_directory(target) as tmp:
            (tmp / "config.json").write_text("half")
            raise RuntimeError("killed")
    assert (target / "config.json").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_kill_between_renames_is_recovered(tmp_path):
    # A kill after "old aside" and before "new in": the next writer (or reader's recovery) restores the old folder.
    target = tmp_path / "model"
    old = tmp_path / ".old-model.deadbeef"
    old.mkdir()
    (old / "config.json").write_text("old")
    stale_tmp = tmp_path / ".tmp-model.999999999.abcd1234"  # a pid that cannot run
    stale_tmp.mkdir()
    assert recover_directory(target) == target
    assert (target / "config.json").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_recovery_restores_the_newest_set_aside_folder(tmp_path):
    target = tmp_path / "model"
    for i, name in enumerate((".old-model.aaaa0001", ".old-model.bbbb0002")):
        old = tmp_path / name
        old.mkdir()
        (old / "version").write_text(str(i))
        os.utime(old, (1000 + i, 1000 + i))
    assert recover_directory(target) == target
    assert (target / "version").read_text() == "1"
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_replace_with_a_missing_folder_fails_at_once(tmp_path):
    from groupvq_hf.fileio import replace_directory

    target = tmp_path / "model"
    target.mkdir()
    with pytest.raises(OSError):
        replace_directory(tmp_path / ".tmp-model.gone", target)
    assert recover_directory(target) == target  # the one folder set aside comes back
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_atomic_file_replaces_the_file_on_success_and_leaves_it_on_failure(tmp_path):
    target = tmp_path / "weights.safetensors"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["weights.safetensors"]
    with atomic_file(target) as tmp:
        assert tmp.parent == tmp_path and not tmp.exists()
        tmp.write_text("new")
    assert target.read_text() == "new" and sorted(os.listdir(tmp_path)) == ["weights.safetensors"]
