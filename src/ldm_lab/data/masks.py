"""The masked loss's per-pixel masks (``data.masked_loss``): read from a mask column (an image, or a
path relative to the dataset dir, as an imagefolder's ``<column>_file_name``) or from the image's
own alpha channel, then cropped and flipped together with the image (torchvision v2 transforms a
``tv_tensors.Mask`` with the same parameters as the image it comes with)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors


def mask_column(column_names, column: str | None) -> str | None:
    """The dataset column that holds the masks: ``column`` or its imagefolder path column; None
    for the alpha channel. A column the rows lack is a ValueError naming the ones they have."""
    if column is None:
        return None
    for c in (column, f"{column}_file_name"):
        if c in column_names:
            return c
    raise ValueError(f"the dataset has no mask column '{column}' (columns: {', '.join(column_names)}); set "
                     "data.masked_loss.column, or leave it out to read each image's alpha channel")


def read_mask(value, image: Image.Image, root: str | Path | None) -> Image.Image:
    """The mask of one row as a greyscale image (255 = learned): ``value`` from the mask column
    (a PIL image, a datasets image dict or a path), or, when None, ``image``'s alpha channel (an
    image without one is learned everywhere)."""
    if value is None:
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            return image.convert("RGBA").getchannel("A")
        return Image.new("L", image.size, 255)
    if isinstance(value, Image.Image):
        im = value
    elif isinstance(value, dict):
        im = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
    else:
        p = Path(value)
        im = Image.open(p if p.is_absolute() or root is None else Path(root) / p)
    im = im.convert("L")
    if im.size != image.size:
        raise ValueError(f"its mask is {im.size[0]}x{im.size[1]} px and the image {image.size[0]}x{image.size[1]}")
    return im


def as_mask(mask: Image.Image) -> tv_tensors.Mask:
    """(1, H, W) float in [0, 1], typed so the image's transforms move it along with the image."""
    return tv_tensors.Mask(torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None])


def to_latent_grid(mask: torch.Tensor, hw) -> torch.Tensor:
    """A (..., H, W) pixel mask area-averaged onto the latent grid ``hw``."""
    m = mask.float()
    squeeze = m.dim() == 3
    m = torch.nn.functional.interpolate(m[None] if squeeze else m, size=tuple(hw), mode="area")
    return m[0] if squeeze else m
