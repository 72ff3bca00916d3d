"""``ldm-lab cache``: a recipe's latents and caption embeddings encoded once, to disk, by the
trainer's own set-up (``TrainerPlugin.build_cache``), split across processes when launched with
several; training finds and uses the cache."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from accelerate import Accelerator

from ..errors import UserError
from ..recipe import load_recipe, pipeline_defaults
from ..trainers.engine import multi_process_without_accelerator
from ..trainers.registry import get_trainer


def cache(args) -> int:
    recipe = pipeline_defaults(load_recipe(args.recipe, args.overrides))
    d = recipe.data
    if d.streaming:
        raise UserError("a streamed dataset is encoded on the fly; set data.streaming=false to cache it.")
    if not d.cache_latents:
        d.cache_latents = True
    accelerator = Accelerator(cpu=multi_process_without_accelerator())
    # the plugin's run dir only receives the data report: a scratch dir, never output.dir (which
    # may hold a run), and the report then goes beside the cache it describes
    scratch = Path(tempfile.mkdtemp(prefix="ldm-lab-cache-"))
    try:
        plugin = get_trainer(recipe.trainer)(recipe, accelerator, scratch)
        plugin.build_cache(Path(args.out) if args.out else None)
        cache = plugin.cached
        if accelerator.is_main_process and (scratch / "data_report.json").exists():
            shutil.move(str(scratch / "data_report.json"), str(Path(cache.root) / "data_report.json"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if accelerator.is_main_process:
        m = cache.manifest
        hint = f"train with data.latent_cache={cache.root}" if args.out else "runs of this recipe use it"
        print(f"cache: {cache.root} ({m['rows']} rows, {len(cache.captions)} caption strings"
              + (f", {m['skipped']} rows skipped" if m.get("skipped") else "") + f"); {hint}")
    accelerator.wait_for_everyone()
    return 0
