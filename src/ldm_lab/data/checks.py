"""Bad input never kills a long run: every row is checked before (or, streaming, while) it is used.

* :func:`to_rgb` turns any image a dataset may hold into correct 8-bit RGB (EXIF orientation applied,
  transparency composited on white, 16/32-bit and float greyscale scaled from their real range).
* :func:`check_rows` decodes every row's image once, without letting a bad one raise, and drops
  rows that are unreadable, too small, uncaptioned or duplicates; it returns the kept rows and a
  JSON-serialisable report (see :mod:`ldm_lab.data.skip_report`: ``summary`` makes it one log line,
  ``require_rows`` raises a :class:`~ldm_lab.errors.UserError` when nothing usable is left).
* The checks of one row are defined here too; :mod:`ldm_lab.data.stream_checks` applies them lazily
  to a streaming ``datasets.IterableDataset``.

Each skipped row is counted once, under the first reason that applies in the order
``unreadable``, ``too_small``, ``empty_caption``, ``duplicate``; duplicates are judged among the
rows that pass the other checks, so the first *usable* copy of an image is the one kept.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import datasets
import numpy as np
from datasets.utils.file_utils import xopen
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import UserError
from .skip_report import MAX_EXAMPLES, _label, _new_report, require_rows

_ORIENTATION = 0x0112
_WHITE = (255, 255, 255, 255)
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


# ----------------------------------------------------------------------------------------------
# to_rgb


def _exif_transpose(im: Image.Image) -> Image.Image:
    """``ImageOps.exif_transpose`` when the image has an orientation other than 1; a malformed EXIF
    block leaves the image as it is. Idempotent: the transposed image no longer carries the tag,
    so an image ``datasets`` already turned upright is not turned again."""
    try:
        if im.getexif().get(_ORIENTATION, 1) in (None, 1):
            return im
        return ImageOps.exif_transpose(im)
    except Exception:
        return im


def _on_white(rgba: Image.Image) -> Image.Image:
    return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")


def _wide_range(a: np.ndarray, mode: str) -> tuple[float, float]:
    """The range a 16/32-bit integer or float image's values come from: the full 16-bit range for
    I;16*; otherwise the smallest of [0, 1] (float only), [0, 255], [0, 65535] that holds every
    finite value, else the values' own min..max."""
    if mode.startswith("I;16"):
        return 0.0, 65535.0
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    if lo >= 0:
        if mode == "F" and hi <= 1:
            return 0.0, 1.0
        for top in (255.0, 65535.0):
            if hi <= top:
                return 0.0, top
    return lo, (hi if hi > lo else lo + 1.0)


def _wide_to_rgb(im: Image.Image) -> Image.Image:
    try:
        a = np.asarray(im)
    except Exception:  # a mode numpy cannot view directly (I;16S and the like)
        a = np.asarray(im.convert("I"))
    a = a.astype(np.float64)
    lo, hi = _wide_range(a, im.mode)
    scaled = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo)
    grey = np.rint(np.clip((scaled - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)
    out = Image.fromarray(grey, "L")
    key = im.info.get("transparency")
    if isinstance(key, (int, float)) and not isinstance(key, bool):  # PNG tRNS on 16-bit grey
        alpha = Image.fromarray(np.where(a == key, 0, 255).astype(np.uint8), "L")
        return _on_white(Image.merge("RGBA", (out, out, out, alpha)))
    return out.convert("RGB")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL image as correct 8-bit RGB: EXIF orientation first; RGBA/LA/PA/RGBa/La and
    P/L/RGB with a transparency key composited on white; I;16 (any byte order) scaled by 1/257;
    I and F scaled from the range their values come from (see ``_wide_range``); 1, L, P, CMYK,
    YCbCr, LAB, HSV through Pillow's conversions. 16-bit RGB(A) PNGs already open as 8-bit
    RGB(A). Returns ``im`` itself when it is upright RGB without transparency."""
    im = _exif_transpose(im)
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _wide_to_rgb(im)
    if mode in _ALPHA_MODES or "transparency" in im.info:
        src = im.convert("LA") if mode == "La" else im  # Pillow has no La -> RGBA conversion
        return _on_white(src.convert("RGBA"))
    return im.convert("RGB")


# ----------------------------------------------------------------------------------------------
# one row


class _Bad(Exception):
    """A row that cannot be used: ``reason`` is one of REASONS, ``str(self)`` says why."""

    def __init__(self, reason: str, text: str):
        super().__init__(text)
        self.reason = reason


def _error_text(e: BaseException) -> str:
    if isinstance(e, UnidentifiedImageError):
        return "not an image file Pillow can read"
    if isinstance(e, FileNotFoundError):
        return "file not found"
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _read(value: Any) -> tuple[bytes | None, Image.Image | None, str | None]:
    """(file bytes, an already-decoded image, path) of an image cell in any of the forms a column
    may hold: ``{"bytes", "path"}`` (the Image feature's storage), a path, raw bytes or a PIL
    image (a streaming dataset without features)."""
    if isinstance(value, Image.Image):
        return None, value, getattr(value, "filename", None) or None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), None, None
    if isinstance(value, str):
        data, path = None, value
    elif isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif value is None:
        raise _Bad("unreadable", "no image in this row")
    else:
        raise _Bad("unreadable", f"unsupported image value of type {type(value).__name__}")
    if data is not None:
        return bytes(data), None, path
    if not path:
        raise _Bad("unreadable", "no image in this row (neither bytes nor path)")
    try:
        if datasets.features.image.is_local_path(path):
            with open(path, "rb") as f:
                return f.read(), None, path
        with xopen(path, "rb") as f:
            return f.read(), None, path
    except Exception as e:
        raise _Bad("unreadable", _error_text(e)) from None


def _decode(data: bytes | None, im: Image.Image | None, min_size: int) -> None:
    """Open and fully decode the image (JPEGs at 1/8 scale: the whole entropy-coded stream is
    still read, so truncation is still found) and convert it with ``to_rgb``; raise ``_Bad``."""
    try:
        if im is None:
            if not data:
                raise _Bad("unreadable", "empty file (0 bytes)")
            im = Image.open(io.BytesIO(data))
            size = im.size
            im.draft(None, (1, 1))  # no-op for formats other than JPEG
            im.load()
        else:
            size = im.size
        to_rgb(im)
    except _Bad:
        raise
    except Exception as e:  # anything Pillow raises on a bad file; never KeyboardInterrupt
        raise _Bad("unreadable", _error_text(e)) from None
    if min_size and min(size) < min_size:
        raise _Bad("too_small", f"{size[0]}x{size[1]}, shorter side below {min_size}")


def _caption_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, (list, tuple)):
        return all(_caption_empty(v) for v in value)
    return False


def _check_one(image: Any, caption: Any, min_size: int, skip_empty_captions: bool) -> tuple[str | None, str]:
    """The sha1 of the image bytes (or pixels) and its path; raises ``_Bad`` for a row to skip."""
    data, im, path = _read(image)
    _decode(data, im, min_size)
    if skip_empty_captions and _caption_empty(caption):
        raise _Bad("empty_caption", "caption is missing" if caption is None else "caption is empty")
    if data is not None:
        digest = hashlib.sha1(data).hexdigest()
    else:
        digest = hashlib.sha1(f"{im.mode}{im.size}".encode() + im.tobytes()).hexdigest()
    return digest, path or ""


class _StrictLoading:
    """``ImageFile.LOAD_TRUNCATED_IMAGES = False`` inside, restored after."""

    def __enter__(self):
        self.was = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False

    def __exit__(self, *exc):
        ImageFile.LOAD_TRUNCATED_IMAGES = self.was


# ----------------------------------------------------------------------------------------------
# map-style datasets


_CHECK_FEATURES = datasets.Features({
    "row": datasets.Value("int64"), "reason": datasets.Value("string"), "error": datasets.Value("string"),
    "sha1": datasets.Value("string"), "path": datasets.Value("string"),
})


def _check_batch(batch: dict, indices: list[int], image_column: str, caption_column: str, min_size: int,
                 skip_empty_captions: bool) -> dict:
    """``datasets.Dataset.map`` function: one (row, reason, error, sha1, path) row per input row."""
    out: dict[str, list] = {k: [] for k in _CHECK_FEATURES}
    with _StrictLoading():
        for row, image, caption in zip(indices, batch[image_column], batch[caption_column]):
            path = image.get("path") if isinstance(image, dict) else image if isinstance(image, str) else None
            try:
                digest, path = _check_one(image, caption, min_size, skip_empty_captions)
                reason, error = "", ""
            except _Bad as bad:
                digest, reason, error = None, bad.reason, str(bad)
            for key, val in (("row", row), ("reason", reason), ("error", error), ("sha1", digest), ("path", path or None)):
                out[key].append(val)
    return out


def check_rows(ds: datasets.Dataset, image_column: str, caption_column: str, min_size: int = 0,
               skip_empty_captions: bool = True, drop_duplicates: bool = True, num_proc: int | None = None,
               require: bool = True) -> tuple[datasets.Dataset, dict]:
    """Decode every row's image once and drop the rows that cannot be used; return the kept rows
    (same columns and types as ``ds``) and a report::

        {"rows": N_in, "kept": N_out, "min_size": m,
         "skipped": {"unreadable": n, "too_small": n, "empty_caption": n, "duplicate": n},
         "examples": {reason: [{"row": i, "path": p or None, "error": text}, ...first 5], ...}}

    The decoding runs as ``ds.map(batched=True, with_indices=True)`` over the image column cast to
    ``Image(decode=False)``, so datasets caches it for file-backed datasets and ``num_proc``
    spreads it over processes. ``require``: raise ``UserError`` when no row is left."""
    for col, key in ((image_column, "image_column"), (caption_column, "caption_column")):
        if col not in ds.column_names:
            raise UserError(f"dataset has no column '{col}' (columns: {', '.join(ds.column_names)}); "
                              f"set data.{key}.")
    raw = ds.select_columns([image_column, caption_column])
    if isinstance(raw.features[image_column], datasets.Image):
        raw = raw.cast_column(image_column, datasets.Image(decode=False))
    checked = raw.map(
        _check_batch, batched=True, with_indices=True, batch_size=64, remove_columns=raw.column_names,
        features=_CHECK_FEATURES, num_proc=num_proc, desc="checking images",
        fn_kwargs={"image_column": image_column, "caption_column": caption_column, "min_size": int(min_size),
                   "skip_empty_captions": bool(skip_empty_captions)},
    )
    res = checked.to_dict()
    report = _new_report(len(ds))
    report["min_size"] = int(min_size)
    first: dict[str, int] = {}
    keep: list[int] = []
    paths = dict(zip(res["row"], res["path"]))
    for i, reason, error, digest, path in zip(res["row"], res["reason"], res["error"], res["sha1"], res["path"]):
        if not reason and drop_duplicates:
            if digest in first:
                j = first[digest]
                reason = "duplicate"
                error = f"same image bytes as row {j} ({_label({'row': j, 'path': paths[j]})})"
            else:
                first[digest] = i
        if not reason:
            keep.append(i)
            continue
        report["skipped"][reason] += 1
        if len(report["examples"][reason]) < MAX_EXAMPLES:
            report["examples"][reason].append({"row": i, "path": path, "error": error})
    report["kept"] = len(keep)
    if require:
        require_rows(report)
    kept = ds if len(keep) == len(ds) else ds.select(keep)
    return kept, report
