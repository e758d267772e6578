"""Training: VQGAN losses, resumable stream, checkpoint helpers, and real runs of scripts/train.py (tiny, 32x32, CPU)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import train_in_process

from groupvq_hf.data import build_image_dataset
from groupvq_hf.training.losses import PatchGANDiscriminator, VQGANLoss, adaptive_generator_weight, hinge_d_loss, hinge_g_loss
from groupvq_hf.data import ResumableBatches
from groupvq_hf.training import (
    COMPLETE_FILE,
    NonFiniteGuard,
    list_checkpoints,
    parse_args,
    resolve_model_config,
    resolve_resume_path,
    rotate_checkpoints,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(REPO_ROOT / "scripts" / "train.py")
TINY_RUN = [
    "--model_config", "tiny", "--resolution", "32", "--train_batch_size", "4", "--perceptual_weight", "0",
    "--dataloader_num_workers", "0", "--logging_steps", "1", "--validation_steps", "2", "--num_validation_images", "2",
    "--disc_start", "1", "--report_to", "none", "--seed", "7", "--num_validation_usage_images", "8",
]  # fmt: skip


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


def _train(output_dir: Path, *extra: str) -> dict:
    """One run of the training script's code in this process (`conftest.train_in_process`)."""
    return train_in_process(["--output_dir", str(output_dir), *TINY_RUN, *extra])


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


# ---------------------------------------------------------------------------------------------------- losses
def test_hinge_losses_known_values():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, 0.5, 2] -> 5/6; relu(1 + fake) = [0, 1, 2] -> 1
    assert torch.allclose(hinge_d_loss(real, fake), torch.tensor(0.5 * (2.5 / 3 + 1.0)))
    assert torch.allclose(hinge_g_loss(fake), torch.tensor(1.0 / 3 * 1.0))


def test_adaptive_weight_is_gradient_norm_ratio():
    last = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    rec = (3 * last).sum()  # grad (3, 3): norm 3*sqrt(2)
    g = (last**2).sum()  # grad (2, 4): norm sqrt(20)
    expected = (3 * 2**0.5) / (20**0.5 + 1e-4)
    assert torch.allclose(adaptive_generator_weight(rec, g, last), torch.tensor(expected))
    assert float(adaptive_generator_weight(rec, 0 * g + 1e-12 * last.sum(), last, max_weight=10.0)) == 10.0


def test_patchgan_discriminator_shapes_and_init():
    disc = PatchGANDiscriminator(3, 16, 3)
    logits = disc(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 1, 2, 2)
    assert disc(torch.randn(1, 3, 64, 64)).shape == (1, 1, 6, 6)
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert abs(float(torch.cat([c.weight.detach().flatten() for c in convs]).std()) - 0.02) < 0.005
    with pytest.raises(ValueError, match="num_layers"):
        PatchGANDiscriminator(num_layers=0)


def test_vqgan_loss_terms_and_disc_start():
    pixels, recon = torch.zeros(2, 3, 8, 8), torch.full((2, 3, 8, 8), 0.5, requires_grad=True)
    commit = torch.tensor(0.2)
    loss_fn = VQGANLoss(perceptual_weight=0, disc_weight=0.8, disc_start=10, commitment_weight=1.0)
    disc = PatchGANDiscriminator(3, 8, 1)
    loss, logs = loss_fn.generator_loss(pixels, recon, commit, step=9, discriminator=disc)
    assert torch.allclose(loss, torch.tensor(0.7)) and "g_loss" not in logs  # L1 0.5 + commitment 0.2
    loss, logs = loss_fn.generator_loss(pixels, recon, commit, step=10, discriminator=disc, last_layer=recon)
    assert torch.allclose(loss, 0.7 + 0.8 * logs["d_weight"] * logs["g_loss"])
    d_loss, d_logs = loss_fn.discriminator_loss(disc, pixels, recon)
    assert d_loss.requires_grad and recon.grad is None and set(d_logs) == {"d_loss", "logits_real", "logits_fake"}
    with pytest.raises(ValueError, match="perceptual"):
        VQGANLoss(perceptual=None, perceptual_weight=1.0)


def test_perceptual_term_uses_lpips_network(tmp_path):
    from groupvq_hf.evaluation.pretrained import lpips_network, save_lpips_weights

    net = lpips_network(save_lpips_weights(tmp_path / "vgg.pth", dtype=torch.float16))
    loss_fn = VQGANLoss(net, perceptual_weight=1.0, disc_weight=0.0)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    recon = (pixels + 0.3 * torch.randn_like(pixels)).requires_grad_(True)
    loss, logs = loss_fn.generator_loss(pixels, recon, torch.tensor(0.0), step=0)
    assert logs["perceptual"] > 0 and torch.allclose(loss, logs["l1"] + logs["perceptual"])
    loss.backward()
    assert recon.grad is not None and all(p.grad is None for p in net.parameters())


def test_missing_lpips_weights_stop_the_run_naming_the_ways_out(tmp_path):
    with pytest.raises(FileNotFoundError, match="--perceptual_weight 0"):
        _train(tmp_path / "run", "--perceptual_weight", "1", "--lpips_weights", str(tmp_path / "missing.pth"))


# ---------------------------------------------------------------------------------------------------- pieces
def test_resumable_batches_restore_exact_position_across_epochs():
    def stream():
        return build_image_dataset("demo", resolution=16, seed=5, max_samples=8)  # 2 batches per epoch

    straight = ResumableBatches(stream(), batch_size=4, seed=5)
    it = iter(straight)
    reference = [next(it)["pixel_values"] for _ in range(5)]  # 2 batches per epoch: crosses two epochs
    first = ResumableBatches(stream(), batch_size=4, seed=5)
    it = iter(first)
    rng_before = torch.get_rng_state()
    head = [next(it)["pixel_values"] for _ in range(3)]
    assert torch.equal(torch.get_rng_state(), rng_before)  # augmentations leave the global RNG alone
    state = first.state_dict()
    assert (state["epoch"], state["batches_in_epoch"]) == (1, 1)
    resumed = ResumableBatches(stream(), batch_size=4, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    it = iter(resumed)
    tail = [next(it)["pixel_values"] for _ in range(2)]
    for a, b in zip(reference, head + tail):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="no full batch"):
        next(iter(ResumableBatches(build_image_dataset("demo", resolution=16, max_samples=2), batch_size=4)))


def test_checkpoint_listing_rotation_and_resolution(tmp_path):
    for step in (10, 2, 30):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / COMPLETE_FILE).write_text("{}")
    (tmp_path / ".tmp-checkpoint-40").mkdir()  # an interrupted save is never picked up
    (tmp_path / "checkpoint-50").mkdir()  # nor a checkpoint without its completeness marker
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10", "checkpoint-30"]
    assert resolve_resume_path("latest", tmp_path).name == "checkpoint-30"
    assert resolve_resume_path(None, tmp_path) is None
    assert resolve_resume_path("latest", tmp_path / "none") is None
    with pytest.raises(ValueError, match="resume_from_checkpoint"):
        resolve_resume_path(str(tmp_path / "missing"), tmp_path)
    removed = rotate_checkpoints(tmp_path, 2)
    assert [p.name for p in removed] == ["checkpoint-2"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-30"]
    (tmp_path / "checkpoint-10" / "pytorch_model.bin").write_text("weights")

    def killed_mid_deletion(path, *args, **kwargs):  # the folder's files half gone, then the kill
        (Path(path) / "pytorch_model.bin").unlink()
        raise KeyboardInterrupt

    with mock.patch.object(shutil, "rmtree", killed_mid_deletion), pytest.raises(KeyboardInterrupt):
        rotate_checkpoints(tmp_path, 1)
    assert not (tmp_path / "checkpoint-10").exists()  # no half-deleted checkpoint-10 left to resume by name
    assert resolve_resume_path("latest", tmp_path).name == "checkpoint-30"
    assert rotate_checkpoints(tmp_path, None) == []  # and the next call deletes what the kill left, limit or not
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-checkpoint-40", "checkpoint-30", "checkpoint-50"]


def test_nonfinite_guard_skips_then_stops():
    guard = NonFiniteGuard(limit=2)
    assert guard.check(torch.tensor(1.0), 0, "loss")
    assert not guard.check(torch.tensor(float("nan")), 1, "loss")
    assert guard.check(torch.tensor(2.0), 2, "loss") and guard.total == 1
    assert not guard.check(torch.tensor(float("inf")), 3, "loss")
    resumed = NonFiniteGuard(limit=2)  # a checkpoint's counts: the resumed run stops where this one would
    resumed.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert resumed.state_dict() == {"consecutive": 1, "total": 2}
    for stopping in (guard, resumed):
        with pytest.raises(RuntimeError, match="2 consecutive steps had a non-finite loss"):
            stopping.check(torch.tensor(float("nan")), 4, "loss")


def test_arguments_and_model_config(tmp_path):
    args = parse_args([])
    assert args.dataset == "demo" and args.model_config == "tiny" and args.max_train_steps == 300
    assert (args.learning_rate, args.adam_beta1, args.adam_beta2, args.ema_decay) == (1e-4, 0.5, 0.9, 0.999)
    assert parse_args(["--dataset", "imagenet+coco", "--max_train_steps", "5"]).model_config == "imagenet"
    with pytest.raises(ValueError, match="max_train_steps"):
        parse_args(["--dataset", "imagenet"])
    with pytest.raises(ValueError, match="--train_batch_size"):
        parse_args(["--train_batch_size", "0"])
    for flag, value, expected in (
        ("--disc_learning_rate", "-1", ">= 0"), ("--adam_weight_decay", "nan", ">= 0"), ("--adam_beta1", "1.5", r"\[0, 1\)"),
        ("--adam_beta2", "-0.1", r"\[0, 1\)"), ("--shuffle_buffer_size", "0", ">= 1"), ("--max_nonfinite_steps", "0", ">= 1"),
        ("--lr_scheduler", "bogus", "one of linear, cosine"), ("--lr_scheduler", "piecewise_constant", "one of"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=f"`{flag}` .*{expected}"):
            parse_args([flag, value])
    with pytest.raises(ValueError, match="`--lr_warmup_steps` 10 has no effect with `--lr_scheduler constant`"):
        parse_args(["--lr_warmup_steps", "10"])  # diffusers' constant schedule ignores a warm-up
    assert parse_args(["--lr_warmup_steps", "10", "--lr_scheduler", "constant_with_warmup"]).lr_warmup_steps == 10
    config = resolve_model_config("tiny", 32)
    assert config.sample_size == 32 and config.codebook_size == 256
    config.to_json_file(str(tmp_path / "config.json"))
    assert resolve_model_config(str(tmp_path / "config.json"), 64).num_groups == config.num_groups
    with pytest.raises(ValueError, match="downsampling factor"):
        resolve_model_config("tiny", 30)
    with pytest.raises(ValueError, match="model_config"):
        resolve_model_config("huge", 32)


# ---------------------------------------------------------------------------------------------------- runs
def test_stop_and_resume_equals_uninterrupted_run_and_exports_model(tmp_path, capsys):
    """Steps 1..5 in one run == steps 1..3 (checkpoint at 3, crossing an epoch) + resume to 5; bit-equal on CPU."""
    from groupvq_hf import GroupVQImageProcessor, GroupVQModel

    full, split = tmp_path / "full", tmp_path / "split"
    epoch = ["--max_train_samples", "8"]  # 2 batches per epoch: step 3 is in the second epoch
    _train(full, "--max_train_steps", "5", "--checkpointing_steps", "1", *epoch)
    _train(split, "--max_train_steps", "4", "--checkpointing_steps", "3", *epoch)  # step 4 is lost: resumes from 3
    result = _train(
        split, "--max_train_steps", "5", "--checkpointing_steps", "1", "--resume_from_checkpoint", "latest", *epoch
    )
    assert result["resumed_from"] == str(split / "checkpoints" / "checkpoint-3") and result["global_step"] == 5
    for name in ("model.safetensors", "model_1.safetensors"):  # raw generator and discriminator at step 5
        a, b = (
            _weights(full / "checkpoints" / "checkpoint-5" / name),
            _weights(split / "checkpoints" / "checkpoint-5" / name),
        )
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = _weights(full / "model" / "model.safetensors"), _weights(split / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # final EMA weights

    # the export: a loadable model with its image processor, plus the PNG grid
    assert f"Model saved to {(split / 'model').resolve()}" in capsys.readouterr().out
    assert result["model_dir"] == str(split / "model") and (split / "reconstructions.png").is_file()
    model = GroupVQModel.from_pretrained(split / "model")
    processor = GroupVQImageProcessor.from_pretrained(split / "model")
    assert model.config.sample_size == 32 and processor.crop_size["height"] == 32
    from PIL import Image

    grid = Image.open(split / "reconstructions.png")
    assert grid.size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)
    state = json.loads((split / "checkpoints" / "checkpoint-3" / "training_state_rank0.json").read_text())
    assert (state["data"]["epoch"], state["data"]["batches_in_epoch"], state["global_step"]) == (1, 1, 3)


def test_torch_compile_checkpoints_cross_resume_and_export_plain_keys(tmp_path):
    """Eager step 1 -> resumed with --torch_compile to 2 (a GAN step with the adaptive weight: autograd.grad with
    retain_graph through the compiled decoder) -> resumed eagerly to 3. No `_orig_mod.` key anywhere."""
    from groupvq_hf import GroupVQModel

    gan = ["--adaptive_disc_weight", "--generator_loss", "hinge", "--checkpointing_steps", "1"]
    _train(tmp_path, "--max_train_steps", "1", *gan)
    result = _train(tmp_path, "--max_train_steps", "2", "--torch_compile", "--resume_from_checkpoint", "latest", *gan)
    assert result["resumed_from"].endswith("checkpoint-1") and result["global_step"] == 2
    result = _train(tmp_path, "--max_train_steps", "3", "--resume_from_checkpoint", "latest", *gan)
    assert result["resumed_from"].endswith("checkpoint-2") and result["global_step"] == 3
    for path in (tmp_path / "checkpoints" / "checkpoint-2" / "model.safetensors", tmp_path / "model" / "model.safetensors"):
        assert not any("_orig_mod" in k for k in _weights(path))
    assert GroupVQModel.from_pretrained(tmp_path / "model")(torch.zeros(1, 3, 32, 32)).reconstruction.shape == (1, 3, 32, 32)


def test_resume_from_a_folder_that_is_no_checkpoint_says_so(tmp_path):
    (tmp_path / "not_a_checkpoint").mkdir()
    with pytest.raises(ValueError, match="not a groupvq checkpoint"):
        _train(tmp_path / "run", "--max_train_steps", "2", "--resume_from_checkpoint", str(tmp_path / "not_a_checkpoint"))


def test_two_process_cpu_run_reads_disjoint_data_and_keeps_replicas_identical(tmp_path):
    out_dir = tmp_path / "ddp"
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--main_process_port", str(_free_port()), "--mixed_precision", "no", "--dynamo_backend", "no"]
    run = ["--output_dir", str(out_dir), *TINY_RUN, "--train_batch_size", "2", "--max_train_steps", "2"]
    out = _run([*launch, TRAIN, *run, "--checkpointing_steps", "2", "--log_example_keys"])
    assert "Num processes: 2" in out and "MULTI_CPU" in out
    assert "Weights in sync across 2 processes" in out
    ranks = [json.loads((out_dir / "example_keys" / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]["keys"]) == len(ranks[1]["keys"]) == 4  # 2 steps x batch 2, within epoch 0
    assert not set(ranks[0]["keys"]) & set(ranks[1]["keys"])
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    checkpoint = out_dir / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "training_state_rank0.json").is_file() and (checkpoint / "training_state_rank1.json").is_file()
    assert (checkpoint / "random_states_1.pkl").is_file() and (out_dir / "model" / "config.json").is_file()


# ---------------------------------------------------------------------------------------------------- epochs
def _image_folder(path: Path, num_images: int, num_corrupt: int = 0) -> Path:
    """``num_images`` small PNGs (every third one grayscale) and ``num_corrupt`` undecodable ``.png`` files."""
    import numpy as np
    from PIL import Image

    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(num_images):
        array = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
        image = Image.fromarray(array)
        (image.convert("L") if i % 3 == 0 else image).save(path / f"img{i:02d}.png")
    for i in range(num_corrupt):
        (path / f"bad{i}.png").write_bytes(b"not an image at all")
    return path


def test_epoch_lengths_from_dataset_sizes(tmp_path):
    import datasets

    from groupvq_hf.data import dataset_num_examples
    from groupvq_hf.training import steps_per_epoch

    args = parse_args(["--dataset", "imagenet", "--num_epochs", "50", "--train_batch_size", "32"])
    assert steps_per_epoch(args, world_size=8) == 1_281_167 // 8 // 32
    args = parse_args(["--dataset", "coco", "--num_epochs", "20", "--gradient_accumulation_steps", "2"])
    assert steps_per_epoch(args, world_size=1) == 118_287 // 32 // 2
    with pytest.raises(ValueError, match="--max_train_steps"):
        steps_per_epoch(parse_args(["--dataset", "imagenet+coco", "--num_epochs", "1"]), world_size=1)
    folder = _image_folder(tmp_path / "folder", 5, num_corrupt=1)
    assert dataset_num_examples(str(folder)) == 6  # counted by name: a bad file is only found when decoded
    assert dataset_num_examples(str(folder), "validation") == 6  # a single split is what the stream reads for any
    blobs = [{"bytes": (folder / f"img{i:02d}.png").read_bytes(), "path": None} for i in range(5)]
    features = datasets.Features({"image": datasets.Image()})
    datasets.Dataset.from_dict({"image": blobs}, features=features).to_parquet(str(tmp_path / "rows.parquet"))
    assert dataset_num_examples(str(tmp_path / "rows.parquet")) == 5
    with pytest.raises(ValueError, match="less than one step"):
        steps_per_epoch(parse_args(["--dataset", str(tmp_path / "rows.parquet"), "--num_epochs", "1"]), world_size=1)
    # loader workers: each drops its own partial batch, and a one-file dataset feeds one worker only
    capped = ["--num_epochs", "2", "--max_train_samples", "6", "--train_batch_size", "4"]
    for workers, steps in ((0, 1), (2, 2), (3, 3)):  # the demo's 64 shards: every worker yields one batch of 4
        assert steps_per_epoch(parse_args([*capped, "--dataloader_num_workers", str(workers)]), world_size=1) == steps
    datasets.Dataset.from_dict({"image": blobs * 2}, features=features).to_parquet(str(tmp_path / "ten.parquet"))
    one_file = ["--dataset", str(tmp_path / "ten.parquet"), "--num_epochs", "1", "--train_batch_size", "3"]
    assert steps_per_epoch(parse_args([*one_file, "--dataloader_num_workers", "2"]), world_size=1) == 3  # not 2 x 1
    stream = build_image_dataset(str(tmp_path / "ten.parquet"), resolution=32, seed=7)
    epoch = ResumableBatches(stream, 3, num_workers=2, seed=7)
    assert sum(1 for _ in itertools.takewhile(lambda _: epoch.epoch == 0, epoch)) == 3  # what the loader yields


@pytest.mark.parametrize("num_corrupt, seed", [(12, "7"), (2, "2")])
def test_a_run_of_one_epoch_counts_the_bad_images_read_after_its_last_full_batch(tmp_path, num_corrupt, seed):
    """9 good files and some undecodable ones, batch 3, ``--num_epochs 1``: every bad file is counted, also those
    the file order puts after the epoch's last full batch (one, for these seeds). With 12 bad files the epoch is
    estimated at 7 steps from the 21 files, gives 3, and the run ends when epoch 1's first batch arrives (it counted
    11); with 2 the estimate is right and the run ends at step 3 on the step limit (it counted 1)."""
    folder = _image_folder(tmp_path / "folder", 9, num_corrupt=num_corrupt)
    result = _train(
        tmp_path / "run", "--dataset", str(folder), "--num_epochs", "1", "--train_batch_size", "3", "--seed", seed
    )
    assert result["global_step"] == 3 and result["skipped_images"] == num_corrupt


def test_cosine_schedule_over_num_epochs_ends_at_zero_and_counts_images(tmp_path, capsys):
    """9 images (3 grayscale) + 1 corrupt file, batch 3: 3 steps per epoch, 2 epochs; cosine reaches 0 at step 6.
    The skipped and converted images the batches report are printed at the end (also with --report_to none)."""
    folder = _image_folder(tmp_path / "folder", 9, num_corrupt=1)
    result = _train(
        tmp_path / "run", "--dataset", str(folder), "--num_epochs", "2", "--train_batch_size", "3",
        "--lr_scheduler", "cosine", "--num_validation_usage_images", "4",
    )  # fmt: skip
    assert result["global_step"] == 6 and result["learning_rate"] == 0.0
    batches = iter(ResumableBatches(build_image_dataset(str(folder), resolution=32, seed=7), 3, seed=7))
    skipped = converted = 0
    for _ in range(6):  # the batches the run trained on
        batch = next(batches)
        skipped, converted = skipped + batch["num_skipped"], converted + batch.get("num_converted", 0)
    assert converted > 0 and (result["skipped_images"], result["converted_images"]) == (skipped, converted)
    out = capsys.readouterr().out
    assert f"Training images skipped (missing, undecodable or too small): {skipped}; converted to RGB: {converted}." in out
    # the folder has a single split: the usage images are training images, and the end of the run says so
    usage = result["validation_codebook_usage"]
    usage_line = f"Codebook usage of the EMA model on 4 images of the training split 'train' (not held out): {usage:.3f}"
    assert usage_line in out
    assert "held-out" not in out


# ---------------------------------------------------------------------------------------------------- validation usage
def test_held_out_codebook_usage_is_measured_returned_and_printed(tmp_path, capsys):
    from groupvq_hf import GroupVQModel
    from groupvq_hf.training import validation_images, validation_usage

    result = _train(tmp_path, "--max_train_steps", "2", "--num_validation_usage_images", "6")
    usage, groups = result["validation_codebook_usage"], result["validation_group_usage"]
    model = GroupVQModel.from_pretrained(tmp_path / "model")
    assert len(groups) == model.config.num_groups and 0 < usage <= 1
    assert f"Codebook usage of the EMA model on 6 held-out images: {usage:.3f}" in capsys.readouterr().out
    # the same figure from the exported EMA model on the same images, counted by hand
    pixels, split = validation_images(parse_args(TINY_RUN[:4]), 6)
    assert split == "validation"  # the demo's held-out crops
    with torch.no_grad():
        indices = model.encode(pixels).indices
    assert usage == pytest.approx(indices.unique().numel() / model.config.codebook_size)
    from groupvq_hf.training import usage_stats

    assert usage_stats({"codebook_usage": 0.5, "group_usage": [1.0, 0.25], "num_images": 3}) == {
        "val/codebook_usage": 0.5, "val/group_usage/group_000": 1.0, "val/group_usage/group_001": 0.25,
    }  # fmt: skip
    again = validation_usage(model, pixels, batch_size=4)
    assert again["codebook_usage"] == usage and again["num_images"] == 6
    assert model.quantizer.usage_counts(sync=False).sum() == 0  # counters left reset


# ---------------------------------------------------------------------------------------------------- loop steps
def test_one_optimisation_step_counts_the_generator_forward_and_logs_its_window(tmp_path, fresh_accelerate_state):
    """The loop's steps alone: one step (GAN on) counts the codes of the generator's forward only, one hit per
    latent token of the batch; the window's statistics are the usage of those counts, and reading them resets it."""
    from groupvq_hf.quantizer import usage_statistics
    from groupvq_hf.training import (
        end_optimizer_step,
        optimisation_step,
        resume_training,
        setup_training,
        start_progress,
        window_statistics,
    )

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = setup_training(parse_args(["--output_dir", str(tmp_path), *TINY_RUN, "--disc_start", "0"]))
        loop = resume_training(run)
        start_progress(run, loop)
        quantizer = run.plain_model.quantizer
        batch = next(iter(run.batches))
        logs, applied = optimisation_step(run, loop, batch)
        counts = quantizer.usage_counts()
        latent_side = 32 // run.config.downsample_factor
        assert int(counts.sum()) == batch["pixel_values"].shape[0] * latent_side**2
        assert applied and {"loss", "grad_norm", "g_loss", "d_loss"} <= set(logs)
        loop.add_logs(logs)
        end_optimizer_step(run, loop, applied)
        assert loop.global_step == 1
        stats = window_statistics(run, loop)
        expected = usage_statistics(counts, quantizer.group_sizes)
        assert stats["train/window_codebook_usage"] == expected["codebook_usage"]
        groups = [stats[f"train/window_group_usage/group_{j:03d}"] for j in range(len(quantizer.group_sizes))]
        assert groups == expected["group_usage"] and stats["train/loss"] == float(logs["loss"])
        assert int(quantizer.usage_counts().sum()) == 0 and not loop.loss_sums  # the window starts afresh
        loop.progress.close()
    finally:
        torch.set_num_threads(threads)


def test_reconstruct_counts_no_usage_and_restores_the_mode(tiny_model, pixels):
    from groupvq_hf.training import reconstruct

    quantizer = tiny_model.quantizer
    tiny_model.train()
    with quantizer.counting_usage():
        reconstruction = reconstruct(tiny_model, pixels)
        assert quantizer.track_usage is True  # the caller's counting is paused inside only
    assert tiny_model.training and int(quantizer.usage_counts().sum()) == 0
    with torch.no_grad():
        assert torch.equal(reconstruction, tiny_model.eval()(pixels).reconstruction)  # an eval-mode forward


# ---------------------------------------------------------------------------------------------------- checkpoints
def test_resume_refuses_other_arguments_and_warns_on_a_reused_folder(tmp_path, caplog):
    first = _train(tmp_path, "--max_train_steps", "2", "--checkpointing_steps", "2")
    recorded = json.loads((tmp_path / "checkpoints" / "checkpoint-2" / "run_args.json").read_text())
    assert recorded["seed"] == 7 and recorded["world_size"] == 1 and recorded["model_config_resolved"]["num_groups"] >= 1
    assert json.loads((tmp_path / "model" / "run_args.json").read_text())["seed"] == 7
    other = ["--seed", "1", "--learning_rate", "1e-3", "--resume_from_checkpoint", "latest", "--max_train_steps", "3"]
    with pytest.raises(ValueError) as err:
        _train(tmp_path, *other)
    message = str(err.value)
    assert "seed: checkpoint 7, now 1" in message and "learning_rate: checkpoint 0.0001, now 0.001" in message
    assert "disc_learning_rate: checkpoint 0.0001, now 0.001" in message  # it follows --learning_rate
    assert "--allow_resume_changes disc_learning_rate,learning_rate,seed" in message
    assert _weights(tmp_path / "model" / "model.safetensors")  # the old export is untouched
    # a deliberate change is allowed by name; more steps always are
    allowed = [
        "--ema_decay", "0.5", "--gradient_accumulation_steps", "3", "--checkpointing_steps", "3",
        "--allow_resume_changes", "seed,learning_rate,disc_learning_rate,ema_decay,gradient_accumulation_steps",
    ]  # fmt: skip
    result = _train(tmp_path, *other, *allowed)
    assert result["resumed_from"].endswith("checkpoint-2") and result["global_step"] == 3
    # the allowed changes are made (the run went on at the checkpoint's rate 1e-4 and EMA decay 0.999, and its
    # step 3 took three micro-batches, not the one that accelerate's restored micro-step count 2 would have given)
    assert result["learning_rate"] == 1e-3
    position = json.loads((tmp_path / "checkpoints" / "checkpoint-3" / "training_state_rank0.json").read_text())
    assert position["data"]["batches_in_epoch"] == 2 + 3
    ema_state = json.loads((tmp_path / "checkpoints" / "checkpoint-3" / "ema_state.json").read_text())
    assert ema_state["decay"] == 0.5 and ema_state["optimization_step"] == 3
    assert result["weights_sha256"] != first["weights_sha256"]
    with pytest.raises(ValueError, match="allow_resume_changes"):
        parse_args(["--allow_resume_changes", "no_such_flag"])
    caplog.clear()
    with caplog.at_level("WARNING"):
        _train(tmp_path, "--max_train_steps", "1")  # a fresh run in a folder that holds checkpoints
    assert "held checkpoints past step 0 (checkpoint-2, checkpoint-3): an earlier run's. Moved them aside" in caplog.text
    assert list_checkpoints(tmp_path / "checkpoints", complete_only=False) == []  # `latest` finds none of them
    (aside,) = (tmp_path / "checkpoints").glob("set-aside-*-at-step-0")
    assert json.loads((aside / "checkpoint-2" / "run_args.json").read_text()) == recorded  # kept whole


def test_a_resume_that_changes_max_train_steps_says_how_the_learning_rate_moves(tmp_path, caplog, monkeypatch):
    """More steps are always allowed on resume, but a schedule that spans --max_train_steps (cosine) then moves:
    resumed at step 2 of a 4-step cosine run with --max_train_steps 8, the rate at step 2 is 1e-4 * (1 + cos(pi/4))
    / 2 on the new span and 1e-4 * (1 + cos(pi/2)) / 2 on the checkpoint's; the warning says so, and the first
    resumed step already trains at the new rate (it took the checkpoint's from the optimizer's state). A warm-up
    that is the same on both spans is no reason to stay silent: the warning names the first step where they
    differ."""
    import math

    rates = []  # the rate of each optimizer step (generator and discriminator: the same schedule here)
    real_step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: rates.append(self.param_groups[0]["lr"]) or real_step(self, *a, **k))

    cosine = ["--lr_scheduler", "cosine", "--checkpointing_steps", "2", "--disc_start", "0"]
    _train(tmp_path / "cosine", "--max_train_steps", "4", *cosine)
    shutil.rmtree(tmp_path / "cosine" / "checkpoints" / "checkpoint-4")
    rates.clear()
    with caplog.at_level("WARNING"):
        result = _train(tmp_path / "cosine", "--max_train_steps", "8", "--resume_from_checkpoint", "latest", *cosine)
    assert result["global_step"] == 8
    new, old = (f"{1e-4 * (1 + math.cos(math.pi * 2 / span)) / 2:.3g}" for span in (8, 4))
    assert (
        f"`--max_train_steps` 8 differs from the checkpoint's run (4): the `cosine` learning-rate schedule now spans "
        f"8 steps, so at step 2 the generator's learning rate is {new} (it would be {old} on the checkpoint's 4-step "
        "schedule)"
    ) in caplog.text
    assert [f"{rate:.3g}" for rate in rates[:2]] == [new, new]  # step 3, generator and discriminator
    warmup = ["--lr_scheduler", "cosine", "--lr_warmup_steps", "3", "--checkpointing_steps", "1", "--disc_start", "0"]
    _train(tmp_path / "warmup", "--max_train_steps", "5", *warmup)
    for step in (2, 3, 4, 5):
        shutil.rmtree(tmp_path / "warmup" / "checkpoints" / f"checkpoint-{step}")
    caplog.clear()
    with caplog.at_level("WARNING"):  # resumed at step 1, in the warm-up: the spans part from step 4 on
        _train(tmp_path / "warmup", "--max_train_steps", "7", "--resume_from_checkpoint", "latest", *warmup)
    # both reach 1e-4 at schedule step 3; at step 4 the 5-step span is at (1 + cos(pi/2)) / 2, the 7-step at
    # (1 + cos(pi/4)) / 2
    assert "now spans 7 steps, so at step 4 the generator's learning rate is 8.54e-05 (it would be 5e-05 on the" in caplog.text


def test_the_schedule_warning_of_a_polynomial_schedule_divides_by_the_real_initial_rate():
    """diffusers' polynomial schedule divides by its optimizer's initial rate: the checkpoint's schedule is rebuilt
    with that rate (rebuilt with 1.0, it gave 1e-4 * ((1 - 1e-7) / 2 + 1e-7) = 5e-05 halfway through a 4-step span,
    where the rate is (1e-4 - 1e-7) / 2 + 1e-7 = 5.01e-05, and 1e-11 for lr_end = 1e-7 at its end). A
    constant schedule does not move with the span: no warning. After a skipped (non-finite) step the schedule trails
    the global step, and the warning names the global step."""
    import argparse

    from groupvq_hf.training.loop import build_schedulers, schedule_span_warning

    args = argparse.Namespace(lr_scheduler="polynomial", lr_warmup_steps=0, max_train_steps=8, disc_start=0)
    optimizers = [torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-4) for _ in range(2)]
    scheduler = build_schedulers(args, optimizers, world_size=1)[0]
    for _ in range(2):
        optimizers[0].step()
        scheduler.step()
    rate, was = ((1e-4 - 1e-7) * (1 - 2 / span) + 1e-7 for span in (8, 4))  # (lr_init - lr_end) (1 - t/T) + lr_end
    warning = schedule_span_warning(args, scheduler, {"max_train_steps": 4}, world_size=1, global_step=2)
    assert f"at step 2 the generator's learning rate is {rate:.3g} (it would be {was:.3g} on the checkpoint's" in warning
    assert f"{was:.3g}" == "5.01e-05"
    skipped_one = schedule_span_warning(args, scheduler, {"max_train_steps": 4}, world_size=1, global_step=3)
    assert f"at step 3 the generator's learning rate is {rate:.3g}" in skipped_one  # the schedule's position 2
    assert schedule_span_warning(args, scheduler, {"max_train_steps": 8}, world_size=1, global_step=2) is None
    args.lr_scheduler = "constant"  # a constant schedule does not move with the span: no warning
    scheduler = build_schedulers(args, optimizers, world_size=1)[0]
    for _ in range(2):
        scheduler.step()
    assert schedule_span_warning(args, scheduler, {"max_train_steps": 4}, world_size=1, global_step=2) is None


def test_resuming_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path, caplog):
    """Resumed from checkpoint-2 while checkpoint-4 exists, with `--checkpoints_total_limit 1`: the rotation kept
    the highest steps and deleted the new checkpoint-3, and `latest` resumed the abandoned checkpoint-4."""
    _train(tmp_path, "--max_train_steps", "4", "--checkpointing_steps", "2")
    root = tmp_path / "checkpoints"
    state_file = root / "checkpoint-2" / "training_state_rank0.json"
    state = json.loads(state_file.read_text())
    assert state["nonfinite"] == {"generator": {"consecutive": 0, "total": 0}, "discriminator": {"consecutive": 0, "total": 0}}
    state["nonfinite"]["generator"]["total"] = 3  # as if three steps had been skipped: the count goes on from there
    state_file.write_text(json.dumps(state))
    with caplog.at_level("WARNING"):
        result = _train(tmp_path, "--resume_from_checkpoint", str(root / "checkpoint-2"), "--max_train_steps", "3",
               "--checkpointing_steps", "3", "--checkpoints_total_limit", "1")  # fmt: skip
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint-3"]
    assert resolve_resume_path("latest", root) == root / "checkpoint-3"
    assert result["nonfinite_steps"] == 3
    assert json.loads((root / "checkpoint-3" / "training_state_rank0.json").read_text())["nonfinite"]["generator"]["total"] == 3
    assert "(checkpoint-4): written after checkpoint-2 by the run this one replaces" in caplog.text
    (aside,) = root.glob("set-aside-*-at-step-2")
    assert [p.name for p in aside.iterdir()] == ["checkpoint-4"] and (aside / "checkpoint-4" / COMPLETE_FILE).is_file()


def test_interrupted_checkpoint_replacement_leaves_latest_on_the_newest_complete(
    tmp_path, monkeypatch, fresh_accelerate_state
):
    """Kill (simulated) between setting the old checkpoint-4 aside and renaming the new one in; and an old-style
    half-deleted checkpoint-6 without its marker: `latest` is the complete checkpoint-2."""
    from accelerate import Accelerator

    from groupvq_hf import fileio
    from groupvq_hf.training import save_checkpoint

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        save_checkpoint(accelerator, root, step, {"global_step": step}, None, {"seed": 0})
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint-2", "checkpoint-4"]
    assert (root / "checkpoint-4" / COMPLETE_FILE).is_file() and (root / "checkpoint-4" / "run_args.json").is_file()

    real_replace = fileio.os.replace

    def killed_after_setting_aside(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", killed_after_setting_aside)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, root, 4, {"global_step": 4}, None, {"seed": 0})
    monkeypatch.setattr(fileio.os, "replace", real_replace)
    assert not (root / "checkpoint-4").exists()
    half = root / "checkpoint-6"  # what the old save left when killed inside rmtree
    half.mkdir()
    (half / "training_state_rank0.json").write_text(json.dumps({"global_step": 6}))
    assert resolve_resume_path("latest", root).name == "checkpoint-2"
    with pytest.raises(ValueError, match="incomplete"):
        resolve_resume_path(str(half), root)
    # a whole checkpoint of the first release (no marker, no run_args.json): resumable by path, never `latest`
    legacy = root / "checkpoint-8"
    legacy.mkdir()
    for name in ("training_state_rank0.json", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
                 "model.safetensors"):  # fmt: skip
        (legacy / name).write_text("{}")
    assert resolve_resume_path(str(legacy), root) == legacy
    assert resolve_resume_path("latest", root).name == "checkpoint-2"
    (legacy / "optimizer.bin").unlink()  # a half-deleted one of that version is refused
    with pytest.raises(ValueError, match="incomplete"):
        resolve_resume_path(str(legacy), root)


def test_export_is_swapped_in_whole(tmp_path, monkeypatch, tiny_model):
    from groupvq_hf import GroupVQModel
    from groupvq_hf.training import save_export

    target = save_export(tiny_model, tmp_path / "model", {"seed": 0})
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "run_args.json"} <= set(before)

    def dies_halfway(self, folder, *args, **kwargs):
        (Path(folder) / "config.json").write_text("{}")
        raise KeyboardInterrupt("killed during the export")

    monkeypatch.setattr(GroupVQModel, "save_pretrained", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_export(tiny_model, target, {"seed": 1})
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left behind


@pytest.mark.parametrize("batch_size, workers", [(1, 0), (32, 2)])
def test_demo_trains_with_any_batch_size_and_worker_count(tmp_path, batch_size, workers):
    result = _train(
        tmp_path, "--max_train_steps", "1", "--train_batch_size", str(batch_size),
        "--dataloader_num_workers", str(workers), "--validation_steps", "0",
    )  # fmt: skip
    assert result["global_step"] == 1 and 0 < result["validation_codebook_usage"] <= 1


def test_run_argument_differences_compare_the_resolved_model_config():
    from groupvq_hf.training import run_argument_differences, run_arguments

    args = parse_args(TINY_RUN)
    saved = run_arguments(args, resolve_model_config("tiny", 32), world_size=2)
    moved_args = parse_args([*TINY_RUN[2:], "--model_config", "/elsewhere/config.json"])
    moved = run_arguments(moved_args, resolve_model_config("tiny", 32), world_size=2)
    assert run_argument_differences(saved, moved) == []  # same config content under another name
    bigger = resolve_model_config("tiny", 32)
    bigger.codebook_size = 512
    other = run_arguments(parse_args([*TINY_RUN, "--max_train_steps", "99", "--train_batch_size", "8"]), bigger, 1)
    assert run_argument_differences(saved, other) == [
        "model_config_resolved.codebook_size: checkpoint 256, now 512",
        "train_batch_size: checkpoint 4, now 8",
        "world_size: checkpoint 2, now 1",
    ]
    assert run_argument_differences(saved, other, "world_size,train_batch_size,model_config_resolved") == []


def test_single_split_folder_validation_is_named_as_the_training_split(tmp_path):
    from groupvq_hf import GroupVQConfig, GroupVQModel
    from groupvq_hf.training import export_model, validation_images

    folder = _image_folder(tmp_path / "images", 4)
    pixels, split = validation_images(parse_args(["--dataset", str(folder), "--max_train_steps", "1"]), 3)
    assert pixels.shape[0] == 3 and split == "train"  # read for "validation", but it is the training split
    # training turns the finite check off (the NonFiniteGuard skips such steps on every rank); the export has it on
    model = GroupVQModel(GroupVQConfig.from_preset("tiny"))
    model.check_finite = False
    assert export_model(model, None).check_finite and not model.check_finite


@pytest.mark.parametrize(
    "values, reason",
    [
        (["cat.jpg", "dog.jpg", "owl.jpg"], r"3 x undecodable:FileNotFoundError"),  # paths to files that do not exist
        ([1, 2, 3], r"`image_column` 'image' of .* holds int64 values, not images"),
        ([0.5, 1.5, 2.5], r"holds float64 values, not images"),
    ],
)
def test_an_image_column_without_images_says_why(tmp_path, values, reason):
    import datasets

    from groupvq_hf.training import validation_images

    datasets.Dataset.from_dict({"image": values}).to_parquet(str(tmp_path / "rows.parquet"))
    args = parse_args(["--dataset", str(tmp_path / "rows.parquet"), "--max_train_steps", "1"])
    with pytest.raises(ValueError, match=reason):
        validation_images(args, 2)


def test_training_goes_on_past_a_damaged_shard(tmp_path, caplog):
    """Issue 19 item 5: a truncated parquet shard is skipped (named in the log, counted), training finishes."""
    import datasets

    folder = _image_folder(tmp_path / "images", 8)
    blobs = [{"bytes": path.read_bytes(), "path": None} for path in sorted(folder.glob("*.png"))]
    features = datasets.Features({"image": datasets.Image()})
    shards = tmp_path / "shards"
    for shard in range(2):
        rows = {"image": blobs[4 * shard : 4 * shard + 4]}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(shards / f"train-{shard}.parquet"))
    damaged = shards / "train-0.parquet"  # the first shard, the one the features would come from
    damaged.write_bytes(damaged.read_bytes()[:64])
    with caplog.at_level("WARNING"):
        result = _train(
            tmp_path / "run", "--dataset", str(shards), "--max_train_steps", "3", "--train_batch_size", "2",
            "--num_validation_usage_images", "0", "--validation_steps", "100",
        )  # fmt: skip
    assert result["global_step"] == 3
    assert any(f"Skipping the unreadable shard {damaged}" in record.getMessage() for record in caplog.records)


def test_a_schedule_resumed_on_another_number_of_processes_is_at_the_same_optimizer_step():
    """A prepared scheduler steps once per process at each optimizer step: a 1-process checkpoint at step 3 holds
    position 3, which a 2-process run must read as its position 6 (it used to read step 1.5 of its schedule)."""
    from diffusers.optimization import get_scheduler

    from groupvq_hf.training.checkpoints import rescale_schedule

    def schedule(world, calls):
        optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        scheduler = get_scheduler("linear", optimizer, num_warmup_steps=2 * world, num_training_steps=10 * world)
        for _ in range(calls):
            optimizer.step()
            scheduler.step()
        return optimizer, scheduler

    saved_optimizer, saved = schedule(world=1, calls=3)
    for world in (2, 3):
        optimizer, resumed = schedule(world, calls=0)
        optimizer.load_state_dict(saved_optimizer.state_dict())
        resumed.load_state_dict(saved.state_dict())
        rescale_schedule(resumed, saved_world_size=1, world_size=world)
        _, straight = schedule(world, calls=3 * world)
        assert resumed.last_epoch == straight.last_epoch == 3 * world
        assert resumed.get_last_lr() == straight.get_last_lr() and optimizer.param_groups[0]["lr"] == straight.get_last_lr()[0]


def test_the_discriminator_schedule_spans_the_steps_it_trains_and_ends_with_the_run(tmp_path):
    """The discriminator steps from --disc_start on: its schedule (warm-up included) spans those steps, so both
    schedules end at 0 with the run (the discriminator's used to stop at its peak rate)."""
    _train(
        tmp_path, "--max_train_steps", "6", "--checkpointing_steps", "6", "--lr_scheduler", "linear",
        "--lr_warmup_steps", "2", "--disc_start", "4", "--num_validation_usage_images", "0",
    )  # fmt: skip
    checkpoint = tmp_path / "checkpoints" / "checkpoint-6"
    generator, discriminator = (
        torch.load(checkpoint / name, weights_only=True) for name in ("scheduler.bin", "scheduler_1.bin")
    )
    assert (generator["last_epoch"], discriminator["last_epoch"]) == (6, 2)
    assert generator["_last_lr"][0] == discriminator["_last_lr"][0] == 0.0


def test_settings_that_do_nothing_in_this_run_say_so(tmp_path, caplog):
    """accelerate accepts `--mixed_precision fp16` on a CPU and runs without autocast or loss scaling; with
    `--commitment_weight 0` the projectors get no gradient at all (their weights do not move): say so."""
    import logging

    from groupvq_hf import GroupVQModel

    with caplog.at_level(logging.WARNING):
        _train(tmp_path, "--max_train_steps", "1", "--mixed_precision", "fp16", "--num_validation_usage_images", "0",
               "--commitment_weight", "0", "--no_ema", "--disc_start", "0")  # fmt: skip
    assert "`--mixed_precision fp16` has no autocast on the CPU: this run computes in float32." in caplog.text
    assert "`--commitment_weight 0`: the quantizer's projectors learn through" in caplog.text
    torch.manual_seed(7)  # the run's seed: the same initial weights
    initial = GroupVQModel(resolve_model_config("tiny", 32)).quantizer.state_dict()
    trained = GroupVQModel.from_pretrained(tmp_path / "model").quantizer.state_dict()
    assert initial.keys() == trained.keys() and all(torch.equal(initial[k], trained[k]) for k in initial)
