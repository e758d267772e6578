"""Decode at the size you need: the DCT scale chosen per crop, reduced- vs full-decode crops on real photos, the
full-decode switch, other formats, and exact resume with reduced decoding on."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from conftest import train_in_process
from PIL import Image

from groupvq_hf.data import (
    CropPlan,
    ResumableBatches,
    SkippedImage,
    build_image_dataset,
    decode_image,
    demo_images,
    example_seed,
    image_transform,
    open_image,
    plan_crop,
    render_crop,
    to_rgb,
)
from groupvq_hf.data.demo import DEMO_CROP_SCALE

ONE_LEVEL = 1 / 127.5  # one uint8 step in [-1, 1] pixels


@pytest.fixture(autouse=True)
def _no_thread_shutdown_sleep(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def _encode(image: Image.Image, fmt: str = "JPEG", **kwargs) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return {"bytes": buffer.getvalue(), "path": None}


@pytest.fixture(scope="module")
def photos() -> list[dict]:
    """Real photographs as stored JPEGs (quality 90): the demo photos at their own sizes (300 to 1411 px) and
    ImageNet-size (500 x 375, 375 x 500) cuts of them."""
    stored = []
    for i, photo in enumerate(demo_images()):
        stored.append(_encode(photo, quality=90))
        w, h = (500, 375) if i % 2 else (375, 500)
        scale = max(w / photo.width, h / photo.height, 1.0)
        big = photo.resize((round(photo.width * scale) + 1, round(photo.height * scale) + 1), Image.BICUBIC)
        stored.append(_encode(big.crop((0, 0, w, h)), quality=90))
    return stored


def _reference(image: dict, transform, seed: int) -> torch.Tensor:
    """Today's pipeline: full decode, RGB, the torchvision transform, clamp."""
    torch.manual_seed(seed)
    return transform(to_rgb(open_image(image))[0]).clamp_(-1.0, 1.0)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a - b) / 2).pow(2).mean().item()  # [-1, 1] pixels: peak-to-peak 2
    return float("inf") if mse == 0 else 10 * float(np.log10(1.0 / mse))


# ---------------------------------------------------------------------------------------------------- the scale
@pytest.mark.parametrize(
    "size, train, crop_scale, resolution, expected",
    [
        ((500, 375), False, None, 128, 2),  # ImageNet photo, center crop: 375 / 2 = 187 >= 128, 375 / 4 < 128
        ((375, 500), True, None, 128, 2),  # portrait, random crop: the same shorter side
        ((500, 375), False, None, 256, 1),  # 375 / 2 < 256: no reduction
        ((500, 375), False, None, 64, 4),
        ((500, 375), False, None, 32, 8),
        ((500, 375), False, None, 16, 8),  # 1/8 is the smallest DCT scale
        ((256, 400), False, None, 128, 2),  # exactly two source pixels per output pixel
        ((255, 400), False, None, 128, 1),  # one short of it
        ((1411, 1411), True, None, 128, 8),
        ((100, 80), False, None, 128, 1),  # upsampled
    ],
)
def test_dct_scale_of_resize_and_crop(size, train, crop_scale, resolution, expected):
    torch.manual_seed(0)
    plan = plan_crop(image_transform(resolution, train, crop_scale), size)
    assert plan.dct_scale() == expected
    assert min(size) / plan.dct_scale() >= min(resolution, min(size))  # the decode's shorter side still covers it


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (1411, 1411), (900, 300)])
@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_dct_scale_of_random_resized_crops_never_drops_below_the_crop(size, resolution):
    transform = image_transform(resolution, True, DEMO_CROP_SCALE)
    scales = set()
    for seed in range(200):
        torch.manual_seed(seed)
        plan = plan_crop(transform, size)
        left, upper, right, lower = plan.box
        side = min(right - left, lower - upper)  # the crop's shorter side, in source pixels
        s = plan.dct_scale()
        scales.add(s)
        assert side / s >= resolution or s == 1  # every output pixel has a decoded pixel ...
        assert s == 8 or side / (2 * s) < resolution  # ... and the next scale would not
    assert len(scales) > 1  # small and large crops of one image get different scales


def test_crop_plan_scale_from_the_box():
    assert CropPlan((0.0, 0.0, 300.0, 200.0), (64, 64)).dct_scale() == 2  # 200 / 64 = 3.1
    assert CropPlan((10.0, 20.0, 522.0, 532.0), (64, 64)).dct_scale() == 8
    assert CropPlan((0.0, 0.0, 63.9, 100.0), (64, 64)).dct_scale() == 1
    assert CropPlan((0.0, 0.0, 256.0, 128.0), (128, 64)).dct_scale() == 2


# ---------------------------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("train, crop_scale", [(False, None), (True, None), (True, DEMO_CROP_SCALE)])
def test_plan_crop_takes_the_transforms_own_draws(photos, train, crop_scale):
    """Rendered from the full decode, the plan is the transform's output (to float rounding: one uint8 level where
    a resampling weight rounds the other way) and leaves torch's RNG where the transform leaves it."""
    transform = image_transform(48, train, crop_scale)
    for seed, image in enumerate(photos):
        reference = _reference(image, transform, seed)
        after_transform = torch.get_rng_state()
        torch.manual_seed(seed)
        decoded = to_rgb(open_image(image))[0]
        plan = plan_crop(transform, decoded.size)
        assert torch.equal(torch.get_rng_state(), after_transform)
        torch.testing.assert_close(render_crop(decoded, plan), reference, rtol=0, atol=ONE_LEVEL + 1e-6)


def test_plan_crop_refuses_an_unknown_step():
    from torchvision.transforms import v2

    with pytest.raises(TypeError, match="no crop plan"):
        plan_crop(v2.Compose([v2.RandomVerticalFlip()]), (64, 64))
    with pytest.raises(TypeError, match="bicubic"):
        plan_crop(v2.Compose([v2.Resize(32)]), (64, 64))
    jpeg = _encode(demo_images()[0].resize((64, 64)), quality=90)
    with pytest.raises(TypeError, match="no crop plan"):  # a bad transform is an error, not a skipped image
        decode_image(jpeg, v2.Compose([v2.RandomVerticalFlip()]))


# ---------------------------------------------------------------------------------------------------- pixels
@pytest.mark.parametrize(
    "train, crop_scale, resolution, min_psnr",
    [(False, None, 64, 36.0), (True, None, 32, 34.0), (True, DEMO_CROP_SCALE, 48, 30.0)],
)
def test_reduced_decode_matches_full_decode_on_real_photos(photos, train, crop_scale, resolution, min_psnr):
    """Tolerance: every crop within ``min_psnr`` dB of the full-decode crop, and the median within 38 dB (measured
    on these photos: center crops >= 40 dB, random-resized crops >= 33 dB; see benchmarks/RESULTS.md)."""
    transform = image_transform(resolution, train, crop_scale)
    values, scales = [], set()
    for seed, image in enumerate(photos):
        torch.manual_seed(seed)
        reduced = decode_image(image, transform)
        scales.add(reduced.scale)
        assert reduced.pixels.shape == (3, resolution, resolution) and reduced.pixels.is_contiguous()
        assert reduced.pixels.dtype == torch.float32 and reduced.pixels.abs().max() <= 1.0
        values.append(_psnr(reduced.pixels, _reference(image, transform, seed)))
    assert scales - {1}  # the photos were decoded at reduced scales
    assert min(values) >= min_psnr and float(np.median(values)) >= 38.0, values


def test_full_decode_restores_todays_output_exactly(photos):
    for train, crop_scale in [(False, None), (True, None), (True, DEMO_CROP_SCALE)]:
        transform = image_transform(40, train, crop_scale)
        for seed, image in enumerate(photos[:6]):
            torch.manual_seed(seed)
            full = decode_image(image, transform, full_decode=True)
            assert full.scale is None and full.mode is None
            assert torch.equal(full.pixels, _reference(image, transform, seed))


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "BMP", "exif-rotated JPEG"])
def test_other_formats_decode_as_today(photos, fmt):
    photo = demo_images()[1].resize((120, 80))
    if fmt == "exif-rotated JPEG":
        exif = Image.Exif()
        exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
        image = _encode(photo, "JPEG", quality=90, exif=exif.tobytes())
        assert open_image(image).size == (80, 120)
    else:
        image = _encode(photo, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    transform = image_transform(32, True)
    torch.manual_seed(3)
    decoded = decode_image(image, transform)
    assert decoded.scale is None and torch.equal(decoded.pixels, _reference(image, transform, 3))


def test_grayscale_jpeg_is_converted_and_bad_images_are_skipped_with_todays_reasons():
    gray = _encode(demo_images()[8].convert("L"), quality=90)  # the camera man, 512 x 512
    decoded = decode_image(gray, image_transform(64, False))
    assert decoded.mode == "L" and decoded.scale == 8 and decoded.pixels.shape == (3, 64, 64)
    with pytest.raises(SkippedImage) as caught:
        decode_image({"bytes": b"not an image", "path": None}, image_transform(16, True))
    assert caught.value.reason == "undecodable:UnidentifiedImageError"
    truncated = {"bytes": gray["bytes"][: len(gray["bytes"]) // 2], "path": None}
    with pytest.raises(SkippedImage, match="undecodable:OSError"):
        decode_image(truncated, image_transform(16, True))
    with pytest.raises(SkippedImage, match="too_small"):
        decode_image(gray, image_transform(16, True), min_image_size=513)


# ---------------------------------------------------------------------------------------------------- the stream
@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory, photos):
    """3 parquet shards of 8 JPEG rows (ImageNet-size cuts of the demo photos, shrunk to 64 x 48 / 48 x 64, so a
    16 px crop decodes at 1/2); every 7th row is not an image (skipped rows shift the batch boundaries)."""
    import datasets

    root = tmp_path_factory.mktemp("jpegs")
    features = datasets.Features({"image": datasets.Image()})
    cuts = [open_image(image) for image in photos[1::2]]
    for shard in range(3):
        rows = []
        for i in range(8):
            n = 8 * shard + i
            if n % 7 == 3:
                rows.append({"bytes": b"not an image", "path": None})
                continue
            cut = cuts[n % len(cuts)]
            rows.append(_encode(cut.resize((cut.width // 8 + n % 5, cut.height // 8)), quality=90))
        datasets.Dataset.from_dict({"image": rows}, features=features).to_parquet(
            str(root / f"train-{shard:05d}-of-00003.parquet")
        )
    return str(root)


def test_stream_decodes_reduced_by_default_and_in_full_on_request(jpeg_folder):
    reduced = build_image_dataset(jpeg_folder, resolution=16, seed=2, shuffle_buffer_size=4)
    full = build_image_dataset(jpeg_folder, resolution=16, seed=2, shuffle_buffer_size=4, full_decode=True)
    a, b = list(reduced), list(full)
    assert [x["key"] for x in a] == [x["key"] for x in b] and len(a) == 21
    assert reduced.decode_scales[2] == 21 and not full.decode_scales
    assert reduced.skipped == full.skipped == {"undecodable:UnidentifiedImageError": 3}
    for x, y in zip(a, b):
        assert _psnr(x["pixel_values"], y["pixel_values"]) > 25.0  # same crop and flip, from a 1/2 decode
    # full_decode=True is today's pipeline: the same seeds, the torchvision transform on the full decode
    examples = list(full.examples)
    transform = image_transform(16, True)
    for y in b:
        seed = example_seed(2, 0, 0, 0, y["row"])
        assert torch.equal(y["pixel_values"], _reference(examples[y["row"]]["image"], transform, seed))
    with pytest.raises(ValueError, match="full_decode"):
        build_image_dataset(jpeg_folder, full_decode="yes")


def test_resume_with_reduced_decoding_equals_the_straight_run(jpeg_folder):
    def stream():
        return build_image_dataset(jpeg_folder, resolution=16, seed=4, shuffle_buffer_size=8)

    def take(batches, n):
        iterator = iter(batches)
        return [next(iterator) for _ in range(n)]

    straight_stream = stream()
    straight = take(ResumableBatches(straight_stream, 3, seed=4), 9)  # 21 images per epoch: crosses into epoch 1
    assert straight_stream.decode_scales[2] > 0
    first = ResumableBatches(stream(), 3, seed=4)
    take(first, 5)
    resumed_stream = stream()
    resumed = ResumableBatches(resumed_stream, 3, seed=4)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    tail = take(resumed, 4)
    for x, y in zip(straight[5:], tail):
        assert torch.equal(x["pixel_values"], y["pixel_values"]) and x["keys"] == y["keys"]
    assert resumed_stream.decode_scales[2] > 0


def test_training_resume_with_reduced_decoding_is_bit_exact(tmp_path, jpeg_folder):
    """scripts/train.py's loop on JPEGs decoded at 1/2: steps 1..3 in one run == 1..2 + resume to 3 (CPU)."""
    from safetensors.torch import load_file

    tiny = [
        "--dataset", jpeg_folder, "--model_config", "tiny", "--resolution", "16", "--train_batch_size", "4",
        "--perceptual_weight", "0", "--dataloader_num_workers", "0", "--disc_start", "1", "--disc_layers", "1",
        "--disc_channels", "8", "--report_to", "none",
        "--seed", "3", "--num_validation_images", "2", "--num_validation_usage_images", "4", "--validation_steps", "9",
        "--max_train_samples", "8",  # 2 batches per epoch: step 3 is in the second epoch
    ]  # fmt: skip

    def train(output_dir, *extra):
        return train_in_process(["--output_dir", str(output_dir), *tiny, *extra])

    straight, split = tmp_path / "straight", tmp_path / "split"
    train(straight, "--max_train_steps", "3", "--checkpointing_steps", "3")
    train(split, "--max_train_steps", "2", "--checkpointing_steps", "2")
    result = train(split, "--max_train_steps", "3", "--checkpointing_steps", "3", "--resume_from_checkpoint", "latest")
    assert result["resumed_from"].endswith("checkpoint-2") and result["global_step"] == 3
    assert json.loads((split / "checkpoints" / "checkpoint-3" / "run_args.json").read_text())["full_decode"] is False
    for name in ("model.safetensors", "model_1.safetensors"):  # generator and discriminator at step 3
        a = load_file(str(straight / "checkpoints" / "checkpoint-3" / name))
        b = load_file(str(split / "checkpoints" / "checkpoint-3" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="full_decode"):  # a run that decoded in full is not resumed reduced
        train(split, "--max_train_steps", "4", "--full_decode", "--resume_from_checkpoint", "latest")


def test_evaluation_and_training_validation_decode_in_full(jpeg_folder):
    from groupvq_hf.data import collate_pixels
    from groupvq_hf.evaluation import build_eval_dataloader
    from groupvq_hf.training import parse_args, validation_images

    # the first 3 rows are images (row 3 is not): every reader below sees the same 3
    full = build_image_dataset(jpeg_folder, resolution=16, train=False, full_decode=True, max_samples=3)
    expected = collate_pixels(list(full))
    loader = build_eval_dataloader(jpeg_folder, "train", 16, batch_size=3, max_samples=3)
    assert torch.equal(next(iter(loader))["pixel_values"], expected) and loader.dataset.full_decode
    args = parse_args(["--dataset", jpeg_folder, "--resolution", "16", "--max_train_steps", "1"])
    assert args.full_decode is False  # training decodes reduced by default ...
    pixels, _ = validation_images(args, 3)
    assert torch.equal(pixels, expected)  # ... its held-out images in full
    reduced = collate_pixels(list(build_image_dataset(jpeg_folder, resolution=16, train=False, max_samples=3)))
    assert not torch.equal(reduced, expected)
