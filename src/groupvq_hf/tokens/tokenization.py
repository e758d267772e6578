"""Tokenize a dataset into a `datasets` dataset of token grids, at the trained or any resized codebook size.

``tokenize_dataset(model, dataset, output_dir, resolution, ...)`` (``scripts/tokenize_dataset.py``) streams a source
through `groupvq_hf.data.build_image_dataset` (the sources, streaming and per-process split of ``scripts/train.py
--dataset``, ``demo`` included), encodes every view of every image with the model and writes parquet shards that
``datasets.load_dataset(output_dir, split=split)`` reads, with a dataset card and ``tokenization.json``.

Rows (one per image and view): ``tokens`` (the (h, w) grid of code indices, row-major: ``tokens[i * w + j]`` is row
``i``, column ``j``; int32, length ``h * w``), ``key`` (the source image's stable identifier, as the training stream
names it), ``augmentation`` (the view) and ``label`` (when the source has a label column, its ``ClassLabel`` kept).

Views (`AUGMENTATIONS`), all from the model's own image processor (resize the shorter side, center crop, [-1, 1]; the
loader workers send the cropped uint8 pixels and the encoder's device normalises them, `ViewTransform`):

- ``none``: ``center``, the processed image at ``resolution``;
- ``flip``: ``center`` and ``flip``, its horizontal mirror;
- ``ten_crop``: LlamaGen's ten crops (``extract_codes_c2i.py``): the image processed at ``int(resolution * 1.1)``
  (`TEN_CROP_RANGE`), its five ``resolution`` crops ``crop_0`` ... ``crop_4`` (top-left, top-right, bottom-left,
  bottom-right, center: torchvision's ``five_crop`` order) and their mirrors ``crop_0_flip`` ... ``crop_4_flip``.

Each process writes its own shards: the rows of DataLoader worker ``w`` of process ``r`` are cut into chunks of
``rows_per_shard // views`` source rows (skipped images count as rows), chunk ``c`` is written to
``data/{split}-{r:05d}-of-{n:05d}-{w:03d}-{c:05d}.parquet`` (process ``r`` of ``n``: the shard-name
pattern `datasets` reads any split name from) under a temporary name and renamed when complete (its counts are
kept in ``.progress/``). A rerun of the same command skips the rows of complete shards without decoding them, so a
killed run, run again, ends equal to an uninterrupted one.
"""

from __future__ import annotations

import json
import numbers
import os
import re
import shutil
import weakref
from collections import Counter
from pathlib import Path

import torch

from ..fileio import atomic_file, weights_digest, write_json
from ..image_processing_groupvq import GroupVQImageProcessor
from ..quantizer import RESIZE_MODES

AUGMENTATIONS = {
    "none": ("center",),
    "flip": ("center", "flip"),
    "ten_crop": (*(f"crop_{i}" for i in range(5)), *(f"crop_{i}_flip" for i in range(5))),
}
TEN_CROP_RANGE = 1.1  # LlamaGen's `--crop-range`: ten_crop cuts `resolution` crops from an int(1.1 * resolution) image
RECORD_FILE = "tokenization.json"
PROGRESS_DIR = ".progress"
DATA_DIR = "data"
# settings two runs into the same folder must share (else the folder is refused, naming the differences)
SETTINGS = (
    "model", "dataset", "split", "image_column", "label_column", "resolution", "augment", "codebook_size", "resize",
    "max_samples", "rows_per_shard", "num_processes", "dataloader_num_workers", "layout",
)  # fmt: skip
# 2: shards named `{split}-{rank:05d}-of-{world:05d}-...` (1: `{split}-{rank:03d}-...`, which `datasets` read as a
# split only for train/validation/test); 3: a local image folder streams as many shards of files, so its rows are split
# across processes and loader workers by file chunks (2: as one shard, by row); a folder of another layout is
# refused, naming it
LAYOUT = 3


# ---------------------------------------------------------------------------------------------------- views
def image_processor_at(source: str | os.PathLike | None, resolution: int) -> GroupVQImageProcessor:
    """The image processor of the model saved at ``source`` (a folder or Hub repo id with a
    ``preprocessor_config.json``; the default `GroupVQImageProcessor` when it has none or ``source`` is None) at
    ``resolution``: shorter side resized to ``resolution``, then a ``resolution`` x ``resolution`` center crop."""
    size = {"size": {"shortest_edge": resolution}, "crop_size": {"height": resolution, "width": resolution}}
    if source:
        try:
            return GroupVQImageProcessor.from_pretrained(str(source), **size)
        except (OSError, ValueError):
            pass  # a model saved without its processor: the default one
    return GroupVQImageProcessor(**size)


class ViewTransform:
    """A PIL RGB image -> its views (V, 3, R, R) as uint8 pixels, resized and cropped by the processor, in the order
    of ``AUGMENTATIONS[augment]``; `normalize` then maps them to the model's input (the processor's rescale and
    normalisation: [-1, 1] with the default mean and std of 0.5) on the device.

    The split sends a quarter of the bytes from the loader workers (uint8, not float32) and normalises on the
    encoder's device; ``normalize(view_transform(image))`` equals ``processor(image)`` bit for bit, flipped and
    cropped per view (an element-wise subtraction and division: correctly rounded in float32 on CPU and CUDA; tested
    on CPU, checked on CUDA by ``benchmarks/cuda_check.py``). Nothing is clamped: a processor with other statistics
    gives pixels outside [-1, 1], and the tokens are those of its output as it is.
    """

    def __init__(self, processor: GroupVQImageProcessor, resolution: int, augment: str):
        if augment not in AUGMENTATIONS:
            raise ValueError(f"`augment` must be one of {list(AUGMENTATIONS)}, got {augment!r}.")
        self.resolution, self.augment = resolution, augment
        side = int(resolution * TEN_CROP_RANGE) if augment == "ten_crop" else resolution
        self.processor = processor if side == resolution else image_processor_at_size(processor, side)

    def __call__(self, image) -> torch.Tensor:
        pixels = self.processor(image, return_tensors="pt", do_rescale=False, do_normalize=False)["pixel_values"][0]
        if self.augment == "none":
            return pixels[None]
        if self.augment == "flip":
            return torch.stack([pixels, pixels.flip(-1)])
        from torchvision.transforms.v2.functional import five_crop

        crops = torch.stack(five_crop(pixels, [self.resolution, self.resolution]))
        return torch.cat([crops, crops.flip(-1)])

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 views (..., 3, R, R), on any device -> the model's float32 input: the processor's own fused rescale
        and normalisation, ``(pixels - 255 * mean) / (255 * std)``."""
        processor = self.processor
        return processor.rescale_and_normalize(
            pixels, processor.do_rescale, processor.rescale_factor, processor.do_normalize, processor.image_mean,
            processor.image_std,
        )  # fmt: skip


def image_processor_at_size(processor: GroupVQImageProcessor, side: int) -> GroupVQImageProcessor:
    """A copy of ``processor`` resizing the shorter side to ``side`` and center-cropping ``side`` x ``side``."""
    config = processor.to_dict()
    config.update(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return GroupVQImageProcessor.from_dict(config)


# ---------------------------------------------------------------------------------------------------- decoding
@torch.no_grad()
def decode_tokens(model, tokens, token_grid=None, output_type: str = "pil", image_processor=None):
    """Images from token rows: ``tokens`` is one row (``h * w`` ints, row-major, as the ``tokens`` column holds them)
    or a batch of rows (or grids: (h, w) matching ``token_grid``, (batch, h, w)); ``token_grid`` is ``[h, w]``
    (``tokenization.json``; the grids' shape, or square, when None). Returns a list of PIL
    images (``output_type="pil"``), or ``"np"`` / ``"pt"`` as `GroupVQImageProcessor.postprocess`.

    The pixels are mapped back with ``image_processor`` (its mean and std), by default the processor saved with the
    model (``model.name_or_path``, as `tokenize_dataset` encodes with it; looked up once per model), else the
    default one.

    Tokens made with ``--codebook_size`` index the resized codebook: decode them with the model resized the same way
    (``model.resize_codebook(size, mode, seed)`` with the ``resize`` of ``tokenization.json``).
    """
    rows = torch.as_tensor(tokens if isinstance(tokens, torch.Tensor) else _as_int_rows(tokens))
    if rows.is_floating_point() or rows.is_complex() or rows.dtype == torch.bool or rows.ndim not in (1, 2, 3):
        raise ValueError(
            f"`tokens` must be integer code indices of shape (h * w,) or (batch, h * w) (or grids (h, w), (batch, h, "
            f"w)), got {rows.dtype} of shape {tuple(rows.shape)}."
        )
    if token_grid is not None and (
        not isinstance(token_grid, (list, tuple)) or len(token_grid) != 2
        or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in token_grid)
    ):  # fmt: skip
        raise ValueError(f"`token_grid` must be two positive ints [h, w], got {token_grid!r}.")
    grid_shaped = rows.ndim == 3 or (rows.ndim == 2 and token_grid is not None and list(rows.shape) == list(token_grid))
    if grid_shaped:  # (h, w) or (batch, h, w) grids: rows of h * w
        token_grid = list(rows.shape[-2:]) if token_grid is None else token_grid
        if list(rows.shape[-2:]) != [int(v) for v in token_grid]:
            raise ValueError(f"`tokens` grids of shape {list(rows.shape[-2:])} do not match `token_grid` {token_grid}.")
        rows = rows.reshape(-1, rows.shape[-2] * rows.shape[-1])
    rows = rows.reshape(-1, rows.shape[-1]).long()
    length = rows.shape[-1]
    if token_grid is None:
        side = round(length**0.5)
        token_grid = (side, side)
    h, w = (int(v) for v in token_grid)
    if h * w != length:
        raise ValueError(f"`token_grid` {[h, w]} holds {h * w} tokens, but a row of `tokens` has {length}.")
    size = model.config.codebook_size
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= size):
        raise ValueError(
            f"`tokens` must index the codebook of {size} codes, got values in [{int(rows.min())}, {int(rows.max())}] "
            "(tokens made with --codebook_size need the model resized the same way)."
        )
    if image_processor is None:
        image_processor = _model_processor(model)
    device = next(model.parameters()).device
    images = model.decode_indices(rows.view(-1, h, w).to(device))
    return image_processor.postprocess(images, output_type=output_type)  # its mean and std; clamped to [0, 1] there


_MODEL_PROCESSORS = weakref.WeakKeyDictionary()  # model -> (its name_or_path, sample size, processor at that size)


def _model_processor(model) -> GroupVQImageProcessor:
    """The processor saved with ``model`` (its ``name_or_path``: a folder or a Hub repo id) at its sample size, the
    default one when there is none; looked up once per model (a lookup on the Hub is two requests) and again when
    its name or sample size changes."""
    source = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None) or None
    key = (source, model.config.sample_size)
    entry = _MODEL_PROCESSORS.get(model)
    if entry is None or entry[:2] != key:
        _MODEL_PROCESSORS[model] = (*key, image_processor_at(*key))
    return _MODEL_PROCESSORS[model][2]


def _as_int_rows(tokens):
    """A list (of lists) of ints, or a numpy array, as an array; floats stay floats (refused by the caller)."""
    import numpy as np

    try:
        array = np.asarray(tokens)
    except ValueError:  # rows of different lengths
        lengths = sorted({len(row) for row in tokens}) if all(hasattr(row, "__len__") for row in tokens) else "?"
        raise ValueError(f"`tokens` rows must all hold h * w tokens, got rows of lengths {lengths}.") from None
    return array.astype(np.int64) if array.dtype.kind in "iu" else array.astype(np.float64)


# ---------------------------------------------------------------------------------------------------- folder
def settings_differences(old: dict, new: dict) -> list[str]:
    """``"name: old -> new"`` for every setting of `SETTINGS` that differs between two runs."""
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in SETTINGS if old.get(k) != new.get(k)]


def prepare_output_dir(output_dir: Path, settings: dict, overwrite: bool) -> dict | None:
    """Make ``output_dir`` ready for a run with ``settings`` (main process), before any image is encoded.

    Returns the existing record when the folder holds a run with the same settings (resumed), else None. Raises
    ValueError when it holds a run with other settings (naming the differences) or the remains of one without its
    record, unless ``overwrite`` (which deletes the previous run's record, ``data/``, card and progress); when it holds
    files of something else (never deleted, even with ``overwrite``); and when it is not writable. A folder is a
    tokens folder while it holds our record or our ``.progress/``.
    """
    # the record first and the progress last: a kill while --overwrite deletes leaves a folder without its record (so
    # never a "complete" record over a part of its shards) that `.progress/` still marks as ours until the rest is gone
    ours = (RECORD_FILE, DATA_DIR, "README.md", PROGRESS_DIR)
    record_path = output_dir / RECORD_FILE
    existing = None
    if output_dir.is_dir() and any(output_dir.iterdir()):
        is_tokens_folder = record_path.is_file() or (output_dir / PROGRESS_DIR).is_dir()
        if not record_path.is_file() and _only_setup_files(output_dir):
            pass  # killed while the folder was being set up (before its record was in place): start it afresh
        elif not is_tokens_folder:
            found = sorted(p.name for p in output_dir.iterdir())[:5]
            raise ValueError(
                f"`output_dir` {str(output_dir)!r} is not empty and is not a tokens folder (no {RECORD_FILE} nor "
                f"{PROGRESS_DIR}/; found {found}): give an empty or new folder (--overwrite deletes only what a "
                "tokenization wrote)."
            )
        elif overwrite:
            for name in ours:
                target = output_dir / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        elif not record_path.is_file():
            raise ValueError(
                f"`output_dir` {str(output_dir)!r} holds the remains of a tokenization without its {RECORD_FILE} "
                "(an --overwrite interrupted while it deleted them): --overwrite to start over."
            )
        else:
            existing = json.loads(record_path.read_text(encoding="utf-8"))
            differences = settings_differences(existing.get("settings", {}), settings)
            if differences:
                raise ValueError(
                    f"`output_dir` {str(output_dir)!r} holds tokens made with other settings ("
                    + "; ".join(differences)
                    + "): use another folder, or --overwrite to start over."
                )
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        if existing is None:  # first: a folder with our record is ours, whenever a kill comes
            write_json({"status": "running", "settings": settings}, record_path, single_writer=True)
        (output_dir / DATA_DIR).mkdir(exist_ok=True)
        (output_dir / PROGRESS_DIR).mkdir(exist_ok=True)
        probe = output_dir / PROGRESS_DIR / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"`output_dir` {str(output_dir)!r} is not writable: {err}") from err
    return existing


def _only_setup_files(output_dir: Path) -> bool:
    """Whether ``output_dir`` holds nothing but what a setup killed before its record was in place leaves: our
    (empty) ``data/`` and ``.progress/`` folders and temporary files."""
    for path in output_dir.iterdir():
        if path.name in (DATA_DIR, PROGRESS_DIR) and path.is_dir():
            if any(not p.name.startswith((".tmp-", ".probe-")) for p in path.iterdir()):
                return False
        elif not path.name.startswith(".tmp-"):
            return False
    return True


def shard_name(split: str, rank: int, world_size: int, worker: int, chunk: int) -> str:
    """``{split}-{rank:05d}-of-{world_size:05d}-{worker:03d}-{chunk:05d}``: `datasets`' sharded split pattern
    (``data/{split}-NNNNN-of-NNNNN*``), from which ``load_dataset(folder, split=split)`` reads any split name."""
    return f"{split}-{rank:05d}-of-{world_size:05d}-{worker:03d}-{chunk:05d}"


def complete_chunks(output_dir: Path, split: str, rank: int, world_size: int, worker: int) -> int:
    """How many leading chunks of this worker's rows are written (shards are complete in order)."""
    chunk = 0
    while (output_dir / DATA_DIR / f"{shard_name(split, rank, world_size, worker, chunk)}.parquet").is_file():
        chunk += 1
    return chunk


class ShardWriter:
    """Collects one worker's rows chunk by chunk and writes each complete chunk as one parquet shard (temporary name,
    then renamed), with its counts in ``.progress/<shard>.json`` written first. Token grids are kept as numpy arrays
    and written as one Arrow ``FixedSizeList`` column (no Python int per token)."""

    def __init__(self, output_dir: Path, split: str, rank: int, world_size: int, worker: int, chunk: int,
                 rows_per_chunk: int, features):  # fmt: skip
        self.output_dir, self.split, self.rank, self.worker = output_dir, split, rank, worker
        self.world_size = world_size
        self.chunk, self.rows_per_chunk, self.features = chunk, rows_per_chunk, features
        self.length = features["tokens"].length
        self.columns: dict[str, list] = {name: [] for name in features}
        self.skipped: Counter = Counter()
        self.pending = chunk == 0  # a worker that reads no row still writes its (empty) first shard

    def add(self, row: int, values: dict | None = None, reason: str | None = None) -> None:
        """Add the views of source ``row`` (``values``: ``tokens`` an int32 array (V, h * w), every other column a
        list over the V views) or a skipped row's ``reason``."""
        while row >= (self.chunk + 1) * self.rows_per_chunk:
            self.flush()
        self.pending = True
        if values is None:
            self.skipped[reason] += 1
            return
        self.columns["tokens"].append(values["tokens"])
        for name, column in self.columns.items():
            if name != "tokens":
                column.extend(values[name])

    def table(self):
        """The collected rows as an Arrow table with the schema of ``features``."""
        import numpy as np
        import pyarrow as pa

        schema = self.features.arrow_schema
        tokens = self.columns["tokens"]
        tokens = np.concatenate(tokens) if tokens else np.empty((0, self.length), np.int32)
        arrays = [
            pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1), pa.int32()), self.length)
            if name == "tokens" else pa.array(column, schema.field(name).type)
            for name, column in self.columns.items()
        ]  # fmt: skip
        return pa.Table.from_arrays(arrays, schema=schema)

    def flush(self) -> None:
        import datasets

        from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        name = shard_name(self.split, self.rank, self.world_size, self.worker, self.chunk)
        table = self.table()
        stats = {"num_examples": table.num_rows, "skipped": dict(sorted(self.skipped.items()))}
        write_json(stats, self.output_dir / PROGRESS_DIR / f"{name}.json", single_writer=True)
        bars_were_disabled = are_progress_bars_disabled()
        disable_progress_bars()  # one bar per shard is noise
        try:
            with atomic_file(self.output_dir / DATA_DIR / f"{name}.parquet", single_writer=True) as tmp:
                info = datasets.DatasetInfo(features=self.features)
                datasets.Dataset(datasets.table.InMemoryTable(table), info=info).to_parquet(str(tmp))
        finally:
            if not bars_were_disabled:
                enable_progress_bars()
        self.chunk += 1
        self.columns = {name: [] for name in self.features}
        self.skipped = Counter()
        self.pending = False

    def close(self) -> None:
        """Write the last, partial chunk (nothing when the rows of this worker were all written before)."""
        if self.pending:
            self.flush()


class HostTokens:
    """The int32 tokens (B, V, h * w) of one batch on the host, and whether its latents were finite. On CUDA the
    copies start without blocking (pinned memory, an event) and `numpy` waits for them: the loop queues the next
    batch's encode first."""

    def __init__(self, indices: torch.Tensor, finite: torch.Tensor | None = None):
        self.event = None
        if indices.device.type == "cuda":
            self.host = torch.empty(indices.shape, dtype=indices.dtype, pin_memory=True)
            self.host.copy_(indices, non_blocking=True)
            if finite is not None:
                finite = torch.empty((), dtype=torch.bool, pin_memory=True).copy_(finite, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = indices.cpu()
        self.finite = finite

    def numpy(self, keys=()):
        """The tokens as an int32 array; ValueError naming the images (``keys``) when the latents held NaN or inf."""
        if self.event is not None:
            self.event.synchronize()
        if self.finite is not None and not bool(self.finite):
            raise ValueError(
                f"The latents of a batch of images ({list(keys)[:4]}...) hold NaN or inf, which have no nearest code: "
                "are the model's weights finite?"
            )
        return self.host.numpy()


def write_batch(writers: dict, batch: dict, tokens: HostTokens | None, views, max_samples: int | None) -> int:
    """Add one loader batch to the writer of the worker that read it, its skipped and encoded rows in row order
    (a chunk holds exactly its rows whatever the batch size); returns the number of encoded images."""
    writer = writers[batch["worker"]]
    grids = tokens.numpy(batch["keys"]) if tokens is not None else None
    labels = batch.get("labels")
    entries = [(row, reason, None) for row, reason in batch["skipped"]]
    entries += [(row, None, i) for i, row in enumerate(batch["rows"])]
    for row, reason, i in sorted(entries, key=lambda entry: entry[0]):
        if max_samples is not None and row >= max_samples:
            continue
        if i is None:
            writer.add(row, reason=reason)
            continue
        values = {"tokens": grids[i], "key": [batch["keys"][i]] * len(views), "augmentation": list(views)}
        if labels is not None:
            values["label"] = [labels[i]] * len(views)
        writer.add(row, values)
    return len(batch["rows"])


def read_progress(output_dir: Path, split: str) -> tuple[int, Counter, int]:
    """``(num_examples, skipped reasons, num_shards)`` over the complete shards of ``split``."""
    examples, skipped, shards = 0, Counter(), 0
    for shard in sorted((output_dir / DATA_DIR).glob(f"{split}-*.parquet")):
        stats = json.loads((output_dir / PROGRESS_DIR / f"{shard.stem}.json").read_text(encoding="utf-8"))
        examples += stats["num_examples"]
        skipped.update(stats["skipped"])
        shards += 1
    return examples, skipped, shards


# ---------------------------------------------------------------------------------------------------- run
def _model_identity(model, name: str, loaded_here: bool) -> dict:
    """``{"name_or_path", "commit", "weights_sha256"}``: a local folder as an absolute path, a Hub repo id with its
    commit, and the weights as loaded (before any resize): a folder saved again with other weights, or another
    in-memory model, is another model. The commit of a model the caller loaded is known only from its config (a
    ``revision`` or ``cache_dir`` of theirs is not visible here); one `load_model` loaded here is its cached main."""
    local = Path(name).expanduser()
    if local.exists():
        name_or_path, commit = str(local.resolve()), None
    else:
        commit = getattr(model.config, "_commit_hash", None) or (_cached_hub_commit(name) if loaded_here else None)
        name_or_path = name
    return {"name_or_path": name_or_path, "commit": commit, "weights_sha256": weights_digest(model)}


def _cached_hub_commit(repo_id: str) -> str | None:
    """The commit of the Hub repo ``repo_id`` that `from_pretrained` just loaded: the snapshot folder of its
    ``config.json`` in the Hub cache (transformers 5 no longer sets ``config._commit_hash``); None when not cached."""
    from huggingface_hub import try_to_load_from_cache
    from transformers.utils.hub import extract_commit_hash

    try:
        path = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a repo id
        return None
    return extract_commit_hash(path, None) if isinstance(path, str) else None


def _dataset_identity(dataset: str) -> str:
    """``dataset`` with each local path made absolute (a relative path run from another folder is another dataset);
    named sources, Hub ids and weights as given."""
    from ..data.sources import local_source_path, parse_dataset_spec

    parts = []
    for name, weight in parse_dataset_spec(dataset):
        local = local_source_path(name)
        name = name if local is None else str(local.resolve())
        parts.append(name if weight is None else f"{name}:{weight:g}")
    return "+".join(parts)


def _check_arguments(resolution, augment, rows_per_shard, batch_size, dataloader_num_workers, max_samples,
                     resize_mode, codebook_size, split) -> None:  # fmt: skip
    if not isinstance(split, str) or not re.fullmatch(r"\w+(\.\w+)*", split):  # `datasets`' rule for split names
        raise ValueError(f"`split` must be a split name of letters, digits and underscores, got {split!r}.")

    def positive(value, name, allow_none=False):
        if allow_none and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive int{' or None' if allow_none else ''}, got {value!r}.")

    positive(resolution, "resolution")
    positive(rows_per_shard, "rows_per_shard")
    positive(batch_size, "batch_size")
    positive(max_samples, "max_samples", allow_none=True)
    positive(codebook_size, "codebook_size", allow_none=True)
    workers = dataloader_num_workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"`dataloader_num_workers` must be an int >= 0, got {dataloader_num_workers!r}.")
    if augment not in AUGMENTATIONS:
        raise ValueError(f"`augment` must be one of {list(AUGMENTATIONS)}, got {augment!r}.")
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"`resize_mode` must be one of {list(RESIZE_MODES)}, got {resize_mode!r}.")


def _output_features(label_feature, length: int):
    import datasets

    features = {
        "tokens": datasets.List(datasets.Value("int32"), length=length),
        "key": datasets.Value("string"),
        "augmentation": datasets.Value("string"),
    }
    if label_feature is not None:
        features["label"] = label_feature
    return datasets.Features(features)


@torch.inference_mode()
def tokenize_dataset(
    model,
    dataset: str,
    output_dir: str | os.PathLike,
    resolution: int,
    split: str = "train",
    image_column: str | None = None,
    label_column: str | None = "auto",
    augment: str = "none",
    codebook_size: int | None = None,
    resize_mode: str = "extend",
    seed: int = 0,
    max_samples: int | None = None,
    batch_size: int = 32,
    dataloader_num_workers: int = 0,
    rows_per_shard: int = 10_000,
    push_to_hub: str | None = None,
    private: bool = False,
    overwrite: bool = False,
    accelerator=None,
    progress: bool = True,
) -> dict:
    """Tokenize ``split`` of ``dataset`` into ``output_dir`` (see the module docstring); returns the record written to
    ``tokenization.json`` (on every process).

    ``model``: a saved folder or Hub repo id (or a `GroupVQModel`, recorded by its ``name_or_path``; with
    ``codebook_size`` it is resized in place).
    ``label_column``: ``"auto"`` (the named source's label column, else the source's first ``ClassLabel`` column),
    a column name, or None. ``codebook_size`` resizes the tokenizer first (Algorithm 2, ``resize_mode`` and ``seed``;
    a size the groups cannot split is an error before any image is read). ``max_samples`` caps the source rows each
    process and loader worker reads. Every process must call it (under ``accelerate launch``).
    """
    from ..data import build_image_dataset, collate_examples
    from ..evaluation import build_accelerator, load_model

    _check_arguments(resolution, augment, rows_per_shard, batch_size, dataloader_num_workers, max_samples,
                     resize_mode, codebook_size, split)  # fmt: skip
    accelerator = accelerator or build_accelerator()
    rank, world_size = accelerator.process_index, accelerator.num_processes
    output_dir = Path(output_dir).expanduser()
    source = str(model) if isinstance(model, (str, os.PathLike)) else getattr(model, "name_or_path", "") or None
    name = source or "in-memory"
    loaded_here = isinstance(model, (str, os.PathLike))
    if loaded_here:
        model = load_model(model, accelerator.device)
    else:
        model = model.to(accelerator.device).eval()
    trained = {"codebook_size": model.config.codebook_size, "group_sizes": list(model.quantizer.group_sizes)}
    identity = _model_identity(model, name, loaded_here)  # the weights as loaded, before any resize
    resize = None
    if codebook_size is not None:  # Algorithm 2; an impossible size raises here, before any image is read
        try:
            model.resize_codebook(codebook_size, mode=resize_mode, seed=seed)
        except ValueError as err:
            raise ValueError(f"`codebook_size` {codebook_size} cannot be used: {err}") from err
        resize = {"mode": resize_mode, "seed": seed, "trained_codebook_size": trained["codebook_size"],
                  "trained_group_sizes": trained["group_sizes"]}  # fmt: skip
    factor = model.config.downsample_factor
    if resolution % factor:
        raise ValueError(
            f"`resolution` must be a multiple of the model's downsampling factor {factor}, got {resolution}."
        )
    views = AUGMENTATIONS[augment]
    grid = [resolution // factor, resolution // factor]
    view_transform = ViewTransform(image_processor_at(source, resolution), resolution, augment)
    stream = build_image_dataset(
        dataset, split=split, resolution=resolution, train=False, image_column=image_column, seed=seed, rank=rank,
        world_size=world_size, streaming=True, max_samples=max_samples, label_column=label_column,
        transform=view_transform,
    )  # fmt: skip
    features = _output_features((stream.examples.features or {}).get("label"), grid[0] * grid[1])
    settings = {
        "model": identity, "dataset": _dataset_identity(dataset), "split": split, "image_column": image_column,
        "label_column": label_column, "resolution": resolution, "augment": augment,
        "codebook_size": model.config.codebook_size, "resize": resize, "max_samples": max_samples,
        "rows_per_shard": rows_per_shard, "num_processes": world_size, "dataloader_num_workers": dataloader_num_workers,
        "layout": LAYOUT,
    }  # fmt: skip
    error, complete = None, False
    if accelerator.is_main_process:
        try:
            if push_to_hub:
                from .card import check_push_target

                check_push_target(push_to_hub, split)  # its errors are ValueErrors naming `push_to_hub`
            existing = prepare_output_dir(output_dir, settings, overwrite)
            complete = existing is not None and existing.get("status") == "complete"
        except ValueError as err:
            error = str(err)
    error, complete = _broadcast(accelerator, (error, complete))
    if error:
        raise ValueError(error)
    if complete:  # the same command again on a finished folder: nothing to read or encode
        return _finish(accelerator, output_dir, split, settings, model, grid, views, resize, dataset, label_column,
                       features, [], push_to_hub, private)  # fmt: skip

    workers = max(1, dataloader_num_workers)
    rows_per_chunk = max(1, rows_per_shard // len(views))
    done = {w: complete_chunks(output_dir, split, rank, world_size, w) for w in range(workers)}
    stream.resume_at = {w: (0, chunks * rows_per_chunk) for w, chunks in done.items()}
    writers = {
        w: ShardWriter(output_dir, split, rank, world_size, w, done[w], rows_per_chunk, features) for w in range(workers)
    }
    loader = torch.utils.data.DataLoader(
        stream, batch_size=batch_size, collate_fn=collate_examples, num_workers=dataloader_num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )  # fmt: skip
    from tqdm.auto import tqdm

    show = progress and accelerator.is_local_main_process
    bar = tqdm(desc=f"tokenize (process {rank})", unit="img", disable=not show)
    # The GPU never waits: the model's per-call checks (each a read-back) are off, latents are checked for NaN/inf
    # once per batch with its tokens, and a batch is written once the next one is encoding.
    check_finite, model.check_finite = model.check_finite, False
    previous = None  # (batch, its tokens)
    try:
        for batch in loader:
            tokens = None
            if len(batch["rows"]):
                flat = batch["pixel_values"].to(accelerator.device, non_blocking=True).flatten(0, 1)  # (B * V, 3, R, R)
                encoded = model.encode(view_transform.normalize(flat).to(model.dtype))
                indices = encoded.indices.view(len(batch["rows"]), len(views), -1).to(torch.int32)
                tokens = HostTokens(indices, torch.isfinite(encoded.latents).all() if check_finite else None)
            if previous is not None:
                bar.update(write_batch(writers, *previous, views, max_samples))
            previous = batch, tokens
        if previous is not None:
            bar.update(write_batch(writers, *previous, views, max_samples))
    finally:
        model.check_finite = check_finite
    bar.close()
    for writer in writers.values():
        writer.close()
    accelerator.wait_for_everyone()

    return _finish(accelerator, output_dir, split, settings, model, grid, views, resize, dataset, label_column,
                   features, stream.notes, push_to_hub, private)  # fmt: skip


def _finish(accelerator, output_dir, split, settings, model, grid, views, resize, dataset, label_column, features,
            notes, push_to_hub, private) -> dict:  # fmt: skip
    """Write the record and the card from the complete shards (main process), push them; the record everywhere."""
    record = error = None
    if accelerator.is_main_process:
        from .card import push_tokens_to_hub, write_dataset_card

        num_examples, skipped, num_shards = read_progress(output_dir, split)
        if num_examples == 0:  # a folder `load_dataset` cannot load: no card, the record stays "running"
            error = (
                f"No image of `dataset` {dataset!r} (split {split!r}) could be tokenized: "
                f"{sum(skipped.values())} skipped {dict(sorted(skipped.items()))}."
            )
    if error is None and accelerator.is_main_process:
        record = {
            "status": "complete", "settings": settings, "model": settings["model"],
            "codebook_size": model.config.codebook_size, "num_groups": model.quantizer.num_groups,
            "group_sizes": list(model.quantizer.group_sizes), "token_grid": grid, "resolution": settings["resolution"],
            "augment": settings["augment"], "views": list(views), "resize": resize, "dataset": dataset, "split": split,
            "label_column": label_column, "num_examples": num_examples, "num_shards": num_shards,
            "num_skipped": sum(skipped.values()), "skipped": dict(sorted(skipped.items())),
        }  # fmt: skip
        write_dataset_card(output_dir, record, features, location=push_to_hub or str(output_dir))
        write_json(record, output_dir / RECORD_FILE, single_writer=True)
        print(
            f"Tokenized {num_examples} rows ({len(views)} view(s) per image) of {dataset!r} {split} into "
            f"{output_dir} ({num_shards} shards); skipped {record['num_skipped']} image(s)"
            + (f" {record['skipped']}" if skipped else "") + "."
        )  # fmt: skip
        for note in notes:
            print(f"Note: {note}")
        if push_to_hub:
            try:
                record["hub_url"] = push_tokens_to_hub(output_dir, push_to_hub, split, private=private)
            except Exception as err:  # noqa: BLE001  (every process must hear of it, not wait for the main one)
                error = (
                    f"`push_to_hub` {push_to_hub!r}: the upload failed ({type(err).__name__}: {err}); the tokens "
                    f"are complete in {str(output_dir)!r}: the same command again pushes them."
                )
    accelerator.wait_for_everyone()
    error, record = _broadcast(accelerator, (error, record))
    if error:
        raise ValueError(error)
    return record


def _broadcast(accelerator, value):
    """``value`` of the main process on every process."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


# ---------------------------------------------------------------------------------------------------- command line
def tokenize_parser():
    """Arguments of ``scripts/tokenize_dataset.py``."""
    import argparse

    parser = argparse.ArgumentParser(
        description="Tokenize a dataset into a `datasets` dataset of Group-VQ token grids (parquet shards + card)."
    )
    parser.add_argument("--model", required=True, help="A saved Group-VQ folder or Hub repo id.")
    parser.add_argument("--dataset", required=True, help="What scripts/train.py --dataset accepts (demo, imagenet, "
                        "a Hub repo id, a local folder / parquet / tar shards, a+b).")  # fmt: skip
    parser.add_argument("--split", default="train")
    parser.add_argument("--image_column", default=None, help="Image column (guessed when not given).")
    parser.add_argument("--label_column", default="auto", help="Label column: 'auto' (the source's ClassLabel / "
                        "named source's label), a column name, or 'none'.")  # fmt: skip
    parser.add_argument("--resolution", type=int, required=True, help="Image side the processor resizes and crops to.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--augment", choices=list(AUGMENTATIONS), default="none")
    parser.add_argument("--codebook_size", type=int, default=None, help="Resize the codebook first (Algorithm 2).")
    parser.add_argument("--resize_mode", choices=RESIZE_MODES, default="extend")
    parser.add_argument("--seed", type=int, default=0, help="Seed of --resize_mode resample.")
    parser.add_argument("--max_samples", type=int, default=None, help="At most M source rows per process and worker.")
    parser.add_argument("--batch_size", type=int, default=32, help="Images per encoder batch (x views).")
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    parser.add_argument("--rows_per_shard", type=int, default=10_000)
    parser.add_argument("--push_to_hub", default=None, metavar="REPO_ID", help="Upload as a Hub dataset repo.")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--overwrite", action="store_true", help="Delete a previous run in --output_dir first.")
    parser.add_argument("--no_progress", action="store_true")
    return parser


def main(argv=None) -> dict:
    """``scripts/tokenize_dataset.py``."""
    args = tokenize_parser().parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k not in ("model", "dataset", "output_dir", "resolution",
                                                                 "no_progress")}  # fmt: skip
    if options["label_column"] == "none":
        options["label_column"] = None
    from ..evaluation.evaluator import run_with_accelerator  # its process group torn down before the exit

    return run_with_accelerator(tokenize_dataset, args.model, args.dataset, args.output_dir, args.resolution,
                                progress=not args.no_progress, **options)  # fmt: skip


__all__ = [
    "AUGMENTATIONS",
    "TEN_CROP_RANGE",
    "ViewTransform",
    "decode_tokens",
    "image_processor_at",
    "main",
    "tokenize_dataset",
    "tokenize_parser",
]
