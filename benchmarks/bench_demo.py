"""Latency of the demo page's work (`groupvq_hf.app.DemoTokenizer.tokenize`), without the browser.

One 128 px photo (the `chelsea` demo photo resized), for the `tiny` preset (its own 64 px crop, and a 128 px crop)
and the default preset (`imagenet`: 65,536 codes, 128 px). Timed, after one warm-up call:

  new image          a fresh image through processor, encoder, quantizer, decoder and the page's figures
  first 2n extend    the first switch to a self-extended 2n codebook (quantizer copy + resize + quantize + decode)
  cached 2n          the same switch again (the resized copy and the image's encoder output are cached)

Each row reports the median of ``--repeats`` runs (wall clock) and the process CPU time of the median run.

    .venv/bin/python benchmarks/bench_demo.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_timing_arguments, apply_timing_arguments, markdown_table, print_header


def timed(fn, repeats: int) -> tuple[float, float]:
    runs = []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        runs.append((time.perf_counter() - wall, time.process_time() - cpu))
    runs.sort()
    return runs[len(runs) // 2]


def measure(name: str, model, processor, image, repeats: int) -> list[object]:
    from groupvq_hf.app import DemoTokenizer

    n = model.config.codebook_size
    tokenizer = DemoTokenizer(model, processor)
    tokenizer.tokenize(image)  # warm-up
    # encoder outputs are cached by pixel content: each "new image" is the photo turned by one more degree
    angles = iter(range(1, repeats + 1))
    fresh = timed(lambda: tokenizer.tokenize(image.rotate(next(angles))), repeats)
    wall, cpu = time.perf_counter(), time.process_time()
    tokenizer.tokenize(image, 2 * n, "extend", 0)
    first = (time.perf_counter() - wall, time.process_time() - cpu)
    cached = timed(lambda: tokenizer.tokenize(image, 2 * n, "extend", 0), repeats)
    crop = (processor or model.default_image_processor()).crop_size["height"]
    cells = [f"{w * 1000:.0f} ms (CPU {c * 1000:.0f} ms)" for w, c in (fresh, first, cached)]
    return [name, f"{n:,}", f"{crop} px", *cells]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_timing_arguments(parser)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    apply_timing_arguments(args)
    print_header("Demo page latency (DemoTokenizer.tokenize, no browser)", "wall")
    from groupvq_hf import GroupVQConfig, GroupVQImageProcessor, GroupVQModel
    from groupvq_hf.data import demo_images

    image = demo_images()[1].resize((128, 128))
    torch.manual_seed(0)
    tiny = GroupVQModel(GroupVQConfig.from_preset("tiny")).eval()
    at_128 = GroupVQImageProcessor(size={"shortest_edge": 128}, crop_size={"height": 128, "width": 128})
    default = GroupVQModel(GroupVQConfig()).eval()
    rows = [
        measure("tiny", tiny, None, image, args.repeats),
        measure("tiny", tiny, at_128, image, args.repeats),
        measure("default (imagenet)", default, None, image, args.repeats),
    ]
    print(markdown_table(["preset", "codes", "crop", "new image", "first 2n extend", "cached 2n"], rows))


if __name__ == "__main__":
    main()
