"""Streaming evaluation of a Group-VQ tokenizer under accelerate, and the codebook resize study.

Every process streams its own part of the evaluation split (``build_image_dataset(..., train=False,
full_decode=True)``: decode in full, resize the shortest edge and center-crop), reconstructs it and feeds
[`ReconstructionMetrics`] and [`CodebookUsage`]; their states are summed across processes at the end.
``max_samples`` evaluates the first N images of the stream whatever the number of processes; undecodable
(skipped) and converted images are counted in the results. ``scripts/evaluate.py`` and ``scripts/resize_study.py``
are thin command lines over [`evaluate_model`] and [`resize_study`].

The resize study is the paper's Table 2 / Figure 4: from the trained codebook of size n, resample down (n / 2^p),
resample up and self-extend (n * 2^p) without training (Algorithm 2, Eq. 11), evaluating each.
"""

from __future__ import annotations

import copy
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from ..fileio import atomic_file, write_json  # noqa: F401  (write_json: re-exported)
from ..hub.cards import model_index_entries, resize_study_markdown  # noqa: F401  (card formatting: one home, .cards)
from ..quantizer import RESIZE_MODES, check_positive_int, sum_across_processes
from .metrics import (
    RECONSTRUCTION_METRICS,
    CodebookUsage,
    check_metric_names,
)
from .protocols import PROTOCOL_METRICS, PROTOCOLS, ProtocolMetrics, adm_evaluator_command, protocol_transform

ALL_METRICS = (*RECONSTRUCTION_METRICS, "codebook_usage")
DATA_COUNTS = ("skipped_images", "skipped_reasons", "converted_images", "converted_modes")  # not metrics


def parse_metrics(metrics: str | Iterable[str] | None, protocol: str = "default") -> tuple[str, ...]:
    """``"psnr,ssim"`` or a list -> validated tuple of metric names (default: all of ``protocol``'s, see
    `groupvq_hf.evaluation.PROTOCOL_METRICS`, and ``codebook_usage``; `ALL_METRICS` for ``default``)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"`protocol` must be one of {list(PROTOCOLS)}, got {protocol!r}.")
    return check_metric_names(metrics, (*PROTOCOL_METRICS[protocol], "codebook_usage"))


def build_eval_dataloader(
    dataset: str = "imagenet",
    split: str = "validation",
    resolution: int = 128,
    batch_size: int = 32,
    max_samples: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    image_column: str | None = None,
    num_workers: int = 0,
    seed: int = 0,
    transform=None,
    ordered: bool = False,
) -> torch.utils.data.DataLoader:
    """This rank's evaluation batches (`groupvq_hf.data.collate_examples` dicts: center crops ``pixel_values``
    (B, 3, R, R) in [-1, 1], their stream ``rows``, the bad images ``skipped`` and the ``converted`` modes).

    With ``max_samples`` every rank and loader worker reads the stream in order and keeps blocks of ``batch_size``
    rows in turn, so the k-th batches of all ranks cover consecutive rows and [`evaluate_model`] (given the same
    ``max_samples``) evaluates exactly the first ``max_samples`` images whatever the number of processes. Without
    it the ranks read disjoint shards, unless ``ordered`` (blocks as with ``max_samples``: the stream rows, the keys
    of order-dependent outputs, are then the same whatever the number of processes). ``transform``: the
    preprocessing of an evaluation protocol (`groupvq_hf.evaluation.protocol_transform`; default the stream's).
    ``loader.dataset.notes`` holds notes on the split read.
    """
    from ..data.stream import build_image_dataset, collate_examples

    check_positive_int("batch_size", batch_size)
    check_positive_int("max_samples", max_samples, allow_none=True)
    stream = build_image_dataset(
        dataset, split=split, resolution=resolution, train=False, image_column=image_column, seed=seed,
        rank=rank, world_size=world_size, streaming=True,
        block_size=None if max_samples is None and not ordered else batch_size, transform=transform,
        full_decode=True,  # the reference preprocessing
    )  # fmt: skip
    return torch.utils.data.DataLoader(
        stream, batch_size=batch_size, collate_fn=collate_examples, num_workers=num_workers
    )


def _gather_lists(accelerator, values: list) -> list[list]:
    """``values`` of every process, in rank order."""
    if accelerator is None or accelerator.num_processes == 1:
        return [values]
    from accelerate.utils import gather_object

    return list(gather_object([values]))


def load_model(model: str | os.PathLike, device: torch.device | str = "cpu"):
    """A `GroupVQModel` from a local folder or a Hub repo id, in eval mode on ``device``; ValueError naming ``model``
    when it is neither (a missing folder reads as a malformed repo id to the Hub client)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from ..modeling_groupvq import GroupVQModel

    if not os.path.exists(model):
        try:
            validate_repo_id(str(model))
        except HFValidationError as err:
            raise ValueError(
                f"`model` {str(model)!r} is neither a local model folder (no such folder) nor a Hub repo id ({err})"
            ) from None
    return GroupVQModel.from_pretrained(str(model)).to(device).eval()


@torch.no_grad()
def evaluate_model(
    model,
    dataloader: Iterable[torch.Tensor] | None,
    metrics: str | Iterable[str] | None = None,
    accelerator=None,
    lpips_net=None,
    inception_net=None,
    lpips_weights: str | None = None,
    inception_weights: str | None = None,
    progress: bool = True,
    total: int | None = None,
    max_samples: int | None = None,
    protocol: str = "default",
    lpips_alex_weights: str | None = None,
    npz_dir: str | os.PathLike | None = None,
    save_images: str | os.PathLike | None = None,
) -> dict:
    """Reconstruct every batch of ``dataloader`` and return the requested metrics over all processes.

    ``dataloader`` yields pixel batches (B, 3, H, W) in [-1, 1] (or `collate_examples` dicts) for this process
    only (``None``: nothing for this process). Returns ``{"psnr", "ssim", "lpips", "rfid", "codebook_usage",
    "perplexity", "num_images", "skipped_images", "converted_images", ...}`` for what ``metrics`` names, plus
    ``group_usage`` / ``group_frequency`` (per group) with ``codebook_usage`` and the reasons / original modes of
    skipped / converted images. Every process must call it (results are reduced across processes).

    ``max_samples``: evaluate the first ``max_samples`` images of the stream, in stream order over all processes;
    needs batches of [`build_eval_dataloader`] built with the same ``max_samples`` (the processes exchange the
    rows of each step's batches to find the cut). ``total``: this process's number of images; batches beyond it
    are not used.

    ``protocol`` (`groupvq_hf.evaluation.PROTOCOLS`) picks the metric definitions and networks
    (`groupvq_hf.evaluation.ProtocolMetrics`; the dataloader should apply its preprocessing,
    `protocol_transform`): ``simvq`` returns ``psnr``, ``psnr_simvq``, ``ssim``, ``lpips_alex``, ``lpips_vgg``,
    ``rfid`` (``lpips_alex_weights``: its AlexNet backbone); ``adm`` writes ``references.npz`` and
    ``reconstructions.npz`` to ``npz_dir`` (their paths under ``"npz"``). ``save_images``: a folder for the
    reference / reconstruction PNG pairs. Images are keyed by their stream rows (batches of
    [`build_eval_dataloader`]) or, for plain tensors, by their order interleaved over processes (the i-th image
    of process r: ``i * num_processes + r``), so keys and PNG names never collide across processes.
    """
    from tqdm.auto import tqdm

    names = parse_metrics(metrics, protocol)
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    show = progress and (accelerator is None or accelerator.is_local_main_process)
    rank, world_size = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    recon_names = [m for m in names if m != "codebook_usage"]
    recon = ProtocolMetrics(
        protocol, recon_names, device=device, lpips_weights=lpips_weights, inception_weights=inception_weights,
        lpips_alex_weights=lpips_alex_weights, lpips_net=lpips_net, inception_net=inception_net, npz_dir=npz_dir,
        save_images=save_images,
    ) if recon_names or npz_dir is not None or save_images is not None else None  # fmt: skip
    usage = CodebookUsage(codebook_size=model.config.codebook_size, group_sizes=model.quantizer.group_sizes)
    model.eval()
    num_images, seen = 0, 0  # this process's images; images of all processes before this step (max_samples)
    skipped, converted = Counter(), Counter()
    lockstep = max_samples is not None and accelerator is not None and accelerator.num_processes > 1
    cap = total if max_samples is None else max_samples
    batches = iter(dataloader if dataloader is not None else ())
    with tqdm(total=cap, disable=not show, desc="evaluate", unit="img") as bar:
        while True:
            batch = next(batches, None)
            info = batch if isinstance(batch, dict) else {}
            pixels = info.get("pixel_values") if isinstance(batch, dict) else batch
            rows = list(info.get("rows", range(0 if pixels is None else pixels.shape[0])))
            bad = list(info.get("skipped", ()))
            if lockstep:  # where this step's rows of all processes reach the max_samples-th image
                gathered = _gather_lists(accelerator, [batch is not None, rows])
                if not any(has_batch for has_batch, _ in gathered):
                    break
                step_rows = sorted(r for _, rs in gathered for r in rs)
                remaining = max_samples - seen
                cutoff = step_rows[remaining - 1] if len(step_rows) >= remaining else float("inf")
                seen += min(len(step_rows), remaining)
            elif batch is None:
                break
            else:  # batches arrive in stream order; with a cap, the rows after its last image are not evaluated
                left = None if cap is None else cap - num_images
                cutoff = rows[left - 1] if left is not None and 0 < left <= len(rows) else float("inf")
            keep = [i for i, r in enumerate(rows) if r <= cutoff]
            skipped.update(reason for row, reason in bad if row < cutoff)
            modes = info.get("modes", ())
            converted.update(modes[i] for i in keep if i < len(modes) and modes[i])
            if keep:
                pixels = pixels[: len(keep)] if keep == list(range(len(keep))) else pixels[keep]
                pixels = pixels.to(device)
                out = model(pixels)
                if recon is not None:
                    local = range(num_images, num_images + len(keep))
                    keys = [rows[i] for i in keep] if info else [i * world_size + rank for i in local]
                    recon.add_batch(pixels, out.reconstruction.clamp(-1, 1), keys)
                usage.add_batch(predictions=out.indices)
                num_images += pixels.shape[0]
                bar.update(pixels.shape[0] if not lockstep else 0)
            if lockstep:
                bar.update(min(seen, max_samples) - bar.n)
                if seen >= max_samples:
                    break
            elif cap is not None and num_images >= cap:
                break
    results = {}
    if recon is not None:
        results.update(recon.compute())
    usage_results = usage.compute()  # summed across processes (also gives the image count when recon is off)
    if "codebook_usage" in names:
        results.update(usage_results)
    results.pop("num_tokens", None)
    if "num_images" not in results:

        results["num_images"] = int(sum_across_processes(torch.tensor(float(num_images))))
    for name, counts in (("skipped", skipped), ("converted", converted)):
        total_counts = Counter()
        for part in _gather_lists(accelerator, sorted(counts.items())):
            total_counts.update(dict(part))
        results[f"{name}_images"] = sum(total_counts.values())
        results[f"{name}_{'reasons' if name == 'skipped' else 'modes'}"] = dict(sorted(total_counts.items()))
    return results


# --------------------------------------------------------------------------------------------- results / card


def results_record(metrics: dict, **context) -> dict:
    """The JSON written by ``scripts/evaluate.py``: ``context`` (model, dataset, split, resolution, ...) plus
    ``"metrics"`` (scalars, the keys `groupvq_hf.hub.normalize_eval_results` reads) and per-group lists."""
    counts = {k: metrics[k] for k in DATA_COUNTS if k in metrics}
    scalars = {
        k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "num_images" and k not in counts
    }
    groups = {k: v for k, v in metrics.items() if isinstance(v, list)}
    return {**context, "num_samples": metrics.get("num_images"), **counts, "metrics": scalars, **groups}


def update_model_card(card_path: str | os.PathLike, results: dict, model_name: str | None = None) -> Path:
    """Add (or replace, same task/dataset/split/metric) the ``results`` in the ``model-index`` of the model card
    at ``card_path`` (a ``README.md``; created with just the metadata when missing). The entries are
    `groupvq_hf.hub.model_index_entries`, as in the card `groupvq_hf.hub.publish` writes."""
    from huggingface_hub import ModelCard, ModelCardData

    card_path = Path(card_path)
    new = model_index_entries(results)
    if card_path.is_file():
        card = ModelCard.load(card_path)
        head, _, rest = card.text.partition("\n")
        if head.strip() == "---" and not re.search(r"^---\s*$", rest, flags=re.MULTILINE):  # kept as text: not metadata
            raise ValueError(
                f"`card_path` {card_path} starts a YAML front matter block with '---' but never closes it (a "
                "truncated file?); repair or remove it: its `model-index` would be lost."
            )
    else:
        card = ModelCard.from_template(ModelCardData(), template_str="---\n{{ card_data }}\n---\n")
    data = card.data
    old = list(data.eval_results or [])

    def key(entry):  # entries of another protocol stay
        return (entry.task_type, entry.dataset_type, entry.dataset_split, entry.metric_type, entry.metric_config)

    replaced = {key(e) for e in new}
    data.eval_results = [e for e in old if key(e) not in replaced] + new
    data.model_name = data.model_name or model_name or card_path.parent.name or "groupvq"
    card_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(card_path) as tmp:  # a kill mid-write leaves the old card, not a truncated one
        card.save(tmp)
    return card_path


# ------------------------------------------------------------------------------------------------ resize study


STUDY_PROTOCOLS = ("default", "simvq")  # adm writes npz pairs for an external evaluator: no table in-process


def resize_plan(codebook_size: int, min_power: int = -1, max_power: int = 4) -> list[dict]:
    """The study's runs: the trained codebook, ``resample`` to ``n * 2^p`` for p in [min_power, max_power] \\ {0},
    and ``extend`` (self-extension) to ``n * 2^p`` for p in [1, max_power] (Table 2: p = -1, 1; Figure 4: p >= 1)."""
    if not isinstance(min_power, int) or min_power > 0:
        raise ValueError(f"`min_power` must be an int <= 0, got {min_power!r}.")
    if not isinstance(max_power, int) or max_power < 0:
        raise ValueError(f"`max_power` must be an int >= 0, got {max_power!r}.")
    if codebook_size % (2**-min_power):
        raise ValueError(
            f"`codebook_size`={codebook_size} cannot be divided by 2^{-min_power} (`min_power`={min_power})."
        )
    plan = [{"method": "trained", "mode": None, "power": 0, "codebook_size": codebook_size}]
    for p in range(min_power, max_power + 1):
        if p:
            size = codebook_size * 2**p if p > 0 else codebook_size // 2 ** (-p)
            plan.append(
                {
                    "method": "downsampling" if p < 0 else "upsampling",
                    "mode": "resample",
                    "power": p,
                    "codebook_size": size,
                }
            )
    for p in range(1, max_power + 1):
        plan.append({"method": "self-extension", "mode": "extend", "power": p, "codebook_size": codebook_size * 2**p})
    return plan


def resize_study(
    model,
    make_dataloader,
    plan: Sequence[dict] | None = None,
    metrics: str | Iterable[str] | None = None,
    seed: int = 0,
    accelerator=None,
    progress: bool = True,
    protocol: str = "default",
    **evaluate_kwargs,
) -> list[dict]:
    """Evaluate ``model`` and its resized copies (Algorithm 2) on the same images; returns one row per run.

    ``make_dataloader()`` returns a fresh dataloader for this process (called once per run; with ``protocol``'s
    preprocessing, `protocol_transform`). Each run resizes a copy of the trained model with ``seed`` (the trained
    model is left untouched). ``protocol``: one of `STUDY_PROTOCOLS`; ``simvq`` gives the paper's Table 2 metrics as
    SimVQ's ``evaluation.py`` computes them (LPIPS(VGG16) is ``lpips_vgg``). The ``default`` feature networks are
    loaded once and shared by all runs; ``simvq``'s are loaded per run.
    """
    from .pretrained import inception_network, lpips_network

    if protocol not in STUDY_PROTOCOLS:
        raise ValueError(
            f"`protocol` of the resize study must be one of {list(STUDY_PROTOCOLS)}, got {protocol!r} (adm's npz "
            "files are rated by OpenAI's evaluator: run scripts/evaluate.py --protocol adm --codebook_size N per size)."
        )
    names = parse_metrics(metrics, protocol)
    plan = list(plan) if plan is not None else resize_plan(model.config.codebook_size)
    if protocol == "default" and "lpips" in names and evaluate_kwargs.get("lpips_net") is None:
        evaluate_kwargs["lpips_net"] = lpips_network(evaluate_kwargs.pop("lpips_weights", None))
    if protocol == "default" and "rfid" in names and evaluate_kwargs.get("inception_net") is None:
        evaluate_kwargs["inception_net"] = inception_network(evaluate_kwargs.pop("inception_weights", None))
    num_groups = model.quantizer.num_groups
    rows = []
    for run in plan:
        if run["mode"] is None:
            candidate = model
        else:
            candidate = copy.deepcopy(model)
            candidate.resize_codebook(run["codebook_size"], mode=run["mode"], seed=seed)
        results = evaluate_model(
            candidate, make_dataloader(), metrics=names, accelerator=accelerator, progress=progress, protocol=protocol,
            **evaluate_kwargs,
        )  # fmt: skip
        rows.append({
            "method": run["method"], "mode": run["mode"], "power": run["power"],
            "codebook_size": candidate.config.codebook_size, "groups": num_groups,
            **{k: v for k, v in results.items() if not isinstance(v, (list, dict))},
        })  # fmt: skip
        del candidate
    return rows


def plot_resize_study(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """Figure 4: rFID and PSNR against codebook size (log2 axis), one line per method, the trained size marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("rfid", "psnr") if any(k in row for row in rows)]
    if not panels:
        raise ValueError("`rows` hold neither `rfid` nor `psnr`; run the study with one of them in `metrics`.")
    trained = [r for r in rows if r["method"] == "trained"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, key in zip(axes[0], panels):
        for mode, label, style in (("resample", "resampling", "o-"), ("extend", "self-extension", "s--")):
            mode_rows = [r for r in rows if r["mode"] == mode and key in r]
            if mode_rows:
                points = sorted((r["codebook_size"], r[key]) for r in mode_rows + [t for t in trained if key in t])
                ax.plot(*zip(*points), style, label=label)
        for r in trained:
            ax.axvline(r["codebook_size"], color="gray", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("codebook size")
        ax.set_ylabel({"rfid": "rFID (lower is better)", "psnr": "PSNR dB (higher is better)"}[key])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------- command lines


def _common_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="Local folder or Hub repo id of a GroupVQModel.")
    parser.add_argument(
        "--dataset",
        default="imagenet",
        help="Dataset spec of `groupvq_hf.data.sources` (imagenet, coco, demo, a path, a repo id).",
    )
    parser.add_argument("--split", default="validation")
    parser.add_argument("--image_column", default=None)
    parser.add_argument(
        "--resolution", type=int, default=128, help="Shortest-edge resize then center crop to this size."
    )
    parser.add_argument(
        "--max_samples", type=int, default=None, help="Evaluate the first N images (all ranks together)."
    )
    parser.add_argument("--batch_size", type=int, default=32, help="Images per batch and process.")
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument(
        "--metrics", default=None,
        help=f"Comma-separated subset of {','.join(ALL_METRICS)} (protocol default), of "
        f"{','.join((*PROTOCOL_METRICS['simvq'], 'codebook_usage'))} (simvq) or of "
        f"{','.join((*PROTOCOL_METRICS['adm'], 'codebook_usage'))} (adm); default: all of them.",
    )  # fmt: skip
    parser.add_argument(
        "--lpips_weights", default=None, help="Local VGG16/LPIPS weights file (offline; see groupvq_hf.evaluation.pretrained)."
    )
    parser.add_argument(
        "--inception_weights", default=None,
        help="Local Inception weights file (offline): torch-fidelity's for --protocol default, pytorch-fid's "
        "pt_inception-2015-12-05-6726825d.pth for --protocol simvq.",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="Seed of the codebook resampling draws.")
    parser.add_argument("--no_progress", action="store_true", help="Hide the progress bar.")


PROTOCOL_HELP = {
    "default": "default (groupvq-hf's)",
    "simvq": "simvq (SimVQ's evaluation.py, as the paper's tables)",
    "adm": "adm (the inputs of OpenAI's ADM evaluator, with --npz_dir)",
}


def _protocol_arguments(parser, protocols) -> None:
    """``--protocol`` (one of ``protocols``) and the simvq protocol's ``--lpips_alex_weights``."""
    parser.add_argument(
        "--protocol", choices=protocols, default="default",
        help=f"Whose numbers to reproduce: {', '.join(PROTOCOL_HELP[p] for p in protocols)}; see the README's table "
        "of protocols.",
    )  # fmt: skip
    parser.add_argument(
        "--lpips_alex_weights", default=None,
        help="--protocol simvq: local AlexNet weights file for LPIPS(AlexNet) (e.g. alexnet-owt-7be5be79.pth).",
    )


def evaluate_parser():
    """Arguments of ``scripts/evaluate.py``."""
    import argparse

    parser = argparse.ArgumentParser(
        description="Evaluate a Group-VQ tokenizer: rFID, LPIPS, PSNR, SSIM, codebook usage."
    )
    _common_arguments(parser)
    parser.add_argument(
        "--codebook_size", type=int, default=None, help="Resize the codebook to N codes before evaluating."
    )
    parser.add_argument(
        "--resize_mode",
        choices=RESIZE_MODES,
        default="extend",
        help="How --codebook_size resizes (Algorithm 2).",
    )
    _protocol_arguments(parser, PROTOCOLS)
    parser.add_argument(
        "--npz_dir", default=None,
        help="--protocol adm: write references.npz and reconstructions.npz (arr_0: uint8 (N, H, W, 3)) here.",
    )  # fmt: skip
    parser.add_argument(
        "--save_images", default=None, metavar="DIR",
        help="Write every reference and reconstruction crop as DIR/{references,reconstructions}/ROW.png.",
    )  # fmt: skip
    parser.add_argument("--output", default="results.json", help="Where to write the results JSON.")
    parser.add_argument(
        "--model_card", default=None, help="README.md whose model-index receives the results (created if missing)."
    )
    return parser


def resize_study_parser():
    """Arguments of ``scripts/resize_study.py``."""
    import argparse

    parser = argparse.ArgumentParser(
        description="Codebook resize study (paper Table 2 / Figure 4) of a trained Group-VQ model."
    )
    _common_arguments(parser)
    parser.add_argument("--min_power", type=int, default=-1, help="Resample down to n * 2^min_power (<= 0).")
    parser.add_argument(
        "--max_power", type=int, default=4, help="Resample up and self-extend to n * 2^p, p = 1..max_power."
    )
    _protocol_arguments(parser, STUDY_PROTOCOLS)
    parser.add_argument("--output_dir", default="resize_study", help="Writes resize_study.{json,md,png} here.")
    return parser


def build_accelerator():
    """An `accelerate.Accelerator` for evaluation (CPU processes with gloo when there is no CUDA)."""
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def _dataloader_factory(args, accelerator):
    def make():
        return build_eval_dataloader(
            args.dataset, split=args.split, resolution=args.resolution, batch_size=args.batch_size,
            max_samples=args.max_samples, rank=accelerator.process_index, world_size=accelerator.num_processes,
            image_column=args.image_column, num_workers=args.num_workers,
            transform=protocol_transform(protocol, args.resolution), ordered=ordered,
        )  # fmt: skip

    protocol = getattr(args, "protocol", "default")
    # The order-dependent outputs (psnr_simvq, the npz files, PNG names) need stream rows that do not depend on
    # the number of processes: read in blocks.
    ordered = protocol != "default" or getattr(args, "save_images", None) is not None
    return make


def _report_data(record: dict, notes: Sequence[str]) -> None:
    """Print the notes on the split read and the counts of skipped and converted images."""
    for note in notes:
        print(f"Note: {note}")
    skipped, converted = record.get("skipped_images", 0), record.get("converted_images", 0)
    print(
        f"Evaluated {record.get('num_samples')} images; skipped {skipped} that could not be used"
        + (f" {record.get('skipped_reasons')}" if skipped else "")
        + f"; converted {converted} to RGB"
        + (f" {record.get('converted_modes')}" if converted else "")
        + "."
    )


def run_evaluate(args, accelerator=None) -> dict:
    """``scripts/evaluate.py``: evaluate, write ``args.output`` and optionally the card (main process).

    Returns the results record (see [`results_record`]) on every process.
    """
    names = parse_metrics(args.metrics, args.protocol)
    if (args.npz_dir is not None) != (args.protocol == "adm"):
        raise ValueError(f"`--npz_dir` goes with `--protocol adm` (and adm needs it), got --protocol {args.protocol} "
                         f"and --npz_dir {args.npz_dir}.")  # fmt: skip
    accelerator = accelerator or build_accelerator()
    model = load_model(args.model, accelerator.device)
    context = {
        "model": str(args.model), "protocol": args.protocol, "dataset": args.dataset, "split": args.split,
        "resolution": args.resolution,
    }  # fmt: skip
    if args.codebook_size is not None:
        old = model.config.codebook_size
        model.resize_codebook(args.codebook_size, mode=args.resize_mode, seed=args.seed)
        context["resize"] = {
            "from_size": old,
            "to_size": model.config.codebook_size,
            "mode": args.resize_mode,
            "seed": args.seed,
        }
    context["codebook_size"] = model.config.codebook_size
    context["num_groups"] = model.quantizer.num_groups
    loader = _dataloader_factory(args, accelerator)()
    notes = list(loader.dataset.notes)
    if notes:
        context["notes"] = notes
    results = evaluate_model(
        model, loader, metrics=names, accelerator=accelerator,
        lpips_weights=args.lpips_weights, inception_weights=args.inception_weights,
        progress=not args.no_progress, max_samples=args.max_samples, protocol=args.protocol,
        lpips_alex_weights=args.lpips_alex_weights, npz_dir=args.npz_dir, save_images=args.save_images,
    )  # fmt: skip
    if "npz" in results:
        context["npz"] = results["npz"]
        context["rfid_command"] = adm_evaluator_command(results["npz"])
    if args.save_images is not None:
        context["save_images"] = str(args.save_images)
    record = results_record(results, **context)
    if accelerator.is_main_process:
        _report_data(record, notes)
        if "rfid_command" in record:
            print(f"rFID: run ADM's evaluator in a guided-diffusion checkout: {record['rfid_command']}")
        write_json(record, args.output)
        if args.model_card:
            update_model_card(args.model_card, record, model_name=Path(str(args.model)).name)
    accelerator.wait_for_everyone()
    return record


def run_resize_study(args, accelerator=None) -> dict:
    """``scripts/resize_study.py``: run the study, write JSON, Markdown and PNG (main process); returns the rows."""
    names = parse_metrics(args.metrics, args.protocol)
    accelerator = accelerator or build_accelerator()
    model = load_model(args.model, accelerator.device)
    plan = resize_plan(model.config.codebook_size, args.min_power, args.max_power)
    rows = resize_study(
        model, _dataloader_factory(args, accelerator), plan=plan, metrics=names, seed=args.seed,
        accelerator=accelerator, protocol=args.protocol,
        progress=not args.no_progress, lpips_weights=args.lpips_weights, inception_weights=args.inception_weights,
        lpips_alex_weights=args.lpips_alex_weights, max_samples=args.max_samples,
    )  # fmt: skip
    out = Path(args.output_dir)
    paths = {}
    if accelerator.is_main_process:
        context = {
            "model": str(args.model),
            "protocol": args.protocol,
            "dataset": args.dataset,
            "split": args.split,
            "resolution": args.resolution,
            "seed": args.seed,
        }
        paths["json"] = write_json({**context, "rows": rows}, out / "resize_study.json")
        paths["markdown"] = out / "resize_study.md"
        with atomic_file(paths["markdown"]) as tmp:
            tmp.write_text(resize_study_markdown(rows) + "\n", encoding="utf-8")
        if "rfid" in names or "psnr" in names:
            paths["plot"] = plot_resize_study(rows, out / "resize_study.png")
    accelerator.wait_for_everyone()
    return {"rows": rows, "paths": {k: str(v) for k, v in paths.items()}}



def run_with_accelerator(run, *args, **kwargs):
    """``run(*args, accelerator=..., **kwargs)`` with a fresh [`build_accelerator`], whose process group is torn down
    when it returns or raises: a command's processes then exit without a gloo thread still running (at exit one
    aborts its process, "terminate called without an active exception", failing a finished multi-process run)."""
    accelerator = build_accelerator()
    try:
        return run(*args, accelerator=accelerator, **kwargs)
    finally:
        accelerator.end_training()


def evaluate_main(argv: list[str] | None = None) -> dict:
    """``scripts/evaluate.py`` and the ``groupvq-evaluate`` command."""
    return run_with_accelerator(run_evaluate, evaluate_parser().parse_args(argv))


def resize_study_main(argv: list[str] | None = None) -> dict:
    """``scripts/resize_study.py`` and the ``groupvq-resize-study`` command."""
    return run_with_accelerator(run_resize_study, resize_study_parser().parse_args(argv))

__all__ = [
    "evaluate_main",
    "resize_study_main",
    "ALL_METRICS",
    "DATA_COUNTS",
    "build_accelerator",
    "run_with_accelerator",
    "build_eval_dataloader",
    "evaluate_model",
    "evaluate_parser",
    "load_model",
    "parse_metrics",
    "plot_resize_study",
    "resize_plan",
    "resize_study",
    "resize_study_parser",
    "STUDY_PROTOCOLS",
    "results_record",
    "run_evaluate",
    "run_resize_study",
    "update_model_card",
    "write_json",
]
