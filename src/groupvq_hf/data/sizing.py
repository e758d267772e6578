"""Dataset sizing: images per split of the named sources and of local files, for schedules in epochs."""

from __future__ import annotations

from pathlib import Path

from ..data.stream import ResumableBatches  # noqa: F401  (re-exported: moved next to the data code)

# Images per split of the named sources (ImageNet-1k: ILSVRC 2012; COCO: 2017 images), for schedules in epochs.
KNOWN_DATASET_SIZES = {
    ("imagenet", "train"): 1_281_167, ("imagenet", "validation"): 50_000,
    ("imagenet-wds", "train"): 1_281_167, ("imagenet-wds", "validation"): 50_000,
    ("coco", "train"): 118_287, ("coco", "validation"): 5_000,
}  # fmt: skip


def _count_shard_rows(kind: str, shard: str) -> int:
    """Rows of one local parquet file (from its metadata) or samples in one tar shard (as datasets' webdataset
    builder groups members into samples: by the name before the first dot, so ``k.jpg`` + ``k.seg.png`` + ``k.cls``
    is one row); 0 for an unreadable one (the stream skips it and names it)."""
    from ..data.sources import shard_errors

    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(shard).metadata.num_rows
        import tarfile

        from datasets.packaged_modules.webdataset.webdataset import base_plus_ext

        with tarfile.open(shard) as tar:
            keys = (base_plus_ext(m.name)[0] for m in tar if m.isfile())
            return len({key for key in keys if key is not None})
    except shard_errors():
        return 0


def _count_local_rows(kind: str, files: list[str]) -> int:
    """Rows of local parquet files, images of an image folder, or samples in tar shards (readable shards only)."""
    from ..data.sources import image_files

    if kind == "parquet":
        return sum(_count_shard_rows(kind, f) for f in files if f.endswith(".parquet"))
    if kind == "webdataset":
        return sum(_count_shard_rows(kind, f) for f in files)
    return len(image_files(files))


def dataset_num_examples(dataset: str, split: str = "train", network: bool = True) -> int | None:
    """Examples in one epoch of ``dataset``'s ``split``, or None when it cannot be known without reading it all.

    Named sources: their published sizes (or the rows of a local mirror named by ``GROUPVQ_<NAME>_PATH``); local
    files: parquet metadata, image files, images in tar shards (the split resolved as ``datasets`` resolves it);
    the demo: the rows of its source (cheap, nothing is decoded); Hub repo ids: the split sizes of the dataset's
    info when it has them (needs the network; ``network=False`` gives None instead). Mixed specs (``a+b``) have a
    random epoch length: None.
    """
    from ..data.sources import (
        SOURCES,
        SPLIT_ALIASES,
        load_image_source,
        local_builder,
        parse_dataset_spec,
    )

    parts = parse_dataset_spec(dataset)
    if len(parts) != 1:
        return None
    name = parts[0][0]
    if name == "demo":
        return sum(1 for _ in load_image_source("demo", split))
    source = SOURCES.get(name)
    path = Path(source.location() if source is not None else name).expanduser()
    if path.exists():
        kind, _, builder = local_builder(path)
        files = builder.config.data_files or {}
        wanted = "train" if path.is_file() else (source.split(split) if source is not None else split)
        # the split the stream reads (data._local_split): itself, an alias, or the only split there is
        candidates = [wanted, *SPLIT_ALIASES.get(wanted, ()), *(files if len(files) == 1 else ())]
        for candidate in candidates:
            if candidate in files:
                return _count_local_rows(kind, [str(f) for f in files[candidate]])
        return None
    if source is not None:
        return KNOWN_DATASET_SIZES.get((name, split))
    if not network:
        return None
    try:  # a Hub repo id: the split sizes its card or parquet export publish (needs the network)
        import datasets

        splits = datasets.load_dataset_builder(name).info.splits or {}
        size = splits[split].num_examples if split in splits else 0
        return int(size) or None
    except Exception:  # offline, gated, or no such information
        return None


def dataset_num_shards(dataset: str, split: str = "train", image_column: str | None = None) -> int | None:
    """Shards of the stream of a local dataset or the demo (files; ``datasets`` deals them to loader workers and
    stops the workers beyond their number), None for other sources (named, Hub or mixed: not read here)."""
    from ..data.sources import SOURCES, load_image_source, parse_dataset_spec

    parts = parse_dataset_spec(dataset)
    if len(parts) != 1:
        return None
    name = parts[0][0]
    source = SOURCES.get(name)
    if name != "demo" and not Path(source.location() if source is not None else name).expanduser().exists():
        return None
    return load_image_source(name, split, image_column).num_shards


__all__ = [
    "KNOWN_DATASET_SIZES",
    "dataset_num_examples",
    "dataset_num_shards",
]
