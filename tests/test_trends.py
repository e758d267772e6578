"""scripts/reproduce_trends.py: the CPU-scale reproduction runs end to end (tiny settings) and reports its targets."""

import json

import importlib.util
from pathlib import Path

# The driver is an experiment kept beside its results (benchmarks/trends/), not part of the library.
_DRIVER = Path(__file__).resolve().parents[1] / "benchmarks" / "trends" / "reproduce_trends.py"
_spec = importlib.util.spec_from_file_location("reproduce_trends", _DRIVER)
reproduce_trends = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reproduce_trends)
checks, main, model_config, plan_runs = (
    reproduce_trends.checks, reproduce_trends.main, reproduce_trends.model_config, reproduce_trends.plan_runs
)


def test_plan_and_configs():
    names = [run["name"] for run in plan_runs()]
    assert names == ["k1", "k8", "k32", "k256", "k1-before", "k8-before", "k32-before", "k256-before",
                     "k8-projector-lr-1e-4"]  # fmt: skip
    assert model_config(8, None)["core_std"] == 0.25  # SimVQ's N(0, 1/d) at d = 16
    assert model_config(8, 1.0)["core_std"] == 1.0
    assert model_config(256, None)["num_groups"] == 256


def test_checks_report_each_target():
    def run(name, usage, psnr):
        return {"name": name, "final": {"codebook_usage": usage, "psnr": psnr}}

    results = {
        "runs": [run("k1", 0.97, 20.0), run("k8", 0.99, 21.0), run("k256", 0.5, 21.5)],
        "resize": [
            {"method": "trained", "power": 0, "psnr": 21.0},
            {"method": "extend", "power": 1, "psnr": 21.0},
            {"method": "resample", "power": -1, "psnr": 21.2},
        ],
    }
    met = {row["target"]: row["met"] for row in checks(results)}
    assert met == {
        "k = 1 reaches usage >= 0.95": True,
        "k = 8 reaches usage >= 0.95": True,
        "k = n ends below k = 8 (usage)": True,
        "PSNR of k = 8 >= PSNR of k = n": False,
        "self-extension x2 does not lower PSNR": True,
        "resampling to n/2 lowers PSNR": False,
    }


def test_reproduce_trends_end_to_end(tmp_path):
    out = tmp_path / "trends"
    results = main([
        "--output_dir", str(out), "--max_train_steps", "2", "--validation_steps", "1", "--train_batch_size", "2",
        "--groups", "8", "--no_before", "--num_usage_images", "4", "--num_test_images", "4", "--jobs", "2",
    ])  # fmt: skip
    assert [run["name"] for run in results["runs"]] == ["k8", "k8-projector-lr-1e-4"]
    for run in results["runs"]:
        assert [h["step"] for h in run["history"]] == [1, 2]
        assert 0 < run["final"]["codebook_usage"] <= 1 and len(run["final"]["group_usage"]) == 8
    assert results["runs"][0]["core_std_used"] == 0.25
    assert results["runs"][1]["quantizer_lr_used"] == 1e-4
    assert [(r["method"], r["codebook_size"]) for r in results["resize"]] == [
        ("trained", 256), ("resample", 128), ("resample", 512), ("resample", 1024), ("extend", 512), ("extend", 1024)
    ]
    saved = json.loads((out / "results.json").read_text())
    assert saved["runs"][0]["history"] == results["runs"][0]["history"]
    text = (out / "RESULTS.md").read_text()
    assert "| k8 | 8 | 0.25 |" in text and "## Targets" in text
    for name in ("usage_curves.png", "resize_curve.png"):
        assert (out / name).stat().st_size > 1000



def test_script_runs_from_the_scripts_folder():
    # scripts/evaluate.py is named like the `evaluate` library; run as `python scripts/reproduce_trends.py`, the
    # script's folder comes first on sys.path and must be dropped, or evaluation fails after all the training.
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "reproduce_trends.py"
    done = subprocess.run([sys.executable, str(script), "--groups", "3"], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "`--groups` must divide 256, got [3]" in done.stderr, done.stderr[-2000:]
