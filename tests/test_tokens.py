"""Tokens for generative models: `groupvq_hf.tokenize_dataset` and scripts/tokenize_dataset.py (tiny model, 32 px)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from groupvq_hf import GroupVQConfig, GroupVQImageProcessor, GroupVQModel
from groupvq_hf.data import demo_images
from groupvq_hf.tokens import AUGMENTATIONS, decode_tokens, tokenize_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO_ROOT / "scripts" / "tokenize_dataset.py")
RESOLUTION = 32
IMAGENET_STATS = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}  # a processor's own


@pytest.fixture(autouse=True)
def _no_thread_shutdown_sleep(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state(fresh_accelerate_state):
    """Every test here starts and ends with a fresh accelerate state."""
    yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "model"
    GroupVQModel(GroupVQConfig.from_preset("tiny")).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """Six real photos (scikit-image's, shrunk to at most 80 px), one undecodable file and one 4 x 4 image."""
    path = tmp_path_factory.mktemp("photos")
    for i, image in enumerate(demo_images()[:6]):
        image.thumbnail((80, 80))
        image.save(path / f"photo{i}.{'png' if i % 2 else 'jpg'}")
    (path / "broken.jpg").write_bytes(b"not an image")
    Image.new("RGB", (4, 4), (10, 20, 30)).save(path / "tiny.png")
    return path


def _env(**extra) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.update(extra)
    return env


def _run(cmd: list[str], **env) -> str:
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(**env), capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


def _rows(folder: Path, split: str = "train") -> list[dict]:
    """The rows of a token dataset sorted by (key, view)."""
    import datasets

    rows = list(datasets.load_dataset(str(folder), split=split))
    return sorted(rows, key=lambda row: (row["key"], row["augmentation"]))


def _tokenize(model_dir, dataset, out, **kwargs) -> dict:
    kwargs.setdefault("progress", False)
    return tokenize_dataset(str(model_dir), str(dataset), out, RESOLUTION, **kwargs)


def _processed(image: Image.Image) -> torch.Tensor:
    """``processor(image)`` with the model's processor at ``RESOLUTION``: (1, 3, R, R)."""
    size = {"shortest_edge": RESOLUTION}, {"height": RESOLUTION, "width": RESOLUTION}
    processor = GroupVQImageProcessor(size=size[0], crop_size=size[1])
    return processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]


def _expected(model, image: Image.Image, augment: str = "none") -> list[list[int]]:
    """``model.encode(processor(image)).indices`` of every view, flattened row-major."""
    pixels = _processed(image)
    views = [pixels, pixels.flip(-1)] if augment == "flip" else [pixels]
    with torch.no_grad():
        return [model.encode(view).indices.flatten(1)[0].tolist() for view in views]


# ---------------------------------------------------------------------------------------------------- exactness
def test_script_tokens_equal_model_encode_of_processed_photos_and_decode_back(model_dir, photo_folder, tmp_path):
    import datasets

    out = tmp_path / "tokens"
    log = _run([
        sys.executable, SCRIPT, "--model", str(model_dir), "--dataset", str(photo_folder), "--resolution",
        str(RESOLUTION), "--output_dir", str(out), "--augment", "flip", "--batch_size", "3", "--no_progress",
    ])  # fmt: skip
    assert "skipped 2 image(s)" in log
    record = json.loads((out / "tokenization.json").read_text())
    assert record["token_grid"] == [8, 8] and record["codebook_size"] == 256 and record["num_groups"] == 8
    assert record["group_sizes"] == [32] * 8 and record["augment"] == "flip" and record["resolution"] == RESOLUTION
    assert record["num_examples"] == 12 and record["num_skipped"] == 2 and record["resize"] is None
    assert record["skipped"] == {"too_small": 1, "undecodable:UnidentifiedImageError": 1}
    assert record["model"]["name_or_path"] == str(model_dir.resolve()) and record["dataset"] == str(photo_folder)
    card = (out / "README.md").read_text()
    assert "dataset_info:" in card and "decode_tokens" in card and "images skipped" in card

    model = GroupVQModel.from_pretrained(model_dir).eval()
    rows = _rows(out)
    assert [row["augmentation"] for row in rows] == ["center", "flip"] * 6
    ds = datasets.load_dataset(str(out), split="train")
    assert ds.features["tokens"] == datasets.List(datasets.Value("int32"), length=64)
    assert "label" not in ds.features  # an image folder without labels
    for center, flip in zip(rows[::2], rows[1::2]):
        assert center["key"] == flip["key"]
        assert [center["tokens"], flip["tokens"]] == _expected(model, Image.open(center["key"]), "flip")
    streamed = list(datasets.load_dataset(str(out), split="train", streaming=True))
    assert sorted(r["tokens"] for r in streamed) == sorted(r["tokens"] for r in rows)

    tokens = torch.tensor(rows[0]["tokens"]).view(1, 8, 8)
    with torch.no_grad():
        reference = GroupVQImageProcessor().postprocess(model.decode_indices(tokens).clamp(-1, 1), output_type="np")
    image = decode_tokens(model, rows[0]["tokens"], token_grid=record["token_grid"])[0]
    assert isinstance(image, Image.Image) and np.array_equal(np.asarray(image), reference[0])
    both = decode_tokens(model, [rows[0]["tokens"], rows[1]["tokens"]], token_grid=[8, 8], output_type="np")
    assert both.shape == (2, 32, 32, 3) and np.array_equal(both[0], reference[0])
    with pytest.raises(ValueError, match="token_grid"):
        decode_tokens(model, rows[0]["tokens"], token_grid=[4, 4])
    with pytest.raises(ValueError, match="codebook of 256"):
        decode_tokens(model, [300] * 64, token_grid=[8, 8])
    with pytest.raises(ValueError, match="`tokens` must be integer code indices"):
        decode_tokens(model, [0.5] * 64, token_grid=[8, 8])


def test_ten_crop_views_are_llamagen_crops_of_the_processed_image(model_dir, photo_folder, tmp_path):
    from torchvision.transforms.v2.functional import five_crop

    out = tmp_path / "ten"
    record = _tokenize(model_dir, photo_folder, out, augment="ten_crop", max_samples=2)
    assert record["views"] == list(AUGMENTATIONS["ten_crop"])
    model = GroupVQModel.from_pretrained(model_dir).eval()
    rows = _rows(out)
    row = {r["augmentation"]: r for r in rows if r["key"] == rows[0]["key"]}
    side = int(RESOLUTION * 1.1)
    processor = GroupVQImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    pixels = processor(Image.open(rows[0]["key"]).convert("RGB"), return_tensors="pt")["pixel_values"][0]
    crops = five_crop(pixels, [RESOLUTION, RESOLUTION])
    with torch.no_grad():
        for i, crop in enumerate(crops):
            assert row[f"crop_{i}"]["tokens"] == model.encode(crop[None]).indices.flatten().tolist()
            assert row[f"crop_{i}_flip"]["tokens"] == model.encode(crop.flip(-1)[None]).indices.flatten().tolist()


def test_a_processor_with_its_own_mean_and_std_gives_the_tokens_of_its_unclamped_output(model_dir, photo_folder, tmp_path):
    """A saved model whose processor uses ImageNet statistics (pixels outside [-1, 1]): the tokens are those of
    ``processor(image)`` as it is, not clamped to [-1, 1], and `decode_tokens` maps pixels back with its statistics."""
    import shutil

    custom = tmp_path / "model"
    shutil.copytree(model_dir, custom)
    size = {"size": {"shortest_edge": RESOLUTION}, "crop_size": {"height": RESOLUTION, "width": RESOLUTION}}
    processor = GroupVQImageProcessor(**size, **IMAGENET_STATS)
    processor.save_pretrained(custom)
    out = tmp_path / "tokens"
    _tokenize(custom, photo_folder, out)
    model = GroupVQModel.from_pretrained(custom).eval()
    rows = _rows(out)
    assert len(rows) == 6  # the six photos (the broken and the tiny file are skipped)
    for row in rows:
        pixels = processor(Image.open(row["key"]).convert("RGB"), return_tensors="pt")["pixel_values"]
        assert pixels.abs().max() > 1  # outside [-1, 1]: a clamp would change them
        with torch.no_grad():
            assert row["tokens"] == model.encode(pixels).indices.flatten().tolist()
    with torch.no_grad():  # decoding maps the pixels back with the same processor's mean and std
        decoded = model.decode_indices(torch.tensor(rows[0]["tokens"]).view(1, 8, 8))
    image = np.asarray(decode_tokens(model, rows[0]["tokens"], token_grid=[8, 8])[0])
    assert np.array_equal(image, processor.postprocess(decoded, output_type="np")[0])
    assert not np.array_equal(image, GroupVQImageProcessor().postprocess(decoded, output_type="np")[0])


def _odd_mode_images() -> dict[str, Image.Image]:
    """A photo stored in the modes the stream converts: 16-bit and 32-bit grey, float, alpha, palette with a
    transparent colour, CMYK, greyscale with alpha."""
    photo = demo_images()[0].copy()
    photo.thumbnail((60, 60))
    grey = np.asarray(photo.convert("L"), dtype=np.float64)
    transparent = photo.convert("RGBA")
    alpha = (np.arange(photo.width)[None] * 4 % 256).repeat(photo.height, 0).astype(np.uint8)  # a ramp
    transparent.putalpha(Image.fromarray(alpha))
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    palette.info["transparency"] = 3
    return {
        "i16.png": Image.fromarray((grey * 200).astype(np.uint16)),  # 16-bit, values up to 51,000
        "i32.tiff": Image.fromarray((grey * 3).astype(np.int32)),
        "float.tiff": Image.fromarray((grey / 255).astype(np.float32)),  # a float image in [0, 1]
        "rgba.png": transparent,
        "palette.png": palette,
        "cmyk.jpg": photo.convert("CMYK"),
        "la.png": transparent.convert("LA"),
    }


def test_images_of_any_mode_give_the_tokens_of_the_processor_applied_to_the_image_as_opened(model_dir, tmp_path):
    """16-bit, float, alpha, palette and CMYK images: every row's tokens equal ``model.encode(processor(image))``
    with the image as PIL opens it (no conversion by the caller), so the processor and the stream convert alike."""
    folder = tmp_path / "modes"
    folder.mkdir()
    for name, image in _odd_mode_images().items():
        image.save(folder / name)
    out = tmp_path / "tokens"
    _tokenize(model_dir, folder, out)
    model = GroupVQModel.from_pretrained(model_dir).eval()
    processor = GroupVQImageProcessor.for_resolution(RESOLUTION)
    rows = _rows(out)
    assert sorted(Path(row["key"]).name for row in rows) == sorted(_odd_mode_images())
    for row in rows:
        opened = Image.open(row["key"])
        pixels = processor(opened, return_tensors="pt")["pixel_values"]
        assert pixels.std() > 0.1, row["key"]  # a real picture, not a saturated one
        with torch.no_grad():
            assert row["tokens"] == model.encode(pixels).indices.flatten().tolist(), row["key"]


@pytest.mark.parametrize("augment", list(AUGMENTATIONS))
def test_loader_workers_send_uint8_views_that_normalise_to_the_processor_output_bit_for_bit(augment):
    """The workers send a quarter of the bytes; the device-side normalisation gives exactly the processed views, for
    a processor with its own mean and std (a saved model's) as for the default one."""
    from torchvision.transforms.v2.functional import five_crop

    from groupvq_hf.tokens import ViewTransform

    image = demo_images()[1]
    image.thumbnail((90, 70))
    side = int(RESOLUTION * 1.1) if augment == "ten_crop" else RESOLUTION
    for stats in ({}, IMAGENET_STATS):
        size = {"size": {"shortest_edge": RESOLUTION}, "crop_size": {"height": RESOLUTION, "width": RESOLUTION}}
        views = ViewTransform(GroupVQImageProcessor(**size, **stats), RESOLUTION, augment)
        sent = views(image)
        assert sent.dtype == torch.uint8 and sent.shape == (len(AUGMENTATIONS[augment]), 3, RESOLUTION, RESOLUTION)
        processed = GroupVQImageProcessor(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}, **stats
        )(image, return_tensors="pt")["pixel_values"][0]
        unflipped = torch.stack(five_crop(processed, [RESOLUTION] * 2)) if augment == "ten_crop" else processed[None]
        expected = unflipped if augment == "none" else torch.cat([unflipped, unflipped.flip(-1)])
        received = views.normalize(sent)
        assert received.dtype == torch.float32 and torch.equal(received, expected)


# ---------------------------------------------------------------------------------------------------- processes
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_loader_workers_and_batch_sizes_give_the_same_dataset(model_dir, photo_folder, tmp_path):
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--main_process_port", str(_free_port()), "--mixed_precision", "no", "--dynamo_backend", "no"]
    args = ["--model", str(model_dir), "--dataset", str(photo_folder), "--resolution", str(RESOLUTION), "--augment",
            "flip", "--no_progress", "--rows_per_shard", "4"]  # fmt: skip
    log = _run([*launch, SCRIPT, *args, "--output_dir", str(tmp_path / "two"), "--batch_size", "2"])
    assert "skipped 2 image(s)" in log
    two = json.loads((tmp_path / "two" / "tokenization.json").read_text())
    assert two["settings"]["num_processes"] == 2 and two["num_examples"] == 12
    ranks = {"-".join(p.name.split("-")[1:4]) for p in (tmp_path / "two" / "data").glob("*.parquet")}
    assert ranks == {"00000-of-00002", "00001-of-00002"}  # process r of n: `datasets`' sharded split pattern
    one = _tokenize(model_dir, photo_folder, tmp_path / "one", augment="flip", batch_size=5)
    workers = _tokenize(model_dir, photo_folder, tmp_path / "workers", augment="flip", batch_size=1,
                        dataloader_num_workers=2)  # fmt: skip
    assert one["num_examples"] == workers["num_examples"] == 12
    reference = _rows(tmp_path / "one")
    assert _rows(tmp_path / "two") == reference
    assert _rows(tmp_path / "workers") == reference


# ---------------------------------------------------------------------------------------------------- labels
def test_labels_and_class_names_carried_from_an_imagenet_parquet(model_dir, tmp_path):
    import datasets

    names = ["tench", "goldfish", "great white shark"]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    photos = demo_images()[:5]
    images = []
    for i, photo in enumerate(photos):
        photo.thumbnail((64, 64))
        path = tmp_path / f"n0{i}.JPEG"
        photo.save(path)
        images.append({"bytes": path.read_bytes(), "path": path.name})
    source = tmp_path / "imagenet" / "data" / "validation-00000-of-00001.parquet"
    source.parent.mkdir(parents=True)
    datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(5)]}, features=features).to_parquet(
        str(source)
    )
    out = tmp_path / "tokens"
    record = _tokenize(model_dir, tmp_path / "imagenet", out, split="validation")
    assert record["num_examples"] == 5
    ds = datasets.load_dataset(str(out), split="validation")
    assert ds.features["label"] == datasets.ClassLabel(names=names)
    keys = [image["path"] for image in images]  # parquet rows named as the training stream names them
    from groupvq_hf.data import example_key

    expected = {example_key(image): i % 3 for i, image in enumerate(images)}
    assert {row["key"]: row["label"] for row in ds} == expected and len(set(expected)) == len(keys)
    with pytest.raises(ValueError, match=r"`label_column` 'class'.*columns: \['image', 'label'\]"):
        _tokenize(model_dir, tmp_path / "imagenet", tmp_path / "bad", split="validation", label_column="class")


# ---------------------------------------------------------------------------------------------------- resize
def test_resized_codebook_tokens_index_the_resized_model_and_decode_exactly(model_dir, photo_folder, tmp_path):
    out = tmp_path / "x2"
    record = _tokenize(model_dir, photo_folder, out, codebook_size=512, resize_mode="extend")
    assert record["codebook_size"] == 512 and record["group_sizes"] == [64] * 8
    trained = {"trained_codebook_size": 256, "trained_group_sizes": [32] * 8}
    assert record["resize"] == {"mode": "extend", "seed": 0, **trained}
    model = GroupVQModel.from_pretrained(model_dir).eval()
    model.resize_codebook(512, mode="extend", seed=0)
    rows = _rows(out)
    with torch.no_grad():
        for row in rows:
            encoded = model.encode(_processed(Image.open(row["key"])))
            assert row["tokens"] == encoded.indices.flatten().tolist()
            decoded = decode_tokens(model, row["tokens"], token_grid=[8, 8], output_type="pt")
            exact = GroupVQImageProcessor().postprocess(model.decode_indices(encoded.indices).clamp(-1, 1), "pt")
            assert torch.equal(decoded, exact)
            # the quantized latents are z + (q - z) (straight-through, Eq. 2): q up to float rounding
            reference = GroupVQImageProcessor().postprocess(model.decode(encoded.quantized).clamp(-1, 1), "pt")
            assert torch.allclose(decoded, reference, atol=1e-5, rtol=0)
    assert max(max(row["tokens"]) for row in rows) >= 0
    # the dataset card's snippet, run as written, decodes with the model resized as the tokens were made
    resampled = tmp_path / "resampled"
    _tokenize(model_dir, photo_folder, resampled, codebook_size=512, resize_mode="resample", seed=3, max_samples=2)
    card = (resampled / "README.md").read_text()
    snippet = card.split("```python\n")[1].split("```")[0]
    assert "model.resize_codebook(512, mode=\"resample\", seed=3)" in snippet
    namespace = {}
    exec(snippet, namespace)  # noqa: S102  (the card's own code)
    model = GroupVQModel.from_pretrained(model_dir).eval()
    model.resize_codebook(512, mode="resample", seed=3)
    image = decode_tokens(model, namespace["row"]["tokens"], token_grid=[8, 8])[0]
    assert np.array_equal(np.asarray(namespace["image"]), np.asarray(image))
    # 300 codes do not split over 8 groups: refused before any work
    with pytest.raises(ValueError, match="`codebook_size` 300 cannot be used"):
        _tokenize(model_dir, photo_folder, tmp_path / "odd", codebook_size=300)
    assert not (tmp_path / "odd").exists()


# ---------------------------------------------------------------------------------------------------- resume
class _Killed(BaseException):
    pass


def _shards(folder: Path) -> dict[str, int]:
    """Complete shards (not temporary files) -> modification time."""
    return {p.name: p.stat().st_mtime_ns for p in sorted((folder / "data").glob("*.parquet")) if p.name[0] != "."}


def test_kill_while_writing_then_rerun_equals_an_uninterrupted_run(model_dir, photo_folder, tmp_path, monkeypatch):
    import datasets

    kwargs = {"augment": "flip", "rows_per_shard": 2, "batch_size": 2}  # one image per shard
    straight = _tokenize(model_dir, photo_folder, tmp_path / "straight", **kwargs)
    out = tmp_path / "resumed"
    to_parquet = datasets.Dataset.to_parquet
    calls = []

    def dying(self, path, *args, **kw):  # the 4th shard dies half-written, under its temporary name
        calls.append(path)
        if len(calls) == 4:
            Path(path).write_bytes(b"half a parquet file")
            raise _Killed()
        return to_parquet(self, path, *args, **kw)

    monkeypatch.setattr(datasets.Dataset, "to_parquet", dying)
    with pytest.raises(_Killed):
        _tokenize(model_dir, photo_folder, out, **kwargs)
    monkeypatch.setattr(datasets.Dataset, "to_parquet", to_parquet)
    before = _shards(out)
    assert len(before) == 3 and all(Path(p).name.startswith(".tmp-") for p in calls)
    half = out / "data" / ".tmp-train-00000-of-00001-000-00003.parquet"
    assert calls[-1] == str(half) and not half.exists()  # the exception's cleanup removed the half-written shard
    half.write_bytes(b"half a parquet file")  # what a real kill leaves: no cleanup runs
    assert json.loads((out / "tokenization.json").read_text())["status"] == "running"
    resumed = _tokenize(model_dir, photo_folder, out, **kwargs)
    after = _shards(out)
    assert {name: after[name] for name in before} == before  # complete shards were not written again
    assert set(after) == set(_shards(tmp_path / "straight"))
    assert not list((out / "data").glob(".tmp-*"))
    assert _rows(out) == _rows(tmp_path / "straight")
    drop = ("settings",)
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in straight.items() if k not in drop}
    again = _tokenize(model_dir, photo_folder, out, **kwargs)  # a complete folder: nothing to redo
    assert _shards(out) == after and again["num_examples"] == straight["num_examples"]


def test_each_shard_holds_exactly_its_source_rows_when_a_batch_mixes_skipped_and_encoded_rows(
    model_dir, photo_folder, tmp_path
):
    """Shard c of a worker holds source rows [c * k, (c + 1) * k) whatever the batch: a rerun skips whole shards by
    row count, so a row written into a later shard would be lost. The folder's rows in order: broken.jpg (skipped),
    photo0 ... photo5, tiny.png (skipped); batches of 2 end with (photo5, tiny.png)."""
    import pyarrow.parquet as pq

    out = tmp_path / "tokens"
    _tokenize(model_dir, photo_folder, out, rows_per_shard=1, batch_size=2)
    shards = sorted((out / "data").glob("*.parquet"))
    assert [p.stem for p in shards] == [f"train-00000-of-00001-000-{c:05d}" for c in range(8)]
    keys = [pq.read_table(p).column("key").to_pylist() for p in shards]
    assert [[Path(k).stem for k in shard] for shard in keys] == [[], *([f"photo{i}"] for i in range(6)), []]
    progress = [json.loads((out / ".progress" / f"{p.stem}.json").read_text()) for p in shards]
    assert [sum(stats["skipped"].values()) for stats in progress] == [1, 0, 0, 0, 0, 0, 0, 1]


def test_the_encoder_never_makes_the_host_wait_and_nan_latents_are_refused_naming_the_images(
    model_dir, photo_folder, tmp_path
):
    """The loop queues a batch's encode before writing the previous one: with the model's per-call checks off,
    ``encode`` reads nothing back from the device; NaN/inf latents are still refused, once per batch."""
    from conftest import ReadBacks

    model = GroupVQModel.from_pretrained(model_dir).eval()
    pixels = _processed(demo_images()[0])
    model.check_finite = False
    with ReadBacks() as read_backs, torch.inference_mode():
        model.encode(pixels)
    assert read_backs.ops == []
    model.check_finite = True
    with torch.no_grad():
        model.encoder.conv_in.bias.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"latents of a batch of images \(\['.*photo0.jpg'.*hold NaN or inf"):
        tokenize_dataset(model, str(photo_folder), tmp_path / "nan", RESOLUTION, progress=False)
    assert model.check_finite is True  # restored


def test_a_folder_made_with_other_settings_is_refused_naming_them_and_overwrite_starts_over(
    model_dir, photo_folder, tmp_path
):
    out = tmp_path / "tokens"
    _tokenize(model_dir, photo_folder, out, max_samples=2)
    assert {row["augmentation"] for row in _rows(out)} == {"center"}  # loaded (and cached by datasets) once
    with pytest.raises(ValueError, match=r"other settings \(resolution: 32 -> 16; augment: 'none' -> 'flip'"):
        tokenize_dataset(str(model_dir), str(photo_folder), out, 16, augment="flip", max_samples=2, progress=False)
    record = tokenize_dataset(str(model_dir), str(photo_folder), out, 16, augment="flip", max_samples=2,
                              overwrite=True, progress=False)  # fmt: skip
    assert record["resolution"] == 16 and record["token_grid"] == [4, 4]
    assert {row["augmentation"] for row in _rows(out)} == {"center", "flip"}  # the new files, not a stale cache

    def killed_while_deleting_shards(path, *args, **kwargs):
        raise KeyboardInterrupt  # a kill in the middle of --overwrite's deletion of data/

    with mock.patch.object(shutil, "rmtree", killed_while_deleting_shards), pytest.raises(KeyboardInterrupt):
        tokenize_dataset(str(model_dir), str(photo_folder), out, 16, max_samples=2, overwrite=True, progress=False)
    assert (out / "data").is_dir() and not (out / "tokenization.json").exists()  # the record went first
    with pytest.raises(ValueError, match="remains of a tokenization without its tokenization.json .*--overwrite"):
        tokenize_dataset(str(model_dir), str(photo_folder), out, 16, augment="flip", max_samples=2, progress=False)
    tokenize_dataset(str(model_dir), str(photo_folder), out, 16, max_samples=2, overwrite=True, progress=False)
    assert {row["augmentation"] for row in _rows(out)} == {"center"}
    foreign = tmp_path / "foreign"
    (foreign / "data").mkdir(parents=True)
    (foreign / "data" / "mine.csv").write_text("mine")
    (foreign / "README.md").write_text("mine")
    for overwrite in (False, True):  # --overwrite deletes only what a tokenization wrote
        with pytest.raises(ValueError, match="is not empty and is not a tokens folder .*found \\['README.md', 'data'\\]"):
            _tokenize(model_dir, photo_folder, foreign, overwrite=overwrite)
    assert (foreign / "data" / "mine.csv").read_text() == "mine" and (foreign / "README.md").read_text() == "mine"


def test_bad_input_fails_before_any_image_is_encoded(model_dir, photo_folder, tmp_path, monkeypatch):
    encoded = []
    monkeypatch.setattr(GroupVQModel, "encode", lambda self, *a, **k: encoded.append(1))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="`output_dir` .* is not writable"):
        _tokenize(model_dir, photo_folder, blocker / "out")
    with pytest.raises(ValueError, match="`augment` must be one of"):
        _tokenize(model_dir, photo_folder, tmp_path / "a", augment="rotate")
    with pytest.raises(ValueError, match="`rows_per_shard` must be a positive int"):
        _tokenize(model_dir, photo_folder, tmp_path / "b", rows_per_shard=0)
    with pytest.raises(ValueError, match=r"`label_column` 'label' is not a column of 'demo' \(columns: \['image', 'key'\]\)"):
        _tokenize(model_dir, "demo", tmp_path / "c", split="validation", label_column="label")
    with pytest.raises(ValueError, match=r"`model` '.*no_model' is neither a local model folder .*nor a Hub repo id"):
        _tokenize(tmp_path / "no_model", "demo", tmp_path / "d", split="validation")
    with pytest.raises(ValueError, match=r"`push_to_hub` 'not a repo id!' is not a repo id: Repo id must"):
        _tokenize(model_dir, "demo", tmp_path / "e", split="validation", push_to_hub="not a repo id!")
    assert not encoded


def test_any_split_name_loads_back_from_the_shard_names(model_dir, photo_folder, tmp_path):
    """`datasets` reads a split name from `data/{split}-NNNNN-of-NNNNN*` only; before, a split other than
    train/validation/test (ImageNet's `val`, an `unlabeled` split) could not be loaded back."""
    import datasets

    source = tmp_path / "source"
    (source / "data").mkdir(parents=True)
    images = [{"bytes": (photo_folder / f"photo{i}.png").read_bytes(), "path": f"photo{i}.png"} for i in (1, 3)]
    datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()})).to_parquet(
        str(source / "data" / "unlabeled-00000-of-00001.parquet")
    )
    record = _tokenize(model_dir, source, tmp_path / "out", split="unlabeled", augment="flip")
    loaded = datasets.load_dataset(str(tmp_path / "out"), split="unlabeled")
    assert record["num_examples"] == len(loaded) == 4 and set(loaded["augmentation"]) == {"center", "flip"}
    with pytest.raises(ValueError, match=r"`split` must be a split name .* got 'train\[:2\]'"):
        _tokenize(model_dir, source, tmp_path / "bad", split="train[:2]")


def test_a_folder_made_from_other_weights_or_another_dataset_is_refused(model_dir, photo_folder, tmp_path, monkeypatch):
    """The settings hold the weights' SHA-256 (another in-memory model, or the folder saved again with other
    weights, is another model) and local dataset paths made absolute (a relative path from another folder)."""
    torch.manual_seed(1)
    other = GroupVQModel(GroupVQConfig.from_preset("tiny")).eval()
    out = tmp_path / "out"
    record = _tokenize(model_dir, photo_folder, out, max_samples=2)
    assert len(record["settings"]["model"]["weights_sha256"]) == 64
    with pytest.raises(ValueError, match=r"other settings \(model: .*'weights_sha256'"):
        tokenize_dataset(other, str(photo_folder), out, RESOLUTION, max_samples=2, progress=False)
    monkeypatch.chdir(photo_folder.parent)
    assert _tokenize(model_dir, photo_folder.name, out, max_samples=2)["num_examples"] == record["num_examples"]
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / photo_folder.name).mkdir(parents=True)
    (elsewhere / photo_folder.name / "a.png").write_bytes((photo_folder / "photo1.png").read_bytes())
    monkeypatch.chdir(elsewhere)  # the same relative name, another folder
    with pytest.raises(ValueError, match=r"other settings \(dataset: "):
        _tokenize(model_dir, photo_folder.name, out, max_samples=2)


def test_a_kill_while_the_folder_is_set_up_leaves_a_folder_the_rerun_takes(model_dir, photo_folder, tmp_path):
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)  # what a kill before the record was renamed into place left
    (out / ".progress").mkdir()
    (out / ".tmp-tokenization.json").write_text('{"status": "run')
    record = _tokenize(model_dir, photo_folder, out, max_samples=2)  # broken.jpg and photo0.jpg
    assert record["status"] == "complete" and (record["num_examples"], record["num_skipped"]) == (1, 1)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data").mkdir()
    (tmp_path / "mine" / "data" / "notes.txt").write_text("a user's file")  # not ours: still refused
    with pytest.raises(ValueError, match="is not a tokens folder"):
        _tokenize(model_dir, photo_folder, tmp_path / "mine")


def test_no_image_to_tokenize_and_a_label_column_that_is_the_image_are_errors(model_dir, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    for i in range(2):
        Image.new("RGB", (4, 4), (i, 20, 30)).save(small / f"s{i}.png")
    with pytest.raises(ValueError, match=r"No image of `dataset` .* could be tokenized: 2 skipped \{'too_small': 2\}"):
        _tokenize(model_dir, small, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "tokenization.json").read_text())["status"] == "running"
    with pytest.raises(ValueError, match="`label_column` 'image' is the image column"):
        _tokenize(model_dir, small, tmp_path / "labels", label_column="image")


def test_decode_tokens_looks_up_the_models_processor_once_per_model(model_dir, tmp_path, monkeypatch):
    """decode_tokens loaded the model's processor at every call (for a model loaded from the Hub: two Hub requests
    per call on `tests/hub_server.py`, counted by a session script); it is loaded once per model (and again for a
    model renamed or resized), and the images are the same."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    GroupVQImageProcessor(**IMAGENET_STATS).save_pretrained(folder)
    loads = []
    real = GroupVQImageProcessor.from_pretrained.__func__
    monkeypatch.setattr(
        GroupVQImageProcessor, "from_pretrained", classmethod(lambda cls, *a, **k: loads.append(str(a[0])) or real(cls, *a, **k))
    )
    model = GroupVQModel.from_pretrained(folder)
    loads.clear()
    rows = [[0] * 64, list(range(64))]
    first = decode_tokens(model, rows, [8, 8], output_type="np")
    with torch.no_grad():
        expected = GroupVQImageProcessor(**IMAGENET_STATS).postprocess(
            model.decode_indices(torch.tensor(rows).view(2, 8, 8)), output_type="np"
        )
    assert np.array_equal(first, expected)
    for _ in range(2):
        assert np.array_equal(decode_tokens(model, rows, [8, 8], output_type="np"), first)
    assert loads == [str(folder)]
    decode_tokens(GroupVQModel.from_pretrained(folder), rows, [8, 8])  # another model object: its own lookup
    assert loads == [str(folder)] * 2
    model.name_or_path = str(model_dir)  # renamed: looked up again (that folder has no processor: the default)
    assert not np.array_equal(decode_tokens(model, rows, [8, 8], output_type="np"), first)
    assert loads == [str(folder)] * 2 + [str(model_dir)]


def test_decode_tokens_names_a_bad_token_grid(model_dir):
    model = GroupVQModel.from_pretrained(model_dir)
    for grid in ([8], [-8, -8], [4.0, 4], "8x8", 8, {"h": 8}):
        for tokens in ([[0] * 64], torch.zeros(1, 8, 8, dtype=torch.long)):
            with pytest.raises(ValueError, match=r"`token_grid` must be two positive ints"):
                decode_tokens(model, tokens, grid)
    assert len(decode_tokens(model, [[0] * 64], (np.int64(8), 8))) == 1
    with pytest.raises(ValueError, match=r"`tokens` rows must all hold h \* w tokens, got rows of lengths \[63, 64\]"):
        decode_tokens(model, [[0] * 64, [0] * 63], [8, 8])
    rows = torch.arange(128).reshape(2, 64) % 256
    expected = decode_tokens(model, rows, [8, 8], output_type="pt")
    assert torch.equal(decode_tokens(model, rows.reshape(2, 8, 8), output_type="pt"), expected)  # (batch, h, w)
    one = decode_tokens(model, rows[1:], [8, 8], output_type="pt")  # batch of 1: the same kernels
    assert torch.equal(decode_tokens(model, rows[1].reshape(8, 8), [8, 8], output_type="pt"), one)  # (h, w)
    with pytest.raises(ValueError, match=r"grids of shape \[8, 8\] do not match `token_grid` \[4, 16\]"):
        decode_tokens(model, rows.reshape(2, 8, 8), [4, 16])


# ---------------------------------------------------------------------------------------------------- hub
def test_the_split_of_a_repo_shard_is_read_from_either_layout():
    from groupvq_hf.tokens.card import SHARD_SPLIT

    names = {
        "data/train-00000-of-00002-000-00003.parquet": "train",  # this layout
        "data/val-set-00001-of-00002-001-00000.parquet": "val-set",
        "data/validation-000-001-00002.parquet": "validation",  # the first release's
        "data/train.parquet": None, "README.md": None, "data/train-00000-of-00002.parquet": None,
    }  # fmt: skip
    assert {name: (m["split"] if (m := SHARD_SPLIT.match(name)) else None) for name in names} == names


PUSH_AND_LOAD = Path(__file__).resolve().parent / "drivers" / "tokens_push_and_load.py"


def test_push_to_the_hub_then_load_back_from_it(model_dir, tmp_path):
    from hub_server import HubRepo, HubServer, HubUser

    out = tmp_path / "tokens"
    args = ["--model", "tester/tiny", "--dataset", "demo", "--split", "validation", "--max_samples", "6",
            "--resolution", str(RESOLUTION), "--output_dir", str(out), "--push_to_hub", "tester/demo-tokens",
            "--no_progress"]  # fmt: skip
    with HubServer(tokens={"hf_write": HubUser("tester")}) as hub:
        stale = "data/validation-00000-of-00001-000-00099.parquet"  # an earlier push's shard: deleted by this one
        hub.datasets["tester/demo-tokens"] = HubRepo(
            "tester/demo-tokens", files={stale: b"not parquet"}, commits=[{"oid": "0" * 40, "summary": "earlier",
                                                                          "files": [stale]}],
        )  # fmt: skip
        model_files = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}  # the model, from the Hub
        hub.repos["tester/tiny"] = HubRepo("tester/tiny", files=model_files, commits=[
            {"oid": "7" * 40, "summary": "model", "files": list(model_files)}])  # fmt: skip
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_write", "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
               "HF_DATASETS_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf_home")}  # fmt: skip
        log = _run([sys.executable, str(PUSH_AND_LOAD), *args], **env)
        files = hub.dataset_files("tester/demo-tokens")
        # a repo holding another split's tokens: refused before any image is encoded (it would lose that split)
        train_shard = "data/train-00000-of-00001-000-00000.parquet"
        hub.datasets["tester/train-tokens"] = HubRepo("tester/train-tokens", files={train_shard: b"tokens"})
        refused = subprocess.run(
            [sys.executable, str(REPO_ROOT / "scripts" / "tokenize_dataset.py"), *args[:-3], "--push_to_hub",
             "tester/train-tokens", "--output_dir", str(tmp_path / "second"), "--no_progress"],
            cwd=REPO_ROOT, env=_env(**env), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert refused.returncode != 0 and "holds tokens of the split(s) ['train']" in refused.stderr
        assert list(hub.dataset_files("tester/train-tokens")) == [train_shard]
        assert not (tmp_path / "second" / "data").exists()
        downloads = [path for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path]
    prefix = "/datasets/tester/demo-tokens/resolve/"
    assert any(path.startswith(prefix) and path.endswith(".parquet") for path in downloads)
    assert "README.md" in files and "tokenization.json" in files and stale not in files
    assert any(name.startswith("data/validation-") and name.endswith(".parquet") for name in files)
    pushed = json.loads(log.split("ROWS ", 1)[1].splitlines()[0])
    local = sorted([r["key"], r["augmentation"], r["tokens"]] for r in _rows(out, "validation"))
    assert pushed == local and len(local) == 6
    assert "datasets/tester/demo-tokens" in log.split("URL ", 1)[1]
    record = json.loads((out / "tokenization.json").read_text())
    assert record["model"]["name_or_path"] == "tester/tiny" and record["model"]["commit"] == "7" * 40
    assert f'GroupVQModel.from_pretrained("tester/tiny", revision={"7" * 40!r})' in (out / "README.md").read_text()
