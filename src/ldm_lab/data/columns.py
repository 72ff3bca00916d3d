"""The image and caption columns of a loaded source: found (with the webdataset fallbacks described
in :mod:`ldm_lab.data.formats`), checked to hold images and text, renamed to ``data.image_column`` /
``data.caption_column`` with an ``Image()`` image, and, for a ``data.mix`` member, reduced to those
two columns with the caption cast to string so that the members' features align."""

from __future__ import annotations

import datasets

from ..errors import UserError
from .formats import Rows, _Source

WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
WDS_JSON_CAPTION_FIELDS = ("caption", "text")


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
