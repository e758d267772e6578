"""A CPU-scale reproduction of the paper's trends on the demo photos: an experiment, kept beside its results and out of
the library (run it as ``python scripts/reproduce_trends.py`` or ``python benchmarks/trends/reproduce_trends.py``).

Real training (``groupvq_hf.training``: encoder, decoder and quantizer, the default recipe with the GAN and LPIPS
off) of a 256-code, d = 16 model at 32 px for k = 1, 8, 32 and n groups, then evaluation on held-out crops:

- codebook usage of the EMA model on held-out crops over training steps, per k (appendix C, Figure 8), and the final
  usage, PSNR, SSIM and L1 (Table 4's trend: full usage for moderate k, lower as k approaches n);
- the resize curve of the k = 8 model (Table 2 / Figure 4): resampled to n/2, 2n, 4n and self-extended to 2n, 4n;
- the same runs with the initialisation used before ``core_std`` (N(0, I) cores, codes of std 1/sqrt(3)) as a
  "before" column, and k = 8 with the projectors at the encoder's learning rate, so the effect of each is measured.

Runs go in parallel subprocesses (``--jobs``), one thread each; everything lands in ``--output_dir``:
``results.json``, ``RESULTS.md``, ``usage_curves.png``, ``resize_curve.png`` and one folder per run.
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

from groupvq_hf.quantizer import LEGACY_CORE_STD

CODEBOOK_SIZE, CODEBOOK_DIM, RESOLUTION = 256, 16, 32
GROUPS = (1, 8, 32, CODEBOOK_SIZE)
RESIZE_GROUPS = 8
EVAL_METRICS = ("psnr", "ssim", "l1", "codebook_usage")


def plan_runs(groups=GROUPS, before: bool = True, encoder_lr_projectors: bool = True) -> list[dict]:
    """The training runs: each k at the current initialisation, optionally each k at the old one ("before"), and
    k = 8 with the projectors at the encoder's learning rate (the paper's single learning rate)."""
    runs = [dict(name=f"k{k}", num_groups=k, core_std=None, quantizer_learning_rate=None) for k in groups]
    if before:
        runs += [dict(name=f"k{k}-before", num_groups=k, core_std=LEGACY_CORE_STD, quantizer_learning_rate=None) for k in groups]
    if encoder_lr_projectors and RESIZE_GROUPS in groups:
        runs.append(dict(name=f"k{RESIZE_GROUPS}-projector-lr-1e-4", num_groups=RESIZE_GROUPS, core_std=None,
                         quantizer_learning_rate=1e-4))  # fmt: skip
    return runs


def model_config(num_groups: int, core_std: float | None) -> dict:
    """The tiny preset with 256 codes of dimension 16 (rank 16) in ``num_groups`` groups, at 32 px."""
    from groupvq_hf.configuration_groupvq import GroupVQConfig

    overrides = dict(codebook_size=CODEBOOK_SIZE, num_groups=num_groups, codebook_rank=CODEBOOK_DIM,
                     codebook_dim=CODEBOOK_DIM, latent_channels=CODEBOOK_DIM, sample_size=RESOLUTION)  # fmt: skip
    if core_std is not None:
        overrides["core_std"] = core_std
    return GroupVQConfig.from_preset("tiny", **overrides).to_dict()


def train_arguments(run: dict, run_dir: Path, args: argparse.Namespace) -> list[str]:
    """``scripts/train.py`` flags of one run: the default recipe, GAN and LPIPS off, held-out usage every
    ``--validation_steps``."""
    argv = [
        "--dataset", "demo", "--model_config", str(run_dir / "model_config.json"), "--resolution", str(RESOLUTION),
        "--output_dir", str(run_dir), "--max_train_steps", str(args.max_train_steps),
        "--train_batch_size", str(args.train_batch_size), "--perceptual_weight", "0", "--disc_weight", "0",
        "--dataloader_num_workers", "0", "--validation_steps", str(args.validation_steps),
        "--num_validation_usage_images", str(args.num_usage_images), "--report_to", "none",
        "--checkpointing_steps", "0", "--seed", str(args.seed), "--logging_steps", str(args.validation_steps),
    ]  # fmt: skip
    if run["quantizer_learning_rate"] is not None:
        argv += ["--quantizer_learning_rate", str(run["quantizer_learning_rate"])]
    return argv


def train_run(run: dict, args: argparse.Namespace) -> dict:
    """Train one run in a subprocess (one thread); returns its validation history and timing."""
    run_dir = Path(args.output_dir) / "runs" / run["name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "model_config.json").write_text(json.dumps(model_config(run["num_groups"], run["core_std"]), indent=2))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads_per_run), "MKL_NUM_THREADS": str(args.threads_per_run)}
    code = "import sys, torch; torch.set_num_threads(int(sys.argv[1])); from groupvq_hf.training import main; main(sys.argv[2:])"
    command = [sys.executable, "-c", code, str(args.threads_per_run), *train_arguments(run, run_dir, args)]
    start = time.perf_counter()
    with open(run_dir / "train.log", "w") as log:
        done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"Run {run['name']} failed (exit {done.returncode}); see {run_dir / 'train.log'}.")
    history = [json.loads(line) for line in (run_dir / "validation_log.jsonl").read_text().splitlines() if line]
    return {**run, "train_seconds": time.perf_counter() - start, "history": history, "model_dir": str(run_dir / "model")}


def test_loader(args: argparse.Namespace):
    """The held-out demo test crops (a band of every photo that training never reads)."""
    from groupvq_hf.evaluation import build_eval_dataloader

    return build_eval_dataloader("demo", "test", RESOLUTION, batch_size=64, max_samples=args.num_test_images)


def evaluate_run(model_dir: str, args: argparse.Namespace) -> dict:
    """Final metrics of a trained model on the held-out test crops, with per-group usage."""
    from groupvq_hf.evaluation import evaluate_model, load_model

    results = evaluate_model(load_model(model_dir), test_loader(args), metrics=EVAL_METRICS, progress=False)
    final = {key: results[key] for key in ("psnr", "ssim", "l1", "codebook_usage")}
    return {**final, "group_usage": results["group_usage"]}


def resize_curve(model_dir: str, args: argparse.Namespace) -> list[dict]:
    """The trained model and its resized copies (Algorithm 2) on the held-out test crops."""
    from groupvq_hf.evaluation import load_model, resize_study

    model = load_model(model_dir)
    return resize_study(model, lambda: test_loader(args), plan=resize_plan(model.config.codebook_size),
                        metrics=EVAL_METRICS, seed=args.seed, progress=False)  # fmt: skip


def resize_plan(codebook_size: int) -> list[dict]:
    """Trained size, resampled to n/2, 2n and 4n, self-extended to 2n and 4n (Table 2's rows at this scale)."""
    plan = [dict(method="trained", mode=None, power=0, codebook_size=codebook_size)]
    plan += [dict(method="resample", mode="resample", power=p, codebook_size=int(codebook_size * 2.0**p)) for p in (-1, 1, 2)]
    plan += [dict(method="extend", mode="extend", power=p, codebook_size=codebook_size * 2**p) for p in (1, 2)]
    return plan


def checks(results: dict) -> list[dict]:
    """The issue's targets, each with the measured values and whether they hold (reported, never asserted)."""
    final = {run["name"]: run["final"] for run in results["runs"]}
    rows = []

    def add(target, measured, ok):
        rows.append(dict(target=target, measured=measured, met=bool(ok)))

    n = CODEBOOK_SIZE
    for k in (1, 8):
        if f"k{k}" in final:
            usage = final[f"k{k}"]["codebook_usage"]
            add(f"k = {k} reaches usage >= 0.95", f"{usage:.3f}", usage >= 0.95)
    if "k8" in final and f"k{n}" in final:
        u8, un = final["k8"]["codebook_usage"], final[f"k{n}"]["codebook_usage"]
        add("k = n ends below k = 8 (usage)", f"{un:.3f} vs {u8:.3f}", un < u8)
        p8, pn = final["k8"]["psnr"], final[f"k{n}"]["psnr"]
        add("PSNR of k = 8 >= PSNR of k = n", f"{p8:.2f} vs {pn:.2f} dB", p8 >= pn)
    rows_by = {(r["method"], r["power"]): r for r in results.get("resize", [])}
    if ("trained", 0) in rows_by:
        base = rows_by[("trained", 0)]["psnr"]
        if ("extend", 1) in rows_by:
            ext = rows_by[("extend", 1)]["psnr"]
            add("self-extension x2 does not lower PSNR", f"{ext:.2f} vs {base:.2f} dB", ext >= base)
        if ("resample", -1) in rows_by:
            half = rows_by[("resample", -1)]["psnr"]
            add("resampling to n/2 lowers PSNR", f"{half:.2f} vs {base:.2f} dB", half < base)
    return rows


def markdown(results: dict) -> str:
    """RESULTS.md: the command, the machine, the final table, the resize table and the checks."""
    from groupvq_hf.hub import resize_study_markdown

    lines = [
        "# Group-VQ trends at CPU scale (demo photos, 32 px, 256 codes, d = 16)", "",
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']}; total wall time {results['wall_seconds'] / 60:.1f} min.", "",
        "Real training (encoder, decoder, quantizer) with the default recipe of `scripts/train.py` for `--dataset demo`, "
        f"GAN and LPIPS off, {results['settings']['max_train_steps']} steps of {results['settings']['train_batch_size']} "
        "random-resized crops; metrics of the EMA model on held-out crops (a band of every photo that training never "
        f"reads): usage over training on {results['settings']['num_usage_images']} validation crops, final metrics on "
        f"{results['settings']['num_test_images']} test crops. \"before\": the cores drawn from N(0, I) as before "
        "`core_std` (codes of std 1/sqrt(3)); \"projector lr 1e-4\": projectors at the encoder's learning rate.", "",
        "## Final metrics (held-out test crops)", "",
        "| run | k | core_std | projector lr | usage | min group usage | PSNR | SSIM | L1 | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for run in results["runs"]:
        f = run["final"]
        lines.append(
            f"| {run['name']} | {run['num_groups']} | {run['core_std_used']:.3g} | {run['quantizer_lr_used']:.0e} | "
            f"{f['codebook_usage']:.3f} | {min(f['group_usage']):.3f} | {f['psnr']:.2f} | {f['ssim']:.3f} | "
            f"{f['l1']:.4f} | {run['train_seconds']:.0f} |"
        )
    lines += ["", "## Usage over training (held-out validation crops, EMA model)", "", "![usage](usage_curves.png)", ""]
    steps = sorted({h["step"] for run in results["runs"] for h in run["history"]})
    lines += ["| run | " + " | ".join(str(s) for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for run in results["runs"]:
        by_step = {h["step"]: h["codebook_usage"] for h in run["history"]}
        lines.append(f"| {run['name']} | " + " | ".join(f"{by_step[s]:.2f}" if s in by_step else "" for s in steps) + " |")
    if results.get("resize"):
        lines += ["", f"## Resizing the k = {RESIZE_GROUPS} model without training (Algorithm 2)", "",
                  "![resize](resize_curve.png)", "", resize_study_markdown(results["resize"])]  # fmt: skip
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {c['target']} | {c['measured']} | {'yes' if c['met'] else 'no'} |" for c in results["checks"]]
    return "\n".join(lines) + "\n"


def plot_usage(results: dict, path: Path) -> Path:
    """Usage over steps: one colour per k, solid for the current initialisation, dashed for "before"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colours = {k: plt.cm.viridis(i / max(1, len(GROUPS) - 1)) for i, k in enumerate(GROUPS)}
    for run in results["runs"]:
        steps = [h["step"] for h in run["history"]]
        usage = [h["codebook_usage"] for h in run["history"]]
        style = "--" if run["name"].endswith("before") else (":" if "projector" in run["name"] else "-")
        ax.plot(steps, usage, style, color=colours.get(run["num_groups"], "grey"), marker=".", label=run["name"])
    ax.set_xlabel("training step")
    ax.set_ylabel("codebook usage (held-out crops)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right", bbox_to_anchor=(1.0, 0.12))
    ax.set_title("Usage over training (cf. appendix C, Fig. 8)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", default="outputs/trends")
    p.add_argument("--max_train_steps", type=int, default=400)
    p.add_argument("--train_batch_size", type=int, default=16)
    p.add_argument("--validation_steps", type=int, default=50)
    p.add_argument("--num_usage_images", type=int, default=256, help="held-out validation crops for usage curves")
    p.add_argument("--num_test_images", type=int, default=512, help="held-out test crops for the final metrics")
    p.add_argument("--groups", default=",".join(str(k) for k in GROUPS), help="comma-separated k values (n = 256)")
    p.add_argument("--no_before", action="store_true", help="skip the runs with the old initialisation")
    p.add_argument("--jobs", type=int, default=2, help="training runs at once")
    p.add_argument("--threads_per_run", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> dict:
    import groupvq_hf.evaluation  # noqa: F401  (imported first: a broken import fails now, not after the training)

    args = build_parser().parse_args(argv)
    for name in ("max_train_steps", "train_batch_size", "validation_steps", "num_usage_images", "num_test_images",
                 "jobs", "threads_per_run"):  # fmt: skip
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name}` must be >= 1, got {getattr(args, name)}.")
    groups = tuple(int(k) for k in args.groups.split(","))
    bad = [k for k in groups if k < 1 or CODEBOOK_SIZE % k]
    if bad:
        raise ValueError(f"`--groups` must divide {CODEBOOK_SIZE}, got {bad}.")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    runs = plan_runs(groups, before=not args.no_before)
    with ThreadPoolExecutor(args.jobs) as pool:
        trained = list(pool.map(lambda run: train_run(run, args), runs))
    from groupvq_hf.configuration_groupvq import GroupVQConfig

    for run in trained:
        config = GroupVQConfig.from_pretrained(run["model_dir"])
        run["core_std_used"] = config.core_std
        run["quantizer_lr_used"] = json.loads((Path(run["model_dir"]) / "run_args.json").read_text())[
            "quantizer_learning_rate"
        ]  # what the run trained with, as its export records it
        run["final"] = evaluate_run(run["model_dir"], args)
    results = {
        "command": "python scripts/reproduce_trends.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch threads per run "
        f"{args.threads_per_run}, {args.jobs} runs at once",
        "settings": vars(args),
        "runs": trained,
    }
    if f"k{RESIZE_GROUPS}" in {run["name"] for run in trained}:
        model_dir = next(run["model_dir"] for run in trained if run["name"] == f"k{RESIZE_GROUPS}")
        results["resize"] = resize_curve(model_dir, args)
        from groupvq_hf.evaluation import plot_resize_study

        plot_resize_study(results["resize"], out / "resize_curve.png")
    results["wall_seconds"] = time.perf_counter() - start
    results["checks"] = checks(results)
    plot_usage(results, out / "usage_curves.png")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "RESULTS.md").write_text(markdown(results))
    print((out / "RESULTS.md").read_text())
    return results


__all__ = ["GROUPS", "checks", "main", "markdown", "model_config", "plan_runs", "resize_plan"]


if __name__ == "__main__":
    main()
