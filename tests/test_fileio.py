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


def test_atomic_file_of_a_single_writer_overwrites_what_a_kill_left(tmp_path):
    target = tmp_path / "train-000.parquet"
    left_by_a_kill = tmp_path / ".tmp-train-000.parquet"
    left_by_a_kill.write_text("half a shard")
    with atomic_file(target, single_writer=True) as tmp:
        assert tmp == left_by_a_kill  # the fixed name: the rerun writes over the leftover instead of beside it
        tmp.write_text("whole shard")
    assert target.read_text() == "whole shard" and sorted(os.listdir(tmp_path)) == ["train-000.parquet"]
    with atomic_file(target) as tmp:  # any other writer gets a name no one else has
        assert tmp.name.startswith(".tmp-train-000.parquet.") and tmp.name != left_by_a_kill.name
        tmp.write_text("another shard")
    assert target.read_text() == "another shard" and sorted(os.listdir(tmp_path)) == ["train-000.parquet"]


def test_npz_writer_leaves_nothing_when_its_chunks_do_not_match_the_header(tmp_path):
    import numpy as np

    from groupvq_hf.evaluation.protocols import write_npy_chunks

    chunks = [np.zeros((2, 4, 4, 3), np.uint8)]
    with pytest.raises(ValueError, match="Chunks held 2 images, the header says 3"):
        write_npy_chunks(tmp_path / "ref.npz", (3, 4, 4, 3), chunks)
    assert os.listdir(tmp_path) == []
    path = write_npy_chunks(tmp_path / "ref.npz", (2, 4, 4, 3), chunks)
    assert np.load(path, allow_pickle=False)["arr_0"].shape == (2, 4, 4, 3) and os.listdir(tmp_path) == ["ref.npz"]


def test_what_is_swapped_in_is_flushed_to_disk_first(tmp_path, monkeypatch):
    """Before a rename makes new data the current copy, its files are fsynced; after it, the folder holding the
    name (so a power loss cannot leave the name pointing at data the disk never got, the old copy deleted)."""
    from groupvq_hf import fileio

    synced = []
    real_fsync = fileio.fsync

    def recorded_fsync(path):  # what is flushed, and what the folder's names are at that moment
        synced.append((os.path.basename(path), sorted(os.listdir(tmp_path))))
        real_fsync(path)

    monkeypatch.setattr(fileio, "fsync", recorded_fsync)
    with atomic_file(tmp_path / "record.json", single_writer=True) as tmp:
        tmp.write_text("{}")
    assert synced == [(".tmp-record.json", [".tmp-record.json"]), (tmp_path.name, ["record.json"])]
    synced.clear()
    (tmp_path / "record.json").unlink()
    with atomic_directory(tmp_path / "model") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "weights.bin").write_bytes(b"w")
    names = [name for name, _ in synced]
    assert names[:3] == ["weights.bin", "sub", names[2]] and names[2].startswith(".tmp-model.")
    assert all(listing != ["model"] for _, listing in synced[:3])  # all before the rename
    assert synced[3] == (tmp_path.name, ["model"])  # the rename, flushed


def test_fsync_leaves_fifos_and_sockets_alone(tmp_path):
    """A FIFO in a folder being swapped in (a save carries an existing folder's files over) would block an open
    for reading forever, and a socket cannot be opened: only regular files and folders are flushed."""
    import socket
    import threading

    from groupvq_hf.fileio import fsync_tree

    folder = tmp_path / "model"
    folder.mkdir()
    os.mkfifo(folder / "pipe")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(folder / "socket"))
    (folder / "weights.bin").write_bytes(b"w")
    done = threading.Thread(target=fsync_tree, args=(folder,), daemon=True)
    done.start()
    done.join(timeout=20)
    server.close()
    assert not done.is_alive()
    with atomic_directory(tmp_path / "model") as tmp:  # the save that carries them over finishes too
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json"]
