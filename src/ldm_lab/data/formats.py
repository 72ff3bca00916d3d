"""Loading one source in its own format, as datasets gives it (all columns, original names):

- ``shapes``: the built-in shapes world, generated once under ``data.cache_dir``.
- ``imagefolder``: ``load_dataset("imagefolder", data_dir=path)``.
- ``hub``: ``load_dataset(path, split=split)``: a hub id or a local dataset dir.
- ``parquet``: ``load_dataset("parquet", data_files=...)``; ``path`` is a file, a dir (every
  ``*.parquet`` under it) or a glob.
- ``arrow``: a dir written by ``Dataset.save_to_disk`` (``load_from_disk``; a ``DatasetDict`` dir
  gives ``split``), or ``.arrow`` file(s), a dir of them or a glob (``load_dataset("arrow")``).
- ``webdataset``: LAION-style tar shards (``KEY.jpg`` + ``KEY.txt`` and/or ``KEY.json``) read by
  datasets' packaged ``webdataset`` builder; ``path`` is a tar, a dir of tars or a glob, and brace
  patterns (``shard-{000..009}.tar``, ``{a,b}.tar``) are expanded. When ``image_column`` is the
  default ``image`` and absent, the first of jpg/jpeg/png/webp is used; when ``caption_column`` is
  the default ``text`` and absent, ``txt`` is used, else the ``caption`` (or ``text``) field of the
  ``json`` column. The builder infers the fields from the *first* shard only (a later shard's other
  fields are silently dropped as None), so shards of one source must hold the same fields: the
  first and the last shard are compared and a difference is a UserError (list such shards as
  separate ``data.mix`` members instead).

Paths name a file, a dir, a glob or brace patterns of those; the user's mistakes (no such path or
split, files with different columns, ...) are UserErrors that name the recipe key to fix.
"""

from __future__ import annotations

import glob
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import datasets

from ..errors import UserError
from ..recipe import looks_local
from ..recipe.schema import DataSpec
from .shapes_source import _shapes_rows, materialize_shapes

FILE_EXTS = {"parquet": (".parquet",), "arrow": (".arrow",), "webdataset": (".tar", ".tgz", ".tar.gz")}

Rows = datasets.Dataset | datasets.IterableDataset


# ---------------------------------------------------------------------------------------------
# paths


_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion: ``a-{000..002}.tar`` -> a-000.tar, a-001.tar, a-002.tar
    (zero padding kept), ``{a,b}.tar`` -> a.tar, b.tar; several braces multiply."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        a, b = rng.groups()
        padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-").startswith("0") for x in (a, b))
        width = max(len(a), len(b)) if padded else 0
        step = 1 if int(b) >= int(a) else -1
        items = [str(i).zfill(width) for i in range(int(a), int(b) + step, step)]
    elif "," in body:
        items = body.split(",")
    else:  # a literal "{x}": keep it and expand what follows
        return [head + m.group(0) + rest for rest in expand_braces(tail)]
    return [out for item in items for out in expand_braces(head + item + tail)]


def _is_remote(path: str) -> bool:
    return "://" in path


def _data_files(path: str, source: str, where: str) -> list[str]:
    """The files ``path`` names: a file, a dir (files with the source's extensions under it,
    hidden ones skipped), a glob, or brace patterns of those. Remote URLs pass through (datasets
    resolves their globs)."""
    exts = FILE_EXTS[source]
    if _is_remote(path):
        return expand_braces(path)
    files: list[str] = []
    for pat in expand_braces(path):
        p = Path(pat).expanduser()
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*")
                if f.is_file() and f.name.endswith(exts) and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            if not found:
                raise UserError(f"{where}.path '{path}': the directory '{pat}' holds no {'/'.join(exts)} files; "
                                  f"point {where}.path at a directory of {source} files, a file or a glob.")
            files += [str(f) for f in found]
        elif p.is_file():
            files.append(str(p))
        elif glob.has_magic(pat):
            found = sorted(f for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
            if not found:
                raise UserError(f"{where}.path '{path}': the pattern '{pat}' matches no files; "
                                  f"check {where}.path.")
            files += found
        else:
            raise UserError(f"{where}.path '{path}': '{pat}' does not exist; "
                              f"give an existing {source} file, a directory of them or a glob.")
    return list(dict.fromkeys(files))


def _split_key(split: str) -> str:
    """The split name without a slice (``train[:10%]`` -> ``train``), for ``data_files``."""
    return split.split("[", 1)[0] or "train"


# ---------------------------------------------------------------------------------------------
# loading one source


@dataclass
class _Source:
    source: str
    path: str | None
    split: str
    image_column: str
    caption_column: str
    where: str  # "data" or "data.mix[i]", for messages
    wds_defaults: tuple[bool, bool]  # (image, caption): may fall back to the webdataset names


def _load_dataset(src: _Source, *args, **kwargs):
    """``datasets.load_dataset`` with the user's mistakes turned into RecipeErrors."""
    try:
        return datasets.load_dataset(*args, **kwargs)
    except datasets.exceptions.DatasetNotFoundError as e:
        raise UserError(f"{src.where}.path '{src.path}' is neither a local dataset nor a hub dataset that can be "
                          f"reached ({str(e).splitlines()[0]}); check {src.where}.path.") from None
    except ConnectionError as e:
        raise UserError(f"{src.where}.path '{src.path}' is not a local dataset and the hub cannot be reached "
                          f"({str(e).splitlines()[0]}); give a local dataset directory, or allow network access "
                          "(unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE).") from None
    except datasets.data_files.EmptyDatasetError as e:
        raise UserError(f"{src.where}.path '{src.path}' holds no images or data files ({str(e).splitlines()[0]}); "
                        f"check {src.where}.path.") from None
    except datasets.exceptions.DataFilesNotFoundError as e:
        raise UserError(f"{src.where}.path '{src.path}' holds no data files datasets can read "
                          f"({str(e).splitlines()[0]}); check {src.where}.path.") from None
    except datasets.exceptions.DatasetGenerationCastError as e:
        raise UserError(f"{src.where}.path '{src.path}': the files do not share one set of columns "
                          f"({str(e).splitlines()[0]}); give files with the same columns, or list them as "
                          "separate data.mix members.") from None
    except ValueError as e:
        msg = str(e)
        if msg.startswith(("Unknown split", "Bad split")):
            raise UserError(f"{src.where}.split '{src.split}' does not exist in '{src.path}' ({msg}); "
                              f"set {src.where}.split to one of its splits.") from None
        raise


def _check_metadata_lines(root: Path) -> None:
    """Each line of an imagefolder's metadata.jsonl is one JSON object; the first that is not is
    named with its file and line (datasets' own error names neither)."""
    for meta in sorted(root.rglob("metadata.jsonl")):
        with open(meta, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    ok = isinstance(json.loads(line), dict)
                except ValueError as e:
                    raise UserError(f"{meta} line {n} is not valid JSON ({e.args[0][:80]}); fix or remove that "
                                    "line (one JSON object per line, with file_name).") from None
                if not ok:
                    raise UserError(f"{meta} line {n} is not a JSON object; write one object per line, with file_name.")


def _to_iterable(ds: datasets.Dataset, spec: DataSpec, world_size: int) -> datasets.IterableDataset:
    """A map-style dataset as an IterableDataset with enough shards to split across processes
    (and DataLoader workers) without every process reading every row."""
    want = max(len(ds.cache_files), world_size * max(1, spec.num_workers))
    want = math.ceil(want / world_size) * world_size
    return ds.to_iterable_dataset(num_shards=max(1, min(want, len(ds))))


def _load_source(spec: DataSpec, src: _Source, streaming: bool, world_size: int) -> Rows:
    """The source's rows as datasets gives them (all columns, original names)."""
    if src.source == "shapes":
        ds = _shapes_rows(materialize_shapes(spec))
        return _to_iterable(ds, spec, world_size) if streaming else ds
    assert src.path is not None  # the schema requires a path for every other source
    path = src.path
    if src.source == "imagefolder":
        if not Path(path).expanduser().is_dir():
            raise UserError(f"{src.where}.path '{path}' is not a directory; give an imagefolder directory.")
        _check_metadata_lines(Path(path).expanduser())
        return _load_dataset(src, "imagefolder", data_dir=str(Path(path).expanduser()), split=src.split,
                             streaming=streaming)
    if src.source == "hub":
        local = Path(path).expanduser()
        if looks_local(path) and not local.exists():
            raise UserError(f"{src.where}.path '{path}' does not exist; give a local dataset directory or a hub "
                              "dataset id (org/name).")
        return _load_dataset(src, str(local) if local.exists() else path, split=src.split, streaming=streaming)
    if src.source == "arrow" and not _is_remote(path) and Path(path).expanduser().is_dir():
        root = Path(path).expanduser()
        if (root / "dataset_dict.json").exists():
            dd = datasets.load_from_disk(str(root))
            if _split_key(src.split) not in dd:
                raise UserError(f"{src.where}.split '{src.split}' is not in '{path}' (splits: {', '.join(dd)}); "
                                  f"set {src.where}.split to one of them.")
            ds = dd[_split_key(src.split)]
            return _to_iterable(ds, spec, world_size) if streaming else ds
        if (root / "state.json").exists():
            ds = datasets.load_from_disk(str(root))
            return _to_iterable(ds, spec, world_size) if streaming else ds
    files = _data_files(path, src.source, src.where)
    if src.source == "webdataset" and len(files) > 1 and not _is_remote(path):
        _check_same_fields(src, files)
    return _load_dataset(src, src.source, data_files={_split_key(src.split): files}, split=src.split,
                         streaming=streaming)


def _check_same_fields(src: _Source, files: list[str]) -> None:
    """datasets' webdataset builder takes the fields of the first shard for all of them (a later
    shard's other fields come out as None): compare the first and the last shard."""
    def fields(f: str) -> list[str]:
        ds = datasets.load_dataset("webdataset", data_files={"train": [f]}, split="train", streaming=True)
        return sorted(k for k in (ds.features or {}) if not k.startswith("__"))

    first, last = fields(files[0]), fields(files[-1])
    if first != last:
        raise UserError(f"{src.where}.path '{src.path}': the shards do not hold the same fields ('{files[0]}' has "
                          f"{', '.join(first)}; '{files[-1]}' has {', '.join(last)}), and datasets reads every shard "
                          "with the first one's fields; list such shards as separate data.mix members.")

