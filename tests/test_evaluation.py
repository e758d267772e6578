"""Streaming evaluation, the evaluate / resize-study scripts (1 and 2 processes on demo data), model-index entries."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import reset_accelerate_state
from PIL import Image

from groupvq_hf import GroupVQConfig, GroupVQModel
from groupvq_hf.evaluation import pretrained
from groupvq_hf.evaluation.evaluator import (
    build_eval_dataloader,
    evaluate_model,
    model_index_entries,
    parse_metrics,
    plot_resize_study,
    resize_plan,
    resize_study,
    resize_study_markdown,
    update_model_card,
)
from groupvq_hf.evaluation.metrics import ReconstructionMetrics

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    return {
        "lpips": str(pretrained.save_lpips_weights(folder / "vgg16.pt", dtype=torch.float16)),
        "inception": str(pretrained.save_inception_weights(folder / "inception.pt", dtype=torch.float16)),
    }


def _batches(n_batches=3, batch_size=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(batch_size, 3, 32, 32, generator=g) * 2 - 1 for _ in range(n_batches)]


def _run(args, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


# ---------------------------------------------------------------------------------------------- small parts


def test_resize_plan_covers_table_2_and_figure_4():
    plan = resize_plan(1024, min_power=-1, max_power=3)
    assert [(r["method"], r["mode"], r["codebook_size"]) for r in plan] == [
        ("trained", None, 1024),
        ("downsampling", "resample", 512),
        ("upsampling", "resample", 2048),
        ("upsampling", "resample", 4096),
        ("upsampling", "resample", 8192),
        ("self-extension", "extend", 2048),
        ("self-extension", "extend", 4096),
        ("self-extension", "extend", 8192),
    ]
    with pytest.raises(ValueError, match="min_power"):
        resize_plan(1024, min_power=1)
    with pytest.raises(ValueError, match="cannot be divided"):
        resize_plan(6, min_power=-2)


def test_metrics_parsed():
    assert parse_metrics("psnr, codebook_usage") == ("psnr", "codebook_usage")
    with pytest.raises(ValueError, match="metrics"):
        parse_metrics("psnr,bleu")
    with pytest.raises(ValueError, match="max_samples"):
        build_eval_dataloader("demo", max_samples=0)


def test_eval_dataloader_blocks_cover_consecutive_rows_on_every_rank():
    def rows(rank, world_size, num_workers=0):
        loader = build_eval_dataloader(
            "demo", split="validation", resolution=16, batch_size=2, max_samples=8, rank=rank, world_size=world_size,
            num_workers=num_workers,
        )  # fmt: skip
        batches = iter(loader)
        return [next(batches)["rows"] for _ in range(3)]

    assert rows(0, 1) == [[0, 1], [2, 3], [4, 5]]
    assert rows(0, 1, num_workers=2) == [[0, 1], [2, 3], [4, 5]]  # workers take blocks in turn, order kept
    assert rows(0, 2) == [[0, 1], [4, 5], [8, 9]] and rows(1, 2) == [[2, 3], [6, 7], [10, 11]]


def test_evaluate_model_uses_exactly_max_samples_with_dataloader_workers():
    torch.manual_seed(0)
    model = GroupVQModel(GroupVQConfig.from_preset("tiny")).eval()
    loader = build_eval_dataloader(
        "demo", split="validation", resolution=32, batch_size=2, max_samples=3, num_workers=2
    )
    results = evaluate_model(model, loader, metrics="psnr,codebook_usage", progress=False, max_samples=3)
    assert results["num_images"] == 3 and results["skipped_images"] == 0


def test_demo_validation_gives_256_held_out_crops():
    loader = build_eval_dataloader("demo", split="validation", resolution=16, batch_size=64, max_samples=256)
    model = GroupVQModel(GroupVQConfig.from_preset("tiny")).eval()
    results = evaluate_model(model, loader, metrics="codebook_usage", progress=False, max_samples=256)
    assert results["num_images"] == 256


def test_image_folder_with_bad_files_reports_counts_and_the_split_read(saved_model, tmp_path, capsys):
    """The issue's case: a folder of images with undecodable files, evaluated with the default split."""
    import numpy as np

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        image = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
        (image.convert("L") if i == 0 else image).save(folder / f"img_{i}.png")
    for i in range(2):
        (folder / f"bad_{i}.jpg").write_bytes(b"not a jpeg")
    from groupvq_hf.evaluation.evaluator import evaluate_parser, run_evaluate

    args = evaluate_parser().parse_args([
        "--model", str(saved_model), "--dataset", str(folder), "--resolution", "16", "--metrics", "psnr",
        "--batch_size", "3", "--output", str(tmp_path / "results.json"), "--no_progress",
    ])  # fmt: skip
    try:
        record = run_evaluate(args)
    finally:
        reset_accelerate_state()
    out = capsys.readouterr().out
    assert "Note: local dataset" in out and "Evaluated 6 images; skipped 2" in out and "converted 1 to RGB" in out
    assert record["num_samples"] == 6 and record["skipped_images"] == 2 and record["converted_images"] == 1
    assert list(record["skipped_reasons"].values()) == [2] and record["converted_modes"] == {"L": 1}
    assert "single split ('train')" in record["notes"][0]
    assert json.loads((tmp_path / "results.json").read_text())["skipped_images"] == 2


@pytest.mark.parametrize("max_samples", [None, 10])
@pytest.mark.parametrize(
    "files, skipped",
    [
        ({"a.jpg": "image", "b.jpg": "image", "c.jpg": "image", "d.png": "not an image"}, 1),  # the folder
        ({"a.jpg": "image", "b.jpg": "image", "c.jpg": "image", "z.jpg": "empty"}, 1),  # zero bytes, last
        ({"a.jpg": "image", "b.jpg": "empty", "c.jpg": "image", "d.png": "image", "e.png": "not an image"}, 2),
    ],
)
def test_every_bad_image_is_counted_wherever_it_falls_in_a_batch(tmp_path, files, skipped, max_samples):
    """Bad images after a batch's last good image (and zero-byte files) count, with or without max_samples."""
    import numpy as np

    rng = np.random.default_rng(0)
    for name, kind in files.items():
        if kind == "image":
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / name)
        else:
            (tmp_path / name).write_bytes(b"" if kind == "empty" else b"not an image")
    torch.manual_seed(0)
    model = GroupVQModel(GroupVQConfig.from_preset("tiny")).eval()
    loader = build_eval_dataloader(str(tmp_path), split="train", resolution=16, batch_size=4, max_samples=max_samples)
    results = evaluate_model(model, loader, metrics="codebook_usage", progress=False, max_samples=max_samples)
    assert results["num_images"] == len(files) - skipped
    assert results["skipped_images"] == skipped
    assert results["skipped_reasons"] == {"undecodable:UnidentifiedImageError": skipped}


def test_evaluate_model_matches_a_direct_computation():
    torch.manual_seed(0)
    model = GroupVQModel(GroupVQConfig.from_preset("tiny")).eval()
    batches = _batches()
    results = evaluate_model(model, batches, metrics="psnr,ssim,codebook_usage", progress=False)

    direct = ReconstructionMetrics(metrics="psnr,ssim")
    counts = torch.zeros(model.config.codebook_size, dtype=torch.long)
    with torch.no_grad():
        for pixels in batches:
            out = model(pixels)
            direct.add_batch(predictions=out.reconstruction.clamp(-1, 1), references=pixels)
            counts += torch.bincount(out.indices.flatten(), minlength=len(counts))
    expected = direct.compute()
    assert results["psnr"] == pytest.approx(expected["psnr"], rel=1e-6)
    assert results["ssim"] == pytest.approx(expected["ssim"], rel=1e-6)
    assert results["num_images"] == 6
    assert results["codebook_usage"] == (counts > 0).float().mean().item()
    sizes = model.quantizer.group_sizes
    assert results["group_usage"] == [(c > 0).float().mean().item() for c in counts.split(sizes)]
    assert "lpips" not in results and "rfid" not in results


# ---------------------------------------------------------------------------------------- evaluate script


@pytest.fixture(scope="module")
def parquet_folder(tmp_path_factory):
    """16 rows in 4 parquet shards (only a "train" split): rows 1 and 6 are not images, row 3 is grayscale."""
    import io

    import datasets
    import numpy as np

    root = tmp_path_factory.mktemp("parquet")
    rng = np.random.default_rng(0)
    blobs = []
    for row in range(16):
        image = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        (image.convert("L") if row == 3 else image).save(buffer, format="PNG")
        blobs.append(b"not an image" if row in (1, 6) else buffer.getvalue())
    features = datasets.Features({"image": datasets.Image()})
    for shard in range(4):
        rows = [{"bytes": blob, "path": None} for blob in blobs[4 * shard : 4 * shard + 4]]
        datasets.Dataset.from_dict({"image": rows}, features=features).to_parquet(
            str(root / f"train-{shard:05d}-of-00004.parquet")
        )
    return root


@pytest.mark.parametrize("max_samples", [None, 16])
def test_a_truncated_shard_is_skipped_and_counted_by_name(parquet_folder, tmp_path, max_samples, monkeypatch):
    """Issue 19 item 5: one damaged shard does not end the evaluation; it is named in the skipped counts."""
    import shutil

    import datasets

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)  # arrow workaround, not needed here

    folder = shutil.copytree(parquet_folder, tmp_path / "parquet")
    damaged = folder / "train-00002-of-00004.parquet"  # rows 8-11, all good images
    damaged.write_bytes(damaged.read_bytes()[:100])
    torch.manual_seed(0)
    model = GroupVQModel(GroupVQConfig.from_preset("tiny")).eval()
    loader = build_eval_dataloader(str(folder), split="train", resolution=16, batch_size=3, max_samples=max_samples)
    results = evaluate_model(model, loader, metrics="codebook_usage", progress=False, max_samples=max_samples)
    assert results["num_images"] == 16 - 2 - 4 and results["skipped_images"] == 3
    assert results["skipped_reasons"] == {"undecodable:UnidentifiedImageError": 2, f"unreadable_shard:{damaged}": 1}


@pytest.fixture(scope="module")
def two_process_run(saved_model, weights, parquet_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    card = out / "card" / "README.md"
    args = [
        os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "scripts/evaluate.py", "--model", str(saved_model), "--dataset", str(parquet_folder),
        "--resolution", "32", "--max_samples", "5", "--batch_size", "2",
        "--metrics", "psnr,ssim,lpips,rfid,codebook_usage", "--codebook_size", "512", "--resize_mode", "resample",
        "--seed", "3", "--lpips_weights", weights["lpips"], "--inception_weights", weights["inception"],
        "--output", str(out / "results.json"), "--model_card", str(card), "--no_progress",
    ]  # fmt: skip
    proc = _run(args)
    return json.loads((out / "results.json").read_text()), card, proc.stdout


def test_evaluate_script_two_processes_reduces_like_one(two_process_run, saved_model, weights, parquet_folder):
    record, _, stdout = two_process_run
    assert record["num_samples"] == 5 and record["resolution"] == 32
    assert record["resize"] == {"from_size": 256, "to_size": 512, "mode": "resample", "seed": 3}
    assert record["codebook_size"] == 512 and len(record["group_usage"]) == 8
    # The folder's only split is read for the default split, with a note; the bad row 1 is counted (row 6 lies
    # after the 5th image: rows 0, 2, 3, 4, 5 are evaluated) and the grayscale row 3 converted.
    assert record["split"] == "validation" and "single split ('train')" in record["notes"][0]
    assert record["skipped_images"] == 1 and record["converted_images"] == 1 and record["converted_modes"] == {"L": 1}
    assert "Note: " in stdout and "skipped 1" in stdout and "converted 1" in stdout

    # The same first 5 images in one process (other batches), same resized model: the results must agree.
    model = GroupVQModel.from_pretrained(saved_model).eval()
    model.resize_codebook(512, mode="resample", seed=3)
    loader = build_eval_dataloader(str(parquet_folder), resolution=32, batch_size=3, max_samples=5)
    single = evaluate_model(
        model, loader, lpips_weights=weights["lpips"], inception_weights=weights["inception"], progress=False,
        max_samples=5,
    )  # fmt: skip
    assert single["num_images"] == 5 and single["skipped_images"] == 1 and single["converted_images"] == 1
    metrics = record["metrics"]
    assert set(metrics) == {"psnr", "ssim", "lpips", "rfid", "codebook_usage", "perplexity"}
    for key in ("psnr", "ssim", "lpips", "perplexity"):
        assert metrics[key] == pytest.approx(single[key], rel=1e-5), key
    assert metrics["rfid"] == pytest.approx(single["rfid"], rel=1e-4)
    assert metrics["rfid"] > 0
    assert metrics["codebook_usage"] == single["codebook_usage"]
    assert record["group_usage"] == single["group_usage"]


def test_evaluate_script_writes_the_model_index(two_process_run):
    from huggingface_hub import ModelCard

    record, card_path, _ = two_process_run
    card = ModelCard.load(card_path)
    entries = {e.metric_type: e for e in card.data.eval_results}
    assert set(entries) == {"psnr", "ssim", "lpips", "fid", "codebook_usage", "perplexity"}
    assert entries["fid"].metric_value == pytest.approx(record["metrics"]["rfid"])
    assert entries["psnr"].dataset_split == "validation"
    assert entries["psnr"].task_type == "image-to-image"


def test_update_model_card_replaces_only_the_same_entries(tmp_path):
    card = tmp_path / "README.md"
    first = {"dataset": "imagenet", "split": "validation", "metrics": {"rfid": 3.0, "psnr": 20.0}}
    update_model_card(card, first, model_name="m")
    update_model_card(card, {**first, "metrics": {"rfid": 2.0, "psnr": float("inf")}})  # inf is not a card value
    from huggingface_hub import ModelCard

    values = {e.metric_type: e.metric_value for e in ModelCard.load(card).data.eval_results}
    assert values == {"fid": 2.0, "psnr": 20.0}
    assert [e.metric_type for e in model_index_entries(first)] == ["fid", "psnr"]


# ----------------------------------------------------------------------------------------------- resize study


def test_resize_study_rows_table_and_plot(tmp_path):
    torch.manual_seed(0)
    model = GroupVQModel(GroupVQConfig.from_preset("tiny")).eval()
    codebook = model.quantizer.codebook().detach().clone()
    batches = _batches(2)
    rows = resize_study(
        model, lambda: batches, plan=resize_plan(256, -1, 1), metrics="psnr,codebook_usage", seed=0, progress=False
    )
    assert [(r["method"], r["codebook_size"], r["groups"]) for r in rows] == [
        ("trained", 256, 8), ("downsampling", 128, 8), ("upsampling", 512, 8), ("self-extension", 512, 8),
    ]  # fmt: skip
    assert torch.equal(model.quantizer.codebook(), codebook) and model.config.codebook_size == 256  # untouched
    trained = evaluate_model(model, batches, metrics="psnr,codebook_usage", progress=False)
    assert rows[0]["psnr"] == trained["psnr"] and rows[0]["codebook_usage"] == trained["codebook_usage"]
    assert rows[1]["psnr"] != rows[0]["psnr"]  # the resampled codebooks really are different
    table = resize_study_markdown(rows)
    assert table.splitlines()[0] == "| Method | Codebook Size | Group | Codebook Usage | PSNR↑ |"
    assert "| + self-extension (x2) | 512 | 8 |" in table
    png = plot_resize_study(rows, tmp_path / "study.png")
    assert Image.open(png).size[0] > 100
    with pytest.raises(ValueError, match="rfid"):
        plot_resize_study([{k: v for k, v in r.items() if k != "psnr"} for r in rows], tmp_path / "x.png")


def test_resize_study_script_on_demo(saved_model, tmp_path):
    _run([
        sys.executable, "scripts/resize_study.py", "--model", str(saved_model), "--dataset", "demo",
        "--resolution", "32", "--max_samples", "2", "--metrics", "psnr,ssim,codebook_usage",
        "--min_power", "-1", "--max_power", "1", "--output_dir", str(tmp_path), "--no_progress",
    ])  # fmt: skip
    study = json.loads((tmp_path / "resize_study.json").read_text())
    assert [r["codebook_size"] for r in study["rows"]] == [256, 128, 512, 512]
    assert all(r["num_images"] == 2 for r in study["rows"])
    assert (tmp_path / "resize_study.md").read_text().startswith("| Method |")
    assert Image.open(tmp_path / "resize_study.png").format == "PNG"
    from groupvq_hf.hub.publishing import resize_study_markdown as card_table  # the model card reads the same JSON

    assert "self-extension" in card_table(tmp_path / "resize_study.json")
def test_resize_study_script_with_simvqs_protocol_gives_its_metrics_per_size(saved_model, tmp_path):
    """`--protocol simvq`: SimVQ's preprocessing and metric definitions in every run (the paper's Table 2); the
    trained row equals `evaluate_model(..., protocol="simvq")` on the same stream; adm is refused by name."""
    from groupvq_hf.evaluation import build_eval_dataloader, protocol_transform

    _run([
        sys.executable, "scripts/resize_study.py", "--model", str(saved_model), "--dataset", "demo",
        "--resolution", "32", "--max_samples", "3", "--batch_size", "2", "--protocol", "simvq",
        "--metrics", "psnr,psnr_simvq,ssim,codebook_usage", "--min_power", "0", "--max_power", "1",
        "--output_dir", str(tmp_path), "--no_progress",
    ])  # fmt: skip
    study = json.loads((tmp_path / "resize_study.json").read_text())
    assert study["protocol"] == "simvq"
    assert [(r["method"], r["codebook_size"]) for r in study["rows"]] == [
        ("trained", 256), ("upsampling", 512), ("self-extension", 512),
    ]  # fmt: skip
    assert all({"psnr", "psnr_simvq", "ssim", "codebook_usage"} <= set(r) for r in study["rows"])
    assert "| PSNR↑ | PSNR (SimVQ's)↑ | SSIM↑ |" in (tmp_path / "resize_study.md").read_text()

    model = GroupVQModel.from_pretrained(saved_model).eval()
    loader = build_eval_dataloader("demo", split="validation", resolution=32, batch_size=2, max_samples=3,
                                   transform=protocol_transform("simvq", 32), ordered=True)  # fmt: skip
    trained = evaluate_model(model, loader, metrics="psnr,psnr_simvq,ssim,codebook_usage", protocol="simvq",
                             max_samples=3, progress=False)  # fmt: skip
    for key in ("psnr", "psnr_simvq", "ssim", "codebook_usage"):
        assert study["rows"][0][key] == pytest.approx(trained[key], rel=1e-6), key
    default = evaluate_model(model, build_eval_dataloader("demo", split="validation", resolution=32, batch_size=2,
                                                          max_samples=3), metrics="psnr", progress=False)  # fmt: skip
    assert study["rows"][0]["psnr"] != pytest.approx(default["psnr"], rel=1e-6)  # really SimVQ's crops and uint8
    with pytest.raises(ValueError, match=r"`protocol` of the resize study must be one of \['default', 'simvq'\]"):
        resize_study(model, lambda: loader, protocol="adm")


