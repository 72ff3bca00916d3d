"""Analytic evaluator for the shapes world: read the five attributes back from an RGB image.

No learned model is involved, so the numbers mean the same thing for every run:

* background: nearest palette background to the median of the border pixels;
* foreground: each pixel's coverage ``alpha`` is its projection on the line from the measured
  background colour to the measured shape colour (so blur and anti-aliasing cut at half
  coverage); the largest connected blob with ``alpha > 0.5`` is the shape;
* colour: nearest palette colour to the median of the blob's eroded interior;
* position: 3x3 cell of the blob centroid (cuts at 3/8 and 5/8 of the side);
* shape and size: the shape whose ideal mask (``shapes.draw_mask`` at the blob centroid, with
  the circumradius implied by the blob area) overlaps the blob best; size compares that
  circumradius with the midpoint of ``SIZES``.

Works at any resolution (large images are box-downscaled to 64 px first) and on the blurry,
noisy images a small diffusion model produces.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ldm_lab.data import shapes as sw

ATTRIBUTES = ("color", "shape", "size", "position", "background")
WORK_RES = 64  # larger images are downscaled to this side before reading
SEED_THRESHOLD = 40.0  # RGB distance from the background that marks a first-pass foreground pixel
MIN_AREA_FRAC = 0.003  # smallest blob (fraction of the image) that counts as a shape
BLURS = (0.0, 1.0, 2.0)
NEAR = 7
CLIP_LO = 0.0
SEED_BLUR = 1.0
ALPHA_BLUR = 0
RADIUS_SCALES = (0.96, 1.04)  # circumradii tried around the area-implied one


def _palette(names, table) -> tuple[list[str], np.ndarray]:
    names = list(names)
    return names, np.array([table[n] for n in names], dtype=np.float32)


def _nearest(rgb: np.ndarray, palette: tuple[list[str], np.ndarray]) -> str:
    names, colors = palette
    return names[int(np.argmin(((colors - rgb) ** 2).sum(1)))]


@lru_cache(maxsize=None)
def _area_factor(shape: str) -> float:
    """Area of ``shape`` with circumradius 1."""
    poly = sw.shape_polygon(shape, 0.0, 0.0, 1.0)
    if poly is None:
        return math.pi
    x, y = np.array(poly).T
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)) / 2)


@lru_cache(maxsize=8192)
def _template(shape: str, fx: float, fy: float, r: float, blur: float) -> np.ndarray:
    """Ideal coverage mask of ``shape``, Gaussian-blurred by ``blur`` px, centred at
    (half + fx, half + fy) in a square crop of side ``2 * half + 1``; fx, fy in [0, 1)."""
    half = _half(r, blur)
    t = sw.draw_mask(shape, half + fx, half + fy, r, 2 * half + 1)
    return cv2.GaussianBlur(t, (0, 0), blur) if blur else t


def _half(r: float, blur: float) -> int:
    return math.ceil(r + 3 * blur) + 1


def _window(a: np.ndarray, ix: int, iy: int, half: int) -> np.ndarray:
    """The (2 half + 1)^2 window of ``a`` centred on pixel (ix, iy), zero outside ``a``."""
    h, w = a.shape
    out = np.zeros((2 * half + 1, 2 * half + 1), dtype=np.float32)
    x0, y0 = ix - half, iy - half
    ys, xs = slice(max(y0, 0), min(y0 + 2 * half + 1, h)), slice(max(x0, 0), min(x0 + 2 * half + 1, w))
    if ys.start < ys.stop and xs.start < xs.stop:
        out[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0] = a[ys, xs]
    return out


def _fit_shape(alpha: np.ndarray, cx: float, cy: float, shape_names) -> tuple[str, float, float]:
    """Best (shape, circumradius, soft IoU) for a coverage map centred at (cx, cy).

    Each shape is tried at the circumradii its area implies (coverage sums are blur-invariant)
    and at a few blurs. Templates are cached on a quarter-pixel grid of centre and radius;
    template pixels outside the image are ignored (shapes near the edge may be clipped).
    """
    area = float(alpha.sum())
    qx, qy = round(cx * 4) / 4, round(cy * 4) / 4
    ix, iy = math.floor(qx), math.floor(qy)
    cands = {(name, round(math.sqrt(area / _area_factor(name)) * k * 4) / 4, b)
             for name in shape_names for k in RADIUS_SCALES for b in BLURS}
    big = max(_half(r, b) for _, r, b in cands)
    win, inside = _window(alpha, ix, iy, big), _window(np.ones_like(alpha), ix, iy, big)
    best = ("", 0.0, -1.0)
    for name, r, b in sorted(cands):
        t = _template(name, qx - ix, qy - iy, r, b)
        o = big - _half(r, b)
        crop = (slice(o, o + t.shape[0]), slice(o, o + t.shape[1]))
        t = t * inside[crop]
        inter = float(np.minimum(t, win[crop]).sum())
        iou = inter / (float(t.sum()) + area - inter + 1e-6)
        if iou > best[2]:
            best = (name, r, iou)
    return best


def _blob(values: np.ndarray, threshold: float, min_area: float) -> np.ndarray | None:
    """Largest 8-connected blob with ``values > threshold`` (holes filled), or None if too small."""
    fg = (values > threshold).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    if n < 2:
        return None
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    if stats[k, cv2.CC_STAT_AREA] < min_area:
        return None
    # fill holes: flood the outside from a padded corner; what stays unreached is the blob or a hole
    outside = cv2.copyMakeBorder((labels != k).astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=1)
    cv2.floodFill(outside, None, (0, 0), 0)
    return (labels == k) | (outside[1:-1, 1:-1] > 0)


def _interior_median(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    inner = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    return np.median(rgb[inner if inner.sum() >= 4 else mask], axis=0)


def read_image(image: Image.Image, world: sw.World | None = None) -> dict:
    """Read colour, shape, size, position and background back from one image.

    Choices are restricted to ``world``'s palettes when given, else every palette entry in
    ``ldm_lab.data.shapes``. Returns the five attributes, ``found`` (False, with the
    attributes None except the background, when no blob of reasonable size exists) and
    diagnostics: ``iou`` of the best ideal mask, ``radius`` and ``centroid`` as fractions of
    the side, and ``area`` (fraction of the image).
    """
    image = image.convert("RGB")
    if max(image.size) > WORK_RES:
        image = image.resize((WORK_RES, WORK_RES), Image.Resampling.BOX)
    rgb = np.asarray(image, dtype=np.float32)
    h, w, _ = rgb.shape
    colors = _palette(world.colors if world else sw.COLORS, sw.COLORS)
    backgrounds = _palette(world.backgrounds if world else sw.BACKGROUNDS, sw.BACKGROUNDS)
    shape_names = tuple(world.shapes if world else sw.SHAPES)

    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])
    bg = np.median(border, axis=0)
    out = {a: None for a in ATTRIBUTES} | {"found": False, "iou": 0.0, "radius": None, "centroid": None, "area": 0.0}
    out["background"] = _nearest(bg, backgrounds)

    min_area = max(4.0, MIN_AREA_FRAC * h * w)
    smooth = cv2.GaussianBlur(rgb, (0, 0), SEED_BLUR) if SEED_BLUR else rgb
    seed = _blob(np.linalg.norm(smooth - bg, axis=2), SEED_THRESHOLD, min_area)
    if seed is None:
        return out
    # coverage = projection on the background -> shape colour line; cut at half coverage
    d = _interior_median(rgb, seed) - bg
    alpha = (rgb - bg) @ d / max(float(d @ d), 1e-6)
    if ALPHA_BLUR:
        alpha = cv2.GaussianBlur(alpha, (0, 0), ALPHA_BLUR)
    mask = _blob(alpha, 0.5, min_area)
    if mask is None:
        return out

    ys, xs = np.nonzero(mask)
    cx, cy = float(xs.mean()), float(ys.mean())
    near = cv2.dilate(mask.astype(np.uint8), np.ones((NEAR, NEAR), np.uint8)) > 0
    shape, r, iou = _fit_shape(np.clip(alpha, CLIP_LO, 1) * near, cx, cy, shape_names)
    side = math.sqrt(h * w)
    col = lambda f: ("left", "", "right")[(f > 3 / 8) + (f > 5 / 8)]  # noqa: E731
    row = lambda f: ("top", "", "bottom")[(f > 3 / 8) + (f > 5 / 8)]  # noqa: E731
    fx, fy = (cx + 0.5) / w, (cy + 0.5) / h
    out.update(
        found=True,
        color=_nearest(_interior_median(rgb, mask), colors),
        shape=shape,
        size="large" if r / side > (sw.SIZES["small"] + sw.SIZES["large"]) / 2 else "small",
        position=" ".join(p for p in (row(fy), col(fx)) if p) or "center",
        iou=iou,
        radius=r / side,
        centroid=(fx, fy),
        area=float(mask.sum()) / (h * w),
    )
    return out


def score(images: list[Image.Image], targets: list[sw.Shape], world: sw.World | None = None) -> dict:
    """Per-attribute adherence of ``images`` to ``targets``; ``all`` needs all five right.

    Images where no shape is found count as wrong on every attribute, the background included.
    """
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} images but {len(targets)} targets")
    n = len(images)
    if n == 0:
        return {a: None for a in (*ATTRIBUTES, "all", "found")} | {"n": 0}
    hits = {a: 0 for a in (*ATTRIBUTES, "all", "found")}
    for img, t in zip(images, targets):
        got = read_image(img, world)
        ok = [got["found"] and got[a] == getattr(t, a) for a in ATTRIBUTES]
        for a, good in zip(ATTRIBUTES, ok):
            hits[a] += good
        hits["all"] += all(ok)
        hits["found"] += got["found"]
    return {k: v / n for k, v in hits.items()} | {"n": n}


def evaluate_dir(path: str | Path, world: sw.World | None = None) -> dict:
    """Score a dir against its own labels; writes nothing.

    Reads ``metadata.jsonl`` (an imagefolder written by ``shapes.generate``) or ``samples.jsonl``
    (generated samples: ``file_name`` plus the attribute fields and optionally ``heldout``).
    ``world`` defaults to the dir's ``world.json`` when present, else all palettes. Returns the
    overall scores at top level plus ``seen`` / ``heldout`` sub-dicts when rows carry ``heldout``.
    """
    path = Path(path)
    for name in ("samples.jsonl", "metadata.jsonl"):
        if (path / name).exists():
            rows = [json.loads(line) for line in (path / name).read_text().splitlines() if line.strip()]
            break
    else:
        raise FileNotFoundError(f"{path} has neither samples.jsonl nor metadata.jsonl")
    if world is None and (path / "world.json").exists():
        world = sw.load_world(path)
    targets = [sw.Shape(**{a: r[a] for a in ATTRIBUTES}) for r in rows]
    images = []
    for r in rows:
        with Image.open(path / r["file_name"]) as im:
            images.append(im.convert("RGB"))
    result = score(images, targets, world) | {"path": str(path), "source": name}
    for split, flag in (("seen", False), ("heldout", True)):
        idx = [i for i, r in enumerate(rows) if "heldout" in r and bool(r["heldout"]) == flag]
        if idx:
            result[split] = score([images[i] for i in idx], [targets[i] for i in idx], world)
    return result


def write_metrics(result: dict, path: str | Path) -> Path:
    """Write ``result`` as indented JSON (parent dirs created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return path
