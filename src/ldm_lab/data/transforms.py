"""Image transforms (torchvision v2) from PIL to a [-1, 1] tensor."""

from __future__ import annotations

import torch
from torchvision.transforms import v2
from torchvision.transforms.functional import to_pil_image


def image_transform(resolution: int, center_crop: bool = True, random_flip: bool = False,
                    crop: int | None = None) -> v2.Compose:
    """Resize the short side to ``resolution`` then crop to it (or to a random ``crop``)."""
    ops = [v2.ToImage(), v2.Resize(resolution, antialias=True),
           v2.CenterCrop(resolution) if center_crop else v2.RandomCrop(resolution)]
    if crop is not None and crop < resolution:
        ops.append(v2.RandomCrop(crop))
    if random_flip:
        ops.append(v2.RandomHorizontalFlip())
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5], [0.5])]
    return v2.Compose(ops)


def to_pil(x: torch.Tensor):
    """A [-1, 1] CHW tensor back to a PIL image."""

    return to_pil_image((x.detach().float().cpu().clamp(-1, 1) + 1) / 2)
