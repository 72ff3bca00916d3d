"""``ldm-lab data shapes``: the procedural shapes world written as an imagefolder dataset, and the
shapes world narrowed by the --colors / --shapes / --sizes / --positions / --backgrounds flags
(which ``ldm-lab eval pipeline`` takes too)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..data import shapes as sw
from ..errors import UserError

AXES = (("colors", sw.COLORS), ("shapes", sw.SHAPES), ("sizes", sw.SIZES), ("positions", sw.POSITIONS),
        ("backgrounds", sw.BACKGROUNDS))


def shapes(args) -> int:
    if args.n < 1:
        raise UserError("--n must be at least 1.")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out '{out}' exists and is not empty; choose a new dir so nothing is overwritten.")
    sw.generate(out, args.n, seed=args.seed, world=restricted_world(args, sw.World(resolution=args.resolution)),
                heldout=args.heldout, caption=args.caption)
    print(f"wrote {args.n} rows to {out}")
    return 0


def restricted_world(args, world: sw.World) -> sw.World:
    """``world`` restricted to --colors / --shapes / --sizes / --positions / --backgrounds (held-out
    pairs kept where both their colour and shape remain)."""
    kw = {}
    for name, allowed in AXES:
        if getattr(args, name, None):
            kw[name] = _pick(getattr(args, name), allowed, name)
    if not kw:
        return world
    w = dataclasses.replace(world, **kw)
    w.holdout = tuple(p for p in w.holdout if p[0] in w.colors and p[1] in w.shapes)
    if all(w.is_heldout(sw.Shape(c, s, "small", "center", "white")) for c in w.colors for s in w.shapes):
        raise UserError("every colour-shape pair left by --colors/--shapes is held out; widen the choice.")
    return w


def _pick(text: str, allowed, name: str) -> tuple[str, ...]:
    vals = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in vals if v not in allowed]
    if bad or not vals:
        raise UserError(f"--{name} has {bad[0]!r}, which is not one of {', '.join(allowed)}." if bad
                        else f"--{name} is empty; give comma-separated values.")
    return tuple(vals)
