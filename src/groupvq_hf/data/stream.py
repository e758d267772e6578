"""The per-process image stream and its resumable batches.

``build_image_dataset(dataset, ...)`` turns a dataset spec (`groupvq_hf.data.sources`) into a stream of
``{"pixel_values", "key", "num_skipped"}`` examples (pixels (3, R, R) in [-1, 1]) that is shuffled with one seed on
every rank, split across ranks with ``datasets.distributed.split_dataset_by_node`` and re-shuffled per epoch with
``set_epoch``; `ImageStream` decodes its rows (`groupvq_hf.data.decoding`) and `collate_examples` batches them.

`ResumableBatches` reads that stream epoch after epoch with a position that can be saved and restored exactly. A
position is the epoch, the batches read in it and, per DataLoader worker, the batches it produced and the raw rows it
read through them. Resuming replays nothing: each worker yields cheap placeholders for its consumed batches (so the
DataLoader's round-robin over workers stays the same) and skips its consumed rows without decoding them;
augmentations are seeded per example (`groupvq_hf.data.example_seed`), so the batches after the resume equal those
of an uninterrupted run bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter

import torch

from .decoding import MIN_IMAGE_SIZE, SkippedImage, decode_image, image_transform
from .demo import DEMO_CROP_SCALE
from .rows import UNREADABLE_SHARD, example_key, example_seed, hash_seed
from .sources import load_image_source, parse_dataset_spec

SHUFFLE_BUFFER_SIZE = 1000
# The stream order a saved data position refers to. 2 (2026-12-05): a local image folder streams as many shards of
# files, permuted with the run's seed for training (1: as one shard in sorted order).
STREAM_ORDER = 2

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _seeded_cpu_rng(seed: int | None):
    """Run the block with torch's CPU RNG seeded to ``seed`` and restore the caller's state after it."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


class ImageStream(torch.utils.data.IterableDataset):
    """Decodes, converts and transforms the images of a (sharded, shuffled) ``datasets.IterableDataset``.

    Yields ``{"pixel_values": (3, R, R) in [-1, 1], "key", "num_skipped", "converted", "worker", "row"}`` (and
    ``label`` when the source rows have one; ``pixel_values`` is whatever ``transform`` returns when given): ``row``
    is the example's index in the raw stream this loader ``worker`` reads, ``num_skipped`` counts the bad images
    dropped just before it, ``converted`` is its original mode when it was converted to RGB (else ""). Training
    augmentations draw from a seed of ``(seed, rank, epoch, worker, row)`` (`example_seed`).

    A training stream ends with ``{"tail": True, "num_skipped", "worker", "row"}`` when bad images follow the
    worker's last good one. Evaluation streams (``train=False``) yield bad images too, as ``{"pixel_values": None,
    "skipped": reason, "row"}``, so a consumer counts them all. With ``blocks=(rank, world_size, block_size)`` every
    process and loader worker reads the whole stream and keeps blocks of ``block_size`` rows in turn, ordered so
    that the k-th batches of all processes cover consecutive rows (see `groupvq_hf.evaluation.evaluate_model`).

    ``resume_at`` (set by `groupvq_hf.data.ResumableBatches`) maps a worker to ``(placeholders, rows)``: that
    worker first yields ``placeholders`` empty examples (``{"placeholder": True}``) standing for batches already
    consumed, then skips its first ``rows`` raw rows without decoding them.
    ``skipped`` / ``converted`` count reasons and original modes in the iterating process, ``decode_scales`` the
    DCT scale each JPEG was decoded at (`decode_image`; ``full_decode=True`` decodes every image in full).
    """

    def __init__(
        self,
        examples,
        resolution: int,
        train: bool,
        min_image_size: int = MIN_IMAGE_SIZE,
        max_samples: int | None = None,
        seed: int = 0,
        rank: int = 0,
        crop_scale: tuple[float, float] | None = None,
        blocks: tuple[int, int, int] | None = None,
        notes: list[str] | None = None,
        full_decode: bool = False,
        transform=None,
    ):
        super().__init__()
        self.examples = examples
        self.resolution = resolution
        self.train = train
        self.min_image_size = min_image_size
        self.max_samples = max_samples
        self.seed = seed
        self.rank = rank
        self.blocks = blocks
        self.notes = list(notes or [])
        # A caller's own transform (e.g. a model's image processor) gets the fully decoded image it expects.
        self.full_decode = full_decode or transform is not None
        self.transform = transform if transform is not None else image_transform(resolution, train, crop_scale)
        self.resume_at: dict[int, tuple[int, int]] | None = None
        self.skipped: Counter = Counter()
        self.converted: Counter = Counter()
        self.decode_scales: Counter = Counter()
        self.decoded = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (shards and buffer, same seed on every rank)."""
        self.examples.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return self.examples.epoch

    @property
    def num_shards(self) -> int:
        return self.examples.num_shards

    def decode(self, example: dict, seed: int | None = None) -> tuple[torch.Tensor | None, str | None, str]:
        """``(pixels, reason, mode)`` of one raw example: pixels, or None and why (counted in ``skipped``); ``mode``
        is the original mode of a converted image (else ""). ``seed`` seeds the random augmentations."""
        self.decoded += 1
        if example.get(UNREADABLE_SHARD):  # the marker of a damaged shard (logged where it was read)
            reason = f"{UNREADABLE_SHARD}:{example[UNREADABLE_SHARD]}"
            self.skipped[reason] += 1
            return None, reason, ""
        try:
            with _seeded_cpu_rng(seed):
                image = decode_image(example["image"], self.transform, self.full_decode, self.min_image_size)
        except SkippedImage as skipped:  # truncated, corrupt, not an image, decompression bomb, too small ...
            self.skipped[skipped.reason] += 1
            return None, skipped.reason, ""
        if image.mode is not None:
            self.converted[image.mode] += 1
        if image.scale is not None:
            self.decode_scales[image.scale] += 1
        return image.pixels, None, image.mode or ""

    def _rows(self, worker: int, num_workers: int):
        """``(row, example)`` pairs this worker reads."""
        if self.blocks is None:
            yield from enumerate(self.examples)  # datasets shards the stream across loader workers itself
            return
        rank, world_size, block = self.blocks
        slots, slot = world_size * num_workers, worker * world_size + rank
        # .iter() reads the whole stream in every worker (iterating the dataset would shard it by worker)
        row = 0
        for columns in self.examples.iter(batch_size=block):
            for values in zip(*columns.values()):
                if (row // block) % slots == slot:
                    yield row, dict(zip(columns, values))
                row += 1

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        placeholders, skip_rows = (self.resume_at or {}).get(worker, (0, 0))
        yielded = 0
        for _ in range(placeholders):
            if self.max_samples is not None and yielded >= self.max_samples:
                return
            yield {"placeholder": True, "worker": worker, "row": skip_rows - 1}
            yielded += 1
        epoch, pending, rows_read = (self.epoch if self.train else 0), 0, 0
        for row, example in self._rows(worker, num_workers):
            rows_read = row + 1
            if row < skip_rows:
                continue  # consumed before the resume: not decoded
            if self.max_samples is not None and yielded >= self.max_samples:
                return
            seed = example_seed(self.seed, self.rank, epoch, worker, row) if self.train else None
            pixels, reason, mode = self.decode(example, seed)
            if pixels is None:
                if self.train:
                    pending += 1
                else:
                    yield {"pixel_values": None, "skipped": reason, "worker": worker, "row": row}
                continue
            key = example.get("key") or example_key(example["image"])
            labelled = {"label": example["label"]} if "label" in example else {}
            yield {
                "pixel_values": pixels, "key": key, "num_skipped": pending, "converted": mode, "worker": worker,
                "row": row, **labelled,
            }  # fmt: skip
            pending, yielded = 0, yielded + 1
        if pending:  # bad images after this worker's last good one: a tail marker carries their count
            yield {"tail": True, "num_skipped": pending, "worker": worker, "row": rows_read - 1}
        if rows_read < skip_rows:  # the dataset lost rows (files deleted) between the checkpoint and this resume
            logger.warning(
                f"Process {self.rank}, loader worker {worker}: {skip_rows - rows_read} of the {skip_rows} rows read "
                f"before the resume are missing (the stream has {rows_read}): files were deleted or the dataset "
                "changed since the checkpoint; this epoch ends here."
            )


def build_image_dataset(
    dataset: str = "demo",
    split: str = "train",
    resolution: int = 128,
    train: bool = True,
    image_column: str | None = None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    streaming: bool = True,
    max_samples: int | None = None,
    min_image_size: int = MIN_IMAGE_SIZE,
    shuffle_buffer_size: int = SHUFFLE_BUFFER_SIZE,
    block_size: int | None = None,
    full_decode: bool = False,
    label_column: str | None = None,
    transform=None,
) -> ImageStream:
    """A stream of ``{"pixel_values": (3, resolution, resolution) in [-1, 1], "key", "num_skipped", ...}`` for one
    rank (see [`ImageStream`]).

    Every rank shuffles with the same ``seed`` (shards, then a buffer of ``shuffle_buffer_size``; ``set_epoch``
    reshuffles) and keeps a disjoint part with ``split_dataset_by_node(rank, world_size)``. ``max_samples`` caps
    the examples this rank yields per epoch (per DataLoader worker when read through workers). Evaluation streams
    (``train=False``) are not shuffled; with ``block_size`` they are split across ranks and loader workers by
    blocks of rows in stream order instead of by shards. Images whose shorter side is below ``min_image_size`` are
    skipped. The demo's training split uses random-resized crops (``DEMO_CROP_SCALE``). JPEGs are decoded at the
    largest DCT scale that still holds every pixel of their crop (`decode_image`); ``full_decode=True`` decodes every
    image in full, for protocols that must match a reference preprocessing. ``label_column`` adds each example's
    ``label`` (see `load_image_source`; ``"auto"`` reads none from a mix of sources); ``transform`` (a PIL RGB image
    -> tensor) replaces the resize and crop (`image_transform`), as ``groupvq_hf.tokens`` does with the model's own
    image processor, or an evaluation protocol's preprocessing (`groupvq_hf.evaluation.protocol_transform`), and
    then always sees the fully decoded image.
    """
    from datasets import interleave_datasets
    from datasets.distributed import split_dataset_by_node

    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 1:
        raise ValueError(f"`resolution` must be a positive int, got {resolution!r}.")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"`world_size` must be a positive int, got {world_size!r}.")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"`rank` must be an int in [0, {world_size - 1}] (world_size={world_size}), got {rank!r}.")
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise ValueError(f"`max_samples` must be a positive int or None, got {max_samples!r}.")
    if block_size is not None and (train or not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"`block_size` must be a positive int, for evaluation streams only, got {block_size!r}.")
    if not isinstance(full_decode, bool):
        raise ValueError(f"`full_decode` must be True or False, got {full_decode!r}.")
    parts = parse_dataset_spec(dataset)
    notes: list[str] = []
    if label_column == "auto" and len(parts) > 1:
        label_column = None  # a mix of sources has no one label set
    order_seed = seed if train else None  # a local image folder's files, permuted once before they are sharded
    sources = [
        load_image_source(name, split, image_column, streaming, notes, label_column, file_order_seed=order_seed)
        for name, _ in parts
    ]
    if len(sources) == 1:
        ds = sources[0]
    else:
        ds = interleave_datasets(
            sources, probabilities=[w for _, w in parts], seed=seed, stopping_strategy="all_exhausted"
        )
    if train:
        ds = ds.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
    if world_size > 1 and block_size is None:
        ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    crop_scale = DEMO_CROP_SCALE if train and dataset == "demo" and split == "train" else None
    return ImageStream(
        ds, resolution, train, min_image_size=min_image_size, max_samples=max_samples, seed=seed, rank=rank,
        crop_scale=crop_scale, blocks=None if block_size is None else (rank, world_size, block_size), notes=notes,
        full_decode=full_decode, transform=transform,
    )  # fmt: skip


def collate_pixels(batch: list[dict]) -> torch.Tensor:
    """Stack the ``pixel_values`` of a list of examples into a (B, 3, R, R) tensor (bad-image markers of evaluation
    streams, whose ``pixel_values`` is None, are left out)."""
    pixels = [example["pixel_values"] for example in batch if example.get("pixel_values") is not None]
    if not pixels:
        raise ValueError("`batch` must hold at least one decoded example.")
    return torch.stack(pixels)


def collate_examples(batch: list[dict]) -> dict:
    """A batch of [`ImageStream`] examples: ``pixel_values`` (B, 3, R, R) of the decoded ones (an empty tensor
    when there is none), their ``keys`` and stream ``rows``, the ``worker`` that read them and ``rows_read`` (rows
    it has read through this batch), ``num_skipped`` / ``skipped`` (bad images: count, with a training stream's
    ``tail``, and the ``(row, reason)`` pairs of an evaluation stream's)
    and ``num_converted`` / ``modes`` (converted images: count, each image's original mode or ""), and ``labels``
    when the stream carries a ``label`` column (`build_image_dataset(label_column=...)`). A batch of
    resume placeholders is ``{"placeholder": True, "worker", "rows_read"}``."""
    if not batch:
        raise ValueError("`batch` must hold at least one example.")
    position = {"worker": batch[-1].get("worker", 0), "rows_read": batch[-1].get("row", -1) + 1}
    if all(example.get("placeholder") for example in batch):
        return {"placeholder": True, **position}
    good = [example for example in batch if example.get("pixel_values") is not None]
    bad = [(example["row"], example["skipped"]) for example in batch if "skipped" in example]
    tail = sum(int(example["num_skipped"]) for example in batch if example.get("tail"))
    modes = [example.get("converted") or "" for example in good]
    return {
        "pixel_values": collate_pixels(good) if good else torch.empty(0, 3, 0, 0),
        "keys": [example.get("key", "") for example in good],
        "rows": [example.get("row", -1) for example in good],
        "num_skipped": sum(int(example.get("num_skipped", 0)) for example in good) + len(bad) + tail,
        "skipped": bad,
        "num_converted": sum(1 for mode in modes if mode),
        "modes": modes,
        **({"labels": [example["label"] for example in good]} if good and "label" in good[0] else {}),
        **position,
    }


class ResumableBatches:
    """Endless batches of an [`ImageStream`], epoch after epoch, with a position that can be saved and restored.

    Epoch ``e`` reshuffles the stream (``set_epoch(e)``); each example's augmentation is seeded from ``(seed,
    rank, e, worker, row)``, so the global RNG is left alone. Every batch holds ``batch_size`` images; a loader
    worker's last, partial batch is not trained on (as ``drop_last``), but the bad images read for it (and after it)
    are counted: a batch is yielded once the loader has read the one after it, with the bad images of the partial
    batches read in between, so every bad image of an epoch is counted once, by the time its last batch is
    yielded. ``state_dict`` / ``load_state_dict`` save and restore the position (a JSON-able dict); the number of
    loader workers must be the same when resuming mid-epoch.
    """

    def __init__(self, stream, batch_size: int, num_workers: int = 0, seed: int = 0, rank: int = 0):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"`num_workers` must be an int >= 0, got {num_workers!r}.")
        self.stream = stream
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.rank = rank
        self.epoch = 0
        self.batches_in_epoch = 0
        self.workers = self._fresh_positions()

    def _fresh_positions(self) -> list[list[int]]:
        return [[0, 0] for _ in range(max(1, self.num_workers))]  # per worker: [batches, rows read]

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "workers": [list(position) for position in self.workers],
            "stream_order": STREAM_ORDER,
        }

    def load_state_dict(self, state: dict) -> None:
        epoch, batches = int(state["epoch"]), int(state["batches_in_epoch"])
        workers = state.get("workers")
        if workers is None:
            if batches:
                raise ValueError(
                    f"The data position {state} has no per-worker positions (saved by an older version): it can only "
                    "resume at an epoch boundary."
                )
            workers = self._fresh_positions()
        if len(workers) != max(1, self.num_workers):
            raise ValueError(
                f"The data position was saved with {len(workers)} DataLoader worker(s) (0 and 1 are the same); resume "
                f"with `--dataloader_num_workers {len(workers) if len(workers) > 1 else 0}`, got {self.num_workers}."
            )
        if sum(int(b) for b, _ in workers) != batches:
            raise ValueError(
                f"The data position {state} is inconsistent: worker batches do not sum to batches_in_epoch."
            )
        order = int(state.get("stream_order", 1))
        if batches and order != STREAM_ORDER:
            logger.warning(
                f"The data position was saved mid-epoch (epoch {epoch}, batch {batches}) with stream order {order}; this "
                f"version reads order {STREAM_ORDER}, in which a local image folder streams as shuffled shards of files. "
                "If this run reads a local image folder, the rest of this epoch may repeat or miss some of its images "
                "(other sources resume exactly); the next epochs are whole."
            )
        self.epoch, self.batches_in_epoch = epoch, batches
        self.workers = [[int(b), int(r)] for b, r in workers]

    def _epoch_seed(self, epoch: int) -> int:
        return hash_seed(self.seed, self.rank, epoch)

    def __iter__(self):
        def release(batch: dict, number: int) -> dict:
            """``batch``, the epoch's ``number``-th, with the bad images of the partial batches read since the
            last one yielded, and the position through it (and through those partial batches)."""
            nonlocal uncounted
            worker = batch["worker"]
            positions[worker] = [positions[worker][0] + 1, max(positions[worker][1], batch["rows_read"])]
            self.batches_in_epoch, self.workers = number, [list(p) for p in positions]
            batch["num_skipped"], uncounted = batch["num_skipped"] + uncounted, 0
            return batch

        while True:
            epoch, skip = self.epoch, self.batches_in_epoch
            positions = [list(p) for p in self.workers] if skip else self._fresh_positions()
            self.stream.set_epoch(epoch)
            self.stream.resume_at = (
                {w: (b * self.batch_size, r) for w, (b, r) in enumerate(positions)} if skip else None
            )
            loader = torch.utils.data.DataLoader(
                self.stream,
                batch_size=self.batch_size,
                collate_fn=collate_examples,
                num_workers=self.num_workers,
                drop_last=False,  # a worker's partial last batch is read for its bad-image count, then dropped
                # workers' base seed: drawn from here, not from the global RNG (augmentations are seeded per example)
                generator=torch.Generator().manual_seed(self._epoch_seed(epoch)),
                pin_memory=torch.cuda.is_available(),
            )
            count, held, uncounted = 0, None, 0  # full batches read; the one read but not yet yielded
            for batch in loader:
                worker = batch["worker"]
                if not batch.get("placeholder") and len(batch["keys"]) < self.batch_size:
                    positions[worker][1] = batch["rows_read"]  # a worker's partial last batch: read, not trained on
                    uncounted += batch["num_skipped"]
                    continue
                count += 1
                if count <= skip:
                    if not batch.get("placeholder"):
                        raise RuntimeError(f"Resume replay out of step at batch {count} of epoch {epoch}.")
                    continue
                if held is not None:
                    yield release(held, count - 1)
                held = batch
            if held is not None:  # the epoch's last batch: every bad image of the epoch is counted in it or before
                yield release(held, count)
            if count == 0:
                raise ValueError(
                    f"Process {self.rank} read no full batch of {self.batch_size} images in epoch {epoch}: the dataset "
                    "is too small for `--train_batch_size` x number of processes x loader workers (or every image "
                    "was skipped)."
                )
            if count < skip:
                raise ValueError(
                    f"Process {self.rank}'s stream has {count} batches in epoch {epoch}, fewer than the {skip} of the "
                    "saved position: the dataset or the data arguments changed."
                )
            self.epoch, self.batches_in_epoch, self.workers = epoch + 1, 0, self._fresh_positions()


__all__ = [
    "ImageStream",
    "ResumableBatches",
    "SHUFFLE_BUFFER_SIZE",
    "build_image_dataset",
    "collate_examples",
    "collate_pixels",
]
