"""Where images come from: named datasets, Hub repos, local folders / parquet / tar shards, and the demo photos.

``load_image_source(name, split, ...)`` turns one source into a streaming ``datasets.IterableDataset`` of stored
(undecoded) images, ``{"image", "key"}`` rows (`groupvq_hf.data.rows`); `groupvq_hf.data.build_image_dataset`
mixes, shuffles and splits them and decodes them (`groupvq_hf.data.decoding`).

Dataset specs:

- ``"demo"``: real photographs bundled with scikit-image (no network; `groupvq_hf.data.demo`).
- a named source from [`SOURCES`]: ``"imagenet"`` (``ILSVRC/imagenet-1k``, parquet, gated: log in or set
  ``HF_TOKEN``), ``"imagenet-wds"`` (``timm/imagenet-1k-wds`` webdataset shards), ``"coco"``
  (``detection-datasets/coco``, MS-COCO 2017 images in parquet). ``GROUPVQ_<NAME>_PATH`` (e.g.
  ``GROUPVQ_IMAGENET_PATH=/data/imagenet-1k``) points a named source at a local mirror with the Hub layout.
- ``"a+b"`` or weighted ``"imagenet:0.7+coco:0.3"``: sources mixed with ``interleave_datasets``.
- any Hub dataset repo id (``"owner/name"``) backed by parquet or webdataset files (datasets 5 runs no loading
  scripts), with an image column (``image_column``, guessed from the features when not given).
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from .demo import demo_dataset
from .rows import UNREADABLE_SHARD, row_features

SHARDED_FORMATS = ("parquet", "webdataset")  # datasets builders whose data files are read shard by shard
FOLDER_SHARDS = 1024  # a local image folder streams as up to this many shards of files (`_image_files_stream`)
SHARD_READ_ROWS = 64  # rows read from a shard at a time (a damaged shard loses at most these before its marker)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSource:
    """Where a named dataset lives on the Hub and how its rows hold images.

    ``fmt`` is the storage format ("parquet" or "webdataset"), ``split_names`` maps our split names to the repo's.
    ``env_var`` names the environment variable that points the source at a local mirror with the same layout.
    """

    name: str
    repo_id: str
    image_column: str
    fmt: str
    config: str | None = None
    label_column: str | None = None
    split_names: tuple[tuple[str, str], ...] = ()

    @property
    def env_var(self) -> str:
        return f"GROUPVQ_{self.name.upper().replace('-', '_')}_PATH"

    def location(self) -> str:
        """The repo id, or the local mirror named by ``env_var`` when set."""
        return os.environ.get(self.env_var) or self.repo_id

    def split(self, split: str) -> str:
        return dict(self.split_names).get(split, split)


SOURCES: dict[str, DataSource] = {
    # ImageNet-1k (ILSVRC 2012), parquet shards: image {bytes, path}, label (1000 classes). Gated on the Hub.
    "imagenet": DataSource("imagenet", "ILSVRC/imagenet-1k", "image", "parquet", label_column="label"),
    # The same images as webdataset shards (imagenet1k-{train,validation}-NNNN.tar holding <key>.jpg, <key>.cls).
    "imagenet-wds": DataSource("imagenet-wds", "timm/imagenet-1k-wds", "jpg", "webdataset", label_column="cls"),
    # MS-COCO 2017 (118k train / 5k val images), parquet: image_id, image, width, height, objects.
    "coco": DataSource("coco", "detection-datasets/coco", "image", "parquet", split_names=(("validation", "val"),)),
}


def parse_dataset_spec(dataset: str) -> list[tuple[str, float]]:
    """``"imagenet:0.7+coco:0.3"`` -> ``[("imagenet", 0.7), ("coco", 0.3)]``; weights default to equal shares."""
    if not isinstance(dataset, str) or not dataset.strip():
        raise ValueError(
            f"`dataset` must be a non-empty string (demo, imagenet, coco, a+b, a repo id or a path), got {dataset!r}."
        )
    if local_source_path(dataset) is not None:  # an existing file or folder, even with "+" or ":" in its name
        return [(dataset, 1.0)]
    parts = []
    for part in dataset.split("+"):
        name, weight = part.strip(), None
        head, sep, tail = name.rpartition(":")
        if sep and head and not Path(name).exists():
            try:
                weight = float(tail)
                name = head
            except ValueError:
                pass  # a colon that is not a weight (e.g. a Windows path)
        if not name:
            raise ValueError(f"`dataset` has an empty source in {dataset!r}.")
        if weight is not None and weight <= 0:
            raise ValueError(f"`dataset` weights must be positive, got {weight} for {name!r} in {dataset!r}.")
        parts.append((name, weight))
    given = [w for _, w in parts if w is not None]
    if given and len(given) != len(parts):
        raise ValueError(f"`dataset` must give a weight to every source or to none, got {dataset!r}.")
    total = sum(given) if given else float(len(parts))
    return [(name, (w if w is not None else 1.0) / total) for name, w in parts]


def _guess_image_column(features, where: str) -> str:
    import datasets

    if features is None:
        raise ValueError(f"Cannot tell which column of {where} holds images; pass `image_column`.")
    for name, feature in features.items():
        if isinstance(feature, datasets.Image):
            return name
    for name in ("image", "img", "jpg", "jpeg", "png", "webp"):
        if name in features:
            return name
    raise ValueError(f"No image column found in {where} (columns: {list(features)}); pass `image_column`.")


def local_source_path(name: str) -> Path | None:
    """The local file or folder a source ``name`` stands for; None for ``demo``, a named source or a Hub repo id
    (a named source wins over a folder of the same name)."""
    path = Path(name).expanduser()
    return path if name != "demo" and name not in SOURCES and path.exists() else None


def image_extensions() -> tuple[str, ...]:
    """The file extensions (lower case, with the dot) that ``datasets``' imagefolder and webdataset builders read as
    images: one list for what a local folder streams and what sizing counts (`groupvq_hf.data.sizing`)."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    return tuple(ImageFolder.EXTENSIONS)


def image_files(files) -> list[str]:
    """The ``files`` (paths) that are images by their extension (`image_extensions`, any case), in their order."""
    extensions = image_extensions()
    return [str(f) for f in files if Path(f).suffix.lower() in extensions]


def local_loader(path: Path) -> tuple[str, dict]:
    """``load_dataset`` arguments for a local file or folder (parquet, webdataset tar shards or image files)."""
    if path.is_file():
        suffixes = Counter([path.suffix.lower()])
    else:  # os.walk, not pathlib: a tenth of the time; like datasets' walk (and rglob), not into linked folders
        suffixes = Counter(
            os.path.splitext(name)[1].lower() for _, _, names in os.walk(path) for name in names
        )
    if suffixes[".parquet"]:
        kind = "parquet"
    elif suffixes[".tar"]:
        kind = "webdataset"
    elif any(suffixes[e] for e in image_extensions()):
        kind = "imagefolder"
    else:
        raise ValueError(
            f"`dataset` path {str(path)!r} holds no parquet files, webdataset .tar shards or images (files ending "
            "in .jpg, .jpeg, .png, .webp ... : any extension datasets' imagefolder reads)."
        )
    if path.is_file():
        return kind, {"data_files": {"train": str(path)}}
    return kind, {"data_dir": str(path)}


_LOCAL_BUILDERS: dict = {}  # (path, listing key) -> (kind, kwargs, builder), the last `_LOCAL_BUILDERS_KEPT` sources
_LOCAL_BUILDERS_KEPT = 4


@contextlib.contextmanager
def _cyclic_gc_paused():
    """Python's cyclic garbage collector paused while it is open (and running again after, if it was before).

    ``datasets``' resolution of a folder's data files makes millions of small objects (fsspec's file infos, path
    parts), which set off full collections that each scan every object alive: 40% of the resolution of 100,000
    files (33 s against 19 s, `benchmarks/bench_local_folder.py`). What it makes is freed by reference counting; the
    collector catches up on any cycle once it runs again."""
    import gc

    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@contextlib.contextmanager
def _one_resolution_per_pattern():
    """While it is open, ``datasets.data_files.resolve_pattern`` returns what it returned before for the same
    arguments (the files matching a pattern, or the same ``FileNotFoundError``) without matching again.

    ``datasets`` resolves each candidate split pattern to find the splits, then the patterns of the splits it found
    once more (for ``train/`` and ``val/``: 58 calls, 44 patterns; the second ``**/train/**`` alone was a fifth of
    the resolution of 100,000 files). Its rules stay its own: only repeats are answered from memory."""
    import datasets.data_files

    answers = {}
    real_resolve = datasets.data_files.resolve_pattern

    def resolve_pattern(pattern, base_path, allowed_extensions=None, download_config=None):
        key = (pattern, base_path, None if allowed_extensions is None else tuple(allowed_extensions), repr(download_config))
        if key not in answers:
            try:
                answers[key] = real_resolve(pattern, base_path, allowed_extensions, download_config)
            except FileNotFoundError as err:
                answers[key] = err
        if isinstance(answers[key], FileNotFoundError):
            raise FileNotFoundError(*answers[key].args)
        return list(answers[key])  # a copy: callers may change what they get

    with mock.patch.object(datasets.data_files, "resolve_pattern", resolve_pattern):
        yield


@contextlib.contextmanager
def _origin_metadata_without_threads():
    """While it is open, ``datasets``' origin metadata of a list of local files (each file's modification time) is
    read by ``datasets``' own per-file function in a loop instead of a thread pool; other files go to ``datasets``.

    A stat does not need threads, and handing 100,000 of them to a pool cost 5.7 s against 1.6 s in a loop."""
    import datasets.data_files

    real_origin_metadata = datasets.data_files._get_origin_metadata

    def origin_metadata(data_files, download_config=None, max_workers=None):
        if any("://" in str(data_file) for data_file in data_files):
            return real_origin_metadata(data_files, download_config=download_config, max_workers=max_workers)
        single = datasets.data_files._get_single_origin_metadata
        return [single(data_file, download_config=download_config) for data_file in data_files]

    with mock.patch.object(datasets.data_files, "_get_origin_metadata", origin_metadata):
        yield


@contextlib.contextmanager
def _one_walk_per_folder():
    """While it is open, fsspec's local ``find`` (the walk under every ``glob``) returns the same listing for the
    same arguments without walking again.

    ``datasets`` resolves a folder's data files with one glob per candidate split pattern and then per pattern of
    the splits found (58 for ``train/`` and ``val/``), each a full walk of the folder; the listing is the same for
    all of them, so this keeps every step of ``datasets``' own resolution (its patterns, hidden-file and extension
    rules, file order) but walks once. Not thread-safe: the class attribute is set for the duration."""
    from fsspec.implementations.local import LocalFileSystem

    walks = {}
    real_find, own_find = LocalFileSystem.find, LocalFileSystem.__dict__.get("find")

    def find(self, path, maxdepth=None, withdirs=False, detail=False, **kwargs):
        key = (self._strip_protocol(path), maxdepth, withdirs, detail, tuple(sorted(kwargs.items())))
        if key not in walks:
            walks[key] = real_find(self, path, maxdepth=maxdepth, withdirs=withdirs, detail=detail, **kwargs)
        return dict(walks[key]) if detail else list(walks[key])  # a copy: callers may change what they get

    LocalFileSystem.find = find
    try:
        yield
    finally:
        if own_find is None:
            del LocalFileSystem.find  # back to the inherited AbstractFileSystem.find
        else:
            LocalFileSystem.find = own_find


def _listing_key(path: Path) -> str:
    """What a local source's builder depends on: the name, size and mtime of every file under ``path`` (and the
    folders). One walk with a ``stat`` per file: about 0.5 s per 100,000 files, against a minute for ``datasets``'
    resolution of the data files."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    if path.is_file():
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode(errors="surrogateescape"))
        return digest.hexdigest()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        digest.update(f"{root}\0{dirs}\n".encode(errors="surrogateescape"))
        for name in sorted(files):
            stat = os.stat(os.path.join(root, name))
            digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode(errors="surrogateescape"))
    return digest.hexdigest()


def local_builder(path: Path) -> tuple[str, dict, object]:
    """``(kind, kwargs, builder)`` of a local source: `local_loader`'s arguments and the ``datasets`` builder made
    with them (its ``config.data_files`` name the splits and their files).

    ``datasets`` resolves a folder's data files by walking it once per candidate split pattern (58 walks for
    ``train/`` and ``val/``: about a minute per 100,000 files on 2 cores), and a training start asks for the same
    source's builder for sizing, shards, the training and the validation stream. So the builder is made with one
    walk of the folder (`_one_walk_per_folder`), its data files are recorded for the other processes and later runs
    (`_folder_builder`), and it is kept for this process while the files under ``path`` are unchanged
    (`_listing_key`); a file added, removed, renamed or rewritten gives a new one."""
    key = (str(path.resolve()), _listing_key(path))
    if key not in _LOCAL_BUILDERS:  # `local_loader` walks the folder too: only when the listing is new
        while len(_LOCAL_BUILDERS) >= _LOCAL_BUILDERS_KEPT:
            _LOCAL_BUILDERS.pop(next(iter(_LOCAL_BUILDERS)))
        kind, kwargs = local_loader(path)
        _LOCAL_BUILDERS[key] = kind, kwargs, _folder_builder(kind, kwargs, *key)
    return _LOCAL_BUILDERS[key]


RESOLVED_FILES_DIR = "groupvq_local_files"  # under datasets' cache (HF_DATASETS_CACHE): one record per local folder


def _read_record(record_path: Path | None, stamp: dict | None, parse):
    """``parse(payload)`` of the record at ``record_path`` (a local folder's data files or features), or None when
    there is none, it is damaged or its stamp differs from ``stamp`` (records are written whole: `_write_record`)."""
    import json

    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        return parse(record["payload"]) if record["stamp"] == stamp else None
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return None


def _write_record(record_path: Path, stamp: dict, payload) -> None:
    """Write ``{"stamp", "payload"}`` to ``record_path`` all at once, on one line (ImageNet's data files make an
    estimated 100 MB); a cache that cannot be written is logged, not an error."""
    from ..fileio import write_json

    try:
        write_json({"stamp": stamp, "payload": payload}, record_path, indent=None)
    except OSError as err:
        logger.info(f"Could not record {record_path.name} for {stamp['path']!r} ({err}).")


def _data_files_from(payload: dict):
    """The ``DataFilesDict`` of a data-files record's payload (None when it names no split)."""
    from datasets.data_files import DataFilesDict, DataFilesList

    return DataFilesDict({
        split: DataFilesList(list(entry["files"]), [tuple(m) for m in entry["origin_metadata"]])
        for split, entry in payload.items()
    }) or None  # fmt: skip


def _folder_builder(kind: str, kwargs: dict, path: str, listing: str):
    """``datasets.load_dataset_builder(kind, **kwargs)`` for a local source, a folder's data files resolved once
    and recorded on disk.

    The first process to resolve a folder (``datasets``' rules, with one walk, each pattern matched once, the
    modification times read in a loop and the cyclic garbage collector paused: the four context managers above)
    writes the data files it found,
    with their modification times (``datasets``' ``origin_metadata``), to ``<HF_DATASETS_CACHE>/groupvq_local_files``
    under a file lock; the other processes of the run wait for it, and later runs (a resume, an evaluation) read
    it. The builder is then made from those data files, which ``datasets`` takes as they are (resolved
    ``DataFilesList``s): the same files, order and features, and the same builder in every run (its config id, which
    names its arrow cache, is that of the data files given by name). The record holds the folder's listing key and
    the ``datasets`` version, and is rewritten when either differs. An unwritable cache resolves without a record."""
    import hashlib

    import datasets
    from filelock import FileLock

    if "data_dir" not in kwargs:  # a single file: nothing to resolve
        return datasets.load_dataset_builder(kind, **kwargs)
    name = hashlib.blake2b(path.encode(errors="surrogateescape"), digest_size=16).hexdigest()
    record_path = Path(datasets.config.HF_DATASETS_CACHE) / RESOLVED_FILES_DIR / f"{name}.json"
    stamp = {"path": path, "listing": listing, "kind": kind, "datasets": datasets.__version__}
    data_files = _read_record(record_path, stamp, _data_files_from)  # written whole: readable without the lock
    if data_files is None:
        try:
            record_path.parent.mkdir(parents=True, exist_ok=True)
            lock = FileLock(f"{record_path}.lock")
            lock.acquire()
        except OSError as err:
            logger.info(f"Resolving {path!r} without a record ({err}).")
            lock = None
        try:
            data_files = _read_record(record_path, stamp, _data_files_from)  # written while we waited
            if data_files is None:
                with (
                    _one_walk_per_folder(),
                    _one_resolution_per_pattern(),
                    _origin_metadata_without_threads(),
                    _cyclic_gc_paused(),
                ):
                    data_files = datasets.load_dataset_builder(kind, **kwargs).config.data_files
                if lock is not None:
                    _write_record(record_path, stamp, {
                        str(split): {"files": list(files), "origin_metadata": [list(m) for m in files.origin_metadata]}
                        for split, files in data_files.items()
                    })  # fmt: skip
        finally:
            if lock is not None:
                lock.release()
    builder = datasets.load_dataset_builder(kind, **kwargs, data_files=data_files)
    if record_path.parent.is_dir():
        _RECORDS[builder] = record_path, stamp  # where `_folder_features` records the features it infers
    return builder


SPLIT_ALIASES = {"validation": ("val", "valid"), "val": ("validation",), "valid": ("validation", "val")}


def _local_split(builder, split: str, where: str, notes: list[str]) -> str:
    """The split of a local dataset (its ``datasets`` builder) to read for ``split``: itself, an alias (val /
    validation), or the only split there is (with a note in ``notes``); a ValueError listing the splits otherwise."""
    # the resolved data files name the splits without reading any of them (a damaged first shard stays readable)
    splits = [str(name) for name in builder.config.data_files]
    for name in (split, *SPLIT_ALIASES.get(split, ())):
        if name in splits:
            return name
    if len(splits) == 1:
        notes.append(f"{where} has a single split ({splits[0]!r}); reading it for the requested split {split!r}.")
        return splits[0]
    raise ValueError(f"`split` {split!r} is not a split of {where} (splits: {splits}).")


def shard_errors() -> tuple[type[BaseException], ...]:
    """What reading a damaged shard raises: arrow errors (truncated parquet: no magic bytes in the footer), tar
    errors (truncated or garbage .tar), I/O and decoding errors."""
    import tarfile

    import pyarrow

    return pyarrow.ArrowException, tarfile.TarError, OSError, EOFError, ValueError


def _open_shard(kind: str, shard: str, features=None):
    """One data file read by datasets' own ``kind`` builder, as a streaming dataset (nothing decoded). With
    ``features`` (the first shard's), a parquet file is read for those columns only: a later shard holding one
    more column (a caption added to a dataset over time) is read like the others."""
    import datasets

    columns = {}
    if features is not None and kind == "parquet":  # the shard's own columns from its footer (local or hf:// file)
        import fsspec
        import pyarrow.parquet as pq

        with fsspec.open(shard, "rb") as file:
            held = set(pq.read_schema(file).names)
        columns = {"columns": [name for name in features if name in held]}  # a missing one is filled with nulls
    ds = datasets.load_dataset(kind, data_files=[shard], split="train", streaming=True, features=features, **columns)
    return ds.decode(False)


def _no_empty_images(row: dict) -> dict:
    """``row`` with every ``{"bytes": None, "path": None}`` value (how a null image often lands in parquet) made None:
    `datasets.Image` refuses to encode it and would end the stream, while None is a missing image, skipped and
    counted like an undecodable one."""
    empty = {"bytes": None, "path": None}
    return {name: None if value == empty else value for name, value in row.items()}


def _read_shards(shards: list[str], kind: str, features):
    """The rows of ``shards`` one shard after the other. A shard that cannot be read (up front or partway) is
    logged and ends in one marker row whose `UNREADABLE_SHARD` names it; the next shard follows."""
    errors = shard_errors()  # now: a reader left unfinished is closed at shutdown, when `import` no longer works
    for shard in shards:
        try:
            # .iter(): every row of the shard, also inside a DataLoader worker (iterating the dataset would split the
            # shard's rows across workers again; the outer stream already gave this worker its shards)
            for rows in _open_shard(kind, shard, features).iter(batch_size=SHARD_READ_ROWS):
                for values in zip(*rows.values()):
                    yield {**_no_empty_images(dict(zip(rows, values))), UNREADABLE_SHARD: ""}
        except errors as err:
            logger.warning(f"Skipping the unreadable shard {shard} ({type(err).__name__}: {err}).")
            yield {**dict.fromkeys(features), UNREADABLE_SHARD: shard}


def _shard_stream(kind: str, shards: list[str], where: str):
    """A streaming dataset over the data files ``shards`` that survives damaged ones (see [`_read_shards`]); one
    shard per dataset shard, so sharding across ranks and loader workers and shard shuffling work as for
    ``load_dataset``. Features come from the first readable shard; a ValueError names them all when none is."""
    import datasets

    features, unreadable = None, []
    for shard in shards:
        try:
            features = _open_shard(kind, shard).features
            break
        except shard_errors() as err:
            unreadable.append(f"{shard} ({type(err).__name__}: {err})")
    if features is None:
        raise ValueError(f"Every shard of {where} is unreadable: {'; '.join(unreadable)}.")
    return datasets.IterableDataset.from_generator(
        _read_shards,
        features=datasets.Features({**features, UNREADABLE_SHARD: datasets.Value("string")}),
        gen_kwargs={"shards": list(shards), "kind": kind, "features": features},
    )


def _read_image_files(chunks: list[list[str]], labelled: bool):
    """The rows of local image files, chunk after chunk: the file as a stored image (its path; read when decoded)
    and, with ``labelled``, its folder's name as the label (datasets' imagefolder rule; the ``ClassLabel`` feature
    turns it into the class index)."""
    for files in chunks:
        for file in files:
            row = {"image": {"bytes": None, "path": file}}
            yield {**row, "label": os.path.basename(os.path.dirname(file))} if labelled else row


_FOLDER_FEATURES = weakref.WeakKeyDictionary()  # image-folder builder -> the features its streams have
_RECORDS = weakref.WeakKeyDictionary()  # local folder's builder -> (record path, stamp) of its data files


def _folder_features(builder, split: str):
    """A copy of the features of an image-folder builder's streams, as ``datasets`` gives them: its class names
    come from every split's folders, so they are the same for each split, and ``datasets`` reads every file name of
    every split to infer them (a sixth of a training start on a large folder). Inferred once per builder, not once
    per stream, and recorded beside its data files (`_folder_builder`) for the next processes, with the same
    stamp."""
    import datasets

    if builder not in _FOLDER_FEATURES:
        record_path, stamp = _RECORDS.get(builder, (None, None))
        features_path = None if record_path is None else record_path.with_suffix(".features.json")
        features = _read_record(features_path, stamp, datasets.Features.from_dict)
        if features is None:
            features = builder.as_streaming_dataset(split=split).features
            if features_path is not None:
                _write_record(features_path, stamp, features.to_dict())
        _FOLDER_FEATURES[builder] = features
    return _FOLDER_FEATURES[builder].copy()


def _image_files_stream(builder, split: str, files: list[str], file_order_seed: int | None):
    """A local image folder's ``split`` as a stream of up to `FOLDER_SHARDS` shards of files, or None when
    datasets' own imagefolder stream must read it (metadata files, archives, remote files).

    ``datasets`` streams an image folder as one shard: only one DataLoader worker (and, split by node, rank) would
    read it, and a shuffle buffer could not mix the classes of an ImageNet ``train/<class>/`` layout. Here the rows
    (paths and labels) are those datasets yields, with its features; ``file_order_seed`` permutes the files before
    they are cut into shards (training), so every shard spans the classes; None keeps datasets' sorted order."""
    import random

    import datasets
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    extensions, images = image_extensions(), image_files(files)
    kept = set(images)
    others = [Path(f) for f in map(str, files) if f not in kept]  # datasets ignores most of them
    if any("://" in str(f) for f in files) or any(
        p.name in ImageFolder.METADATA_FILENAMES or p.suffix.lower() == ".zip" or p.with_suffix("").suffix.lower()
        in extensions for p in others
    ) or not images:  # fmt: skip
        return None  # metadata files, zip archives, compressed images (x.png.gz), remote files or no image
    features = _folder_features(builder, split)
    features["image"] = datasets.Image(decode=False)
    if file_order_seed is not None:
        random.Random(file_order_seed).shuffle(images)
    size = -(-len(images) // FOLDER_SHARDS)
    chunks = [images[i : i + size] for i in range(0, len(images), size)]
    return datasets.IterableDataset.from_generator(
        _read_image_files, features=features, gen_kwargs={"chunks": chunks, "labelled": "label" in features}
    )


def _load_split(
    path: str,
    split: str,
    streaming: bool,
    config: str | None = None,
    file_order_seed: int | None = None,
    builder=None,
    **kwargs,
):
    """``split`` of the dataset at ``path`` as an ``IterableDataset``. ``builder``: its ``datasets`` builder when
    the caller already made one (a local folder's data files are resolved once: on ImageNet's 1.28 M files each
    resolution walks the tree dozens of times)."""
    import datasets

    if streaming:  # parquet and webdataset files are read shard by shard, so that a damaged one is skipped
        builder = builder or datasets.load_dataset_builder(path, config, **kwargs)
        files = {str(name): list(shards) for name, shards in (builder.config.data_files or {}).items()}
        if (builder.name in SHARDED_FORMATS or builder.name == "imagefolder") and files:
            name = next((n for n in (split, *SPLIT_ALIASES.get(split, ())) if n in files), None)
            if name is None:
                raise ValueError(f"`split` {split!r} is not a split of {path!r} (splits: {list(files)}).")
            if builder.name in SHARDED_FORMATS:
                return _shard_stream(builder.name, files[name], f"{path!r} (split {name!r})")
            stream = _image_files_stream(builder, name, files[name], file_order_seed)
            if stream is not None:
                return stream  # else datasets' own imagefolder stream, below

    def read(name: str):
        if streaming:  # what load_dataset(..., streaming=True) does with the builder it makes
            return builder.as_streaming_dataset(split=name)
        if builder is not None:  # and what it does with streaming=False
            builder.download_and_prepare()
            return builder.as_dataset(split=name)
        return datasets.load_dataset(path, config, split=name, streaming=False, **kwargs)

    try:
        ds = read(split)
    except ValueError as err:  # e.g. a repo that names its validation split "val" (or the other way round)
        if "split" not in str(err).lower():
            raise
        for alias in SPLIT_ALIASES.get(split, ()):
            try:
                ds = read(alias)
                break
            except ValueError:
                continue
        else:
            raise ValueError(f"`split` {split!r} of {path!r}: {err}") from None
    if not streaming:
        ds = ds.to_iterable_dataset(num_shards=max(1, min(64, len(ds))))
    return ds


def load_image_source(
    name: str,
    split: str = "train",
    image_column: str | None = None,
    streaming: bool = True,
    notes: list[str] | None = None,
    label_column: str | None = None,
    file_order_seed: int | None = None,
):
    """One source as an ``IterableDataset`` with columns ``image`` (``Image(decode=False)``) and ``key`` (and
    ``label`` with ``label_column``).

    ``key`` is the demo row's name, else empty (`ImageStream` names decoded examples by path or bytes hash). A local
    file or folder with a single split is read for any ``split``, with a line appended to ``notes``.
    ``label_column``: a column to keep as ``label`` (its feature, a ``ClassLabel`` with its names, kept), ``"auto"``
    (the named source's label column, else the first ``ClassLabel`` column, else none) or None (no label).
    ``file_order_seed``: a local image folder's files are permuted with this seed before they are cut into shards
    (`_image_files_stream`; training streams pass their seed), None keeps their sorted order.
    """
    import datasets

    notes = [] if notes is None else notes
    if name == "demo":
        if split not in ("train", "validation", "test"):
            raise ValueError(f"`split` of the demo photos must be 'train', 'validation' or 'test', got {split!r}.")
        ds = demo_dataset(split)
        if label_column not in (None, "auto"):
            columns = _columns(ds.features)
            raise ValueError(f"`label_column` {label_column!r} is not a column of 'demo' (columns: {columns}).")
        return ds
    source = SOURCES.get(name)
    if source is not None:
        column = image_column or source.image_column
        ds = _load_split(source.location(), source.split(split), streaming, source.config, file_order_seed)
    elif (path := local_source_path(name)) is not None:
        kind, kwargs, builder = local_builder(path)  # resolves the data files: once per source and process
        local_split = _local_split(builder, split, f"local dataset {name!r}", notes)
        ds = _load_split(kind, local_split, streaming, file_order_seed=file_order_seed, builder=builder, **kwargs)
        column = image_column or _guess_image_column(ds.features, name)
    elif name.count("/") == 1 and not name.startswith((".", "/")):
        try:
            ds = _load_split(name, split, streaming)
        except ConnectionError as err:  # offline (HF_HUB_OFFLINE=1) or no network: say what else it could have been
            raise ValueError(
                f"`dataset` source {name!r} is not an existing local path, and the Hub dataset of that name cannot be "
                f"reached ({err}). Offline, only local paths, 'demo' and the named sources' local mirrors "
                "(GROUPVQ_<NAME>_PATH) can be read."
            ) from err
        column = image_column or _guess_image_column(ds.features, name)
    else:
        raise ValueError(
            f"`dataset` source {name!r} is not 'demo', a named source ({', '.join(SOURCES)}), an existing local path "
            "or a Hub repo id 'owner/name'."
        )
    found = ds.features  # a deep copy per access (milliseconds each with ImageNet's 1,000 class names): read once
    if found is not None and column not in found:
        raise ValueError(f"`image_column` {column!r} is not a column of {name!r} (columns: {_columns(found)}).")
    label = _resolve_label_column(label_column, source, found, name)
    if label is not None and label == column:
        raise ValueError(
            f"`label_column` {label!r} is the image column of {name!r}: name the column holding the labels "
            f"(columns: {_columns(found) if found is not None else 'unknown'}), or none."
        )
    _check_image_feature(None if found is None else found[column], column, name)
    marked = found is not None and UNREADABLE_SHARD in found  # read by `_shard_stream`
    ds = ds.select_columns([column] + ([label] if label else []) + ([UNREADABLE_SHARD] if marked else []))
    if column != "image":
        ds = ds.rename_column(column, "image")
    if label and label != "label":
        ds = ds.rename_column(label, "label")
    ds = ds.cast_column("image", datasets.Image(decode=False))
    features = row_features()
    if label:
        features["label"] = found[label] if found is not None else datasets.Value("int64")
    return ds.map(_source_row, features=features)


def _columns(features) -> list[str]:
    """The source's own columns, as errors name them (not the shard reader's marker column)."""
    return [column for column in features if column != UNREADABLE_SHARD]


def _resolve_label_column(label_column: str | None, source: DataSource | None, features, name: str) -> str | None:
    """The column holding labels (see `load_image_source`), or None; a ValueError naming the columns when a given
    ``label_column`` is not one of them."""
    import datasets

    if label_column is None:
        return None
    if label_column != "auto":
        if features is not None and label_column not in features:
            columns = _columns(features)
            raise ValueError(f"`label_column` {label_column!r} is not a column of {name!r} (columns: {columns}).")
        return label_column
    if source is not None and source.label_column and (features is None or source.label_column in features):
        return source.label_column
    for column, feature in (features or {}).items():
        if isinstance(feature, datasets.ClassLabel):
            return column
    return None


def _check_image_feature(feature, column: str, name: str) -> None:
    """A ValueError when the ``column`` of source ``name`` cannot hold images: an image feature, encoded bytes,
    file paths (strings) or ``{"bytes", "path"}`` structs can; numbers, labels and lists cannot."""
    import datasets

    if feature is None or isinstance(feature, datasets.Image):
        return
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string", "binary", "large_binary"):
        return
    if isinstance(feature, dict) and {"bytes", "path"} & set(feature):
        return
    kind = feature.dtype if isinstance(feature, datasets.Value) else type(feature).__name__
    raise ValueError(
        f"`image_column` {column!r} of {name!r} holds {kind} values, not images (expected an Image feature, encoded "
        "image bytes or image file paths); pass the column that holds the images."
    )


def _source_row(example: dict) -> dict:
    row = {"image": example["image"], "key": "", UNREADABLE_SHARD: example.get(UNREADABLE_SHARD) or ""}
    return {**row, "label": example["label"]} if "label" in example else row


# The modules this one was split into (2026-12-05): a public name of theirs is still importable from here, with a
# DeprecationWarning naming its home (and always from `groupvq_hf.data`).
SPLIT_INTO = ("rows", "demo", "decoding", "stream")


def __getattr__(name: str):
    """``groupvq_hf.data.sources.<moved name>``: the name from its new module, with a DeprecationWarning."""
    import importlib
    import warnings

    if name == "IMAGE_EXTENSIONS":  # a constant until 2026-12-05, now datasets' own list (read lazily)
        return image_extensions()
    for module in SPLIT_INTO:
        home = importlib.import_module(f"{__package__}.{module}")
        if name in home.__all__:
            warnings.warn(
                f"`groupvq_hf.data.sources.{name}` moved to `groupvq_hf.data.{module}`; import it from there or from "
                "`groupvq_hf.data`.",
                DeprecationWarning,
                stacklevel=2,
            )
            return getattr(home, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DataSource",
    "SOURCES",
    "SPLIT_ALIASES",
    "image_extensions",
    "image_files",
    "load_image_source",
    "local_builder",
    "local_loader",
    "local_source_path",
    "parse_dataset_spec",
    "shard_errors",
]
