"""The ``shapes`` source: the built-in shapes world the recipe names, generated once under
``data.cache_dir`` (default ``data/cache``) and read back as an Arrow ``datasets.Dataset``."""

from __future__ import annotations

import json
from pathlib import Path

import datasets

from ..recipe.schema import DataSpec
from . import shapes
from .cache import writable_dir

CACHE_ROOT = Path("data/cache")


def shapes_world(spec: DataSpec) -> shapes.World:
    s = spec.shapes
    kw = {k: tuple(v) for k, v in (("colors", s.colors), ("shapes", s.shapes)) if v}
    world = shapes.World(resolution=s.resolution, background_noise=s.background_noise, **kw)
    world.holdout = tuple(p for p in world.holdout if p[0] in world.colors and p[1] in world.shapes)
    return world


def shapes_dir(spec: DataSpec) -> Path:
    s = spec.shapes
    root = Path(spec.cache_dir) if spec.cache_dir else CACHE_ROOT
    name = f"shapes-n{s.n}-s{s.seed}-r{s.resolution}"
    if s.colors or s.shapes:
        name += "-" + "-".join(s.colors or []) + ("--" + "-".join(s.shapes) if s.shapes else "")
    if s.background_noise:
        name += f"-blotches{s.background_noise:g}"
    return root / name


def materialize_shapes(spec: DataSpec) -> Path:
    """Generate the shapes dataset the recipe names, once; later runs reuse it."""
    out = shapes_dir(spec)
    if not (out / "world.json").exists():
        writable_dir(out.parent, "the shapes dataset")
        world = shapes_world(spec)
        tmp = out.with_name(out.name + ".tmp")
        shapes.generate(tmp, spec.shapes.n, seed=spec.shapes.seed, world=world)
        tmp.rename(out)
    return out


def _shapes_rows(root: Path) -> datasets.Dataset:
    """The shapes imagefolder as a Dataset, built from its metadata.jsonl (the imagefolder
    loader's glob over tens of thousands of files takes minutes) and saved once as Arrow."""
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
