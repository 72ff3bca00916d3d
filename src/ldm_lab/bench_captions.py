"""``ldm-lab bench --caption-counts N,...``: training memory against the number of distinct
captions in the latent cache.

For each count the bench writes a copy of the recipe's own latent cache (built or found as
training would) whose rows carry, between them, N distinct caption variants with random
embeddings of the cache's shapes (token states, pooled vector, mask), and adds a row that trains
from it (``data.latent_cache``). A step reads only the embeddings of the captions its batch picks
(``data/embedding_store.py``), so peak memory should not depend on N; the table shows it.
The embeddings are random because only their size matters here: every row of the copy is still
a real latent of the recipe's data.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from accelerate import Accelerator

from .data.cache import LatentCache
from .data.embedding_store import FILES, encoder_count
from .errors import UserError
from .recipe import Recipe, pipeline_defaults
from .trainers.registry import get_trainer


def parse_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise UserError(f"--caption-counts '{text}' is not a comma-separated list of positive integers, e.g. "
                        "20000,200000.")
    return counts


def recipe_cache(recipe: Recipe) -> LatentCache:
    """The recipe's latent cache, built by the trainer's own set-up when it is not there yet."""
    recipe = pipeline_defaults(recipe)
    if recipe.data.streaming:
        raise UserError("--caption-counts needs a cached dataset; set data.streaming=false.")
    recipe.data.cache_latents = True
    scratch = Path(tempfile.mkdtemp(prefix="ldm-lab-bench-cache-"))
    try:
        plugin = get_trainer(recipe.trainer)(recipe, Accelerator(cpu=True), scratch)
        plugin.build_cache(None)
        return plugin.cached
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_caption_cache(cache: LatentCache, out: Path, captions: int, seed: int = 0) -> Path:
    """A copy of ``cache`` (same latents, same manifest inputs) whose rows carry ``captions``
    distinct caption variants between them (as evenly as the rows allow), embedded at random."""
    if captions < len(cache):
        raise UserError(f"--caption-counts {captions} is below the cache's {len(cache)} rows; every row needs a "
                        "caption: give at least that many.")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    n_rows, done_rows, done_caps = len(cache), 0, 0
    for part in cache.parts:
        dst = out / part.name
        dst.mkdir()
        for f in ("mean.bin", "std.bin"):
            shutil.copyfile(part / f, dst / f)
        meta = json.loads((part / "latents.json").read_text())
        for r in meta["rows"]:  # row j gets captions [j*N/R, (j+1)*N/R) of the whole copy
            lo, hi = done_rows * captions // n_rows, (done_rows + 1) * captions // n_rows
            r["variants"] = list(range(lo - done_caps, hi - done_caps))
            done_rows += 1
        count = done_rows * captions // n_rows - done_caps
        meta["captions"] = count
        (dst / "latents.json").write_text(json.dumps(meta))
        (dst / "captions.json").write_text(json.dumps([f"caption {done_caps + i}" for i in range(count)]))
        n_enc = encoder_count(part)
        for k in range(n_enc):
            suffix = "" if n_enc == 1 else f".{k}"
            for stem in FILES.values():
                src = part / f"{stem}{suffix}.npy"
                if not src.exists():
                    continue
                like = np.load(src, mmap_mode="r")
                arr = np.lib.format.open_memmap(dst / src.name, mode="w+", dtype=like.dtype, shape=(count, *like.shape[1:]))
                for i in range(0, count, 4096):  # written in chunks: the copy never sits in memory whole
                    j = min(i + 4096, count)
                    arr[i:j] = (rng.standard_normal((j - i, *like.shape[1:]), dtype=np.float32)
                                if like.dtype != np.bool_ else True)
                arr.flush()
                del arr
        done_caps += count
    manifest = {**cache.manifest, "synthetic_captions": captions}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


def caption_variants(recipe: Recipe, counts: list[int], out: Path, log=print) -> dict[str, list[str]]:
    """One bench row per count: ``captions-N`` trains from a copy of the recipe's cache with N captions."""
    cache = recipe_cache(recipe)
    rows = {}
    for n in counts:
        path = write_caption_cache(cache, out / f"caption-cache-{n}", n)
        log(f"wrote {path}: {len(cache)} rows, {n} distinct captions")
        rows[f"captions-{n}"] = [f"data.latent_cache={path}"]
    return rows
