"""Reconstruction and codebook metrics as `evaluate` modules that stream: no image is kept between batches.

[`ReconstructionMetrics`] accumulates, as batches arrive, per-image PSNR / SSIM / LPIPS(VGG16) means and the
float64 Inception-v3 pool3 feature statistics of rFID (sums and sums of outer products, as torchmetrics'
``FrechetInceptionDistance`` keeps them). [`CodebookUsage`] accumulates code hit counts. Both are summed across
processes at ``compute()`` when ``torch.distributed`` is initialised (every rank must call ``compute``), so each
rank adds its own shard of the data. Neither touches the Hub: instantiate them directly.

Protocols: PSNR and SSIM are computed per image on RGB in [0, 1] (``data_range=1.0``, SSIM with the 11x11
Gaussian window, sigma 1.5, of Wang et al. 2004) and then averaged over images; LPIPS is the VGG16 variant of
Zhang et al. 2018, per image, averaged; rFID is the Frechet distance (Heusel et al. 2017) between the 2048-d
pool3 features of the original and the reconstructed images, both quantised to uint8 as images are saved.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import datasets
import evaluate
import numpy as np
import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.image.fid import FrechetInceptionDistance

from ..image_processing_groupvq import to_uint8
from ..quantizer import (  # the one computation of usage statistics (also the quantizer's getters)
    sum_across_processes,
    usage_statistics,
)

RECONSTRUCTION_METRICS = ("psnr", "ssim", "lpips", "rfid", "l1")
DATA_RANGE = 1.0  # PSNR / SSIM are computed on images scaled to [0, 1]

_CITATION = """\
@inproceedings{heusel2017gans, title={GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium}, author={Heusel, Martin and others}, booktitle={NeurIPS}, year={2017}}
@inproceedings{zhang2018unreasonable, title={The Unreasonable Effectiveness of Deep Features as a Perceptual Metric}, author={Zhang, Richard and others}, booktitle={CVPR}, year={2018}}
@article{wang2004image, title={Image quality assessment: from error visibility to structural similarity}, author={Wang, Zhou and others}, journal={IEEE TIP}, year={2004}}
"""

_RECON_INPUTS = """
Args:
    predictions: reconstructed images, float (N, 3, H, W) in [-1, 1] (the model's output; values outside are
        clipped) or uint8 (N, H, W, 3); a torch tensor or a numpy array.
    references: the original images, same shape and format as ``predictions``.
    metrics (compute only): names among "psnr", "ssim", "lpips", "rfid", "l1" to return (default: those accumulated).
Returns:
    dict with the requested keys: ``psnr`` (dB, mean of per-image PSNR), ``ssim`` (mean per-image SSIM),
    ``l1`` (mean absolute error on the [-1, 1] pixel scale, the training loss's L1; needs no network),
    ``lpips`` (mean per-image LPIPS(VGG16)), ``rfid`` (FID between references and predictions), and
    ``num_images``.
"""

_USAGE_INPUTS = """
Args:
    predictions: code indices, any shape (e.g. (B, h, w) from `GroupVQModel.encode`), ints in [0, codebook_size).
    codebook_size (compute or constructor): the number of codes.
    group_sizes (compute or constructor, optional): codes per group, in order; adds per-group results.
Returns:
    dict: ``codebook_usage`` (fraction of codes hit at least once over everything added), ``perplexity``
    (exp of the entropy of the code frequencies), ``num_tokens``; with ``group_sizes`` also ``group_usage`` (per
    group, fraction of its codes hit) and ``group_frequency`` (per group, its share of all hits).
"""


# ------------------------------------------------------------------------------------------------- inputs


def _as_tensor(images, name: str) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images
    if isinstance(images, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(images))
    if isinstance(images, (list, tuple)) and images:
        return torch.stack([_as_tensor(image, name) for image in images])
    raise ValueError(f"`{name}` must be a torch tensor or numpy array of images, got {type(images).__name__}.")


def to_unit_images(images, name: str = "images") -> torch.Tensor:
    """Float (N, 3, H, W) in [-1, 1] or uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [0, 1]."""
    images = _as_tensor(images, name)
    if images.dtype == torch.uint8:
        if images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"uint8 `{name}` must be (N, H, W, 3), got shape {tuple(images.shape)}.")
        return images.permute(0, 3, 1, 2).float() / 255.0
    if not images.is_floating_point():
        raise ValueError(f"`{name}` must be float in [-1, 1] or uint8, got dtype {images.dtype}.")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"float `{name}` must be (N, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}.")
    check_image_values(images, name)
    return ((images.float() + 1) / 2).clamp(0, 1)


def check_image_values(images: torch.Tensor, name: str = "images") -> None:
    """A ValueError naming ``name`` when float ``images`` hold NaN / inf (they would be dropped from the means,
    not counted as failures) or values far outside [-1, 1]; one read-back per call."""
    if not images.numel() or not images.is_floating_point():
        return
    low, high = torch.stack(torch.aminmax(images)).float().tolist()  # NaN propagates through min and max
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError(
            f"`{name}` holds NaN/inf values (got values in [{low}, {high}]); every image must be finite "
            "(e.g. a half-precision overflow in the decoder)."
        )
    if low < -2 or high > 2:
        raise ValueError(
            f"float `{name}` must be in [-1, 1], got values in [{low:.3g}, {high:.3g}]"
            " (images in [0, 255] must be passed as uint8 (N, H, W, 3))."
        )


def check_metric_names(metrics, allowed: Sequence[str] = RECONSTRUCTION_METRICS) -> tuple[str, ...]:
    if metrics is None:
        return tuple(allowed)
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",")]
    metrics = tuple(dict.fromkeys(m for m in metrics if m))
    bad = [m for m in metrics if m not in allowed]
    if bad or not metrics:
        raise ValueError(f"`metrics` must be a non-empty subset of {list(allowed)}, got {list(metrics)}.")
    return metrics


# ---------------------------------------------------------------------------------------------------- FID


def trace_sqrt_product(sigma1: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """``Tr((sigma1 sigma2)^(1/2))`` for symmetric PSD matrices, in float64.

    Same quantity as torchmetrics' ``eigvals(sigma1 @ sigma2).sqrt().real.sum()`` and torch-fidelity's ``sqrtm``
    trace, evaluated exactly and much faster: with a pivoted Cholesky factor ``sigma1 = A A^T`` (rank r),
    ``sigma1 sigma2`` has the same non-zero eigenvalues as the symmetric PSD ``A^T sigma2 A`` (r x r).
    """
    from scipy.linalg import lapack

    s1 = sigma1.detach().to("cpu", torch.float64)
    s2 = sigma2.detach().to("cpu", torch.float64)
    factor, piv, rank, _ = lapack.dpstrf(s1.numpy(), lower=1, tol=-1)
    if rank == 0:
        return torch.zeros((), dtype=torch.float64)
    lower = torch.from_numpy(np.tril(factor)[:, :rank])
    a = torch.empty_like(lower)
    a[torch.from_numpy(piv.astype(np.int64) - 1)] = lower  # sigma1 = P L L^T P^T, A = P L
    m = a.T @ s2 @ a
    return torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017):
    ``|mu1 - mu2|^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^(1/2))``."""
    mu1, mu2 = mu1.detach().to("cpu", torch.float64), mu2.detach().to("cpu", torch.float64)
    sigma1, sigma2 = sigma1.detach().to("cpu", torch.float64), sigma2.detach().to("cpu", torch.float64)
    distance = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt_product(sigma1, sigma2)
    return float(distance)


class FrechetDistance(FrechetInceptionDistance):
    """torchmetrics' FID state (float64 feature sums and outer-product sums, summed across processes) with the
    trace term of [`trace_sqrt_product`]. ``feature`` is any module mapping a batch to (N, D) features and
    exposing ``num_features`` (e.g. [`groupvq_hf.evaluation.InceptionFeatures`])."""

    def statistics(self) -> list[torch.Tensor]:
        """``[mean, covariance]`` of the references' then the predictions' features, float64 (the unbiased
        covariance, as ``numpy.cov``), from the sums of this process (across processes inside ``compute``)."""
        n_real, n_fake = int(self.real_features_num_samples), int(self.fake_features_num_samples)
        if n_real < 2 or n_fake < 2:
            raise ValueError(
                f"rFID needs at least 2 images on each side, got {n_real} references, {n_fake} predictions."
            )
        stats = []
        for total, outer, n in (
            (self.real_features_sum, self.real_features_cov_sum, n_real),
            (self.fake_features_sum, self.fake_features_cov_sum, n_fake),
        ):
            mean = total / n
            stats += [mean, (outer - n * torch.outer(mean, mean)) / (n - 1)]
        return stats

    def compute(self) -> torch.Tensor:
        return torch.tensor(frechet_distance(*self.statistics()), dtype=torch.float64)


# ------------------------------------------------------------------------------------ ReconstructionMetrics


class ReconstructionMetrics(evaluate.Metric):
    """rFID, LPIPS(VGG16), PSNR, SSIM and L1 of reconstructions against their originals, streamed.

    ``metrics`` picks what ``add_batch`` accumulates (default all); LPIPS and Inception networks load lazily
    from ``lpips_weights`` / ``inception_weights`` (local files) or the standard way (see
    [`groupvq_hf.evaluation.pretrained`]), or are passed in built (``lpips_net``, ``inception_net``) to share them.
    ``device`` is where the networks run (default: the device of the first batch).
    """

    def __init__(
        self,
        metrics: Iterable[str] | str | None = None,
        lpips_weights: str | None = None,
        inception_weights: str | None = None,
        lpips_net: nn.Module | None = None,
        inception_net: nn.Module | None = None,
        device: str | torch.device | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.metrics = check_metric_names(metrics)
        self.lpips_weights, self.inception_weights = lpips_weights, inception_weights
        self._lpips_net, self._inception_net = lpips_net, inception_net
        self.device = torch.device(device) if device is not None else None
        self._states: dict[str, nn.Module] = {}
        self._batch_device = torch.device("cpu")  # where the states live when ``device`` is not given
        self.num_images = 0

    def _info(self) -> evaluate.MetricInfo:
        image = datasets.Sequence(datasets.Sequence(datasets.Sequence(datasets.Value("float32"))))
        return evaluate.MetricInfo(
            description="Reconstruction quality of an image tokenizer: rFID, LPIPS(VGG16), PSNR, SSIM.",
            citation=_CITATION,
            inputs_description=_RECON_INPUTS,
            features=datasets.Features({"predictions": image, "references": image}),
            reference_urls=["https://github.com/Lightning-AI/torchmetrics", "https://github.com/toshas/torch-fidelity"],
        )

    # --------------------------------------------------------------------------------------------- state
    def reset(self) -> None:
        """Forget everything added (the feature networks stay loaded)."""
        for state in self._states.values():
            state.reset()
        self.num_images = 0

    def _state(self, name: str, device: torch.device) -> nn.Module:
        if name not in self._states:
            if name == "rfid":
                if self._inception_net is None:
                    from .pretrained import inception_network

                    self._inception_net = inception_network(self.inception_weights)
                state = FrechetDistance(feature=self._inception_net)
            else:
                state = MeanMetric()
                state.set_dtype(torch.float64)
            self._states[name] = state.to(device)
        return self._states[name]

    def _lpips(self, device: torch.device) -> nn.Module:
        if self._lpips_net is None:
            from .pretrained import lpips_network

            self._lpips_net = lpips_network(self.lpips_weights)
        return self._lpips_net.to(device)

    # ----------------------------------------------------------------------------------------------- API
    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Accumulate per-image scores and feature statistics of one batch (the images are not kept)."""
        with torch.no_grad():
            self._add_batch(predictions, references, **kwargs)

    def _add_batch(self, predictions, references, **kwargs) -> None:
        if kwargs:
            raise ValueError(
                f"Unexpected inputs {sorted(kwargs)}; ReconstructionMetrics takes `predictions` and `references`."
            )
        if predictions is None or references is None:
            raise ValueError("`predictions` and `references` are both required.")
        preds, refs = to_unit_images(predictions, "predictions"), to_unit_images(references, "references")
        if preds.shape != refs.shape:
            raise ValueError(
                "`predictions` and `references` must have the same shape, "
                f"got {tuple(preds.shape)} and {tuple(refs.shape)}."
            )
        if preds.shape[0] == 0:
            return
        device = self.device or (predictions.device if isinstance(predictions, torch.Tensor) else torch.device("cpu"))
        preds, refs = preds.to(device), refs.to(device)
        self._batch_device = device
        if "psnr" in self.metrics:
            from torchmetrics.functional.image import peak_signal_noise_ratio

            psnr = peak_signal_noise_ratio(preds, refs, data_range=DATA_RANGE, reduction="none", dim=(1, 2, 3))
            self._state("psnr", device).update(psnr.double())
        if "ssim" in self.metrics:
            from torchmetrics.functional.image import (
                structural_similarity_index_measure,
            )

            ssim = structural_similarity_index_measure(preds, refs, data_range=DATA_RANGE, reduction="none")
            self._state("ssim", device).update(ssim.double())
        if "l1" in self.metrics:
            l1 = (preds - refs).abs().mean(dim=(1, 2, 3)) * 2  # [0, 1] -> the [-1, 1] scale of the training L1
            self._state("l1", device).update(l1.double())
        if "lpips" in self.metrics:
            self._state("lpips", device).update(self._lpips(device)(preds * 2 - 1, refs * 2 - 1).double())
        if "rfid" in self.metrics:
            fid = self._state("rfid", device)
            fid.update(to_uint8(refs), real=True)
            fid.update(to_uint8(preds), real=False)
        self.num_images += preds.shape[0]

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Accumulate one image pair (float (3, H, W) in [-1, 1] or uint8 (H, W, 3))."""
        self.add_batch(
            predictions=_as_tensor(prediction, "prediction")[None],
            references=_as_tensor(reference, "reference")[None],
            **kwargs,
        )

    def compute(self, *, predictions=None, references=None, metrics=None, **kwargs) -> dict:
        """Add the given batch if any, then return the metrics over everything added, summed across processes."""
        if kwargs:
            raise ValueError(f"Unexpected arguments {sorted(kwargs)} for ReconstructionMetrics.compute.")
        if metrics is not None:
            metrics = check_metric_names(metrics)
            if self._total_images() == 0:  # nothing accumulated on any process: accumulate only what is asked for
                self.metrics = metrics  # (decided on the sum, so every rank keeps the same states for the collectives)
            elif set(metrics) - set(self.metrics):
                raise ValueError(
                    f"`metrics` {list(metrics)} asks for metrics that were not accumulated ({list(self.metrics)}); "
                    "pass them to ReconstructionMetrics(metrics=...) before adding batches."
                )
        if predictions is not None or references is not None:
            self.add_batch(predictions=predictions, references=references)
        names = metrics or self.metrics
        num_images = self._total_images()
        if num_images == 0:
            raise ValueError("No images were added: call add_batch(predictions=..., references=...) first.")
        device = self.device or self._batch_device
        results = {}
        for name in self.metrics:  # every rank computes every accumulated state, in the same order (collectives)
            value = float(self._state(name, device).compute())
            if name in names:
                results[name] = value
        results["num_images"] = num_images
        return results

    def _total_images(self) -> int:
        """Images added on all processes (a collective)."""
        return int(sum_across_processes(torch.tensor(self.num_images, dtype=torch.float64)))


# -------------------------------------------------------------------------------------------- CodebookUsage


class CodebookUsage(evaluate.Metric):
    """Codebook utilisation over everything added (not a rolling window), per group when ``group_sizes`` is known."""

    def __init__(self, codebook_size: int | None = None, group_sizes: Sequence[int] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.codebook_size, self.group_sizes = codebook_size, group_sizes
        self.counts = torch.zeros(0, dtype=torch.int64)

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Codebook usage (fraction of codes used), per-group usage and code perplexity.",
            citation="",
            inputs_description=_USAGE_INPUTS,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("int64"))}),
        )

    def reset(self) -> None:
        """Forget all counts."""
        self.counts = torch.zeros(0, dtype=torch.int64)

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Count the code indices of one batch."""
        if references is not None or kwargs:
            raise ValueError("CodebookUsage takes only `predictions` (code indices).")
        if isinstance(predictions, (int, np.integer, list, tuple)):  # plain (nested) lists of indices, or one index
            predictions = np.asarray(predictions).reshape(-1)
        indices = _as_tensor(predictions, "predictions")
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise ValueError(f"`predictions` must be integer code indices, got dtype {indices.dtype}.")
        indices = indices.reshape(-1).long()
        if indices.numel() == 0:
            return
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or (self.codebook_size is not None and high >= self.codebook_size):
            raise ValueError(
                f"`predictions` must be code indices in [0, {self.codebook_size}), got values in [{low}, {high}]."
            )
        batch_counts = torch.bincount(indices, minlength=len(self.counts)).cpu()
        if len(batch_counts) > len(self.counts):
            self.counts = torch.cat([self.counts, self.counts.new_zeros(len(batch_counts) - len(self.counts))])
        self.counts += batch_counts

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Count one sample's code indices."""
        self.add_batch(predictions=prediction, references=reference, **kwargs)

    def compute(self, *, predictions=None, references=None, codebook_size=None, group_sizes=None, **kwargs) -> dict:
        """Add the given indices if any, then return usage over everything added, summed across processes."""
        codebook_size = codebook_size if codebook_size is not None else self.codebook_size
        group_sizes = group_sizes if group_sizes is not None else self.group_sizes
        if not isinstance(codebook_size, int) or isinstance(codebook_size, bool) or codebook_size < 1:
            raise ValueError(
                f"`codebook_size` must be a positive int (here or in the constructor), got {codebook_size!r}."
            )
        if group_sizes is not None and (not group_sizes or sum(group_sizes) != codebook_size or min(group_sizes) < 1):
            raise ValueError(
                f"`group_sizes` must be positive ints summing to `codebook_size`={codebook_size}, got {group_sizes!r}."
            )
        self.codebook_size = codebook_size
        if predictions is not None or references is not None or kwargs:
            self.add_batch(predictions=predictions, references=references, **kwargs)
        if len(self.counts) > codebook_size:
            raise ValueError(f"Indices up to {len(self.counts) - 1} were added but `codebook_size`={codebook_size}.")
        counts = torch.zeros(codebook_size, dtype=torch.int64)
        counts[: len(self.counts)] = self.counts
        counts = sum_across_processes(counts)
        return usage_statistics(counts, group_sizes)  # groupvq_hf.quantizer.usage_statistics


__all__ = [
    "CodebookUsage",
    "DATA_RANGE",
    "FrechetDistance",
    "RECONSTRUCTION_METRICS",
    "ReconstructionMetrics",
    "check_image_values",
    "frechet_distance",
    "to_unit_images",
    "trace_sqrt_product",
]
