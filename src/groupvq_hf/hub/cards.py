"""Evaluation results formatted for model cards: the one place `evaluation` (``--model_card``) and `hub` (the card of
`publish`) read them from, so both write the same model-index entries and the same resize-study table.

- `normalize_eval_results`: the JSON of ``scripts/evaluate.py`` (or a dict) -> the metrics a card shows (`METRICS`).
- `model_index_entries`: those as `huggingface_hub.EvalResult`s for the card's ``model-index``.
- `resize_study_markdown`: the resize study (rows, its JSON or a ``.md`` file) as a Markdown table, the paper's
  Table 2 layout for the rows of ``scripts/resize_study.py``.

Imports no other module of the package but `data` (dataset ids), so neither of its users imports the other.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import EvalResult

from ..data.sources import SOURCES
from ..training.arguments import DEFAULT_EMA_DECAY, build_parser

DATASET_IDS = {name: source.repo_id for name, source in SOURCES.items()} | {"imagenet-1k": "ILSVRC/imagenet-1k"}
DATASET_NAMES = {"ILSVRC/imagenet-1k": "ImageNet-1k", "detection-datasets/coco": "MS-COCO"}
# `scripts/evaluate.py` key -> (model-index metric type, display name, lower is better)
METRICS = {
    "rfid": ("fid", "rFID", True),
    "lpips": ("lpips", "LPIPS", True),
    "psnr": ("psnr", "PSNR", False),
    "psnr_simvq": ("psnr_simvq", "PSNR (SimVQ, per 64-image batch)", False),
    "lpips_alex": ("lpips_alex", "LPIPS (AlexNet)", True),
    "lpips_vgg": ("lpips_vgg", "LPIPS (VGG)", True),
    "ssim": ("ssim", "SSIM", False),
    "codebook_usage": ("codebook_usage", "Codebook usage", False),
    "perplexity": ("perplexity", "Perplexity", False),
}
# Columns of the resize study table (the paper's Table 2): row key, header, format.
RESIZE_STUDY_COLUMNS = (
    ("method", "Method", "{}"), ("codebook_size", "Codebook Size", "{:,}"), ("groups", "Group", "{}"),
    ("codebook_usage", "Codebook Usage", "{:.1%}"), ("rfid", "rFID↓", "{:.2f}"), ("lpips", "LPIPS↓", "{:.3f}"),
    ("lpips_vgg", "LPIPS (VGG16)↓", "{:.3f}"), ("lpips_alex", "LPIPS (AlexNet)↓", "{:.3f}"),
    ("psnr", "PSNR↑", "{:.2f}"), ("psnr_simvq", "PSNR (SimVQ's)↑", "{:.2f}"), ("ssim", "SSIM↑", "{:.3f}"),
)  # fmt: skip  # `lpips_*` and `psnr_simvq`: resize studies run with --protocol simvq


def read_json(value, name: str):
    """`value` as is when None, a dict or a list; else the path of a JSON file (read) or of a ``.md`` file (its text)."""
    if value is None or isinstance(value, (dict, list)):
        return value
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"`{name}` must be a dict/list or the path of a JSON file, got {value!r} (no such file).")
    if path.suffix == ".md":
        return path.read_text(encoding="utf-8")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"`{name}` file {str(path)!r} is not valid JSON: {err}") from None


def normalize_eval_results(results) -> dict | None:
    """The results of `scripts/evaluate.py` (a dict or its JSON file) as ``{"metrics": {...}, "dataset": ...}``.

    Metrics may sit at the top level or under ``"metrics"``/``"results"``; known names are `METRICS`' keys
    (``rfid``, ``lpips``, ``psnr``, ``ssim``, ``codebook_usage``, ``perplexity``; ``fid`` is read as ``rfid``);
    non-finite values (PSNR of identical images) are left out. Context keys read when present: ``dataset``,
    ``split``, ``resolution``, ``max_samples``/``num_samples``, ``protocol`` (`groupvq_hf.evaluation.PROTOCOLS`;
    ``"default"`` when absent, as in results written before protocols existed).
    """
    results = read_json(results, "eval_results")
    if results is None:
        return None
    if not isinstance(results, dict):
        raise ValueError(f"`eval_results` must be a JSON object of metric values, got {type(results).__name__}.")
    source = results.get("metrics", results.get("results", results))
    metrics = {}
    for key, value in (source or {}).items():
        key = "rfid" if key.lower() == "fid" else key.lower()
        if key in METRICS and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            metrics[key] = float(value)
    if not metrics:
        raise ValueError(f"`eval_results` holds none of the metrics {sorted(METRICS)}; got keys {sorted(source)}.")
    return {
        "metrics": metrics,
        "dataset": results.get("dataset", "imagenet"),
        "split": results.get("split"),
        "resolution": results.get("resolution"),
        "num_samples": results.get("num_samples", results.get("max_samples")),
        "protocol": results.get("protocol", "default"),
    }


def dataset_id(name: str) -> str:
    """The Hub id of a dataset named as `groupvq_hf.data.sources` names it (``imagenet``, ``coco``, ...); else `name`."""
    return DATASET_IDS.get(str(name).lower(), name)


def model_index_entries(eval_results) -> list[EvalResult]:
    """`scripts/evaluate.py` results as `huggingface_hub.EvalResult`s for a card's `model-index` (empty if None).
    Each names the evaluation protocol: ``metric_config`` ``"protocol=NAME"`` and the metric name's suffix."""
    evals = normalize_eval_results(eval_results)
    if evals is None:
        return []
    dataset = dataset_id(evals["dataset"])
    return [
        EvalResult(
            task_type="image-to-image",
            task_name="Image reconstruction",
            dataset_type=dataset,
            dataset_name=DATASET_NAMES.get(dataset, dataset),
            dataset_split=evals["split"],
            metric_type=METRICS[key][0],
            metric_name=f"{METRICS[key][1]} ({evals['protocol']} protocol)",
            metric_config=f"protocol={evals['protocol']}",
            metric_value=value,
        )
        for key, value in evals["metrics"].items()
    ]


def _paper_table(rows: Sequence[dict]) -> list[str]:
    """Rows of `groupvq_hf.evaluation.resize_study` in Table 2's layout (columns for the metrics present)."""
    columns = [c for c in RESIZE_STUDY_COLUMNS if any(c[0] in row for row in rows)]
    lines = ["| " + " | ".join(c[1] for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        power = row["power"]
        factor = f"x{2**power}" if power > 0 else f"/{2**-power}"
        label = "Group-VQ" if row["method"] == "trained" else f"+ {row['method']} ({factor})"
        cells = [
            label if key == "method" else (fmt.format(row[key]) if row.get(key) is not None else "")
            for key, _, fmt in columns
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _plain_table(rows: Sequence[dict]) -> list[str]:
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def cell(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value if value is not None else "")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]


def resize_study_markdown(study) -> str | None:
    """The resize study as a Markdown table (no trailing newline); None stays None.

    ``study``: the rows of `groupvq_hf.evaluation.resize_study` (or ``{"rows": [...]}``, or the path of
    ``resize_study.json``), laid out like the paper's Table 2; a ``.md`` file, used as is; other row lists, one
    column per key.
    """
    study = read_json(study, "resize_study")
    if study is None or isinstance(study, str):
        return study
    rows = study.get("rows", study.get("results")) if isinstance(study, dict) else study
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise ValueError("`resize_study` must be a Markdown file, a list of row objects or {'rows': [...]}.")
    paper_layout = all("method" in row and "power" in row for row in rows)
    return "\n".join(_paper_table(rows) if paper_layout else _plain_table(rows))



# The loss and optimiser settings that make up the recipe, and how the model card names them.
RECIPE_ARGUMENTS = (
    "perceptual_weight", "generator_loss", "disc_weight", "adaptive_disc_weight", "disc_start", "commitment_weight",
    "learning_rate", "quantizer_learning_rate", "disc_learning_rate", "adam_beta1", "adam_beta2", "adam_weight_decay", "lr_scheduler",
    "lr_warmup_steps", "max_grad_norm", "ema_decay", "ema_warmup", "no_ema",
)  # fmt: skip
SIMVQ_RECIPE = (
    "SimVQ's released recipe (`configs/imagenet_simvq_128_B.yaml`, which the paper's section 4.1 follows), the "
    "default of `scripts/train.py` in groupvq-hf: L1 + LPIPS (VGG16, weight 1) reconstruction loss; a PatchGAN "
    "discriminator from step 0 with the hinge loss; the non-saturating generator loss (softplus of minus each "
    "image's mean patch logit) with a fixed weight 0.1 (no adaptive weight); the Group-VQ commitment loss "
    "`0.25*||z - sg(q)||^2 + ||sg(z) - q||^2` (Eq. 3) with weight 1; Adam, learning rate 1e-4 constant, betas "
    "(0.5, 0.9), no gradient clipping; only the projectors W_j, b_j of the codebook train, the cores stay frozen "
    "(Algorithm 1). The exported weights are an EMA of the trained ones with a fixed decay 0.999."
)


def describe_recipe(training: dict | None) -> str:
    """The model card's training summary: SimVQ's recipe, and which of its settings ``training`` (the arguments
    of ``scripts/train.py``, e.g. its ``run_args.json``) changed."""
    if not training or not any(name in training for name in RECIPE_ARGUMENTS):
        return SIMVQ_RECIPE + " The training arguments of this checkpoint were not supplied."
    return _describe_changes(training) + describe_start(training)


def describe_start(training: dict) -> str:
    """What a run started from (``scripts/train.py --init_from``): the model, its Hub commit, the resize and the parts
    that trained; empty for a run from scratch."""
    if not training.get("init_from"):
        return ""
    commit = f" (commit `{training['init_from_commit']}`)" if training.get("init_from_commit") else ""
    text = f" **Fine-tuned from** `{training['init_from']}`{commit}"
    if training.get("codebook_size"):
        text += (f", its codebook resized to {training['codebook_size']:,} codes by {training.get('resize_mode')} "
                 f"(Algorithm 2, seed {training.get('resize_seed')}) before the first step")  # fmt: skip
    trainable = training.get("trainable", "all")
    return text + (", training everything." if trainable == "all" else f", training only the {trainable}.")


def _describe_changes(training: dict) -> str:
    parser = build_parser()
    changed = []
    for name in RECIPE_ARGUMENTS:
        default = parser.get_default(name)
        if name in ("disc_learning_rate", "quantizer_learning_rate"):
            default = training.get("learning_rate", parser.get_default("learning_rate"))
        elif name == "ema_warmup":
            default = False
        elif name == "ema_decay":  # the flag's default is None (so --no_ema can tell it was given)
            default = DEFAULT_EMA_DECAY
        if name in training and training[name] != default:
            changed.append(f"`--{name} {training[name]}`")
    if not changed:
        return "Trained with " + SIMVQ_RECIPE
    return f"Trained with {SIMVQ_RECIPE} **Changed from that recipe for this run:** {', '.join(changed)}."


__all__ = [
    "RECIPE_ARGUMENTS",
    "SIMVQ_RECIPE",
    "describe_recipe",
    "DATASET_IDS",
    "DATASET_NAMES",
    "METRICS",
    "RESIZE_STUDY_COLUMNS",
    "dataset_id",
    "model_index_entries",
    "normalize_eval_results",
    "read_json",
    "resize_study_markdown",
]
