"""Codebook statistics and figures of the paper's section 4.2 and appendix D, for any Group-VQ model.

- Fig. 5 left: mean and variance of the l2 norm of the codes in each group (`norm_statistics`).
- Fig. 5 right: each group's share of all code hits on a dataset (`usage_statistics`, `count_code_usage`).
- Fig. 6: heatmap of the pairwise cosine similarity of codes sampled from each group (`cosine_similarity_statistics`).
- Fig. 7: codes and group biases b_j randomly projected onto 2-D (`random_projection_matrix`).
- Fig. 9: the same with PCA of the standardised codebook (`pca_projection`).

After a self-extension (`resize_codebook(..., mode="extend")`, Eq. 11) each group j keeps its trained codes first
and the newly sampled ones after them; pass the trained group sizes and every statistic and figure is also split
into trained and new codes. Statistics are plain numbers (JSON-ready); figures are ``matplotlib.figure.Figure``
objects drawn with the Agg canvas, never through pyplot, so no global backend or figure state is touched.
``analyze_codebook`` computes all of it, ``save_analysis`` writes the PNGs and the JSON.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..fileio import atomic_file
from ..quantizer import (
    check_positive_int,
    code_counts,
    check_trained_group_sizes,
    group_offsets,
    is_positive_int,
    split_codebook_size,
)
from ..quantizer import usage_statistics as codebook_usage_statistics

# Paper sample counts: Fig. 6 picks 128 codes per group; Fig. 7/9 (a) 256 per highlighted group, (b) 64 per group.
HEATMAP_CODES_PER_GROUP = 128
HEATMAP_MAX_CODES = 2048  # the paper's 16 groups x 128; more groups get fewer codes each so the matrix stays small
SCATTER_CODES_PER_GROUP = 64
HIGHLIGHT_CODES_PER_GROUP = 256
FIGURE_NAMES = {
    "norm_statistics": "Fig. 5 (left): l2-norm mean and variance per group",
    "group_frequency": "Fig. 5 (right): usage frequency per group",
    "cosine_similarity": "Fig. 6: pairwise cosine similarity of sampled codes",
    "random_projection": "Fig. 7: random 2-D projection of codes and group biases",
    "pca_projection": "Fig. 9: PCA of the standardised codes and group biases",
}
JSON_NAME = "codebook_analysis.json"


# ============================================================================================ layout helpers
def _unwrap(model):
    """The model inside a DistributedDataParallel / accelerate wrapper (``.module``), else the model itself."""
    return getattr(model, "module", model)


def _get_quantizer(model_or_quantizer):
    model_or_quantizer = _unwrap(model_or_quantizer)
    quantizer = getattr(model_or_quantizer, "quantizer", model_or_quantizer)
    if not (hasattr(quantizer, "codebook") and hasattr(quantizer, "group_sizes") and hasattr(quantizer, "bias")):
        raise ValueError(
            "`model` must be a GroupVQModel (with a `.quantizer`) or a GroupVectorQuantizer, "
            f"got {type(model_or_quantizer).__name__}."
        )
    return quantizer


def _check_group_sizes(group_sizes: Sequence[int], n: int | None = None, name: str = "group_sizes") -> list[int]:
    sizes = [int(s) for s in group_sizes]
    if not sizes or any(s < 1 for s in sizes):
        raise ValueError(f"`{name}` must be a non-empty list of positive ints, got {list(group_sizes)!r}.")
    if n is not None and sum(sizes) != n:
        raise ValueError(f"`{name}` must sum to the number of codes {n}, got sum {sum(sizes)} ({sizes}).")
    return sizes


def resolve_trained_group_sizes(trained: int | Sequence[int] | None, group_sizes: Sequence[int]) -> list[int] | None:
    """Per-group number of trained codes of a self-extended codebook, or None when not given.

    ``trained`` is the training-time codebook size (an int, split over the groups in proportion to their current
    sizes, which is how an int self-extension grew them) or a per-group list. Each group j holds its trained codes
    first and its newly sampled ones after them (Eq. 11), so ``0 <= trained_j <= n_j``.
    """
    if trained is None:
        return None
    sizes = list(group_sizes)
    if isinstance(trained, int) and not isinstance(trained, bool):
        if not 1 <= trained <= sum(sizes):
            raise ValueError(
                f"`trained_group_sizes` as a total must lie in [1, {sum(sizes)}] (the current codebook size), got {trained}."
            )
        try:
            return split_codebook_size(trained, sizes)
        except ValueError as err:
            raise ValueError(f"`trained_group_sizes`={trained} does not split over the groups: {err}") from None
    return check_trained_group_sizes(list(trained), sizes)


def new_code_mask(group_sizes: Sequence[int], trained_group_sizes: Sequence[int]) -> torch.Tensor:
    """Boolean (n,) mask, True for the newly sampled codes: rows ``offset_j + trained_j .. offset_j + n_j``."""
    return torch.cat(
        [torch.arange(n) >= t for n, t in zip(_check_group_sizes(group_sizes), trained_group_sizes)]
    )


def _group_labels(group_sizes: Sequence[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(group_sizes)), torch.tensor(list(group_sizes)))


def _mean_var(values: torch.Tensor) -> tuple[float | None, float | None]:
    if values.numel() == 0:
        return None, None
    return values.mean().item(), values.var(correction=0).item()


# ============================================================================================ statistics
@torch.no_grad()
def norm_statistics(
    codebook: torch.Tensor, group_sizes: Sequence[int], new_mask: torch.Tensor | None = None
) -> dict:
    """Mean and (population) variance of the l2 norm ``||c_i||`` of the codes in each group (Fig. 5 left).

    With ``new_mask`` (True = newly sampled code), also ``trained_mean``/``trained_var``/``new_mean``/``new_var``
    per group (None where a group has no such code).
    """
    sizes = _check_group_sizes(group_sizes, codebook.shape[0])
    norms = codebook.detach().float().cpu().norm(dim=1)
    stats = {"mean": [], "var": []}
    for chunk in norms.split(sizes):
        mean, var = _mean_var(chunk)
        stats["mean"].append(mean)
        stats["var"].append(var)
    if new_mask is not None:
        for kind, keep in (("trained", ~new_mask.cpu()), ("new", new_mask.cpu())):
            stats[f"{kind}_mean"], stats[f"{kind}_var"] = [], []
            for chunk, sel in zip(norms.split(sizes), keep.split(sizes)):
                mean, var = _mean_var(chunk[sel])
                stats[f"{kind}_mean"].append(mean)
                stats[f"{kind}_var"].append(var)
    return stats


@torch.no_grad()
def trained_new_usage_statistics(
    counts: torch.Tensor, group_sizes: Sequence[int], new_mask: torch.Tensor | None = None
) -> dict:
    """Per-group usage from per-code hit counts (n,) (Fig. 5 right): `groupvq_hf.quantizer.usage_statistics`
    (``codebook_usage``, ``num_tokens``, ``perplexity``, ``group_usage``, ``group_frequency``, as the quantizer's
    getters and the ``CodebookUsage`` metric return them) plus ``expected_frequency[j] = n_j / n``, the share under
    uniform code use. With ``new_mask``: ``trained_group_frequency``/``new_group_frequency`` (shares of all hits,
    summing to ``group_frequency``) and ``trained_group_usage``/``new_group_usage`` (None for a group without such
    codes).
    """
    counts = counts.detach().cpu().long().flatten()
    sizes = _check_group_sizes(group_sizes, counts.numel())
    stats = codebook_usage_statistics(counts, sizes)
    if math.isnan(stats["perplexity"]):  # no hit: JSON has no NaN
        stats["perplexity"] = None
    stats["expected_frequency"] = [n / sum(sizes) for n in sizes]
    if new_mask is not None:
        for kind, keep in (("trained", ~new_mask.cpu()), ("new", new_mask.cpu())):
            parts = [c[sel] for c, sel in zip(counts.split(sizes), keep.split(sizes))]
            part = codebook_usage_statistics(torch.cat(parts), [p.numel() for p in parts], stats["num_tokens"])
            stats[f"{kind}_group_frequency"], stats[f"{kind}_group_usage"] = part["group_frequency"], part["group_usage"]
    return stats


def _pixel_batches(batches: Iterable) -> Iterable[torch.Tensor]:
    for batch in batches:
        pixels = batch["pixel_values"] if isinstance(batch, dict) else batch
        if not isinstance(pixels, torch.Tensor):
            raise ValueError(
                "`batches` must yield (B, 3, H, W) tensors or dicts with 'pixel_values', "
                f"got {type(pixels).__name__}."
            )
        yield pixels


@torch.no_grad()
def count_code_usage(model, batches: Iterable, max_samples: int | None = None) -> tuple[torch.Tensor, int]:
    """Per-code hit counts (n,) of ``model.encode`` over ``batches`` of pixels in [-1, 1], and the image count.

    ``batches`` yields (B, 3, H, W) tensors or dicts with ``pixel_values`` (a DataLoader over
    ``groupvq_hf.data.build_image_dataset`` with ``collate_pixels``). Stops after ``max_samples`` images. The
    quantizer's own usage counters are left as they were (it does not count inside, `counting_usage(False)`).
    """
    check_positive_int("max_samples", max_samples, allow_none=True)
    model = _unwrap(model)
    quantizer = _get_quantizer(model)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    counts = torch.zeros(quantizer.codebook_size, dtype=torch.long)
    seen = 0
    was_training = model.training
    model.eval()
    try:
        for pixels in _pixel_batches(batches):
            if max_samples is not None:
                pixels = pixels[: max_samples - seen]
            if pixels.shape[0] == 0:  # a batch of undecodable images only (or max_samples reached: see below)
                continue
            with quantizer.counting_usage(False):
                indices = model.encode(pixels.to(device=device, dtype=dtype)).indices
            counts += code_counts(indices.cpu(), counts.numel())
            seen += pixels.shape[0]
            if max_samples is not None and seen >= max_samples:
                break
    finally:
        model.train(was_training)
    return counts, seen


def dataset_code_usage(
    model,
    dataset: str,
    split: str = "validation",
    resolution: int | None = None,
    image_column: str | None = None,
    max_samples: int | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    seed: int = 0,
) -> tuple[torch.Tensor, int]:
    """`count_code_usage` over the evaluation loader (`groupvq_hf.evaluation.build_eval_dataloader`: center
    crops; ``resolution`` defaults to ``model.config.sample_size``)."""
    from .evaluator import build_eval_dataloader

    loader = build_eval_dataloader(
        dataset, split, resolution or model.config.sample_size, batch_size, max_samples,
        image_column=image_column, num_workers=num_workers, seed=seed,
    )  # fmt: skip
    return count_code_usage(model, loader, max_samples=max_samples)


def sample_group_codes(
    group_sizes: Sequence[int], per_group: int, seed: int = 0, groups: Sequence[int] | None = None
) -> list[torch.Tensor]:
    """Sorted codebook indices of ``min(per_group, n_j)`` codes drawn without replacement from each group.

    Sorting keeps a group's trained codes before its newly sampled ones. ``groups`` restricts to some groups.
    """
    sizes = _check_group_sizes(group_sizes)
    check_positive_int("per_group", per_group)
    offsets = group_offsets(sizes)
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for j in range(len(sizes)) if groups is None else groups:
        draw = torch.randperm(sizes[j], generator=generator)[: min(per_group, sizes[j])]
        picked.append(draw.sort().values + offsets[j])
    return picked


def default_heatmap_codes_per_group(num_groups: int) -> int:
    """128 codes per group as in Fig. 6, fewer when there are more than 16 groups (at most 2048 codes in all)."""
    return max(1, min(HEATMAP_CODES_PER_GROUP, HEATMAP_MAX_CODES // num_groups))


def _pair_mean(sim: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, off_diagonal: torch.Tensor) -> float | None:
    sel = rows[:, None] & cols[None, :] & off_diagonal
    return sim[sel].mean().item() if sel.any() else None


@torch.no_grad()
def cosine_similarity_statistics(
    codebook: torch.Tensor,
    sampled: Sequence[torch.Tensor],
    new_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Pairwise cosine similarity of the ``sampled`` codes (one index tensor per group, concatenated) (Fig. 6).

    Returns the (m, m) matrix and a dict: ``group_pair_mean`` (k x k mean similarity between groups a and b,
    self-pairs excluded, None where a group has a single sampled code), ``within_group_mean``,
    ``between_group_mean``, and with ``new_mask`` the within-group means over trained-trained, new-new and
    trained-new pairs.
    """
    index = torch.cat(list(sampled)).cpu()
    codes = F.normalize(codebook.detach().float().cpu()[index], dim=1)
    sim = codes @ codes.t()
    k = len(sampled)
    labels = torch.repeat_interleave(torch.arange(k), torch.tensor([len(s) for s in sampled]))
    # Block sums over group pairs with one-hot labels; the diagonal (self-pairs) is taken out of the own-group blocks.
    onehot = F.one_hot(labels, k).double()
    sums = onehot.t() @ sim.double() @ onehot
    sums -= torch.diag(onehot.t() @ sim.diagonal().double())
    n = onehot.sum(0)
    pairs = torch.outer(n, n) - torch.diag(n)
    pair_mean = [[(sums[a, b] / pairs[a, b]).item() if pairs[a, b] > 0 else None for b in range(k)] for a in range(k)]
    within_n, total_n = pairs.diagonal().sum(), pairs.sum()
    within_sum = sums.diagonal().sum()
    stats = {
        "sampled_indices": [s.tolist() for s in sampled],
        "group_pair_mean": pair_mean,
        "within_group_mean": (within_sum / within_n).item() if within_n > 0 else None,
        "between_group_mean": ((sums.sum() - within_sum) / (total_n - within_n)).item() if total_n > within_n else None,
    }
    if new_mask is not None:
        is_new = new_mask.cpu()[index]
        within = (labels[:, None] == labels[None, :]) & ~torch.eye(len(index), dtype=torch.bool)
        stats["within_group_trained_trained_mean"] = _pair_mean(sim, ~is_new, ~is_new, within)
        stats["within_group_new_new_mean"] = _pair_mean(sim, is_new, is_new, within)
        stats["within_group_trained_new_mean"] = _pair_mean(sim, ~is_new, is_new, within)
    return sim, stats


def random_projection_matrix(dim: int, seed: int = 0) -> torch.Tensor:
    """A (dim, 2) Gaussian random projection with N(0, 1/2) entries (Johnson-Lindenstrauss; Fig. 7)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(dim, 2, generator=generator) / math.sqrt(2)


@dataclass
class PCAProjection:
    """Standardise with the codebook's per-dimension ``mean``/``std``, then project on ``components`` (d, 2)."""

    mean: torch.Tensor
    std: torch.Tensor
    components: torch.Tensor
    explained_variance_ratio: list[float]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.detach().float().cpu() - self.mean) / self.std) @ self.components


@torch.no_grad()
def pca_projection(codebook: torch.Tensor) -> PCAProjection:
    """PCA of all standardised codes (appendix D, Fig. 9): the two leading principal axes.

    Each dimension is standardised to zero mean and unit (population) variance over all codes; the axes are the
    top eigenvectors of the covariance, signed so each axis's largest-magnitude loading is positive.
    """
    x = codebook.detach().double().cpu()
    mean = x.mean(0)
    std = x.std(0, correction=0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    xs = (x - mean) / std
    cov = xs.t() @ xs / max(xs.shape[0], 1)
    eigvals, eigvecs = torch.linalg.eigh(cov)
    order = eigvals.argsort(descending=True)[:2]
    components = eigvecs[:, order]
    if components.shape[1] < 2:  # 1-D codes: pad a zero axis so the plot stays 2-D
        components = torch.cat([components, torch.zeros_like(components)], 1)
    signs = torch.sign(components.gather(0, components.abs().argmax(0, keepdim=True)))
    components = components * torch.where(signs == 0, torch.ones_like(signs), signs)
    total = eigvals.clamp_min(0).sum().item()
    ratio = [(eigvals[i].clamp_min(0).item() / total) if total > 0 else 0.0 for i in order.tolist()]
    ratio += [0.0] * (2 - len(ratio))
    return PCAProjection(mean.float(), std.float(), components.float(), ratio)


def select_highlight_groups(norm_stats: dict, usage_stats: dict | None = None) -> dict[str, int]:
    """The groups Fig. 7(a) singles out: smallest and largest norm variance, and the most used group
    (the largest mean norm when no usage is known)."""
    var = norm_stats["var"]
    chosen = {
        "smallest_norm_variance": min(range(len(var)), key=lambda j: var[j]),
        "largest_norm_variance": max(range(len(var)), key=lambda j: var[j]),
    }
    if usage_stats is not None:
        freq = usage_stats["group_frequency"]
        chosen["highest_frequency"] = max(range(len(freq)), key=lambda j: freq[j])
    else:
        mean = norm_stats["mean"]
        chosen["largest_norm_mean"] = max(range(len(mean)), key=lambda j: mean[j])
    return chosen


# ============================================================================================ figures
def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # Agg canvas on this figure only: no pyplot, no global backend switch
    return fig


def figure_to_png(fig: Figure, dpi: int = 100) -> bytes:
    """PNG bytes of a figure (for model cards, `wandb.Image(PIL.Image.open(io.BytesIO(...)))`, files)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def figure_to_array(fig: Figure, dpi: int = 100):
    """The figure as an (H, W, 3) uint8 numpy array, e.g. for TensorBoard ``add_image(..., dataformats="HWC")``."""
    import numpy as np

    fig.set_dpi(dpi)
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _group_ticks(ax, k: int, axis: str = "x", positions=None) -> None:
    step = max(1, math.ceil(k / 32))
    ticks = list(range(0, k, step))
    pos = ticks if positions is None else [positions[j] for j in ticks]
    getattr(ax, f"set_{axis}ticks")(pos, [str(j) for j in ticks], fontsize=8 if k > 16 else 10)


def plot_norm_statistics(stats: dict) -> Figure:
    """Fig. 5 left: per-group mean (top) and variance (bottom) of the code l2 norms; trained vs new when known."""
    k = len(stats["mean"])
    fig = _new_figure(max(6.0, 0.25 * k + 2), 5.5)
    axes = fig.subplots(2, 1, sharex=True)
    x = torch.arange(k).float()
    split = "trained_mean" in stats
    for ax, key, label in ((axes[0], "mean", "mean of $\\|c\\|_2$"), (axes[1], "var", "variance of $\\|c\\|_2$")):
        if split:
            width = 0.4
            for shift, kind, color in ((-0.2, "trained", "tab:blue"), (0.2, "new", "tab:orange")):
                vals = [float("nan") if v is None else v for v in stats[f"{kind}_{key}"]]
                ax.bar(x + shift, vals, width, color=color, label=f"{kind} codes")
            ax.legend(loc="best", fontsize=8)
        else:
            ax.bar(x, stats[key], 0.8, color="tab:blue" if key == "mean" else "tab:red", label=label)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    _group_ticks(axes[1], k)
    axes[1].set_xlabel("group")
    title = "Code l2 norm per group (Fig. 5 left)"
    fig.suptitle(title + ("\ntrained vs newly sampled codes" if split else ""))
    return fig


def plot_group_frequency(stats: dict) -> Figure:
    """Fig. 5 right: each group's share of all code hits, with the uniform share n_j / n; trained/new stacked."""
    k = len(stats["group_frequency"])
    fig = _new_figure(max(6.0, 0.25 * k + 2), 3.8)
    ax = fig.subplots()
    x = list(range(k))
    if "trained_group_frequency" in stats:
        trained = stats["trained_group_frequency"]
        ax.bar(x, trained, 0.8, color="tab:blue", label="trained codes")
        ax.bar(x, stats["new_group_frequency"], 0.8, bottom=trained, color="tab:orange", label="new codes")
    else:
        ax.bar(x, stats["group_frequency"], 0.8, color="tab:green", label="share of hits")
    ax.step(
        [j - 0.5 for j in x] + [k - 0.5], stats["expected_frequency"] + stats["expected_frequency"][-1:],
        where="post", color="black", linestyle="--", linewidth=1, label="uniform share $n_j/n$",
    )
    ax.set_xlabel("group")
    ax.set_ylabel("usage frequency")
    ax.grid(axis="y", alpha=0.3)
    _group_ticks(ax, k)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(f"Usage frequency per group (Fig. 5 right), {stats['num_tokens']:,} tokens")
    return fig


def plot_cosine_heatmap(sim: torch.Tensor, sampled: Sequence[torch.Tensor], new_mask: torch.Tensor | None = None) -> Figure:
    """Fig. 6: cosine-similarity heatmap, codes ordered by group with lines between groups; with ``new_mask``
    a strip along the top and left edges marks each row/column as a trained or a newly sampled code."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    fig = _new_figure(7.0, 6.2)
    ax = fig.subplots()
    m = sim.shape[0]
    image = ax.imshow(sim.numpy(), cmap="coolwarm", vmin=-1.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="cosine similarity", shrink=0.85)
    sizes = [len(s) for s in sampled]
    bounds = [0]
    for n in sizes:
        bounds.append(bounds[-1] + n)
    handles = []
    if len(sizes) <= 32:  # beyond that the lines would hide the blocks; the ticks still mark the groups
        for b in bounds[1:-1]:
            ax.axhline(b - 0.5, color="black", linewidth=0.6)
            ax.axvline(b - 0.5, color="black", linewidth=0.6)
        handles.append(Line2D([], [], color="black", linewidth=0.6, label="group boundary"))
    if new_mask is not None:
        kind = new_mask.cpu()[torch.cat(list(sampled))].float().numpy()
        strip = max(1.0, 0.025 * m)
        kinds = ListedColormap(["tab:blue", "tab:orange"])
        ax.imshow(kind[:, None], cmap=kinds, vmin=0, vmax=1, aspect="auto", interpolation="nearest",
                  extent=(-0.5 - strip, -0.5, m - 0.5, -0.5))
        ax.imshow(kind[None, :], cmap=kinds, vmin=0, vmax=1, aspect="auto", interpolation="nearest",
                  extent=(-0.5, m - 0.5, -0.5, -0.5 - strip))
        ax.set_xlim(-0.5 - strip, m - 0.5)
        ax.set_ylim(m - 0.5, -0.5 - strip)
        handles += [Patch(color="tab:blue", label="trained code"), Patch(color="tab:orange", label="newly sampled code")]
    centers = [(a + b - 1) / 2 for a, b in zip(bounds[:-1], bounds[1:])]
    _group_ticks(ax, len(sampled), "x", centers)
    _group_ticks(ax, len(sampled), "y", centers)
    ax.set_xlabel("group")
    ax.set_ylabel("group")
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.0, -0.08), ncol=3, fontsize=8, frameon=False)
    ax.set_title(f"Pairwise cosine similarity, up to {max(sizes)} random codes per group (Fig. 6)")
    return fig


def _group_colors(k: int):
    if k <= 10:
        cmap = colormaps["tab10"]
        return [cmap(j) for j in range(k)], None
    if k <= 20:
        cmap = colormaps["tab20"]
        return [cmap(j) for j in range(k)], None
    cmap = colormaps["viridis"]
    return [cmap(j / (k - 1)) for j in range(k)], cmap


def _scatter_groups(ax, points, labels, is_new, colors, groups, size):
    for j in groups:
        sel = labels == j
        for new, marker in ((False, "o"), (True, "x")):
            part = sel & (is_new if new else ~is_new)
            if part.any():
                xy = points[part]
                ax.scatter(xy[:, 0], xy[:, 1], s=size, marker=marker, color=colors[j], alpha=0.7, linewidths=0.8)


def plot_projection(
    project,
    codebook: torch.Tensor,
    bias: torch.Tensor,
    group_sizes: Sequence[int],
    highlight: dict[str, int],
    highlight_sampled: Sequence[torch.Tensor],
    scatter_sampled: Sequence[torch.Tensor],
    new_mask: torch.Tensor | None = None,
    method: str = "random projection",
    axis_labels: tuple[str, str] = ("projection 1", "projection 2"),
    figure_number: str = "7",
) -> Figure:
    """Fig. 7 / Fig. 9: (a) the highlighted groups, (b) a few codes of every group, (c) the group biases b_j,
    all through the same 2-D map ``project``; newly sampled codes drawn as crosses, trained ones as dots."""
    k = len(group_sizes)
    codebook = codebook.detach().float().cpu()
    labels_all = _group_labels(group_sizes)
    mask = torch.zeros(codebook.shape[0], dtype=torch.bool) if new_mask is None else new_mask.cpu()
    colors, cmap = _group_colors(k)
    fig = _new_figure(16.0, 5.4)
    axes = fig.subplots(1, 3)
    highlight_groups = list(dict.fromkeys(highlight.values()))

    idx = torch.cat(list(highlight_sampled))
    _scatter_groups(axes[0], project(codebook[idx]), labels_all[idx], mask[idx], colors, highlight_groups, 10)
    reasons = {}
    for reason, j in highlight.items():
        reasons.setdefault(j, []).append(reason.replace("_", " "))
    handles = [
        Line2D([], [], marker="o", linestyle="", color=colors[j], label=f"group {j} ({', '.join(reasons[j])})")
        for j in highlight_groups
    ]
    axes[0].set_title(f"(a) groups {', '.join(map(str, highlight_groups))}, up to {max(len(s) for s in highlight_sampled)} codes each")

    idx = torch.cat(list(scatter_sampled))
    _scatter_groups(axes[1], project(codebook[idx]), labels_all[idx], mask[idx], colors, range(k), 6)
    axes[1].set_title(f"(b) all {k} groups, up to {max(len(s) for s in scatter_sampled)} codes each")

    bias_xy = project(bias.detach().float().cpu())
    axes[2].scatter(bias_xy[:, 0], bias_xy[:, 1], s=40, color=colors, edgecolors="black", linewidths=0.5)
    if k <= 32:
        for j, (bx, by) in enumerate(bias_xy.tolist()):
            axes[2].annotate(str(j), (bx, by), textcoords="offset points", xytext=(4, 3), fontsize=8)
    axes[2].set_title("(c) group biases $b_j$ (centres)")

    if new_mask is not None:
        handles += [
            Line2D([], [], marker="o", linestyle="", color="gray", label="trained code"),
            Line2D([], [], marker="x", linestyle="", color="gray", label="newly sampled code"),
        ]
    axes[0].legend(handles=handles, loc="best", fontsize=8)
    if cmap is not None:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        fig.colorbar(ScalarMappable(Normalize(0, k - 1), cmap), ax=axes[1:], label="group", shrink=0.9)
    else:
        group_handles = [Line2D([], [], marker="o", linestyle="", color=colors[j], label=f"group {j}") for j in range(k)]
        axes[1].legend(handles=group_handles, loc="best", fontsize=7, ncol=2 if k > 8 else 1)
    for ax in axes:
        ax.set_xlabel(axis_labels[0])
        ax.set_ylabel(axis_labels[1])
        ax.grid(alpha=0.3)
    fig.suptitle(f"Codes and group biases, {method} onto 2-D (Fig. {figure_number})")
    return fig


# ============================================================================================ the whole analysis
@dataclass
class CodebookAnalysis:
    """The numbers (``stats``, JSON-ready) and the figures (name -> Figure, see ``FIGURE_NAMES``)."""

    stats: dict
    figures: dict[str, Figure] = field(default_factory=dict)

    def png(self, name: str, dpi: int = 100) -> bytes:
        if name not in self.figures:
            raise ValueError(f"`name` must be one of {sorted(self.figures)}, got {name!r}.")
        return figure_to_png(self.figures[name], dpi)


@torch.no_grad()
def analyze_codebook(
    model,
    usage_counts: torch.Tensor | None = None,
    trained_group_sizes: int | Sequence[int] | None = None,
    seed: int = 0,
    heatmap_codes_per_group: int | None = None,
    scatter_codes_per_group: int = SCATTER_CODES_PER_GROUP,
    highlight_codes_per_group: int = HIGHLIGHT_CODES_PER_GROUP,
    figures: bool = True,
) -> CodebookAnalysis:
    """All statistics and figures of section 4.2 / appendix D for a `GroupVQModel` or `GroupVectorQuantizer`.

    ``usage_counts``: per-code hit counts (n,) (from `count_code_usage` / `dataset_code_usage` or the quantizer's
    ``usage_counts()``); the frequency figure is made only when given. ``trained_group_sizes``: training-time
    codebook size (int) or per-group trained code counts, to split trained vs newly sampled codes; defaults to
    ``model.config.trained_group_sizes`` when the config has it. ``seed`` fixes the code samples and the random
    projection. ``heatmap_codes_per_group`` defaults to `default_heatmap_codes_per_group`.
    """
    model = _unwrap(model)
    quantizer = _get_quantizer(model)
    codebook = quantizer.codebook().detach().float().cpu()
    bias = quantizer.bias.detach().float().cpu()
    sizes = list(quantizer.group_sizes)
    k, (n, d) = len(sizes), codebook.shape
    if trained_group_sizes is None:
        trained_group_sizes = getattr(getattr(model, "config", None), "trained_group_sizes", None)
    trained = resolve_trained_group_sizes(trained_group_sizes, sizes)
    mask = None if trained is None else new_code_mask(sizes, trained)
    for name, value in (("scatter_codes_per_group", scatter_codes_per_group), ("highlight_codes_per_group", highlight_codes_per_group)):
        check_positive_int(name, value)
    per_heatmap = default_heatmap_codes_per_group(k) if heatmap_codes_per_group is None else heatmap_codes_per_group
    if not is_positive_int(per_heatmap):
        raise ValueError(f"`heatmap_codes_per_group` must be a positive int or None, got {heatmap_codes_per_group!r}.")
    if usage_counts is not None and (not isinstance(usage_counts, torch.Tensor) or usage_counts.numel() != n):
        got = tuple(usage_counts.shape) if isinstance(usage_counts, torch.Tensor) else type(usage_counts).__name__
        raise ValueError(f"`usage_counts` must be a tensor of {n} per-code hit counts, got {got}.")

    stats: dict = {
        "codebook_size": n,
        "codebook_dim": d,
        "num_groups": k,
        "group_sizes": sizes,
        "trained_group_sizes": trained,
        "seed": seed,
        "figures": dict(FIGURE_NAMES),
    }
    stats["norm"] = norm_statistics(codebook, sizes, mask)
    usage = None if usage_counts is None else trained_new_usage_statistics(usage_counts, sizes, mask)
    if usage is not None:
        stats["usage"] = usage
    else:
        del stats["figures"]["group_frequency"]

    heat_sampled = sample_group_codes(sizes, per_heatmap, seed)
    sim, stats["cosine_similarity"] = cosine_similarity_statistics(codebook, heat_sampled, mask)
    stats["cosine_similarity"]["codes_per_group"] = per_heatmap

    highlight = select_highlight_groups(stats["norm"], usage)
    highlight_groups = list(dict.fromkeys(highlight.values()))
    highlight_sampled = sample_group_codes(sizes, highlight_codes_per_group, seed + 1, groups=highlight_groups)
    scatter_sampled = sample_group_codes(sizes, scatter_codes_per_group, seed + 2)
    rp = random_projection_matrix(d, seed)
    pca = pca_projection(codebook)
    stats["highlight_groups"] = highlight
    stats["random_projection"] = {
        "seed": seed,
        "matrix": rp.tolist(),
        "bias_coordinates": (bias @ rp).tolist(),
        "codes_per_group": scatter_codes_per_group,
        "highlight_codes_per_group": highlight_codes_per_group,
    }
    stats["pca"] = {
        "explained_variance_ratio": pca.explained_variance_ratio,
        "components": pca.components.t().tolist(),
        "bias_coordinates": pca(bias).tolist(),
    }
    result = CodebookAnalysis(stats)
    if not figures:
        return result
    result.figures["norm_statistics"] = plot_norm_statistics(stats["norm"])
    if usage is not None:
        result.figures["group_frequency"] = plot_group_frequency(usage)
    result.figures["cosine_similarity"] = plot_cosine_heatmap(sim, heat_sampled, mask)
    common = dict(
        codebook=codebook, bias=bias, group_sizes=sizes, highlight=highlight,
        highlight_sampled=highlight_sampled, scatter_sampled=scatter_sampled, new_mask=mask,
    )
    result.figures["random_projection"] = plot_projection(
        lambda x: x @ rp, method="Gaussian random projection", figure_number="7", **common
    )
    r1, r2 = (100 * r for r in pca.explained_variance_ratio)
    result.figures["pca_projection"] = plot_projection(
        pca, method="PCA of the standardised codebook", figure_number="9",
        axis_labels=(f"PC1 ({r1:.1f}% of variance)", f"PC2 ({r2:.1f}% of variance)"), **common
    )
    return result


def save_analysis(analysis: CodebookAnalysis, output_dir: str | os.PathLike, dpi: int = 100) -> dict[str, str]:
    """Write every figure as ``<name>.png`` and the numbers as ``codebook_analysis.json`` (each file atomically);
    returns name -> path."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {}
    for name, fig in analysis.figures.items():
        paths[name] = os.path.join(output_dir, f"{name}.png")
        with atomic_file(paths[name]) as tmp:
            tmp.write_bytes(figure_to_png(fig, dpi))
    paths["json"] = os.path.join(output_dir, JSON_NAME)
    with atomic_file(paths["json"]) as tmp:
        tmp.write_text(json.dumps(analysis.stats, indent=1, allow_nan=False))
    return paths


# ============================================================================================ command line
def analysis_parser():
    """Arguments of ``scripts/analyze_codebook.py`` and the ``groupvq-analyze-codebook`` command."""
    import argparse

    p = argparse.ArgumentParser(
        description="""Figures and numbers of the paper's section 4.2 / appendix D for a Group-VQ model.

    python scripts/analyze_codebook.py --model PATH_OR_REPO --output_dir DIR \\
        [--dataset demo --split train --max_samples 256] [--trained_codebook_size 1024]

Writes norm_statistics.png (Fig. 5 left), group_frequency.png (Fig. 5 right, with --dataset),
cosine_similarity.png (Fig. 6), random_projection.png (Fig. 7), pca_projection.png (Fig. 9) and
codebook_analysis.json. All logic lives in `groupvq_hf.evaluation`.
""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="local folder or Hub repo id of a GroupVQModel")
    p.add_argument("--revision", default=None, help="Hub revision of --model")
    p.add_argument("--output_dir", required=True, help="where the PNGs and codebook_analysis.json go")
    p.add_argument("--dataset", default=None, help="dataset for the usage frequency (Fig. 5 right), as in groupvq_hf.data")
    p.add_argument("--split", default="validation")
    p.add_argument("--image_column", default=None)
    p.add_argument("--resolution", type=int, default=None, help="default: the model's config.sample_size")
    p.add_argument("--max_samples", type=int, default=None, help="images of --dataset to encode")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--dataloader_num_workers", type=int, default=0)
    trained = p.add_mutually_exclusive_group()
    trained.add_argument(
        "--trained_codebook_size", type=int, default=None,
        help="codebook size at training time, for a self-extended model: marks trained vs newly sampled codes",
    )
    trained.add_argument(
        "--trained_group_sizes", type=int, nargs="+", default=None,
        help="per-group trained code counts (instead of --trained_codebook_size)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the code samples and the random projection")
    p.add_argument("--heatmap_codes_per_group", type=int, default=None, help="default: 128, at most 2048 in all")
    p.add_argument("--scatter_codes_per_group", type=int, default=64)
    p.add_argument("--highlight_codes_per_group", type=int, default=256)
    p.add_argument("--dpi", type=int, default=120)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def analyze_main(argv: list[str] | None = None) -> dict[str, str]:
    """``scripts/analyze_codebook.py`` and the ``groupvq-analyze-codebook`` command: analyse a saved model (and, with
    ``--dataset``, its code usage there), write the figures and JSON; returns name -> path (also printed)."""
    import sys

    args = analysis_parser().parse_args(argv)
    from ..modeling_groupvq import GroupVQModel

    model = GroupVQModel.from_pretrained(args.model, revision=args.revision).to(args.device).eval()
    counts = None
    if args.dataset is not None:
        counts, num_images = dataset_code_usage(
            model, args.dataset, split=args.split, resolution=args.resolution, image_column=args.image_column,
            max_samples=args.max_samples, batch_size=args.batch_size, num_workers=args.dataloader_num_workers,
            seed=args.seed,
        )
        print(f"encoded {num_images} images of {args.dataset}/{args.split}", file=sys.stderr)
    analysis = analyze_codebook(
        model,
        usage_counts=counts,
        trained_group_sizes=args.trained_group_sizes or args.trained_codebook_size,
        seed=args.seed,
        heatmap_codes_per_group=args.heatmap_codes_per_group,
        scatter_codes_per_group=args.scatter_codes_per_group,
        highlight_codes_per_group=args.highlight_codes_per_group,
    )
    if counts is not None:
        analysis.stats["usage"].update(dataset=args.dataset, split=args.split, num_images=num_images)
    analysis.stats["model"] = args.model
    paths = save_analysis(analysis, args.output_dir, dpi=args.dpi)
    print(json.dumps(paths, indent=1))
    return paths


__all__ = [
    "CodebookAnalysis",
    "FIGURE_NAMES",
    "PCAProjection",
    "analysis_parser",
    "analyze_codebook",
    "analyze_main",
    "cosine_similarity_statistics",
    "count_code_usage",
    "dataset_code_usage",
    "default_heatmap_codes_per_group",
    "figure_to_array",
    "figure_to_png",
    "new_code_mask",
    "norm_statistics",
    "pca_projection",
    "plot_cosine_heatmap",
    "plot_group_frequency",
    "plot_norm_statistics",
    "plot_projection",
    "random_projection_matrix",
    "resolve_trained_group_sizes",
    "sample_group_codes",
    "save_analysis",
    "select_highlight_groups",
    "trained_new_usage_statistics",
]
