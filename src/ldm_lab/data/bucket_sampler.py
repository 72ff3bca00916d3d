"""One-bucket batches: :class:`BucketBatchSampler` yields batches of row indices whose rows all
share one aspect-ratio bucket (see :mod:`ldm_lab.data.buckets`), so their tensors stack.

Multi-process use (accelerate): see :class:`BucketBatchSampler`. In short: call ``set_epoch(epoch)`` on the
*prepared* dataloader before iterating each epoch, never on the sampler alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

__all__ = ["BucketBatchSampler"]


class _EpochView(Sampler[int]):
    """The rows of the parent sampler's current epoch, in batch order, exposed as ``.sampler``.

    accelerate's ``DataLoaderShard.set_epoch`` calls ``batch_sampler.set_epoch`` only when the batch
    sampler is ours (one process); sharded across processes, its batch sampler is a ``BatchSamplerShard``
    without ``set_epoch``, and the epoch reaches us only through ``batch_sampler.batch_sampler.sampler
    .set_epoch``. It deliberately has no ``generator`` and is no ``RandomSampler``, so ``prepare`` neither
    replaces it (``use_seedable_sampler``) nor synchronises a generator for it."""

    def __init__(self, parent: BucketBatchSampler):
        self.parent = parent

    def set_epoch(self, epoch: int) -> None:
        self.parent.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        for batch in self.parent:
            yield from batch

    def __len__(self) -> int:
        return len(self.parent) * self.parent.batch_size


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of row indices, each from ONE bucket, for ``DataLoader(dataset, batch_sampler=...)``.

    ``bucket_of_row[i]`` is row i's bucket index; -1 or None means skip the row (dropped images). Each
    epoch, the rows of every bucket are shuffled and cut into batches, then the order of all batches is
    shuffled; both depend only on ``(seed, epoch)`` (numpy ``SeedSequence([seed, epoch])``), so every
    process computes the same order and a resumed run replays an epoch exactly. ``len()`` is the same
    every epoch.

    ``drop_last=True``: each bucket's last short batch is left out (a different subset each epoch, except
    in a bucket with fewer rows than a batch, which is never seen: :func:`bucket_report` warns).
    ``drop_last=False``: the short batch is topped up with rows of the same bucket drawn again, so every
    row is seen and every batch is still full and one-bucket. Short batches are not yielded because
    accelerate's ``BatchSamplerShard`` (several processes) skips a short batch and the one before it, and
    at the end of an epoch pads a short batch with rows of the first batches, i.e. of other buckets.

    With accelerate, call ``prepared_loader.set_epoch(epoch)`` before iterating each epoch: a prepared
    loader calls ``set_epoch(self.iteration)`` at the start of every iteration, which overrides a
    ``set_epoch`` made on this sampler directly, and only the prepared loader's ``set_epoch`` reaches this
    sampler when it is wrapped in a ``BatchSamplerShard`` (via ``.sampler``, see :class:`_EpochView`).
    Across N processes, batch k goes to process k % N, and the last ``len % N`` batches of an epoch are
    skipped (drop_last) or padded by accelerate with repeats of the epoch's first batches.
    """

    def __init__(self, bucket_of_row: Sequence[int | None], batch_size: int, seed: int = 0,
                 drop_last: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.epoch = 0
        rows: dict[int, list[int]] = {}
        for i, b in enumerate(bucket_of_row):
            if b is None or b < 0:
                continue
            rows.setdefault(int(b), []).append(i)
        self.rows_of_bucket = {b: np.asarray(rows[b], dtype=np.int64) for b in sorted(rows)}
        self.sampler = _EpochView(self)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _batches_in(self, n: int) -> int:
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __len__(self) -> int:
        return sum(self._batches_in(len(r)) for r in self.rows_of_bucket.values())

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """All batches of ``epoch`` (default: the current one), in order."""
        epoch = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng([self.seed & 0xFFFFFFFFFFFFFFFF, epoch & 0xFFFFFFFFFFFFFFFF])
        bs = self.batch_size
        out: list[list[int]] = []
        for rows in self.rows_of_bucket.values():
            perm = rows[rng.permutation(len(rows))].tolist()
            for k in range(self._batches_in(len(perm))):
                batch = perm[k * bs:(k + 1) * bs]
                if len(batch) < bs:  # drop_last=False: top up from this bucket's own rows
                    batch += [perm[j % len(perm)] for j in range(bs - len(batch))]
                out.append(batch)
        order = rng.permutation(len(out))
        return [out[i] for i in order]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)
