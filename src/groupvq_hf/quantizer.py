"""Group-VQ: a codebook of ``k`` independently reparameterised groups (pure torch).

Group ``j`` holds ``n_j`` codes generated as ``G_j = core_j @ W_j + b_j`` (paper Eq. 7): the core
(``n_j x r_j``) is a frozen draw from the fixed distribution P = N(0, core_std^2 I) (section 3.3), kept as a persistent
buffer; only the projector ``W_j`` (``r_j x d``) and the bias ``b_j`` (``d``) train. ``core_std`` defaults to
``d^-1/2``, SimVQ's N(0, 1/d) codebook: with ``W_j`` initialised like ``nn.Linear`` the initial codes then have SimVQ's
per-coordinate std ``1/sqrt(3d)``; 1.0 (the paper's literal N(0, I), used before ``core_std`` existed) gives codes of std
``1/sqrt(3)`` whatever d, far wider than a fresh encoder's latents. The codebook is the concatenation of the groups in order
(Algorithm 1, line 7). ``k = 1`` is SimVQ, ``k = n`` is vanilla VQ.

This file imports nothing but torch: it travels to the Hub as remote code beside both model shells.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

PROJECTORS = ("linear", "mlp", "linear+mlp")
RESIZE_MODES = ("extend", "resample")
# The Group-VQ keyword arguments both model shells take beside the codebook size and dimension.
QUANTIZER_CONFIG_KEYS = (
    "num_groups", "codebook_rank", "group_sizes", "group_ranks", "projector", "commitment_beta", "core_std",
)
# The core distribution of checkpoints saved before ``core_std`` was recorded: N(0, I).
LEGACY_CORE_STD = 1.0
# Floats of the (tokens x codes) distance block the search may hold at once (16 MiB in fp32).
SEARCH_BLOCK_ELEMENTS = 1 << 22
# Search block shape: up to 2,048 tokens x 2,048 codes (code blocks narrow enough for MKL's GEMM to stay fast),
# never fewer than 256 tokens at once (a tiny ``max_block_elements`` then narrows the code blocks only).
SEARCH_TOKEN_BLOCK, SEARCH_CODE_BLOCK, SEARCH_MIN_TOKEN_BLOCK = 2048, 2048, 256
# On a GPU small blocks starve the matmul and add launches: blocks of up to 8,192 x 16,384 (512 MiB in fp32),
# still a fixed size whatever the number of codes.
CUDA_SEARCH_BLOCK_ELEMENTS, CUDA_SEARCH_TOKEN_BLOCK, CUDA_SEARCH_CODE_BLOCK = 1 << 27, 8192, 16384
# Columns per run in the two-level row argmin on CPU (see ``_block_argmin``).
ARGMIN_RUN = 64


def default_core_std(codebook_dim: int) -> float:
    """SimVQ's codebook scale: the core is drawn from N(0, 1/d)."""
    return float(codebook_dim) ** -0.5


def check_number(name: str, value, low: float = 0.0, strict: bool = False, high: float = math.inf, note: str = "") -> float:
    """``value`` as a float when it is a finite real number (not a bool) >= ``low`` (> ``low`` if ``strict``) and
    <= ``high``, else a ValueError naming ``name``: the one rule of the float hyperparameters (NaN and inf refused)."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or value < low or (strict and value == low) or value > high):  # fmt: skip
        bounds = f"{'>' if strict else '>='} {low:g}" + (f" and <= {high:g}" if high < math.inf else "")
        raise ValueError(f"`{name}` must be a number {bounds}, finite (not NaN or inf){note}, got {value!r}.")
    return float(value)


def check_core_std(core_std) -> float:
    """``core_std`` as a float in float32's normal range (the cores' dtype: a smaller std draws all-zero cores, a
    larger one inf), or a ValueError naming `core_std`."""
    f32 = torch.finfo(torch.float32)
    return check_number("core_std", core_std, f32.tiny, high=f32.max, note=" (std of the frozen core's N(0, core_std^2))")


def _is_int(value) -> bool:
    """A Python or numpy integer (never a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_seed(seed) -> int | None:
    """``seed`` as an int in [0, 2**64) (what ``torch.Generator.manual_seed`` takes), None as None; ValueError
    naming `seed` otherwise (a float, a bool, a string, a negative or too large number)."""
    if seed is None:
        return None
    if not _is_int(seed) or not 0 <= int(seed) < 2**64:
        raise ValueError(f"`seed` must be None or an integer in [0, 2**64 - 1], got {seed!r}.")
    return int(seed)


def resolve_groups(
    codebook_size: int,
    num_groups: int | None = 1,
    codebook_rank: int | None = None,
    group_sizes: Sequence[int] | None = None,
    group_ranks: Sequence[int] | None = None,
    codebook_dim: int | None = None,
) -> tuple[list[int], list[int]]:
    """Validate a group layout and return ``(group_sizes, group_ranks)`` as lists.

    Uniform groups (appendix B) split ``codebook_size`` evenly over ``num_groups``; ``group_sizes`` and
    ``group_ranks`` give heterogeneous groups (Algorithm 1). Raises ValueError naming the bad argument.
    """
    if not _is_int(codebook_size) or codebook_size < 1:
        raise ValueError(f"`codebook_size` must be a positive int, got {codebook_size!r}.")
    if group_sizes is not None:
        sizes = list(group_sizes)
        if not sizes or not all(_is_int(s) and s > 0 for s in sizes):
            raise ValueError(f"`group_sizes` must be a non-empty list of positive ints, got {group_sizes!r}.")
        sizes = [int(s) for s in sizes]
        if num_groups is not None and (not _is_int(num_groups) or num_groups not in (1, len(sizes))):
            raise ValueError(
                f"`group_sizes` has {len(sizes)} entries but `num_groups`={num_groups!r}; they must agree "
                "(or leave `num_groups` unset)."
            )
        if sum(sizes) != codebook_size:
            raise ValueError(
                f"`group_sizes` must sum to `codebook_size`={codebook_size}, got sum {sum(sizes)} ({sizes})."
            )
    else:
        k = 1 if num_groups is None else num_groups
        if not _is_int(k) or k < 1:
            raise ValueError(f"`num_groups` must be a positive int, got {num_groups!r}.")
        if codebook_size % k:
            raise ValueError(
                f"`codebook_size`={codebook_size} is not divisible by `num_groups`={k}; "
                f"use a multiple of {k} or pass `group_sizes`."
            )
        sizes = [codebook_size // k] * k
    k = len(sizes)
    if group_ranks is not None:
        ranks = list(group_ranks)
        if len(ranks) != k:
            raise ValueError(
                f"`group_ranks` has {len(ranks)} entries but there are {k} groups (`group_sizes`/`num_groups`); "
                "they must have the same length."
            )
        if not all(_is_int(r) and r > 0 for r in ranks):
            raise ValueError(f"`group_ranks` must be positive ints, got {group_ranks!r}.")
        ranks = [int(r) for r in ranks]
    else:
        rank = codebook_dim if codebook_rank is None else codebook_rank
        if not _is_int(rank) or rank < 1:
            raise ValueError(f"`codebook_rank` must be a positive int, got {codebook_rank!r}.")
        ranks = [rank] * k
    return sizes, ranks


def fill_legacy_core_std(config: dict, overrides: dict | None = None) -> dict:
    """``config`` with ``core_std`` = ``LEGACY_CORE_STD`` when neither it nor ``overrides`` sets one: a config saved
    before the field existed was trained with N(0, I) cores, and every resize must draw from that distribution too.
    The one rule both shells' loaders and the configuration apply."""
    if "core_std" in config or "core_std" in (overrides or {}):
        return config
    return {**config, "core_std": LEGACY_CORE_STD}


def is_positive_int(value) -> bool:
    """A positive int that is not a bool (``True`` is an int to Python, never a count here)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_positive_int(name: str, value, allow_none: bool = False):
    """``value`` when it is a positive int (or None with ``allow_none``), else a ValueError naming ``name``: the one
    positive-int rule of the package."""
    if (allow_none and value is None) or is_positive_int(value):
        return value
    raise ValueError(f"`{name}` must be a positive int{' or None' if allow_none else ''}, got {value!r}.")


def group_offsets(group_sizes: Sequence[int]) -> list[int]:
    """Row where each group starts in the concatenated codebook, plus the total: group j is rows
    ``offsets[j]:offsets[j + 1]``."""
    offsets = [0]
    for n in group_sizes:
        offsets.append(offsets[-1] + int(n))
    return offsets


def split_codebook_size(new_size: int | Sequence[int], group_sizes: Sequence[int]) -> list[int]:
    """Per-group sizes for a resize: a list is taken as given, an int is split in proportion to ``group_sizes``."""
    k, total = len(group_sizes), sum(group_sizes)
    if isinstance(new_size, torch.Tensor) and new_size.ndim == 0 and not new_size.is_floating_point():
        new_size = int(new_size)
    if not _is_int(new_size):
        if not isinstance(new_size, Sequence) and not hasattr(new_size, "tolist"):
            raise ValueError(f"`new_size` must be an int or a list of {k} ints, got {type(new_size).__name__}.")
        sizes = new_size.tolist() if hasattr(new_size, "tolist") else list(new_size)
        if len(sizes) != k or not all(_is_int(s) and s > 0 for s in sizes):
            raise ValueError(f"`new_size` as a list needs {k} positive ints (one per group), got {new_size!r}.")
        return [int(size) for size in sizes]
    new_size = int(new_size)
    step = total // math.gcd(*group_sizes)
    if new_size < 1 or new_size % step:
        examples = ", ".join(str(step * m) for m in (1, 2, 4, 8))
        raise ValueError(
            f"`new_size`={new_size} does not split over the {k} groups in proportion to their sizes; "
            f"valid sizes are positive multiples of {step} (e.g. {examples}), or pass a list of {k} per-group sizes."
        )
    return [new_size * s // total for s in group_sizes]


@torch.no_grad()
def nearest_code_indices(
    z: torch.Tensor, codebook: torch.Tensor, max_block_elements: int | None = None
) -> torch.Tensor:
    """Index of the nearest code for each row of ``z`` (N, d) in ``codebook`` (n, d), by Eq. 1.

    ``argmin_i ||z - c_i||^2 = argmin_i (||c_i||^2 - 2 z . c_i)``. The (N, n) distance matrix is never held:
    codes are walked in blocks of up to ``SEARCH_CODE_BLOCK`` (their norms taken per block) and tokens in blocks
    of up to ``SEARCH_TOKEN_BLOCK``, each block of at most ``max(max_block_elements, 256)`` distances written into
    one reused buffer, with a running minimum per token (on a GPU the ``CUDA_SEARCH_*`` sizes, larger blocks for
    fewer launches). The extra memory is one block plus O(N), whatever the number of codes. Ties go to the lowest
    index.
    """
    n_tokens, n_codes = z.shape[0], codebook.shape[0]
    if n_codes == 0:
        raise ValueError(f"`codebook` must hold at least one code, got shape {tuple(codebook.shape)}.")
    on_gpu = z.device.type != "cpu"
    if max_block_elements is None:
        max_block_elements = CUDA_SEARCH_BLOCK_ELEMENTS if on_gpu else SEARCH_BLOCK_ELEMENTS
    max_tokens, max_codes = (CUDA_SEARCH_TOKEN_BLOCK, CUDA_SEARCH_CODE_BLOCK) if on_gpu else (SEARCH_TOKEN_BLOCK, SEARCH_CODE_BLOCK)
    min_tokens = max(1, min(n_tokens, SEARCH_MIN_TOKEN_BLOCK))
    code_block = max(1, min(n_codes, max_codes, max_block_elements // min_tokens))
    token_block = max(min_tokens, min(n_tokens, max_tokens, max_block_elements // code_block))
    buffer = torch.empty(token_block * code_block, dtype=z.dtype, device=z.device)
    best_val = torch.empty(n_tokens, dtype=z.dtype, device=z.device)
    best_idx = torch.empty(n_tokens, dtype=torch.long, device=z.device)
    for c_start in range(0, n_codes, code_block):
        codes = codebook[c_start : c_start + code_block]
        code_sq = codes.pow(2).sum(1)
        for t_start in range(0, n_tokens, token_block):
            z_blk = z[t_start : t_start + token_block]
            dist = buffer[: z_blk.shape[0] * codes.shape[0]].view(z_blk.shape[0], codes.shape[0])
            torch.addmm(code_sq, z_blk, codes.t(), alpha=-2, out=dist)
            val, idx = _block_argmin(dist)
            if c_start == 0:
                best_val[t_start : t_start + token_block] = val
                best_idx[t_start : t_start + token_block] = idx
            else:  # strictly smaller only: on a tie the earlier (lower-index) block keeps the token
                old_val = best_val[t_start : t_start + token_block]
                old_idx = best_idx[t_start : t_start + token_block]
                better = val < old_val
                old_val.copy_(torch.where(better, val, old_val))
                old_idx.copy_(torch.where(better, idx + c_start, old_idx))
    return best_idx


def _block_argmin(dist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise ``(min, argmin)`` of a distance block, ties (and NaN, like ``torch.min``) to the lowest column.

    On CPU ``torch.min(dim)`` with indices walks one element at a time while ``amin`` is vectorised, so wide
    blocks are cut into runs of ``ARGMIN_RUN`` columns: ``amin`` per run, the first run holding the row minimum,
    then the first column of that run holding it. The result equals ``dist.min(1)``, at a fraction of the cost.
    """
    rows, cols = dist.shape
    if dist.device.type != "cpu" or cols % ARGMIN_RUN or cols < 4 * ARGMIN_RUN:
        return dist.min(1)
    runs = dist.view(rows, cols // ARGMIN_RUN, ARGMIN_RUN)
    values, run = runs.amin(2).min(1)
    inner = runs[torch.arange(rows, device=dist.device), run].argmin(1)
    return values, run * ARGMIN_RUN + inner


def code_counts(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Hits per code (codebook_size,) int64 of code ``indices`` (any shape, all in [0, codebook_size)).

    Unlike ``torch.bincount``, which on a GPU reads the largest index back to size its output, this never waits
    for the device: a forward stays asynchronous."""
    flat = indices.detach().flatten().long()
    counts = torch.zeros(codebook_size, dtype=torch.long, device=flat.device)
    return counts.index_add_(0, flat, torch.ones_like(flat))


def code_perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp of the entropy of the code frequencies, from per-code hit ``counts`` (n,), in float64 (a 0-d tensor on
    ``counts``' device); NaN when nothing was hit. The one perplexity of the package (forward outputs, statistics).
    Computed without reading anything back from the device (codes never hit add 0 * log 0 = 0)."""
    counts = counts.detach().flatten().double()
    p = counts / counts.sum()  # all NaN when nothing was hit
    return (-torch.special.xlogy(p, p).sum()).exp()


def usage_statistics(
    counts: torch.Tensor, group_sizes: Sequence[int] | None = None, num_tokens: int | None = None
) -> dict:
    """Usage of a codebook from its per-code hit ``counts`` (n,), in float64: the one implementation behind the
    quantizer's getters, the ``CodebookUsage`` metric, training's logs and the analysis figures (Fig. 5 right).

    Returns ``codebook_usage`` (fraction of the codes hit at least once), ``num_tokens`` (the hits: ``counts.sum()``
    unless given), ``perplexity`` (exp of the entropy of the code frequencies; NaN when nothing was hit) and, with
    ``group_sizes`` (codes per group, in codebook order), ``group_usage`` (per group, the fraction of its codes hit;
    None for a group of no code) and ``group_frequency`` (per group, its share of the ``num_tokens`` hits). Pass
    ``num_tokens`` when ``counts`` are part of a codebook (e.g. each group's trained codes) so that the shares are
    of all hits.
    """
    counts = counts.detach().flatten().long().cpu()
    total = int(counts.sum())
    num_tokens = total if num_tokens is None else int(num_tokens)
    stats = {"codebook_usage": float((counts > 0).double().mean()) if counts.numel() else None, "num_tokens": num_tokens}
    stats["perplexity"] = float(code_perplexity(counts))
    if group_sizes is not None:
        chunks = counts.split(list(group_sizes))
        stats["group_usage"] = [float((c > 0).double().mean()) if c.numel() else None for c in chunks]
        stats["group_frequency"] = [int(c.sum()) / max(num_tokens, 1) for c in chunks]
    return stats



def check_trained_group_sizes(trained: Sequence[int] | None, group_sizes: Sequence[int]) -> list[int] | None:
    """`trained_group_sizes` as a list of ints: one integer count per group (Python or numpy ints, no bools or
    floats) with 0 <= count <= group size, else ValueError."""
    if trained is None:
        return None
    counts = list(trained)
    valid = all(_is_int(t) for t in counts)
    if not valid or len(counts) != len(group_sizes) or any(not 0 <= t <= n for t, n in zip(counts, group_sizes)):
        raise ValueError(
            f"`trained_group_sizes` needs one count per group with 0 <= count <= group size {list(group_sizes)}, "
            f"got {trained!r}."
        )
    return [int(t) for t in counts]



def sum_across_processes(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes when torch.distributed is initialised (NCCL needs CUDA tensors)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    buffer = tensor.to(device).clone()
    dist.all_reduce(buffer)
    return buffer.to(tensor.device)


class GroupVectorQuantizer(nn.Module):
    """Vector quantizer whose codebook is ``k`` groups ``G_j = core_j @ W_j + b_j`` (paper Eq. 7).

    Implements diffusers' ``VectorQuantizer`` interface: ``forward(z)`` with ``z`` of shape (B, C, H, W) returns
    ``(z_q, loss, (perplexity, None, indices))`` with ``indices`` of shape (B, H, W); ``get_codebook_entry``.

    Storage: uniform groups (same size and rank) keep one ``core`` buffer (k, n/k, r), ``weight`` (k, r, d) and
    ``bias`` (k, d), generated with one batched matmul (appendix B, each group with its own core). Heterogeneous
    groups keep ``core_{j}`` (n_j, r_j) and ``weight_{j}`` (r_j, d) per group and the same stacked ``bias``.
    Projector "mlp" (one hidden layer of width d, Table 3) adds ``mlp_in_weight`` (k, r, d) / ``mlp_in_weight_{j}``,
    ``mlp_in_bias`` (k, d) and ``mlp_out_weight`` (k, d, d); "linear+mlp" sums both branches.

    Loss weights (``commitment_beta``): the loss is ``commitment_beta * ||z - sg(q)||^2 + ||sg(z) - q||^2``, so
    ``commitment_beta`` weights the encoder (commitment) term and the codebook term is weighted 1. The paper's Eq. 3
    writes ``beta ||Q - sg[Z]||^2 + gamma ||Z - sg[Q]||^2``: our ``commitment_beta`` is its gamma, with its beta = 1.

    Usage counting is explicit: a forward adds its code hits to the counters only inside
    ``with quantizer.counting_usage():`` (whatever the mode; the flag is restored on exit, ``counting_usage(False)``
    pauses counting) or while ``track_usage`` is True; ``track_usage`` is False by default, and None counts
    training-mode forwards only. The getters read this process's counters; the all-reduce over processes is opt-in
    (``sync=True``, which every rank must call).
    """

    def __init__(
        self,
        codebook_size: int,
        codebook_dim: int,
        num_groups: int = 1,
        codebook_rank: int | None = None,
        group_sizes: Sequence[int] | None = None,
        group_ranks: Sequence[int] | None = None,
        projector: str = "linear",
        commitment_beta: float = 0.25,
        core_std: float | None = None,
    ):
        """``commitment_beta``: weight of the commitment (encoder) term ``||z - sg(q)||^2``; the codebook term
        ``||sg(z) - q||^2`` has weight 1 (the paper's Eq. 3 gamma, with its beta = 1; see ``quantize_tokens``)."""
        super().__init__()
        if not _is_int(codebook_dim) or codebook_dim < 1:
            raise ValueError(f"`codebook_dim` must be a positive int, got {codebook_dim!r}.")
        if projector not in PROJECTORS:
            raise ValueError(f"`projector` must be one of {PROJECTORS}, got {projector!r}.")
        commitment_beta = check_number("commitment_beta", commitment_beta)
        sizes, ranks = resolve_groups(codebook_size, num_groups, codebook_rank, group_sizes, group_ranks, codebook_dim)
        self.codebook_dim = codebook_dim
        self.projector = projector
        self.commitment_beta = commitment_beta
        self.core_std = default_core_std(codebook_dim) if core_std is None else check_core_std(core_std)
        self.check_finite = True  # raise on NaN/inf latents (one reduction per forward); False skips the check
        self.track_usage: bool | None = False  # count only inside counting_usage() (see the class docstring)
        self._usage_counts: torch.Tensor | None = None  # plain attribute: DDP must not broadcast it
        self._storage: list[str] = []
        k, d = len(sizes), codebook_dim
        self.bias = nn.Parameter(torch.zeros(k, d))
        if self.has_mlp:
            self.mlp_in_bias = nn.Parameter(torch.zeros(k, d))
            self.mlp_out_weight = nn.Parameter(torch.empty(k, d, d))
        cores = [self._draw_core(n, r) for n, r in zip(sizes, ranks)]
        self._set_groups(cores, self._split_rank_params("weight", ranks), self._split_rank_params("mlp_in_weight", ranks))
        self.reset_parameters()

    # ----------------------------------------------------------------------------------------- layout
    def _draw_core(self, rows: int, rank: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``rows`` fresh core rows from P = N(0, core_std^2 I) (on the CPU; 1.0 leaves the N(0, I) draw bit-exact)."""
        core = torch.randn(rows, rank, generator=generator)
        return core if self.core_std == 1.0 else core.mul_(self.core_std)

    @property
    def has_linear(self) -> bool:
        return self.projector in ("linear", "linear+mlp")

    @property
    def has_mlp(self) -> bool:
        return self.projector in ("mlp", "linear+mlp")

    @property
    def num_groups(self) -> int:
        return self.bias.shape[0]

    @property
    def group_sizes(self) -> list[int]:
        if self.uniform:
            return [self.core.shape[1]] * self.core.shape[0]
        return [getattr(self, f"core_{j}").shape[0] for j in range(self.num_groups)]

    @property
    def group_ranks(self) -> list[int]:
        return [core.shape[1] for core in self.cores()]

    @property
    def codebook_size(self) -> int:
        return sum(self.group_sizes)

    @property
    def group_offsets(self) -> list[int]:
        """Row where each group starts in ``codebook()``, plus the total (see [`group_offsets`])."""
        return group_offsets(self.group_sizes)

    def cores(self) -> list[torch.Tensor]:
        """The frozen cores, one (n_j, r_j) tensor per group."""
        if self.uniform:
            return list(self.core.unbind(0))
        return [getattr(self, f"core_{j}") for j in range(self.num_groups)]

    def _rank_params(self, name: str) -> list[torch.Tensor]:
        if self.uniform:
            return list(getattr(self, name).unbind(0))
        return [getattr(self, f"{name}_{j}") for j in range(self.num_groups)]

    def _split_rank_params(self, name: str, ranks: Sequence[int]) -> list[torch.Tensor] | None:
        wanted = (name == "weight" and self.has_linear) or (name == "mlp_in_weight" and self.has_mlp)
        if not wanted:
            return None
        if self._storage and hasattr(self, name if self.uniform else f"{name}_0"):
            return [p.detach().clone() for p in self._rank_params(name)]
        return [torch.empty(r, self.codebook_dim) for r in ranks]

    def _set_groups(self, cores, weights, mlp_in_weights) -> None:
        """(Re)build the per-group storage from per-group tensors, choosing the batched layout when possible."""
        for name in self._storage:
            delattr(self, name)
        self._storage = []
        device = self.bias.device
        self.uniform = len({tuple(c.shape) for c in cores}) == 1

        def add(name, tensors, buffer=False):
            if tensors is None:
                return
            if self.uniform:
                items = [(name, torch.stack(tensors).to(device))]
            else:
                items = [(f"{name}_{j}", t.to(device)) for j, t in enumerate(tensors)]
            for key, value in items:
                if buffer:
                    self.register_buffer(key, value.contiguous(), persistent=True)
                else:
                    # a resize makes new Parameters (rebuild optimizers after it); frozen stays frozen
                    setattr(self, key, nn.Parameter(value.contiguous(), requires_grad=self.bias.requires_grad))
                self._storage.append(key)

        add("core", cores, buffer=True)
        add("weight", weights)
        add("mlp_in_weight", mlp_in_weights)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise the projectors like ``nn.Linear`` (U(+-1/sqrt(fan_in))) and zero the biases; cores untouched."""
        for name in ("weight", "mlp_in_weight"):
            if (name == "weight" and self.has_linear) or (name == "mlp_in_weight" and self.has_mlp):
                for param, rank in zip(self._rank_params(name), self.group_ranks):
                    nn.init.uniform_(param, -(rank**-0.5), rank**-0.5)
        nn.init.zeros_(self.bias)
        if self.has_mlp:
            nn.init.zeros_(self.mlp_in_bias)
            nn.init.uniform_(self.mlp_out_weight, -(self.codebook_dim**-0.5), self.codebook_dim**-0.5)

    # ----------------------------------------------------------------------------------------- codebook
    def _project(self, core, j=None):
        """Apply group projectors to cores (Eq. 7 / Eq. 10): batched over all groups when ``j`` is None."""
        sl = slice(None) if j is None else slice(j, j + 1)
        bias = self.bias[sl].unsqueeze(1)
        if self.has_linear:
            weight = self.weight if j is None else getattr(self, f"weight_{j}").unsqueeze(0)
            codes = torch.baddbmm(bias, core, weight)
        else:
            codes = bias
        if self.has_mlp:
            w_in = self.mlp_in_weight if j is None else getattr(self, f"mlp_in_weight_{j}").unsqueeze(0)
            hidden = F.relu(torch.baddbmm(self.mlp_in_bias[sl].unsqueeze(1), core, w_in))
            codes = codes + torch.bmm(hidden, self.mlp_out_weight[sl])
        return codes

    def codebook(self) -> torch.Tensor:
        """The (n, d) codebook: groups concatenated in order (Algorithm 1, line 7)."""
        if self.uniform:
            return self._project(self.core).reshape(-1, self.codebook_dim)
        return torch.cat([self._project(core.unsqueeze(0), j)[0] for j, core in enumerate(self.cores())])

    def group_of(self, indices: torch.Tensor) -> torch.Tensor:
        """Group index of each code index."""
        bounds = torch.tensor(self.group_offsets[1:-1], device=indices.device)
        return torch.bucketize(indices, bounds, right=True)

    # ----------------------------------------------------------------------------------------- quantize
    def _check_indices(self, indices: torch.Tensor, name: str = "indices") -> None:
        if not isinstance(indices, torch.Tensor) or indices.dtype.is_floating_point or indices.dtype.is_complex:
            raise ValueError(f"`{name}` must be an integer tensor of code indices, got {getattr(indices, 'dtype', type(indices))}.")
        if indices.dtype == torch.bool:
            raise ValueError(f"`{name}` must be an integer tensor of code indices, got torch.bool.")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(
                f"`{name}` must lie in [0, {self.codebook_size - 1}] (codebook_size={self.codebook_size}), "
                f"got values in [{int(indices.min())}, {int(indices.max())}]."
            )

    def quantize_tokens(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantise token rows ``z`` (N, d). Returns ``(z_q, loss, indices)`` (Eq. 1-3), computed in fp32.

        ``z_q = z + sg(q - z)`` (Eq. 2); ``loss = commitment_beta * ||z - sg(q)||^2 + ||sg(z) - q||^2`` (each a mean
        of squares): the commitment (encoder) term weighted ``commitment_beta`` plus the codebook term weighted 1,
        i.e. Eq. 3 without its reconstruction term, with the paper's (beta, gamma) = (1, ``commitment_beta``).
        Adds the hits to the usage counters when counting (see ``track_usage``).
        """
        if self.check_finite and z.numel() and not bool(torch.isfinite(z).all()):
            bad = int((~torch.isfinite(z)).any(-1).sum())
            raise ValueError(
                f"The latents `z` given to the quantizer hold NaN or inf in {bad} of {z.shape[0]} tokens (is the input "
                "image finite?); they have no nearest code. Set `quantizer.check_finite = False` to skip this check."
            )
        with torch.autocast(device_type=z.device.type, enabled=False):
            z32 = z.float()
            codebook = self.codebook().float()
            indices = nearest_code_indices(z32.detach(), codebook.detach())
            q = F.embedding(indices, codebook)
            loss = self.commitment_beta * F.mse_loss(z32, q.detach()) + F.mse_loss(z32.detach(), q)
            z_q = z32 + (q - z32).detach()
        if self.counts_usage:
            self._update_usage(indices)
        return z_q.to(z.dtype), loss, indices

    def forward(self, z: torch.Tensor):
        if not isinstance(z, torch.Tensor) or z.ndim != 4 or z.shape[1] != self.codebook_dim:
            raise ValueError(
                f"`z` must have shape (batch, {self.codebook_dim}, height, width) (codebook_dim={self.codebook_dim}), "
                f"got {tuple(z.shape) if isinstance(z, torch.Tensor) else type(z)}."
            )
        b, c, h, w = z.shape
        z_q, loss, indices = self.quantize_tokens(z.permute(0, 2, 3, 1).reshape(-1, c))
        z_q = z_q.view(b, h, w, c).permute(0, 3, 1, 2).contiguous()
        return z_q, loss, (self.perplexity(indices), None, indices.view(b, h, w))

    def perplexity(self, indices: torch.Tensor) -> torch.Tensor:
        """exp(entropy) of the code distribution of ``indices`` ([`code_perplexity`]), as float32."""
        return code_perplexity(code_counts(indices, self.codebook_size)).float()

    def get_codebook_entry(self, indices: torch.Tensor, shape: Sequence[int] | None = None) -> torch.Tensor:
        """Codes for ``indices``; with ``shape`` = (B, H, W, C) the result is (B, C, H, W), as diffusers expects."""
        self._check_indices(indices)
        codes = F.embedding(indices.long(), self.codebook())
        if shape is not None:
            shape = tuple(int(s) for s in shape)
            if len(shape) != 4 or shape[-1] != self.codebook_dim or math.prod(shape[:3]) != indices.numel():
                raise ValueError(
                    f"`shape` must be (batch, height, width, {self.codebook_dim}) with batch*height*width equal to the "
                    f"{indices.numel()} indices, got {shape}."
                )
            codes = codes.view(shape).permute(0, 3, 1, 2).contiguous()
        return codes

    # ----------------------------------------------------------------------------------------- usage
    @torch.no_grad()
    def _update_usage(self, indices: torch.Tensor) -> None:
        counts = code_counts(indices, self.codebook_size)
        current = self._usage_counts
        if current is None or current.is_meta or current.shape != counts.shape:
            self._usage_counts = counts
        else:
            self._usage_counts = current.to(counts.device) + counts

    @property
    def counts_usage(self) -> bool:
        """Whether a forward now adds its hits to the counters: ``track_usage`` (False by default, True inside
        ``counting_usage()``), or when None, training mode."""
        return self.training if self.track_usage is None else bool(self.track_usage)

    @contextlib.contextmanager
    def counting_usage(self, enabled: bool = True) -> Iterator[GroupVectorQuantizer]:
        """Count code hits inside the block (``enabled=False``: never count there), in any mode; ``track_usage`` is
        restored on exit, whatever happens inside."""
        previous, self.track_usage = self.track_usage, bool(enabled)
        try:
            yield self
        finally:
            self.track_usage = previous

    def reset_usage(self) -> None:
        """Forget all hit counts."""
        self._usage_counts = None

    def usage_counts(self, sync: bool = False) -> torch.Tensor:
        """Per-code hit counts (n,) since the last reset: this process's, or with ``sync=True`` summed over the
        processes of an initialised ``torch.distributed`` group (a collective: every rank must call it)."""
        counts = self._usage_counts
        if counts is None or counts.is_meta or counts.shape[0] != self.codebook_size:
            counts = torch.zeros(self.codebook_size, dtype=torch.long, device=self.bias.device)
        counts = counts.clone()
        return sum_across_processes(counts) if sync else counts

    def usage_statistics(self, sync: bool = False) -> dict:
        """[`usage_statistics`] of the counters since the last reset: ``codebook_usage``, ``num_tokens``,
        ``perplexity``, ``group_usage``, ``group_frequency``; ``sync`` as in ``usage_counts``."""
        return usage_statistics(self.usage_counts(sync), self.group_sizes)

    def codebook_usage(self, sync: bool = False) -> float:
        """Fraction of codes hit at least once since the last reset (``usage_statistics``; ``sync`` as there)."""
        return self.usage_statistics(sync)["codebook_usage"]

    def group_usage(self, sync: bool = False) -> list[float]:
        """Per group, the fraction of its codes hit at least once (``usage_statistics``; ``sync`` as there)."""
        return self.usage_statistics(sync)["group_usage"]

    def group_frequency(self, sync: bool = False) -> list[float]:
        """Per group, its share of all hits (Fig. 5 right; ``usage_statistics``; ``sync`` as there)."""
        return self.usage_statistics(sync)["group_frequency"]

    # ----------------------------------------------------------------------------------------- resize
    @torch.no_grad()
    def resize_codebook(
        self, new_size: int | Sequence[int], mode: str = "extend", seed: int | None = None
    ) -> list[int]:
        """Resize without training (Algorithm 2); returns the new group sizes.

        ``mode="extend"`` (self-extension) keeps every trained core row bit-for-bit and appends rows newly drawn from
        the model's P = N(0, core_std^2 I) at the end of each group (Eq. 11); ``mode="resample"`` redraws every core at
        the new size from the same P. A size whose cores and codebook would not fit in memory is refused first.
        ``new_size`` is an int, split over groups in proportion to their current sizes, or a per-group list.
        Projectors keep their values, as new Parameter objects (rebuild any optimizer). Seeded resizes are reproducible; the draw happens on the CPU.
        """
        if mode not in RESIZE_MODES:
            raise ValueError(f"`mode` must be one of {RESIZE_MODES}, got {mode!r}.")
        old_sizes, ranks = self.group_sizes, self.group_ranks
        sizes = split_codebook_size(new_size, old_sizes)
        if mode == "extend":
            shrunk = [j for j, (new, old) in enumerate(zip(sizes, old_sizes)) if new < old]
            if shrunk:
                raise ValueError(
                    f"`mode`='extend' keeps every trained code, so no group may shrink; group(s) {shrunk} would go "
                    f"from {[old_sizes[j] for j in shrunk]} to {[sizes[j] for j in shrunk]} codes. Use mode='resample'."
                )
        self._check_resize_memory(sizes, ranks)
        seed = check_seed(seed)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        old_cores = self.cores()
        cores = []
        for j, (n_new, rank) in enumerate(zip(sizes, ranks)):
            dtype = old_cores[j].dtype
            if mode == "extend":
                fresh = self._draw_core(n_new - old_sizes[j], rank, generator).to(dtype)
                cores.append(torch.cat([old_cores[j].detach().cpu(), fresh]))
            else:
                cores.append(self._draw_core(n_new, rank, generator).to(dtype))
        self._set_groups(cores, self._split_rank_params("weight", ranks), self._split_rank_params("mlp_in_weight", ranks))
        self.reset_usage()
        return sizes

    def _check_resize_memory(self, sizes: Sequence[int], ranks: Sequence[int]) -> None:
        """Refuse, before allocating, a resize whose new cores plus codebook exceed the memory of this machine (CPU,
        where cores are drawn) or the free memory of the quantizer's GPU."""
        itemsize = self.bias.element_size()
        core_bytes = sum(n * r for n, r in zip(sizes, ranks)) * itemsize
        codebook_bytes = sum(sizes) * self.codebook_dim * itemsize
        limits = {}
        try:
            limits["CPU memory"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # no sysconf (Windows): no CPU limit known
            pass
        if self.bias.device.type == "cuda":
            limits["free GPU memory"] = torch.cuda.mem_get_info(self.bias.device)[0]
        needed = core_bytes + codebook_bytes
        for where, limit in limits.items():
            if needed > limit:
                raise ValueError(
                    f"`new_size`={sum(sizes)} codes would need {needed / 2**30:.1f} GiB for the new cores and codebook "
                    f"(ranks {sorted(set(ranks))}, d={self.codebook_dim}), more than the {limit / 2**30:.1f} GiB of {where}."
                )

    def extra_repr(self) -> str:
        sizes = self.group_sizes
        layout = f"{len(sizes)}x{sizes[0]}" if self.uniform else str(sizes)
        return (
            f"codebook_size={self.codebook_size}, codebook_dim={self.codebook_dim}, groups={layout}, "
            f"ranks={sorted(set(self.group_ranks))}, projector={self.projector!r}, beta={self.commitment_beta}, "
            f"core_std={self.core_std:.4g}"
        )
