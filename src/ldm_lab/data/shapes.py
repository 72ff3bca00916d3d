"""The shapes world: a procedural caption-image dataset that a CPU can learn in minutes.

Every row is one coloured regular shape (circle, square, triangle, star, ...) of a given size
at one of nine positions on a plain background. The caption states all five attributes and
the row carries them as fields, plus a mask and an edge map as conditioning images.

Shapes are regular polygons centred on their position with circumradius set by their size,
so the mask centroid *is* the position and the farthest mask pixel *is* the size: the
analytic evaluator in ``ldm_lab.evaluation.shapes`` reads attributes back from those facts.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw

# the vocabulary (palettes, shapes, sizes, positions) lives with the recipe's choices
from ..recipe.choices import BACKGROUNDS, COLORS, DEFAULT_COLORS, DEFAULT_SHAPES, POSITIONS, SHAPES, SIZES

DEFAULT_HOLDOUT = (("red", "star"), ("blue", "circle"), ("green", "triangle"), ("yellow", "square"))

SUPERSAMPLE = 4


@dataclass(frozen=True)
class Shape:
    """The attributes of one image."""

    color: str
    shape: str
    size: str
    position: str
    background: str

    def caption(self) -> str:
        return f"a {self.size} {self.color} {self.shape} at the {self.position} on a {self.background} background"


@dataclass
class World:
    """Which attribute values a dataset draws from and which colour-shape pairs it holds out."""

    colors: tuple[str, ...] = DEFAULT_COLORS
    shapes: tuple[str, ...] = DEFAULT_SHAPES
    sizes: tuple[str, ...] = tuple(SIZES)
    positions: tuple[str, ...] = tuple(POSITIONS)
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)
    holdout: tuple[tuple[str, str], ...] = DEFAULT_HOLDOUT
    resolution: int = 64
    extra: dict = field(default_factory=dict)
    # std (0-255) of smooth colour blotches on the background (``blotches``: the masked-loss demo's
    # dirty backgrounds); 0 keeps the background flat
    background_noise: float = 0.0

    def __post_init__(self) -> None:
        for name, values, allowed in (
            ("colour", self.colors, COLORS),
            ("shape", self.shapes, SHAPES),
            ("size", self.sizes, SIZES),
            ("position", self.positions, POSITIONS),
            ("background", self.backgrounds, BACKGROUNDS),
        ):
            bad = [v for v in values if v not in allowed]
            if bad:
                raise ValueError(f"unknown {name} {bad[0]!r}; choose from {', '.join(allowed)}")
        self.colors, self.shapes = tuple(self.colors), tuple(self.shapes)
        self.sizes, self.positions = tuple(self.sizes), tuple(self.positions)
        self.backgrounds = tuple(self.backgrounds)
        self.holdout = tuple(tuple(p) for p in self.holdout)

    def is_heldout(self, s: Shape) -> bool:
        return (s.color, s.shape) in self.holdout

    def sample(self, rng: random.Random, heldout: bool = False) -> Shape:
        """Draw one attribute set; ``heldout`` picks from the held-out colour-shape pairs instead."""
        while True:
            if heldout:
                color, shape = rng.choice(self.holdout)
            else:
                color, shape = rng.choice(self.colors), rng.choice(self.shapes)
            s = Shape(color, shape, rng.choice(self.sizes), rng.choice(self.positions), rng.choice(self.backgrounds))
            if heldout or not self.is_heldout(s):
                return s

    def to_json(self) -> dict:
        d = asdict(self)
        d["holdout"] = [list(p) for p in self.holdout]
        return d

    @classmethod
    def from_json(cls, d: dict) -> World:
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of a regular shape with circumradius ``r`` whose area centroid is (cx, cy).

    Returns None for the circle (drawn as an ellipse).
    """
    if shape == "circle":
        return None
    if shape == "square":
        angles, radii = [45, 135, 225, 315], [r] * 4
    elif shape == "triangle":
        angles, radii = [-90, 30, 150], [r] * 3
    elif shape == "star":
        angles = [-90 + 36 * k for k in range(10)]
        radii = [r if k % 2 == 0 else 0.4 * r for k in range(10)]
    elif shape == "sparkle":
        angles = [-90 + 45 * k for k in range(8)]
        radii = [r if k % 2 == 0 else 0.38 * r for k in range(8)]
    elif shape == "heart":
        pts = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x, -y))
        # centre on the area centroid and scale to circumradius r
        arr = np.array(pts)
        arr -= _polygon_centroid(arr)
        arr *= r / np.sqrt((arr**2).sum(1)).max()
        return [(cx + x, cy + y) for x, y in arr]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return [(cx + rr * math.cos(math.radians(a)), cy + rr * math.sin(math.radians(a))) for a, rr in zip(angles, radii)]


def _polygon_centroid(p: np.ndarray) -> np.ndarray:
    x, y = p[:, 0], p[:, 1]
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    cross = x * y1 - x1 * y
    a = cross.sum() / 2
    return np.array([((x + x1) * cross).sum() / (6 * a), ((y + y1) * cross).sum() / (6 * a)])


def draw_mask(shape: str, cx: float, cy: float, r: float, resolution: int, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Anti-aliased coverage mask in [0, 1] of a shape at pixel coordinates (cx, cy)."""
    s = supersample
    img = Image.new("L", (resolution * s, resolution * s), 0)
    d = ImageDraw.Draw(img)
    poly = shape_polygon(shape, (cx + 0.5) * s, (cy + 0.5) * s, r * s)
    if poly is None:
        c = ((cx + 0.5) * s, (cy + 0.5) * s)
        d.ellipse([c[0] - r * s, c[1] - r * s, c[0] + r * s, c[1] + r * s], fill=255)
    else:
        d.polygon(poly, fill=255)
    img = img.resize((resolution, resolution), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.float32) / 255.0


def geometry(s: Shape, resolution: int, rng: random.Random | None = None) -> tuple[float, float, float]:
    """Centre and circumradius in pixels, with a little jitter when ``rng`` is given."""
    fx, fy = POSITIONS[s.position]
    r = SIZES[s.size] * resolution
    cx, cy = fx * resolution - 0.5, fy * resolution - 0.5
    if rng is not None:
        j = 0.03 * resolution
        cx += rng.uniform(-j, j)
        cy += rng.uniform(-j, j)
        r *= rng.uniform(0.92, 1.08)
    return cx, cy, r


def blotches(resolution: int, std: float, seed: int) -> np.ndarray:
    """Smooth colour blotches (H, W, 3) of standard deviation ``std``: Gaussian noise on a grid 8x
    coarser than the image, bicubic-upsampled (detail the shapes autoencoder can represent, unlike
    per-pixel noise, which it blurs away), rescaled to ``std``."""
    coarse = np.random.default_rng(seed).normal(0, 1, (max(2, resolution // 8),) * 2 + (3,)).astype(np.float32)
    up = cv2.resize(coarse, (resolution, resolution), interpolation=cv2.INTER_CUBIC)
    return up * (std / max(float(up.std()), 1e-6))


def render(s: Shape, resolution: int = 64, rng: random.Random | None = None, pattern: str = "solid",
           pattern_color: str | None = None, background_noise: float = 0.0) -> tuple[Image.Image, np.ndarray]:
    """Render one image. Returns the RGB image and its coverage mask.

    ``pattern="stripes"`` paints alternating diagonal stripes of ``color`` and ``pattern_color``
    (the two-tone subject used by the DreamBooth demo).
    """
    cx, cy, r = geometry(s, resolution, rng)
    mask = draw_mask(s.shape, cx, cy, r, resolution)
    fg = np.array(COLORS[s.color], dtype=np.float32)
    bg = np.array(BACKGROUNDS[s.background], dtype=np.float32)
    if rng is not None:  # small colour jitter so no two images are pixel-identical
        fg = np.clip(fg + np.array([rng.uniform(-10, 10) for _ in range(3)]), 0, 255)
        bg = np.clip(bg + np.array([rng.uniform(-6, 6) for _ in range(3)]), 0, 255)
    fg_img = np.broadcast_to(fg, (resolution, resolution, 3)).copy()
    if pattern == "stripes":
        second = np.array(COLORS[pattern_color or "yellow"], dtype=np.float32)
        yy, xx = np.mgrid[0:resolution, 0:resolution]
        period = max(4, resolution // 10)
        stripe = ((xx + yy) // (period // 2)) % 2 == 1
        fg_img[stripe] = second
    elif pattern != "solid":
        raise ValueError(f"unknown pattern {pattern!r}; use solid or stripes")
    m = mask[..., None]
    if background_noise > 0:  # drawn after every other random choice: flat-background rows stay as they were
        bg = bg + blotches(resolution, background_noise, rng.getrandbits(32) if rng else 0)
    out = fg_img * m + bg * (1 - m)
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8)), mask


def edges(image: Image.Image) -> Image.Image:
    """Canny edge map (OpenCV) of an image, as a 3-channel image."""

    gray = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)
    e = cv2.Canny(gray, 50, 150)
    return Image.fromarray(e).convert("RGB")


def row(world: World, seed: int, index: int, heldout: bool = False) -> tuple[Shape, Image.Image, np.ndarray]:
    """Row ``index`` of the dataset with ``seed``: independent of how many rows are written."""
    rng = random.Random(f"shapes-{seed}-{index}-{int(heldout)}")
    s = world.sample(rng, heldout=heldout)
    img, mask = render(s, world.resolution, rng, background_noise=world.background_noise)
    return s, img, mask


class _KeepMissing(dict):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def caption_from(template: str, s: Shape) -> str:
    """``template`` with {color} {shape} {size} {position} {background} filled in; other fields
    (such as DreamBooth's ``{id}``) are kept as they are."""
    return template.format_map(_KeepMissing(asdict(s)))


def generate(out: str | Path, n: int, seed: int = 0, world: World | None = None, heldout: bool = False,
             caption: str | None = None) -> Path:
    """Write ``n`` rows as a Hugging Face imagefolder dataset in ``out``.

    ``caption`` is a template for the ``text`` column (see ``caption_from``); the default is
    the full shapes caption.

    Layout: ``out/images/*.png``, ``out/conditioning/{mask,edges}/*.png`` and
    ``out/metadata.jsonl`` with ``file_name``, ``text``, the attributes and the conditioning
    paths; ``out/world.json`` records the world (palettes, held-out pairs, resolution).
    """
    world = world or World()
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "conditioning" / "mask").mkdir(parents=True, exist_ok=True)
    (out / "conditioning" / "edges").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        s, img, mask = row(world, seed, i, heldout=heldout)
        name = f"{i:06d}.png"
        img.save(out / "images" / name)
        Image.fromarray((mask * 255).astype(np.uint8)).convert("RGB").save(out / "conditioning" / "mask" / name)
        edges(img).save(out / "conditioning" / "edges" / name)
        rows.append({
            "file_name": f"images/{name}",
            "text": caption_from(caption, s) if caption else s.caption(),
            **asdict(s),
            "heldout": world.is_heldout(s),
            "conditioning_image_file_name": f"conditioning/mask/{name}",
            "edges_file_name": f"conditioning/edges/{name}",
        })
    with open(out / "metadata.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    meta = {"world": world.to_json(), "n": n, "seed": seed, "heldout": heldout}
    (out / "world.json").write_text(json.dumps(meta, indent=2))
    return out


def load_world(path: str | Path) -> World:
    """The World recorded in a dataset dir (or the default world when none is recorded)."""
    p = Path(path) / "world.json"
    if p.exists():
        return World.from_json(json.loads(p.read_text())["world"])
    return World()


def prompts(world: World, n: int, seed: int = 0, heldout: bool = False) -> list[Shape]:
    """Fixed evaluation prompt set: ``n`` attribute sets, seen or held-out colour-shape pairs."""
    rng = random.Random(f"prompts-{seed}-{int(heldout)}")
    return [world.sample(rng, heldout=heldout) for _ in range(n)]


def parse_caption(text: str) -> Shape | None:
    """The attributes a shapes caption states (the inverse of ``Shape.caption``), or None."""

    m = re.fullmatch(r"a (\w+) (\w+) (\w+) at the ([\w ]+?) on a (\w+) background", text.strip().lower())
    if not m:
        return None
    size, color, shape, position, background = m.groups()
    if size in SIZES and color in COLORS and shape in SHAPES and position in POSITIONS and background in BACKGROUNDS:
        return Shape(color, shape, size, position, background)
    return None
