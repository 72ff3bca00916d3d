"""Caption augmentation that survives caching: every caption has a fixed list of variants (the
caption as written, then deterministic tag shuffles), the same in the cached and the on-the-fly
path; a training step picks one variant per row (with the trainer's BatchRNG).

A caption column may hold a list of strings (several captions per image): each of them is a
variant (and each is shuffled when tag shuffling is on). Missing captions become "" (the null
condition).
"""

from __future__ import annotations

import hashlib
import random


def caption_variants(caption, spec) -> list[str]:
    """The variants of ``caption`` (a string, a list of strings or None) under ``spec``
    (``data.captions``): distinct strings, the written caption(s) first."""
    written = [c for c in (caption if isinstance(caption, (list, tuple)) else [caption])]
    written = [str(c).strip() if c is not None else "" for c in written] or [""]
    out: list[str] = []
    for c in written:
        _add(out, c)
        if spec.shuffle_tags and spec.variants > 1:
            for k in range(1, spec.variants):
                _add(out, shuffle_tags(c, spec.separator, spec.keep_tags, k))
    return out


def shuffle_tags(caption: str, separator: str = ",", keep: int = 0, k: int = 1) -> str:
    """Tags of ``caption`` (split on ``separator``) with the first ``keep`` in place and the rest in
    the order of shuffle number ``k`` (seeded from the caption and ``k``, so the same everywhere)."""
    tags = [t.strip() for t in caption.split(separator) if t.strip()]
    head, rest = tags[:keep], tags[keep:]
    seed = int.from_bytes(hashlib.sha256(f"{k}\x00{caption}".encode()).digest()[:8], "big")
    random.Random(seed).shuffle(rest)
    return f"{separator} ".join(head + rest) if separator.strip() else separator.join(head + rest)


def _add(out: list[str], s: str) -> None:
    if s not in out:
        out.append(s)
