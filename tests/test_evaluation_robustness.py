"""Evaluation under bad conditions: non-finite reconstructions, a kill mid-write, ranks without images, no images."""

import os
import socket
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import ModelCard

from groupvq_hf.evaluation import evaluator
from groupvq_hf.evaluation.evaluator import evaluate_model, update_model_card
from groupvq_hf.evaluation.metrics import ReconstructionMetrics
from groupvq_hf.evaluation.protocols import ProtocolMetrics, SimVQMetrics


def _images(n=2, size=8, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------------------- non-finite inputs


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_predictions_raise_instead_of_being_dropped(bad):
    x = _images()
    y = x.clone()
    y[1, 0, 0, 0] = bad
    metric = ReconstructionMetrics(metrics="psnr,ssim,l1")
    with pytest.raises(ValueError, match="`predictions` holds NaN/inf"):
        metric.add_batch(predictions=y, references=x)


@pytest.mark.parametrize("protocol", ["default", "simvq", "adm"])
def test_every_protocol_rejects_nan_reconstructions(protocol, tmp_path):
    x = _images()
    y = x.clone()
    y[0] = float("nan")  # e.g. a half-precision overflow in the decoder; clamp(-1, 1) keeps NaN
    metrics = ProtocolMetrics(protocol, ["psnr", "ssim"], npz_dir=tmp_path if protocol == "adm" else None)
    with pytest.raises(ValueError, match="`reconstructions` holds NaN/inf"):
        metrics.add_batch(x, y.clamp(-1, 1), [0, 1])
    with pytest.raises(ValueError, match="`references` holds NaN/inf"):
        metrics.add_batch(y, x, [0, 1])


# ------------------------------------------------------------------------------------------------- model card


RESULTS = {
    "model": "m", "protocol": "default", "dataset": "imagenet", "split": "validation", "resolution": 128,
    "num_samples": 10, "metrics": {"psnr": 22.0, "rfid": 5.0},
}  # fmt: skip


def test_a_kill_while_writing_the_model_card_keeps_the_old_card(tmp_path, monkeypatch):
    card = update_model_card(tmp_path / "README.md", RESULTS, "m")
    before = card.read_text()

    def dies_half_way(self, filepath):
        text = str(self)
        with open(filepath, "w") as f:
            f.write(text[: len(text) // 2])
        raise KeyboardInterrupt("killed while writing")

    with monkeypatch.context() as patch:
        patch.setattr(ModelCard, "save", dies_half_way)
        with pytest.raises(KeyboardInterrupt):
            update_model_card(card, dict(RESULTS, protocol="simvq", metrics={"psnr": 23.0}), "m")
    assert card.read_text() == before and os.listdir(tmp_path) == ["README.md"]
    update_model_card(card, dict(RESULTS, protocol="simvq", metrics={"psnr": 23.0}), "m")
    configs = {m["config"] for m in ModelCard.load(card).data.to_dict()["model-index"][0]["results"][0]["metrics"]}
    assert configs == {"protocol=default", "protocol=simvq"}  # the earlier protocol's results are kept


def test_a_truncated_card_is_an_error_not_a_silent_loss_of_its_results(tmp_path):
    card = update_model_card(tmp_path / "README.md", RESULTS, "m")
    text = card.read_text()
    card.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="`card_path` .* never closes it"):
        update_model_card(card, RESULTS, "m")


# ---------------------------------------------------------------------------------------- processes / counts


def _narrowing_worker(rank, port, out):
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30)
    )
    metric = ReconstructionMetrics(metrics="l1,psnr,ssim")
    if rank == 0:  # rank 1 has no images
        x = _images(3)
        metric.add_batch(predictions=x * 0.9, references=x)
    torch.save(metric.compute(metrics="psnr"), f"{out}.{rank}")
    dist.destroy_process_group()


def test_compute_with_metrics_on_a_rank_without_images_pairs_the_same_states(tmp_path):
    """``compute(metrics=...)`` narrows the accumulated states only when no process has images: a rank without
    images alone must keep the same states as the others, or the collectives pair mismatched states."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_narrowing_worker, args=(port, str(tmp_path / "r")), nprocs=2, join=True)  # spawn: fork after OpenMP can hang
    x = _images(3)
    expected = ReconstructionMetrics(metrics="psnr").compute(predictions=x * 0.9, references=x)
    assert torch.load(tmp_path / "r.0") == torch.load(tmp_path / "r.1") == pytest.approx(expected)


def test_no_images_and_bad_psnr_batch_size_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="No images were added"):
        ProtocolMetrics("adm", metrics=[], npz_dir=tmp_path).compute()
    with pytest.raises(ValueError, match="No images were added"):
        SimVQMetrics(["psnr", "ssim"], lpips_nets={}).compute()
    with pytest.raises(ValueError, match="`psnr_batch_size` must be a positive int, got 0"):
        ProtocolMetrics("simvq", ["psnr"], psnr_batch_size=0)
    with pytest.raises(ValueError, match="`psnr_batch_size` must be a positive int, got 0"):
        SimVQMetrics(["psnr"], lpips_nets={}, psnr_batch_size=0)


class _Halving(torch.nn.Module):
    config = SimpleNamespace(codebook_size=4)
    quantizer = SimpleNamespace(group_sizes=[2, 2])

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def forward(self, pixels):
        return SimpleNamespace(reconstruction=pixels / 2, indices=torch.zeros(len(pixels), 1, 1, dtype=torch.long))


def test_plain_tensor_batches_get_keys_unique_across_processes(tmp_path, monkeypatch):
    """Rank 1 of 2 numbers its images 1, 3, 5 (rank 0: 0, 2, 4), so their PNG names do not collide."""
    monkeypatch.setattr(evaluator, "_gather_lists", lambda accelerator, values: [values])  # no other process here
    rank1 = SimpleNamespace(device=torch.device("cpu"), num_processes=2, process_index=1, is_local_main_process=True)
    evaluate_model(_Halving(), [_images(2), _images(1)], metrics=["codebook_usage"], accelerator=rank1, progress=False,
                   save_images=tmp_path)  # fmt: skip
    assert sorted(os.listdir(tmp_path / "reconstructions")) == ["00000001.png", "00000003.png", "00000005.png"]
