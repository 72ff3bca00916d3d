"""Bad rows of a streaming dataset skipped lazily, at iteration time, and counted.

* :func:`safe_rows` applies the row checks of :mod:`ldm_lab.data.checks` as a lazy filter (or map)
  over a streaming ``datasets.IterableDataset``, with duplicates judged within a bounded window.
* Its :class:`SkipCounter` can be read while or after the stream is consumed, also across
  DataLoader worker processes; its report has the shape of :mod:`ldm_lab.data.skip_report`.
"""

from __future__ import annotations

import hashlib
import multiprocessing
from collections import OrderedDict
from typing import Any

import datasets

from .checks import _Bad, _caption_empty, _decode, _read, _StrictLoading
from .skip_report import MAX_EXAMPLES, REASONS, _new_report, require_rows


class SkipCounter:
    """What :func:`safe_rows` skipped so far, as a report shaped like :func:`check_rows`'s
    (``counter.report()``; ``summary(counter.report())`` logs it).

    The counts live in shared memory, so rows checked in DataLoader worker processes (forked, or
    spawned with the dataset) are counted in the process that made the counter; the examples are
    kept by the process that saw them. Each distributed rank has its own counter: sum them
    (e.g. ``accelerator.gather``) for a global figure."""

    _FIELDS = ("rows", "kept", *REASONS)

    def __init__(self) -> None:
        try:
            self._shared = multiprocessing.Array("q", len(self._FIELDS))
        except Exception:  # no shared memory here: count in this process only
            self._shared = None
        self._local = [0] * len(self._FIELDS)
        self.examples: dict[str, list[dict]] = {r: [] for r in REASONS}

    def _values(self) -> list[int]:
        return list(self._shared[:]) if self._shared is not None else list(self._local)

    def _add(self, field: str, n: int = 1) -> None:
        i = self._FIELDS.index(field)
        if self._shared is not None:
            with self._shared.get_lock():
                self._shared[i] += n
        else:
            self._local[i] += n

    def seen(self, kept: bool) -> None:
        self._add("rows")
        if kept:
            self._add("kept")

    def skip(self, reason: str, row: int, path: str | None, error: str) -> None:
        self._add("rows")
        self._add(reason)
        if len(self.examples[reason]) < MAX_EXAMPLES:
            self.examples[reason].append({"row": row, "path": path, "error": error})

    def report(self) -> dict:
        vals = dict(zip(self._FIELDS, self._values()))
        rep = _new_report(vals["rows"])
        rep["kept"] = vals["kept"]
        rep["skipped"] = {r: vals[r] for r in REASONS}
        rep["examples"] = {r: list(v) for r, v in self.examples.items()}
        return rep

    # datasets deep-copies ex-iterables (interleave, concatenate): keep counting into this one
    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __getstate__(self):
        state = self.__dict__.copy()
        try:  # shared memory travels only while a process is being spawned
            multiprocessing.context.assert_spawning(self)
        except RuntimeError:
            state["_local"], state["_shared"] = self._values(), None
        return state


class _StreamCheck:
    """The batched (batch_size=1) map / filter function of :func:`safe_rows`."""

    def __init__(self, image_column: str, caption_column: str, min_size: int, skip_empty_captions: bool,
                 recent_duplicates: int, give_up_after: int | None, counter: SkipCounter, replace: bool):
        self.image_column, self.caption_column = image_column, caption_column
        self.min_size, self.skip_empty_captions = min_size, skip_empty_captions
        self.recent_duplicates, self.give_up_after = recent_duplicates, give_up_after
        self.counter, self.replace = counter, replace
        self.recent: OrderedDict[str, int] = OrderedDict()
        self.row = self.kept = 0  # rows seen / kept by this process

    def __deepcopy__(self, memo):
        return self

    def check(self, image: Any, caption: Any) -> dict | None:
        """None for a row to skip; else the image cell to pass on (bytes read once)."""
        row, self.row = self.row, self.row + 1
        path = None
        try:
            with _StrictLoading():
                data, im, path = _read(image)
                _decode(data, im, self.min_size)
            if self.skip_empty_captions and _caption_empty(caption):
                raise _Bad("empty_caption", "caption is missing" if caption is None else "caption is empty")
            if self.recent_duplicates:
                digest = hashlib.sha1(data if data is not None else im.tobytes()).hexdigest()
                if digest in self.recent:
                    raise _Bad("duplicate", f"same image bytes as row {self.recent[digest]} of this stream")
                self.recent[digest] = row
                if len(self.recent) > self.recent_duplicates:
                    self.recent.popitem(last=False)
        except _Bad as bad:
            self.counter.skip(bad.reason, row, path, str(bad))
            if self.give_up_after and not self.kept and self.row >= self.give_up_after:
                require_rows(self.counter.report() | {"kept": 0, "min_size": self.min_size})
            return None
        self.counter.seen(kept=True)
        self.kept += 1
        return {"bytes": data, "path": path} if self.replace and data is not None else image

    def __call__(self, batch: dict) -> Any:
        if not self.replace:  # filter: keep the row as it is
            return [self.check(i, c) is not None for i, c in zip(batch[self.image_column], batch[self.caption_column])]
        keep, cells = [], []
        for k, (image, caption) in enumerate(zip(batch[self.image_column], batch[self.caption_column])):
            cell = self.check(image, caption)
            if cell is not None:
                keep.append(k)
                cells.append(cell)
        out = {col: [vals[k] for k in keep] for col, vals in batch.items()}
        out[self.image_column] = cells
        return out


def safe_rows(ds: datasets.IterableDataset, image_column: str, caption_column: str, min_size: int = 0,
              skip_empty_captions: bool = True, recent_duplicates: int = 0, give_up_after: int | None = 1000,
              counter: SkipCounter | None = None) -> tuple[datasets.IterableDataset, SkipCounter]:
    """A streaming dataset that skips bad rows lazily, at iteration time, and counts them in the
    returned :class:`SkipCounter`. Same reasons as :func:`check_rows`; duplicates only within a
    bounded window: ``recent_duplicates=N`` drops an image whose bytes equal one of the last N
    kept in this process (0, the default: no duplicate check). ``give_up_after``: raise
    ``UserError`` when this process has seen that many rows and kept none.

    An ``Image()`` column is checked from its raw bytes and passed on as those bytes, so it is
    read (downloaded) once and decoded by datasets as before; the rows keep their features."""
    counter = counter or SkipCounter()
    feature = ds.features[image_column] if ds.features is not None and image_column in ds.features else None
    replace = isinstance(feature, datasets.Image)
    fn = _StreamCheck(image_column, caption_column, int(min_size), bool(skip_empty_captions),
                      int(recent_duplicates), give_up_after, counter, replace)
    if not replace:
        return ds.filter(fn, batched=True, batch_size=1), counter
    raw = ds.cast_column(image_column, datasets.Image(decode=False))
    # no ``features=`` here: a typed map is not decoded again, so the features come back by ``cast``
    out = raw.map(fn, batched=True, batch_size=1, remove_columns=raw.column_names)
    return out.cast(ds.features), counter
