"""Caption embeddings of a latent cache, read per row from their files.

A cache part stores each text encoder's conditioning record as ``.npy`` arrays, one per field:
``embeddings.npy`` (U, L, D) token states, ``pooled.npy`` (U, P), ``mask.npy`` (U, L) where the
encoder has one (several encoders: ``embeddings.0.npy``, ``pooled.0.npy``, ...). Training reads
only the rows of the captions a batch uses, one positioned read (``os.pread``) per row at the
offset numpy's header gives, so host and device memory do not grow with the number of distinct
captions (100k captions at SD 1.5 sizes are ~24 GB of states; a LAION-sized caption set is far
larger than any GPU). What was read stays in the OS page cache, which the kernel reclaims, not in
the process. Positioned reads rather than memory maps: on a host with 8 MB read-ahead, 384 random
rows read through a numpy memory map of 200,000 captions added 267 MB to the process's resident
memory (each fault maps a whole read-ahead folio); the same reads with ``pread`` add nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..components.record import Conditioning

FILES = {"states": "embeddings", "mask": "mask", "pooled": "pooled"}


def write_records(out: Path, records: list[Conditioning]) -> None:
    """Each encoder's record into ``out`` as one ``.npy`` file per field that is set."""
    for k, rec in enumerate(records):
        suffix = "" if len(records) == 1 else f".{k}"
        for name, t in rec.tensors().items():
            np.save(out / f"{FILES[name]}{suffix}.npy", t.detach().cpu().contiguous().numpy())


def encoder_count(part: Path) -> int:
    return 1 if (part / "embeddings.npy").exists() else len(list(part.glob("embeddings.*.npy")))


def _header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, offset of the data) of a ``.npy`` file, from numpy's own header reader."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if fortran:
            raise ValueError(f"{path} is stored in Fortran order; rebuild the cache")
        return shape, dtype, f.tell()


class _RowFile:
    """Rows of one ``.npy`` file, read one by one at their offsets."""

    def __init__(self, path: Path):
        self.shape, self.dtype, self.offset = _header(path)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.fd = os.open(path, os.O_RDONLY)

    def read(self, rows: np.ndarray, out: np.ndarray) -> None:
        for j, i in enumerate(rows):
            got = os.pread(self.fd, self.row_bytes, self.offset + int(i) * self.row_bytes)
            out[j] = np.frombuffer(got, dtype=self.dtype).reshape(self.shape[1:])

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)


class StoredRecords:
    """One text encoder's records over the parts of a cache, concatenated: ``store[index]`` is
    the Conditioning of those rows (torch tensors on the host, read from the files)."""

    def __init__(self, parts: list[Path], k: int, n_encoders: int):
        suffix = "" if n_encoders == 1 else f".{k}"
        self.files = [{f: p / f"{stem}{suffix}.npy" for f, stem in FILES.items() if (p / f"{stem}{suffix}.npy").exists()}
                      for p in parts]
        self.sizes = [_header(f["states"])[0][0] if "states" in f else 0 for f in self.files]
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self._maps: list[dict[str, _RowFile]] | None = None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _open(self) -> list[dict[str, _RowFile]]:
        if self._maps is None:  # opened per process (and DataLoader worker), never pickled
            self._maps = [{f: _RowFile(path) for f, path in files.items()} if n else {}
                          for files, n in zip(self.files, self.sizes)]
        return self._maps

    def __getstate__(self):
        return {**self.__dict__, "_maps": None}

    def __getitem__(self, index) -> Conditioning:
        """Rows ``index`` (an index tensor or array, a slice, or an int kept as one row)."""
        if isinstance(index, slice):
            index = np.arange(len(self))[index]
        elif isinstance(index, int):
            index = np.array([index])
        elif isinstance(index, torch.Tensor):
            index = index.detach().cpu().numpy()
        idx = np.asarray(index, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"caption rows {idx.min()}..{idx.max()} outside 0..{n - 1}")
        idx = np.where(idx < 0, idx + n, idx)
        maps = self._open()
        part = np.searchsorted(self.starts, idx, side="right") - 1
        template = next(m for m in maps if m)
        out: dict[str, np.ndarray] = {}
        for field, rf in template.items():
            got = np.empty((idx.size, *rf.shape[1:]), dtype=rf.dtype)
            for p in np.unique(part):
                sel = np.flatnonzero(part == p)
                block = np.empty((sel.size, *rf.shape[1:]), dtype=rf.dtype)
                maps[p][field].read(idx[sel] - self.starts[p], block)
                got[sel] = block
            out[field] = got
        t = {f: torch.from_numpy(a) for f, a in out.items()}
        return Conditioning(t["states"], t.get("mask"), t.get("pooled"))

    def all(self) -> Conditioning:
        """Every row in memory (small caches and tests only)."""
        return self[slice(None)]
