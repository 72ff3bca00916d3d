"""Masked loss (``data.masked_loss``): the weighted MSE in closed form, masks that crop and flip with
their image, cached masks on the latent grid equal to the raw path's, the shapes world's noisy
backgrounds and the evaluator's background-noise reading, and bad mask columns in one sentence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, tiny_t2i_overrides
from ldm_lab.cli import main as cli_main
from ldm_lab.recipe import load_recipe

RECIPE = REPO / "recipes/shapes/t2i.yaml"


def test_masked_mse_is_the_mask_weighted_average():
    from ldm_lab.diffusion.objective import diffusion_loss

    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    mask = torch.zeros(2, 1, 3, 3)
    mask[0, 0, 0, 0] = 1.0
    mask[1] = 0.5
    got = diffusion_loss(pred, target, reduction="none", mask=mask)
    sq = (pred - target) ** 2
    assert got[0].item() == pytest.approx(sq[0, :, 0, 0].mean().item(), rel=1e-6)  # only the masked element
    assert got[1].item() == pytest.approx(sq[1].mean().item(), rel=1e-6)  # a uniform mask is no mask
    raw = diffusion_loss(pred, target, reduction="none", mask=mask, mask_normalize=False)
    assert raw[0].item() == pytest.approx(sq[0, :, 0, 0].sum().item() / sq[0].numel(), rel=1e-6)
    # what lies outside the mask does not matter
    other = target.clone()
    other[0, :, 1:, :] += 5
    assert diffusion_loss(pred, other, reduction="none", mask=mask)[0] == got[0]


def test_the_mask_crops_and_flips_with_its_image():
    from ldm_lab.data.masks import as_mask
    from ldm_lab.data.transforms import image_transform

    im = np.zeros((64, 80, 3), np.uint8)  # resized by exactly 1/2: no blended column at the band's edge
    im[:, :16] = (255, 0, 0)  # a red band on the left, the mask marks it
    mask = np.zeros((64, 80), np.uint8)
    mask[:, :16] = 255
    tf = image_transform(32, center_crop=False, random_flip=True)
    sides = set()
    for seed in range(12):
        torch.manual_seed(seed)
        x, m = tf(Image.fromarray(im), as_mask(Image.fromarray(mask)))
        red = (x[0] > 0.5) & (x[1] < -0.5)
        assert m.shape == (1, 32, 32) and torch.equal(red, m[0] > 0.5)
        sides.add(bool(m[0, :, 0].mean() > 0.5))
    assert sides == {True, False}  # both flips were drawn


@pytest.fixture(scope="module")
def masked_parts(tiny_parts, tmp_path_factory):
    root = tmp_path_factory.mktemp("masked")
    ov = tiny_t2i_overrides(tiny_parts, root / "run", root / "data") + [
        "data.caption_dropout=0", "data.masked_loss={column: conditioning_image, unmasked_weight: 0.1}",
        "data.shapes.background_noise=40"]
    return root, ov


def test_cached_masks_are_the_raw_masks_on_the_latent_grid(masked_parts):
    """Both paths give the same per-row latent-grid weights and the same masked loss."""
    from accelerate import Accelerator
    from torch.utils.data import default_collate

    from ldm_lab.data.masks import to_latent_grid
    from ldm_lab.trainers.text_to_image import TextToImageTrainer, loss_mask

    root, ov = masked_parts
    losses, masks = [], []
    for cached in (True, False):
        tr = TextToImageTrainer(load_recipe(RECIPE, [*ov, f"data.cache_latents={cached}"]), Accelerator(cpu=True), root)
        torch.manual_seed(0)
        tr.setup()
        tr.unet = tr.unet.eval()
        if cached:
            batch = default_collate([tr.cached[i] for i in range(4)])
            hw = tuple(batch["mean"].shape[-2:])  # the latent grid
            assert batch["loss_mask"].shape == (4, 1, *hw)
            masks.append(batch["loss_mask"])
        else:
            rows = [tr.rows[i] for i in range(4)]
            batch = {k: torch.stack([r[k] for r in rows]) for k in ("pixel_values", "input_ids", "loss_mask")}
            assert batch["loss_mask"].shape == (4, 1, 32, 32)
            masks.append(to_latent_grid(batch["loss_mask"], hw))
        assert 0 < float(masks[-1].mean()) < 0.6  # the objects' coverage, not all ones
        assert loss_mask(batch, hw, 0.1).min() >= 0.1 - 1e-6
        torch.manual_seed(7)
        with torch.no_grad():
            losses.append(tr.loss(batch)[0].item())
    assert torch.allclose(masks[0], masks[1], atol=1e-6)
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_a_masked_run_trains_and_a_missing_column_is_one_sentence(masked_parts, capsys):
    root, ov = masked_parts
    assert cli_main(["train", str(RECIPE), *ov, "train.max_steps=2", "validation.every=null",
                     "train.checkpoint_every=null", "eval.shapes=false", f"output.dir={root / 'ok'}"]) == 0
    capsys.readouterr()
    assert cli_main(["train", str(RECIPE), *ov, "data.masked_loss={column: no_such}", f"output.dir={root / 'bad'}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "no mask column 'no_such'" in err[0], err


def test_noisy_backgrounds_and_the_background_noise_reading():
    from ldm_lab.data import shapes
    from ldm_lab.evaluation.shapes import read_image

    flat = shapes.World(resolution=64)
    noisy = shapes.World(resolution=64, background_noise=40.0)
    s0, im0, m0 = shapes.row(flat, 0, 3)
    s1, im1, m1 = shapes.row(noisy, 0, 3)
    assert s0 == s1 and np.array_equal(m0, m1)  # the same row, only the background differs
    a0, a1 = np.asarray(im0, np.float32), np.asarray(im1, np.float32)
    assert np.abs(a0 - a1)[m0 > 0.99].max() == 0  # the object's pixels untouched
    assert 30 < (a1 - a0)[m0 == 0].std() < 45  # blotches of std ~40 (clipped at 0 / 255)
    r0, r1 = read_image(im0), read_image(im1)
    assert r0["background_noise"] < 2 and 25 < r1["background_noise"] < 45
    assert r1["found"] and r1["shape"] == s1.shape  # the evaluator still reads the shape
