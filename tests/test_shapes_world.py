"""The shapes world: generator determinism and layout, and the analytic evaluator's accuracy."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageFilter

from ldm_lab.data import shapes as sw
from ldm_lab.evaluation.shapes import ATTRIBUTES, evaluate_dir, read_image, score, write_metrics

# every palette entry, pink and heart included, and nothing held out
FULL = sw.World(colors=tuple(sw.COLORS), shapes=sw.SHAPES, holdout=())


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in (path / "metadata.jsonl").read_text().splitlines()]


def _degrade(img: Image.Image, rng: np.random.Generator, sigma: float = 8.0, blur: float = 0.8) -> Image.Image:
    """Blur then add per-pixel Gaussian noise (``sigma`` in 0..255 units): a stand-in for samples."""
    a = np.asarray(img.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float32)
    a = a + rng.normal(0.0, sigma, a.shape)
    return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8))


def _accuracy(images, targets, world) -> dict:
    got = [read_image(im, world) for im in images]
    return {a: float(np.mean([g[a] == getattr(t, a) for g, t in zip(got, targets)])) for a in ATTRIBUTES}


# --- generator -----------------------------------------------------------------------------


def test_generate_is_deterministic(tmp_path):
    a = sw.generate(tmp_path / "a", 12, seed=3)
    b = sw.generate(tmp_path / "b", 12, seed=3)
    assert (a / "metadata.jsonl").read_bytes() == (b / "metadata.jsonl").read_bytes()
    for r in _rows(a):
        for key in ("file_name", "conditioning_image_file_name", "edges_file_name"):
            np.testing.assert_array_equal(_pixels(a / r[key]), _pixels(b / r[key]))
    c = sw.generate(tmp_path / "c", 12, seed=4)
    assert (a / "metadata.jsonl").read_bytes() != (c / "metadata.jsonl").read_bytes()


def test_row_is_independent_of_n(tmp_path):
    small = sw.generate(tmp_path / "small", 5, seed=1)
    big = sw.generate(tmp_path / "big", 15, seed=1)
    assert _rows(small) == _rows(big)[:5]
    for r in _rows(small):
        np.testing.assert_array_equal(_pixels(small / r["file_name"]), _pixels(big / r["file_name"]))


def test_holdout_pairs_never_appear_in_a_default_dataset(tmp_path):
    world = sw.World()
    for seed in range(3):
        for i in range(500):
            s, _, _ = sw.row(world, seed, i)
            assert (s.color, s.shape) not in world.holdout
    rows = _rows(sw.generate(tmp_path / "ds", 60, seed=0))
    assert not any(r["heldout"] for r in rows)
    assert not any((r["color"], r["shape"]) in sw.DEFAULT_HOLDOUT for r in rows)


def test_heldout_dataset_holds_only_holdout_pairs(tmp_path):
    rows = _rows(sw.generate(tmp_path / "ds", 40, seed=0, heldout=True))
    assert all(r["heldout"] for r in rows)
    pairs = {(r["color"], r["shape"]) for r in rows}
    assert pairs == set(sw.DEFAULT_HOLDOUT)


def test_dataset_loads_as_imagefolder(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = sw.generate(tmp_path / "ds", 8, seed=2)
    ds = datasets.load_dataset("imagefolder", data_dir=str(path), split="train", cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 8
    assert {"image", "text", "conditioning_image", "edges", *ATTRIBUTES} <= set(ds.column_names)
    by_text = {r["text"] for r in _rows(path)}
    first = ds[0]
    assert first["text"] in by_text
    for key in ("image", "conditioning_image", "edges"):
        assert first[key].size == (64, 64)


# --- evaluator -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def samples() -> list[tuple[sw.World, sw.Shape, Image.Image]]:
    """600 dataset images: 360 from the full palette (pink, heart) and 240 from the default world."""
    out = []
    for world, seeds, n in ((FULL, (10, 11, 12), 120), (sw.World(), (20, 21), 120)):
        for seed in seeds:
            for i in range(n):
                s, img, _ = sw.row(world, seed, i)
                out.append((world, s, img))
    return out


def test_evaluator_reads_dataset_images(samples):
    assert {s.color for _, s, _ in samples} == set(sw.COLORS)
    assert {s.shape for _, s, _ in samples} == set(sw.SHAPES)
    targets = [s for _, s, _ in samples]
    images = [img for _, _, img in samples]
    for world in (FULL, None):  # the full world and the default (all palettes) agree here
        acc = _accuracy(images, targets, world)
        assert all(v >= 0.99 for v in acc.values()), acc
    # restricted to its own world, each image is read within that world's palettes
    world, s, img = next(x for x in samples if x[0] is not FULL)
    got = read_image(img, world)
    assert got["found"] and got["color"] in world.colors and got["shape"] in world.shapes


def test_evaluator_is_robust_to_blur_and_noise(samples):
    rng = np.random.default_rng(0)
    images = [_degrade(img, rng) for _, _, img in samples]
    acc = _accuracy(images, [s for _, s, _ in samples], FULL)
    assert acc["color"] >= 0.95 and acc["shape"] >= 0.95, acc
    assert all(v >= 0.95 for v in acc.values()), acc


@pytest.mark.parametrize("resolution", [32, 128])
def test_evaluator_works_at_other_resolutions(resolution):
    world = replace(FULL, resolution=resolution)
    rows = [sw.row(world, 5, i) for i in range(80)]
    acc = _accuracy([img for _, img, _ in rows], [s for s, _, _ in rows], world)
    assert all(v >= 0.95 for v in acc.values()), acc


def test_plain_background_is_not_found():
    rng = np.random.default_rng(1)
    target = sw.Shape("red", "circle", "large", "center", "white")
    for name, rgb in sw.BACKGROUNDS.items():
        plain = Image.new("RGB", (64, 64), rgb)
        for img in (plain, _degrade(plain, rng)):
            got = read_image(img)
            assert not got["found"] and got["color"] is None and got["shape"] is None
            assert got["background"] == name
        result = score([plain], [replace(target, background=name)])
        assert result["found"] == 0.0 and result["all"] == 0.0 and result["n"] == 1


def test_wrong_attributes_are_scored_wrong():
    s = sw.Shape("red", "star", "large", "top left", "gray")
    img, _ = sw.render(s)
    assert score([img], [s]) == {**dict.fromkeys((*ATTRIBUTES, "all", "found"), 1.0), "n": 1, "background_noise": 0.0}
    others = {"color": "pink", "shape": "heart", "size": "small", "position": "bottom", "background": "black"}
    for attr, value in others.items():
        result = score([img], [replace(s, **{attr: value})])
        assert result[attr] == 0.0 and result["all"] == 0.0, (attr, result)
        assert all(result[a] == 1.0 for a in ATTRIBUTES if a != attr), (attr, result)


def test_evaluate_dir_scores_datasets_and_samples(tmp_path):
    ds = sw.generate(tmp_path / "ds", 30, seed=5)
    before = sorted(p.name for p in ds.rglob("*"))
    result = evaluate_dir(ds)
    assert sorted(p.name for p in ds.rglob("*")) == before  # writes nothing
    assert result["n"] == 30 and result["all"] == 1.0 and result["seen"]["n"] == 30 and "heldout" not in result

    # samples: seen prompts drawn right, held-out prompts drawn in the wrong colour
    out = tmp_path / "samples"
    out.mkdir()
    world = sw.World()
    lines = []
    for heldout in (False, True):
        for i, s in enumerate(sw.prompts(world, 10, seed=0, heldout=heldout)):
            drawn = replace(s, color="orange" if s.color != "orange" else "green") if heldout else s
            name = f"{int(heldout)}_{i}.png"
            sw.render(drawn)[0].save(out / name)
            lines.append(json.dumps({"file_name": name, **vars(s), "heldout": heldout}))
    (out / "samples.jsonl").write_text("\n".join(lines) + "\n")
    result = evaluate_dir(out)
    assert result["source"] == "samples.jsonl" and result["n"] == 20
    assert result["seen"]["all"] == 1.0 and result["heldout"]["color"] == 0.0
    assert result["heldout"]["shape"] == 1.0 and result["color"] == 0.5
    path = write_metrics(result, tmp_path / "metrics" / "eval.json")
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
