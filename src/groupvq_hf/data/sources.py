"""Image data for training and evaluation: streaming Hub datasets, local files and built-in demo photos.

``build_image_dataset(dataset, ...)`` turns a dataset spec into a stream of ``{"pixel_values", "key",
"num_skipped"}`` examples (pixels (3, R, R) in [-1, 1]) that is shuffled with one seed on every rank, split across
ranks with ``datasets.distributed.split_dataset_by_node`` and re-shuffled per epoch with ``set_epoch``.

Dataset specs:

- ``"demo"``: real photographs bundled with scikit-image (no network). Its ``train`` split is
  ``DEMO_TRAIN_CROPS`` random-resized crops per epoch (scale ``DEMO_CROP_SCALE``) of the photos' training regions;
  ``validation`` and ``test`` are ``DEMO_EVAL_CROPS`` fixed square crops of a band of every photo
  (``DEMO_HOLDOUT`` of its longer side) that training never reads.
- a named source from [`SOURCES`]: ``"imagenet"`` (``ILSVRC/imagenet-1k``, parquet, gated: log in or set
  ``HF_TOKEN``), ``"imagenet-wds"`` (``timm/imagenet-1k-wds`` webdataset shards), ``"coco"``
  (``detection-datasets/coco``, MS-COCO 2017 images in parquet). ``GROUPVQ_<NAME>_PATH`` (e.g.
  ``GROUPVQ_IMAGENET_PATH=/data/imagenet-1k``) points a named source at a local mirror with the Hub layout.
- ``"a+b"`` or weighted ``"imagenet:0.7+coco:0.3"``: sources mixed with ``interleave_datasets``.
- any Hub dataset repo id (``"owner/name"``) backed by parquet or webdataset files (datasets 5 runs no loading
  scripts), with an image column (``image_column``, guessed from the features when not given).
- a local folder of images, of parquet files or of webdataset ``.tar`` shards, or a single ``.parquet``/``.tar``.

Images that cannot be decoded or are smaller than ``min_image_size`` are skipped (counted in ``skipped`` and, per
yielded example, in ``num_skipped``); grayscale, palette, CMYK, 16-bit and alpha images are converted to RGB
(alpha composited on white, counted in ``converted``).

Decode at the size you need: a JPEG's crop and flip are drawn from its header's size first (`plan_crop`, the
transform's own random draws), then it is decoded at the largest DCT scale (1/2, 1/4, 1/8: PIL's ``Image.draft``)
that still holds every pixel of the crop, and only the crop is resampled (`decode_image`, `render_crop`). Other
formats decode in full as before; ``full_decode=True`` restores the full decode and today's output exactly.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import math
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import ExifTags, Image

DEMO_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry",
    "stereo_motorcycle", "camera", "coins",
)  # fmt: skip
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SHUFFLE_BUFFER_SIZE = 1000
DEMO_MAX_SIDE = 512
DEMO_URL = "groupvq-demo://"  # image path of a demo row: groupvq-demo://<photo>/<left>,<upper>,<right>,<lower>
DEMO_TRAIN_CROPS = 4096  # examples per demo training epoch, whatever the number of photos
DEMO_SHARDS = 64  # enough for 8 processes x 8 loader workers
DEMO_CROP_SCALE = (0.01, 1.0)  # area fraction of the training region kept by a random-resized crop
DEMO_HOLDOUT = 0.25  # share of each photo's longer side held out for the validation / test crops
DEMO_EVAL_CROPS = 512  # fixed held-out crops in each of the validation and test splits
DEMO_MIN_EVAL_SIDE = 16
# Shorter side, in pixels, below which an image is skipped (training, evaluation) or refused (the demo page).
MIN_IMAGE_SIZE = 8
SHARDED_FORMATS = ("parquet", "webdataset")  # datasets builders whose data files are read shard by shard
SHARD_READ_ROWS = 64  # rows read from a shard at a time (a damaged shard loses at most these before its marker)
UNREADABLE_SHARD = "unreadable_shard"  # row column: the shard a marker row stands for ("" in the image rows)

logger = logging.getLogger(__name__)


def row_features():
    """The columns of every source's rows: the stored ``image``, its ``key`` and `UNREADABLE_SHARD`."""
    import datasets

    text = datasets.Value("string")
    return datasets.Features({"image": datasets.Image(decode=False), "key": text, UNREADABLE_SHARD: text})


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


# ---------------------------------------------------------------------------------------------------- demo
def demo_images() -> list[Image.Image]:
    """The built-in real photographs (scikit-image's bundled colour and grayscale photos), as RGB PIL images."""
    import skimage.data

    images = []
    for name in DEMO_PHOTOS:
        array = getattr(skimage.data, name)()
        if isinstance(array, tuple):  # stereo_motorcycle: (left, right, disparity)
            array = array[0]
        images.append(Image.fromarray(np.asarray(array)).convert("RGB"))
    return images


@functools.lru_cache(maxsize=1)
def _demo_photos() -> tuple[Image.Image, ...]:
    """The demo photos with the longer side capped at ``DEMO_MAX_SIDE`` (cached per process)."""
    photos = []
    for image in demo_images():
        image.thumbnail((DEMO_MAX_SIDE, DEMO_MAX_SIDE), Image.Resampling.LANCZOS)
        photos.append(image)
    return tuple(photos)


Box = tuple[int, int, int, int]  # (left, upper, right, lower), PIL's crop box


def demo_regions(size: tuple[int, int]) -> tuple[Box, Box]:
    """``(train_box, holdout_box)`` of a photo of ``size`` (width, height): the last ``DEMO_HOLDOUT`` of the longer
    side is held out for the ``validation`` / ``test`` crops, training crops come from the rest."""
    width, height = size
    if width >= height:
        cut = round(width * (1 - DEMO_HOLDOUT))
        return (0, 0, cut, height), (cut, 0, width, height)
    cut = round(height * (1 - DEMO_HOLDOUT))
    return (0, 0, width, cut), (0, cut, width, height)


def demo_eval_boxes(split: str) -> list[tuple[int, Box]]:
    """``DEMO_EVAL_CROPS`` fixed ``(photo index, square box)`` inside the held-out bands, photo after photo.

    Sides follow the training crops' scale law (area fraction ``DEMO_CROP_SCALE`` of the training region), capped
    by the band's width; positions are uniform in the band. Each split has its own fixed draw.
    """
    rng = np.random.default_rng(hash_seed("demo", split, bits=64))
    sizes = [photo.size for photo in _demo_photos()]
    boxes = []
    for i in range(DEMO_EVAL_CROPS):
        index = i % len(sizes)
        (tx0, ty0, tx1, ty1), (x0, y0, x1, y1) = demo_regions(sizes[index])
        band = min(x1 - x0, y1 - y0)
        side = round(np.sqrt(rng.uniform(*DEMO_CROP_SCALE) * (tx1 - tx0) * (ty1 - ty0)))
        side = int(np.clip(side, min(DEMO_MIN_EVAL_SIDE, band), band))
        left = x0 + int(rng.integers(0, x1 - x0 - side + 1))
        upper = y0 + int(rng.integers(0, y1 - y0 - side + 1))
        boxes.append((index, (left, upper, left + side, upper + side)))
    return boxes


def _demo_url(index: int, box: Box) -> str:
    return f"{DEMO_URL}{DEMO_PHOTOS[index]}/{','.join(map(str, box))}"


def _open_demo(url: str) -> Image.Image:
    name, _, box = url[len(DEMO_URL) :].partition("/")
    return _demo_photos()[DEMO_PHOTOS.index(name)].crop(tuple(int(v) for v in box.split(",")))


def _demo_dataset(split: str):
    """The demo split as rows ``{"image": {"bytes": None, "path": DEMO_URL...}, "key"}`` (pixels are cut from the
    cached photos when a row is opened). ``train``: every photo's training region, ``DEMO_TRAIN_CROPS`` rows in
    ``DEMO_SHARDS`` shards (the random-resized crop is the train transform); else `demo_eval_boxes`."""
    import datasets

    if split == "train":
        regions = [_demo_url(i, demo_regions(p.size)[0]) for i, p in enumerate(_demo_photos())]
        photos = [i % len(regions) for i in range(DEMO_TRAIN_CROPS)]
        rows = [(regions[p], f"demo/{DEMO_PHOTOS[p]}/train/{i:05d}") for i, p in enumerate(photos)]
        shards = DEMO_SHARDS
    else:
        boxes = demo_eval_boxes(split)
        rows = [(_demo_url(i, box), f"demo/{DEMO_PHOTOS[i]}/{split}/{n:04d}") for n, (i, box) in enumerate(boxes)]
        shards = DEMO_SHARDS // 4
    images = [{"bytes": None, "path": url} for url, _ in rows]
    columns = {"image": images, "key": [key for _, key in rows], UNREADABLE_SHARD: [""] * len(rows)}
    table = datasets.Dataset.from_dict(columns, features=row_features())
    return table.to_iterable_dataset(num_shards=shards)


def open_image(image: dict) -> Image.Image:
    """A stored image (``{"bytes", "path"}`` of ``datasets.Image(decode=False)``, or a demo crop) as PIL."""
    import datasets

    path = image.get("path") if isinstance(image, dict) else None
    if image.get("bytes") is None and isinstance(path, str) and path.startswith(DEMO_URL):
        return _open_demo(path)
    return datasets.Image().decode_example(image)


# ---------------------------------------------------------------------------------------------------- loading
def parse_dataset_spec(dataset: str) -> list[tuple[str, float]]:
    """``"imagenet:0.7+coco:0.3"`` -> ``[("imagenet", 0.7), ("coco", 0.3)]``; weights default to equal shares."""
    if not isinstance(dataset, str) or not dataset.strip():
        raise ValueError(
            f"`dataset` must be a non-empty string (demo, imagenet, coco, a+b, a repo id or a path), got {dataset!r}."
        )
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


def local_loader(path: Path) -> tuple[str, dict]:
    """``load_dataset`` arguments for a local file or folder (parquet, webdataset tar shards or image files)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    suffixes = Counter(p.suffix.lower() for p in files)
    if suffixes[".parquet"]:
        kind = "parquet"
    elif suffixes[".tar"]:
        kind = "webdataset"
    elif any(suffixes[e] for e in IMAGE_EXTENSIONS):
        kind = "imagefolder"
    else:
        raise ValueError(
            f"`dataset` path {str(path)!r} holds no parquet files, webdataset .tar shards or images "
            f"({', '.join(IMAGE_EXTENSIONS)})."
        )
    if path.is_file():
        return kind, {"data_files": {"train": str(path)}}
    return kind, {"data_dir": str(path)}


SPLIT_ALIASES = {"validation": ("val", "valid"), "val": ("validation",), "valid": ("validation", "val")}


def _local_split(kind: str, kwargs: dict, split: str, where: str, notes: list[str]) -> str:
    """The split of a local dataset to read for ``split``: itself, an alias (val / validation), or the only split
    there is (with a note in ``notes``); a ValueError listing the splits otherwise."""
    import datasets

    # the resolved data files name the splits without reading any of them (a damaged first shard stays readable)
    splits = [str(name) for name in datasets.load_dataset_builder(kind, **kwargs).config.data_files]
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
    """One data file read by datasets' own ``kind`` builder, as a streaming dataset (nothing decoded)."""
    import datasets

    ds = datasets.load_dataset(kind, data_files=[shard], split="train", streaming=True, features=features)
    return ds.decode(False)


def _read_shards(shards: list[str], kind: str, features):
    """The rows of ``shards`` one shard after the other. A shard that cannot be read (up front or partway) is
    logged and ends in one marker row whose `UNREADABLE_SHARD` names it; the next shard follows."""
    for shard in shards:
        try:
            # .iter(): every row of the shard, also inside a DataLoader worker (iterating the dataset would split the
            # shard's rows across workers again; the outer stream already gave this worker its shards)
            for rows in _open_shard(kind, shard, features).iter(batch_size=SHARD_READ_ROWS):
                for values in zip(*rows.values()):
                    yield {**dict(zip(rows, values)), UNREADABLE_SHARD: ""}
        except shard_errors() as err:
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


def _load_split(path: str, split: str, streaming: bool, config: str | None = None, **kwargs):
    import datasets

    if streaming:  # parquet and webdataset files are read shard by shard, so that a damaged one is skipped
        builder = datasets.load_dataset_builder(path, config, **kwargs)
        files = {str(name): list(shards) for name, shards in (builder.config.data_files or {}).items()}
        if builder.name in SHARDED_FORMATS and files:
            for name in (split, *SPLIT_ALIASES.get(split, ())):
                if name in files:
                    return _shard_stream(builder.name, files[name], f"{path!r} (split {name!r})")
            raise ValueError(f"`split` {split!r} is not a split of {path!r} (splits: {list(files)}).")
    try:
        ds = datasets.load_dataset(path, config, split=split, streaming=streaming, **kwargs)
    except ValueError as err:  # e.g. a repo that names its validation split "val" (or the other way round)
        if "split" not in str(err).lower():
            raise
        for alias in SPLIT_ALIASES.get(split, ()):
            try:
                ds = datasets.load_dataset(path, config, split=alias, streaming=streaming, **kwargs)
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
):
    """One source as an ``IterableDataset`` with columns ``image`` (``Image(decode=False)``) and ``key`` (and
    ``label`` with ``label_column``).

    ``key`` is the demo row's name, else empty (`ImageStream` names decoded examples by path or bytes hash). A local
    file or folder with a single split is read for any ``split``, with a line appended to ``notes``.
    ``label_column``: a column to keep as ``label`` (its feature, a ``ClassLabel`` with its names, kept), ``"auto"``
    (the named source's label column, else the first ``ClassLabel`` column, else none) or None (no label).
    """
    import datasets

    notes = [] if notes is None else notes
    if name == "demo":
        if split not in ("train", "validation", "test"):
            raise ValueError(f"`split` of the demo photos must be 'train', 'validation' or 'test', got {split!r}.")
        ds = _demo_dataset(split)
        if label_column not in (None, "auto"):
            columns = list(ds.features)
            raise ValueError(f"`label_column` {label_column!r} is not a column of 'demo' (columns: {columns}).")
        return ds
    source = SOURCES.get(name)
    if source is not None:
        column = image_column or source.image_column
        ds = _load_split(source.location(), source.split(split), streaming, source.config)
    elif Path(name).expanduser().exists():
        path = Path(name).expanduser()
        kind, kwargs = local_loader(path)
        ds = _load_split(kind, _local_split(kind, kwargs, split, f"local dataset {name!r}", notes), streaming, **kwargs)
        column = image_column or _guess_image_column(ds.features, name)
    elif name.count("/") == 1 and not name.startswith((".", "/")):
        ds = _load_split(name, split, streaming)
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


# ---------------------------------------------------------------------------------------------------- decoding
def to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """Convert any PIL mode to RGB. Returns the image and the original mode when a conversion was needed.

    Alpha is composited on white; 16/32-bit and float images are rescaled to 8 bits by their maximum.
    """
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() if array.size and array.max() > 0 else 1.0
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB"), mode


def image_transform(resolution: int, train: bool, crop_scale: tuple[float, float] | None = None):
    """Shorter side resized to ``resolution`` (bicubic), random (train) or center (eval) crop, random flip (train),
    pixels mapped to [-1, 1]. With ``crop_scale`` training takes torchvision's random-resized crop of that area
    fraction instead. Random draws use torch's global RNG (`ImageStream` seeds it per example)."""
    from torchvision.transforms import v2

    bicubic = v2.InterpolationMode.BICUBIC
    if train and crop_scale is not None:
        steps = [v2.RandomResizedCrop(resolution, scale=crop_scale, interpolation=bicubic, antialias=True)]
    else:
        steps = [v2.Resize(resolution, interpolation=bicubic, antialias=True)]
        steps += [v2.RandomCrop(resolution)] if train else [v2.CenterCrop(resolution)]
    steps += [v2.RandomHorizontalFlip()] if train else []
    steps += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)]
    return v2.Compose(steps)


# ---------------------------------------------------------------------------------------------------- decode at size
DCT_SCALES = (8, 4, 2, 1)  # a JPEG decodes at 1/s of its size in the DCT domain (libjpeg, PIL's `Image.draft`)


@dataclass(frozen=True)
class CropPlan:
    """One example's geometry, drawn before its pixels are decoded (`plan_crop`).

    ``box`` (left, upper, right, lower) is the region of the source image, in source pixels (floats), that the
    transform resamples onto its ``size`` (width, height) output; ``flip`` mirrors the output left-right. ``clip``:
    the transform cuts the region out before resampling (``RandomResizedCrop``), so the filter reads no pixel outside
    it; a shorter-side resize followed by a crop resamples the whole image, so its filter does.
    """

    box: tuple[float, float, float, float]
    size: tuple[int, int]
    flip: bool = False
    clip: bool = False

    def dct_scale(self) -> int:
        """The largest DCT scale 1/s (s in ``DCT_SCALES``) whose decode still holds every pixel the crop needs: the
        box keeps at least one decoded pixel per output pixel on both axes, ``min(box w / out w, box h / out h) >= s``
        (a center crop: shorter side / s >= resolution; a random-resized crop: the crop's shorter side / s >=
        resolution). 1 when the crop is upsampled."""
        left, upper, right, lower = self.box
        density = min((right - left) / self.size[0], (lower - upper) / self.size[1])
        return next((s for s in DCT_SCALES if density >= s), 1)


def plan_crop(transform, size: tuple[int, int]) -> CropPlan:
    """The geometry ``transform`` (an `image_transform`) gives an image of ``size`` (width, height), drawn without
    its pixels: torchvision's own ``make_params`` and the flip's draw, from torch's global RNG in the order
    ``transform(image)`` makes them, so the crop and the flip are the ones the transform would take."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    (left, upper, right, lower), (width, height) = (0.0, 0.0, float(size[0]), float(size[1])), size
    flip = clip = False

    def crop(top: int, left_: int, h: int, w: int) -> None:  # a crop of the current (width, height) image
        nonlocal left, upper, right, lower, width, height
        sx, sy = (right - left) / width, (lower - upper) / height
        left, upper, right, lower = left + left_ * sx, upper + top * sy, left + (left_ + w) * sx, upper + (top + h) * sy
        width, height = w, h

    def canvas() -> list:  # what make_params reads the current size from, without pixels
        return [tv_tensors.BoundingBoxes(torch.empty(0, 4), format="XYXY", canvas_size=(height, width))]

    for step in transform.transforms:
        if getattr(step, "interpolation", v2.InterpolationMode.BICUBIC) != v2.InterpolationMode.BICUBIC:
            raise TypeError(f"`transform` step {step!r} is not bicubic: `render_crop` resamples bicubically.")
        if isinstance(step, v2.Resize) and len(step.size) == 1 and step.max_size is None:  # shorter side to size
            short, long = sorted((width, height))
            new_short, new_long = step.size[0], int(step.size[0] * long / short)
            width, height = (new_short, new_long) if width <= height else (new_long, new_short)
        elif isinstance(step, v2.RandomResizedCrop):
            params = step.make_params(canvas())
            crop(params["top"], params["left"], params["height"], params["width"])
            (height, width), clip = step.size, True
        elif isinstance(step, v2.RandomCrop) and step.padding is None and not step.pad_if_needed:
            params = step.make_params(canvas())
            crop(params["top"], params["left"], params["height"], params["width"])
        elif isinstance(step, v2.CenterCrop):
            h, w = step.size
            crop(round((height - h) / 2.0), round((width - w) / 2.0), h, w)  # v2.CenterCrop's anchor
        elif isinstance(step, v2.RandomHorizontalFlip):
            flip = bool(torch.rand(1) < step.p)  # RandomHorizontalFlip.forward's draw
        elif not isinstance(step, (v2.PILToTensor, v2.ToDtype, v2.Normalize)):
            raise TypeError(f"`transform` step {step!r} has no crop plan (see `image_transform` for the known steps).")
    return CropPlan((left, upper, right, lower), (width, height), flip, clip)


def render_crop(image: Image.Image, plan: CropPlan, scale: int = 1) -> torch.Tensor:
    """``plan`` applied to the RGB ``image`` decoded at 1/``scale`` of the source size: only the box is resampled
    (PIL bicubic, antialiased) to the output size, flipped, and converted to (3, H, W) float32 in [-1, 1] as
    ``x / 127.5 - 1`` in one copy from uint8 (no clamp needed)."""
    left, upper, right, lower = (v / scale for v in plan.box)
    if plan.clip:  # resample from the cut-out region only, as a crop-then-resize does
        cut = (math.floor(left), math.floor(upper), math.ceil(right), math.ceil(lower))
        image = image.crop(cut)
        left, upper, right, lower = left - cut[0], upper - cut[1], right - cut[0], lower - cut[1]
    image = image.resize(plan.size, Image.Resampling.BICUBIC, box=(left, upper, right, lower))
    if plan.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    return pixels.to(torch.float32, memory_format=torch.contiguous_format).div_(127.5).sub_(1.0)


class SkippedImage(ValueError):
    """An image the stream leaves out; ``reason`` is ``"too_small"`` or ``"undecodable:<error type>"``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class DecodedImage(NamedTuple):
    """`decode_image`'s result: ``pixels`` (3, R, R) in [-1, 1], the original ``mode`` of a converted image (else
    None), and the DCT ``scale`` a JPEG was decoded at (1: full size), None when decoded the standard way."""

    pixels: torch.Tensor
    mode: str | None
    scale: int | None


def _open_jpeg(image: dict) -> Image.Image | None:
    """``image`` opened but not decoded when it is a JPEG held as bytes or as a local file that needs no EXIF
    rotation; None otherwise (and on any error: the standard path then raises its own)."""
    try:
        blob, path = image.get("bytes"), image.get("path")
        if blob is not None:
            source = Image.open(io.BytesIO(blob))
        elif isinstance(path, str) and not path.startswith(DEMO_URL) and os.path.isfile(path):
            source = Image.open(path)
        else:
            return None
        if source.format == "JPEG" and source.getexif().get(ExifTags.Base.Orientation, 1) == 1:
            return source
        source.close()
    except Exception:  # noqa: BLE001, S110  (not opened here: the standard path reports the error)
        pass
    return None


def decode_image(image: dict, transform, full_decode: bool = False, min_image_size: int = 1) -> DecodedImage:
    """A stored image (``{"bytes", "path"}``) decoded, converted to RGB (`to_rgb`) and transformed by ``transform``
    (an `image_transform`).

    A JPEG is decoded at the largest DCT scale whose result still holds every pixel the transform needs: the crop
    and flip are drawn first on the header's size (`plan_crop`, the transform's own draws), the scale follows
    (`CropPlan.dct_scale`), and only the crop is resampled from the smaller decode (`render_crop`). Other formats,
    EXIF-rotated JPEGs and ``full_decode=True`` decode in full and apply ``transform`` itself: today's output
    exactly (evaluation protocols that must match a reference preprocessing pass ``full_decode=True``).
    Raises `SkippedImage` for an undecodable image and one whose shorter side is below ``min_image_size``.
    """
    source = None if full_decode else _open_jpeg(image or {})
    if source is not None:  # the geometry first, from the header's size (outside the try: a bad transform raises)
        full_size, plan = source.size, plan_crop(transform, source.size)
        scale = plan.dct_scale()
    try:
        if source is None:
            decoded, mode = to_rgb(open_image(image or {}))
        else:
            if scale > 1:
                _, box = source.draft(source.mode, (source.width // scale, source.height // scale)) or (None, None)
                scale = 1 if box is None else round(full_size[0] / box[2])
            source.load()
            decoded, mode = to_rgb(source)
    except Exception as err:  # truncated, corrupt, not an image, decompression bomb, missing file ...
        raise SkippedImage(f"undecodable:{type(err).__name__}") from err
    if min(decoded.size if source is None else full_size) < min_image_size:
        raise SkippedImage("too_small")
    if source is None:
        pixels = transform(decoded)
        if pixels.is_floating_point():  # resampling overshoot; a caller's integer pixels are left as they are
            pixels.clamp_(-1.0, 1.0)
        return DecodedImage(pixels, mode, None)
    return DecodedImage(render_crop(decoded, plan, scale), mode, scale)


@contextlib.contextmanager
def _seeded_cpu_rng(seed: int | None):
    """Run the block with torch's CPU RNG seeded to ``seed`` and restore the caller's state after it."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


class ImageStream(torch.utils.data.IterableDataset):
    """Decodes, converts and transforms the images of a (sharded, shuffled) ``datasets.IterableDataset``.

    Yields ``{"pixel_values": (3, R, R) in [-1, 1], "key", "num_skipped", "converted", "worker", "row"}`` (and
    ``label`` when the source rows have one; ``pixel_values`` is whatever ``transform`` returns when given): ``row``
    is the example's index in the raw stream this loader ``worker`` reads, ``num_skipped`` counts the bad images
    dropped just before it, ``converted`` is its original mode when it was converted to RGB (else ""). Training
    augmentations draw from a seed of ``(seed, rank, epoch, worker, row)`` (`example_seed`).

    Evaluation streams (``train=False``) yield bad images too, as ``{"pixel_values": None, "skipped": reason,
    "row"}``, so a consumer counts them all. With ``blocks=(rank, world_size, block_size)`` every process and
    loader worker reads the whole stream and keeps blocks of ``block_size`` rows in turn, ordered so that the k-th
    batches of all processes cover consecutive rows (see `groupvq_hf.evaluation.evaluate_model`).

    ``resume_at`` (set by `groupvq_hf.data.ResumableBatches`) maps a worker to ``(placeholders, rows)``: that
    worker first yields ``placeholders`` empty examples (``{"placeholder": True}``) standing for batches already
    consumed, then skips its first ``rows`` raw rows without decoding them.
    ``skipped`` / ``converted`` count reasons and original modes in the iterating process, ``decode_scales`` the
    DCT scale each JPEG was decoded at (`decode_image`; ``full_decode=True`` decodes every image in full).
    """

    def __init__(
        self,
        examples,
        resolution: int,
        train: bool,
        min_image_size: int = MIN_IMAGE_SIZE,
        max_samples: int | None = None,
        seed: int = 0,
        rank: int = 0,
        crop_scale: tuple[float, float] | None = None,
        blocks: tuple[int, int, int] | None = None,
        notes: list[str] | None = None,
        full_decode: bool = False,
        transform=None,
    ):
        super().__init__()
        self.examples = examples
        self.resolution = resolution
        self.train = train
        self.min_image_size = min_image_size
        self.max_samples = max_samples
        self.seed = seed
        self.rank = rank
        self.blocks = blocks
        self.notes = list(notes or [])
        # A caller's own transform (e.g. a model's image processor) gets the fully decoded image it expects.
        self.full_decode = full_decode or transform is not None
        self.transform = transform if transform is not None else image_transform(resolution, train, crop_scale)
        self.resume_at: dict[int, tuple[int, int]] | None = None
        self.skipped: Counter = Counter()
        self.converted: Counter = Counter()
        self.decode_scales: Counter = Counter()
        self.decoded = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (shards and buffer, same seed on every rank)."""
        self.examples.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return self.examples.epoch

    @property
    def num_shards(self) -> int:
        return self.examples.num_shards

    def decode(self, example: dict, seed: int | None = None) -> tuple[torch.Tensor | None, str | None, str]:
        """``(pixels, reason, mode)`` of one raw example: pixels, or None and why (counted in ``skipped``); ``mode``
        is the original mode of a converted image (else ""). ``seed`` seeds the random augmentations."""
        self.decoded += 1
        if example.get(UNREADABLE_SHARD):  # the marker of a damaged shard (logged where it was read)
            reason = f"{UNREADABLE_SHARD}:{example[UNREADABLE_SHARD]}"
            self.skipped[reason] += 1
            return None, reason, ""
        try:
            with _seeded_cpu_rng(seed):
                image = decode_image(example["image"], self.transform, self.full_decode, self.min_image_size)
        except SkippedImage as skipped:  # truncated, corrupt, not an image, decompression bomb, too small ...
            self.skipped[skipped.reason] += 1
            return None, skipped.reason, ""
        if image.mode is not None:
            self.converted[image.mode] += 1
        if image.scale is not None:
            self.decode_scales[image.scale] += 1
        return image.pixels, None, image.mode or ""

    def _rows(self, worker: int, num_workers: int):
        """``(row, example)`` pairs this worker reads."""
        if self.blocks is None:
            yield from enumerate(self.examples)  # datasets shards the stream across loader workers itself
            return
        rank, world_size, block = self.blocks
        slots, slot = world_size * num_workers, worker * world_size + rank
        # .iter() reads the whole stream in every worker (iterating the dataset would shard it by worker)
        row = 0
        for columns in self.examples.iter(batch_size=block):
            for values in zip(*columns.values()):
                if (row // block) % slots == slot:
                    yield row, dict(zip(columns, values))
                row += 1

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        placeholders, skip_rows = (self.resume_at or {}).get(worker, (0, 0))
        yielded = 0
        for _ in range(placeholders):
            if self.max_samples is not None and yielded >= self.max_samples:
                return
            yield {"placeholder": True, "worker": worker, "row": skip_rows - 1}
            yielded += 1
        epoch, pending, rows_read = (self.epoch if self.train else 0), 0, 0
        for row, example in self._rows(worker, num_workers):
            rows_read = row + 1
            if row < skip_rows:
                continue  # consumed before the resume: not decoded
            if self.max_samples is not None and yielded >= self.max_samples:
                return
            seed = example_seed(self.seed, self.rank, epoch, worker, row) if self.train else None
            pixels, reason, mode = self.decode(example, seed)
            if pixels is None:
                if self.train:
                    pending += 1
                else:
                    yield {"pixel_values": None, "skipped": reason, "worker": worker, "row": row}
                continue
            key = example.get("key") or example_key(example["image"])
            labelled = {"label": example["label"]} if "label" in example else {}
            yield {
                "pixel_values": pixels, "key": key, "num_skipped": pending, "converted": mode, "worker": worker,
                "row": row, **labelled,
            }  # fmt: skip
            pending, yielded = 0, yielded + 1
        if rows_read < skip_rows:  # the dataset lost rows (files deleted) between the checkpoint and this resume
            logger.warning(
                f"Process {self.rank}, loader worker {worker}: {skip_rows - rows_read} of the {skip_rows} rows read "
                f"before the resume are missing (the stream has {rows_read}): files were deleted or the dataset "
                "changed since the checkpoint; this epoch ends here."
            )


def build_image_dataset(
    dataset: str = "demo",
    split: str = "train",
    resolution: int = 128,
    train: bool = True,
    image_column: str | None = None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    streaming: bool = True,
    max_samples: int | None = None,
    min_image_size: int = MIN_IMAGE_SIZE,
    shuffle_buffer_size: int = SHUFFLE_BUFFER_SIZE,
    block_size: int | None = None,
    full_decode: bool = False,
    label_column: str | None = None,
    transform=None,
) -> ImageStream:
    """A stream of ``{"pixel_values": (3, resolution, resolution) in [-1, 1], "key", "num_skipped", ...}`` for one
    rank (see [`ImageStream`]).

    Every rank shuffles with the same ``seed`` (shards, then a buffer of ``shuffle_buffer_size``; ``set_epoch``
    reshuffles) and keeps a disjoint part with ``split_dataset_by_node(rank, world_size)``. ``max_samples`` caps
    the examples this rank yields per epoch (per DataLoader worker when read through workers). Evaluation streams
    (``train=False``) are not shuffled; with ``block_size`` they are split across ranks and loader workers by
    blocks of rows in stream order instead of by shards. Images whose shorter side is below ``min_image_size`` are
    skipped. The demo's training split uses random-resized crops (``DEMO_CROP_SCALE``). JPEGs are decoded at the
    largest DCT scale that still holds every pixel of their crop (`decode_image`); ``full_decode=True`` decodes every
    image in full, for protocols that must match a reference preprocessing. ``label_column`` adds each example's
    ``label`` (see `load_image_source`; ``"auto"`` reads none from a mix of sources); ``transform`` (a PIL RGB image
    -> tensor) replaces the resize and crop (`image_transform`), as ``groupvq_hf.tokens`` does with the model's own
    image processor, or an evaluation protocol's preprocessing (`groupvq_hf.evaluation.protocol_transform`), and
    then always sees the fully decoded image.
    """
    from datasets import interleave_datasets
    from datasets.distributed import split_dataset_by_node

    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 1:
        raise ValueError(f"`resolution` must be a positive int, got {resolution!r}.")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"`world_size` must be a positive int, got {world_size!r}.")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"`rank` must be an int in [0, {world_size - 1}] (world_size={world_size}), got {rank!r}.")
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise ValueError(f"`max_samples` must be a positive int or None, got {max_samples!r}.")
    if block_size is not None and (train or not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"`block_size` must be a positive int, for evaluation streams only, got {block_size!r}.")
    if not isinstance(full_decode, bool):
        raise ValueError(f"`full_decode` must be True or False, got {full_decode!r}.")
    parts = parse_dataset_spec(dataset)
    notes: list[str] = []
    if label_column == "auto" and len(parts) > 1:
        label_column = None  # a mix of sources has no one label set
    sources = [load_image_source(name, split, image_column, streaming, notes, label_column) for name, _ in parts]
    if len(sources) == 1:
        ds = sources[0]
    else:
        ds = interleave_datasets(
            sources, probabilities=[w for _, w in parts], seed=seed, stopping_strategy="all_exhausted"
        )
    if train:
        ds = ds.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
    if world_size > 1 and block_size is None:
        ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    crop_scale = DEMO_CROP_SCALE if train and dataset == "demo" and split == "train" else None
    return ImageStream(
        ds, resolution, train, min_image_size=min_image_size, max_samples=max_samples, seed=seed, rank=rank,
        crop_scale=crop_scale, blocks=None if block_size is None else (rank, world_size, block_size), notes=notes,
        full_decode=full_decode, transform=transform,
    )  # fmt: skip


def collate_pixels(batch: list[dict]) -> torch.Tensor:
    """Stack the ``pixel_values`` of a list of examples into a (B, 3, R, R) tensor (bad-image markers of evaluation
    streams, whose ``pixel_values`` is None, are left out)."""
    pixels = [example["pixel_values"] for example in batch if example.get("pixel_values") is not None]
    if not pixels:
        raise ValueError("`batch` must hold at least one decoded example.")
    return torch.stack(pixels)


def collate_examples(batch: list[dict]) -> dict:
    """A batch of [`ImageStream`] examples: ``pixel_values`` (B, 3, R, R) of the decoded ones (an empty tensor
    when there is none), their ``keys`` and stream ``rows``, the ``worker`` that read them and ``rows_read`` (rows
    it has read through this batch), ``num_skipped`` / ``skipped`` (bad images: count, ``(row, reason)`` pairs)
    and ``num_converted`` / ``modes`` (converted images: count, each image's original mode or ""), and ``labels``
    when the stream carries a ``label`` column (`build_image_dataset(label_column=...)`). A batch of
    resume placeholders is ``{"placeholder": True, "worker", "rows_read"}``."""
    if not batch:
        raise ValueError("`batch` must hold at least one example.")
    position = {"worker": batch[-1].get("worker", 0), "rows_read": batch[-1].get("row", -1) + 1}
    if all(example.get("placeholder") for example in batch):
        return {"placeholder": True, **position}
    good = [example for example in batch if example.get("pixel_values") is not None]
    bad = [(example["row"], example["skipped"]) for example in batch if example.get("pixel_values") is None]
    modes = [example.get("converted") or "" for example in good]
    return {
        "pixel_values": collate_pixels(good) if good else torch.empty(0, 3, 0, 0),
        "keys": [example.get("key", "") for example in good],
        "rows": [example.get("row", -1) for example in good],
        "num_skipped": sum(int(example.get("num_skipped", 0)) for example in good) + len(bad),
        "skipped": bad,
        "num_converted": sum(1 for mode in modes if mode),
        "modes": modes,
        **({"labels": [example["label"] for example in good]} if good and "label" in good[0] else {}),
        **position,
    }


__all__ = [
    "CropPlan",
    "DCT_SCALES",
    "MIN_IMAGE_SIZE",
    "hash_seed",
    "DataSource",
    "DecodedImage",
    "ImageStream",
    "SOURCES",
    "SkippedImage",
    "build_image_dataset",
    "collate_examples",
    "collate_pixels",
    "decode_image",
    "demo_eval_boxes",
    "demo_images",
    "demo_regions",
    "example_key",
    "example_seed",
    "image_transform",
    "load_image_source",
    "open_image",
    "parse_dataset_spec",
    "plan_crop",
    "render_crop",
    "shard_errors",
    "to_rgb",
]
