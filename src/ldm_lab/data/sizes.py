"""Image sizes from the file headers only (no decoding): (height, width) of an undecoded image
value, and of every row of a dataset as a cached ``datasets`` map, so that rows can be assigned to
aspect-ratio buckets without decoding their images."""

from __future__ import annotations

import io
from typing import Any

import datasets
from PIL import Image


def image_size(value: Any) -> tuple[int, int] | None:
    """(height, width) of an undecoded image value (``{"path", "bytes"}`` or a path), read from
    the file header only; None when it cannot be read."""
    try:
        if isinstance(value, dict):
            src = io.BytesIO(value["bytes"]) if value.get("bytes") else value.get("path")
        else:
            src = value
        with Image.open(src) as im:
            w, h = im.size
            if (im.getexif() or {}).get(0x0112, 1) in (5, 6, 7, 8):  # EXIF-rotated by a quarter turn
                w, h = h, w
        return h, w
    except Exception:  # noqa: BLE001
        return None


def _sizes_batch(batch: dict, image_column: str) -> dict:
    hw = [image_size(v) or (-1, -1) for v in batch[image_column]]
    return {"height": [h for h, _ in hw], "width": [w for _, w in hw]}


def image_sizes(ds: datasets.Dataset, image_column: str, num_proc: int | None = None) -> list[tuple[int, int] | None]:
    """(height, width) of every row's image, from the file headers only (no decoding), as a
    ``datasets`` map: cached on disk for file-backed datasets (a second run and the other ranks
    read it back) and spread over ``num_proc`` processes. None where the header cannot be read."""
    raw = ds.select_columns([image_column])
    if isinstance(raw.features[image_column], datasets.Image):
        raw = raw.cast_column(image_column, datasets.Image(decode=False))
    out = raw.map(_sizes_batch, batched=True, batch_size=256, remove_columns=[image_column], num_proc=num_proc,
                  features=datasets.Features({"height": datasets.Value("int64"), "width": datasets.Value("int64")}),
                  fn_kwargs={"image_column": image_column}, desc="reading image sizes")
    return [(h, w) if h > 0 else None for h, w in zip(out["height"], out["width"])]
