"""Training throughput of ``scripts/train.py`` with reduced JPEG decoding (the default) and with ``--full_decode``.

The images are ImageNet-style parquet shards of ~500 x 375 JPEGs (`bench_data.imagenet_size_jpegs`) written to a
temporary folder. Each candidate runs the training script in a subprocess twice, for ``--short`` and ``--long``
steps; the time per step is the difference of the two wall times over the difference of the steps, so start-up
(imports, model build, the first batches) cancels. Candidates alternate, so a change in the machine's load hits
both alike.

    PYTHONPATH=src python3 benchmarks/bench_train_throughput.py                  # a CUDA machine: imagenet preset
    .venv/bin/python benchmarks/bench_train_throughput.py --preset tiny --resolution 64 --batch_size 8 \\
        --short 5 --long 15 --workers 1                                            # a CPU smoke run
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_data import imagenet_size_jpegs, write_imagenet_shards  # noqa: E402
from common import markdown_table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run_steps(data: Path, output_dir: Path, steps: int, args, full_decode: bool) -> float:
    """Wall seconds of one training run of ``steps`` steps."""
    command = [
        sys.executable, str(REPO / "scripts" / "train.py"), "--output_dir", str(output_dir), "--dataset", str(data),
        "--model_config", args.preset, "--resolution", str(args.resolution), "--train_batch_size", str(args.batch_size),
        "--max_train_steps", str(steps), "--perceptual_weight", "0", "--dataloader_num_workers", str(args.workers),
        "--logging_steps", str(steps), "--validation_steps", "0", "--checkpointing_steps", "0", "--report_to", "none",
        "--mixed_precision", args.mixed_precision, "--no_ema",
    ] + (["--full_decode"] if full_decode else [])  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"training failed:\n{done.stderr[-3000:]}")
    return seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="imagenet")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--short", type=int, default=20)
    parser.add_argument("--long", type=int, default=80)
    parser.add_argument("--mixed_precision", default="bf16")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "imagenet"
        write_imagenet_shards(data, imagenet_size_jpegs(args.images), shards=8)
        times = {}
        for steps in (args.short, args.long):
            for full in (True, False):
                times[full, steps] = run_steps(data, Path(tmp) / f"run-{full}-{steps}", steps, args, full)
        rows = []
        for full in (True, False):
            per_step = (times[full, args.long] - times[full, args.short]) / (args.long - args.short)
            rows.append([
                "full decode (--full_decode)" if full else "reduced decode (default)",
                f"{per_step * 1000:.1f}", f"{args.batch_size / per_step:.0f}",
                f"{times[True, args.long] / times[full, args.long]:.2f}",
            ])  # fmt: skip
    print(f"{args.preset} preset, {args.resolution} px, batch {args.batch_size}, {args.workers} loader workers, "
          f"{args.mixed_precision}, {os.cpu_count()} CPU cores; steps {args.short} and {args.long}")  # fmt: skip
    print(markdown_table(["pipeline", "ms per step", "images/s", "speed-up of the long run"], rows))


if __name__ == "__main__":
    main()
