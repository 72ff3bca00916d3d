"""The per-bucket transform: an image resized to cover its aspect-ratio bucket (aspect preserved, see
:func:`ldm_lab.data.buckets.cover_size`), cropped to it and normalised to [-1, 1]."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import PIL.Image
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .buckets import cover_size

__all__ = ["CoverResize", "bucket_transform"]


class CoverResize(v2.Transform):
    """Resize (antialiased) so the image covers ``bucket_hw``: aspect preserved, one side equal to the
    bucket's, the other >= (see :func:`cover_size`). The size depends on the input, so it is computed per
    call; all inputs of one call must have one size."""

    def __init__(self, bucket_hw: Sequence[int]):
        super().__init__()
        self.bucket_hw = (int(bucket_hw[0]), int(bucket_hw[1]))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        sizes = {tuple(F.get_size(x)) for x in flat_inputs if isinstance(x, (torch.Tensor, PIL.Image.Image))}
        if len(sizes) != 1:
            raise ValueError(f"CoverResize needs inputs of one size, got {sorted(sizes)}")
        return {"size": list(cover_size(sizes.pop(), self.bucket_hw))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.resize(inpt, params["size"], antialias=True)


def bucket_transform(bucket_hw: Sequence[int], random_flip: bool = False, center_crop: bool = True) -> v2.Compose:
    """PIL (or tensor) image -> float CHW tensor of exactly ``bucket_hw`` in [-1, 1]: resize to cover
    (:class:`CoverResize`), centre (or random) crop, optional horizontal flip, normalised like
    :func:`ldm_lab.data.transforms.image_transform`."""
    size = [int(bucket_hw[0]), int(bucket_hw[1])]
    ops = [v2.ToImage(), CoverResize(size), v2.CenterCrop(size) if center_crop else v2.RandomCrop(size)]
    if random_flip:
        ops.append(v2.RandomHorizontalFlip())
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5], [0.5])]
    return v2.Compose(ops)
