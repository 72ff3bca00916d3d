"""Control adherence in the shapes world: does the generated shape follow the control map?

Fresh shapes rows (not the training rows) give a control image (mask or edges) and the true
mask. Two prompt sets, same seeds for the model with and without ControlNet:

* ``no_prompt``: the empty prompt: only the control can say where the shape goes (the base
  alone lands at chance); the ControlNet is also sampled in guess mode (control on the
  conditional branch only, residuals weighted by resolution: the paper's CFG resolution
  weighting), where guidance acts on the control;
* ``matching``: the row's own caption (text and control agree);
* ``conflicting``: the caption with another position (does the control win over the text?).

Score: IoU between the generated shape's mask (the analytic evaluator's segmentation) and the
control's mask; ``chance`` is the IoU of each control mask with the mask of another row.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from ..data import shapes as sw
from ..data.control import canny
from ..sampling import grid
from . import shapes as ev


def control_kind(opts) -> str | None:
    """What a ControlNet plugin's options say its control image is: ``canny`` (OpenCV edges of
    the image), ``edges`` (the shapes dataset's edges column), ``mask`` (its conditioning_image
    column), or None (another column: this evaluation cannot make it)."""
    if opts.preprocessor == "canny":
        return "canny"
    return {"edges": "edges", "conditioning_image": "mask"}.get(opts.conditioning_column)


def control_image(kind: str, image: Image.Image, mask, canny_low: int = 100, canny_high: int = 200) -> Image.Image:
    """The control image of ``kind`` for a shapes row (its image and boolean object mask)."""
    if kind == "mask":
        return Image.fromarray((mask * 255).astype(np.uint8)).convert("RGB")
    if kind == "canny":
        return canny(image, canny_low, canny_high)
    return sw.edges(image)


def control_eval(with_control: Callable, without: Callable, control_for: Callable, out: Path, n: int = 64,
                 seed: int = 4242, resolution: int = 64, guess_mode: bool = True) -> dict:
    """The evaluation above (``guess_mode``: also sample the ControlNet in guess mode without a
    prompt, where its pipeline has one: StableDiffusion3ControlNetPipeline has not)."""
    out = Path(out)
    world = sw.World(resolution=resolution)
    rows = [sw.row(world, seed, i) for i in range(n)]
    masks = [m > 0.5 for _, _, m in rows]
    controls = [control_for(img, m) for _, img, m in rows]
    rng = random.Random(f"control-eval-{seed}")
    conflicting = []
    for s, _, _ in rows:
        other = rng.choice([p for p in world.positions if p != s.position])
        conflicting.append(sw.Shape(s.color, s.shape, s.size, other, s.background))
    seeds = [seed + i for i in range(n)]
    chance = float(np.mean([ev.mask_iou(masks[i], masks[(i + 1) % n]) for i in range(n)]))
    result: dict = {"n": n, "chance_iou": chance}
    sets = (("no_prompt", None), ("matching", [s for s, _, _ in rows]), ("conflicting", conflicting))
    for name, targets in sets:
        prompts = [t.caption() for t in targets] if targets else [""] * n
        models = [("controlnet", lambda p, c, s: with_control(p, c, s, False))]
        if targets is None and guess_mode:
            models.append(("controlnet_guess_mode", lambda p, c, s: with_control(p, c, s, True)))
        models.append(("base", without))
        part = {}
        for model, fn in models:
            images = fn(prompts, controls, seeds)
            ious = [ev.mask_iou(ev.object_mask(im), m) for im, m in zip(images, masks)]
            part[model] = {"iou": float(np.mean(ious)), "iou_over_0.5": float(np.mean([i > 0.5 for i in ious]))}
            if targets:  # does the text still control colour, shape and position?
                adherence = ev.score(images, targets, world)
                part[model].update({k: adherence[k] for k in ("color", "shape", "position")})
            _save(out / name / model, images, prompts, seeds, controls, ious)
        result[name] = part
    ev.write_metrics(result, out / "metrics.json")
    return result


def _save(out: Path, images: list[Image.Image], prompts: list[str], seeds: list[int], controls, ious) -> None:
    (out / "samples").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (im, p, s, iou) in enumerate(zip(images, prompts, seeds, ious)):
        im.save(out / "samples" / f"{i:04d}.png")
        rows.append({"file_name": f"samples/{i:04d}.png", "prompt": p, "seed": s, "iou": iou})
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    k = min(16, len(images))
    pairs = [x for c, im in zip(controls[:k], images[:k]) for x in (c, im)]
    grid(pairs, [x for p, iou in zip(prompts[:k], ious[:k]) for x in ("control", f"IoU {iou:.2f} | {p}")]).save(out / "grid.png")
