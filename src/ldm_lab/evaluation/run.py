"""Sample the fixed shapes evaluation prompts from a model and score them with the analytic
evaluator: used at the end of training (in-memory modules) and by ``ldm-lab eval pipeline``
(a saved pipeline, optionally with LoRAs)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from ..data import shapes
from ..sampling import grid
from . import shapes as ev

SampleFn = Callable[[list[str], list[int], str, int, float], list[Image.Image]]


def shapes_eval(sample: SampleFn, world: shapes.World, out: Path, n: int, heldout_n: int, seed: int,
                sampler: str, steps: int, guidance: float) -> dict:
    """``n`` seen and ``heldout_n`` held-out prompts of ``world`` with fixed seeds -> ``out``
    (samples/, samples.jsonl, grid.png, metrics.json); returns the scores."""
    out = Path(out)
    seen = shapes.prompts(world, n, seed=seed)
    held = shapes.prompts(world, heldout_n, seed=seed, heldout=True) if heldout_n and world.holdout else []
    targets = seen + held
    seeds = [seed + i for i in range(len(targets))]
    images = sample([s.caption() for s in targets], seeds, sampler, steps, guidance)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (im, s) in enumerate(zip(images, targets)):
        name = f"samples/{i:05d}.png"
        im.save(out / name)
        rows.append({"file_name": name, "text": s.caption(), **s.__dict__, "heldout": i >= len(seen), "seed": seeds[i]})
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "world.json").write_text(json.dumps({"world": world.to_json()}))

    grid(images[:32], [s.caption() for s in targets[:32]]).save(out / "grid.png")
    result = ev.evaluate_dir(out, world)
    result["sampler"] = {"name": sampler, "steps": steps, "guidance_scale": guidance}
    ev.write_metrics(result, out / "metrics.json")
    return result
