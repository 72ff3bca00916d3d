"""Aspect-ratio bucketing: bucket sets, assignment, per-bucket transforms, one-bucket batches, a report.

Every image goes to the bucket (height, width) nearest its aspect ratio, is resized to *cover* the bucket
(both sides >= the bucket's, aspect preserved, never upscaled by more than ``max_upscale``) and cropped to
it; every batch holds rows of one bucket, so its tensors stack.

Relation to ``diffusers.training_utils``:

* ``parse_buckets_string`` ("h,w;h,w") is used by :func:`parse_buckets` for string input; its own check
  (a warning when a side is not a multiple of 8) is replaced by a hard check against ``step``.
* ``generate_aspect_ratio_buckets`` is not used: it places buckets at a fixed list of aspect ratios and
  *rounds* each side to the nearest multiple, so ``h * w`` can exceed the pixel budget (at 512**2 with
  divisibility 64 it gives 640x448 = 286720 > 262144 for 3:2, and 704x384 for 1:2), it moves the aspect
  (3:2 becomes 1.43), and it ignores ``max_aspect``. :func:`make_buckets`
  instead enumerates every height that is a multiple of ``step`` and keeps the widest width within budget
  (rounded *down*), i.e. the exact set of maximal buckets.
* ``find_nearest_bucket`` is not used: its metric ``|h * bw - w * bh|`` scales with the image and bucket
  sizes, so it is not a distance between aspect ratios (a larger bucket of a worse aspect can win, and on
  ties it takes the *last* bucket, whatever its size); it also knows nothing of upscaling. :func:`assign`
  uses ``|log(h / w) - log(bh / bw)|``, which is scale-invariant and symmetric between portrait and
  landscape (2:1 and 1:2 are equally far from 1:1).

Multi-process use (accelerate): see :class:`BucketBatchSampler`. In short: call ``set_epoch(epoch)`` on the
*prepared* dataloader before iterating each epoch, never on the sampler alone.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Sampler
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = [
    "BucketBatchSampler",
    "CoverResize",
    "assign",
    "bucket_key",
    "bucket_report",
    "bucket_transform",
    "cover_size",
    "format_report",
    "make_buckets",
    "parse_buckets",
    "upscale_needed",
]

_EPS = 1e-9
_EXAMPLES = 5  # dropped paths/keys listed per reason in the report


# ----------------------------------------------------------------------------------------- bucket sets


def _sort_key(hw: tuple[int, int]) -> tuple[float, int]:
    h, w = hw
    return (h / w, h)  # widest (landscape) first, then by size


def _within_aspect(h: int, w: int, max_aspect: float) -> bool:
    return max(h, w) <= max_aspect * min(h, w) * (1 + _EPS)


def make_buckets(pixel_budget: int, step: int, max_aspect: float) -> list[tuple[int, int]]:
    """The maximal (height, width) buckets: sides multiples of ``step``, ``h * w <= pixel_budget``,
    ``max(h, w) / min(h, w) <= max_aspect``, none contained in another (both sides <=), plus the largest
    square bucket even when a wider bucket of the same height contains it (square images are common and
    must not be cropped). Sorted by aspect ratio h/w (landscape first); the order is deterministic, so a
    bucket's index is stable for a given (pixel_budget, step, max_aspect).
    """
    if step < 1 or pixel_budget < step * step:
        raise ValueError(f"pixel_budget {pixel_budget} holds no {step}x{step} bucket (step {step})")
    if max_aspect < 1:
        raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")
    candidates = []
    for h in range(step, pixel_budget // step + 1, step):
        w_budget = pixel_budget // h // step * step
        w_aspect = int(math.floor(h * max_aspect * (1 + _EPS) / step)) * step
        w = min(w_budget, w_aspect)
        if w >= step and _within_aspect(h, w, max_aspect):
            candidates.append((h, w))
    # keep the Pareto frontier: heights ascend, so a bucket is contained in a later one iff some later
    # bucket is at least as wide
    frontier, widest_after = [], 0
    for h, w in reversed(candidates):
        if w > widest_after:
            frontier.append((h, w))
            widest_after = w
    side = math.isqrt(pixel_budget) // step * step
    buckets = set(frontier) | {(side, side)}
    return sorted(buckets, key=_sort_key)


def _parse_one(item: Any) -> tuple[int, int]:
    if isinstance(item, str):
        parts = item.lower().replace(",", "x").split("x")
        if len(parts) != 2:
            raise ValueError(f"bucket '{item}': expected 'HxW' or 'H,W'")
        item = parts
    if not isinstance(item, (Sequence, np.ndarray)) or len(item) != 2:
        raise ValueError(f"bucket {item!r}: expected a (height, width) pair")
    try:
        h, w = (int(str(v).strip()) for v in item)
    except ValueError as e:
        raise ValueError(f"bucket {item!r}: sides must be integers") from e
    return h, w


def parse_buckets(buckets: str | Sequence[Any], step: int, pixel_budget: int | None = None,
                  max_aspect: float | None = None) -> list[tuple[int, int]]:
    """An explicit bucket list from a recipe, validated and sorted like :func:`make_buckets`.

    ``buckets`` is diffusers' string format ``"h,w;h,w"`` (parsed by ``parse_buckets_string``), or a list
    of ``[h, w]`` pairs or ``"HxW"`` strings. Every side must be a positive multiple of ``step``; duplicates
    are an error; ``pixel_budget`` / ``max_aspect``, when given, are checked too (an explicit list
    otherwise overrides them).
    """
    if isinstance(buckets, str):
        from diffusers.training_utils import parse_buckets_string

        with warnings.catch_warnings():  # its "not divisible by 8" warning: we check against step below
            warnings.simplefilter("ignore")
            pairs = parse_buckets_string(buckets)
    else:
        pairs = [_parse_one(b) for b in buckets]
    if not pairs:
        raise ValueError("the bucket list is empty")
    seen: set[tuple[int, int]] = set()
    for h, w in pairs:
        if h <= 0 or w <= 0:
            raise ValueError(f"bucket {h}x{w}: sides must be positive")
        if h % step or w % step:
            raise ValueError(f"bucket {h}x{w}: sides must be multiples of {step} (the bucket step)")
        if pixel_budget is not None and h * w > pixel_budget:
            raise ValueError(f"bucket {h}x{w}: {h * w} pixels exceed the pixel budget {pixel_budget}")
        if max_aspect is not None and not _within_aspect(h, w, max_aspect):
            raise ValueError(f"bucket {h}x{w}: aspect {max(h, w) / min(h, w):.3g} exceeds max_aspect {max_aspect}")
        if (h, w) in seen:
            raise ValueError(f"bucket {h}x{w} is listed twice")
        seen.add((h, w))
    return sorted(seen, key=_sort_key)


def bucket_key(bucket_hw: Sequence[int]) -> str:
    """``"HxW"``, the bucket's name in reports."""
    return f"{int(bucket_hw[0])}x{int(bucket_hw[1])}"


# ------------------------------------------------------------------------------------------ assignment


def upscale_needed(size_hw: Sequence[int], bucket_hw: Sequence[int]) -> float:
    """The scale factor that makes an image of ``size_hw`` cover ``bucket_hw`` (> 1 means upscaling)."""
    h, w = size_hw
    bh, bw = bucket_hw
    if h <= 0 or w <= 0:
        raise ValueError(f"image size {h}x{w}: sides must be positive")
    return max(bh / h, bw / w)


def cover_size(size_hw: Sequence[int], bucket_hw: Sequence[int]) -> tuple[int, int]:
    """The (height, width) an image is resized to before cropping to ``bucket_hw``: aspect preserved
    (to rounding), both sides >= the bucket's, one side equal to it."""
    h, w = size_hw
    bh, bw = bucket_hw
    s = upscale_needed(size_hw, bucket_hw)
    return max(bh, round(h * s)), max(bw, round(w * s))


def assign(size_hw: Sequence[int], buckets: Sequence[Sequence[int]], max_upscale: float = 1.0) -> int | None:
    """The index of the bucket for an image of ``size_hw`` (height, width), or None to drop it.

    The *aspect class* of an image is the set of buckets nearest to its aspect ratio in
    ``|log(h / w) - log(bh / bw)|`` (ties included: several sizes of one aspect in an explicit list, or two
    aspects equally far). Of that class the largest bucket (by area, then lowest index) that the image can
    cover with an upscale of at most ``max_upscale`` is chosen; None when no bucket of the class qualifies.

    Why drop rather than upscale more, or fall back to another aspect: upscaling past ``max_upscale`` trains
    the model on interpolation blur at full weight; a bucket of another aspect crops away content that the
    caption may describe (a subject at the edge), and with buckets built by :func:`make_buckets` all buckets
    have about the same area, so an image too small for its own bucket is too small for nearly all of them.
    A smaller bucket *of the same aspect* (an explicit multi-resolution list) keeps the framing and is used.
    Dropped images are counted in :func:`bucket_report`. Images beyond ``max_aspect`` go to the most extreme
    bucket and lose the excess by cropping.
    """
    if not buckets:
        raise ValueError("no buckets")
    h, w = size_hw
    if h <= 0 or w <= 0:
        raise ValueError(f"image size {h}x{w}: sides must be positive")
    log_ar = math.log(h / w)
    dist = [abs(log_ar - math.log(bh / bw)) for bh, bw in buckets]
    nearest = min(dist)
    best, best_area = None, -1
    for i, (bh, bw) in enumerate(buckets):
        if dist[i] > nearest + _EPS:
            continue
        if upscale_needed(size_hw, (bh, bw)) > max_upscale * (1 + _EPS):
            continue
        if bh * bw > best_area:
            best, best_area = i, bh * bw
    return best


# ------------------------------------------------------------------------------------------- transform


class CoverResize(v2.Transform):
    """Resize (antialiased) so the image covers ``bucket_hw``: aspect preserved, one side equal to the
    bucket's, the other >= (see :func:`cover_size`). The size depends on the input, so it is computed per
    call; all inputs of one call must have one size."""

    def __init__(self, bucket_hw: Sequence[int]):
        super().__init__()
        self.bucket_hw = (int(bucket_hw[0]), int(bucket_hw[1]))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        sizes = {tuple(F.get_size(x)) for x in flat_inputs if isinstance(x, (torch.Tensor, PIL.Image.Image))}
        if len(sizes) != 1:
            raise ValueError(f"CoverResize needs inputs of one size, got {sorted(sizes)}")
        return {"size": list(cover_size(sizes.pop(), self.bucket_hw))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.resize(inpt, params["size"], antialias=True)


def bucket_transform(bucket_hw: Sequence[int], random_flip: bool = False, center_crop: bool = True) -> v2.Compose:
    """PIL (or tensor) image -> float CHW tensor of exactly ``bucket_hw`` in [-1, 1]: resize to cover
    (:class:`CoverResize`), centre (or random) crop, optional horizontal flip, normalised like
    :func:`ldm_lab.data.transforms.image_transform`."""
    size = [int(bucket_hw[0]), int(bucket_hw[1])]
    ops = [v2.ToImage(), CoverResize(size), v2.CenterCrop(size) if center_crop else v2.RandomCrop(size)]
    if random_flip:
        ops.append(v2.RandomHorizontalFlip())
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5], [0.5])]
    return v2.Compose(ops)


# --------------------------------------------------------------------------------------------- sampler


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


# ---------------------------------------------------------------------------------------------- report


def bucket_report(bucket_of_row: Sequence[int | None], buckets: Sequence[Sequence[int]], batch_size: int,
                  dropped: Mapping[str, Sequence[str]] | None = None, drop_last: bool = True) -> dict:
    """Per-bucket counts for RUN/buckets.json (JSON-serialisable).

    ``buckets``: ``{"HxW": {index, height, width, rows, batches, leftover}}`` for the buckets that hold rows
    (``leftover``: rows not seen in an epoch with drop_last; with drop_last=False it is 0 and ``padded``
    gives the rows drawn twice), in bucket order; ``unused_buckets``: the names of the empty ones;
    ``small_buckets``: buckets with fewer rows than one batch, each also in ``warnings``; ``dropped``:
    ``{reason: {count, examples}}`` from ``dropped`` (reason -> paths/keys), and ``skipped_rows``: rows
    with bucket -1/None. Counts are per epoch of one process's view (the sampler's ``len``).
    """
    n = len(buckets)
    counts = [0] * n
    skipped = 0
    for b in bucket_of_row:
        if b is None or b < 0:
            skipped += 1
        elif b >= n:
            raise ValueError(f"bucket index {b} out of range for {n} buckets")
        else:
            counts[int(b)] += 1
    per: dict[str, dict[str, int]] = {}
    unused: list[str] = []
    small: list[str] = []
    warns: list[str] = []
    for i, (h, w) in enumerate(buckets):
        key, c = bucket_key((h, w)), counts[i]
        if c == 0:
            unused.append(key)
            continue
        full, rest = divmod(c, batch_size)
        entry = {"index": i, "height": int(h), "width": int(w), "rows": c}
        if drop_last:
            entry |= {"batches": full, "leftover": rest}
        else:
            entry |= {"batches": full + (rest > 0), "leftover": 0, "padded": (batch_size - rest) % batch_size}
        per[key] = entry
        if c < batch_size:
            small.append(key)
            fate = ("its rows are never trained on (drop_last)" if drop_last
                    else f"its one batch repeats rows to fill {batch_size}")
            warns.append(f"bucket {key} has {c} row{'s' * (c != 1)}, fewer than one batch of {batch_size}: {fate}")
    leftover = sum(e["leftover"] for e in per.values())
    rows = sum(counts)
    if drop_last and leftover:
        warns.append(f"{leftover} of {rows} rows ({100 * leftover / max(rows, 1):.1f}%) are left out of each epoch "
                     "(the last short batch of each bucket: a new draw every epoch, except in buckets smaller "
                     "than a batch)")
    drops = {reason: {"count": len(items), "examples": [str(x) for x in list(items)[:_EXAMPLES]]}
             for reason, items in (dropped or {}).items()}
    return {
        "batch_size": int(batch_size),
        "drop_last": bool(drop_last),
        "rows": rows,
        "batches_per_epoch": sum(e["batches"] for e in per.values()),
        "rows_per_epoch": sum(e["batches"] for e in per.values()) * batch_size,
        "leftover_rows": leftover,
        "buckets": per,
        "unused_buckets": unused,
        "small_buckets": small,
        "skipped_rows": skipped,
        "dropped": drops,
        "dropped_total": sum(d["count"] for d in drops.values()),
        "warnings": warns,
    }


def format_report(report: Mapping[str, Any]) -> str:
    """A short human table of :func:`bucket_report`; the first line is a one-line summary for the log."""
    per = report["buckets"]
    mode = "drop_last" if report["drop_last"] else "pad last"
    lines = [
        f"buckets: {len(per)} used of {len(per) + len(report['unused_buckets'])}, {report['rows']} rows, "
        f"{report['batches_per_epoch']} batches/epoch (batch {report['batch_size']}, {mode}), "
        f"{report['leftover_rows']} rows left over per epoch, {report['dropped_total']} images dropped"
    ]
    if per:
        lines.append(f"  {'HxW':>11} {'h/w':>5} {'rows':>7} {'batches':>7} {'leftover':>8}")
        for key, e in per.items():
            lines.append(f"  {key:>11} {e['height'] / e['width']:>5.2f} {e['rows']:>7} {e['batches']:>7} "
                         f"{e['leftover']:>8}{'  < one batch' if key in report['small_buckets'] else ''}")
    for reason, d in report["dropped"].items():
        more = ", ..." if d["count"] > len(d["examples"]) else ""
        lines.append(f"  dropped ({reason}): {d['count']}" + (f", e.g. {', '.join(d['examples'])}{more}"
                                                              if d["examples"] else ""))
    if report.get("skipped_rows"):
        lines.append(f"  rows without a bucket: {report['skipped_rows']}")
    lines += [f"  warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)
