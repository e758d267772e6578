"""Quantizer peak memory at 16,384 / 65,536 / 262,144 codes: extra resident memory of one call.

Each (candidate, codes) pair runs in its own fresh Python (see ``common.peak_memory_in_subprocess``): the inputs,
parameters and (for ``limit``, ``search`` and ``diffusers``) the codebook are built first and are the baseline;
the figure is what the call needs on top. Group-VQ and SimVQ build their codebook inside the call, so the table
also gives the extra memory beyond that codebook (n x d fp32), which is what the search itself costs.

    .venv/bin/python benchmarks/bench_memory.py                    # 512 tokens, forward, about 2 minutes
    .venv/bin/python benchmarks/bench_memory.py --tokens 8192 --backward   # paper batch; peers need 8 GiB at 262,144
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import MiB, markdown_table, peak_memory_in_subprocess, print_header

CODES = (16384, 65536, 262144)
CANDIDATES = ("limit", "search", "group-vq", "diffusers", "simvq")
BUILDS_CODEBOOK = {"group-vq", "simvq"}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--codes", type=int, nargs="+", default=list(CODES))
    parser.add_argument("--groups", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=CANDIDATES)
    parser.add_argument("--backward", action="store_true", help="Measure forward+backward instead of forward.")
    args = parser.parse_args(argv)
    print_header(
        f"Extra peak memory of one {'forward+backward' if args.backward else 'forward (no grad)'} call, "
        f"{args.tokens} tokens, d={args.dim}, {args.groups} groups of rank {args.rank} (MiB)"
    )
    rows = []
    for codes in args.codes:
        codebook_mib = codes * args.dim * 4 / MiB
        matrix_mib = args.tokens * codes * 4 / MiB
        for name in args.candidates:
            peak = (
                peak_memory_in_subprocess(
                    "bench_quantizer",
                    "make_candidate",
                    name=name,
                    tokens=args.tokens,
                    codes=codes,
                    dim=args.dim,
                    groups=args.groups,
                    rank=args.rank,
                    backward=args.backward and name not in ("limit", "search"),
                )
                / MiB
            )
            beyond = peak - codebook_mib if name in BUILDS_CODEBOOK else peak
            rows.append([codes, name, f"{peak:.1f}", f"{beyond:.1f}", f"{codebook_mib:.1f}", f"{matrix_mib:.1f}"])
            print(f"  {codes:>7} codes  {name:<10} extra {peak:8.1f} MiB", flush=True)
    print()
    print(
        markdown_table(
            ["codes", "candidate", "extra peak", "extra beyond the codebook", "codebook n x d", "tokens x codes"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
