"""Aspect-ratio bucketing: bucket sets and the assignment of an image to its bucket.

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

The per-bucket transform is in :mod:`ldm_lab.data.bucket_transforms`, the one-bucket batch sampler in
:mod:`ldm_lab.data.bucket_sampler` and the per-bucket counts in :mod:`ldm_lab.data.bucket_report`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "assign",
    "bucket_key",
    "cover_size",
    "make_buckets",
    "parse_buckets",
    "upscale_needed",
]

_EPS = 1e-9


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
        # diffusers is slow to import and only a string bucket list needs it: imported here
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

