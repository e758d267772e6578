"""The cost of flushing a swapped-in folder to disk: `groupvq_hf.fileio.replace_directory` with and without fsync.

A checkpoint-sized folder (``--files`` files of ``--mib`` MiB each, random bytes) is written into a temporary folder
and swapped in with `replace_directory`, which fsyncs every file and folder under it before the rename and the
parent folder after it. Candidates, run interleaved in rotating order (`common.interleaved_times`):

  fsync       replace_directory as it is.
  no fsync    the same with `fileio.fsync` replaced by a no-op (the behaviour before fsync was added).

The folder is written under ``--dir`` (default: this repository's folder, the disk a run's --output_dir is on).
What fsync costs depends on the disk and on how much of the data the kernel has already written back, so the
figure is this machine's only.

    .venv/bin/python benchmarks/bench_fsync.py                    # 4 x 64 MiB, 5 rounds, ~10 s
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved_times, markdown_table, paired_ratio, print_header, spread

from groupvq_hf import fileio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = parser.parse_args()
    print_header(f"Swapping in a {args.files} x {args.mib} MiB folder with and without fsync", clock="wall")
    root = Path(tempfile.mkdtemp(prefix=".bench-fsync-", dir=args.dir))
    blob = os.urandom(args.mib << 20)
    real_fsync = fileio.fsync

    def swap(flush: bool):
        def run():
            fileio.fsync = real_fsync if flush else (lambda path: None)
            try:
                tmp = Path(tempfile.mkdtemp(prefix=".tmp-checkpoint.", dir=root))
                for i in range(args.files):
                    (tmp / f"part{i}.bin").write_bytes(blob)
                fileio.replace_directory(tmp, root / "checkpoint")
            finally:
                fileio.fsync = real_fsync

        return run

    try:
        times = interleaved_times({"fsync": swap(True), "no fsync": swap(False)}, repeats=args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    total = args.files * args.mib
    rows = [[name, spread(t), f"{total / (sorted(t)[len(t) // 2]):.0f}"] for name, t in times.items()]
    print(markdown_table(["candidate", "ms per write + swap (median, range)", "MiB/s"], rows))
    print(f"\nfsync / no fsync (median of paired rounds): {paired_ratio(times, 'fsync', 'no fsync'):.2f}")


if __name__ == "__main__":
    main()
