"""Does a brief fine-tune recover or improve quality after resizing the codebook (Algorithm 2)? An experiment at CPU
scale on the demo photos, kept beside its results (issue 22, item 5; the reviewers' question).

    python benchmarks/finetune_resize/finetune_resize.py --output_dir outputs/finetune_resize   # ~15 min, 2 cores

Start: the k = 8 model of the CPU-scale reproduction (``benchmarks/trends/reproduce_trends.py``: 256 codes, d = 16,
32 px, 400 steps). ``--base_model`` names a trained one; without it the driver trains it first in
``OUTPUT_DIR/runs/k8`` with the reproduction's own settings (its ``train_run``). Then, for the base size (the
control: no resize) and the base resampled to n/2 and self-extended to 2n and 4n (``--codebook_size N
--resize_mode M --resize_seed 0``), ``scripts/train.py --init_from BASE`` fine-tunes (a) the quantizer only
(``--trainable quantizer``: the projectors W_j, b_j) and (b) ``--trainable quantizer+decoder`` for
``--finetune_steps`` steps with the reproduction's recipe (the demo recipe, GAN and LPIPS off) and another data seed.
Every model is measured before and after on the reproduction's held-out test crops (PSNR, SSIM, usage). The control
row says what the same number of extra steps gives without a resize, so a gain from extra training is not credited
to the resize. Results: ``results.json`` and ``RESULTS.md`` in ``--output_dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "trends"))
import reproduce_trends as trends  # noqa: E402  (the reproduction whose k = 8 model and settings this starts from)

BASE_RUN = "k8"
RESIZE_SEED = 0
TRAINABLE = ("quantizer", "quantizer+decoder")


def variants(codebook_size: int) -> list[dict]:
    """The control (no resize), resampled to n/2, self-extended to 2n and 4n."""
    return [
        dict(name="control", mode=None, codebook_size=codebook_size),
        dict(name="resample-n/2", mode="resample", codebook_size=codebook_size // 2),
        dict(name="extend-2n", mode="extend", codebook_size=codebook_size * 2),
        dict(name="extend-4n", mode="extend", codebook_size=codebook_size * 4),
    ]


def finetune_arguments(variant: dict, trainable: str, base_model: str, run_dir: Path, args, trends_args) -> list[str]:
    """``scripts/train.py`` flags: the reproduction's (``trends.train_arguments``) without ``--model_config``, from
    ``--init_from`` the base, resized, with only ``trainable`` training, for ``--finetune_steps``."""
    argv = trends.train_arguments({"quantizer_learning_rate": None}, run_dir, trends_args)
    at = argv.index("--model_config")
    del argv[at : at + 2]
    argv += ["--init_from", base_model, "--trainable", trainable]
    if variant["mode"] is not None:
        argv += ["--codebook_size", str(variant["codebook_size"]), "--resize_mode", variant["mode"],
                 "--resize_seed", str(RESIZE_SEED)]  # fmt: skip
    return argv


def finetune_run(variant: dict, trainable: str, base_model: str, args, trends_args) -> dict:
    """One fine-tune in a subprocess (one thread, as the reproduction's runs); returns its timing and model folder."""
    name = f"{variant['name'].replace('/', '')}-{trainable.replace('+', '-')}"
    run_dir = Path(args.output_dir) / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    code = "import sys, torch; torch.set_num_threads(1); from groupvq_hf.training import main; main(sys.argv[1:])"
    command = [sys.executable, "-c", code, *finetune_arguments(variant, trainable, base_model, run_dir, args, trends_args)]
    start = time.perf_counter()
    with open(run_dir / "train.log", "w") as log:
        done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"Fine-tune {name} failed (exit {done.returncode}); see {run_dir / 'train.log'}.")
    return {"name": name, "variant": variant["name"], "trainable": trainable, "model_dir": str(run_dir / "model"),
            "train_seconds": time.perf_counter() - start}  # fmt: skip


def measure(model, trends_args) -> dict:
    """PSNR, SSIM, L1 and usage on the reproduction's held-out test crops."""
    from groupvq_hf.evaluation import evaluate_model

    results = evaluate_model(model, trends.test_loader(trends_args), metrics=trends.EVAL_METRICS, progress=False)
    return {key: results[key] for key in ("psnr", "ssim", "l1", "codebook_usage")}


def before_finetune(base_model: str, variant: dict, trends_args) -> dict:
    """The base model resized as ``--init_from`` resizes it (same call, same seed), measured without training."""
    import torch

    from groupvq_hf.evaluation import load_model

    model = load_model(base_model)
    if variant["mode"] is not None:
        with torch.no_grad():
            model.resize_codebook(variant["codebook_size"], mode=variant["mode"], seed=RESIZE_SEED)
    return measure(model, trends_args)


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [
        "# Fine-tuning after a codebook resize (CPU scale: demo photos, 32 px, k = 8, d = 16)", "",
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']}; total wall time {results['wall_seconds'] / 60:.1f} min.", "",
        f"Base: the k = 8 model of `benchmarks/trends` ({results['base']['source']}: 256 codes in 8 groups, "
        f"{s['base_steps']} steps). Each row starts from it, resized with Algorithm 2 (`--resize_seed {RESIZE_SEED}`; "
        "the control is not resized), then fine-tunes with `scripts/train.py --init_from` for "
        f"{s['finetune_steps']} steps of {s['train_batch_size']} crops (the reproduction's recipe: demo recipe, GAN and "
        "LPIPS off; data seed 1): `quantizer` trains the projectors W_j, b_j only (encoder, decoder and cores "
        "bit-identical), `quantizer+decoder` also the decoder and post_quant_conv. Metrics of the exported EMA model "
        f"on {s['num_test_images']} held-out test crops (a band of every photo training never reads). "
        "\"vs control\": PSNR after, minus the control's PSNR after the same fine-tune (the gain of the same extra "
        "steps without a resize).", "",
        "| start | codebook | trainable | usage before | usage after | PSNR before | PSNR after | vs control | "
        "SSIM before | SSIM after | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    control = {row["trainable"]: row["after"]["psnr"] for row in results["rows"] if row["variant"] == "control"}
    for row in results["rows"]:
        b, a = row["before"], row["after"]
        delta = a["psnr"] - control[row["trainable"]]
        lines.append(
            f"| {row['variant']} | {row['codebook_size']:,} | {row['trainable']} | {b['codebook_usage']:.3f} | "
            f"{a['codebook_usage']:.3f} | {b['psnr']:.2f} | {a['psnr']:.2f} | {delta:+.2f} | {b['ssim']:.3f} | "
            f"{a['ssim']:.3f} | {row['train_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", default="outputs/finetune_resize")
    p.add_argument("--base_model", default=None, help="a trained k = 8 model of the reproduction (default: train it)")
    p.add_argument("--finetune_steps", type=int, default=300)
    p.add_argument("--jobs", type=int, default=2, help="fine-tunes at once (one thread each)")
    p.add_argument("--num_test_images", type=int, default=512)
    return p


def main(argv: list[str] | None = None) -> dict:
    import torch

    args = build_parser().parse_args(argv)
    for name in ("finetune_steps", "jobs", "num_test_images"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name}` must be >= 1, got {getattr(args, name)}.")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # The reproduction's settings (its defaults), with this driver's fine-tune length and data seed.
    base_args = trends.build_parser().parse_args(["--output_dir", str(out), "--num_test_images", str(args.num_test_images)])
    if args.base_model is None:
        run = next(run for run in trends.plan_runs(before=False, encoder_lr_projectors=False) if run["name"] == BASE_RUN)
        base = trends.train_run(run, base_args)
        base_model, source = base["model_dir"], f"trained here in {base['train_seconds']:.0f} s"
    else:
        base_model, source = args.base_model, f"`{args.base_model}`"
    ft_args = argparse.Namespace(**{**vars(base_args), "max_train_steps": args.finetune_steps, "seed": 1,
                                    "validation_steps": args.finetune_steps})  # fmt: skip
    from groupvq_hf import GroupVQConfig

    size = GroupVQConfig.from_pretrained(base_model).codebook_size
    plan = [(variant, trainable) for variant in variants(size) for trainable in TRAINABLE]
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda item: finetune_run(*item, base_model, args, ft_args), plan))
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    before = {v["name"]: before_finetune(base_model, v, base_args) for v in variants(size)}
    from groupvq_hf.evaluation import load_model

    rows = []
    for (variant, trainable), run in zip(plan, runs):
        rows.append({**run, "codebook_size": variant["codebook_size"], "mode": variant["mode"],
                     "before": before[variant["name"]], "after": measure(load_model(run["model_dir"]), base_args)})  # fmt: skip
    results = {
        "command": "python benchmarks/finetune_resize/finetune_resize.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, one torch thread per "
        f"fine-tune, {args.jobs} at once",
        "settings": {**vars(args), "base_steps": base_args.max_train_steps, "train_batch_size": base_args.train_batch_size},
        "base": {"model_dir": base_model, "source": source, "metrics": before["control"]},
        "rows": rows,
        "wall_seconds": time.perf_counter() - start,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "RESULTS.md").write_text(markdown(results))
    print((out / "RESULTS.md").read_text())
    return results


if __name__ == "__main__":
    main()
