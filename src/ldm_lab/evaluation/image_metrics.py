"""Image-set metrics of generated images against real ones, in the feature space of a CLIP model
the recipe names (a local dir or hub id holding a transformers CLIPModel + CLIPProcessor; offline:
``data/pretrained/shapes-clip/clip``, the shapes CLIP this project trains):

- FID and KID: torchmetrics' ``FrechetInceptionDistance`` / ``KernelInceptionDistance`` with the
  CLIP image embeddings as their custom feature extractor (the standard Inception numbers need
  Inception weights; these are the same statistics in CLIP space, comparable within one model);
- CMMD (Jayasumana et al. 2024, "Rethinking FID"): the squared MMD with a Gaussian kernel
  (σ = 10) between L2-normalised CLIP image embeddings, × 1000 (the paper's scale); torchmetrics
  has no CMMD, so it is the few lines of ``cmmd`` below;
- CLIP score: torchmetrics' ``CLIPScore`` with the same model and processor (100 × cosine of the
  image and caption embeddings, floored at 0).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from torchmetrics.multimodal.clip_score import CLIPScore
from transformers import CLIPModel, CLIPProcessor

CMMD_SIGMA, CMMD_SCALE = 10.0, 1000.0


def load_clip(name: str) -> tuple[CLIPModel, CLIPProcessor]:
    """A CLIPModel and its processor from a local dir or a hub id (the processor's files beside the model's)."""
    return CLIPModel.from_pretrained(name).eval(), CLIPProcessor.from_pretrained(name)


def _image_embeds(model: CLIPModel, pixel_values: torch.Tensor) -> torch.Tensor:
    out = model.get_image_features(pixel_values=pixel_values)
    return out if torch.is_tensor(out) else out.pooler_output  # transformers 5: an output object


def _text_embeds(model: CLIPModel, input_ids, attention_mask=None) -> torch.Tensor:
    out = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    return out if torch.is_tensor(out) else out.pooler_output


class _TensorFeatures(nn.Module):
    """A CLIPModel whose ``get_*_features`` return tensors, as torchmetrics' CLIPScore expects
    (transformers 5 returns output objects)."""

    def __init__(self, model: CLIPModel):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, pixel_values):
        return _image_embeds(self.model, pixel_values)

    def get_text_features(self, input_ids, attention_mask=None):
        return _text_embeds(self.model, input_ids, attention_mask)


class ClipImageFeatures(nn.Module):
    """CLIP image embeddings of uint8 images (N, 3, H, W): torchmetrics' custom feature extractor.
    Images are resized to the model's input size and normalised as its processor does."""

    def __init__(self, model: CLIPModel, processor: CLIPProcessor):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        ip = processor.image_processor
        self.size = int(model.config.vision_config.image_size)
        self.register_buffer("mean", torch.tensor(ip.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(ip.image_std).view(1, 3, 1, 1), persistent=False)
        self.num_features = int(model.config.projection_dim)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return _image_embeds(self.model, (x - self.mean) / self.std)


def to_uint8(images: list[Image.Image], size: int) -> torch.Tensor:
    """PIL images -> (N, 3, size, size) uint8, each resized (short side) and centre-cropped."""
    out = []
    for im in images:
        im = im.convert("RGB")
        w, h = im.size
        s = size / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        out.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
    return torch.stack(out)


def cmmd(x: torch.Tensor, y: torch.Tensor, sigma: float = CMMD_SIGMA, scale: float = CMMD_SCALE) -> float:
    """CMMD of two embedding sets (N, D), (M, D): scale × MMD² with the Gaussian kernel
    exp(−‖a − b‖² / 2σ²) on L2-normalised rows (the paper's V-statistic: 0 for identical sets)."""
    x = F.normalize(x.double(), dim=-1)
    y = F.normalize(y.double(), dim=-1)
    gamma = 1.0 / (2 * sigma**2)

    def k(a, b):  # unit rows: ‖a − b‖² = 2 − 2 a·b
        return torch.exp(-gamma * (2 - 2 * a @ b.T).clamp_min(0)).mean()

    return float(scale * (k(x, x) + k(y, y) - 2 * k(x, y)))


class _Embedded(nn.Module):
    """torchmetrics' feature extractor for sets already embedded: FID and KID read the embeddings
    ``ClipImageFeatures`` gave once, instead of embedding every image again."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def image_metrics(fake: list[Image.Image], real: list[Image.Image], captions: list[str],
                  model: CLIPModel, processor: CLIPProcessor, batch: int = 64) -> dict[str, float]:
    """FID, KID (mean and std), CMMD of ``fake`` against ``real``, and the CLIP score of ``fake``
    against ``captions`` (one per fake image). Each set is embedded once for the three distances."""
    features = ClipImageFeatures(model, processor)
    embedded = _Embedded(features.num_features)
    fid = FrechetInceptionDistance(feature=embedded, reset_real_features=True, normalize=False)
    subset = max(2, min(1000, len(fake) // 2, len(real) // 2))  # half of each set per subset: the subsets vary
    kid = KernelInceptionDistance(feature=embedded, subsets=100, subset_size=subset, normalize=False)
    clip_score = CLIPScore(model_name_or_path=lambda: (_TensorFeatures(model), processor))
    fake_x, real_x = to_uint8(fake, features.size), to_uint8(real, features.size)
    with torch.no_grad():
        real_f = torch.cat([features(real_x[i:i + batch]) for i in range(0, len(real_x), batch)])
        fake_f = torch.cat([features(fake_x[i:i + batch]) for i in range(0, len(fake_x), batch)])
        for metric in (fid, kid):
            metric.update(real_f, real=True)
            metric.update(fake_f, real=False)
        for i in range(0, len(fake_x), batch):
            clip_score.update(list(fake_x[i:i + batch]), captions[i:i + batch])
        with torch.random.fork_rng(devices=[]):  # KID's random subsets: the same for the same sets
            torch.manual_seed(0)
            kid_mean, kid_std = kid.compute()
        return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std),
                "cmmd": cmmd(fake_f, real_f), "clip_score": float(clip_score.compute())}
