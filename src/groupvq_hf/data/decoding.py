"""Decoding a stored image: open it, convert any mode to RGB, and resample it to the model's input.

Images that cannot be decoded or are smaller than ``min_image_size`` raise `SkippedImage` (the streams count them);
grayscale, palette, CMYK, 16-bit and alpha images are converted to RGB (alpha composited on white).

Decode at the size you need: a JPEG's crop and flip are drawn from its header's size first (`plan_crop`, the
transform's own random draws), then it is decoded at the largest DCT scale (1/2, 1/4, 1/8: PIL's ``Image.draft``)
that still holds every pixel of the crop, and only the crop is resampled (`decode_image`, `render_crop`). Other
formats decode in full as before; ``full_decode=True`` restores the full decode and today's output exactly.
"""

from __future__ import annotations

import functools
import io
import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import ExifTags, Image

from ..image_processing_groupvq import to_rgb  # the one RGB rule, shared with the model's processor
from .demo import DEMO_URL, open_demo

# Shorter side, in pixels, below which an image is skipped (training, evaluation) or refused (the demo page).
MIN_IMAGE_SIZE = 8


@functools.cache
def read_formats() -> tuple[str, ...]:
    """The image formats a stored or uploaded image is opened as: every format PIL reads except EPS, which PIL decodes
    by running Ghostscript on the file (a crafted PostScript file, named ``.jpg`` in a dataset or an upload, would be
    executed by another program). Passed as ``Image.open(..., formats=read_formats())``."""
    Image.init()
    return tuple(sorted(set(Image.OPEN) - {"EPS"}))


def open_pil(source, formats: tuple[str, ...] | None = None) -> Image.Image:
    """``Image.open(source)`` (a path or a binary file) restricted to ``formats`` (default `read_formats`): the one
    way the package opens an image file it did not write."""
    return Image.open(source, formats=list(formats or read_formats()))


def open_image(image: dict) -> Image.Image:
    """A stored image (``{"bytes", "path"}`` of ``datasets.Image(decode=False)``, or a demo crop) as PIL, decoded as
    ``datasets.Image().decode_example`` decodes it (bytes, a local path, or a remote path read through ``datasets``'
    ``xopen``; loaded; EXIF orientation applied) but opened only as one of `read_formats`."""
    from datasets import DownloadConfig
    from datasets.utils.file_utils import is_local_path, xopen
    from PIL import ImageOps

    blob, path = image.get("bytes"), image.get("path")
    if blob is None and isinstance(path, str) and path.startswith(DEMO_URL):
        return open_demo(path)
    if blob is None and path is None:
        raise ValueError(f"An image should have one of 'path' or 'bytes' but both are None in {image}.")
    if blob is None and not is_local_path(path):
        with xopen(path, "rb", download_config=DownloadConfig()) as f:
            blob = f.read()
    decoded = open_pil(path if blob is None else io.BytesIO(blob))
    decoded.load()
    if decoded.getexif().get(ExifTags.Base.Orientation) is not None:
        decoded = ImageOps.exif_transpose(decoded)
    return decoded


def open_as_reference(image: dict) -> tuple[Image.Image, str | None]:
    """A stored image as reference evaluation loaders read their files: PIL's ``Image.open`` and, for any other
    mode, ``convert("RGB")`` (SimVQ's taming ``ImagePaths``, ADM's ``image_datasets.py``): no EXIF rotation (which
    ``datasets.Image`` applies), alpha dropped rather than composited on white. Returns the image and its original
    mode when converted. A remote path without bytes is opened by ``datasets`` (rotated, as `open_image` does)."""
    blob, path = (image or {}).get("bytes"), (image or {}).get("path")
    if blob is not None:
        source = open_pil(io.BytesIO(blob))
    elif isinstance(path, str) and not path.startswith(DEMO_URL) and os.path.isfile(path):
        source = open_pil(path)
    else:
        source = open_image(image or {})
    source.load()
    return (source, None) if source.mode == "RGB" else (source.convert("RGB"), source.mode)


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
    """An image the stream leaves out; ``reason`` is ``"too_small"``, ``"missing_image"`` (a null image, or neither
    bytes nor path) or ``"undecodable:<error type>"``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class DecodedImage(NamedTuple):
    """`decode_image`'s result: ``pixels`` (3, R, R) in [-1, 1] (with a caller's transform: what it returns, clamped to
    [-1, 1] when float), the original ``mode`` of a converted image (else None), and the DCT ``scale`` a JPEG was
    decoded at (1: full size), None when decoded the standard way."""

    pixels: torch.Tensor
    mode: str | None
    scale: int | None


def _open_jpeg(image: dict) -> Image.Image | None:
    """``image`` opened but not decoded when it is a JPEG held as bytes or as a local file that needs no EXIF
    rotation; None otherwise (and on any error: the standard path then raises its own)."""
    try:
        blob, path = image.get("bytes"), image.get("path")
        if blob is not None:
            source = open_pil(io.BytesIO(blob), formats=("JPEG",))
        elif isinstance(path, str) and not path.startswith(DEMO_URL) and os.path.isfile(path):
            source = open_pil(path, formats=("JPEG",))
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
    exactly (evaluation protocols that must match a reference preprocessing pass ``full_decode=True``, and a
    transform with ``decode_as_reference = True`` gets the image as their loaders open it: `open_as_reference`).
    Raises `SkippedImage` for a missing image (None, or neither bytes nor path), an undecodable one and one whose
    shorter side is below ``min_image_size``.
    """
    if not image or (image.get("bytes") is None and not image.get("path")):
        raise SkippedImage("missing_image")
    source = None if full_decode else _open_jpeg(image)
    if source is not None:  # the geometry first, from the header's size (outside the try: a bad transform raises)
        full_size, plan = source.size, plan_crop(transform, source.size)
        scale = plan.dct_scale()
    try:
        if source is None and getattr(transform, "decode_as_reference", False):  # an evaluation protocol's loader
            decoded, mode = open_as_reference(image)
        elif source is None:
            decoded, mode = to_rgb(open_image(image))
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


__all__ = [
    "CropPlan",
    "DCT_SCALES",
    "DecodedImage",
    "MIN_IMAGE_SIZE",
    "SkippedImage",
    "decode_image",
    "image_transform",
    "open_as_reference",
    "open_image",
    "open_pil",
    "plan_crop",
    "read_formats",
    "render_crop",
    "to_rgb",
]
