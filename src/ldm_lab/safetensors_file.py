"""``save_file`` whose bytes depend only on the tensors and the metadata.

safetensors (0.8.0, and every release since the metadata became a Rust ``HashMap``) writes the
``__metadata__`` entries in a per-process random order (safetensors issue #584, fix proposed in
PR #790), so one adapter saved twice gives two files with different sha256 although every tensor
and every metadata value is the same. We let the library write the file, then rewrite only its
header with the metadata entries in sorted order: the same keys and values in another order have
the same length, so the data section does not move and the header keeps the library's padding.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file as _save_file


def sorted_header(raw: bytes) -> bytes:
    """A safetensors header (the JSON after the length, padding included) with its metadata entries
    in sorted order, written as the library writes JSON (compact, UTF-8) and padded to the same
    length. ``raw`` itself when that is impossible (never seen: the same JSON in another order)."""
    header = json.loads(raw)
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    new = text + b" " * (len(raw) - len(text))
    return new if len(new) == len(raw) and json.loads(new) == json.loads(raw) else raw


def sort_metadata(path: str | Path) -> None:
    """Rewrite the header of the safetensors file at ``path`` in place with its metadata sorted."""
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        new = sorted_header(raw)
        if new != raw:
            f.seek(8)
            f.write(new)


def save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` with the metadata entries in sorted order (reproducible bytes)."""
    _save_file(tensors, str(path), metadata=metadata)
    if metadata and len(metadata) > 1:
        sort_metadata(path)
