"""Where training rows come from. Every source ends up as a 🤗 ``datasets`` dataset with an image
column (a ``datasets.Image()`` feature) and a caption column, named by ``data.image_column`` /
``data.caption_column``:

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

Map-style (``data.streaming: false``) datasets are returned whole; accelerate's sampler shards
them across processes later. ``max_samples`` keeps the first rows.

Streaming (``data.streaming: true``; every source, ``shapes`` and ``save_to_disk`` dirs via
``Dataset.to_iterable_dataset``): ``load_dataset(..., streaming=True)`` gives an
``IterableDataset``; then ``take(max_samples)``, then ``datasets.distributed.split_dataset_by_node``
and ``shuffle(seed, buffer_size=shuffle_buffer)``. The split and the shuffle are lazy and applied
when iterating, the split outermost whatever the call order. When the dataset's number of shards
(files) is a multiple of ``world_size`` each process reads its own shards (processes may then get
different row counts: a training loop must not assume equal lengths); otherwise every process
reads everything and keeps one row in ``world_size`` (the same seed on every process, so the rows
are still disjoint). ``take`` comes before the split so that ``max_samples`` counts rows over all
processes, as in map-style (with the shard split each process takes its share from the start of
its own shards); it fixes the shard order, so with ``max_samples`` only the buffer shuffles. (At
the end of an iteration over interleaved parquet shards, datasets sleeps
``datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN`` = 5 s to let pyarrow threads finish.)

Mixes (``data.mix``): each member is loaded with its own source/path/split/columns (columns default
to ``data.image_column`` / ``data.caption_column``, with the webdataset defaults above), reduced to
the image and caption columns renamed to the top-level names, the image cast to ``Image()`` and the
caption to string (a list of strings stays a list of strings), so that features align. A member
with ``repeats: k`` is listed k times (``concatenate_datasets``; when streaming
``IterableDataset.repeat``, which repeats after the per-process split so processes stay disjoint).
If any member has a ``weight``, all must have one and the members are
``interleave_datasets(probabilities=normalised weights, seed=seed, stopping_strategy="all_exhausted")``:
each row draws a member by weight until every member has been drawn through whole, and a member
that runs out starts again (so light or small members are oversampled, and the length depends on
the weights); without weights the members are concatenated. Streaming mixes interleave (or
concatenate) the members' IterableDatasets and then split the result across processes: datasets
counts the shards of an interleave as the *smallest* member's shard count (of a concatenation, the
sum) and splits every member's shards when that is a multiple of ``world_size`` (a concatenation
may then give whole members to different processes), else one row in ``world_size``.
"""

from __future__ import annotations

import glob
import math
import re
from dataclasses import dataclass
from pathlib import Path

import datasets
from datasets.distributed import split_dataset_by_node

from ..errors import UserError
from ..recipe.schema import DataSpec
from . import shapes

CACHE_ROOT = Path("data/cache")
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
WDS_JSON_CAPTION_FIELDS = ("caption", "text")
FILE_EXTS = {"parquet": (".parquet",), "arrow": (".arrow",), "webdataset": (".tar", ".tgz", ".tar.gz")}

Rows = datasets.Dataset | datasets.IterableDataset


def shapes_world(spec: DataSpec) -> shapes.World:
    s = spec.shapes
    kw = {k: tuple(v) for k, v in (("colors", s.colors), ("shapes", s.shapes)) if v}
    world = shapes.World(resolution=s.resolution, **kw)
    world.holdout = tuple(p for p in world.holdout if p[0] in world.colors and p[1] in world.shapes)
    return world


def shapes_dir(spec: DataSpec) -> Path:
    s = spec.shapes
    root = Path(spec.cache_dir) if spec.cache_dir else CACHE_ROOT
    name = f"shapes-n{s.n}-s{s.seed}-r{s.resolution}"
    if s.colors or s.shapes:
        name += "-" + "-".join(s.colors or []) + ("--" + "-".join(s.shapes) if s.shapes else "")
    return root / name


def materialize_shapes(spec: DataSpec) -> Path:
    """Generate the shapes dataset the recipe names, once; later runs reuse it."""
    out = shapes_dir(spec)
    if not (out / "world.json").exists():
        world = shapes_world(spec)
        tmp = out.with_name(out.name + ".tmp")
        shapes.generate(tmp, spec.shapes.n, seed=spec.shapes.seed, world=world)
        tmp.rename(out)
    return out


def _shapes_rows(root: Path) -> datasets.Dataset:
    """The shapes imagefolder as a Dataset, built from its metadata.jsonl (the imagefolder
    loader's glob over tens of thousands of files takes minutes) and saved once as Arrow."""
    import json

    arrow = root / "arrow"
    if (arrow / "dataset_info.json").exists():
        return datasets.load_from_disk(str(arrow))
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    cols: dict[str, list] = {"image": [str(root / r["file_name"]) for r in rows]}
    for key in rows[0]:
        if key == "file_name":
            continue
        name = key[: -len("_file_name")] if key.endswith("_file_name") else key
        cols[name] = [str(root / r[key]) if key.endswith("_file_name") else r[key] for r in rows]
    ds = datasets.Dataset.from_dict(cols)
    for name in cols:
        if name == "image" or f"{name}_file_name" in rows[0]:
            ds = ds.cast_column(name, datasets.Image())
    tmp = root / "arrow.tmp"
    ds.save_to_disk(str(tmp))
    tmp.rename(arrow)
    return datasets.load_from_disk(str(arrow))


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
        return _load_dataset(src, "imagefolder", data_dir=str(Path(path).expanduser()), split=src.split,
                             streaming=streaming)
    if src.source == "hub":
        from ..recipe import looks_local

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


# ---------------------------------------------------------------------------------------------
# columns


def _features(ds: Rows) -> datasets.Features:
    if ds.features is None:  # an IterableDataset whose builder gives no features: peek at rows
        ds = ds._resolve_features()
    return ds.features


def _resolve_columns(ds: Rows, src: _Source) -> tuple[Rows, str, str, str | None]:
    """(ds with known features, image column, caption column, caption field of that column or None)."""
    if ds.features is None:  # an IterableDataset whose builder gives no features: peek at rows
        ds = ds._resolve_features()
    feats = ds.features
    cols = list(feats)
    img, cap, field = src.image_column, src.caption_column, None
    if src.source == "webdataset":
        if img not in cols and src.wds_defaults[0]:
            img = next((c for c in WDS_IMAGE_EXTS if c in cols), img)
        if cap not in cols and src.wds_defaults[1]:
            if "txt" in cols:
                cap = "txt"
            elif "json" in cols and isinstance(feats["json"], dict):
                field = next((f for f in WDS_JSON_CAPTION_FIELDS if f in feats["json"]), None)
                cap = "json" if field else cap
    for key, col in (("image_column", img), ("caption_column", cap)):
        if col not in cols:
            sub = ""
            if "json" in cols and isinstance(feats["json"], dict) and key == "caption_column":
                sub = f"; its json column has {', '.join(feats['json'])}"
            raise UserError(f"{src.where}: dataset '{src.path or 'shapes'}' has no column '{col}' (columns: "
                              f"{', '.join(cols)}{sub}); set {src.where}.{key} to one of its columns.")
    if not _image_like(feats[img]):
        raise UserError(f"{src.where}: column '{img}' of '{src.path or 'shapes'}' holds {feats[img]}, which is not "
                          f"an image; set {src.where}.image_column to a column of images (an Image feature, encoded "
                          "bytes or file paths).")
    if field is None and _caption_feature(feats[cap]) is None:
        raise UserError(f"{src.where}: column '{cap}' of '{src.path or 'shapes'}' holds {feats[cap]}, which is not "
                          f"text; set {src.where}.caption_column to a column of captions.")
    return ds, img, cap, field


def _image_like(feat) -> bool:
    """Whether ``cast_column(..., Image())`` can read the feature: an Image, encoded bytes, a file
    path or a {bytes, path} struct."""
    if isinstance(feat, datasets.Image):
        return True
    if isinstance(feat, datasets.Value):
        return feat.dtype in ("string", "large_string", "binary", "large_binary")
    return isinstance(feat, dict) and set(feat) <= {"bytes", "path"} and bool(feat)


def _caption_feature(feat) -> datasets.Value | datasets.List | None:
    """String captions as ``Value("string")``, lists of captions as a list of strings; None for
    anything else (a struct, an image, ...)."""
    if isinstance(feat, (datasets.List, datasets.LargeList)):
        return datasets.List(datasets.Value("string")) if isinstance(feat.feature, datasets.Value) else None
    if isinstance(feat, list):
        return datasets.List(datasets.Value("string")) if feat and isinstance(feat[0], datasets.Value) else None
    return datasets.Value("string") if isinstance(feat, datasets.Value) else None


def _standardize(ds: Rows, src: _Source, image_column: str, caption_column: str, keep_all: bool) -> Rows:
    """Rename the source's image/caption columns to ``image_column`` / ``caption_column`` with an
    ``Image()`` image. ``keep_all`` keeps the other columns (a single source); otherwise only the
    two stay, the caption cast to string (a mix member, so members' features align)."""
    ds, img, cap, field = _resolve_columns(ds, src)
    streaming = isinstance(ds, datasets.IterableDataset)
    if not keep_all:
        ds = ds.select_columns([img] if cap == img else [img, cap])
    if field is not None:  # the caption is a field of the webdataset json column
        if streaming:
            feats = datasets.Features({k: v for k, v in ds.features.items() if keep_all or k != cap})
            feats[caption_column] = datasets.Value("string")
            ds = ds.map(lambda j: {caption_column: (j or {}).get(field)}, input_columns=[cap],
                        remove_columns=None if keep_all else [cap], features=feats)
        else:
            flat = ds.flatten()
            ds = flat.rename_column(f"{cap}.{field}", caption_column)
            if not keep_all:
                ds = ds.select_columns([img, caption_column])
    elif cap != caption_column:
        if caption_column in ds.column_names:  # e.g. a webdataset "text" field next to the one we use
            ds = ds.remove_columns([caption_column])
        ds = ds.rename_column(cap, caption_column)
    if img != image_column:
        if image_column in ds.column_names:
            ds = ds.remove_columns([image_column])
        ds = ds.rename_column(img, image_column)
    feats = _features(ds)
    if not isinstance(feats[image_column], datasets.Image) or (not keep_all and feats[image_column] != datasets.Image()):
        ds = ds.cast_column(image_column, datasets.Image())
    if not keep_all:
        want = _caption_feature(feats[caption_column])
        if want is not None and feats[caption_column] != want:
            ds = ds.cast_column(caption_column, want)
    return ds


# ---------------------------------------------------------------------------------------------
# public


def load_rows(spec: DataSpec, rank: int = 0, world_size: int = 1, seed: int = 0) -> Rows:
    """The recipe's rows with ``spec.image_column`` (an ``Image()``) and ``spec.caption_column``.

    Map-style (``spec.streaming`` false): a ``datasets.Dataset`` of all rows (``max_samples``: the
    first ones); ``rank``/``world_size`` are not used, accelerate shards it later. Streaming: an
    ``IterableDataset`` holding this process's part (``rank`` of ``world_size``), shuffled with
    ``seed`` in a buffer of ``spec.shuffle_buffer`` rows. ``spec.mix`` combines several sources
    (see the module docstring). User mistakes (no such path or column, ...) raise UserError.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if spec.mix:
        ds = _load_mix(spec, world_size, seed)
    else:
        src = _Source(spec.source, spec.path, spec.split, spec.image_column, spec.caption_column, "data",
                      (spec.image_column == "image", spec.caption_column == "text"))
        ds = _standardize(_load_source(spec, src, spec.streaming, world_size), src, spec.image_column,
                          spec.caption_column, keep_all=True)
    if isinstance(ds, datasets.IterableDataset):
        if spec.max_samples:
            ds = ds.take(spec.max_samples)
        if world_size > 1:
            ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
        return ds.shuffle(seed=seed, buffer_size=spec.shuffle_buffer)
    if spec.max_samples:
        ds = ds.select(range(min(spec.max_samples, len(ds))))
    return ds


def _load_mix(spec: DataSpec, world_size: int, seed: int) -> Rows:
    weights = [m.weight for m in spec.mix]
    if any(w is not None for w in weights) and any(w is None for w in weights):
        missing = [f"data.mix[{i}]" for i, w in enumerate(weights) if w is None]
        raise UserError(f"{', '.join(missing)} {'has' if len(missing) == 1 else 'have'} no weight while other "
                          "members have one; give every data.mix member a weight, or none.")
    members = []
    for i, m in enumerate(spec.mix):
        src = _Source(m.source, m.path, m.split, m.image_column or spec.image_column,
                      m.caption_column or spec.caption_column, f"data.mix[{i}]",
                      (m.image_column is None and spec.image_column == "image",
                       m.caption_column is None and spec.caption_column == "text"))
        ds = _standardize(_load_source(spec, src, spec.streaming, world_size), src, spec.image_column,
                          spec.caption_column, keep_all=False)
        if m.repeats > 1:
            ds = ds.repeat(m.repeats) if spec.streaming else datasets.concatenate_datasets([ds] * m.repeats)
        members.append(ds)
    feats = [_features(d)[spec.caption_column] for d in members]
    if any(f != feats[0] for f in feats):
        kinds = ", ".join(f"data.mix[{i}]: {'list of captions' if isinstance(f, datasets.List) else 'caption'}"
                          for i, f in enumerate(feats))
        raise UserError(f"the data.mix members' caption columns differ in kind ({kinds}); "
                          "mix sources whose captions are all strings or all lists of strings.")
    if len(members) == 1 and weights[0] is None:
        return members[0]
    if weights[0] is not None:
        total = sum(weights)
        return datasets.interleave_datasets(members, probabilities=[w / total for w in weights], seed=seed,
                                            stopping_strategy="all_exhausted")
    return datasets.concatenate_datasets(members)
