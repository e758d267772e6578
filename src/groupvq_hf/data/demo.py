"""The built-in demo dataset: real photographs bundled with scikit-image (no network).

Its ``train`` split is ``DEMO_TRAIN_CROPS`` random-resized crops per epoch (scale ``DEMO_CROP_SCALE``) of the photos'
training regions; ``validation`` and ``test`` are ``DEMO_EVAL_CROPS`` fixed square crops of a band of every photo
(``DEMO_HOLDOUT`` of its longer side) that training never reads. A demo row stores no bytes, only a `DEMO_URL` path
naming the photo and the box; `open_demo` cuts the pixels from the cached photos.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from .rows import UNREADABLE_SHARD, hash_seed, row_features

DEMO_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry",
    "stereo_motorcycle", "camera", "coins",
)  # fmt: skip
DEMO_MAX_SIDE = 512
DEMO_URL = "groupvq-demo://"  # image path of a demo row: groupvq-demo://<photo>/<left>,<upper>,<right>,<lower>
DEMO_TRAIN_CROPS = 4096  # examples per demo training epoch, whatever the number of photos
DEMO_SHARDS = 64  # enough for 8 processes x 8 loader workers
DEMO_CROP_SCALE = (0.01, 1.0)  # area fraction of the training region kept by a random-resized crop
DEMO_HOLDOUT = 0.25  # share of each photo's longer side held out for the validation / test crops
DEMO_EVAL_CROPS = 512  # fixed held-out crops in each of the validation and test splits
DEMO_MIN_EVAL_SIDE = 16


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
def demo_photos() -> tuple[Image.Image, ...]:
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
    sizes = [photo.size for photo in demo_photos()]
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


def demo_url(index: int, box: Box) -> str:
    return f"{DEMO_URL}{DEMO_PHOTOS[index]}/{','.join(map(str, box))}"


def open_demo(url: str) -> Image.Image:
    name, _, box = url[len(DEMO_URL) :].partition("/")
    return demo_photos()[DEMO_PHOTOS.index(name)].crop(tuple(int(v) for v in box.split(",")))


def demo_dataset(split: str):
    """The demo split as rows ``{"image": {"bytes": None, "path": DEMO_URL...}, "key"}`` (pixels are cut from the
    cached photos when a row is opened). ``train``: every photo's training region, ``DEMO_TRAIN_CROPS`` rows in
    ``DEMO_SHARDS`` shards (the random-resized crop is the train transform); else `demo_eval_boxes`."""
    import datasets

    if split == "train":
        regions = [demo_url(i, demo_regions(p.size)[0]) for i, p in enumerate(demo_photos())]
        photos = [i % len(regions) for i in range(DEMO_TRAIN_CROPS)]
        rows = [(regions[p], f"demo/{DEMO_PHOTOS[p]}/train/{i:05d}") for i, p in enumerate(photos)]
        shards = DEMO_SHARDS
    else:
        boxes = demo_eval_boxes(split)
        rows = [(demo_url(i, box), f"demo/{DEMO_PHOTOS[i]}/{split}/{n:04d}") for n, (i, box) in enumerate(boxes)]
        shards = DEMO_SHARDS // 4
    images = [{"bytes": None, "path": url} for url, _ in rows]
    columns = {"image": images, "key": [key for _, key in rows], UNREADABLE_SHARD: [""] * len(rows)}
    table = datasets.Dataset.from_dict(columns, features=row_features())
    return table.to_iterable_dataset(num_shards=shards)


__all__ = [
    "DEMO_CROP_SCALE",
    "DEMO_EVAL_CROPS",
    "DEMO_HOLDOUT",
    "DEMO_MAX_SIDE",
    "DEMO_MIN_EVAL_SIDE",
    "DEMO_PHOTOS",
    "DEMO_SHARDS",
    "DEMO_TRAIN_CROPS",
    "DEMO_URL",
    "demo_dataset",
    "demo_eval_boxes",
    "demo_images",
    "demo_photos",
    "demo_regions",
    "open_demo",
]
