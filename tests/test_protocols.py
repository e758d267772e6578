"""Evaluation protocols (issue 24): SimVQ's evaluation.py and the ADM evaluator's inputs, against direct
computations with pytorch-fid, lpips and scikit-image; 1 vs 2 processes; bounded memory of the npz packing."""

import json
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

from groupvq_hf import GroupVQModel
from groupvq_hf.evaluation import pretrained
from groupvq_hf.evaluation.evaluator import build_eval_dataloader, evaluate_model
from groupvq_hf.evaluation.protocols import (
    NpzPairWriter,
    ProtocolMetrics,
    center_crop_arr,
    pack_npz,
    protocol_transform,
    simvq_psnr,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FID_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's weights file name (FID_WEIGHTS_URL)
BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
ALEX_SLICES = ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12))  # lpips' pretrained_networks.alexnet
VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # lpips' pretrained_networks.vgg16


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A torch hub cache holding random-weight networks of the right architectures under their real file names."""
    import torchvision

    home = tmp_path_factory.mktemp("torch_home")
    checkpoints = home / "hub" / "checkpoints"
    pretrained.save_pytorch_fid_inception_weights(checkpoints / FID_FILE, dtype=torch.float16)
    torch.manual_seed(0)
    alex = torchvision.models.alexnet().features
    pretrained.save_lpips_weights(checkpoints / BACKBONE_FILES["alex"], alex)
    pretrained.save_lpips_weights(checkpoints / BACKBONE_FILES["vgg"], dtype=torch.float16)
    return home


def _direct_lpips(net, path):
    """The lpips package's LPIPS with the backbone features read from ``path`` (features keys, 'N.weight')."""
    import lpips

    model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False).eval()
    state = torch.load(path, weights_only=True)
    slices = ALEX_SLICES if net == "alex" else VGG_SLICES
    for s, (start, end) in enumerate(slices, 1):
        block = getattr(model.net, f"slice{s}")
        for layer in range(start, end):
            if f"{layer}.weight" in state:
                getattr(block, str(layer)).weight.data.copy_(state[f"{layer}.weight"].float())
                getattr(block, str(layer)).bias.data.copy_(state[f"{layer}.bias"].float())
    return model


def _simvq_loop(images, reconstructed, batch_size, inception=None, lpips_alex=None, lpips_vgg=None):
    """SimVQ's evaluation.py loop, written with pytorch-fid, lpips and scikit-image (images in [-1, 1])."""
    from skimage.metrics import peak_signal_noise_ratio as psnr_loss
    from skimage.metrics import structural_similarity as ssim_loss

    pred_xs, pred_recs, ssims, psnrs = [], [], [], []
    alex = vgg = 0.0
    psnr_value, num_iter = 0.0, 0
    for start in range(0, len(images), batch_size):
        x, rec = images[start : start + batch_size], reconstructed[start : start + batch_size].clamp(-1, 1)
        if inception is not None:
            alex += float(lpips_alex(x, rec).sum())
            vgg += float(lpips_vgg(x, rec).sum())
        x, rec = (x + 1) / 2, (rec + 1) / 2
        if inception is not None:
            pred_xs.append(inception(x)[0].squeeze(3).squeeze(2).numpy())
            pred_recs.append(inception(rec)[0].squeeze(3).squeeze(2).numpy())
        rgb_restored = (rec * 255.0).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy().astype(np.float32) / 255.0
        rgb_gt = (x * 255.0).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy().astype(np.float32) / 255.0
        psnr_temp = ssim_temp = 0
        for i in range(len(rgb_gt)):
            ssim_temp += ssim_loss(rgb_restored[i], rgb_gt[i], data_range=1.0, channel_axis=-1)
            psnrs.append(psnr_loss(rgb_gt[i], rgb_restored[i]))
            psnr_temp += psnr_loss(rgb_gt, rgb_restored)  # SimVQ's call: the whole batch, inside the image loop
        psnr_value += psnr_temp / len(rgb_gt)
        ssims.append(ssim_temp / len(rgb_gt))  # SimVQ's ssim_value: each batch's mean, averaged over batches
        num_iter += 1
    mean = lambda values: float(np.mean(values, dtype=np.float64))  # noqa: E731
    results = {"ssim": mean(ssims), "psnr": mean(psnrs), "psnr_simvq": psnr_value / num_iter}
    if inception is None:
        return results
    pred_xs, pred_recs = np.concatenate(pred_xs), np.concatenate(pred_recs)
    # what SimVQ passes to calculate_frechet_distance (references first); the 2048 x 2048 sqrtm itself takes 12 s on
    # 2 cores, so the test compares these inputs and runs pytorch-fid's distance once, inside our metric
    statistics = (np.mean(pred_xs, axis=0), np.cov(pred_xs, rowvar=False), np.mean(pred_recs, axis=0),
                  np.cov(pred_recs, rowvar=False))  # fmt: skip
    return {**results, "fid_statistics": statistics, "lpips_alex": alex / len(images), "lpips_vgg": vgg / len(images)}


def _crops(n, size=32, seed=0):  # 32 px: the smallest LPIPS(AlexNet) takes
    """Stream-like crops: uint8 values k mapped to k / 127.5 - 1 (float32), (n, 3, size, size)."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy((rng.integers(0, 256, (n, 3, size, size)) / 127.5 - 1.0).astype(np.float32))


# --------------------------------------------------------------------------------------------------- SimVQ


def test_simvq_metrics_equal_pytorch_fid_lpips_and_scikit_image(hub_cache, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(hub_cache))
    from pytorch_fid import fid_score
    from pytorch_fid.inception import InceptionV3

    distances = []  # (statistics, distance) of each call of pytorch-fid's calculate_frechet_distance
    real_distance = fid_score.calculate_frechet_distance

    def recorded_distance(mu1, sigma1, mu2, sigma2):
        distances.append(((mu1, sigma1, mu2, sigma2), real_distance(mu1, sigma1, mu2, sigma2)))
        return distances[-1][1]

    monkeypatch.setattr(fid_score, "calculate_frechet_distance", recorded_distance)

    images = _crops(6)
    reconstructed = (images + 0.2 * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    ours = ProtocolMetrics("simvq", psnr_batch_size=4)  # networks from torch hub's cache, as offline users run it
    for start in (0, 2, 4):
        ours.add_batch(images[start : start + 2], reconstructed[start : start + 2], keys=range(start, start + 2))
    results = ours.compute()

    inception = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()  # pytorch-fid's own loading path
    checkpoints = hub_cache / "hub" / "checkpoints"
    alex, vgg = (_direct_lpips(net, checkpoints / BACKBONE_FILES[net]) for net in ("alex", "vgg"))
    with torch.no_grad():
        direct = _simvq_loop(images, reconstructed, 4, inception, alex, vgg)
        at_2 = _simvq_loop(images[:4], reconstructed[:4], 2)["psnr_simvq"]
    assert set(results) == set(direct) - {"fid_statistics"} | {"rfid"}
    for key in ("psnr", "psnr_simvq"):
        assert results[key] == pytest.approx(direct[key], rel=1e-12), key
    assert results["ssim"] == pytest.approx(direct["ssim"], rel=1e-7)  # SimVQ adds scikit-image's float32 values
    for key in ("lpips_alex", "lpips_vgg"):
        assert results[key] == pytest.approx(direct[key], rel=1e-6), key
    ((statistics, distance),) = distances  # pytorch-fid's distance on SimVQ's float64 means and covariances
    assert results["rfid"] == distance > 0
    for ours_value, direct_value in zip(statistics, direct["fid_statistics"]):
        assert ours_value.dtype == np.float64 and ours_value.shape == direct_value.shape
        np.testing.assert_allclose(ours_value, direct_value, rtol=1e-6, atol=1e-9 * np.abs(direct_value).max())

    # psnr_simvq depends on the batch size (blocks of 4 then 2 images here, 2 and 2 below); psnr does not.
    small = ProtocolMetrics("simvq", metrics="psnr,psnr_simvq", psnr_batch_size=2)
    small.add_batch(images[:4], reconstructed[:4], keys=[3, 2, 1, 0])  # keys, not arrival order, set the blocks
    assert small.compute()["psnr_simvq"] == pytest.approx(at_2, rel=1e-12)
    whole = ProtocolMetrics("simvq", metrics="psnr_simvq")  # SimVQ's 64: one block for 6 images
    whole.add_batch(images, reconstructed, keys=range(6))
    assert whole.compute()["psnr_simvq"] != pytest.approx(results["psnr_simvq"], rel=1e-6)


def test_simvq_psnr_blocks():
    assert simvq_psnr([0.01, 0.01, 0.0001], batch_size=2) == pytest.approx((20 + 40) / 2)
    assert simvq_psnr([0.01, 0.0001], batch_size=64) == pytest.approx(10 * np.log10(1 / 0.00505))
    with pytest.raises(ValueError, match="mse"):
        simvq_psnr([])


def test_simvq_preprocessing_is_torchvision_resize_then_center_crop():
    from torchvision import transforms

    rng = np.random.default_rng(0)
    transform = protocol_transform("simvq", 16)
    for size in ((37, 23), (16, 40), (64, 64)):
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        crop = np.array(transforms.CenterCrop(16)(transforms.Resize(16)(image)))
        expected = torch.from_numpy((crop / 127.5 - 1.0).astype(np.float32)).permute(2, 0, 1)
        assert torch.equal(transform(image), expected)


@pytest.mark.parametrize("protocol", ["simvq", "adm"])
def test_protocol_streams_open_images_as_the_reference_loaders_do(protocol, tmp_path):
    """SimVQ's and ADM's loaders read a file with ``Image.open(...).convert("RGB")``: no EXIF rotation (which
    ``datasets`` applies) and alpha dropped, not composited on white. The protocol streams see the same pixels; the
    default protocol keeps the rotated, composited image."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    rotated = Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees on display
    rotated.save(folder / "a_rotated.jpg", exif=exif)
    rgba = rng.integers(0, 256, (48, 48, 4), dtype=np.uint8)
    rgba[..., 3] = 40  # mostly transparent: a composite on white differs from dropping alpha
    Image.fromarray(rgba, "RGBA").save(folder / "b_alpha.png")
    files = sorted(folder.iterdir())
    transform = protocol_transform(protocol, 32)
    loader = build_eval_dataloader(str(folder), resolution=32, batch_size=2, transform=transform, ordered=True)
    pixels = next(iter(loader))["pixel_values"]
    expected = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    assert torch.equal(pixels, expected)
    default = next(iter(build_eval_dataloader(str(folder), resolution=32, batch_size=2, ordered=True)))["pixel_values"]
    plain = build_eval_dataloader(str(folder), resolution=32, batch_size=2, ordered=True).dataset.transform
    assert not torch.equal(default[0], plain(Image.open(files[0]).convert("RGB")).clamp(-1, 1))  # rotated there


# ------------------------------------------------------------------------------------------------------ ADM


def _adm_crop(image, size):
    """ADM's center_crop_arr, written from its description: BOX halvings, one BICUBIC resize, center crop."""
    w, h = image.size
    while min(w, h) >= 2 * size:
        w, h = w // 2, h // 2
        image = image.resize((w, h), Image.BOX)
    ratio = size / min(w, h)
    image = image.resize((round(w * ratio), round(h * ratio)), Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


def test_adm_crops_equal_an_independent_center_crop_arr():
    rng = np.random.default_rng(0)
    transform = protocol_transform("adm", 16)
    for size in ((100, 70), (33, 17), (16, 16), (17, 64)):
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        crop = _adm_crop(image, 16)
        assert crop.shape == (16, 16, 3) and np.array_equal(center_crop_arr(image, 16), crop)
        expected = torch.from_numpy(crop.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)
        assert torch.equal(transform(image), expected)


def _write_and_pack(folder, n, size=32, batch=100):
    """``n`` pairs through the writer (keys arriving in reverse within each batch) and the packer (chunks of 128
    images); returns the traced peak of Python / numpy allocations and the packed paths."""
    writer = NpzPairWriter(folder, rank=0)
    tracemalloc.start()
    try:
        for start in range(0, n, batch):
            keys = np.arange(start, start + batch)[::-1]
            refs = np.broadcast_to((keys % 256).astype(np.uint8)[:, None, None, None], (batch, size, size, 3))
            writer.add(refs, 255 - refs, keys)
        writer.close()
        paths = pack_npz(folder, 1, (size, size, 3), chunk_size=128)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, paths


def test_npz_packing_memory_does_not_grow_with_the_number_of_images(tmp_path):
    """1,500 and 3,000 pairs of 32 px (4.4 / 8.8 MiB per array): the traced peak is the same (a few chunks of
    128 images), a small part of one array, and the files hold every image in key order."""
    small, _ = _write_and_pack(tmp_path / "small", 1500)
    peak, paths = _write_and_pack(tmp_path / "large", 3000)
    array_bytes = 3000 * 32 * 32 * 3
    assert peak < array_bytes / 4 and peak < small * 1.25, (small, peak, array_bytes)
    refs, recs = (np.load(paths[name])["arr_0"] for name in ("references", "reconstructions"))
    assert refs.shape == (3000, 32, 32, 3) and refs.dtype == np.uint8
    assert np.array_equal(refs[:, 0, 0, 0], (np.arange(3000) % 256).astype(np.uint8))
    assert np.array_equal(recs, 255 - refs)
    assert sorted(p.name for p in (tmp_path / "large").iterdir()) == ["reconstructions.npz", "references.npz"]


def test_a_kill_while_packing_never_pairs_files_of_two_runs(tmp_path, monkeypatch):
    from groupvq_hf.evaluation import protocols

    _write_and_pack(tmp_path, 100)
    real_write = protocols.write_npy_chunks

    def killed_at_the_second_file(path, *args):
        if path.name == "reconstructions.npz":
            raise KeyboardInterrupt
        return real_write(path, *args)

    monkeypatch.setattr(protocols, "write_npy_chunks", killed_at_the_second_file)
    with pytest.raises(KeyboardInterrupt):
        _write_and_pack(tmp_path, 200)
    assert np.load(tmp_path / "references.npz")["arr_0"].shape[0] == 200  # this run's
    assert not (tmp_path / "reconstructions.npz").exists()  # not the previous run's 100 beside it


# ------------------------------------------------------------------------------------- scripts, 1 vs 2 processes


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """7 photos of different sizes and shapes (one grayscale, one undecodable file)."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(((40, 30), (33, 50), (64, 64), (20, 45), (70, 36), (36, 36), (50, 41))):
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        (image.convert("L") if i == 2 else image).save(folder / f"img_{i}.png")
    (folder / "img_3b.jpg").write_bytes(b"not a jpeg")
    return folder


def _two_processes(args, hub_cache):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["TORCH_HOME"] = str(hub_cache)
    command = [
        os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "scripts/evaluate.py", *args,
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _single(model_path, folder, protocol, resolution, **kwargs):
    model = GroupVQModel.from_pretrained(model_path).eval()
    loader = build_eval_dataloader(
        str(folder), resolution=resolution, batch_size=2, transform=protocol_transform(protocol, resolution),
        ordered=True,
    )  # fmt: skip
    return evaluate_model(model, loader, protocol=protocol, progress=False, **kwargs)


def test_simvq_script_two_processes_equal_one(saved_model, photo_folder, hub_cache, tmp_path, monkeypatch):
    """Every SimVQ metric but rFID (each pytorch-fid Frechet distance costs a 2048x2048 ``sqrtm``, ~30 s on a
    loaded CPU): its state is the float64 feature sums of `FrechetDistance`, reduced across processes as in
    test_evaluation's two-process run; `PytorchFIDDistance` only changes the distance computed from them."""
    checkpoints = hub_cache / "hub" / "checkpoints"
    _two_processes([
        "--model", str(saved_model), "--dataset", str(photo_folder), "--resolution", "32", "--batch_size", "2",
        "--protocol", "simvq", "--metrics", "psnr,psnr_simvq,ssim,lpips_alex,lpips_vgg,codebook_usage",
        "--lpips_weights", str(checkpoints / BACKBONE_FILES["vgg"]),
        "--lpips_alex_weights", str(checkpoints / BACKBONE_FILES["alex"]),
        "--output", str(tmp_path / "results.json"), "--model_card", str(tmp_path / "card" / "README.md"),
        "--save_images", str(tmp_path / "pngs"), "--no_progress",
    ], hub_cache)  # fmt: skip
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["protocol"] == "simvq" and record["num_samples"] == 7 and record["skipped_images"] == 1
    monkeypatch.setenv("TORCH_HOME", str(hub_cache))
    single = _single(
        saved_model, photo_folder, "simvq", 32, metrics="psnr,psnr_simvq,ssim,lpips_alex,lpips_vgg,codebook_usage"
    )
    metrics = record["metrics"]
    assert set(metrics) == {"psnr", "psnr_simvq", "ssim", "lpips_alex", "lpips_vgg", "codebook_usage", "perplexity"}
    for key in ("psnr", "psnr_simvq", "lpips_alex", "lpips_vgg", "perplexity"):
        assert metrics[key] == pytest.approx(single[key], rel=1e-5), key
    # SSIM of this random model is ~5e-4: a reconstruction pixel whose float differs in its last bits between the
    # runs (threads) can truncate to the next uint8 level, which moves so small an SSIM by ~1e-6.
    assert metrics["ssim"] == pytest.approx(single["ssim"], abs=1e-5)
    assert metrics["codebook_usage"] == single["codebook_usage"]

    # --save_images: the crops of the stream (rows in the folder's order; row 3 is the bad file) as PNG pairs
    names = sorted(p.name for p in (tmp_path / "pngs" / "references").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "pngs" / "reconstructions").iterdir()) and len(names) == 7
    from groupvq_hf.data import build_image_dataset

    stream = build_image_dataset(str(photo_folder), split="train", resolution=32, train=False,
                                 transform=protocol_transform("simvq", 32))  # fmt: skip
    for example in stream:
        if example.get("pixel_values") is not None:
            saved = np.asarray(Image.open(tmp_path / "pngs" / "references" / f"{example['row']:08d}.png"))
            crop = ((example["pixel_values"].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
            assert np.array_equal(saved, crop)

    from huggingface_hub import ModelCard

    entries = ModelCard.load(tmp_path / "card" / "README.md").data.eval_results
    assert {e.metric_config for e in entries} == {"protocol=simvq"}
    assert {e.metric_type for e in entries} >= {"psnr", "psnr_simvq", "lpips_alex", "lpips_vgg"}


def test_adm_script_writes_the_evaluator_inputs_and_two_processes_equal_one(
    saved_model, photo_folder, hub_cache, tmp_path
):
    weights = hub_cache / "hub" / "checkpoints"
    _two_processes([
        "--model", str(saved_model), "--dataset", str(photo_folder), "--resolution", "16", "--batch_size", "2",
        "--protocol", "adm", "--npz_dir", str(tmp_path / "npz"),
        "--lpips_weights", str(weights / BACKBONE_FILES["vgg"]),
        "--output", str(tmp_path / "results.json"), "--no_progress",
    ], hub_cache)  # fmt: skip
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["protocol"] == "adm" and record["num_samples"] == 7
    assert set(record["metrics"]) == {"psnr", "ssim", "lpips", "l1", "codebook_usage", "perplexity"}
    refs = np.load(tmp_path / "npz" / "references.npz")["arr_0"]
    recs = np.load(tmp_path / "npz" / "reconstructions.npz")["arr_0"]
    assert refs.shape == recs.shape == (7, 16, 16, 3) and refs.dtype == recs.dtype == np.uint8
    photos = sorted(photo_folder.glob("img_*.png"))  # the folder's rows in order, the bad file left out
    expected = np.stack([center_crop_arr(Image.open(p).convert("RGB"), 16) for p in photos])
    assert np.array_equal(refs, expected)

    # The reconstructions are the model's, of exactly those crops, quantised as LlamaGen does.
    model = GroupVQModel.from_pretrained(saved_model).eval()
    with torch.no_grad():
        pixels = torch.from_numpy(expected.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
        out = model(pixels).reconstruction.clamp(-1, 1)
    quantised = torch.clamp(127.5 * out + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()
    assert np.abs(quantised.astype(int) - recs.astype(int)).max() <= 1  # batching: float rounding at most

    single = _single(saved_model, photo_folder, "adm", 16, npz_dir=tmp_path / "single",
                     lpips_weights=str(weights / BACKBONE_FILES["vgg"]))  # fmt: skip
    for key in ("psnr", "ssim", "lpips", "l1", "perplexity"):
        assert record["metrics"][key] == pytest.approx(single[key], rel=1e-5), key
    assert np.array_equal(np.load(tmp_path / "single" / "references.npz")["arr_0"], refs)


def test_protocol_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="protocol"):
        ProtocolMetrics("llamagen")
    with pytest.raises(ValueError, match="npz_dir"):
        ProtocolMetrics("adm", metrics="psnr")
    with pytest.raises(ValueError, match="npz_dir"):
        ProtocolMetrics("default", metrics="psnr", npz_dir=tmp_path)
    with pytest.raises(ValueError, match="metrics"):
        ProtocolMetrics("adm", metrics="rfid", npz_dir=tmp_path)
