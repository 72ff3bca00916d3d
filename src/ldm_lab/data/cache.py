"""Precomputed latents and text embeddings: encoded once, reused by every later run.

The autoencoder's posterior mean and std are stored (not one sample) so training still draws
a fresh latent every step. Captions are encoded once per distinct caption. The cache file name
is a hash of everything the contents depend on (autoencoder and text-encoder weights,
resolution, the dataset's fingerprint and the caption column), so a cache built for other
models or data is never picked up by mistake.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..conditioning import Conditioner
from .transforms import image_transform


def module_digest(module: torch.nn.Module) -> str:
    """A short content hash of a module's weights: every byte, so it does not depend on the
    number of threads (a float sum did: runs under ``accelerate launch``, one thread per
    process by default, missed a cache built with two)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class LatentCache:
    mean: torch.Tensor  # (N, C, h, w), unscaled
    std: torch.Tensor  # (N, C, h, w)
    caption_index: torch.Tensor  # (N,) into ``embeddings``
    embeddings: torch.Tensor  # (U, L, D), one per distinct caption
    captions: list[str]

    def __len__(self) -> int:
        return self.mean.shape[0]


def cache_key(vae, conditioner: Conditioner, rows, resolution: int, image_column: str, caption_column: str,
              fingerprint: str | None = None) -> str:
    """``fingerprint`` stands for the rows' contents when the dataset's own fingerprint does not
    (a dataset built from file paths hashes the paths, not the images)."""
    te = conditioner.text_encoder
    parts = [module_digest(vae), module_digest(te), te.kind, str(te.max_length), str(resolution),
             fingerprint or getattr(rows, "_fingerprint", str(len(rows))), image_column, caption_column,
             "center-crop", "v1"]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


@torch.no_grad()
def build_or_load(rows, vae, conditioner: Conditioner, resolution: int, image_column: str, caption_column: str,
                  cache_dir: Path, batch_size: int = 64, log=print, fingerprint: str | None = None) -> LatentCache:
    cache_dir = Path(cache_dir)
    key = cache_key(vae, conditioner, rows, resolution, image_column, caption_column, fingerprint)
    path = cache_dir / f"latents-{key}.safetensors"
    if path.exists():
        t = load_file(path)
        captions = json.loads((path.with_suffix(".json")).read_text())["captions"]
        log(f"using cached latents {path} ({t['mean'].shape[0]} rows)")
        return LatentCache(t["mean"], t["std"], t["caption_index"], t["embeddings"], captions)
    log(f"encoding {len(rows)} images and their captions once into {path}")
    tf = image_transform(resolution, center_crop=True, random_flip=False)
    device = next(vae.parameters()).device
    plain = rows.with_format(None)
    means, stds = [], []
    for start in range(0, len(plain), batch_size):
        batch = plain[start:start + batch_size][image_column]
        x = torch.stack([tf(im.convert("RGB")) for im in batch]).to(device, vae.dtype)
        dist = vae.encode(x).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    captions_all = [c or "" for c in plain[caption_column]]
    captions = sorted(set(captions_all))
    where = {c: i for i, c in enumerate(captions)}
    embs = torch.cat([conditioner.encode(captions[i:i + 256]).float().cpu() for i in range(0, len(captions), 256)])
    cache = LatentCache(torch.cat(means).contiguous(), torch.cat(stds).contiguous(), torch.tensor([where[c] for c in captions_all]), embs.contiguous(),
                        captions)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"mean": cache.mean, "std": cache.std, "caption_index": cache.caption_index,
               "embeddings": cache.embeddings}, str(tmp))
    path.with_suffix(".json").write_text(json.dumps({"captions": captions, "rows": len(rows)}))
    tmp.rename(path)
    return cache
