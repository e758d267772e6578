"""Starting a run on a large local image folder: what `datasets` costs to resolve its data files, and what a training
start pays on top.

A folder in ImageNet's ``train/<class>/*.JPEG`` layout (``--classes`` x ``--per_class`` empty files: resolution
lists names, it opens no file) plus ``val/`` (50 files). Measured in one run, interleaved (`common.interleaved_times`):

  datasets resolution  ``datasets.load_dataset_builder("imagefolder", data_dir=...)``: the baseline, what any
                       ``load_dataset`` of the folder pays once.
  training start       what ``scripts/train.py`` asks of the folder before its first step: the epoch size
                       (`dataset_num_examples`), the shard count (`dataset_num_shards`), the training stream and the
                       validation stream (`build_image_dataset`), in a fresh process each round with an empty
                       ``HF_DATASETS_CACHE``: the first process of a run, which resolves the data files and records
                       them.
  training start,      the same in a process that finds the record the first one wrote (the other processes of the
  recorded             run, a resume, an evaluation of the same folder).

    .venv/bin/python benchmarks/bench_local_folder.py                       # 100 x 1,000 files, 2 rounds
    .venv/bin/python benchmarks/bench_local_folder.py --per_class 200 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved_times, markdown_table, paired_ratio, print_header, spread

RESOLUTION = """
import sys, datasets
datasets.load_dataset_builder("imagefolder", data_dir=sys.argv[1])
"""

TRAINING_START = """
import sys
from groupvq_hf.data import build_image_dataset
from groupvq_hf.data.sizing import dataset_num_examples, dataset_num_shards
folder = sys.argv[1]
assert dataset_num_examples(folder, "train") == int(sys.argv[2])
assert dataset_num_shards(folder, "train") >= 1
build_image_dataset(folder, split="train", resolution=16, seed=0)
build_image_dataset(folder, split="validation", resolution=16, train=False)
"""


def make_folder(root: Path, classes: int, per_class: int) -> int:
    for c in range(classes):
        folder = root / "train" / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            (folder / f"n{c:08d}_{i}.JPEG").touch()
    (root / "val" / "n00000000").mkdir(parents=True)
    for i in range(50):
        (root / "val" / "n00000000" / f"val_{i}.JPEG").touch()
    return classes * per_class


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--per_class", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    print_header("A training start on a local image folder vs one datasets resolution of its data files", "wall")
    with tempfile.TemporaryDirectory() as tmp:

        data = Path(tmp) / "data"
        files = make_folder(data, args.classes, args.per_class)
        recorded_cache = Path(tmp) / "recorded-cache"

        def run(code: str, *extra: str, cache: Path | None = None):
            def once():
                with tempfile.TemporaryDirectory(dir=tmp) as empty_cache:
                    run_env = dict(env, HF_DATASETS_CACHE=str(cache or empty_cache))
                    command = [sys.executable, "-c", code, str(data), *extra]
                    subprocess.run(command, env=run_env, check=True, capture_output=True)

            return once

        run(TRAINING_START, str(files), cache=recorded_cache)()  # the record the "recorded" passes read
        times = interleaved_times(
            {
                "datasets resolution": run(RESOLUTION),
                "training start": run(TRAINING_START, str(files)),
                "training start, recorded": run(TRAINING_START, str(files), cache=recorded_cache),
            },
            args.repeats,
            warmup=0,  # a fresh process per pass: nothing to warm
        )
    print(f"{files:,} training files in {args.classes} class folders, 50 validation files; each in a fresh process")
    rows = [
        ["datasets.load_dataset_builder (baseline)", spread(times["datasets resolution"]), "1.00"],
        ["training start (size, shards, train and validation streams)", spread(times["training start"]),
         f"{paired_ratio(times, 'training start', 'datasets resolution'):.2f}"],
        ["training start, data files recorded by an earlier process", spread(times["training start, recorded"]),
         f"{paired_ratio(times, 'training start, recorded', 'datasets resolution'):.4f}"],
    ]  # fmt: skip
    print(markdown_table(["pass", "ms", "/ baseline"], rows))


if __name__ == "__main__":
    main()
