"""The one DataLoader builder every trainer plugin uses.

Shuffled, whole batches only (every optimiser step sees ``batch_size`` rows per process), the
recipe's worker count, workers kept alive across epochs. A streamed dataset is already this
process's share and is not shuffled here (its shuffle buffer is datasets'); its workers are not
persistent because each epoch's iterator hands the epoch and a seed to fresh workers. An
aspect-ratio bucket sampler replaces the batch size and the shuffle.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, default_collate

from ..recipe.schema import DataSpec


def make_loader(dataset: Dataset, data: DataSpec, batch_size: int, collate_fn: Callable = default_collate,
                batch_sampler: Sampler | None = None) -> DataLoader:
    workers = data.num_workers
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, batch_size=batch_size, drop_last=True, collate_fn=collate_fn, num_workers=workers)
    common = dict(collate_fn=collate_fn, num_workers=workers, persistent_workers=workers > 0)
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **common)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, **common)
