"""Quantizer speed: Group-VQ forward (and forward+backward) against the bare search limit and two peers.

Candidates, all at the same number of tokens, codes and code dimension:
  limit      the bare chunked search on an already built codebook: ``(|c|^2 - 2 z.c).argmin`` per token block
             (``torch.addmm`` + ``argmin``) over the whole codebook; nothing else. The issue's reference.
  matmul     the distance matmuls alone in cache-sized blocks, no argmin: the compute floor.
  search     ``groupvq_hf.quantizer.nearest_code_indices`` alone on the built codebook (optional).
  group-vq   ``GroupVectorQuantizer.forward``: builds the codebook from the groups (Eq. 7), searches (Eq. 1),
             gathers, loss and straight-through (Eq. 2-3), usage counts and perplexity.
  diffusers  diffusers' ``VectorQuantizer`` (``legacy=False``): ``torch.cdist`` over all codes, then argmin.
  simvq      vector-quantize-pytorch's ``SimVQ`` (``rotation_trick=False``, i.e. straight-through like the others).

Ratios are medians over interleaved rounds of the per-round ratio, all in the same run. Usage:

    .venv/bin/python benchmarks/bench_quantizer.py                 # CPU sizes, about 2 minutes on 2 cores
    .venv/bin/python benchmarks/bench_quantizer.py --paper         # adds 8,192 tokens x 65,536 codes, 64 groups
    .venv/bin/python benchmarks/bench_quantizer.py --sizes 8192:65536:64 --repeats 3 --no-backward
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (
    add_timing_arguments,
    apply_timing_arguments,
    interleaved_times,
    markdown_table,
    paired_ratio,
    print_header,
    spread,
)

CANDIDATES = ("limit", "matmul", "group-vq", "diffusers", "simvq")
DEFAULT_SIZES = ("2048:4096:16", "2048:16384:64", "4096:65536:64")
PAPER_SIZE = "8192:65536:64"
LIMIT_TOKEN_BLOCK = 256
MATMUL_BLOCK = (1024, 2048)


def quantizer_module():
    """``groupvq_hf.quantizer`` loaded from its file: it imports only torch, and skipping the package's
    ``__init__`` (transformers, diffusers) keeps the memory benchmark's fresh processes quick to start."""
    if "groupvq_hf.quantizer" in sys.modules:
        return sys.modules["groupvq_hf.quantizer"]
    import importlib.util

    package = importlib.util.find_spec("groupvq_hf")
    path = os.path.join(package.submodule_search_locations[0], "quantizer.py")
    spec = importlib.util.spec_from_file_location("groupvq_quantizer_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bare_search(z: torch.Tensor, codebook: torch.Tensor, token_block: int = LIMIT_TOKEN_BLOCK) -> torch.Tensor:
    """The limit: chunked ``argmin_i |c_i|^2 - 2 z.c_i`` over the whole codebook, ``token_block`` tokens at a time."""
    code_sq = codebook.pow(2).sum(1)
    return torch.cat([torch.addmm(code_sq, blk, codebook.t(), alpha=-2).argmin(1) for blk in z.split(token_block)])


def matmul_floor(z: torch.Tensor, codebook: torch.Tensor, block: tuple[int, int] = MATMUL_BLOCK) -> None:
    """The distances alone, ``|c|^2 - 2 z.c`` in cache-sized blocks written into one reused buffer, with no
    argmin: the compute floor of any exact nearest-code search."""
    code_sq = codebook.pow(2).sum(1)
    buffer = torch.empty(block[0] * block[1], dtype=z.dtype)
    for z_blk in z.split(block[0]):
        for c_blk, sq_blk in zip(codebook.split(block[1]), code_sq.split(block[1])):
            out = buffer[: z_blk.shape[0] * c_blk.shape[0]].view(z_blk.shape[0], c_blk.shape[0])
            torch.addmm(sq_blk, z_blk, c_blk.t(), alpha=-2, out=out)


def latent_shape(tokens: int, dim: int) -> tuple[int, int, int, int]:
    """(B, d, 16, 16) latents when ``tokens`` is a multiple of 256 (the paper's 16x16 grid), else (1, d, 1, tokens)."""
    return (tokens // 256, dim, 16, 16) if tokens % 256 == 0 else (1, dim, 1, tokens)


def make_candidate(
    name: str,
    tokens: int,
    codes: int,
    dim: int = 128,
    groups: int = 64,
    rank: int = 128,
    backward: bool = False,
    seed: int = 0,
):
    """A zero-argument callable running one forward (and backward) of ``name``; built inputs are its baseline."""
    torch.manual_seed(seed)
    z = torch.randn(latent_shape(tokens, dim))
    quantizer = quantizer_module() if name in ("limit", "matmul", "search", "group-vq") else None
    if name in ("limit", "matmul", "search"):
        with torch.no_grad():
            codebook = quantizer.GroupVectorQuantizer(codes, dim, num_groups=groups, codebook_rank=rank).codebook()
        tokens_2d = z.permute(0, 2, 3, 1).reshape(-1, dim).contiguous()
        search = {"limit": bare_search, "matmul": matmul_floor, "search": quantizer.nearest_code_indices}[name]
        return lambda: search(tokens_2d, codebook)
    if name == "group-vq":
        module = quantizer.GroupVectorQuantizer(codes, dim, num_groups=groups, codebook_rank=rank)

        def run(x):
            z_q, loss, _ = module(x)
            return z_q, loss

    elif name == "diffusers":
        from diffusers.models.autoencoders.vae import VectorQuantizer

        module = VectorQuantizer(codes, dim, beta=0.25, legacy=False)

        def run(x):
            z_q, loss, _ = module(x)
            return z_q, loss

    elif name == "simvq":
        from vector_quantize_pytorch import SimVQ

        module = SimVQ(dim=dim, codebook_size=codes, channel_first=True, rotation_trick=False)

        def run(x):
            z_q, _, loss = module(x)
            return z_q, loss

    else:
        raise ValueError(f"`name` must be one of {CANDIDATES + ('search',)}, got {name!r}.")
    if not backward:

        def forward():
            with torch.no_grad():
                return run(z)

        return forward
    z.requires_grad_(True)

    def forward_backward():
        z_q, loss = run(z)
        (loss + z_q.mean()).backward()
        # Drop the gradients here, not at the start, so the next call (and the memory baseline) starts without.
        module.zero_grad(set_to_none=True)
        z.grad = None

    return forward_backward


def parse_size(text: str) -> tuple[int, int, int]:
    try:
        tokens, codes, groups = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"`--sizes` entries must be TOKENS:CODES:GROUPS (e.g. 8192:65536:64), got {text!r}.") from None
    return tokens, codes, groups


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES), help="TOKENS:CODES:GROUPS entries.")
    parser.add_argument("--paper", action="store_true", help=f"Also run the paper's scale {PAPER_SIZE}.")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="Rounds per size (3 at the paper scale).")
    parser.add_argument("--no-backward", action="store_true", help="Skip forward+backward.")
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=CANDIDATES + ("search",))
    add_timing_arguments(parser)
    args = parser.parse_args(argv)
    apply_timing_arguments(args)
    sizes = [parse_size(s) for s in args.sizes] + ([parse_size(PAPER_SIZE)] if args.paper else [])
    print_header("Quantizer forward / forward+backward (ms, median (min-max); ratios from the same run)", args.clock)
    modes = [False] if args.no_backward else [False, True]
    for tokens, codes, groups in sizes:
        gflop = 2 * tokens * codes * args.dim / 1e9
        repeats = args.repeats if tokens * codes < 8192 * 65536 else min(args.repeats, 3)
        for backward in modes:
            # The search-only candidates have no backward: forward+backward is set against the same floors.
            names = ["limit", "group-vq"] + [n for n in args.candidates if n not in ("limit", "group-vq")]
            fns = {
                n: make_candidate(
                    n,
                    tokens,
                    codes,
                    args.dim,
                    groups,
                    args.rank,
                    backward=backward and n in ("group-vq", "diffusers", "simvq"),
                )
                for n in names
            }
            times = interleaved_times(fns, repeats, clock=args.clock)
            rows = [
                [
                    n,
                    spread(times[n]),
                    f"{paired_ratio(times, n, 'limit'):.3f}",
                    f"{paired_ratio(times, 'group-vq', n):.3f}",
                ]
                for n in fns
            ]
            mode = "forward+backward" if backward else "forward"
            print(
                f"### {mode}: {tokens} tokens x {codes} codes x d={args.dim}, {groups} groups of rank {args.rank} "
                f"({gflop:.1f} GFLOP in the search), {repeats} rounds"
            )
            print(markdown_table(["candidate", "ms", "/ limit", "group-vq / this"], rows))
            print()
            del fns


if __name__ == "__main__":
    main()
