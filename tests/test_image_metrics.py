"""Image-set metrics (evaluation/image_metrics.py): CMMD against closed forms, FID / KID / CMMD of
identical sets 0, FID of two Gaussians in torchmetrics with a custom feature module = the closed
form, and the metrics of a CLIP image space separating unlike image sets."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from conftest import REPO
from ldm_lab.data import shapes
from ldm_lab.evaluation.image_metrics import CMMD_SCALE, CMMD_SIGMA, cmmd, image_metrics
from ldm_lab.trainers.clip import clip_processor


def test_cmmd_of_one_point_each_is_the_kernel_closed_form():
    a, b = torch.tensor([[3.0, 4.0]], dtype=torch.float64), torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    d2 = ((a / 5 - b) ** 2).sum().item()  # rows are L2-normalised first
    expected = CMMD_SCALE * (2 - 2 * math.exp(-d2 / (2 * CMMD_SIGMA**2)))
    assert cmmd(a, b) == pytest.approx(expected, rel=1e-9)


def test_cmmd_is_zero_for_identical_sets_and_symmetric_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g) + 0.5
    assert cmmd(x, x) == pytest.approx(0.0, abs=1e-9)
    assert cmmd(x, y) == pytest.approx(cmmd(y, x), rel=1e-9)
    assert cmmd(x, y) > 0


class _PixelsAsFeatures(nn.Module):
    """The first two pixel values of a uint8 'image' as its feature vector (centred)."""

    num_features = 2

    def forward(self, x):
        return x.flatten(1)[:, :2].double() - 128.0


def test_fid_of_two_gaussians_with_equal_covariance_is_the_squared_mean_distance():
    g = torch.Generator().manual_seed(0)
    n, mu = 40000, torch.tensor([6.0, -8.0])

    def images(shift):
        f = torch.randn(n, 2, generator=g) * 12 + shift + 128
        px = torch.zeros(n, 3, 2, 2, dtype=torch.uint8)
        px.view(n, -1)[:, :2] = f.round().clamp(0, 255).to(torch.uint8)
        return px

    fid = FrechetInceptionDistance(feature=_PixelsAsFeatures(), normalize=False)
    fid.update(images(torch.zeros(2)), real=True)
    fid.update(images(mu), real=False)
    assert float(fid.compute()) == pytest.approx(float((mu**2).sum()), rel=0.05)  # 100 (+ sampling error)


@pytest.fixture(scope="module")
def tiny_clip():
    tok = CLIPTokenizer.from_pretrained(REPO / "data/pretrained/shapes-clip/tokenizer")
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=20),
                     vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2), projection_dim=16)
    torch.manual_seed(0)
    return CLIPModel(cfg).eval(), clip_processor(tok, 32)


def _images(color: str, n: int, seed: int):
    rng = __import__("random").Random(seed)
    pos = ["center", "top left", "top right", "bottom left", "bottom right"]
    return [shapes.render(shapes.Shape(color, rng.choice(["circle", "square"]), rng.choice(["large", "small"]),
                                       rng.choice(pos), "white"), 32)[0] for _ in range(n)]


def test_identical_sets_score_zero_and_unlike_sets_do_not(tiny_clip):
    model, processor = tiny_clip
    reds, blues = _images("red", 48, 0), _images("blue", 48, 1)
    caps = ["a red shape"] * 48
    same = image_metrics(reds, reds, caps, model, processor)
    other = image_metrics(blues, reds, caps, model, processor)
    assert abs(same["fid"]) < 1e-3 and same["cmmd"] == pytest.approx(0.0, abs=1e-6)
    # KID is torchmetrics' unbiased estimator: a set against itself is only 0 in expectation
    # (slightly negative: the cross term keeps the diagonal), far below a set of other images
    assert other["fid"] > 100 * max(abs(same["fid"]), 1e-6) and other["cmmd"] > 1e-3
    assert other["kid"] > 5 * abs(same["kid"])
    assert 0.0 <= same["clip_score"] <= 100.0


def _t2i(parts, root, extra):
    from conftest import tiny_t2i_overrides

    ov = [o for o in tiny_t2i_overrides(parts, root / "run", root / "data")
          if not o.startswith(("train.max_steps", "validation.every", "train.checkpoint_every"))]
    return ["train", str(REPO / "recipes/shapes/t2i.yaml"), *ov, "train.max_steps=8", "validation.every=100",
            "train.checkpoint_every=100", "eval.shapes=false", *extra]


def test_image_metrics_are_logged_at_eval_steps_against_the_held_out_rows(tiny_clip, tiny_parts, tmp_path):
    import json

    from PIL import Image

    from ldm_lab.cli import main as cli_main

    model, processor = tiny_clip
    model.save_pretrained(tmp_path / "judge")
    processor.save_pretrained(tmp_path / "judge")
    assert cli_main(_t2i(tiny_parts, tmp_path, ["data.val_n=8", "eval.every=4", f"eval.features={tmp_path / 'judge'}",
                                                "eval.steps=2"])) == 0
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    rows = [h for h in history if "image/fid" in h]
    assert [h["step"] for h in rows] == [4, 8]
    for h in rows:
        assert h["image/fid"] > 0 and h["image/cmmd"] > 0 and 0 <= h["image/clip_score"] <= 100 and "val_loss" in h
    with Image.open(tmp_path / "run" / "metrics.png") as im:
        assert len(set(im.convert("L").getdata())) > 10


def test_image_metrics_without_held_out_rows_is_one_sentence(tiny_parts, tmp_path, capsys):
    from ldm_lab.cli import main as cli_main

    rc = cli_main(_t2i(tiny_parts, tmp_path, ["eval.every=4", f"eval.features={tmp_path}"]))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(err) == 1 and "set data.val_n" in err[0]


def test_eval_images_scores_a_samples_dir_against_the_drawn_ground_truth(tiny_clip, tmp_path, capsys):
    import json

    from ldm_lab.cli import main as cli_main

    model, processor = tiny_clip
    model.save_pretrained(tmp_path / "judge")
    processor.save_pretrained(tmp_path / "judge")
    d = tmp_path / "samples"
    d.mkdir()
    lines = []
    for i, s in enumerate([shapes.Shape(c, "circle", "large", "center", "white") for c in ("red", "blue")] * 4):
        shapes.render(s, 32)[0].save(d / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": s.caption()}))
    (d / "samples.jsonl").write_text("\n".join(lines) + "\n")
    assert cli_main(["eval", "images", str(d), "--features", str(tmp_path / "judge"), "--out", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["n_fake"] == m["n_real"] == 8 and abs(m["fid"]) < 1e-3 and m["cmmd"] == pytest.approx(0.0, abs=1e-6)
    capsys.readouterr()
    assert cli_main(["eval", "images", str(d), "--features", str(tmp_path / "nothing")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "cannot load a CLIP model" in err[0]
