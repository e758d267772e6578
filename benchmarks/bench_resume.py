"""Resuming late in an epoch: `groupvq_hf.data.stream.ResumableBatches` skips consumed rows without decoding them.

A local ImageNet-1k-style parquet set (JPEGs of ~500 x 375 px cut from the demo photographs, `bench_data.py`'s
shards) is read as one training epoch of ``--images`` images in batches of ``--batch_size`` (one process,
``--num_workers`` loader workers). Candidates, run interleaved in rotating order:

  straight epoch      a fresh stream read from its first batch to the end of the epoch (no resume).
  resume at 90%       a fresh stream given the data position saved after 90% of the epoch's batches, read to the
                      end of the epoch (the rows before the position are read from parquet but not decoded).

Also timed: the first batch of a fresh stream and the first batch after the resume (what a resumed run waits
before its first step). Each resumed pass checks its batches equal the straight run's last 10% bit for bit.

    .venv/bin/python benchmarks/bench_resume.py                   # 512 images, 128 px, ~1-2 minutes
    .venv/bin/python benchmarks/bench_resume.py --images 2048 --num_workers 2 --repeats 3
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
from common import interleaved_times, markdown_table, paired_ratio, print_header, spread


def make_batches(folder: Path, args, state: dict | None = None):
    from groupvq_hf.data import build_image_dataset
    from groupvq_hf.data.stream import ResumableBatches

    stream = build_image_dataset(str(folder), resolution=args.resolution, seed=0)
    batches = ResumableBatches(stream, args.batch_size, args.num_workers, seed=0)
    if state is not None:
        batches.load_state_dict(state)
    return batches


def read_to_epoch_end(batches, total: int) -> list[torch.Tensor]:
    """Pixels of the batches up to the epoch's last one (``total`` batches in the epoch)."""
    out = []
    if batches.batches_in_epoch == total:
        return out
    for batch in batches:
        out.append(batch["pixel_values"])
        if batches.batches_in_epoch == total:
            break
    return out


def main(argv=None) -> None:
    import datasets

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512, help="Images in the parquet set (one epoch).")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument(
        "--fraction", type=float, default=0.9, help="Share of the epoch's batches read before the resume."
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0  # as in bench_data.py: not part of either candidate
    datasets.disable_progress_bars()
    print_header("Resume at 90% of an epoch vs the same epoch without resume (one process)", args.clock)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "imagenet-1k"
        shards = write_imagenet_shards(folder, imagenet_size_jpegs(args.images), args.shards)
        size_mib = sum(p.stat().st_size for p in shards) / (1 << 20)
        # the epoch's batches and the position after `fraction` of them, from one straight pass
        batches = make_batches(folder, args)
        reference, states = [], []
        for batch in batches:
            if batches.epoch > 0:
                break
            reference.append(batch["pixel_values"])
            states.append(batches.state_dict())
        total = len(reference)
        cut = round(total * args.fraction)
        state = states[cut - 1]
        print(
            f"{args.images} JPEGs (~500x375, q90) in {args.shards} parquet shards, {size_mib:.1f} MiB; "
            f"{args.resolution}px crops; batch {args.batch_size}, {args.num_workers} loader workers; "
            f"{total} batches per epoch, resume after {cut} ({cut / total:.0%})"
        )
        firsts = {}

        def straight():
            out = read_to_epoch_end(make_batches(folder, args), total)
            assert len(out) == total

        def resumed():
            out = read_to_epoch_end(make_batches(folder, args, state), total)
            assert len(out) == total - cut and all(torch.equal(a, b) for a, b in zip(out, reference[cut:]))

        def first_fresh():
            firsts["fresh"] = next(iter(make_batches(folder, args)))

        def first_resumed():
            firsts["resumed"] = next(iter(make_batches(folder, args, state)))
            assert torch.equal(firsts["resumed"]["pixel_values"], reference[cut])

        times = interleaved_times(
            {"straight epoch": straight, "resume at 90%": resumed, "first batch, fresh": first_fresh,
             "first batch, resumed": first_resumed},
            args.repeats, clock=args.clock,
        )  # fmt: skip
    rows = [
        ["straight epoch (no resume)", spread(times["straight epoch"]), "1.000"],
        [f"resume after {cut}/{total} batches, to epoch end", spread(times["resume at 90%"]),
         f"{paired_ratio(times, 'resume at 90%', 'straight epoch'):.3f}"],
        ["first batch of a fresh stream", spread(times["first batch, fresh"]),
         f"{paired_ratio(times, 'first batch, fresh', 'straight epoch'):.3f}"],
        ["first batch after the resume", spread(times["first batch, resumed"]),
         f"{paired_ratio(times, 'first batch, resumed', 'straight epoch'):.3f}"],
    ]  # fmt: skip
    print(markdown_table(["pass", "ms", "/ straight epoch"], [[r[0], r[1], r[2]] for r in rows]))
    ideal = (total - cut) / total
    print(
        f"\nideal resume / straight ratio (only the last {total - cut} batches' work): {ideal:.3f}; "
        f"measured {paired_ratio(times, 'resume at 90%', 'straight epoch'):.3f}."
    )


if __name__ == "__main__":
    main()
