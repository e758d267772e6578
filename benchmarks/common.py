"""Shared helpers for the benchmark scripts: interleaved timing, machine description, peak memory.

Timing: every candidate runs once per round, in a rotated order (ABC, BCA, CAB, ...), so load from other
processes on a shared machine hits all candidates alike; times are medians, and a ratio is the median over rounds of
the two candidates' times in the same round.

Peak memory: each configuration runs in a fresh subprocess with glibc's mmap threshold pinned low (so every
large tensor is its own mapping and freeing it returns it to the OS). After setup and one warm-up call the
child resets the kernel's resident-set high-water mark (``/proc/self/clear_refs`` <- 5), runs the call once and
reports ``VmHWM - VmRSS(before)``: the extra resident memory the call needed beyond what setup left live. This
sees every allocation torch makes (``tracemalloc`` sees none of them).
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

MiB = 1 << 20


# --------------------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line() -> str:
    """One line naming the machine and the software: CPU, cores, torch threads, versions."""
    return (
        f"{cpu_model()}, {os.cpu_count()} logical cores, torch {torch.__version__} with "
        f"{torch.get_num_threads()} intra-op threads, Python {platform.python_version()}, {platform.system()}"
    )


def print_header(title: str, clock: str | None = None) -> None:
    print(f"## {title}")
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"machine: {machine_line()}")
    if clock:
        print(f"clock: {'elapsed wall time' if clock == 'wall' else 'process CPU time (all threads)'}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print()


# --------------------------------------------------------------------------------------------- timing
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def add_timing_arguments(parser) -> None:
    """``--threads`` and ``--clock``, shared by the timing scripts."""
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's).")
    parser.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="wall",
        help="wall: elapsed time; cpu: this process's CPU time (steadier on a shared machine with --threads 1).",
    )


def apply_timing_arguments(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def interleaved_times(
    candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, clock: str = "wall"
) -> dict[str, list[float]]:
    """Times (s) of each candidate over ``repeats`` rounds, run interleaved in a rotating order.

    ``clock`` "wall" is elapsed time, "cpu" the process's CPU time (all threads), which ignores time spent
    descheduled by other processes' load.
    """
    now = CLOCKS[clock]
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            start = now()
            candidates[name]()
            times[name].append(now() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratio(times: dict[str, list[float]], name: str, base: str) -> float:
    """Median over rounds of ``time[name] / time[base]`` in the same round: robust to load that drifts."""
    return median([a / b for a, b in zip(times[name], times[base])])


def spread(values: list[float]) -> str:
    """Median with the min-max range, for the tables."""
    return f"{median(values) * 1e3:.1f} ({min(values) * 1e3:.1f}-{max(values) * 1e3:.1f})"


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- memory
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+)", f.read(), re.MULTILINE).group(1))


def extra_peak_bytes(fn: Callable[[], object]) -> int:
    """Extra resident bytes ``fn()`` needs at its peak beyond what is live before it (Linux only).

    Call it in a fresh process after a warm-up call of ``fn`` (see ``peak_memory_in_subprocess``).
    """
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current VmRSS
    before = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    return max(0, peak - before) * 1024


_CHILD = """
import json, sys
sys.path.insert(0, {bench_dir!r})
import importlib, torch
torch.set_num_threads({threads})
from common import extra_peak_bytes
module = importlib.import_module({module!r})
kwargs, warmup = json.loads({kwargs!r}), json.loads({warmup!r})
if warmup is not None:  # warm-up on a smaller instance: thread pools, lazy initialisation
    getattr(module, {factory!r})(**{{**kwargs, **warmup}})()
fn = getattr(module, {factory!r})(**kwargs)
if warmup is None:
    fn()
print("PEAK", extra_peak_bytes(fn))
"""


def peak_memory_in_subprocess(
    module: str, factory: str, warmup: dict | None = None, threads: int | None = None, **kwargs
) -> int:
    """Run ``module.factory(**kwargs)()`` in a fresh Python and return the call's extra peak resident bytes.

    ``factory`` builds inputs and returns the zero-argument callable to measure; what it builds is the baseline.
    The process first warms up with one call built from ``{**kwargs, **warmup}`` (a smaller instance), or with
    the measured callable itself when ``warmup`` is None.
    """
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # every tensor above 64 KiB is its own mapping, unmapped on free
    env["MALLOC_TRIM_THRESHOLD_"] = "65536"
    code = _CHILD.format(
        bench_dir=os.path.dirname(os.path.abspath(__file__)),
        threads=threads or torch.get_num_threads(),
        module=module,
        factory=factory,
        kwargs=json.dumps(kwargs),
        warmup=json.dumps(warmup),
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    match = re.search(r"^PEAK (\d+)$", proc.stdout, re.MULTILINE)
    if proc.returncode or not match:
        raise RuntimeError(f"memory child failed ({module}.{factory} {kwargs}):\n{proc.stdout}\n{proc.stderr}")
    return int(match.group(1))
