"""Tokenizing throughput: `tokenize_dataset` end to end against its two stages, decode-only and encode-only.

The images are ImageNet-style parquet shards written to a temporary folder (`bench_data.write_imagenet_shards`: JPEGs
of about 500 x 375 cut from the bundled demo photos, ``image`` {bytes, path} + ``label``). Per preset (a randomly
initialised model at its ``sample_size``), in one process, interleaved over ``--repeats`` rounds:

  decode only   the DataLoader of `tokenize_dataset` (same stream, view transform, batch size and loader workers)
                read to the end, nothing encoded: the workers send uint8 views;
  encode only   ``model.encode`` over the same images already decoded to uint8 tensors on the device, same batches,
                normalised there and encoded with the model's per-call NaN/inf checks off (as ``tokenize_dataset``);
  end to end    ``tokenize_dataset`` (decode in the loader workers overlapping the encoder, tokens written to
                parquet shards, card and record);
  decode only, float32 pixels
                the baseline of the uint8 transport: the same loader with the views normalised in the workers (as
                before 2026-12-05), so four times the bytes go through shared memory (and pinned memory on CUDA).

Target: end to end >= 0.85 x the slower stage. ``--simulated_encoder_ms F`` replaces the encoder by a sleep of F ms per
image (`simulated_encoder`): on a small CPU machine the loader workers and a real encoder share the cores, so this is
how the loop's overlap is measured there without a GPU. Shard writing: the main process's cost per row of turning token grids
into a parquet shard (`ShardWriter`) against the Python-list route, ``--write_rows`` rows. Memory: the extra peak resident memory of ``tokenize_dataset`` (tiny
preset, no loader workers, in a fresh process) for ``--memory_images`` and twice as many images; it should not grow
(shards are flushed). On CUDA the peak allocated CUDA memory of each end-to-end run is printed too.

    .venv/bin/python benchmarks/bench_tokenize.py                                  # CPU, short
    PYTHONPATH=src python benchmarks/bench_tokenize.py --device cuda      # H200: 2048 images, 8 workers
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_data import imagenet_size_jpegs, write_imagenet_shards
from common import interleaved_times, markdown_table, median, peak_memory_in_subprocess, print_header

MiB = 1 << 20
DECODE_FLOAT = "decode only, float32 pixels"


def _quiet_datasets() -> None:
    import datasets

    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0  # a 5 s wait after each parquet pass (arrow workaround)
    datasets.disable_progress_bars()


def _model(preset: str, device: str):
    from groupvq_hf import GroupVQConfig, GroupVQModel

    torch.manual_seed(0)
    return GroupVQModel(GroupVQConfig.from_preset(preset)).eval().to(device)


class FloatViews:
    """The view transform as it was before the workers sent uint8: normalised to float32 in the worker."""

    def __init__(self, view_transform):
        self.view_transform, self.resolution = view_transform, view_transform.resolution

    def __call__(self, image) -> torch.Tensor:
        return self.view_transform.normalize(self.view_transform(image))


def _loader(folder: Path, view_transform, batch_size: int, workers: int, device: str):
    """The DataLoader of `tokenize_dataset` over ``folder`` with ``view_transform``."""
    from groupvq_hf.data import build_image_dataset, collate_examples

    stream = build_image_dataset(
        str(folder), split="train", resolution=view_transform.resolution, train=False, label_column="auto",
        transform=view_transform,
    )  # fmt: skip
    return torch.utils.data.DataLoader(
        stream, batch_size=batch_size, collate_fn=collate_examples, num_workers=workers, pin_memory=device == "cuda",
    )  # fmt: skip


def simulated_encoder(model, ms_per_image: float):
    """A stand-in for ``model.encode`` that holds the main thread ``ms_per_image`` per image (sleeping: no core used)
    and returns all-zero indices and latents of the right shapes: a device that encodes at a fixed rate, so the loop's
    overlap of decoding and encoding shows without the encoder competing with the loader workers for the CPU."""
    import time
    from types import SimpleNamespace

    factor = model.config.downsample_factor

    def encode(pixels: torch.Tensor):
        batch, _, height, width = pixels.shape
        time.sleep(ms_per_image * batch / 1000)
        grid, device = (batch, height // factor, width // factor), pixels.device
        indices = torch.zeros(grid, dtype=torch.long, device=device)
        return SimpleNamespace(indices=indices, latents=torch.zeros(batch, 1, *grid[1:], device=device))

    return encode


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_preset(preset: str, folder: Path, images: int, args, accelerator) -> list[list[object]]:
    from groupvq_hf.tokens import ViewTransform, image_processor_at, tokenize_dataset

    model = _model(preset, args.device)
    if args.simulated_encoder_ms is not None:
        model.encode = simulated_encoder(model, args.simulated_encoder_ms)
    resolution = model.config.sample_size
    views = ViewTransform(image_processor_at(None, resolution), resolution, args.augment)
    loader = _loader(folder, views, args.batch_size, args.workers, args.device)
    float_loader = _loader(folder, FloatViews(views), args.batch_size, args.workers, args.device)
    decoded = [batch["pixel_values"].flatten(0, 1) for batch in loader]  # uint8 views, flattened: the worker output
    decoded = [batch.to(args.device) for batch in decoded]
    counts, peaks = {}, []

    def decode_only():
        counts["decode"] = sum(len(batch["rows"]) for batch in loader)

    def decode_only_float():
        counts["decode (float32)"] = sum(len(batch["rows"]) for batch in float_loader)

    @torch.inference_mode()
    def encode_only():  # as tokenize_dataset encodes: normalised on the device, the per-call NaN/inf checks off
        model.check_finite = False
        for batch in decoded:
            model.encode(views.normalize(batch))
        _sync(args.device)
        model.check_finite = True

    def end_to_end():
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with tempfile.TemporaryDirectory() as out:
            record = tokenize_dataset(
                model, str(folder), out, resolution, augment=args.augment, batch_size=args.batch_size,
                dataloader_num_workers=args.workers, rows_per_shard=args.rows_per_shard, accelerator=accelerator,
                progress=False,
            )  # fmt: skip
        _sync(args.device)
        counts["end to end"] = record["num_examples"] // len(record["views"])
        if args.device == "cuda":
            peaks.append(torch.cuda.max_memory_allocated() / MiB)

    candidates = {"decode only": decode_only, "encode only": encode_only, "end to end": end_to_end,
                  DECODE_FLOAT: decode_only_float}  # fmt: skip
    times = interleaved_times(candidates, args.repeats, warmup=1)
    if set(counts.values()) != {images}:
        raise RuntimeError(f"a pass read the wrong number of images: {counts} (expected {images})")
    rate = {name: images / median(t) for name, t in times.items()}
    slower = min(rate["decode only"], rate["encode only"])
    ratios = {"end to end": f"{rate['end to end'] / slower:.2f}",
              DECODE_FLOAT: f"decode only x{rate['decode only'] / rate[DECODE_FLOAT]:.2f}"}  # fmt: skip
    rows = [
        [preset, f"{resolution}px", name, f"{median(t):.2f}", f"{rate[name]:.1f}", ratios.get(name, "")]
        for name, t in times.items()
    ]  # fmt: skip
    if peaks:
        rows[2][-1] += f" (peak CUDA {max(peaks):.0f} MiB)"
    return rows


# ---------------------------------------------------------------------------------------------------- shard writing
def bench_shard_writing(num_rows: int, length: int, repeats: int) -> list[list[object]]:
    """Writing ``num_rows`` rows of ``length`` tokens (ImageNet's 1,000 class names) as one shard: `ShardWriter`
    (numpy grids to one Arrow column) against the Python-list route (``tolist`` + ``Dataset.from_dict``)."""
    import datasets
    import numpy as np

    from groupvq_hf.tokens.tokenization import ShardWriter, _output_features

    features = _output_features(datasets.ClassLabel(names=[f"class {i}" for i in range(1000)]), length)
    grids = np.random.default_rng(0).integers(0, 16384, (num_rows, 1, length), dtype=np.int32)
    rows = [{"tokens": grids[i], "key": [f"image{i}.JPEG"], "augmentation": ["center"], "label": [i % 1000]}
            for i in range(num_rows)]  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "data").mkdir()
        (root / ".progress").mkdir()

        def shard_writer():
            writer = ShardWriter(root, "train", 0, 0, 0, num_rows, features)
            for i, values in enumerate(rows):
                writer.add(i, values)
            writer.close()

        def python_lists():
            columns = {"tokens": [], "key": [], "augmentation": [], "label": []}
            for values in rows:
                columns["tokens"] += values["tokens"].tolist()
                for name in ("key", "augmentation", "label"):
                    columns[name] += values[name]
            datasets.Dataset.from_dict(columns, features=features).to_parquet(str(root / "lists.parquet"))

        times = interleaved_times({"ShardWriter (Arrow)": shard_writer, "tolist + from_dict": python_lists}, repeats)
    base = median(times["tolist + from_dict"])
    return [[name, num_rows, f"{median(t):.3f}", f"{median(t) / num_rows * 1e6:.1f}", f"{base / median(t):.2f}"]
            for name, t in times.items()]  # fmt: skip


# ---------------------------------------------------------------------------------------------------- memory child
def tokenize_factory(images: int, batch_size: int, rows_per_shard: int):
    """Shards of ``images`` images and a tiny model (the baseline); returns the call to measure."""
    _quiet_datasets()
    from groupvq_hf.tokens import tokenize_dataset

    root = Path(tempfile.mkdtemp())
    write_imagenet_shards(root / "src", imagenet_size_jpegs(images))
    model = _model("tiny", "cpu")
    runs = iter(range(1_000_000))

    def run():
        tokenize_dataset(model, str(root / "src"), root / f"out{next(runs)}", model.config.sample_size,
                         batch_size=batch_size, rows_per_shard=rows_per_shard, progress=False)  # fmt: skip

    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,imagenet", help="Comma-separated `GroupVQConfig` presets.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=None, help="Images per pass (2048 on CUDA, 64 on CPU).")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="Loader workers (default: min(8, cores - 1)).")
    parser.add_argument("--augment", choices=("none", "flip", "ten_crop"), default="none")
    parser.add_argument("--rows_per_shard", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--memory_images", type=int, default=64, help="0 skips the peak-memory check.")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads of the main process.")
    parser.add_argument("--write_rows", type=int, default=10_000, help="Rows of the shard-writing table (0 skips it).")
    parser.add_argument("--simulated_encoder_ms", type=float, default=None, help="Replace the encoder by a sleep of "
                        "this many ms per image (a device encoding at a fixed rate; see `simulated_encoder`).")  # fmt: skip
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.images = args.images or (2048 if args.device == "cuda" else 64)
    args.workers = args.workers if args.workers is not None else max(1, min(8, (os.cpu_count() or 2) - 1))
    _quiet_datasets()
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=args.device == "cpu")
    print_header(f"Tokenizing throughput on {args.device}: tokenize_dataset vs decode-only and encode-only", "wall")
    print(f"{args.images} JPEGs (~500x375) per pass, batch {args.batch_size}, {args.workers} loader worker(s), "
          f"augment {args.augment}, {args.repeats} round(s)\n")  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "imagenet-1k"
        write_imagenet_shards(folder, imagenet_size_jpegs(args.images), shards=max(2, args.workers))
        for preset in args.presets.split(","):
            rows += bench_preset(preset.strip(), folder, args.images, args, accelerator)
    print(markdown_table(["preset", "resolution", "loop", "s per pass", "images/s", "end to end / slower stage"], rows))
    if args.write_rows:
        print()
        print(markdown_table(
            ["shard writer", "rows (256 tokens)", "s per shard", "us per row", "speed-up"],
            bench_shard_writing(args.write_rows, 256, max(3, args.repeats)),
        ))  # fmt: skip
    if args.memory_images:
        print()
        sizes = (args.memory_images, 2 * args.memory_images)
        peaks = [
            peak_memory_in_subprocess("bench_tokenize", "tokenize_factory", threads=torch.get_num_threads(), images=n,
                                      batch_size=16, rows_per_shard=32)  # fmt: skip
            for n in sizes
        ]
        print(markdown_table(
            ["images (tiny, CPU, no workers, 32 rows per shard)", "extra peak RSS of tokenize_dataset (MiB)"],
            [[n, f"{p / MiB:.1f}"] for n, p in zip(sizes, peaks)],
        ))  # fmt: skip


if __name__ == "__main__":
    main()
