"""The rows every source yields: their columns, the stable key of a stored image, and the seeds derived from keys and
positions (no process state), so that every process and loader worker agrees on them."""

from __future__ import annotations

import hashlib

UNREADABLE_SHARD = "unreadable_shard"  # row column: the shard a marker row stands for ("" in the image rows)


def row_features():
    """The columns of every source's rows: the stored ``image``, its ``key`` and `UNREADABLE_SHARD`."""
    import datasets

    text = datasets.Value("string")
    return datasets.Features({"image": datasets.Image(decode=False), "key": text, UNREADABLE_SHARD: text})



def example_key(image: dict | None) -> str:
    """A stable identifier of a stored image: its file path when it has one, else a hash of its bytes."""
    image = image or {}
    blob = image.get("bytes")
    return hashlib.sha1(blob).hexdigest()[:16] if blob else (image.get("path") or "")


def hash_seed(*parts, bits: int = 63) -> int:
    """A seed that depends on ``parts`` alone (no process state): the first 8 bytes of the sha256 of
    ``"part0/part1/..."``, little-endian, keeping the low ``bits`` bits (63: a valid torch seed)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << bits) - 1)


def example_seed(seed: int, rank: int, epoch: int, worker: int, row: int) -> int:
    """Seed of one example's augmentation: a hash of the run's ``seed``, the process ``rank``, the ``epoch``, the
    loader ``worker`` and the ``row`` index in that worker's raw stream. Examples skipped on resume are never
    decoded, and the others still draw the same crops and flips."""
    return hash_seed(seed, rank, epoch, worker, row)


__all__ = ["UNREADABLE_SHARD", "example_key", "example_seed", "hash_seed", "row_features"]
