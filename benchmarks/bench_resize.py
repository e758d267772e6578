"""``resize_codebook`` time, 65,536 -> 131,072 codes (64 groups of rank 128, d = 128), against its bare floor.

  extend      ``GroupVectorQuantizer.resize_codebook(131072, mode="extend", seed=...)`` (Algorithm 2, Eq. 11):
              keeps every core row, draws the new rows, rebuilds the storage.
  resample    the same with ``mode="resample"``: redraws every core at the new size.
  bare draw   what extension cannot avoid: draw the 65,536 x 128 new N(0, 1) rows from a seeded generator
              and concatenate them after the old cores, group by group.
  codebook()  building the resized 131,072 x 128 codebook once (the next forward pays it anyway).

Each round deep-copies the 65,536-code quantizer outside the timed region.

    .venv/bin/python benchmarks/bench_resize.py                    # about 30 s
    .venv/bin/python benchmarks/bench_resize.py --size 65536 --new-size 262144 --repeats 9
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CLOCKS, add_timing_arguments, apply_timing_arguments, markdown_table, median, print_header, spread


def bare_draw(quantizer, new_size: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    cores = quantizer.cores()
    extra = new_size // len(cores) - cores[0].shape[0]
    return [torch.cat([core, torch.randn(extra, core.shape[1], generator=generator)]) for core in cores]


def main(argv=None) -> None:
    from groupvq_hf import GroupVectorQuantizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=65536)
    parser.add_argument("--new-size", type=int, default=131072)
    parser.add_argument("--groups", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    add_timing_arguments(parser)
    args = parser.parse_args(argv)
    apply_timing_arguments(args)
    now = CLOCKS[args.clock]
    print_header(f"resize_codebook {args.size} -> {args.new_size} codes", args.clock)
    torch.manual_seed(0)
    template = GroupVectorQuantizer(args.size, args.dim, num_groups=args.groups, codebook_rank=args.rank)
    resized = copy.deepcopy(template)
    resized.resize_codebook(args.new_size, mode="extend", seed=0)

    def run(name: str, seed: int) -> float:
        q = copy.deepcopy(template)
        start = now()
        if name == "bare draw":
            bare_draw(q, args.new_size, seed)
        elif name == "codebook()":
            with torch.no_grad():
                resized.codebook()
        else:
            q.resize_codebook(args.new_size, mode=name, seed=seed)
        elapsed = now() - start
        if name in ("extend", "resample") and q.codebook_size != args.new_size:
            raise RuntimeError(f"resize gave {q.codebook_size} codes")
        return elapsed

    names = ["extend", "resample", "bare draw", "codebook()"]
    times = {name: [] for name in names}
    for r in range(args.repeats + 1):  # round 0 warms up
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t = run(name, seed=r)
            if r:
                times[name].append(t)
    base = median(times["bare draw"])
    rows = [[name, spread(t), f"{median(t) / base:.2f}"] for name, t in times.items()]
    print(markdown_table(["operation", "ms", "/ bare draw"], rows))


if __name__ == "__main__":
    main()
