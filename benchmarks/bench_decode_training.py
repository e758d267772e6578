"""Training with reduced vs full JPEG decoding at CPU scale: same seed, same steps, held-out usage and PSNR.

Writes an ImageNet-schema parquet folder: ``train`` holds 500 x 375 / 375 x 500 JPEGs (quality 90) cut from the
training regions of the bundled demo photos (`groupvq_hf.data.demo_regions`), ``validation`` square JPEG cuts of
their held-out bands, which training never reads. For each seed it trains ``scripts/train.py`` twice, with reduced
decoding (the default) and with ``--full_decode``, then evaluates the exported EMA model on the validation split
with ``scripts/evaluate.py --metrics psnr,codebook_usage`` (full decode, center crops). Two seeds show the run-to-run
noise the difference has to be compared with.

    .venv/bin/python benchmarks/bench_decode_training.py --steps 100    # 2 seeds x 2 modes, 4 runs at a time
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import markdown_table, print_header

REPO = Path(__file__).resolve().parents[1]
MODES = (("reduced decode", []), ("full decode", ["--full_decode"]))


def write_folder(root: Path, train_images: int, seed: int = 0) -> None:
    """``root/data/{train,validation}-00000-of-00001.parquet`` (``image`` {bytes, path}, ImageNet's schema)."""
    import datasets
    from PIL import Image

    from groupvq_hf.data import demo_images, demo_regions

    rng = np.random.default_rng(seed)
    photos = demo_images()
    features = datasets.Features({"image": datasets.Image()})

    def jpeg(image, name):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        return {"bytes": buffer.getvalue(), "path": name}

    train = []
    for i in range(train_images):
        photo = photos[i % len(photos)]
        region = photo.crop(demo_regions(photo.size)[0])
        w, h = (500, 375) if i % 2 else (375, 500)
        scale = max(w / region.width, h / region.height, 1.0)  # small regions are upscaled to hold the cut
        region = region.resize((round(region.width * scale) + 1, round(region.height * scale) + 1), Image.BICUBIC)
        x, y = int(rng.integers(0, region.width - w + 1)), int(rng.integers(0, region.height - h + 1))
        train.append(jpeg(region.crop((x, y, x + w, y + h)), f"train_{i:05d}.JPEG"))
    validation = []
    for p, photo in enumerate(photos):
        band = photo.crop(demo_regions(photo.size)[1])
        side = min(band.size)
        for k in range(6):  # squares along the band
            offset = round(k * (max(band.size) - side) / 5)
            box = (offset, 0, offset + side, side) if band.width >= band.height else (0, offset, side, offset + side)
            validation.append(jpeg(band.crop(box), f"val_{p:02d}_{k}.JPEG"))
    for split, rows in (("train", train), ("validation", validation)):
        path = root / "data" / f"{split}-00000-of-00001.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict({"image": rows}, features=features).to_parquet(str(path))


def run(cmd: list[str], threads: int) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return proc.stdout + proc.stderr


def find_metrics(record: dict) -> dict:
    """``psnr`` and ``codebook_usage`` wherever the results record holds them."""
    found = {}
    for key, value in record.items():
        if key in ("psnr", "codebook_usage") and isinstance(value, (int, float)):
            found[key] = float(value)
        elif isinstance(value, dict):
            found = {**find_metrics(value), **found}
    return found


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--train_images", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run")
    parser.add_argument("--jobs", type=int, default=4, help="runs at the same time")
    args = parser.parse_args(argv)
    print_header("Training with reduced vs full JPEG decoding (same seed, same steps)")
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "jpegs"
        write_folder(folder, args.train_images)
        print(f"{args.train_images} training JPEGs (500x375 / 375x500, q90), 60 held-out JPEGs; "
              f"{args.steps} steps of {args.batch_size} at {args.resolution} px, tiny preset\n")  # fmt: skip
        runs = [(int(seed), mode, extra) for seed in args.seeds.split(",") for mode, extra in MODES]

        def train_and_evaluate(seed: int, mode: str, extra: list[str]) -> list:
            out = Path(tmp) / f"{seed}-{mode.split()[0]}"
            start = time.perf_counter()
            run([
                sys.executable, "scripts/train.py", "--dataset", str(folder), "--output_dir", str(out),
                "--model_config", "tiny", "--resolution", str(args.resolution), "--train_batch_size",
                str(args.batch_size), "--max_train_steps", str(args.steps), "--perceptual_weight", "0",
                "--disc_channels", "32", "--disc_layers", "2", "--dataloader_num_workers", "0",
                "--logging_steps", str(args.steps), "--validation_steps", str(args.steps),
                "--num_validation_images", "4", "--num_validation_usage_images", "60", "--report_to", "none",
                "--quantizer_learning_rate", "1e-2", "--ema_warmup", "true", "--seed", str(seed), *extra,
            ], args.threads)  # fmt: skip
            train_s = time.perf_counter() - start
            run([
                sys.executable, "scripts/evaluate.py", "--model", str(out / "model"), "--dataset", str(folder),
                "--split", "validation", "--resolution", str(args.resolution), "--metrics",
                "psnr,codebook_usage", "--output", str(out / "eval.json"), "--no_progress",
            ], args.threads)  # fmt: skip
            metrics = find_metrics(json.loads((out / "eval.json").read_text()))
            results[(seed, mode)] = metrics
            return [seed, mode, f"{metrics['codebook_usage']:.3f}", f"{metrics['psnr']:.2f}", f"{train_s:.0f}"]

        with ThreadPoolExecutor(args.jobs) as pool:  # each run is its own process
            rows = list(pool.map(lambda r: train_and_evaluate(*r), runs))
    print()
    print(markdown_table(["seed", "decoding", "held-out usage", "held-out PSNR (dB)", "train s (wall)"], rows))
    seeds = sorted({seed for seed, _ in results})
    for key in ("codebook_usage", "psnr"):
        mode_gap = [results[(s, "reduced decode")][key] - results[(s, "full decode")][key] for s in seeds]
        seed_gap = [results[(seeds[0], mode)][key] - results[(seeds[-1], mode)][key] for mode, _ in MODES]
        print(f"{key}: reduced - full per seed {', '.join(f'{g:+.3f}' for g in mode_gap)}; "
              f"seed {seeds[0]} - seed {seeds[-1]} per mode {', '.join(f'{g:+.3f}' for g in seed_gap)}")  # fmt: skip


if __name__ == "__main__":
    main()
