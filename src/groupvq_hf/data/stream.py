"""The training data stream: endless batches with a position that can be saved and restored exactly.

A position is the epoch, the batches read in it and, per DataLoader worker, the batches it produced and the raw
rows it read through them. Resuming replays nothing: each worker yields cheap placeholders for its consumed
batches (so the DataLoader's round-robin over workers stays the same) and skips its consumed rows without
decoding them; augmentations are seeded per example (`groupvq_hf.data.example_seed`), so the batches after the
resume equal those of an uninterrupted run bit for bit.
"""

from __future__ import annotations

import torch

from .sources import collate_examples, hash_seed


class ResumableBatches:
    """Endless batches of an [`ImageStream`], epoch after epoch, with a position that can be saved and restored.

    Epoch ``e`` reshuffles the stream (``set_epoch(e)``); each example's augmentation is seeded from ``(seed,
    rank, e, worker, row)``, so the global RNG is left alone. ``state_dict`` / ``load_state_dict`` save and restore
    the position (a JSON-able dict); the number of loader workers must be the same when resuming mid-epoch.
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
        self.epoch, self.batches_in_epoch = epoch, batches
        self.workers = [[int(b), int(r)] for b, r in workers]

    def _epoch_seed(self, epoch: int) -> int:
        return hash_seed(self.seed, self.rank, epoch)

    def __iter__(self):
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
                drop_last=True,
                # workers' base seed: drawn from here, not from the global RNG (augmentations are seeded per example)
                generator=torch.Generator().manual_seed(self._epoch_seed(epoch)),
                pin_memory=torch.cuda.is_available(),
            )
            count = 0
            for batch in loader:
                count += 1
                if count <= skip:
                    if not batch.get("placeholder"):
                        raise RuntimeError(f"Resume replay out of step at batch {count} of epoch {epoch}.")
                    continue
                worker = batch["worker"]
                positions[worker] = [positions[worker][0] + 1, batch["rows_read"]]
                self.batches_in_epoch, self.workers = count, [list(p) for p in positions]
                yield batch
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


__all__ = ["ResumableBatches"]
