"""Training: VQGAN losses, resumable stream, checkpoint helpers, and real runs of scripts/train.py (tiny, 32x32, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from groupvq_hf.data import build_image_dataset
from groupvq_hf.losses import PatchGANDiscriminator, VQGANLoss, adaptive_generator_weight, hinge_d_loss, hinge_g_loss
from groupvq_hf.training import (
    NonFiniteGuard,
    ResumableBatches,
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
    "--disc_start", "1", "--report_to", "none", "--seed", "7",
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
    """One run of the training script's code in this process (a fresh accelerate state each time)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from groupvq_hf.training import main

    def reset():
        for state in (AcceleratorState, GradientState, PartialState):
            state._reset_state()

    reset()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is fastest, and immune to a busy machine
    try:
        return main(["--output_dir", str(output_dir), *TINY_RUN, *extra])
    finally:
        torch.set_num_threads(threads)
        reset()  # leave no accelerate state behind for other tests


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
    from groupvq_hf.pretrained import lpips_network, save_lpips_weights

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
        return build_image_dataset("demo", resolution=16, seed=5)

    straight = ResumableBatches(stream(), batch_size=4, seed=5)
    it = iter(straight)
    reference = [next(it)["pixel_values"] for _ in range(5)]  # 2 batches per epoch: crosses two epochs
    first = ResumableBatches(stream(), batch_size=4, seed=5)
    it = iter(first)
    rng_before = torch.get_rng_state()
    head = [next(it)["pixel_values"] for _ in range(3)]
    assert torch.equal(torch.get_rng_state(), rng_before)  # augmentations leave the global RNG alone
    state = first.state_dict()
    assert state == {"epoch": 1, "batches_in_epoch": 1}
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
    (tmp_path / ".tmp-checkpoint-40").mkdir()  # an interrupted save is never picked up
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10", "checkpoint-30"]
    assert resolve_resume_path("latest", tmp_path).name == "checkpoint-30"
    assert resolve_resume_path(None, tmp_path) is None
    assert resolve_resume_path("latest", tmp_path / "none") is None
    with pytest.raises(ValueError, match="resume_from_checkpoint"):
        resolve_resume_path(str(tmp_path / "missing"), tmp_path)
    removed = rotate_checkpoints(tmp_path, 2)
    assert [p.name for p in removed] == ["checkpoint-2"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-30"]


def test_nonfinite_guard_skips_then_stops():
    guard = NonFiniteGuard(limit=2)
    assert guard.check(torch.tensor(1.0), 0, "loss")
    assert not guard.check(torch.tensor(float("nan")), 1, "loss")
    assert guard.check(torch.tensor(2.0), 2, "loss") and guard.total == 1
    assert not guard.check(torch.tensor(float("inf")), 3, "loss")
    with pytest.raises(RuntimeError, match="2 consecutive steps had a non-finite loss"):
        guard.check(torch.tensor(float("nan")), 4, "loss")


def test_arguments_and_model_config(tmp_path):
    args = parse_args([])
    assert args.dataset == "demo" and args.model_config == "tiny" and args.max_train_steps == 300
    assert (args.learning_rate, args.adam_beta1, args.adam_beta2, args.ema_decay) == (1e-4, 0.5, 0.9, 0.999)
    assert parse_args(["--dataset", "imagenet+coco", "--max_train_steps", "5"]).model_config == "imagenet"
    with pytest.raises(ValueError, match="max_train_steps"):
        parse_args(["--dataset", "imagenet"])
    with pytest.raises(ValueError, match="--train_batch_size"):
        parse_args(["--train_batch_size", "0"])
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
    _train(full, "--max_train_steps", "5", "--checkpointing_steps", "1")
    _train(split, "--max_train_steps", "4", "--checkpointing_steps", "3")  # step 4 is lost: resumes from 3
    result = _train(split, "--max_train_steps", "5", "--checkpointing_steps", "1", "--resume_from_checkpoint", "latest")
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
    assert state["data"] == {"epoch": 1, "batches_in_epoch": 1} and state["global_step"] == 3


def test_torch_compile_run_with_the_adaptive_gan_weight_exports_plain_keys(tmp_path):
    """--torch_compile through a GAN step (autograd.grad with retain_graph through the compiled decoder)."""
    from safetensors.torch import load_file

    from groupvq_hf import GroupVQModel

    result = _train(tmp_path, "--max_train_steps", "2", "--torch_compile")
    assert result["global_step"] == 2
    keys = load_file(str(tmp_path / "model" / "model.safetensors")).keys()
    assert not any("_orig_mod" in k for k in keys)
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
