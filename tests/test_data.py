"""Data sources against local shards written in each Hub dataset's schema (offline), sharding, bad images."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from groupvq_hf.data import demo
from groupvq_hf.data import (
    DEMO_EVAL_CROPS,
    DEMO_TRAIN_CROPS,
    SOURCES,
    build_image_dataset,
    collate_examples,
    collate_pixels,
    demo_eval_boxes,
    demo_images,
    demo_regions,
    load_image_source,
    parse_dataset_spec,
    to_rgb,
)


def _jpeg(seed: int, size=(48, 40), mode="RGB", fmt="JPEG") -> bytes:
    """Encoded random image bytes of ``size`` in PIL ``mode``."""
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    if mode == "RGBA":
        image = rgb.copy()
        image.putalpha(Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8), "L"))
    elif mode == "I;16":
        image = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 200)
    else:
        image = rgb.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(autouse=True)
def _no_thread_shutdown_sleep(monkeypatch):
    # datasets sleeps 5 s after each pass over parquet-backed streams (an arrow shutdown workaround); the
    # streams here are tiny and single-pass, so the wait only slows the tests down.
    import datasets

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def _write_parquet(path, rows: list[dict], features) -> None:
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {name: [row[name] for row in rows] for name in features}
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(path))


def imagenet_features():
    import datasets

    return datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=1000)})


@pytest.fixture(scope="module")
def imagenet_mirror(tmp_path_factory):
    """ILSVRC/imagenet-1k layout: data/{train,validation}-NNNNN-of-NNNNN.parquet, image {bytes, path} + label."""
    root = tmp_path_factory.mktemp("imagenet-1k")
    for shard in range(2):
        rows = [
            {"image": {"bytes": _jpeg(10 * shard + i), "path": f"n0144{shard}_{i}.JPEG"}, "label": i} for i in range(6)
        ]
        _write_parquet(root / "data" / f"train-0000{shard}-of-00002.parquet", rows, imagenet_features())
    rows = [{"image": {"bytes": _jpeg(100 + i), "path": f"ILSVRC2012_val_{i:08d}.JPEG"}, "label": i} for i in range(3)]
    _write_parquet(root / "data" / "validation-00000-of-00001.parquet", rows, imagenet_features())
    return root


@pytest.fixture(scope="module")
def imagenet_wds_mirror(tmp_path_factory):
    """timm/imagenet-1k-wds layout: imagenet1k-{train,validation}-NNNN.tar holding <key>.jpg and <key>.cls."""
    root = tmp_path_factory.mktemp("imagenet-1k-wds")
    for split, shards in (("train", 2), ("validation", 1)):
        for shard in range(shards):
            with tarfile.open(root / f"imagenet1k-{split}-{shard:04d}.tar", "w") as tar:
                for i in range(4):
                    key = f"{split}_{shard}_{i:04d}"
                    for suffix, blob in (("jpg", _jpeg(200 + 10 * shard + i)), ("cls", str(i).encode())):
                        info = tarfile.TarInfo(f"{key}.{suffix}")
                        info.size = len(blob)
                        tar.addfile(info, io.BytesIO(blob))
    return root


@pytest.fixture(scope="module")
def coco_mirror(tmp_path_factory):
    """detection-datasets/coco layout: data/{train,val}-*.parquet with image_id, image, width, height, objects."""
    import datasets

    features = datasets.Features(
        {
            "image_id": datasets.Value("int64"),
            "image": datasets.Image(),
            "width": datasets.Value("int64"),
            "height": datasets.Value("int64"),
            "objects": {
                "bbox_id": datasets.Sequence(datasets.Value("int64")),
                "category": datasets.Sequence(datasets.ClassLabel(num_classes=80)),
                "bbox": datasets.Sequence(datasets.Sequence(datasets.Value("float64"), length=4)),
                "area": datasets.Sequence(datasets.Value("float64")),
            },
        }
    )
    root = tmp_path_factory.mktemp("coco")
    for split, count, base in (("train", 5, 300), ("val", 2, 400)):
        rows = [
            {
                "image_id": base + i,
                "image": {"bytes": _jpeg(base + i), "path": None},
                "width": 48,
                "height": 40,
                "objects": {"bbox_id": [i], "category": [i % 80], "bbox": [[1.0, 2.0, 10.0, 12.0]], "area": [120.0]},
            }  # fmt: skip
            for i in range(count)
        ]
        _write_parquet(root / "data" / f"{split}-00000-of-00001.parquet", rows, features)
    return root


def _keys(stream) -> list[str]:
    return [example["key"] for example in stream]


def test_demo_images_are_real_rgb_photos():
    images = demo_images()
    assert len(images) >= 8
    assert all(image.mode == "RGB" and min(image.size) >= 256 for image in images)
    assert len({image.tobytes()[:4096] for image in images}) == len(images)


def test_demo_stream_shapes_range_and_determinism():
    examples = list(build_image_dataset("demo", split="validation", resolution=32, train=False, max_samples=3))
    batch = collate_pixels(examples)
    assert batch.shape == (3, 3, 32, 32) and batch.dtype == torch.float32
    assert batch.min() >= -1 and batch.max() <= 1 and batch.min() < -0.5 and batch.max() > 0.5
    again = build_image_dataset("demo", split="validation", resolution=32, train=False, max_samples=3)
    again = collate_pixels(list(again))
    assert torch.equal(batch, again)
    collated = collate_examples(examples[:2])
    assert collated["pixel_values"].shape == (2, 3, 32, 32) and collated["num_skipped"] == 0
    assert collated["keys"] == [e["key"] for e in examples[:2]]


def test_demo_splits_have_fixed_sizes_whatever_the_photos():
    assert sum(1 for _ in load_image_source("demo", "train")) == DEMO_TRAIN_CROPS >= 1000
    for split in ("validation", "test"):
        keys = [row["key"] for row in load_image_source("demo", split)]
        assert len(set(keys)) == DEMO_EVAL_CROPS >= 256
    assert demo_eval_boxes("validation") != demo_eval_boxes("test")


def _banded_photos(real):
    """Photos of the demo's sizes, black where training may read and white in the held-out band."""
    photos = []
    for photo in real:
        image = Image.new("RGB", photo.size, (0, 0, 0))
        image.paste((255, 255, 255), demo_regions(photo.size)[1])
        photos.append(image)
    return tuple(photos)


def test_demo_validation_crops_never_appear_in_training(monkeypatch):
    photos = demo.demo_photos()
    for index, box in demo_eval_boxes("validation") + demo_eval_boxes("test"):
        train_box, held_out = demo_regions(photos[index].size)
        assert held_out[0] <= box[0] < box[2] <= held_out[2] and held_out[1] <= box[1] < box[3] <= held_out[3]
        assert box[2] - box[0] == box[3] - box[1] >= 16  # square, at least 16 px
    banded = _banded_photos(photos)
    monkeypatch.setattr(demo, "demo_photos", lambda: banded)
    train = list(build_image_dataset("demo", resolution=16, seed=3, max_samples=64))
    assert all(torch.equal(e["pixel_values"], torch.full((3, 16, 16), -1.0)) for e in train)  # black only
    valid = list(build_image_dataset("demo", split="validation", resolution=16, train=False))
    assert len(valid) == DEMO_EVAL_CROPS
    assert all(torch.equal(e["pixel_values"], torch.ones(3, 16, 16)) for e in valid)  # white only
    assert not {e["key"] for e in valid} & {row["key"] for row in load_image_source("demo", "train")}


@pytest.mark.parametrize("batch_size", [1, 32])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_demo_training_batches_with_any_batch_size_and_workers(batch_size, num_workers):
    from groupvq_hf.data.stream import ResumableBatches

    stream = build_image_dataset("demo", resolution=16, seed=0)
    batches = iter(ResumableBatches(stream, batch_size, num_workers=num_workers))
    first, second = next(batches), next(batches)
    assert first["pixel_values"].shape == second["pixel_values"].shape == (batch_size, 3, 16, 16)
    assert not set(first["keys"]) & set(second["keys"])


def test_demo_crops_differ_across_epochs_with_one_seed():
    a, b = (build_image_dataset("demo", resolution=16, seed=3, max_samples=4) for _ in range(2))
    first = [e["pixel_values"] for e in a]
    assert all(torch.equal(x, e["pixel_values"]) for x, e in zip(first, b))
    a.set_epoch(1)
    assert not any(torch.equal(x, e["pixel_values"]) for x, e in zip(first, a))


def test_train_stream_shuffles_per_epoch_with_one_seed(imagenet_mirror):
    folder = str(imagenet_mirror / "data")
    a, b = build_image_dataset(folder, resolution=16, seed=3), build_image_dataset(folder, resolution=16, seed=3)
    first = _keys(a)
    assert first == _keys(b)  # same seed, same order on every rank
    a.set_epoch(1)
    assert sorted(_keys(a)) == sorted(first) and _keys(a) != first


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_read_disjoint_parts_of_the_stream(world_size, imagenet_mirror):
    folder = str(imagenet_mirror / "data")
    full = _keys(build_image_dataset(folder, resolution=16, seed=1))
    parts = [
        _keys(build_image_dataset(folder, resolution=16, seed=1, rank=r, world_size=world_size))
        for r in range(world_size)
    ]
    assert sum(len(p) for p in parts) == len(full)
    assert sorted(k for p in parts for k in p) == sorted(full)


def test_imagenet_parquet_source(imagenet_mirror, monkeypatch):
    monkeypatch.setenv(SOURCES["imagenet"].env_var, str(imagenet_mirror))
    assert SOURCES["imagenet"].repo_id == "ILSVRC/imagenet-1k"
    train = build_image_dataset("imagenet", resolution=32, seed=0)
    examples = list(train)
    assert len(examples) == 12 and examples[0]["pixel_values"].shape == (3, 32, 32)
    assert len({e["key"] for e in examples}) == 12
    assert len(list(build_image_dataset("imagenet", split="validation", resolution=32, train=False))) == 3
    ranks = [_keys(build_image_dataset("imagenet", resolution=32, rank=r, world_size=2)) for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1]) and len(ranks[0]) + len(ranks[1]) == 12


def test_imagenet_webdataset_source(imagenet_wds_mirror, monkeypatch):
    monkeypatch.setenv(SOURCES["imagenet-wds"].env_var, str(imagenet_wds_mirror))
    assert SOURCES["imagenet-wds"].repo_id == "timm/imagenet-1k-wds" and SOURCES["imagenet-wds"].image_column == "jpg"
    assert len(list(build_image_dataset("imagenet-wds", resolution=16))) == 8
    assert len(list(build_image_dataset("imagenet-wds", split="validation", resolution=16, train=False))) == 4
    ranks = [_keys(build_image_dataset("imagenet-wds", resolution=16, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 4 and not set(ranks[0]) & set(ranks[1])


def test_coco_source_and_val_split_alias(coco_mirror, monkeypatch):
    monkeypatch.setenv(SOURCES["coco"].env_var, str(coco_mirror))
    assert SOURCES["coco"].repo_id == "detection-datasets/coco"
    assert len(list(build_image_dataset("coco", resolution=16))) == 5
    assert len(list(build_image_dataset("coco", split="validation", resolution=16, train=False))) == 2


def test_weighted_mix_of_sources(imagenet_mirror, coco_mirror, monkeypatch):
    monkeypatch.setenv(SOURCES["imagenet"].env_var, str(imagenet_mirror))
    monkeypatch.setenv(SOURCES["coco"].env_var, str(coco_mirror))
    assert parse_dataset_spec("imagenet:0.7+coco:0.3") == [("imagenet", 0.7), ("coco", 0.3)]
    assert parse_dataset_spec("imagenet+coco") == [("imagenet", 0.5), ("coco", 0.5)]
    imagenet_keys = set(_keys(build_image_dataset("imagenet", resolution=16)))
    coco_keys = set(_keys(build_image_dataset("coco", resolution=16)))
    mixed = _keys(build_image_dataset("imagenet:0.7+coco:0.3", resolution=16, seed=0))
    assert set(mixed) & imagenet_keys and set(mixed) & coco_keys and set(mixed) <= imagenet_keys | coco_keys
    ranks = [_keys(build_image_dataset("imagenet+coco", resolution=16, rank=r, world_size=2)) for r in range(2)]
    assert ranks[0] and ranks[1]


def test_local_folder_single_parquet_and_image_column(tmp_path, imagenet_mirror):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, image in enumerate(demo_images()[:3]):
        image.resize((64, 48)).save(folder / f"photo_{i}.jpg")
    examples = list(build_image_dataset(str(folder), resolution=32, train=False))
    assert len(examples) == 3 and examples[0]["key"].endswith(".jpg")
    parquet = next((imagenet_mirror / "data").glob("train-00000*.parquet"))
    assert len(list(build_image_dataset(str(parquet), resolution=16, image_column="image"))) == 6
    with pytest.raises(ValueError, match="image_column"):
        build_image_dataset(str(parquet), image_column="pixels")


def test_bad_images_are_skipped_and_counted_and_odd_modes_converted(tmp_path):
    import datasets

    good = _jpeg(1)
    blobs = [
        good,
        b"this is not an image",  # undecodable
        good[: len(good) // 3],  # truncated JPEG
        _jpeg(2, mode="CMYK"),
        _jpeg(3, mode="RGBA", fmt="PNG"),
        _jpeg(4, mode="L"),
        _jpeg(5, mode="I;16", fmt="PNG"),
        _jpeg(6, size=(4, 4)),  # too small
        _jpeg(7, mode="P", fmt="PNG"),
    ]
    features = datasets.Features({"image": datasets.Image()})
    _write_parquet(tmp_path / "bad.parquet", [{"image": {"bytes": b, "path": None}} for b in blobs], features)
    stream = build_image_dataset(str(tmp_path / "bad.parquet"), resolution=16, train=True)
    streamed = list(stream)
    examples = [example for example in streamed if not example.get("tail")]
    assert len(examples) == 6
    assert sum(e["num_skipped"] for e in streamed) == 3  # a tail marker counts the bad images after the last good one
    assert sum(stream.skipped.values()) == 3 and stream.skipped["too_small"] == 1
    assert sum(v for k, v in stream.skipped.items() if k.startswith("undecodable")) == 2
    assert {"CMYK", "RGBA", "L", "I;16"} <= set(stream.converted)
    assert all(e["pixel_values"].shape == (3, 16, 16) and torch.isfinite(e["pixel_values"]).all() for e in examples)
    # evaluation streams yield the bad images as markers, so a consumer counts them wherever they fall
    batch = collate_examples(list(build_image_dataset(str(tmp_path / "bad.parquet"), resolution=16, train=False)))
    assert batch["pixel_values"].shape == (6, 3, 16, 16) and batch["rows"] == [0, 3, 4, 5, 6, 8]
    assert [row for row, _ in batch["skipped"]] == [1, 2, 7] and batch["num_skipped"] == 3
    assert sorted(batch["modes"]) == ["", "CMYK", "I;16", "L", "P", "RGBA"] and batch["num_converted"] == 5
    evaluation = list(build_image_dataset(str(tmp_path / "bad.parquet"), resolution=16, train=False))
    assert collate_pixels(evaluation).shape == (6, 3, 16, 16)  # the markers are left out
    capped = list(build_image_dataset(str(tmp_path / "bad.parquet"), resolution=16, train=False, max_samples=2))
    assert [e["row"] for e in capped] == [0, 1, 2, 3] and collate_pixels(capped).shape[0] == 2  # 2 images, 2 markers


def eps_bytes() -> bytes:
    """A PostScript image (PIL writes EPS without Ghostscript; it needs Ghostscript only to decode one)."""
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buffer, "EPS")
    return buffer.getvalue()


def test_an_eps_file_is_never_handed_to_ghostscript(tmp_path, monkeypatch):
    """PIL decodes EPS by running Ghostscript on the file: a PostScript file named ``.jpg`` in a dataset is not an
    image we open (skipped as undecodable), on every decode path."""
    from PIL import EpsImagePlugin, UnidentifiedImageError

    from groupvq_hf.data.decoding import SkippedImage, decode_image, image_transform, open_as_reference, open_image

    ghostscript_runs = []

    def ghostscript(*args, **kwargs):
        ghostscript_runs.append(args)
        raise OSError("Ghostscript would run here")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    blob = eps_bytes()
    assert Image.open(io.BytesIO(blob)).format == "EPS"  # PIL alone opens it
    (tmp_path / "photo.jpg").write_bytes(blob)
    transform = image_transform(16, train=False)
    for image in ({"bytes": blob, "path": None}, {"bytes": None, "path": str(tmp_path / "photo.jpg")}):
        for full_decode in (False, True):
            with pytest.raises(SkippedImage, match="undecodable:UnidentifiedImageError"):
                decode_image(image, transform, full_decode=full_decode)
        for opener in (open_image, open_as_reference):
            with pytest.raises(UnidentifiedImageError):
                opener(image)
    assert ghostscript_runs == []


def test_to_rgb_composites_alpha_on_white():
    transparent = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    rgb, mode = to_rgb(transparent)
    assert mode == "RGBA" and rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("RGB", (2, 2)))[1] is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dataset=""), "dataset"),
        (dict(dataset="imagenet:0+coco:1"), "weights must be positive"),
        (dict(dataset="imagenet:0.5+coco"), "every source or to none"),
        (dict(dataset="no-such-dataset"), "not 'demo'"),
        (dict(resolution=0), "resolution"),
        (dict(rank=2, world_size=2), "rank"),
        (dict(max_samples=0), "max_samples"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_image_dataset(**kwargs)


def test_max_samples_caps_the_stream():
    assert len(list(build_image_dataset("demo", resolution=16, max_samples=4))) == 4
    with pytest.raises(ValueError, match="batch"):
        collate_pixels([])


# ---------------------------------------------------------------------------------------------- damaged shards
def _damage(path, how: str) -> None:
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2] if how == "truncated" else bytes(range(256)) * 8)


@pytest.fixture
def damaged_mirrors(tmp_path, imagenet_mirror, imagenet_wds_mirror):
    """Copies of the ImageNet parquet and webdataset mirrors (2 training shards each, 6 / 4 rows) with one shard
    truncated or overwritten with garbage: ``{(format, how): (folder, damaged shard)}``."""
    import shutil

    mirrors = {}
    for fmt, source, pattern in (("parquet", imagenet_mirror, "data/train-0000{}-*.parquet"),
                                 ("webdataset", imagenet_wds_mirror, "imagenet1k-train-000{}.tar")):  # fmt: skip
        for how, index in (("truncated", 1), ("garbage", 0)):  # the first shard too (the one features come from)
            folder = tmp_path / f"{fmt}-{how}"
            shutil.copytree(source, folder)
            shard = next(folder.glob(pattern.format(index)))
            _damage(shard, how)
            mirrors[fmt, how] = folder, shard
    return mirrors


@pytest.mark.parametrize("how", ["truncated", "garbage"])
@pytest.mark.parametrize("fmt, rows_per_shard", [("parquet", 6), ("webdataset", 4)])
def test_a_damaged_shard_is_skipped_named_and_counted(damaged_mirrors, fmt, rows_per_shard, how, caplog):
    folder, shard = damaged_mirrors[fmt, how]
    reason = f"unreadable_shard:{shard}"
    # training: the other shard's rows all come out, the damaged shard is counted as one skipped entry
    stream = build_image_dataset(str(folder), resolution=16, train=True, seed=1, shuffle_buffer_size=4)
    with caplog.at_level("WARNING"):
        examples = list(stream)
    assert len(examples) >= rows_per_shard  # a truncated shard may give its first rows before it breaks
    assert stream.skipped[reason] == 1 and sum(e["num_skipped"] for e in examples) <= 1
    assert any(str(shard) in record.getMessage() for record in caplog.records)
    # evaluation: the marker reaches the consumer, which counts it under the shard's name
    evaluation = list(build_image_dataset(str(folder), resolution=16, train=False))
    assert [e["skipped"] for e in evaluation if e["pixel_values"] is None] == [reason]
    assert len([e for e in evaluation if e["pixel_values"] is not None]) == len(examples)


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_every_shard_damaged_is_one_clear_error_naming_them(damaged_mirrors, fmt):
    folder, _ = damaged_mirrors[fmt, "garbage"]
    shards = sorted(p for p in folder.rglob("*train*") if p.is_file())
    for shard in shards:
        _damage(shard, "garbage")
    with pytest.raises(ValueError, match="unreadable") as error:
        build_image_dataset(str(folder), resolution=16)
    assert all(str(shard) in str(error.value) for shard in shards)


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_epoch_sizes_count_the_readable_shards(damaged_mirrors, fmt):
    from groupvq_hf.data import dataset_num_examples

    folder, _ = damaged_mirrors[fmt, "garbage"]  # the first of two training shards is garbage
    assert dataset_num_examples(str(folder)) == {"parquet": 6, "webdataset": 4}[fmt]


def test_names_moved_out_of_sources_still_import_from_there_with_a_deprecation_warning():
    """sources.py was split by job: every public name it held before the split is the same object from its new home,
    with a warning naming that home."""
    import importlib

    from groupvq_hf.data import sources

    held_before = {  # its __all__ and public constants before the split, minus what it still holds itself
        "rows": ("example_key", "example_seed", "hash_seed"),
        "demo": ("DEMO_CROP_SCALE", "DEMO_EVAL_CROPS", "DEMO_HOLDOUT", "DEMO_MAX_SIDE", "DEMO_MIN_EVAL_SIDE",
                 "DEMO_PHOTOS", "DEMO_SHARDS", "DEMO_TRAIN_CROPS", "DEMO_URL", "demo_eval_boxes", "demo_images",
                 "demo_regions"),
        "decoding": ("CropPlan", "DCT_SCALES", "DecodedImage", "MIN_IMAGE_SIZE", "SkippedImage", "decode_image",
                     "image_transform", "open_image", "plan_crop", "render_crop", "to_rgb"),
        "stream": ("ImageStream", "SHUFFLE_BUFFER_SIZE", "build_image_dataset", "collate_examples", "collate_pixels"),
    }  # fmt: skip
    for module, names in held_before.items():
        home = importlib.import_module(f"groupvq_hf.data.{module}")
        for name in names:
            with pytest.warns(DeprecationWarning, match=f"groupvq_hf.data.{module}"):
                assert getattr(sources, name) is getattr(home, name)
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        sources.not_a_name


# ------------------------------------------------------------------------------------ odd shards, rows and paths
def _image_struct_table(blobs, extra: dict | None = None, hf_image_feature: bool = False):
    """An arrow table in ImageNet's parquet schema (image {bytes, path}, label) from ``blobs`` (bytes or a dict
    standing for the image value as stored), with ``extra`` columns; ``hf_image_feature`` adds datasets' own
    schema metadata (the column is then an ``Image`` feature, as in shards written by ``datasets``)."""
    import datasets
    import pyarrow as pa

    images = [b if isinstance(b, dict) or b is None else {"bytes": b, "path": f"{i}.png"} for i, b in enumerate(blobs)]
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    columns = {"image": pa.array(images, struct), "label": pa.array([i % 3 for i in range(len(blobs))], pa.int64())}
    table = pa.table({**columns, **{name: pa.array(values) for name, values in (extra or {}).items()}})
    if hf_image_feature:
        features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
        features.update({name: datasets.Value("string") for name in extra or {}})
        table = table.replace_schema_metadata(features.arrow_schema.metadata)
    return table


def _decoded_and_skipped(spec: str, **kwargs):
    stream = build_image_dataset(spec, resolution=8, train=False, **kwargs)
    examples = list(stream)
    return sum(e["pixel_values"] is not None for e in examples), [e["skipped"] for e in examples if e["pixel_values"] is None]


@pytest.mark.parametrize("extra_in", ["second", "first"])
def test_a_shard_with_an_extra_or_missing_column_is_read_in_full(tmp_path, extra_in):
    """Shards of one dataset whose columns drift (a caption added to later shards, or dropped from them) are read
    like the others: before, a later shard with an extra column was dropped whole as unreadable."""
    import pyarrow.parquet as pq

    for shard in range(2):
        blobs = [_jpeg(10 * shard + i) for i in range(5)]
        has_extra = (shard == 1) == (extra_in == "second")
        extra = {"caption": [f"caption {i}" for i in range(5)]} if has_extra else None
        pq.write_table(_image_struct_table(blobs, extra), tmp_path / f"train-{shard:05d}-of-00002.parquet")
    assert _decoded_and_skipped(str(tmp_path)) == (10, [])
    labelled = list(build_image_dataset(str(tmp_path), resolution=8, train=False, label_column="label"))
    assert [e["label"] for e in labelled] == [i % 3 for i in range(5)] * 2


@pytest.mark.parametrize("hf_image_feature", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_an_image_with_neither_bytes_nor_path_is_skipped_and_counted(tmp_path, hf_image_feature, train):
    """``{"bytes": None, "path": None}`` (an empty struct, as a null image often lands in parquet) is a bad image
    like a null one: skipped and counted, never a crash of the whole stream."""
    import pyarrow.parquet as pq

    blobs = [_jpeg(i) for i in range(6)]
    blobs[2], blobs[4] = {"bytes": None, "path": None}, None
    pq.write_table(_image_struct_table(blobs, hf_image_feature=hf_image_feature), tmp_path / "train.parquet")
    if not train:
        decoded, skipped = _decoded_and_skipped(str(tmp_path))
        assert decoded == 4 and len(skipped) == 2 and all(reason == "missing_image" for reason in skipped)
        return
    stream = build_image_dataset(str(tmp_path), resolution=8, train=True, shuffle_buffer_size=1)
    examples = list(stream)
    assert len(examples) == 4 and stream.skipped == {"missing_image": 2}


def test_a_local_path_holding_a_plus_sign_is_one_source_not_a_mix(tmp_path):
    folder = tmp_path / "photos+more"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(_jpeg(i, fmt="PNG"))
    assert parse_dataset_spec(str(folder)) == [(str(folder), 1.0)]
    assert _decoded_and_skipped(str(folder)) == (3, [])
    assert parse_dataset_spec("demo+coco") == [("demo", 0.5), ("coco", 0.5)]  # a spec that is no path still mixes


def test_a_missing_local_path_shaped_like_a_repo_id_offline_is_a_clear_error(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"'no-such/folder' is not an existing local path.*Offline, only local paths"):
        build_image_dataset("no-such/folder", resolution=8)


def test_epoch_sizes_count_what_the_stream_reads_for_odd_folders_and_tar_samples(tmp_path):
    """The epoch size equals the rows streamed: image-folder extensions datasets reads (.jfif, .ppm, upper case)
    count, and a tar sample with two image members (a photo and its mask) is one row, not two."""
    from groupvq_hf.data import dataset_num_examples

    folder = tmp_path / "folder"
    formats = {".png": "PNG", ".JPEG": "JPEG", ".jfif": "JPEG", ".ppm": "PPM", ".tif": "TIFF"}
    for i, (suffix, fmt) in enumerate(formats.items()):
        (folder / "train").mkdir(parents=True, exist_ok=True)
        (folder / "train" / f"{i}{suffix}").write_bytes(_jpeg(i, fmt=fmt))
    (folder / "train" / "notes.txt").write_text("not an image")
    assert dataset_num_examples(str(folder)) == len(list(build_image_dataset(str(folder), resolution=8))) == 5

    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "train-0000.tar", "w") as tar:
        for i in range(3):
            for name, blob in ((f"s{i}.jpg", _jpeg(i)), (f"s{i}.seg.png", _jpeg(9, fmt="PNG")), (f"s{i}.cls", b"1")):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    streamed = list(build_image_dataset(str(shards), resolution=8, image_column="jpg"))
    assert dataset_num_examples(str(shards)) == len(streamed) == 3


# --------------------------------------------------------------------------------------------- local image folders
@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    """ImageNet's ``train/<class>/*.JPEG`` layout, scaled down: 4 classes x 16 photos, plus ``val/`` (2 x 3)."""
    root = tmp_path_factory.mktemp("class-folder")
    for split, classes, count in (("train", 4, 16), ("val", 2, 3)):
        for c in range(classes):
            (root / split / f"n0{c}").mkdir(parents=True)
            for i in range(count):
                (root / split / f"n0{c}" / f"{split}_{c}_{i:02d}.JPEG").write_bytes(_jpeg(100 * c + i, size=(20, 16)))
    return root


def test_an_image_folder_without_shuffle_reads_datasets_own_rows_in_its_order(class_folder):
    """Evaluation and tokens streams (no shuffle) read the rows datasets' imagefolder yields, in its order, with its
    class labels (names from every split's folders)."""
    import datasets

    for split in ("train", "validation"):
        theirs = datasets.load_dataset("imagefolder", data_dir=str(class_folder), split=split, streaming=True)
        expected = [(row["image"]["path"], row["label"]) for row in theirs.decode(False)]
        ours = build_image_dataset(str(class_folder), split=split, resolution=8, train=False, label_column="auto")
        assert [(e["key"], e["label"]) for e in ours] == expected
        assert ours.examples.features["label"] == theirs.features["label"]
    assert ours.num_shards == 6  # one file per shard below FOLDER_SHARDS files


@pytest.mark.parametrize("layout, streaming", [("class_folder", True), ("parquet", True), ("parquet", False)])
def test_a_local_source_resolves_its_data_files_once(class_folder, tmp_path, monkeypatch, layout, streaming):
    """`datasets` resolves a local folder's data files by walking it once per candidate pattern (45 walks: about a
    minute per 100,000 files on 2 cores); a stream must make one builder per source, not one per step of setting
    it up (it made 3 for an image folder, 2 for parquet, and 2 for parquet read whole)."""
    import datasets

    if layout == "parquet":
        features = datasets.Features({"image": datasets.Image()})
        rows = [{"image": {"bytes": _jpeg(1), "path": None}}]
        _write_parquet(tmp_path / "data" / "train-00000-of-00001.parquet", rows, features)
    from groupvq_hf.data import sources

    monkeypatch.setattr(sources, "_LOCAL_BUILDERS", {})  # earlier tests read class_folder in this process
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))  # and recorded its files
    folder = class_folder if layout == "class_folder" else tmp_path
    made = []
    real = datasets.load_dataset_builder

    def counted(*args, **kwargs):  # builders that resolve the folder (a parquet shard is opened by its file name)
        made.extend([args] if not kwargs.get("data_files") else [])
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset_builder", counted)
    monkeypatch.setattr(datasets.load, "load_dataset_builder", counted)  # what load_dataset calls
    stream = build_image_dataset(str(folder), split="train", resolution=8, seed=1, streaming=streaming)
    assert len(made) == 1 and next(iter(stream))["pixel_values"].shape == (3, 8, 8)


def test_a_local_folder_is_walked_once_and_resolves_to_the_data_files_datasets_finds(tmp_path, monkeypatch):
    """`datasets` globbed the folder once per candidate pattern, each glob a walk (58 walks of the same tree for
    train/ and val/); `local_builder` walks each folder once and still gets datasets' own data files (splits, order,
    hidden folders and README left out). Each pattern is resolved once (datasets resolved the patterns of the splits
    it found a second time), the files' modification times (datasets' origin metadata) are read without a thread
    pool, and Python's cyclic garbage collector is paused while datasets resolves (its full collections were 40% of
    the resolution of 100,000 files) and running again afterwards."""
    import gc

    import datasets
    import datasets.data_files
    from fsspec.implementations.local import LocalFileSystem
    from fsspec.spec import AbstractFileSystem

    from groupvq_hf.data import sources

    folder = tmp_path / "photos"
    for name in ("train/n01/a.JPEG", "train/n02/b.png", "train/n02/c.JPEG", "val/n01/d.JPEG", ".cache/e.JPEG"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(_jpeg(len(name), size=(20, 16)))
    (folder / "README.md").write_text("photos")
    expected = datasets.load_dataset_builder("imagefolder", data_dir=str(folder)).config.data_files
    walks = []
    real_find = AbstractFileSystem.find

    def counted(self, path, maxdepth=None, **kwargs):
        walks.append((path, maxdepth))
        return real_find(self, path, maxdepth=maxdepth, **kwargs)

    monkeypatch.setattr(AbstractFileSystem, "find", counted)
    monkeypatch.setattr(sources, "_LOCAL_BUILDERS", {})
    resolved = []  # each pattern datasets resolves, and whether the cyclic collector runs then
    real_resolve = datasets.data_files.resolve_pattern
    monkeypatch.setattr(
        datasets.data_files, "resolve_pattern", lambda *a, **k: resolved.append((a[0], gc.isenabled())) or real_resolve(*a, **k)
    )
    pools = []  # datasets reads the origin metadata of a list of files with tqdm's thread_map
    real_thread_map = datasets.data_files.thread_map
    monkeypatch.setattr(datasets.data_files, "thread_map", lambda *a, **k: pools.append(1) or real_thread_map(*a, **k))
    assert gc.isenabled()
    kind, _, builder = sources.local_builder(folder)
    assert not pools
    for split, files in builder.config.data_files.items():
        assert files.origin_metadata == expected[split].origin_metadata
    patterns = [pattern for pattern, _ in resolved]
    assert len(patterns) == len(set(patterns)) and "**/train/**" in patterns
    assert not any(collecting for _, collecting in resolved) and gc.isenabled()
    assert datasets.data_files.resolve_pattern.__name__ == "<lambda>"  # datasets' own functions are back
    assert datasets.data_files._get_origin_metadata.__qualname__ == "_get_origin_metadata"
    assert kind == "imagefolder" and len(walks) == len(set(walks)) >= 1
    assert {split: list(files) for split, files in builder.config.data_files.items()} == {
        split: list(files) for split, files in expected.items()
    } and [len(expected[split]) for split in ("train", "validation")] == [3, 1]
    assert "find" not in LocalFileSystem.__dict__  # the walk cache is gone once the builder is made


def test_a_local_folder_is_read_by_the_kind_of_files_it_holds(tmp_path):
    """Parquet before webdataset shards before images, found at any depth; a folder of none of them is an error
    naming it and what it may hold."""
    from groupvq_hf.data.sources import local_loader

    folder = tmp_path / "mixed"
    (folder / "a" / "b").mkdir(parents=True)
    (folder / "a" / "b" / "x.JPG").write_bytes(b"")
    assert local_loader(folder) == ("imagefolder", {"data_dir": str(folder)})
    (folder / "a" / "shard.tar").write_bytes(b"")
    assert local_loader(folder)[0] == "webdataset"
    (folder / "rows.parquet").write_bytes(b"")
    assert local_loader(folder)[0] == "parquet"
    image = folder / "a" / "b" / "x.JPG"
    assert local_loader(image) == ("imagefolder", {"data_files": {"train": str(image)}})
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match=r"`dataset` path .*notes.* holds no parquet files, webdataset .tar shards or"):
        local_loader(tmp_path / "notes")


def test_a_folder_resolved_by_one_process_is_read_from_its_record_by_the_next(tmp_path, monkeypatch):
    """The data files a process resolves, and the features (class labels) it infers, are recorded in datasets'
    cache: the next process (here: the same one with its builders forgotten) resolves and infers nothing, and its
    builder has the same files, order, origin metadata, config id and features; a file added, a damaged record or a
    records folder that cannot be made resolve again, never fail."""
    import datasets
    import datasets.data_files
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    from groupvq_hf.data import sources

    folder = tmp_path / "photos"
    for name in ("train/n01/a.JPEG", "train/n02/b.JPEG", "val/n01/c.JPEG"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(_jpeg(len(name), size=(20, 16)))
    plain = datasets.load_dataset_builder("imagefolder", data_dir=str(folder)).config.data_files
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    resolved = []
    real_resolve = datasets.data_files.resolve_pattern
    monkeypatch.setattr(
        datasets.data_files, "resolve_pattern", lambda *a, **k: resolved.append(a[0]) or real_resolve(*a, **k)
    )

    def fresh_process_builder():
        resolved.clear()
        monkeypatch.setattr(sources, "_LOCAL_BUILDERS", {})
        return sources.local_builder(folder)[2]

    labelled = []  # datasets' label inference: it reads every file name of every split
    real_split_generators = ImageFolder._split_generators
    monkeypatch.setattr(
        ImageFolder, "_split_generators", lambda self, *a: labelled.append(1) or real_split_generators(self, *a)
    )
    first = fresh_process_builder()
    records = tmp_path / "cache" / sources.RESOLVED_FILES_DIR
    assert resolved and [p.name.count(".") for p in records.glob("*.json")] == [1]  # the data files' record
    first_features = sources._folder_features(first, "train")
    assert len(labelled) == 1 and first_features["label"].names == ["n01", "n02"]
    second = fresh_process_builder()
    assert not resolved and second.config_id == first.config_id
    assert sources._folder_features(second, "validation") == first_features and len(labelled) == 1
    for builder in (first, second):
        assert [str(split) for split in builder.config.data_files] == [str(split) for split in plain]
        for files, expected in zip(builder.config.data_files.values(), plain.values()):
            assert list(files) == list(expected) and files.origin_metadata == expected.origin_metadata
    (folder / "train" / "n02" / "d.JPEG").write_bytes(_jpeg(9, size=(20, 16)))
    assert str(folder / "train" / "n02" / "d.JPEG") in fresh_process_builder().config.data_files["train"]
    assert resolved
    for record in (tmp_path / "cache" / sources.RESOLVED_FILES_DIR).glob("*.json"):
        record.write_text('{"stamp": ')
    assert len(fresh_process_builder().config.data_files["train"]) == 3 and resolved
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache2"))
    (tmp_path / "cache2").mkdir()
    (tmp_path / "cache2" / sources.RESOLVED_FILES_DIR).write_text("")  # a file where the records' folder goes
    assert len(fresh_process_builder().config.data_files["train"]) == 3 and resolved


def test_a_training_start_resolves_a_local_folder_once_until_its_files_change(tmp_path, monkeypatch):
    """Sizing, shard count, the training and the validation streams of one folder share one builder in a process,
    and infer its class labels once (three times before); a file added (or renamed) under the folder gives a new
    builder that sees it."""
    import shutil

    import datasets
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    from groupvq_hf.data import dataset_num_examples, dataset_num_shards

    folder = tmp_path / "photos"
    for split, count in (("train", 5), ("val", 2)):
        for i in range(count):
            (folder / split / "n01").mkdir(parents=True, exist_ok=True)
            (folder / split / "n01" / f"{split}_{i}.JPEG").write_bytes(_jpeg(i, size=(20, 16)))
    made, labelled = [], []  # builders that resolve the folder (not those given its resolved data files)
    real = datasets.load_dataset_builder
    monkeypatch.setattr(
        datasets, "load_dataset_builder", lambda *a, **k: made.extend([] if "data_files" in k else [a]) or real(*a, **k)
    )
    real_split_generators = ImageFolder._split_generators  # where datasets reads every file name for the labels
    monkeypatch.setattr(
        ImageFolder, "_split_generators", lambda self, *a: labelled.append(1) or real_split_generators(self, *a)
    )
    assert dataset_num_examples(str(folder), "train") == 5 and dataset_num_shards(str(folder), "train") == 5
    build_image_dataset(str(folder), split="train", resolution=8)
    assert len(list(build_image_dataset(str(folder), split="validation", resolution=8, train=False))) == 2
    assert len(made) == 1 and len(labelled) == 1
    shutil.copy(folder / "train" / "n01" / "train_0.JPEG", folder / "train" / "n01" / "train_new.JPEG")
    assert dataset_num_examples(str(folder), "train") == 6 and len(made) == 2
    (folder / "train" / "n01" / "train_new.JPEG").rename(folder / "train" / "n01" / "train_new.txt")
    assert dataset_num_examples(str(folder), "train") == 5 and len(made) == 3


def test_an_image_folder_trains_with_every_loader_worker_and_classes_mixed(class_folder):
    """Before, an image folder was one shard: only loader worker 0 read it, and a shuffle buffer smaller than a class
    gave single-class batches. Now its files are permuted with the seed and sharded: every worker reads, batches
    mix classes, and each epoch holds every file once."""
    from collections import Counter

    from groupvq_hf.data import ResumableBatches

    stream = build_image_dataset(str(class_folder), resolution=8, label_column="auto", shuffle_buffer_size=4, seed=3)
    batches = iter(ResumableBatches(stream, batch_size=8, num_workers=2, seed=3))
    epoch = [next(batches) for _ in range(8)]  # 64 photos: one epoch
    assert Counter(b["worker"] for b in epoch) == {0: 4, 1: 4}
    assert all(len(set(b["labels"])) >= 2 for b in epoch)
    keys = [k for b in epoch for k in b["keys"]]
    assert sorted(keys) == sorted(str(p) for p in (class_folder / "train").rglob("*.JPEG"))
    # two ranks read disjoint halves that cover the folder
    halves = [
        _keys(build_image_dataset(str(class_folder), resolution=8, rank=rank, world_size=2, seed=3)) for rank in (0, 1)
    ]
    assert not set(halves[0]) & set(halves[1]) and len(halves[0]) + len(halves[1]) == 64


def test_a_stream_left_unfinished_exits_without_an_error_from_its_shard_reader(tmp_path):
    """A script that reads one example of a parquet stream and exits: the shard reader is finalised at interpreter
    shutdown and must not raise there (it printed an ImportError traceback, 'Python is likely shutting down')."""
    import os
    import subprocess
    import sys

    import datasets

    features = datasets.Features({"image": datasets.Image()})
    for shard in range(2):
        rows = [{"image": {"bytes": _jpeg(i), "path": None}} for i in range(12)]
        _write_parquet(tmp_path / f"train-{shard:05d}-of-00002.parquet", rows, features)
    script = (
        "import sys; from groupvq_hf.data import build_image_dataset\n"
        "examples = iter(build_image_dataset(sys.argv[1], resolution=16, train=False))\n"
        "print(next(examples)['row'])\n"  # `examples` lives until the interpreter shuts down
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "0", proc.stderr[-2000:]
    assert "Exception ignored" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
