"""Metrics (`groupvq_hf.evaluation.metrics`) and feature networks (`groupvq_hf.evaluation.pretrained`): known answers, offline loading."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from groupvq_hf.evaluation import pretrained
from groupvq_hf.evaluation.metrics import (
    CodebookUsage,
    FrechetDistance,
    ReconstructionMetrics,
    frechet_distance,
    to_unit_images,
)


@pytest.fixture(scope="session")
def lpips_file(tmp_path_factory):
    torch.manual_seed(0)
    return pretrained.save_lpips_weights(tmp_path_factory.mktemp("w") / "vgg16_features.pt", dtype=torch.float16)


@pytest.fixture(scope="session")
def inception_file(tmp_path_factory):
    return pretrained.save_inception_weights(tmp_path_factory.mktemp("w") / "inception.pt", dtype=torch.float16)


@pytest.fixture(scope="session")
def lpips_net(lpips_file):
    return pretrained.lpips_network(lpips_file)


@pytest.fixture(scope="session")
def inception_net(inception_file):
    return pretrained.inception_network(inception_file)


def _images(n, seed=0, size=32, low=-1.0, high=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * (high - low) + low


class GivenFeatures(nn.Module):
    """A 'feature extractor' that returns its (float64) input: FID statistics of given feature vectors."""

    def __init__(self, dim):
        super().__init__()
        self.num_features = dim

    def forward(self, x):
        return x


# ------------------------------------------------------------------------------------------- feature networks


@pytest.mark.parametrize("factory", [pretrained.lpips_network, pretrained.inception_network])
def test_feature_networks_offline_without_weights_say_how_to_get_them(factory, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty torch.hub cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as err:
        factory()
    message = str(err.value)
    assert "https://" in message and str(tmp_path) in message  # way 1: the standard download / its cache
    assert "weights=PATH" in message and "_weights PATH" in message  # way 2: a local file


def test_feature_networks_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights"):
        pretrained.lpips_network(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="weights"):
        pretrained.inception_network(tmp_path / "nope.pt")


def test_feature_networks_load_from_the_standard_cache(tmp_path, monkeypatch, lpips_file, lpips_net):
    """A file in torch.hub's cache under torchvision's name is used without any download."""
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    vgg = {f"features.{k}": v for k, v in torch.load(lpips_file).items()}
    vgg["classifier.0.weight"] = torch.zeros(1)  # a full torchvision file also holds the classifier: ignored
    torch.save(vgg, cache / "vgg16-397923af.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    net = pretrained.lpips_network()
    x, y = _images(2, 1), _images(2, 2)
    torch.testing.assert_close(net(x, y), lpips_net(x, y))


def test_lpips_network_known_answers_and_gradients(lpips_net):
    x, y = _images(3, 1), _images(3, 2)
    d = lpips_net(x, y)
    assert d.shape == (3,)
    assert (d > 0).all()
    assert torch.equal(lpips_net(x, x), torch.zeros(3))
    x.requires_grad_(True)
    lpips_net(x, y).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in lpips_net.parameters())
    lpips_net.train()
    assert not lpips_net.training and not any(m.training for m in lpips_net.modules())
    with pytest.raises(ValueError, match="LPIPS inputs"):
        lpips_net(x, y[:, :, :16])


def test_lpips_weights_round_trip_and_layouts(lpips_net, tmp_path):
    x, y = _images(2, 3), _images(2, 4)
    full = pretrained.save_lpips_weights(
        tmp_path / "lpips_full.pt", lpips_net, dtype=torch.float16
    )  # LPIPS keys incl. linear layers
    assert any(k.startswith("lin") for k in torch.load(full))
    lpips_package = {**torch.load(full), "scaling_layer.shift": torch.zeros(1, 3, 1, 1)}  # `lpips` package layout
    torch.save(lpips_package, tmp_path / "lpips_package.pt")
    torch.testing.assert_close(pretrained.lpips_network(tmp_path / "lpips_package.pt")(x, y), lpips_net(x, y))
    torch.testing.assert_close(pretrained.lpips_network(full)(x, y), lpips_net(x, y))
    lin = dict(torch.load(full))
    lin["lin0.model.1.weight"] = torch.zeros_like(lin["lin0.model.1.weight"])  # the file's linear layers are used
    torch.save(lin, tmp_path / "lin.pt")
    assert not torch.allclose(pretrained.lpips_network(tmp_path / "lin.pt")(x, y), lpips_net(x, y))
    bad = {"0.weight": torch.zeros(64, 3, 3, 3)}  # backbone incomplete
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="lacks"):
        pretrained.lpips_network(tmp_path / "bad.pt")

    class RunsCode:  # unpickled with weights_only=False, it would create the marker
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    torch.save({"0.weight": RunsCode()}, tmp_path / "crafted.pt")
    with pytest.raises(ValueError, match=r"`weights` '.*crafted.pt' holds pickled objects") as refusal:
        pretrained.lpips_network(tmp_path / "crafted.pt")
    assert not (tmp_path / "pwned").exists() and "weights_only=False" not in str(refusal.value)
    torch.save({"encoder.weight": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="unexpected key"):
        pretrained.lpips_network(tmp_path / "foreign.pt")


def test_inception_network_gives_2048_pool_features(inception_net, inception_file, tmp_path):
    images = (torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    features = inception_net(images)
    assert features.shape == (2, 2048) and features.dtype == torch.float32
    assert torch.isfinite(features).all()
    assert not torch.equal(features[0], features[1])
    with pytest.raises(ValueError, match="uint8"):
        inception_net(images.float())
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="Inception"):
        pretrained.inception_network(tmp_path / "bad.pt")


# ------------------------------------------------------------------------------------------------ FID math


def _gaussian_features(n, mean, std, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, len(mean), generator=g, dtype=torch.float64) * torch.tensor(std) + torch.tensor(mean)


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    mean1, std1 = [0.0, 1.0, -1.0, 0.5], [1.0, 2.0, 0.5, 1.0]
    mean2, std2 = [0.5, 1.0, 0.0, 0.5], [1.5, 1.0, 0.5, 2.0]
    # Diagonal covariances: |mu1 - mu2|^2 + sum (s1 - s2)^2
    closed = sum((a - b) ** 2 for a, b in zip(mean1, mean2)) + sum((a - b) ** 2 for a, b in zip(std1, std2))
    fid = FrechetDistance(feature=GivenFeatures(4))
    for seed in range(4):  # streamed in batches
        fid.update(_gaussian_features(5000, mean1, std1, seed), real=True)
        fid.update(_gaussian_features(5000, mean2, std2, 100 + seed), real=False)
    assert float(fid.compute()) == pytest.approx(closed, rel=0.03)


def test_frechet_distance_agrees_with_torchmetrics():
    from torchmetrics.image.fid import _compute_fid

    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 16, generator=g, dtype=torch.float64) @ torch.randn(16, 16, generator=g, dtype=torch.float64)
    b = (
        torch.randn(300, 16, generator=g, dtype=torch.float64) @ torch.randn(16, 16, generator=g, dtype=torch.float64)
        + 1
    )
    ours = frechet_distance(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))
    reference = float(_compute_fid(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T)))
    assert ours == pytest.approx(reference, rel=1e-9)
    fid = FrechetDistance(feature=GivenFeatures(16))
    fid.update(a, real=True)
    fid.update(b, real=False)
    assert float(fid.compute()) == pytest.approx(reference, rel=1e-9)
    # rank-deficient covariances (fewer samples than features), as with few images
    assert frechet_distance(a[:5].mean(0), torch.cov(a[:5].T), a[:5].mean(0), torch.cov(a[:5].T)) == pytest.approx(
        0, abs=1e-9
    )


def test_frechet_distance_needs_two_samples():
    fid = FrechetDistance(feature=GivenFeatures(3))
    fid.update(torch.zeros(1, 3, dtype=torch.float64), real=True)
    fid.update(torch.zeros(1, 3, dtype=torch.float64), real=False)
    with pytest.raises(ValueError, match="at least 2"):
        fid.compute()


# ------------------------------------------------------------------------------------ ReconstructionMetrics


def test_identical_images_give_perfect_scores(lpips_net, inception_net):
    x = _images(2, 0)
    results = ReconstructionMetrics(lpips_net=lpips_net, inception_net=inception_net).compute(
        predictions=x, references=x
    )
    assert set(results) == {"psnr", "ssim", "lpips", "rfid", "l1", "num_images"}
    assert results["psnr"] == math.inf
    assert results["l1"] == 0.0
    assert results["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert results["lpips"] == 0.0
    assert results["rfid"] == pytest.approx(0.0, abs=1e-6)
    assert results["num_images"] == 2


def test_psnr_of_a_known_offset():
    references = _images(4, 0, low=-0.8, high=0.8)
    predictions = references + 0.2  # 0.1 in [0, 1] units: MSE 0.01 -> PSNR 20 dB for every image
    results = ReconstructionMetrics(metrics=["psnr"]).compute(predictions=predictions, references=references)
    assert results["psnr"] == pytest.approx(20.0, abs=1e-3)
    assert set(results) == {"psnr", "num_images"}


def test_streamed_scores_agree_with_torchmetrics_and_are_per_image_means(lpips_net):
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    references = _images(6, 0)
    predictions = (references + 0.3 * _images(6, 1)).clamp(-1, 1)
    predictions[:3] = (references[:3] + 0.05 * _images(3, 2)).clamp(
        -1, 1
    )  # unequal errors: mean of PSNR != PSNR of mean
    metric = ReconstructionMetrics(metrics=["psnr", "ssim", "lpips"], lpips_net=lpips_net)
    for start in (0, 2, 4):
        metric.add_batch(predictions=predictions[start : start + 2], references=references[start : start + 2])
    results = metric.compute()

    p, r = (predictions + 1) / 2, (references + 1) / 2
    psnr = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3))
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
    psnr.update(p, r)
    ssim.update(p, r)
    assert results["psnr"] == pytest.approx(float(psnr.compute()), rel=1e-5)
    assert results["ssim"] == pytest.approx(float(ssim.compute()), rel=1e-5)
    pooled = PeakSignalNoiseRatio(data_range=1.0)  # one MSE over all images: not the protocol
    pooled.update(p, r)
    assert abs(results["psnr"] - float(pooled.compute())) > 0.1
    assert results["lpips"] == pytest.approx(float(lpips_net(predictions, references).mean()), rel=1e-5)
    assert results["num_images"] == 6


def test_uint8_channels_last_equals_float_input():
    references = _images(2, 0)
    predictions = (references + 0.2 * _images(2, 1)).clamp(-1, 1)

    def to_uint8(x):  # exact round trip: (k / 255) * 2 - 1
        return ((x + 1) / 2 * 255).round().to(torch.uint8).permute(0, 2, 3, 1)

    as_uint8 = to_uint8(predictions), to_uint8(references)
    as_float = tuple(x.permute(0, 3, 1, 2).double() / 255 * 2 - 1 for x in as_uint8)
    a = ReconstructionMetrics(metrics="psnr,ssim").compute(
        predictions=as_uint8[0].numpy(), references=as_uint8[1].numpy()
    )
    b = ReconstructionMetrics(metrics="psnr,ssim").compute(predictions=as_float[0], references=as_float[1])
    assert a["psnr"] == pytest.approx(b["psnr"], rel=1e-5)
    assert a["ssim"] == pytest.approx(b["ssim"], rel=1e-5)


def test_bad_inputs_raise_value_errors():
    x = _images(2, 0)
    with pytest.raises(ValueError, match="metrics"):
        ReconstructionMetrics(metrics=["psnr", "fid"])
    metric = ReconstructionMetrics(metrics=["psnr"])
    with pytest.raises(ValueError, match="same shape"):
        metric.add_batch(predictions=x, references=x[:, :, :16])
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        metric.add_batch(
            predictions=torch.zeros(2, 3, 8, 8, dtype=torch.uint8),
            references=torch.zeros(2, 3, 8, 8, dtype=torch.uint8),
        )
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        metric.add_batch(predictions=x * 255, references=x)
    with pytest.raises(ValueError, match="No images"):
        metric.compute()
    metric.add_batch(predictions=x, references=x)
    with pytest.raises(ValueError, match="not accumulated"):
        metric.compute(metrics=["ssim"])
    with pytest.raises(ValueError, match="float"):
        to_unit_images(torch.zeros(1, 3, 4, 4, dtype=torch.int32))


# -------------------------------------------------------------------------------------------- CodebookUsage


def test_codebook_usage_on_known_indices():
    indices = torch.tensor([[0, 1], [1, 5]])  # codes 0, 1, 5 of 8 used; counts 1, 2, 1
    results = CodebookUsage().compute(predictions=indices, codebook_size=8, group_sizes=[4, 4])
    assert results["codebook_usage"] == 3 / 8
    p = np.array([1, 2, 1]) / 4
    assert results["perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert results["group_usage"] == [2 / 4, 1 / 4]
    assert results["group_frequency"] == [3 / 4, 1 / 4]
    assert results["num_tokens"] == 4


def test_codebook_usage_accumulates_over_the_whole_set():
    usage = CodebookUsage(codebook_size=16)
    for start in range(0, 16, 4):  # every code once, in 4 batches
        usage.add_batch(predictions=torch.arange(start, start + 4).reshape(1, 2, 2))
    results = usage.compute()
    assert results["codebook_usage"] == 1.0
    assert results["perplexity"] == pytest.approx(16.0)
    usage.reset()
    usage.add(prediction=np.array([3, 3]))
    assert usage.compute()["codebook_usage"] == 1 / 16


def test_codebook_usage_errors():
    with pytest.raises(ValueError, match="codebook_size"):
        CodebookUsage().compute(predictions=torch.tensor([1]))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        CodebookUsage(codebook_size=4).add_batch(predictions=torch.tensor([4]))
    with pytest.raises(ValueError, match="integer"):
        CodebookUsage(codebook_size=4).add_batch(predictions=torch.tensor([0.5]))
    with pytest.raises(ValueError, match="group_sizes"):
        CodebookUsage().compute(predictions=torch.tensor([1]), codebook_size=4, group_sizes=[2, 3])


def test_codebook_usage_takes_plain_lists_of_indices():
    from groupvq_hf.evaluation.metrics import CodebookUsage

    assert CodebookUsage().compute(predictions=[0, 1, 2], codebook_size=8)["codebook_usage"] == 3 / 8
    assert CodebookUsage().compute(predictions=[[0, 1], [2, 2]], codebook_size=8)["codebook_usage"] == 3 / 8
    with pytest.raises(ValueError, match="integer code indices"):
        CodebookUsage().compute(predictions=[0.5, 1.0], codebook_size=8)


def test_l1_is_the_mean_absolute_error_on_the_training_scale():
    from groupvq_hf.evaluation.metrics import ReconstructionMetrics

    generator = torch.Generator().manual_seed(0)
    refs = torch.rand(3, 3, 16, 16, generator=generator) * 2 - 1
    preds = (refs + 0.1 * torch.randn(3, 3, 16, 16, generator=generator)).clamp(-1, 1)
    result = ReconstructionMetrics(metrics="l1").compute(predictions=preds, references=refs)
    expected = (preds - refs).abs().mean(dim=(1, 2, 3)).mean().item()
    assert result["l1"] == pytest.approx(expected, rel=1e-5)
    assert ReconstructionMetrics(metrics="l1").compute(predictions=refs, references=refs)["l1"] == 0.0
