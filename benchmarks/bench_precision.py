"""How often precision settings change the chosen code, and by how much (CPU, and CUDA when present).

For each setting the Group-VQ choice is compared with an exact float64 search of the same inputs. A changed
choice is harmless only at a true near-tie: the table gives how many tokens changed and the largest relative
distance gap ``(|z - c_chosen|^2 - |z - c_exact|^2) / |z - c_exact|^2`` among them.

Settings: ``fp32`` (default), ``fp32 under bf16 autocast`` (the quantizer must search in fp32: expect 0 changes),
``bf16 input`` (latents that arrive in bf16, compared with the exact search of the rounded latents), and on CUDA
``tf32`` (``torch.backends.cuda.matmul.allow_tf32`` and cuDNN TF32 on).

    .venv/bin/python benchmarks/bench_precision.py                          # CPU, 4,096 tokens x 16,384 codes
    .venv/bin/python benchmarks/bench_precision.py --device cuda --tokens 8192 --codes 65536
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import markdown_table, print_header


@contextlib.contextmanager
def tf32(enabled: bool):
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def exact_choice(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 nearest code and its squared distance, for every row of ``z``."""
    from groupvq_hf.quantizer import nearest_code_indices

    z64, c64 = z.double(), codebook.double()
    idx = nearest_code_indices(z64, c64)
    return idx, (z64 - c64[idx]).pow(2).sum(1)


def compare(z: torch.Tensor, codebook: torch.Tensor, chosen: torch.Tensor) -> list:
    exact, best = exact_choice(z, codebook)
    changed = chosen != exact
    n = int(changed.sum())
    gap = 0.0
    if n:
        z64, c64 = z.double()[changed], codebook.double()
        got = (z64 - c64[chosen[changed]]).pow(2).sum(1)
        gap = float(((got - best[changed]) / best[changed].clamp_min(1e-30)).max())
    return [n, f"{n / len(z):.2e}", f"{gap:.1e}"]


def main(argv=None) -> None:
    from groupvq_hf import GroupVectorQuantizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--codes", type=int, default=16384)
    parser.add_argument("--groups", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--noise", type=float, default=0.5, help="Latents are codes plus this much N(0, 1) noise.")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print_header(f"Precision settings vs an exact float64 search ({args.device})")
    torch.manual_seed(0)
    q = GroupVectorQuantizer(args.codes, args.dim, num_groups=args.groups, codebook_rank=args.rank).to(device)
    q.track_usage = False
    with torch.no_grad():
        codebook = q.codebook()
        # Latents near codes (as after training) make near-ties common enough to see.
        picks = torch.randint(0, args.codes, (args.tokens,), device=device)
        z = codebook[picks] + args.noise * codebook.std() * torch.randn(args.tokens, args.dim, device=device)
        rows = []
        with tf32(False):
            rows.append(["fp32", *compare(z, codebook, q.quantize_tokens(z)[2])])
            autocast_dtype = torch.bfloat16
            with torch.autocast(device.type, dtype=autocast_dtype):
                rows.append(["fp32 under bf16 autocast", *compare(z, codebook, q.quantize_tokens(z)[2])])
            z_bf16 = z.bfloat16()
            with torch.autocast(device.type, dtype=autocast_dtype):
                chosen = q.quantize_tokens(z_bf16)[2]
            rows.append(
                ["bf16 input under autocast (vs exact of rounded z)", *compare(z_bf16.float(), codebook, chosen)]
            )
            rows.append(
                ["bf16 input under autocast (vs exact of fp32 z: rounding of z)", *compare(z, codebook, chosen)]
            )
        if device.type == "cuda":
            with tf32(True):
                rows.append(["tf32 matmul", *compare(z, codebook, q.quantize_tokens(z)[2])])
    print(f"{args.tokens} tokens x {args.codes} codes x d={args.dim}, latents = codes + {args.noise} x std noise\n")
    print(markdown_table(["setting", "changed choices", "rate", "max relative distance gap"], rows))


if __name__ == "__main__":
    main()
