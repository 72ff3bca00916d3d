"""Analytic evaluator for the shapes world: read the five attributes back from an RGB image.

No learned model is involved, so a number means the same thing in every run:

* background: nearest palette background to the median of the border pixels;
* shape colour: median of the blob's "core" (the quarter of its pixels farthest from the
  background, ranked on a smoothed copy), snapped to the nearest palette colour;
* coverage ``alpha``: each pixel projected on the line from the background colour to the core
  colour, so anti-aliasing and blur cut at half coverage; the largest connected blob with
  ``alpha > 0.5`` (holes filled) is the shape;
* position: 3x3 cell of the blob centroid (cuts at 3/8 and 5/8 of the side);
* shape and size: the ideal mask (``shapes.draw_mask`` at the centroid, circumradius implied by
  the coverage area, optionally Gaussian-blurred) with the best soft IoU against ``alpha``
  names the shape; its circumradius against the midpoint of ``SIZES`` names the size.

Works at any resolution (larger images are box-downscaled to 64 px first) and on the blurry,
noisy images a small diffusion model produces.
"""

from __future__ import annotations

import json
import math
from functools import cache, lru_cache
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ldm_lab.data import shapes as sw
from ldm_lab.errors import UserError

ATTRIBUTES = ("color", "shape", "size", "position", "background")
WORK_RES = 64  # larger images are downscaled to this side before reading
SEED_THRESHOLD = 40.0  # RGB distance from the background of a first-pass foreground pixel
SEED_BLUR = 1.0  # Gaussian sigma (px) of the copy used to find the blob and rank its core
CORE_FRAC = 0.25  # share of blob pixels (farthest from the background) that give its colour
MIN_AREA_FRAC = 0.003  # smallest blob (fraction of the image) that counts as a shape
RADIUS_SCALES = (0.96, 1.04)  # circumradii tried around the area-implied one
CENTRE_STEPS = 2  # template centres are cached on a 1/CENTRE_STEPS-pixel grid
BLURS = (0.0, 1.0, 2.0)  # template blurs (px) tried, so blurry samples still match their shape


def _nearest(rgb: np.ndarray, names, table: dict) -> str:
    names = list(names)
    colors = np.array([table[n] for n in names], dtype=np.float32)
    return names[int(np.argmin(((colors - rgb) ** 2).sum(1)))]


@cache
def _area_factor(shape: str) -> float:
    """Area of ``shape`` with circumradius 1."""
    poly = sw.shape_polygon(shape, 0.0, 0.0, 1.0)
    if poly is None:
        return math.pi
    x, y = np.array(poly).T
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)) / 2)


def _half(r: float, blur: float) -> int:
    return math.ceil(r + 3 * blur) + 1


@lru_cache(maxsize=8192)
def _template(shape: str, fx: float, fy: float, r: float, blur: float) -> np.ndarray:
    """Ideal coverage of ``shape`` blurred by ``blur``, centred at (half + fx, half + fy) in a
    square crop of side ``2 * half + 1``; fx, fy in [0, 1) are sub-pixel offsets."""
    half = _half(r, blur)
    t = sw.draw_mask(shape, half + fx, half + fy, r, 2 * half + 1)
    return cv2.GaussianBlur(t, (0, 0), blur) if blur else t


def _window(a: np.ndarray, ix: int, iy: int, half: int) -> np.ndarray:
    """The (2 half + 1)^2 window of ``a`` centred on pixel (ix, iy), zero outside ``a``."""
    h, w = a.shape
    out = np.zeros((2 * half + 1, 2 * half + 1), dtype=np.float32)
    x0, y0 = ix - half, iy - half
    ys, xs = slice(max(y0, 0), min(y0 + 2 * half + 1, h)), slice(max(x0, 0), min(x0 + 2 * half + 1, w))
    if ys.start < ys.stop and xs.start < xs.stop:
        out[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0] = a[ys, xs]
    return out


def _fit_shape(alpha: np.ndarray, cx: float, cy: float, shape_names) -> tuple[str, float, float, float]:
    """Best (shape, circumradius, soft IoU, blur) for a coverage map centred at (cx, cy).

    Each shape is tried at the circumradii its area implies (coverage sums survive blur) and
    at each of ``BLURS``. Templates are cached on a half-pixel grid of centre, quarter-pixel of radius;
    template pixels outside the image are ignored (shapes at the edge may be clipped).
    """
    area = float(alpha.sum())
    qx, qy = round(cx * CENTRE_STEPS) / CENTRE_STEPS, round(cy * CENTRE_STEPS) / CENTRE_STEPS
    ix, iy = math.floor(qx), math.floor(qy)
    radii = {
        (name, round(math.sqrt(area / _area_factor(name)) * k * 4) / 4) for name in shape_names for k in RADIUS_SCALES
    }
    cands = [(name, r, b) for name, r in sorted(radii) for b in BLURS]
    big = max(_half(r, b) for _, r, b in cands)
    win, inside = _window(alpha, ix, iy, big), _window(np.ones_like(alpha), ix, iy, big)
    best = ("", 0.0, -1.0, 0.0)
    for name, r, b in cands:
        t = _template(name, qx - ix, qy - iy, r, b)
        o = big - _half(r, b)
        crop = (slice(o, o + t.shape[0]), slice(o, o + t.shape[1]))
        t = t * inside[crop]
        inter = float(np.minimum(t, win[crop]).sum())
        iou = inter / (float(t.sum()) + area - inter + 1e-6)
        if iou > best[2]:
            best = (name, r, iou, b)
    return best


def _blob(values: np.ndarray, threshold: float, min_area: float) -> np.ndarray | None:
    """Largest 8-connected blob with ``values > threshold`` (holes filled), or None if too small."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats((values > threshold).astype(np.uint8), connectivity=8)
    if n < 2:
        return None
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    if stats[k, cv2.CC_STAT_AREA] < min_area:
        return None
    # fill holes: flood the outside from a padded corner; what it cannot reach is blob or hole
    outside = cv2.copyMakeBorder((labels != k).astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=1)
    cv2.floodFill(outside, None, (0, 0), 0)
    return (labels == k) | (outside[1:-1, 1:-1] > 0)


def _core_color(rgb: np.ndarray, dist: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Median colour of the ``CORE_FRAC`` of ``mask`` pixels with the largest ``dist``."""
    d = dist[mask]
    k = min(d.size, max(4, int(CORE_FRAC * d.size)))
    return np.median(rgb[mask][np.argpartition(d, d.size - k)[-k:]], axis=0)


def _segment(image: Image.Image):
    """(rgb, background colour, distance map, coverage alpha, shape mask or None) of an image,
    box-downscaled to ``WORK_RES`` when larger."""
    image = image.convert("RGB")
    if max(image.size) > WORK_RES:
        k = WORK_RES / max(image.size)
        image = image.resize((round(image.width * k), round(image.height * k)), Image.Resampling.BOX)
    rgb = np.asarray(image, dtype=np.float32)
    h, w, _ = rgb.shape
    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])
    bg = np.median(border, axis=0)
    min_area = max(4.0, MIN_AREA_FRAC * h * w)
    dist = np.linalg.norm(cv2.GaussianBlur(rgb, (0, 0), SEED_BLUR) - bg, axis=2)
    seed = _blob(dist, SEED_THRESHOLD, min_area)
    if seed is None:
        return rgb, bg, dist, None, None
    d = _core_color(rgb, dist, seed) - bg
    alpha = (rgb - bg) @ d / max(float(d @ d), 1e-6)  # coverage by the shape colour
    return rgb, bg, dist, alpha, _blob(alpha, 0.5, min_area)


def object_mask(image: Image.Image) -> np.ndarray | None:
    """The shape's mask (bool; at ``WORK_RES`` for larger images) as ``read_image`` finds it, or
    None when no shape is found."""
    return _segment(image)[4]


def mask_iou(a: np.ndarray | None, b: np.ndarray) -> float:
    """IoU of two boolean masks of one size (0 when ``a`` is None: nothing was drawn)."""
    if a is None:
        return 0.0
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def background_noise(rgb: np.ndarray, mask: np.ndarray | None) -> float:
    """How far from flat the background is: the per-channel standard deviation (0-255) of the
    pixels away from the shape (its mask grown by 3 px; the whole image when none is found)."""
    away = np.ones(rgb.shape[:2], bool) if mask is None else \
        cv2.dilate(mask.astype(np.uint8), np.ones((7, 7), np.uint8)) == 0
    return float(rgb[away].std(axis=0).mean()) if away.any() else 0.0


def read_image(image: Image.Image, world: sw.World | None = None) -> dict:
    """Read colour, shape, size, position and background back from one image.

    Choices are restricted to ``world``'s palettes when given, else every palette entry in
    ``ldm_lab.data.shapes``. Returns the five attributes and ``found``; when no blob of
    reasonable size exists ``found`` is False and all attributes but the background are None.
    Diagnostics: ``iou`` (soft IoU of the best ideal mask), ``blur`` (its blur, px at the
    working resolution), ``radius`` and ``centroid`` (fractions of the side) and ``area``
    (coverage as a fraction of the image), ``background_noise`` (:func:`background_noise`).
    """
    rgb, bg, dist, alpha, mask = _segment(image)
    h, w, _ = rgb.shape
    diagnostics = {"iou": 0.0, "blur": None, "radius": None, "centroid": None, "area": 0.0}
    out = dict.fromkeys(ATTRIBUTES) | {"found": False} | diagnostics
    out["background"] = _nearest(bg, world.backgrounds if world else sw.BACKGROUNDS, sw.BACKGROUNDS)
    out["background_noise"] = background_noise(rgb, mask)
    if mask is None:
        return out

    ys, xs = np.nonzero(mask)
    cx, cy = float(xs.mean()), float(ys.mean())
    near = cv2.dilate(mask.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0  # room for blurred edges
    shape, r, iou, blur = _fit_shape(np.clip(alpha, 0, 1) * near, cx, cy, tuple(world.shapes if world else sw.SHAPES))
    side = math.sqrt(h * w)
    fx, fy = (cx + 0.5) / w, (cy + 0.5) / h
    row = ("top", "", "bottom")[(fy > 3 / 8) + (fy > 5 / 8)]
    col = ("left", "", "right")[(fx > 3 / 8) + (fx > 5 / 8)]
    out.update(
        found=True,
        color=_nearest(_core_color(rgb, dist, mask), world.colors if world else sw.COLORS, sw.COLORS),
        shape=shape,
        size="large" if r / side > (sw.SIZES["small"] + sw.SIZES["large"]) / 2 else "small",
        position=f"{row} {col}".strip() or "center",
        iou=iou,
        blur=blur,
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
    keys = (*ATTRIBUTES, "all", "found")
    if not images:
        return dict.fromkeys(keys) | {"n": 0}
    hits = dict.fromkeys(keys, 0)
    noise = 0.0
    for img, t in zip(images, targets):
        got = read_image(img, world)
        noise += got["background_noise"]
        ok = [got["found"] and got[a] == getattr(t, a) for a in ATTRIBUTES]
        for a, good in zip(ATTRIBUTES, ok):
            hits[a] += good
        hits["all"] += all(ok)
        hits["found"] += got["found"]
    return {k: v / len(images) for k, v in hits.items()} | {"n": len(images), "background_noise": noise / len(images)}


def _read_rows(f: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            raise UserError(f"{f} line {n} is not a JSON object; fix or remove that line.")
        rows.append(row)
    return rows


def evaluate_dir(path: str | Path, world: sw.World | None = None) -> dict:
    """Score a dir's images against its own labels; writes nothing.

    Reads ``samples.jsonl`` (generated samples: ``file_name``, the attribute fields, optionally
    ``heldout``) or else ``metadata.jsonl`` (an imagefolder written by ``shapes.generate``).
    ``world`` defaults to the dir's ``world.json`` when present, else all palettes. Returns the
    overall scores at top level, ``source`` (which file was read), and ``seen`` / ``heldout``
    sub-dicts of the same scores for the rows whose ``heldout`` is False / True (when present).
    """
    path = Path(path)
    for source in ("samples.jsonl", "metadata.jsonl"):
        if (path / source).exists():
            rows = _read_rows(path / source)
            break
    else:
        raise FileNotFoundError(f"{path} has neither samples.jsonl nor metadata.jsonl")
    if world is None and (path / "world.json").exists():
        world = sw.load_world(path)
    rows = [r for r in rows if "file_name" in r and (all(a in r for a in ATTRIBUTES) or _parsed(r))]
    if not rows:
        raise UserError(f"{path / source} has no rows with a file_name and shapes attributes or a shapes caption; "
                        "give a dir that ldm-lab sample or ldm-lab data shapes wrote.")
    targets = [sw.Shape(**{a: r[a] for a in ATTRIBUTES}) if all(a in r for a in ATTRIBUTES) else _parsed(r)
               for r in rows]
    if world is not None:  # samples from `ldm-lab sample` carry only their prompt
        for r, t in zip(rows, targets):
            r.setdefault("heldout", world.is_heldout(t))
    images = open_images(path, rows, path / source)
    result = score(images, targets, world) | {"source": source}
    for split, flag in (("seen", False), ("heldout", True)):
        idx = [i for i, r in enumerate(rows) if "heldout" in r and bool(r["heldout"]) == flag]
        if idx:
            result[split] = score([images[i] for i in idx], [targets[i] for i in idx], world)
    for attr in ("color", "shape"):  # adherence per asked-for value: how well each concept is drawn
        by = {}
        for value in sorted({getattr(t, attr) for t in targets}):
            idx = [i for i, t in enumerate(targets) if getattr(t, attr) == value]
            s = score([images[i] for i in idx], [targets[i] for i in idx], world)
            by[value] = {attr: s[attr], "all": s["all"], "n": s["n"]}
        result[f"by_{attr}"] = by
    return result


def open_images(path: Path, rows: list[dict], listing: Path) -> list[Image.Image]:
    """The RGB images the rows' ``file_name`` name under ``path``; one sentence naming ``listing``
    (the file that lists them) for one that cannot be read."""
    images = []
    for r in rows:
        try:
            with Image.open(path / r["file_name"]) as im:
                images.append(im.convert("RGB"))
        except (OSError, ValueError) as e:
            raise UserError(f"{listing}: the image {r['file_name']!r} cannot be read ({type(e).__name__}); "
                            "restore it or remove its line.") from None
    return images


def _parsed(row: dict) -> sw.Shape | None:
    text = row.get("text") or row.get("prompt") or ""
    return sw.parse_caption(text)


def write_metrics(result: dict, path: str | Path) -> Path:
    """Write ``result`` as indented JSON (parent dirs created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return path
