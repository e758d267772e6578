"""Evaluation protocols: which preprocessing, which networks and which metric definitions produce the numbers.

Published tokenizer tables use different protocols, and their numbers are comparable only under the same one:

- ``default``: groupvq-hf's own (`groupvq_hf.evaluation.metrics`): bicubic shorter-side resize and center crop,
  per-image PSNR / SSIM on [0, 1], LPIPS(VGG16), rFID with torch-fidelity's Inception on uint8 crops.
- ``simvq``: SimVQ's ``evaluation.py`` (``youngsheen/SimVQ``), reproduced with the libraries it uses: torchvision
  ``Resize(size)`` + ``CenterCrop(size)``, pixels ``x / 127.5 - 1``; rFID with pytorch-fid's ``InceptionV3`` on
  float images in [0, 1] (float64 statistics, pytorch-fid's ``calculate_frechet_distance``); LPIPS with the
  ``lpips`` package's AlexNet and VGG; SSIM as SimVQ averages it (scikit-image's per image on uint8-truncated
  values, averaged per block of `SIMVQ_BATCH_SIZE` consecutive images, then over blocks); PSNR as SimVQ computes
  it (``psnr_simvq``: scikit-image's PSNR of each block, averaged over blocks) beside the per-image mean ``psnr``.
- ``adm``: the inputs of OpenAI's ADM evaluator (``guided-diffusion/evaluations/evaluator.py``): references
  cropped by ADM's ``center_crop_arr``, reconstructions quantised to uint8 as LlamaGen's
  ``reconstruction_vq_ddp.py`` does, both written as ``references.npz`` / ``reconstructions.npz`` (``arr_0``, uint8
  (N, H, W, 3), same order); PSNR / SSIM / LPIPS (default definitions) on exactly those uint8 pairs; rFID is the
  evaluator's ``FID`` line on the two files.

[`ProtocolMetrics`] streams one protocol's metrics (and the npz / PNG outputs) over batches; every process adds
its own images, keyed by their stream row, and ``compute`` reduces over processes (every rank must call it), so
order-dependent outputs (``psnr_simvq``, the npz files) do not depend on the number of processes.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..fileio import atomic_file
from ..image_processing_groupvq import to_uint8
from ..quantizer import check_positive_int, sum_across_processes
from .metrics import (
    RECONSTRUCTION_METRICS,
    FrechetDistance,
    ReconstructionMetrics,
    check_image_values,
    check_metric_names,
    to_unit_images,
)

PROTOCOLS = ("default", "simvq", "adm")
SIMVQ_BATCH_SIZE = 64  # `--batch_size` of SimVQ's evaluation.py: its PSNR is a per-batch figure at this size
SIMVQ_METRICS = ("psnr", "psnr_simvq", "ssim", "lpips_alex", "lpips_vgg", "rfid")
ADM_METRICS = ("psnr", "ssim", "lpips", "l1")  # rFID: the ADM evaluator on the npz files
PROTOCOL_METRICS = {"default": RECONSTRUCTION_METRICS, "simvq": SIMVQ_METRICS, "adm": ADM_METRICS}
NPZ_NAMES = ("references", "reconstructions")
ADM_EVALUATOR_COMMAND = "python evaluations/evaluator.py {references} {reconstructions}"
NO_IMAGES_ADDED = "No images were added: call add_batch(references, reconstructions, keys) first."


def check_protocol(protocol: str) -> str:
    """``protocol`` if it is one of `PROTOCOLS`, else a ValueError naming them."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"`protocol` must be one of {list(PROTOCOLS)}, got {protocol!r}.")
    return protocol


def protocol_metrics(protocol: str, metrics: str | Iterable[str] | None = None) -> tuple[str, ...]:
    """The reconstruction metrics of ``protocol`` named in ``metrics`` (default: all of them), validated."""
    return check_metric_names(metrics, PROTOCOL_METRICS[check_protocol(protocol)])


# ------------------------------------------------------------------------------------------------ preprocessing


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's center crop (``guided_diffusion/image_datasets.py``): halve with BOX while the shorter side is at least
    ``2 * image_size``, resize BICUBIC so the shorter side is ``image_size``, crop the center; uint8 (S, S, 3)."""
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    array = np.array(image)
    top, left = (array.shape[0] - image_size) // 2, (array.shape[1] - image_size) // 2
    return array[top : top + image_size, left : left + image_size]


class _SimVQTransform:
    """SimVQ's validation images: torchvision ``Resize(size)`` of the shorter side, ``CenterCrop(size)``, then
    ``x / 127.5 - 1`` (numpy float64, cast to float32); (3, S, S). The stream opens images as its loader does
    (``decode_as_reference``: `groupvq_hf.data.decoding.open_as_reference`, no EXIF rotation)."""

    decode_as_reference = True

    def __init__(self, resolution: int):
        from torchvision import transforms

        self.crop = transforms.Compose([transforms.Resize(resolution), transforms.CenterCrop(resolution)])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        array = (np.array(self.crop(image)) / 127.5 - 1.0).astype(np.float32)
        return torch.from_numpy(array).permute(2, 0, 1)


class _ADMTransform:
    """ADM's evaluation images: [`center_crop_arr`], then ``x.astype(float32) / 127.5 - 1`` as its dataset does;
    (3, S, S). The stream opens images as its dataset does (``decode_as_reference``, no EXIF rotation)."""

    decode_as_reference = True

    def __init__(self, resolution: int):
        self.resolution = resolution

    def __call__(self, image: Image.Image) -> torch.Tensor:
        array = center_crop_arr(image, self.resolution).astype(np.float32) / 127.5 - 1
        return torch.from_numpy(array).permute(2, 0, 1)


def protocol_transform(protocol: str, resolution: int):
    """The image transform of ``protocol`` (an RGB PIL image -> float32 (3, R, R) in [-1, 1]); ``None`` for
    ``default`` (`groupvq_hf.data.decoding.image_transform`, the stream's own)."""
    protocol = check_protocol(protocol)
    if protocol == "simvq":
        return _SimVQTransform(resolution)
    if protocol == "adm":
        return _ADMTransform(resolution)
    return None


def reconstruction_uint8(protocol: str, images: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3) on the CPU, as ``protocol`` quantises them: rounded
    (``default``), truncated after ``(x + 1) / 2 * 255`` (``simvq``, its evaluation.py), ``clamp(127.5 x + 128)``
    truncated (``adm``, LlamaGen's reconstruction_vq_ddp.py). References are always rounded: every protocol's
    crops are ``k / 127.5 - 1`` of uint8 ``k``, and rounding gives ``k`` back exactly."""
    protocol = check_protocol(protocol)
    if protocol == "simvq":
        quantised = ((images + 1) / 2 * 255.0).to(torch.uint8)
    elif protocol == "adm":
        quantised = torch.clamp(127.5 * images + 128.0, 0, 255).to(torch.uint8)
    else:
        quantised = to_uint8(to_unit_images(images))
    return quantised.permute(0, 2, 3, 1).cpu()


# --------------------------------------------------------------------------------------------- processes


def _all_gather(value) -> list:
    """``value`` of every process, in rank order (one process: ``[value]``)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _rank() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ------------------------------------------------------------------------------------------------------ SimVQ


def _block_means(values: Sequence[float], batch_size: int, name: str) -> np.ndarray:
    """The mean of each block of ``batch_size`` consecutive ``values`` (SimVQ's batches, the last one partial)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError(f"`{name}` must hold at least one value.")
    return np.array([values[i : i + batch_size].mean() for i in range(0, len(values), batch_size)])


def simvq_psnr(mse: Sequence[float], batch_size: int = SIMVQ_BATCH_SIZE, data_range: float = 1.0) -> float:
    """SimVQ's PSNR from per-image mean squared errors in evaluation order: scikit-image's PSNR of each block of
    ``batch_size`` consecutive images (the MSE of the block: all images have the same size), averaged over blocks."""
    with np.errstate(divide="ignore"):
        return float(np.mean(10 * np.log10(data_range**2 / _block_means(mse, batch_size, "mse"))))


def simvq_mean(values: Sequence[float], batch_size: int = SIMVQ_BATCH_SIZE) -> float:
    """SimVQ's mean of a per-image metric (its SSIM) in evaluation order: each batch's mean (``ssim_temp / B``),
    averaged over batches (``/ num_iter``); it differs from the per-image mean when the last batch is partial."""
    return float(np.mean(_block_means(values, batch_size, "values")))


class PytorchFIDDistance(FrechetDistance):
    """The FID state of [`groupvq_hf.evaluation.FrechetDistance`] (float64 feature sums, summed across processes)
    with pytorch-fid's ``calculate_frechet_distance`` (scipy ``sqrtm``, its eps fallback for a singular product)
    on the float64 means and covariances, as SimVQ's evaluation.py calls it (references first)."""

    def compute(self) -> torch.Tensor:
        from pytorch_fid.fid_score import calculate_frechet_distance

        mu1, sigma1, mu2, sigma2 = (t.cpu().numpy() for t in self.statistics())
        return torch.tensor(float(calculate_frechet_distance(mu1, sigma1, mu2, sigma2)), dtype=torch.float64)


class SimVQMetrics:
    """SimVQ's ``evaluation.py`` metrics, streamed: see the module docstring. ``inception_net`` is
    `groupvq_hf.evaluation.FIDInceptionFeatures` (pytorch-fid), ``lpips_nets`` maps ``"alex"``/``"vgg"`` to the
    ``lpips`` package's networks (`groupvq_hf.evaluation.lpips_package_network`)."""

    def __init__(
        self,
        metrics: Iterable[str] | None = None,
        inception_net=None,
        lpips_nets: dict | None = None,
        psnr_batch_size: int = SIMVQ_BATCH_SIZE,
        device: torch.device | str = "cpu",
    ):
        self.metrics = check_metric_names(metrics, SIMVQ_METRICS)
        self.device = torch.device(device)
        self.psnr_batch_size = check_positive_int("psnr_batch_size", psnr_batch_size)
        wanted = [net for net in ("alex", "vgg") if f"lpips_{net}" in self.metrics]
        self.lpips_nets = {net: lpips_nets[net].to(self.device) for net in wanted}
        # per-image means: float64 sums over this process's images (summed across processes in ``compute``)
        self.sums = {name: 0.0 for name in ("psnr", "lpips_alex", "lpips_vgg") if name in self.metrics}
        fid = PytorchFIDDistance(feature=inception_net.to(self.device)) if "rfid" in self.metrics else None
        self.fid = fid.to(self.device) if fid is not None else None
        # (stream key, per-image value): psnr_simvq and ssim average SimVQ's batches, so they need the order
        self.per_image: dict[str, list[tuple[int, float]]] = {"mse": [], "ssim": []}
        self.num_images = 0

    @torch.no_grad()
    def add_batch(self, references: torch.Tensor, reconstructions: torch.Tensor, keys: Sequence[int]) -> None:
        """One batch as SimVQ's loop sees it: ``references`` (its ``images``) and clamped ``reconstructions``,
        both float (B, 3, H, W) in [-1, 1]; ``keys`` their stream positions."""
        from skimage.metrics import (
            mean_squared_error,
            peak_signal_noise_ratio,
            structural_similarity,
        )

        check_image_values(references, "references")
        check_image_values(reconstructions, "reconstructions")
        images, recs = references.to(self.device), reconstructions.to(self.device)
        for net, lpips in self.lpips_nets.items():
            self.sums[f"lpips_{net}"] += float(lpips(images, recs).double().sum())
        images, recs = (images + 1) / 2, (recs + 1) / 2
        if self.fid is not None:
            self.fid.update(images, real=True)
            self.fid.update(recs, real=False)
        # SimVQ's PSNR / SSIM inputs: truncated to uint8, back to float32 in [0, 1]
        rgb_restored = (recs * 255.0).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()
        rgb_gt = (images * 255.0).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()
        rgb_restored, rgb_gt = rgb_restored.astype(np.float32) / 255.0, rgb_gt.astype(np.float32) / 255.0
        psnr = []
        for key, restored, gt in zip(keys, rgb_restored, rgb_gt):
            if "ssim" in self.metrics:
                ssim = structural_similarity(restored, gt, data_range=1.0, channel_axis=-1)
                self.per_image["ssim"].append((int(key), float(ssim)))
            if "psnr" in self.metrics:
                with np.errstate(divide="ignore"):
                    psnr.append(peak_signal_noise_ratio(gt, restored))
            if "psnr_simvq" in self.metrics:
                self.per_image["mse"].append((int(key), float(mean_squared_error(gt, restored))))
        if "psnr" in self.sums:
            self.sums["psnr"] += float(np.sum(psnr, dtype=np.float64))
        self.num_images += len(rgb_gt)

    def compute(self) -> dict:
        """The metrics over every process's images (a collective: every rank calls it)."""
        totals = sum_across_processes(torch.tensor([self.num_images, *self.sums.values()], dtype=torch.float64))
        if totals[0] == 0:  # the same on every rank: all raise
            raise ValueError(NO_IMAGES_ADDED)
        results = {name: float(total / totals[0]) for name, total in zip(self.sums, totals[1:])}
        if self.fid is not None:
            results["rfid"] = float(self.fid.compute())
        for name, metric, average in (("mse", "psnr_simvq", simvq_psnr), ("ssim", "ssim", simvq_mean)):
            if metric in self.metrics:  # in stream order, whatever the processes: SimVQ's batches
                pairs = sorted(pair for part in _all_gather(self.per_image[name]) for pair in part)
                results[metric] = average([value for _, value in pairs], self.psnr_batch_size)
        return {name: results[name] for name in self.metrics}




# ----------------------------------------------------------------------------------------- npz / PNG outputs


class NpzPairWriter:
    """This process's uint8 (B, H, W, 3) reference / reconstruction pairs, appended in chunks to raw part files in
    ``directory`` beside their int64 stream keys (nothing is kept in memory); [`pack_npz`] turns every
    process's parts into ``references.npz`` / ``reconstructions.npz`` in key order."""

    def __init__(self, directory: str | os.PathLike, rank: int = 0):
        self.directory, self.rank = Path(directory), rank
        self.directory.mkdir(parents=True, exist_ok=True)
        self.files = {name: open(_part(self.directory, name, rank), "wb") for name in (*NPZ_NAMES, "keys")}
        self.image_shape: tuple[int, ...] | None = None
        self.count = 0

    def add(self, references: np.ndarray, reconstructions: np.ndarray, keys: Sequence[int]) -> None:
        references, reconstructions = np.asarray(references), np.asarray(reconstructions)
        for name, array in zip(NPZ_NAMES, (references, reconstructions)):
            if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3 or len(array) != len(keys):
                raise ValueError(
                    f"`{name}` must be uint8 (N, H, W, 3) with one key per image, got {array.dtype} "
                    f"{array.shape} and {len(keys)} keys."
                )
        if self.image_shape is None:
            self.image_shape = references.shape[1:]
        if references.shape[1:] != self.image_shape or reconstructions.shape[1:] != self.image_shape:
            raise ValueError(f"All images must be {self.image_shape}, got {references.shape[1:]}.")
        self.files["references"].write(np.ascontiguousarray(references).tobytes())
        self.files["reconstructions"].write(np.ascontiguousarray(reconstructions).tobytes())
        self.files["keys"].write(np.asarray(keys, dtype=np.int64).tobytes())
        self.count += len(keys)

    def close(self) -> None:
        for file in self.files.values():
            file.close()


def _part(directory: Path, name: str, rank: int) -> Path:
    return directory / f".{name}.rank{rank}.part"


def write_npy_chunks(path: str | os.PathLike, shape: tuple[int, ...], chunks: Iterable[np.ndarray]) -> Path:
    """Write a ``.npz`` holding one uint8 array ``arr_0`` of ``shape`` from ``chunks`` (C-order pieces along axis 0),
    as ``numpy.savez`` lays it out (stored zip entry ``arr_0.npy``), without holding the array; atomic."""
    path, written = Path(path), 0
    with atomic_file(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as entry:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
                np.lib.format.write_array_header_2_0(entry, header)
                for chunk in chunks:
                    entry.write(np.ascontiguousarray(chunk, dtype=np.uint8).tobytes())
                    written += len(chunk)
        if written != shape[0]:
            raise ValueError(f"Chunks held {written} images, the header says {shape[0]}.")
    return path


def pack_npz(
    directory: str | os.PathLike, world_size: int, image_shape: tuple[int, ...], chunk_size: int = 256
) -> dict[str, str]:
    """Merge the part files of ``world_size`` [`NpzPairWriter`]s into ``references.npz`` and
    ``reconstructions.npz`` (``arr_0``: uint8 (N, H, W, 3), ordered by stream key, then rank), reading
    ``chunk_size`` images at a time through memory maps; removes the parts. Returns the two paths. A previous
    run's pair is deleted first, so a kill between the two files never leaves one of this run beside one of another.
    """
    directory = Path(directory)
    for name in NPZ_NAMES:
        (directory / f"{name}.npz").unlink(missing_ok=True)
    keys = [np.fromfile(_part(directory, "keys", r), dtype=np.int64) for r in range(world_size)]
    ranks = np.concatenate([np.full(len(k), r, dtype=np.int64) for r, k in enumerate(keys)])
    local = np.concatenate([np.arange(len(k), dtype=np.int64) for k in keys])
    order = np.lexsort((ranks, np.concatenate(keys)))
    total, paths = len(order), {}
    for name in NPZ_NAMES:
        maps = [
            np.memmap(_part(directory, name, r), dtype=np.uint8, mode="r", shape=(len(k), *image_shape))
            if len(k)
            else None
            for r, k in enumerate(keys)
        ]

        def chunks(maps=maps):
            for start in range(0, total, chunk_size):
                picked = order[start : start + chunk_size]
                chunk = np.empty((len(picked), *image_shape), dtype=np.uint8)
                for r, images in enumerate(maps):
                    mine = ranks[picked] == r
                    if mine.any():
                        chunk[mine] = images[local[picked][mine]]
                yield chunk

        paths[name] = str(write_npy_chunks(directory / f"{name}.npz", (total, *image_shape), chunks()))
        del maps
    for r in range(world_size):
        for name in (*NPZ_NAMES, "keys"):
            _part(directory, name, r).unlink(missing_ok=True)
    return paths


def save_image_pairs(
    directory: str | os.PathLike, references: np.ndarray, reconstructions: np.ndarray, keys: Sequence[int]
) -> None:
    """Write each uint8 (H, W, 3) pair as ``references/KEY.png`` and ``reconstructions/KEY.png`` in ``directory``
    (``KEY``: the stream key, 8 digits), each file written under a temporary name and renamed."""
    directory = Path(directory)
    for name, images in zip(NPZ_NAMES, (references, reconstructions)):
        folder = directory / name
        folder.mkdir(parents=True, exist_ok=True)
        for key, image in zip(keys, images):
            with atomic_file(folder / f"{int(key):08d}.png") as tmp:
                Image.fromarray(np.asarray(image)).save(tmp, format="PNG")


# ------------------------------------------------------------------------------------------- ProtocolMetrics


class ProtocolMetrics:
    """One protocol's reconstruction metrics and outputs over a stream of batches (see the module docstring).

    ``add_batch(references, reconstructions, keys)`` takes the model's input and its clamped output, float
    (B, 3, H, W) in [-1, 1], and the images' stream keys (unique over processes, in evaluation order).
    Networks: ``default`` / ``adm`` use ``lpips_weights`` (VGG16) / ``inception_weights`` (torch-fidelity) or the
    built ``lpips_net`` / ``inception_net``; ``simvq`` uses ``inception_weights`` for pytorch-fid's Inception
    (``pt_inception-2015-12-05-6726825d.pth``), ``lpips_weights`` for the VGG16 and ``lpips_alex_weights`` for the
    AlexNet backbone of the ``lpips`` package; each loads from torch hub's cache when not given.
    ``npz_dir`` (``adm`` only) receives ``references.npz`` / ``reconstructions.npz``; ``save_images`` receives
    the PNG pairs of any protocol.
    """

    def __init__(
        self,
        protocol: str = "default",
        metrics: Iterable[str] | str | None = None,
        device: torch.device | str = "cpu",
        lpips_weights: str | None = None,
        inception_weights: str | None = None,
        lpips_alex_weights: str | None = None,
        lpips_net=None,
        inception_net=None,
        npz_dir: str | os.PathLike | None = None,
        save_images: str | os.PathLike | None = None,
        psnr_batch_size: int = SIMVQ_BATCH_SIZE,
    ):
        self.protocol = check_protocol(protocol)
        no_metrics = metrics is not None and not isinstance(metrics, str) and not list(metrics)
        self.metrics = () if no_metrics else protocol_metrics(protocol, metrics)  # (): only the npz / PNG outputs
        if npz_dir is not None and self.protocol != "adm":
            raise ValueError(f"`npz_dir` writes the ADM evaluator's inputs: it needs protocol 'adm', got {protocol!r}.")
        if npz_dir is None and self.protocol == "adm":
            raise ValueError("Protocol 'adm' needs `npz_dir` (where references.npz and reconstructions.npz go).")
        check_positive_int("psnr_batch_size", psnr_batch_size)
        self.device = torch.device(device)
        self.rank, self.world_size = _rank()
        self.npz = NpzPairWriter(npz_dir, self.rank) if npz_dir is not None else None
        self.save_images = save_images
        if not self.metrics:
            self.state = None
        elif self.protocol == "simvq":
            from .pretrained import lpips_package_network, pytorch_fid_inception_network

            nets = {}
            if "lpips_alex" in self.metrics:
                nets["alex"] = lpips_package_network("alex", lpips_alex_weights)
            if "lpips_vgg" in self.metrics:
                nets["vgg"] = lpips_package_network("vgg", lpips_weights)
            inception = pytorch_fid_inception_network(inception_weights) if "rfid" in self.metrics else None
            self.state = SimVQMetrics(self.metrics, inception, nets, psnr_batch_size, self.device)
        else:
            self.state = ReconstructionMetrics(
                metrics=self.metrics, lpips_weights=lpips_weights, inception_weights=inception_weights,
                lpips_net=lpips_net, inception_net=inception_net, device=self.device,
            )  # fmt: skip

    def add_batch(self, references: torch.Tensor, reconstructions: torch.Tensor, keys: Sequence[int]) -> None:
        keys = [int(k) for k in keys]
        if len(keys) != len(references):
            raise ValueError(f"`keys` must hold one key per image, got {len(keys)} for {len(references)} images.")
        check_image_values(references, "references")  # every protocol: NaN / inf are errors, not dropped images
        check_image_values(reconstructions, "reconstructions")
        needs_uint8 = self.protocol == "adm" or self.save_images is not None
        refs_u8 = to_uint8(to_unit_images(references, "references")).permute(0, 2, 3, 1).cpu() if needs_uint8 else None
        recs_u8 = reconstruction_uint8(self.protocol, reconstructions) if needs_uint8 else None
        if self.state is None:
            pass
        elif self.protocol == "simvq":
            self.state.add_batch(references, reconstructions, keys)
        elif self.protocol == "adm":  # the metrics of the pairs in the npz files
            self.state.add_batch(predictions=recs_u8, references=refs_u8)
        else:
            self.state.add_batch(predictions=reconstructions, references=references)
        if self.npz is not None:
            self.npz.add(refs_u8.numpy(), recs_u8.numpy(), keys)
        if self.save_images is not None:
            save_image_pairs(self.save_images, refs_u8.numpy(), recs_u8.numpy(), keys)

    def compute(self) -> dict:
        """The metrics over all processes (a collective), with ``npz`` paths for ``adm`` (packed by rank 0)."""
        results = self.state.compute() if self.state is not None else {}
        results.pop("num_images", None)
        if self.npz is not None:
            self.npz.close()
            shapes = [s for s in _all_gather(self.npz.image_shape) if s is not None]
            if not shapes:  # the same on every rank: all raise
                raise ValueError(NO_IMAGES_ADDED)
            paths = {name: str(self.npz.directory / f"{name}.npz") for name in NPZ_NAMES}
            if self.rank == 0:
                paths = pack_npz(self.npz.directory, self.world_size, shapes[0])
            _all_gather(None)  # the files exist when every rank returns
            results["npz"] = paths
        return results


def adm_evaluator_command(npz: dict) -> str:
    """The command that gives rFID (its ``FID:`` line) from the two npz files, run in a guided-diffusion checkout."""
    return ADM_EVALUATOR_COMMAND.format(**npz)


__all__ = [
    "ADM_EVALUATOR_COMMAND",
    "ADM_METRICS",
    "NPZ_NAMES",
    "NpzPairWriter",
    "PROTOCOLS",
    "PROTOCOL_METRICS",
    "ProtocolMetrics",
    "PytorchFIDDistance",
    "SIMVQ_BATCH_SIZE",
    "SIMVQ_METRICS",
    "SimVQMetrics",
    "adm_evaluator_command",
    "center_crop_arr",
    "check_protocol",
    "pack_npz",
    "protocol_metrics",
    "protocol_transform",
    "reconstruction_uint8",
    "save_image_pairs",
    "simvq_psnr",
    "write_npy_chunks",
]
