"""Does a brief fine-tune recover or improve quality after resizing the codebook (Algorithm 2)? An experiment at CPU
scale on the demo photos, kept beside its results (issue 22, item 5; the reviewers' question).

    python benchmarks/finetune_resize/finetune_resize.py --output_dir outputs/finetune_resize
    # 24 min measured on 2 CPU cores shared with other jobs (13 of them training the base), see RESULTS.md

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


def run_name(variant: dict, trainable: str | None) -> str:
    return variant["name"].replace("/", "") + ("" if trainable is None else "-" + trainable.replace("+", "-"))


def job(variant: dict, trainable: str | None, base_model: str, args, trends_args) -> dict:
    """One subprocess (one thread, as the reproduction's runs): with ``trainable``, fine-tune then measure the export;
    without, measure the base resized as ``--init_from`` resizes it (the "before" column)."""
    name = run_name(variant, trainable)
    run_dir = Path(args.output_dir) / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {"train": None, "model_dir": base_model, "resize": None if variant["mode"] is None else variant,
            "num_test_images": args.num_test_images, "out": str(run_dir / "metrics.json")}  # fmt: skip
    if trainable is not None:
        spec.update(train=finetune_arguments(variant, trainable, base_model, run_dir, args, trends_args),
                    model_dir=str(run_dir / "model"), resize=None)  # fmt: skip
    (run_dir / "job.json").write_text(json.dumps(spec, indent=2))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    code = ("import sys, torch; torch.set_num_threads(1); sys.path.insert(0, sys.argv[1]); "
            "import finetune_resize as f; f.child(sys.argv[2])")
    start = time.perf_counter()
    with open(run_dir / "job.log", "w") as log:
        done = subprocess.run([sys.executable, "-c", code, str(HERE), str(run_dir / "job.json")], env=env, stdout=log,
                              stderr=subprocess.STDOUT)  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"Job {name} failed (exit {done.returncode}); see {run_dir / 'job.log'}.")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"name": name, "variant": variant["name"], "trainable": trainable, "model_dir": spec["model_dir"],
            "seconds": time.perf_counter() - start, **metrics}  # fmt: skip


def child(spec_path: str) -> None:
    """Inside a job's subprocess: train (``spec["train"]``, scripts/train.py's flags) when asked, then measure
    ``spec["model_dir"]`` (resized by ``spec["resize"]`` when given) and write the metrics and the training time."""
    spec = json.loads(Path(spec_path).read_text())
    train_seconds = None
    if spec["train"] is not None:
        from groupvq_hf.training import main as train

        start = time.perf_counter()
        train(spec["train"])
        train_seconds = time.perf_counter() - start
    trends_args = argparse.Namespace(num_test_images=spec["num_test_images"])
    metrics = before_finetune(spec["model_dir"], spec["resize"], trends_args)
    Path(spec["out"]).write_text(json.dumps({"metrics": metrics, "train_seconds": train_seconds}))


def measure(model, trends_args) -> dict:
    """PSNR, SSIM, L1 and usage on the reproduction's held-out test crops."""
    from groupvq_hf.evaluation import evaluate_model

    results = evaluate_model(model, trends.test_loader(trends_args), metrics=trends.EVAL_METRICS, progress=False)
    return {key: results[key] for key in ("psnr", "ssim", "l1", "codebook_usage")}


def before_finetune(model_dir: str, resize: dict | None, trends_args) -> dict:
    """The model of ``model_dir``, resized as ``--init_from`` resizes it (same call, same seed) when ``resize`` is
    given, measured."""
    import torch

    from groupvq_hf.evaluation import load_model

    model = load_model(model_dir)
    if resize is not None:
        with torch.no_grad():
            model.resize_codebook(resize["codebook_size"], mode=resize["mode"], seed=RESIZE_SEED)
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
        f"{s['finetune_steps']} steps of {s['train_batch_size']} crops (the reproduction's recipe: demo recipe, GAN "
        "and LPIPS off; data seed 1): `quantizer` trains the projectors W_j, b_j only (encoder, decoder and cores "
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
    p.add_argument("--finetune_steps", type=int, default=200)
    p.add_argument("--jobs", type=int, default=2, help="fine-tunes at once (one thread each)")
    p.add_argument("--num_test_images", type=int, default=256, help="held-out test crops (the reproduction used 512)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    for name in ("finetune_steps", "jobs", "num_test_images"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name}` must be >= 1, got {getattr(args, name)}.")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # The reproduction's settings (its defaults), with this driver's fine-tune length and data seed.
    base_args = trends.build_parser().parse_args(
        ["--output_dir", str(out), "--num_test_images", str(args.num_test_images)]
    )
    if args.base_model is None:
        reproduction = trends.plan_runs(before=False, encoder_lr_projectors=False)
        run = next(run for run in reproduction if run["name"] == BASE_RUN)
        base = trends.train_run(run, base_args)
        base_model, source = base["model_dir"], f"trained here in {base['train_seconds']:.0f} s"
    else:
        base_model, source = args.base_model, f"`{args.base_model}`"
    # held-out usage is measured on the test crops below: the runs' own validation usage is off
    ft_args = argparse.Namespace(**{**vars(base_args), "max_train_steps": args.finetune_steps, "seed": 1,
                                    "validation_steps": args.finetune_steps, "num_usage_images": 0})  # fmt: skip
    from groupvq_hf import GroupVQConfig

    size = GroupVQConfig.from_pretrained(base_model).codebook_size
    base_steps = json.loads((Path(base_model) / "run_args.json").read_text())["max_train_steps"]
    plan = [(variant, trainable) for variant in variants(size) for trainable in (*TRAINABLE, None)]
    with ThreadPoolExecutor(args.jobs) as pool:  # fine-tunes first (the longest), measurements of the resizes last
        ordered = sorted(plan, key=lambda item: item[1] is None)
        done = list(pool.map(lambda item: job(*item, base_model, args, ft_args), ordered))
    before = {run["variant"]: run["metrics"] for run in done if run["trainable"] is None}
    rows = []
    for run in done:
        if run["trainable"] is not None:
            variant = next(v for v in variants(size) if v["name"] == run["variant"])
            after = run.pop("metrics")
            rows.append({**run, "codebook_size": variant["codebook_size"], "mode": variant["mode"],
                         "before": before[run["variant"]], "after": after})  # fmt: skip
    results = {
        "command": "python benchmarks/finetune_resize/finetune_resize.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (shared with other "
        f"jobs), one torch thread per job, {args.jobs} jobs at once",
        "settings": {**vars(args), "base_steps": base_steps, "train_batch_size": base_args.train_batch_size},
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
