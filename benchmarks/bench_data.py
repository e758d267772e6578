"""Data pipeline throughput: ``build_image_dataset`` over local ImageNet-style parquet shards vs a bare PIL loop.

The shards are written to a temporary folder in the layout and schema of ``ILSVRC/imagenet-1k``
(``data/train-0000N-of-0000M.parquet``, ``image`` {bytes, path} + ``label``), holding JPEGs cut from the bundled
demo photographs at ImageNet-like sizes (about 500 x 375, quality 90). Both candidates run in this one process
with one torch thread, so the ratio is per core:

  pipeline   ``groupvq_hf.data.build_image_dataset(folder, train=True)``: parquet streaming, shuffle buffer,
             decode, RGB conversion, bicubic shorter-side resize, random crop + flip, [-1, 1] tensor.
  bare PIL   pyarrow reads the same shards; per row ``Image.open`` + ``convert("RGB")``, bicubic shorter-side
             resize, random crop + flip in PIL, ``torch.from_numpy`` to [-1, 1]. Nothing else.

    .venv/bin/python benchmarks/bench_data.py                      # 256 images per pass at 128 px, ~1 minute
    .venv/bin/python benchmarks/bench_data.py --images 1024 --resolution 256 --repeats 5
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
from common import interleaved_times, markdown_table, median, paired_ratio, print_header, spread


def write_imagenet_shards(root: Path, images: int, shards: int = 2, seed: int = 0) -> list[Path]:
    """ImageNet-1k-style parquet shards of ``images`` JPEG crops of the demo photos; returns the shard paths."""
    import datasets
    from PIL import Image

    from groupvq_hf.data import demo_images

    rng = random.Random(seed)
    photos = demo_images()
    rows = []
    for i in range(images):
        photo = photos[i % len(photos)]
        w, h = rng.choice([(500, 375), (375, 500), (500, 333), (640, 480), (400, 400)])
        scale = max(w / photo.width, h / photo.height)
        if scale > 1:  # small photos are upscaled so every crop has the target size
            photo = photo.resize((round(photo.width * scale) + 1, round(photo.height * scale) + 1), Image.BICUBIC)
        x, y = rng.randint(0, photo.width - w), rng.randint(0, photo.height - h)
        buffer = io.BytesIO()
        photo.crop((x, y, x + w, y + h)).save(buffer, format="JPEG", quality=90)
        rows.append({"image": {"bytes": buffer.getvalue(), "path": f"n{i % 1000:08d}_{i}.JPEG"}, "label": i % 1000})
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


def pipeline_pass(folder: Path, resolution: int, seed: int) -> int:
    from groupvq_hf.data import build_image_dataset

    count = 0
    for example in build_image_dataset(str(folder), split="train", resolution=resolution, train=True, seed=seed):
        assert example["pixel_values"].shape == (3, resolution, resolution)
        count += 1
    return count


def main(argv=None) -> None:
    import datasets

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256, help="Images in the shards (one pass reads them all).")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    # datasets waits 5 s after each pass over a parquet stream (an arrow shutdown workaround); a training epoch
    # pays it once, a benchmark pass of a few hundred images would mostly measure it.
    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0
    datasets.disable_progress_bars()
    print_header("Data pipeline: build_image_dataset vs bare PIL loop (one process, one torch thread)", args.clock)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "imagenet-1k"
        shards = write_imagenet_shards(folder, args.images, args.shards)
        size_mib = sum(p.stat().st_size for p in shards) / (1 << 20)
        print(
            f"{args.images} JPEGs (~500x375, q90) in {args.shards} parquet shards, {size_mib:.1f} MiB; {args.resolution}px crops"
        )
        generator = random.Random(0)
        seeds = iter(range(1_000_000))
        counts = {}

        def run_pipeline():
            counts["pipeline"] = pipeline_pass(folder, args.resolution, next(seeds))

        def run_bare():
            counts["bare PIL"] = bare_pil_pass(shards, args.resolution, generator)

        times = interleaved_times({"pipeline": run_pipeline, "bare PIL": run_bare}, args.repeats, clock=args.clock)
    if counts["pipeline"] != args.images or counts["bare PIL"] != args.images:
        raise RuntimeError(f"a pass read the wrong number of images: {counts}")
    rows = [
        [name, spread(t), f"{args.images / median(t):.1f}", f"{paired_ratio(times, 'bare PIL', name):.3f}"]
        for name, t in times.items()
    ]
    print(markdown_table(["candidate", "ms per pass", "images/s", "throughput / bare PIL"], rows))


if __name__ == "__main__":
    main()
