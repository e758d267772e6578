"""Image data for training and evaluation: streaming Hub datasets, local files and built-in demo photos.

``build_image_dataset(dataset, ...)`` turns a dataset spec into a stream of ``{"pixel_values", "key",
"num_skipped"}`` examples (pixels (3, R, R) in [-1, 1]) that is shuffled with one seed on every rank, split across
ranks with ``datasets.distributed.split_dataset_by_node`` and re-shuffled per epoch with ``set_epoch``.

Dataset specs:

- ``"demo"``: real photographs bundled with scikit-image (no network).
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
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

DEMO_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry",
    "stereo_motorcycle", "camera", "coins",
)  # fmt: skip
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SHUFFLE_BUFFER_SIZE = 1000
DEMO_MAX_SIDE = 512


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
def _demo_blobs() -> tuple[bytes, ...]:
    """The demo photos as JPEG (quality 95), longer side capped at ``DEMO_MAX_SIDE`` so decoding stays cheap."""
    blobs = []
    for image in demo_images():
        image = image.copy()
        image.thumbnail((DEMO_MAX_SIDE, DEMO_MAX_SIDE), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        blobs.append(buffer.getvalue())
    return tuple(blobs)


def _demo_dataset():
    import datasets

    blobs = [{"bytes": blob, "path": None} for blob in _demo_blobs()]
    features = datasets.Features({"image": datasets.Image(decode=False), "key": datasets.Value("string")})
    table = datasets.Dataset.from_dict({"image": blobs, "key": [f"demo/{n}" for n in DEMO_PHOTOS]}, features=features)
    return table.to_iterable_dataset(num_shards=len(blobs))


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


def _local_loader(path: Path) -> tuple[str, dict]:
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


def _load_split(path: str, split: str, streaming: bool, config: str | None = None, **kwargs):
    import datasets

    try:
        ds = datasets.load_dataset(path, config, split=split, streaming=streaming, **kwargs)
    except ValueError as err:  # e.g. a repo that names its validation split "val" (or the other way round)
        alias = {"validation": "val", "val": "validation", "valid": "validation"}.get(split)
        if alias is None or "split" not in str(err).lower():
            raise
        ds = datasets.load_dataset(path, config, split=alias, streaming=streaming, **kwargs)
    if not streaming:
        ds = ds.to_iterable_dataset(num_shards=max(1, min(64, len(ds))))
    return ds


def load_image_source(name: str, split: str = "train", image_column: str | None = None, streaming: bool = True):
    """One source as an ``IterableDataset`` with columns ``image`` (``Image(decode=False)``) and ``key``."""
    import datasets

    if name == "demo":
        if split not in ("train", "validation", "test"):
            raise ValueError(f"`split` of the demo photos must be 'train', 'validation' or 'test', got {split!r}.")
        return _demo_dataset()
    source = SOURCES.get(name)
    if source is not None:
        column = image_column or source.image_column
        ds = _load_split(source.location(), source.split(split), streaming, source.config)
    elif Path(name).expanduser().exists():
        kind, kwargs = _local_loader(Path(name).expanduser())
        ds = _load_split(kind, "train" if Path(name).is_file() else split, streaming, **kwargs)
        column = image_column or _guess_image_column(ds.features, name)
    elif name.count("/") == 1 and not name.startswith((".", "/")):
        ds = _load_split(name, split, streaming)
        column = image_column or _guess_image_column(ds.features, name)
    else:
        raise ValueError(
            f"`dataset` source {name!r} is not 'demo', a named source ({', '.join(SOURCES)}), an existing local path "
            "or a Hub repo id 'owner/name'."
        )
    if ds.features is not None and column not in ds.features:
        raise ValueError(f"`image_column` {column!r} is not a column of {name!r} (columns: {list(ds.features)}).")
    ds = ds.select_columns([column])
    if column != "image":
        ds = ds.rename_column(column, "image")
    ds = ds.cast_column("image", datasets.Image(decode=False))
    # A stable identifier per example: the file path when the source has one, else a hash of the bytes.
    return ds.map(
        _add_key, features=datasets.Features({"image": datasets.Image(decode=False), "key": datasets.Value("string")})
    )


def _add_key(example: dict) -> dict:
    image = example["image"] or {}
    blob = image.get("bytes")
    key = hashlib.sha1(blob).hexdigest()[:16] if blob else (image.get("path") or "")
    return {"image": image, "key": key}


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


def image_transform(resolution: int, train: bool):
    """Shorter side resized to ``resolution`` (bicubic), random (train) or center (eval) crop, random flip (train),
    pixels mapped to [-1, 1]. Random draws use torch's RNG (seeded per DataLoader worker)."""
    from torchvision.transforms import v2

    steps = [v2.Resize(resolution, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)]
    steps += [v2.RandomCrop(resolution), v2.RandomHorizontalFlip()] if train else [v2.CenterCrop(resolution)]
    steps += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)]
    return v2.Compose(steps)


class ImageStream(torch.utils.data.IterableDataset):
    """Decodes, converts and transforms the images of a (sharded, shuffled) ``datasets.IterableDataset``.

    Yields ``{"pixel_values": (3, R, R) in [-1, 1], "key": str, "num_skipped": int}``, where ``num_skipped`` counts
    the bad images dropped just before this one (so a consumer can total them across DataLoader workers).
    ``skipped`` / ``converted`` count reasons and original modes in the iterating process.
    """

    def __init__(self, examples, resolution: int, train: bool, min_image_size: int = 8, max_samples: int | None = None):
        super().__init__()
        self.examples = examples
        self.resolution = resolution
        self.train = train
        self.min_image_size = min_image_size
        self.max_samples = max_samples
        self.transform = image_transform(resolution, train)
        self.skipped: Counter = Counter()
        self.converted: Counter = Counter()

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (shards and buffer, same seed on every rank)."""
        self.examples.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return self.examples.epoch

    @property
    def num_shards(self) -> int:
        return self.examples.num_shards

    def decode(self, example: dict) -> torch.Tensor | None:
        """Pixels of one raw example, or None (counted in ``skipped``) when it cannot be used."""
        import datasets

        try:
            image = datasets.Image().decode_example(example["image"])
            image, mode = to_rgb(image)
        except Exception as err:  # truncated, corrupt, not an image, decompression bomb, missing file ...
            self.skipped[f"undecodable:{type(err).__name__}"] += 1
            return None
        if min(image.size) < self.min_image_size:
            self.skipped["too_small"] += 1
            return None
        if mode is not None:
            self.converted[mode] += 1
        return self.transform(image).clamp_(-1.0, 1.0)

    def __iter__(self):
        pending, yielded = 0, 0
        for example in self.examples:
            pixels = self.decode(example)
            if pixels is None:
                pending += 1
                continue
            yield {"pixel_values": pixels, "key": example.get("key") or "", "num_skipped": pending}
            pending, yielded = 0, yielded + 1
            if self.max_samples is not None and yielded >= self.max_samples:
                return


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
    min_image_size: int = 8,
    shuffle_buffer_size: int = SHUFFLE_BUFFER_SIZE,
) -> ImageStream:
    """A stream of ``{"pixel_values": (3, resolution, resolution) in [-1, 1], "key", "num_skipped"}`` for one rank.

    Every rank shuffles with the same ``seed`` (shards, then a buffer of ``shuffle_buffer_size``; ``set_epoch``
    reshuffles) and keeps a disjoint part with ``split_dataset_by_node(rank, world_size)``. ``max_samples`` caps
    the examples this rank yields per epoch (per DataLoader worker when read through workers). Evaluation streams
    (``train=False``) are not shuffled. Images whose shorter side is below ``min_image_size`` are skipped.
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
    parts = parse_dataset_spec(dataset)
    sources = [load_image_source(name, split, image_column, streaming) for name, _ in parts]
    if len(sources) == 1:
        ds = sources[0]
    else:
        ds = interleave_datasets(
            sources, probabilities=[w for _, w in parts], seed=seed, stopping_strategy="all_exhausted"
        )
    if train:
        ds = ds.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
    if world_size > 1:
        ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    return ImageStream(ds, resolution, train, min_image_size=min_image_size, max_samples=max_samples)


def collate_pixels(batch: list[dict]) -> torch.Tensor:
    """Stack the ``pixel_values`` of a list of examples into a (B, 3, R, R) tensor."""
    if not batch:
        raise ValueError("`batch` must hold at least one example.")
    return torch.stack([example["pixel_values"] for example in batch])


def collate_examples(batch: list[dict]) -> dict:
    """``collate_pixels`` plus the example keys and the number of bad images skipped while reading the batch."""
    return {
        "pixel_values": collate_pixels(batch),
        "keys": [example.get("key", "") for example in batch],
        "num_skipped": sum(int(example.get("num_skipped", 0)) for example in batch),
    }


__all__ = [
    "DataSource",
    "ImageStream",
    "SOURCES",
    "build_image_dataset",
    "collate_examples",
    "collate_pixels",
    "demo_images",
    "image_transform",
    "load_image_source",
    "parse_dataset_spec",
    "to_rgb",
]
