"""Subject-driven fine-tuning measured in the shapes world (DreamBooth).

Given a subject (a shape and colour the instance images show) and its identifier, sample two
fixed prompt sets on every (position, background) context, same seeds for every model:

* **subject prompts** (``"a large {id} star at the {position} on a {background} background"``):
  *fidelity* is the share of images the analytic evaluator reads as the subject (its shape and
  its colour); *prompt control* is position and background adherence on the contexts no
  instance image shows (``new_contexts``), beside the contexts the instances show.
* **class prompts** (``"a large {color} star at ..."``, colours cycled): the evaluator's usual
  adherence to the asked colour, shape, position and background; *language drift* shows as
  fewer ordinary stars (``shape``) and more subject-shaped ones (``subject_leak``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from ..data import shapes as sw
from ..sampling import grid
from . import shapes as ev

SampleFn = Callable[[list[str], list[int], str, int, float], list[Image.Image]]


def contexts() -> list[tuple[str, str]]:
    return [(p, b) for p in sw.POSITIONS for b in sw.BACKGROUNDS]


def subject_eval(sample: SampleFn, identifier: str, subject: dict, instance_contexts: set[tuple[str, str]],
                 subject_template: str, class_template: str, out: Path, per_context: int = 4, seed: int = 4321,
                 sampler: str = "dpm++", steps: int = 20, guidance: float = 2.5) -> dict:
    """Sample and score both prompt sets into ``out/subject`` and ``out/class``; returns
    ``{"subject": {...}, "class": {...}}`` (see the module docstring)."""
    out = Path(out)
    size = subject.get("size", "large")
    colors = [c for c in sw.DEFAULT_COLORS]
    world = sw.World(colors=tuple(dict.fromkeys(colors + [subject["color"]])),
                     shapes=tuple(dict.fromkeys(list(sw.DEFAULT_SHAPES) + [subject["shape"]])), holdout=())
    ctx = [c for c in contexts() for _ in range(per_context)]
    seeds = [seed + i for i in range(len(ctx))]
    fill = lambda t, **kw: t.replace("{id}", identifier).format(size=size, **kw)  # noqa: E731
    subj_prompts = [fill(subject_template, position=p, background=b) for p, b in ctx]
    class_prompts = [fill(class_template, color=colors[i % len(colors)], position=p, background=b)
                     for i, (p, b) in enumerate(ctx)]

    subj_images = _sample_to(sample, subj_prompts, seeds, sampler, steps, guidance, out / "subject")
    reads = [ev.read_image(im, world) for im in subj_images]
    is_subject = [r["found"] and r["shape"] == subject["shape"] and r["color"] == subject["color"] for r in reads]

    def part(idx: list[int]) -> dict:
        n = max(len(idx), 1)
        pos = [reads[i]["found"] and reads[i]["position"] == ctx[i][0] for i in idx]
        bg = [reads[i]["found"] and reads[i]["background"] == ctx[i][1] for i in idx]
        return {"n": len(idx),
                "fidelity": sum(is_subject[i] for i in idx) / n,
                "shape": sum(reads[i]["shape"] == subject["shape"] for i in idx) / n,
                "color": sum(reads[i]["color"] == subject["color"] for i in idx) / n,
                "position": sum(pos) / n, "background": sum(bg) / n,
                "all": sum(s and p and b for s, p, b in zip((is_subject[i] for i in idx), pos, bg)) / n}

    seen = [i for i, c in enumerate(ctx) if c in instance_contexts]
    new = [i for i, c in enumerate(ctx) if c not in instance_contexts]
    subject_result = part(list(range(len(ctx)))) | {"instance_contexts": part(seen), "new_contexts": part(new),
                                                   "prompt_example": subj_prompts[0]}

    class_images = _sample_to(sample, class_prompts, seeds, sampler, steps, guidance, out / "class")
    targets = [sw.parse_caption(p) for p in class_prompts]
    if any(t is None for t in targets):
        raise ValueError(f"eval class prompt {class_prompts[0]!r} is not a shapes caption; use a template like "
                         "'a {size} {color} star at the {position} on a {background} background'")
    class_result = ev.score(class_images, targets, world)
    class_reads = [ev.read_image(im, world) for im in class_images]
    class_result["subject_leak"] = sum(r["shape"] == subject["shape"] for r in class_reads) / len(class_reads)
    class_result["prompt_example"] = class_prompts[0]
    result = {"subject": subject_result, "class": class_result,
              "sampler": {"name": sampler, "steps": steps, "guidance_scale": guidance, "seed": seed}}
    ev.write_metrics(result, out / "metrics.json")
    return result


def _sample_to(sample: SampleFn, prompts: list[str], seeds: list[int], sampler: str, steps: int, guidance: float,
               out: Path) -> list[Image.Image]:

    images = sample(prompts, seeds, sampler, steps, guidance)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (im, p, s) in enumerate(zip(images, prompts, seeds)):
        name = f"samples/{i:05d}.png"
        im.save(out / name)
        rows.append({"file_name": name, "prompt": p, "seed": s})
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    grid(images[:48], prompts[:48]).save(out / "grid.png")
    return images


def instance_subject(rows: list[dict]) -> tuple[dict, set[tuple[str, str]]] | None:
    """The subject (most common shape, colour, size) and the (position, background) contexts of
    instance rows written by ``ldm-lab data shapes``; None when the rows carry no attributes."""

    if not rows or not all(k in rows[0] for k in ("shape", "color", "position", "background")):
        return None
    common = {k: Counter(r[k] for r in rows).most_common(1)[0][0] for k in ("shape", "color", "size") if k in rows[0]}
    return common, {(r["position"], r["background"]) for r in rows}
