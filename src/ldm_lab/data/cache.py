"""Precomputed latents and text embeddings: encoded once, to disk, split across processes.

Layout of a cache dir (``ldm-lab cache RECIPE`` writes one; training finds or builds it)::

    manifest.json                 what the contents depend on (see ``cache_inputs``) + the parts
    part-R-of-W/latents.json      per row: source row, latent shape, offset, caption variants
    part-R-of-W/mean.bin std.bin  float32, the autoencoder posterior's mean and std, row after row
    part-R-of-W/embeddings.npy pooled.npy mask.npy + captions.json   the part's distinct caption
                                  strings, encoded: the conditioning record (token states, pooled
                                  vector, and the attention mask of encoders that use one) of each
                                  text encoder (``embedding_store``), read per row (positioned reads)

Process R of W encodes rows [R*N/W, (R+1)*N/W) into its own part; process 0 writes the manifest
when all parts are there and renames the build dir into place, so a half-built cache is never
used (a killed build keeps its finished parts and continues). The mean and std (not one sample)
are stored so training still draws a fresh latent every step; latents are read through memory
maps, so a cache larger than RAM works. Rows may have different latent shapes (aspect-ratio
buckets).

The dir name is a hash of the inputs, so a cache for other models or data is never picked up by
mistake; a cache given explicitly (``data.latent_cache``) whose manifest disagrees with the
recipe is refused with the fields that differ.

Caption augmentation survives caching: every caption's variants (``captions.caption_variants``:
the caption as written, tag shuffles, several captions per image) are all encoded, and the
trainer picks one per row and step.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..components.record import Conditioning
from ..errors import UserError
from ..progress import bar
from .bucket_transforms import bucket_transform
from .captions import caption_variants
from .checks import to_rgb
from .embedding_store import StoredRecords, encoder_count, write_records
from .masks import as_mask, mask_column, read_mask, to_latent_grid
from .transforms import image_transform

FORMAT = 4  # 3: the whole conditioning record (pooled vector, mask) beside the token states; 4: as .npy, mapped


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


def cache_inputs(vae, conditioner, rows, data, image_column: str, caption_column: str,
                 fingerprint: str | None = None, buckets: list | None = None) -> dict:
    """Everything the cached contents depend on (the manifest's ``inputs``). ``fingerprint``
    stands for the rows' contents when the dataset's own fingerprint does not (a dataset built
    from file paths hashes the paths, not the images)."""
    b = data.buckets
    encoders = [_encoder_inputs(te) for te in conditioner.encoders]
    return {
        "format": FORMAT,
        "autoencoder": module_digest(vae),
        **({"text_encoder": encoders[0]} if len(encoders) == 1 else {"text_encoders": encoders}),
        "resolution": data.resolution,
        "geometry": ({"buckets": [list(x) for x in buckets], "max_upscale": b.max_upscale} if buckets
                     else "center-crop"),
        "dataset": {"fingerprint": fingerprint or getattr(rows, "_fingerprint", None) or str(len(rows)),
                    "rows": len(rows), "image_column": image_column, "caption_column": caption_column},
        "captions": data.captions.model_dump(),
        # the masked loss's masks, on the latent grid (only when asked for: other caches keep their key)
        **({"mask": {"column": data.masked_loss.column or "alpha"}} if data.masked_loss is not None else {}),
    }


def _encoder_inputs(te) -> dict:
    out = {"weights": module_digest(te), "kind": te.kind, "max_length": te.max_length}
    if te.hidden_layer != -1:
        out["hidden_layer"] = te.hidden_layer
    if te.use_mask != (te.kind == "t5"):  # a T5 without its mask (SD3), a CLIP with one (PixArt)
        out["mask"] = te.use_mask
    return out


def cache_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


_WHAT = {"autoencoder": "autoencoder", "text_encoder": "text encoder", "resolution": "resolution",
         "geometry": "crop/bucket geometry", "dataset": "dataset (rows or columns)", "captions": "caption set",
         "format": "cache format"}


def check_manifest(path: Path, inputs: dict) -> dict:
    """The manifest of the cache at ``path``; a UserError naming what differs from ``inputs``."""
    mf = path / "manifest.json"
    if not mf.exists():
        raise UserError(f"data.latent_cache is '{path}', which is not a latent cache (no manifest.json); "
                          "build one with `ldm-lab cache RECIPE --out DIR` or unset data.latent_cache.")
    manifest = json.loads(mf.read_text())
    have = manifest.get("inputs", {})
    differ = [_WHAT.get(k, k) for k in inputs if have.get(k) != inputs[k]]
    if differ:
        raise UserError(f"the latent cache {path} was built for another {', '.join(differ)} than this recipe's; "
                          "rebuild it with `ldm-lab cache RECIPE --out DIR` or unset data.latent_cache to build one "
                          "automatically.")
    return manifest


class LatentCache(Dataset):
    """Rows of a cache dir: ``{"mean", "std", "variants", "variant_count"}`` per row, with
    ``encodings`` (per text encoder, a record of U rows: states (U, L, D), pooled, mask) and
    ``captions`` (U strings) that ``variants`` index into."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.manifest = json.loads((self.root / "manifest.json").read_text())
        self.parts = [self.root / p for p in self.manifest["parts"]]
        rows, base = [], 0
        self._caption_counts = []
        for k, part in enumerate(self.parts):
            meta = json.loads((part / "latents.json").read_text())
            for r in meta["rows"]:
                rows.append((k, r["offset"], tuple(r["shape"]), r["row"], [base + v for v in r["variants"]],
                             r.get("mask_offset")))
            count = meta.get("captions")
            if count is None:
                count = len(json.loads((part / "captions.json").read_text()))
            self._caption_counts.append(count)
            base += count
        # per text encoder, the U caption rows (states (U, L, D), pooled, mask) of every part, read
        # per row from the files (embedding_store): memory does not grow with U
        n_enc = max((encoder_count(p) for p in self.parts), default=1)
        self.encodings = [StoredRecords(self.parts, k, n_enc) for k in range(n_enc)]
        self._captions: list[str] | None = None
        self.rows = rows
        self._source_rows = [r[3] for r in rows]
        self.vmax = max((len(r[4]) for r in rows), default=1)
        self.has_masks = bool(rows) and all(r[5] is not None for r in rows)
        self._maps: list | None = None

    @property
    def captions(self) -> list[str]:
        """The U distinct caption strings the rows' variants index into (read when first asked for)."""
        if self._captions is None:
            self._captions = [c for p in self.parts for c in json.loads((p / "captions.json").read_text())]
        return self._captions

    @property
    def conditioning(self) -> StoredRecords:
        """The records of the one text encoder (several: ``encodings``)."""
        if len(self.encodings) != 1:
            raise ValueError("this cache holds several text encoders' records; read .encodings")
        return self.encodings[0]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """Latent shape (C, h, w) of every row (rows of one aspect-ratio bucket share it)."""
        return [r[2] for r in self.rows]

    @property
    def source_rows(self) -> list[int]:
        """The dataset row each cached row came from."""
        return self._source_rows

    def _open(self) -> list:
        if self._maps is None:  # opened per process (and per DataLoader worker), never pickled
            self._maps = [(np.memmap(p / "mean.bin", dtype=np.float32, mode="r"),
                           np.memmap(p / "std.bin", dtype=np.float32, mode="r"),
                           np.memmap(p / "mask.bin", dtype=np.float32, mode="r") if self.has_masks else None)
                          if (p / "mean.bin").stat().st_size else None  # a part with no rows (more processes than rows)
                          for p in self.parts]
        return self._maps

    def __getstate__(self):
        return {**self.__dict__, "_maps": None}

    def __getitem__(self, i: int) -> dict:
        part, off, shape, _, variants, moff = self.rows[i]
        mean, std, mask = self._open()[part]
        n = int(np.prod(shape))
        v = torch.full((self.vmax,), -1, dtype=torch.long)
        v[:len(variants)] = torch.tensor(variants)
        out = {"mean": torch.from_numpy(np.array(mean[off:off + n])).view(shape),
               "std": torch.from_numpy(np.array(std[off:off + n])).view(shape),
               "caption_index": v[0], "variants": v, "variant_count": torch.tensor(len(variants))}
        if mask is not None:  # the masked loss's weights, already on the latent grid
            hw = int(shape[1] * shape[2])
            out["loss_mask"] = torch.from_numpy(np.array(mask[moff:moff + hw])).view(1, shape[1], shape[2])
        return out


def _encode_part(rows, lo: int, hi: int, vae, conditioner, data, inputs: dict, image_column: str,
                 caption_column: str, out: Path, batch_size: int, bucket_of: Callable | None) -> dict:
    """Encode rows [lo, hi) into the part dir ``out`` (written to a temp dir, renamed at the end)."""

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    device = next(vae.parameters()).device
    center = image_transform(data.resolution, center_crop=True, random_flip=False)

    # images decoded one by one inside the try below, so one unreadable file is skipped, not fatal
    plain = rows.cast_column(image_column, datasets.Image(decode=False)).with_format(None)
    spec = data.masked_loss
    try:
        mcol = mask_column(rows.column_names, spec.column) if spec is not None else None
    except ValueError as e:
        raise UserError(f"{e}.") from None
    if mcol is not None and isinstance(rows.features.get(mcol), datasets.Image):
        plain = plain.cast_column(mcol, datasets.Image(decode=False))
    strings: dict[str, int] = {}
    meta, skipped = [], []
    offset = moffset = 0
    with open(tmp / "mean.bin", "wb") as fm, open(tmp / "std.bin", "wb") as fs, \
            (open(tmp / "mask.bin", "wb") if spec is not None else contextlib.nullcontext()) as fk, \
            bar(hi - lo, "encoding the latent cache", "image") as progress:
        for start in range(lo, hi, batch_size):
            progress.update(min(batch_size, hi - start))
            chunk = plain[start:min(start + batch_size, hi)]
            groups: dict[tuple, list] = {}
            for j, (im, cap) in enumerate(zip(chunk[image_column], chunk[caption_column])):
                row = start + j
                try:
                    raw = _open_image(im)
                    im = to_rgb(raw)
                    b = None if bucket_of is None else bucket_of(im.size[::-1])
                    if bucket_of is not None and b is None:
                        skipped.append({"row": row, "reason": "too small for its bucket", "size": list(im.size)})
                        continue
                    tf = center if b is None else bucket_transform(b)
                    if spec is None:
                        groups.setdefault(() if b is None else tuple(b), []).append((row, tf(im), cap, None))
                        continue
                    mval = None if mcol is None else chunk[mcol][j]
                    x, m = tf(im, as_mask(read_mask(mval, raw, data.path)))
                    groups.setdefault(() if b is None else tuple(b), []).append((row, x, cap, m.as_subclass(torch.Tensor)))
                except Exception as e:  # noqa: BLE001 - a bad image is skipped and counted, never fatal
                    skipped.append({"row": row, "reason": f"{type(e).__name__}: {str(e)[:120]}"})
            encoded = []
            for items in groups.values():
                x = torch.stack([t for _, t, _, _ in items]).to(device, vae.dtype)
                with torch.no_grad():
                    dist = vae.encode(x).latent_dist
                encoded += list(zip(items, dist.mean.float().cpu(), dist.std.float().cpu()))
            for (row, _, cap, pmask), mean, std in sorted(encoded, key=lambda e: e[0][0]):
                if not torch.isfinite(mean).all() or not torch.isfinite(std).all():
                    skipped.append({"row": row, "reason": "the autoencoder gave NaN/inf"})
                    continue
                fm.write(mean.contiguous().numpy().tobytes())
                fs.write(std.contiguous().numpy().tobytes())
                variants = [strings.setdefault(s, len(strings)) for s in caption_variants(cap, data.captions)]
                meta.append({"row": row, "shape": list(mean.shape), "offset": offset, "variants": variants})
                offset += mean.numel()
                if pmask is not None:
                    lm = to_latent_grid(pmask, mean.shape[-2:]).contiguous()
                    fk.write(lm.numpy().astype(np.float32).tobytes())
                    meta[-1]["mask_offset"] = moffset
                    moffset += lm.numel()
    captions = list(strings)
    chunks = [[p.to("cpu", torch.float32) for p in conditioner.encode_parts(captions[i:i + 256])]
              for i in range(0, len(captions), 256)]
    write_records(tmp, [Conditioning.cat(list(c)) for c in zip(*chunks)] if chunks else
                  [Conditioning(torch.empty(0))] * len(conditioner.encoders))
    (tmp / "captions.json").write_text(json.dumps(captions))
    (tmp / "latents.json").write_text(json.dumps({"inputs": inputs, "range": [lo, hi], "rows": meta,
                                                  "captions": len(captions), "skipped": skipped}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return {"rows": len(meta), "skipped": skipped}


def _open_image(value):
    if isinstance(value, dict):
        im = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
    else:
        im = Image.open(value)
    im.load()
    return im


def writable_dir(d: Path, what: str) -> None:
    """One sentence when ``d`` cannot be created or written (a read-only dir, a file in the way),
    before anything is generated or encoded into it."""
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{what} cannot be written in {d} ({e.strerror or type(e).__name__}); set data.cache_dir to "
                        "a writable dir (or --out for ldm-lab cache).") from None


def build_or_load(rows, vae, conditioner, data, image_column: str, caption_column: str, accelerator=None,
                  fingerprint: str | None = None, buckets: list | None = None, bucket_of: Callable | None = None,
                  log=print, batch_size: int = 64, out: Path | None = None) -> LatentCache:
    """The cache for these rows and models: loaded when present (``data.latent_cache``, ``out``
    or the hash-named dir under the cache root), else built with every process encoding its share."""
    inputs = cache_inputs(vae, conditioner, rows, data, image_column, caption_column, fingerprint, buckets)
    if data.latent_cache and out is None:
        path = Path(data.latent_cache)
        check_manifest(path, inputs)
        log(f"using the latent cache {path}")
        return LatentCache(path)
    root = Path(data.cache_dir) if data.cache_dir else Path("data/cache")
    path = Path(out) if out is not None else root / f"latents-{cache_key(inputs)}"
    if (path / "manifest.json").exists():
        if out is not None and json.loads((path / "manifest.json").read_text()).get("inputs") != inputs:
            raise UserError(f"{path} holds a latent cache built for other inputs; remove it or choose another --out.")
        log(f"using cached latents {path}")
        return LatentCache(path)
    writable_dir(path.parent, "the latent cache")
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    build = path.with_name(path.name + ".build")
    n = len(rows)
    lo, hi = rank * n // world, (rank + 1) * n // world
    part = build / f"part-{rank:05d}-of-{world:05d}"
    log(f"encoding {n} images and their captions once into {path}"
        + (f" ({world} processes, {hi - lo} rows each)" if world > 1 else ""))
    done = part / "latents.json"
    if not (done.exists() and json.loads(done.read_text())["inputs"] == inputs):  # a killed build keeps its parts
        _encode_part(rows, lo, hi, vae, conditioner, data, inputs, image_column, caption_column, part,
                     batch_size, bucket_of)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if rank == 0:
        parts = sorted(p.name for p in build.glob(f"part-*-of-{world:05d}") if (p / "latents.json").exists())
        skipped = [s for p in parts for s in json.loads((build / p / "latents.json").read_text())["skipped"]]
        reasons: dict[str, int] = {}
        for x in skipped:
            key = "too small for its bucket" if x["reason"] == "too small for its bucket" else \
                "autoencoder NaN/inf" if "NaN" in x["reason"] else "unreadable"
            reasons[key] = reasons.get(key, 0) + 1
        kept = sum(len(json.loads((build / p / "latents.json").read_text())["rows"]) for p in parts)
        (build / "manifest.json").write_text(json.dumps({"inputs": inputs, "parts": parts, "rows": kept,
                                                         "skipped": len(skipped), "skipped_reasons": reasons,
                                                         "skipped_examples": skipped[:20],
                                                         "too_small_rows": [x for x in skipped if x["reason"] ==
                                                                            "too small for its bucket"][:1000]},
                                                        indent=1))
        for stale in build.glob("part-*"):
            if stale.name not in parts:
                shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(path, ignore_errors=True)
        build.rename(path)
        if skipped:
            log(f"warning: {len(skipped)} rows could not be encoded and were skipped (first: "
                f"{', '.join(str(s['row']) + ' ' + s['reason'] for s in skipped[:3])}); see {path / 'manifest.json'}")
    if accelerator is not None:
        accelerator.wait_for_everyone()
    cache = LatentCache(path)
    if len(cache) == 0:
        raise UserError(f"no row of the dataset could be encoded into {path} (see its manifest.json); check the data.")
    return cache
