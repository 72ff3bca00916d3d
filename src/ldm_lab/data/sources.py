"""Where training rows come from: the built-in shapes world, a local imagefolder, or a hub
dataset. All of them end up as a 🤗 ``datasets.Dataset`` with an image and a caption column."""

from __future__ import annotations

from pathlib import Path

import datasets

from ..recipe import RecipeError
from ..recipe.schema import DataSpec
from . import shapes

CACHE_ROOT = Path("data/cache")


def shapes_dir(spec: DataSpec) -> Path:
    s = spec.shapes
    root = Path(spec.cache_dir) if spec.cache_dir else CACHE_ROOT
    return root / f"shapes-n{s.n}-s{s.seed}-r{s.resolution}"


def materialize_shapes(spec: DataSpec) -> Path:
    """Generate the shapes dataset the recipe names, once; later runs reuse it."""
    out = shapes_dir(spec)
    if not (out / "world.json").exists():
        world = shapes.World(resolution=spec.shapes.resolution)
        tmp = out.with_name(out.name + ".tmp")
        shapes.generate(tmp, spec.shapes.n, seed=spec.shapes.seed, world=world)
        tmp.rename(out)
    return out


def _shapes_rows(root: Path) -> datasets.Dataset:
    """The shapes imagefolder as a Dataset; saved once as Arrow next to it, because resolving
    tens of thousands of files through the imagefolder loader takes minutes on every run."""
    arrow = root / "arrow"
    if (arrow / "dataset_info.json").exists():
        return datasets.load_from_disk(str(arrow))
    ds = datasets.load_dataset("imagefolder", data_dir=str(root), split="train")
    tmp = root / "arrow.tmp"
    ds.save_to_disk(str(tmp))
    tmp.rename(arrow)
    return datasets.load_from_disk(str(arrow))


def load_rows(spec: DataSpec) -> datasets.Dataset:
    """The recipe's dataset with ``spec.image_column`` and ``spec.caption_column``."""
    if spec.source == "shapes":
        ds = _shapes_rows(materialize_shapes(spec))
    elif spec.source == "imagefolder":
        ds = datasets.load_dataset("imagefolder", data_dir=spec.path, split=spec.split)
    else:
        ds = datasets.load_dataset(spec.path, split=spec.split)
    for col in (spec.image_column, spec.caption_column):
        if col not in ds.column_names:
            raise RecipeError(f"dataset has no column '{col}' (columns: {', '.join(ds.column_names)}); "
                             "set data.image_column / data.caption_column.")
    if spec.max_samples:
        ds = ds.select(range(min(spec.max_samples, len(ds))))
    return ds
