"""ResumableBatches: exact resume that skips consumed rows without decoding them, with and without loader workers."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from groupvq_hf.data import build_image_dataset
from groupvq_hf.data.stream import ResumableBatches


@pytest.fixture(autouse=True)
def _no_thread_shutdown_sleep(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


@pytest.fixture(scope="module")
def parquet_folder(tmp_path_factory):
    """4 parquet shards of 12 rows; every 5th row is not an image (skipped rows shift the batch boundaries)."""
    import datasets

    root = tmp_path_factory.mktemp("parquet")
    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image()})
    for shard in range(4):
        rows = []
        for i in range(12):
            if (12 * shard + i) % 5 == 3:
                rows.append({"image": {"bytes": b"not an image", "path": None}})
                continue
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (24, 28, 3), dtype=np.uint8)).save(buffer, format="PNG")
            rows.append({"image": {"bytes": buffer.getvalue(), "path": None}})
        datasets.Dataset.from_dict({"image": [r["image"] for r in rows]}, features=features).to_parquet(
            str(root / f"train-{shard:05d}-of-00004.parquet")
        )
    return str(root)


def _stream(folder):
    return build_image_dataset(folder, resolution=16, seed=4, shuffle_buffer_size=8)


def _take(batches, n):
    iterator = iter(batches)
    return [next(iterator) for _ in range(n)]


def _same(a, b):
    return all(torch.equal(x["pixel_values"], y["pixel_values"]) and x["keys"] == y["keys"] for x, y in zip(a, b))


def test_resume_skips_consumed_rows_without_decoding_and_equals_the_straight_run(parquet_folder):
    straight_stream = _stream(parquet_folder)
    rng_before = torch.get_rng_state()
    straight = _take(ResumableBatches(straight_stream, 3, seed=4), 16)  # 38 images: crosses into epoch 1
    assert torch.equal(torch.get_rng_state(), rng_before)  # augmentations leave the global RNG alone
    head_stream = _stream(parquet_folder)
    first = ResumableBatches(head_stream, 3, seed=4)
    _take(first, 10)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["epoch"] == 0 and state["batches_in_epoch"] == 10 and state["workers"][0][0] == 10
    assert state["workers"][0][1] > 30  # rows read, bad ones included
    resumed_stream = _stream(parquet_folder)
    resumed = ResumableBatches(resumed_stream, 3, seed=4)
    resumed.load_state_dict(state)
    tail = _take(resumed, 6)
    assert _same(straight[10:], tail)
    # nothing consumed before the resume is decoded again: the resumed run decodes what the straight run decoded
    # after, and the batch the head had read ahead (batches are yielded once the next one is read) but not yielded
    ahead = straight[10]["rows_read"] - straight[9]["rows_read"]
    assert resumed_stream.decoded == straight_stream.decoded - head_stream.decoded + ahead


@pytest.mark.parametrize("num_workers", [2])
def test_resume_with_loader_workers_equals_the_straight_run(parquet_folder, num_workers):
    straight = _take(ResumableBatches(_stream(parquet_folder), 2, num_workers, seed=4), 12)
    first = ResumableBatches(_stream(parquet_folder), 2, num_workers, seed=4)
    _take(first, 5)  # an odd count: the next batch comes from worker 1
    state = first.state_dict()
    assert [b for b, _ in state["workers"]] == [3, 2]
    resumed = ResumableBatches(_stream(parquet_folder), 2, num_workers, seed=4)
    resumed.load_state_dict(state)
    assert _same(straight[5:], _take(resumed, 7))
    with pytest.raises(ValueError, match="--dataloader_num_workers 2"):
        ResumableBatches(_stream(parquet_folder), 2, 0).load_state_dict(state)


def test_positions_from_other_layouts_are_refused(parquet_folder):
    batches = ResumableBatches(_stream(parquet_folder), 2)
    batches.load_state_dict({"epoch": 3, "batches_in_epoch": 0})  # an epoch boundary needs no worker positions
    assert batches.state_dict() == {"epoch": 3, "batches_in_epoch": 0, "workers": [[0, 0]], "stream_order": 2}
    with pytest.raises(ValueError, match="older version"):
        batches.load_state_dict({"epoch": 1, "batches_in_epoch": 4})
    with pytest.raises(ValueError, match="inconsistent"):
        batches.load_state_dict({"epoch": 1, "batches_in_epoch": 4, "workers": [[3, 9]]})
    with pytest.raises(ValueError, match="no full batch"):
        next(iter(ResumableBatches(build_image_dataset(parquet_folder, resolution=16, max_samples=2), batch_size=4)))


def test_a_mid_epoch_position_of_the_older_stream_order_resumes_with_a_warning(parquet_folder, caplog):
    """Positions saved before image folders streamed as shards of files (no ``stream_order``) still load; mid-epoch
    the warning says which sources may repeat or miss images; at an epoch boundary nothing is said."""
    batches = ResumableBatches(_stream(parquet_folder), 2)
    with caplog.at_level("WARNING"):
        batches.load_state_dict({"epoch": 1, "batches_in_epoch": 0})
        assert not caplog.records
        batches.load_state_dict({"epoch": 1, "batches_in_epoch": 3, "workers": [[3, 6]]})
    assert [r.getMessage() for r in caplog.records if "stream order 1" in r.getMessage() and "image folder" in
            r.getMessage()]  # fmt: skip
    assert batches.state_dict()["workers"] == [[3, 6]]
    caplog.clear()
    with caplog.at_level("WARNING"):
        batches.load_state_dict(batches.state_dict())
    assert not caplog.records


def test_rows_deleted_between_a_kill_and_the_resume_are_reported(parquet_folder, tmp_path, caplog):
    """Files deleted after the checkpoint: the resumed stream ends before the saved position, and says how many of
    the rows read before the kill are missing instead of passing silently."""
    import shutil

    first = ResumableBatches(_stream(parquet_folder), 3, seed=4)
    _take(first, 10)
    state = first.state_dict()
    rows_read = state["workers"][0][1]
    folder = shutil.copytree(parquet_folder, tmp_path / "parquet")
    for shard in sorted(folder.glob("*.parquet"))[2:]:  # 2 of the 4 shards (24 of 48 rows) deleted
        shard.unlink()
    resumed = ResumableBatches(_stream(str(folder)), 3, seed=4)
    resumed.load_state_dict(state)
    with caplog.at_level("WARNING"):
        batch = _take(resumed, 1)[0]  # the rest of epoch 0 is gone: the next batch is epoch 1's first
    assert resumed.epoch == 1 and batch["pixel_values"].shape[0] == 3
    messages = [record.getMessage() for record in caplog.records]
    assert any(f"{rows_read - 24} of the {rows_read} rows read before the resume are missing" in m for m in messages)


def _through_first_batch_of_epoch_1(batches):
    """Batches of epoch 0, then epoch 1's first batch (taken on its own)."""
    epoch_0, iterator = [], iter(batches)
    for batch in iterator:
        if batches.epoch == 1:
            return epoch_0, batch
        epoch_0.append(batch)
    raise AssertionError("the stream never reached epoch 1")


@pytest.mark.parametrize("num_workers, batch_size", [(0, 5), (2, 4)])  # both lose a bad image without the tails
def test_every_bad_image_of_an_epoch_is_counted_even_after_a_workers_last_full_batch(
    parquet_folder, num_workers, batch_size
):
    """The 9 bad rows of the 48 are all counted in epoch 0's batches, also those read after a loader worker's last
    full batch and those before the good images of the partial batch it drops (before, those came with epoch 1's
    first batch, so a run that ended with epoch 0 never counted them). Epoch 1's first batch carries the bad rows
    epoch 1 read before it: its worker's rows read minus its images."""
    batches = ResumableBatches(_stream(parquet_folder), batch_size, num_workers, seed=4)
    epoch_0, first = _through_first_batch_of_epoch_1(batches)
    assert all(batch["pixel_values"].shape[0] == batch_size for batch in epoch_0 + [first])
    assert sum(batch["num_skipped"] for batch in epoch_0) == 9
    assert first["num_skipped"] == first["rows_read"] - batch_size


def test_bad_images_read_after_a_workers_last_full_batch_are_counted_once_across_a_resume(parquet_folder):
    """Resumed after any batch of the epoch, the rest of the run counts the same bad images as the straight run
    (a worker's tail is neither lost nor counted twice)."""
    straight_0, straight_first = _through_first_batch_of_epoch_1(ResumableBatches(_stream(parquet_folder), 4, 2, 4))
    straight = straight_0 + [straight_first]
    for k in range(len(straight_0) - 3, len(straight_0) + 1):
        first = ResumableBatches(_stream(parquet_folder), 4, 2, seed=4)
        _take(first, k)
        resumed = ResumableBatches(_stream(parquet_folder), 4, 2, seed=4)
        resumed.load_state_dict(first.state_dict())
        rest = _take(resumed, len(straight) - k)
        assert [b["keys"] for b in rest] == [b["keys"] for b in straight[k:]], k
        assert [b["num_skipped"] for b in rest] == [b["num_skipped"] for b in straight[k:]], k
