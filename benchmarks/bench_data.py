"""Data pipeline throughput: ``build_image_dataset`` (reduced and full JPEG decoding) vs a bare PIL loop.

The shards are written to a temporary folder in the layout and schema of ``ILSVRC/imagenet-1k``
(``data/train-0000N-of-0000M.parquet``, ``image`` {bytes, path} + ``label``), holding 500 x 375 (and 375 x 500)
JPEGs, quality 90, cut from the bundled demo photographs (real photos: synthetic noise decodes unrealistically).
Every candidate runs in this one process with one torch thread, so the ratios are per core:

  bare PIL       pyarrow reads the same shards; per row ``Image.open`` + ``convert("RGB")``, bicubic shorter-side
                 resize, random crop + flip in PIL, ``torch.from_numpy`` to [-1, 1]. Nothing else.
  full decode    ``build_image_dataset(folder, train=True, full_decode=True)``: today's pipeline (parquet
                 streaming, shuffle buffer, full decode, RGB conversion, torchvision's resize + random crop + flip,
                 [-1, 1] tensor).
  reduced decode ``build_image_dataset(folder, train=True)``: the same crops, from JPEGs decoded at the largest DCT
                 scale (1/2, 1/4, 1/8) that still holds every pixel the crop needs, resampling only the crop.

``--profile`` adds the per-image cost of each step between the stored bytes and the batch (median of interleaved
rounds); ``--psnr`` the PSNR between reduced- and full-decode crops (same crops) on these JPEGs and on the demo
photos saved as JPEGs.

    .venv/bin/python benchmarks/bench_data.py --threads 1 --clock cpu --profile --psnr
"""

from __future__ import annotations

import argparse
import io
import os
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (
    add_timing_arguments,
    apply_timing_arguments,
    interleaved_times,
    markdown_table,
    median,
    paired_ratio,
    print_header,
    spread,
)

SIZES = ((500, 375), (375, 500))  # ImageNet's typical photo, landscape and portrait


def imagenet_size_jpegs(images: int, seed: int = 0) -> list[bytes]:
    """``images`` JPEGs (quality 90) of ``SIZES``, cut from the demo photos (small photos upscaled first)."""
    from PIL import Image

    from groupvq_hf.data import demo_images

    rng = random.Random(seed)
    photos = demo_images()
    blobs = []
    for i in range(images):
        photo = photos[i % len(photos)]
        w, h = SIZES[i % len(SIZES)]
        scale = max(w / photo.width, h / photo.height)
        if scale > 1:  # small photos are upscaled so every crop has the target size
            photo = photo.resize((round(photo.width * scale) + 1, round(photo.height * scale) + 1), Image.BICUBIC)
        x, y = rng.randint(0, photo.width - w), rng.randint(0, photo.height - h)
        buffer = io.BytesIO()
        photo.crop((x, y, x + w, y + h)).save(buffer, format="JPEG", quality=90)
        blobs.append(buffer.getvalue())
    return blobs


def write_imagenet_shards(root: Path, blobs: list[bytes], shards: int = 2) -> list[Path]:
    """ImageNet-1k-style parquet shards holding ``blobs``; returns the shard paths."""
    import datasets

    rows = [
        {"image": {"bytes": b, "path": f"n{i % 1000:08d}_{i}.JPEG"}, "label": i % 1000} for i, b in enumerate(blobs)
    ]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=1000)})
    paths = []
    for s in range(shards):
        part = rows[s::shards]
        path = root / "data" / f"train-{s:05d}-of-{shards:05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict(
            {"image": [r["image"] for r in part], "label": [r["label"] for r in part]}, features=features
        ).to_parquet(str(path))
        paths.append(path)
    return paths


def bare_pil_pass(shards: list[Path], resolution: int, generator: random.Random) -> int:
    """The bare loop: read rows with pyarrow, decode, resize, random crop and flip with PIL, to a [-1, 1] tensor."""
    import pyarrow.parquet as pq
    from PIL import Image

    count = 0
    for shard in shards:
        for batch in pq.ParquetFile(shard).iter_batches(columns=["image"], batch_size=64):
            for row in batch.column("image").to_pylist():
                image = Image.open(io.BytesIO(row["bytes"])).convert("RGB")
                scale = resolution / min(image.size)
                size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
                image = image.resize(size, Image.BICUBIC)
                x = generator.randint(0, size[0] - resolution)
                y = generator.randint(0, size[1] - resolution)
                image = image.crop((x, y, x + resolution, y + resolution))
                if generator.random() < 0.5:
                    image = image.transpose(Image.FLIP_LEFT_RIGHT)
                pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
                assert pixels.shape == (3, resolution, resolution)
                count += 1
    return count


def pipeline_pass(folder: Path, resolution: int, seed: int, full_decode: bool, scales=None) -> int:
    from groupvq_hf.data import build_image_dataset

    stream = build_image_dataset(
        str(folder), split="train", resolution=resolution, train=True, seed=seed, full_decode=full_decode
    )
    count = 0
    for example in stream:
        if example.get("tail"):  # the count of bad images after the last good one (none in these folders)
            continue
        assert example["pixel_values"].shape == (3, resolution, resolution)
        count += 1
    if scales is not None:
        scales.update(stream.decode_scales)
    return count


def throughput_rows(folder: Path, shards: list[Path], resolution: int, args) -> list[list]:
    """Interleaved rounds of the three candidates at ``resolution``: one table row each."""
    from collections import Counter

    generator, seeds, counts, scales = random.Random(0), iter(range(1_000_000)), {}, Counter()

    def bare():
        counts["bare PIL"] = bare_pil_pass(shards, resolution, generator)

    def full():
        counts["full decode (today)"] = pipeline_pass(folder, resolution, next(seeds), True)

    def reduced():
        counts["reduced decode"] = pipeline_pass(folder, resolution, next(seeds), False, scales)

    candidates = {"bare PIL": bare, "full decode (today)": full, "reduced decode": reduced}
    times = interleaved_times(candidates, args.repeats, clock=args.clock)
    if any(count != args.images for count in counts.values()):
        raise RuntimeError(f"a pass read the wrong number of images: {counts}")
    used = ", ".join(f"1/{s}: {n / sum(scales.values()):.0%}" for s, n in sorted(scales.items()))
    return [
        [resolution, name, spread(t), f"{args.images / median(t):.1f}", f"{paired_ratio(times, 'bare PIL', name):.3f}",
         used if name == "reduced decode" else ""]
        for name, t in times.items()
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------------- profile
def profile_steps(folder: Path, blobs: list[bytes], resolution: int, repeats: int, clock: str) -> list[list]:
    """Per-image cost (us) of each step between the stored bytes and the batch, today's way and the new way."""
    from PIL import Image
    from torchvision.transforms import v2

    from groupvq_hf.data import (
        build_image_dataset,
        collate_examples,
        image_transform,
        plan_crop,
        render_crop,
    )

    transform = image_transform(resolution, train=True)
    to_tensor = v2.Compose(transform.transforms[-3:])  # PILToTensor, ToDtype(scale), Normalize: today's conversions
    full = [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]
    plans = []
    for i, image in enumerate(full):
        torch.manual_seed(i)
        plans.append(plan_crop(transform, image.size))
    reduced = []
    for blob, plan in zip(blobs, plans):
        image = Image.open(io.BytesIO(blob))
        scale = plan.dct_scale()
        image.draft(image.mode, (image.width // scale, image.height // scale))
        reduced.append((image.convert("RGB"), scale))
    crops = [image.resize((resolution, resolution), Image.BICUBIC) for image in full]
    examples = list(build_image_dataset(str(folder), resolution=resolution, seed=0))
    batches = [examples[i : i + 32] for i in range(0, len(examples) - 31, 32)]

    def decode_full():
        for blob in blobs:
            Image.open(io.BytesIO(blob)).convert("RGB")

    def decode_reduced():
        for blob, plan in zip(blobs, plans):
            image = Image.open(io.BytesIO(blob))
            scale = plan.dct_scale()
            image.draft(image.mode, (image.width // scale, image.height // scale))
            image.convert("RGB")

    def plan_geometry():
        for i, image in enumerate(full):
            plan_crop(transform, image.size)

    def v2_resize_crop_flip():  # today's geometry: resize the whole image, then crop and flip it
        for image in full:
            v2.Compose(transform.transforms[:-3])(image)

    def render_full():  # the crop only, resampled from the full decode, then flipped and converted
        for image, plan in zip(full, plans):
            render_crop(image, plan)

    def render_reduced():
        for (image, scale), plan in zip(reduced, plans):
            render_crop(image, plan, scale)

    def tensor_v2():
        for crop in crops:
            to_tensor(crop).clamp_(-1.0, 1.0)

    def tensor_fused():
        for crop in crops:
            torch.from_numpy(np.array(crop)).permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format)

    def stream_rows():  # parquet streaming, shuffle buffer and key column, without decoding
        for _ in build_image_dataset(str(folder), resolution=resolution, seed=0).examples:
            pass

    def collate():
        for batch in batches:
            collate_examples(batch)

    steps = {
        "decode, full": (decode_full, len(blobs)),
        "decode, at the DCT scale": (decode_reduced, len(blobs)),
        "draw the crop before decoding (plan_crop)": (plan_geometry, len(blobs)),
        "today: resize whole image + crop + flip (v2)": (v2_resize_crop_flip, len(blobs)),
        "new: resample the crop only + flip + tensor, full decode": (render_full, len(blobs)),
        "new: resample the crop only + flip + tensor, reduced decode": (render_reduced, len(blobs)),
        "today: PILToTensor + ToDtype + Normalize + clamp": (tensor_v2, len(blobs)),
        "new: one uint8 -> float copy, scaled in place": (tensor_fused, len(blobs)),
        "parquet stream + shuffle buffer (no decode)": (stream_rows, len(blobs)),
        "collate_examples (batches of 32)": (collate, sum(len(b) for b in batches)),
    }
    times = interleaved_times({name: fn for name, (fn, _) in steps.items()}, repeats, clock=clock)
    return [[name, f"{median(times[name]) / count * 1e6:.0f}"] for name, (_, count) in steps.items()]


# ---------------------------------------------------------------------------------------------------- PSNR
def psnr_rows(named_blobs: dict[str, list[bytes]], settings: list[tuple[str, int, bool, tuple | None]]) -> list:
    """PSNR (dB) between the reduced- and the full-decode crop of each JPEG (same seed: the same crop)."""
    from collections import Counter

    from groupvq_hf.data import decode_image, image_transform

    rows = []
    for source, blobs in named_blobs.items():
        for name, resolution, train, crop_scale in settings:
            transform = image_transform(resolution, train, crop_scale)
            values, scales = [], Counter()
            for i, blob in enumerate(blobs):
                image = {"bytes": blob, "path": None}
                torch.manual_seed(i)
                full = decode_image(image, transform, full_decode=True).pixels
                torch.manual_seed(i)
                reduced = decode_image(image, transform)
                scales[reduced.scale] += 1
                mse = ((reduced.pixels - full) / 2).pow(2).mean().item()  # pixels in [-1, 1]: peak-to-peak 2
                values.append(10 * np.log10(1.0 / mse) if mse > 0 else float("inf"))
            rows.append([
                source, name, resolution, ", ".join(f"1/{s}: {n}" for s, n in sorted(scales.items())),
                f"{np.median(values):.1f}", f"{np.percentile(values, 10):.1f}", f"{min(values):.1f}",
            ])  # fmt: skip
    return rows


def demo_photo_jpegs() -> list[bytes]:
    """The demo photographs at their own sizes, saved as JPEGs (quality 90)."""
    from groupvq_hf.data import demo_images

    blobs = []
    for photo in demo_images():
        buffer = io.BytesIO()
        photo.save(buffer, format="JPEG", quality=90)
        blobs.append(buffer.getvalue())
    return blobs


def main(argv=None) -> None:
    import datasets

    from groupvq_hf.data.demo import DEMO_CROP_SCALE

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512, help="Images in the shards (one pass reads them all).")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--resolutions", default="128,256", help="comma-separated crop sizes, each its own rounds")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="time each step between bytes and batch")
    parser.add_argument("--psnr", action="store_true", help="PSNR of reduced- vs full-decode crops")
    add_timing_arguments(parser)
    args = parser.parse_args(argv)
    apply_timing_arguments(args)
    resolutions = [int(r) for r in args.resolutions.split(",")]
    # datasets waits 5 s after each pass over a parquet stream (an arrow shutdown workaround); a training epoch
    # pays it once, a benchmark pass of a few hundred images would mostly measure it.
    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0
    datasets.disable_progress_bars()
    print_header("Data pipeline: build_image_dataset (reduced / full decode) vs bare PIL loop, per core", args.clock)
    blobs = imagenet_size_jpegs(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "imagenet-1k"
        shards = write_imagenet_shards(folder, blobs, args.shards)
        size_mib = sum(p.stat().st_size for p in shards) / (1 << 20)
        print(f"{args.images} JPEGs (500x375 / 375x500, q90) in {args.shards} parquet shards, {size_mib:.1f} MiB\n")
        rows = []
        for resolution in resolutions:
            rows += throughput_rows(folder, shards, resolution, args)
        header = ["px", "candidate", "ms per pass", "images/s", "throughput / bare PIL", "DCT scales"]
        print(markdown_table(header, rows))
        if args.profile:
            for resolution in resolutions:
                print(f"\nPer-image cost of each step at {resolution} px (us, median of {args.repeats} rounds):\n")
                steps = profile_steps(folder, blobs, resolution, args.repeats, args.clock)
                print(markdown_table(["step", "us per image"], steps))
    if args.psnr:
        settings = [
            ("center crop (eval/tokenize)", 128, False, None), ("center crop (eval/tokenize)", 256, False, None),
            ("random crop (train)", 128, True, None), ("random-resized crop, demo scale", 128, True, DEMO_CROP_SCALE),
            ("random-resized crop, demo scale", 64, True, DEMO_CROP_SCALE), ("center crop", 32, False, None),
        ]  # fmt: skip
        named = {f"ImageNet-size ({min(64, args.images)})": blobs[:64], "demo photos (10)": demo_photo_jpegs()}
        print("\nPSNR (dB) of the reduced-decode crop against the full-decode crop (same crop):\n")
        header = ["JPEGs", "transform", "px", "DCT scales used", "median", "10th pct", "min"]
        print(markdown_table(header, psnr_rows(named, settings)))


if __name__ == "__main__":
    main()
