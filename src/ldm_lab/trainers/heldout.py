"""The held-out split of a text-image dataset and its deterministic validation loss.

``data.val_n`` rows, a fixed random set drawn from the recipe's seed, are left out of every
training batch. At each ``eval.every`` step the plugin's own loss path (the same objective, hooks
and reduction as training) runs over them with a BatchRNG seeded afresh each time: the same
posterior draws, noise, timesteps and caption-dropout decisions at every evaluation, so the
curve moves only with the weights (the sd-scripts / ai-toolkit convention of fixed timesteps
and noise). It runs on the main process on the unwrapped modules, without gradients.
"""

from __future__ import annotations

import contextlib
import random

import torch
from torch.utils.data import Subset, default_collate

from ..errors import UserError
from .randomness import BatchRNG

VAL_SEED_OFFSET = 7919  # the validation stream's seed: recipe seed + this (apart from the training stream)


def split_rows(n_rows: int, val_n: int, seed: int, candidates: list[int] | None = None) -> tuple[list[int], list[int]]:
    """(training rows, held-out rows) of a dataset of ``n_rows``: ``val_n`` rows drawn with ``seed``
    from ``candidates`` (default: every row)."""
    pool = list(range(n_rows)) if candidates is None else candidates
    if val_n >= len(pool):
        raise UserError(f"data.val_n={val_n} holds out every row of a dataset of {len(pool)}; "
                        f"hold out fewer (e.g. data.val_n={max(1, len(pool) // 20)}).")
    val = sorted(random.Random(seed).sample(pool, val_n))
    held = set(val)
    return [i for i in range(n_rows) if i not in held], val


def training_view(ds, val: list[int], bucket_of_row=None):
    """The dataset (or the bucket list) without the held-out rows: a Subset of the other rows, or
    the held-out rows' buckets set to None (the bucket sampler skips them; indices keep their meaning)."""
    if bucket_of_row is not None:
        held = set(val)
        return [None if i in held else b for i, b in enumerate(bucket_of_row)]
    train = [i for i in range(len(ds)) if i not in set(val)]
    return Subset(ds, train)


def val_batches(ds, val: list[int], batch_size: int, bucket_of_row=None, seed: int = 0) -> list[dict]:
    """The held-out rows as collated batches (rows of one bucket per batch when bucketed); a raw
    dataset's random crop / flip is drawn from torch's generator seeded with ``seed`` (the same at
    every evaluation), the training's stream restored after."""
    groups: dict = {}
    for i in val:
        groups.setdefault(None if bucket_of_row is None else bucket_of_row[i], []).append(i)
    batches = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for rows in groups.values():
            for k in range(0, len(rows), batch_size):
                batches.append(default_collate([ds[i] for i in rows[k:k + batch_size]]))
    return batches


@contextlib.contextmanager
def _swapped(obj, **attrs):
    old = {k: getattr(obj, k) for k in attrs}
    for k, v in attrs.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(obj, k, v)


def validation_loss(plugin, batches: list[dict], seed: int, trained: list[str]) -> float:
    """The mean of the plugin's per-batch losses over ``batches`` (weighted by rows), with a fresh
    BatchRNG(``seed``) and the modules named in ``trained`` unwrapped (no DDP collective)."""
    acc = plugin.accelerator
    rng = BatchRNG(seed, acc.device)
    unwrapped = {name: plugin.unwrap(getattr(plugin, name)) for name in trained}
    total, rows = 0.0, 0
    modules = list(unwrapped.values())
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        with _swapped(plugin, rng=rng, **unwrapped), torch.no_grad(), acc.autocast():
            for b in batches:
                b = {k: v.to(acc.device) if torch.is_tensor(v) else v for k, v in b.items()}
                loss, _ = plugin.loss(b)
                n = next(v.shape[0] for v in b.values() if torch.is_tensor(v))
                total += float(loss) * n
                rows += n
    finally:
        for m, was in zip(modules, modes):
            m.train(was)
    return total / max(rows, 1)
