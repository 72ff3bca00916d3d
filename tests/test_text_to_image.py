"""A tiny end-to-end text-to-image run through the real loop, and what it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, tiny_t2i_overrides
from ldm_lab.cli import main as cli_main
from ldm_lab.errors import UserError
from ldm_lab.recipe import load_recipe

RECIPE = REPO / "recipes/shapes/t2i.yaml"


@pytest.fixture(scope="module")
def tiny_run(tiny_parts, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("t2i")
    ov = tiny_t2i_overrides(tiny_parts, root / "run", root / "data")
    assert cli_main(["train", str(RECIPE), *ov]) == 0
    return root


def test_run_dir_contents(tiny_run):
    run = tiny_run / "run"
    assert (run / "recipe.yaml").exists()
    resolved = load_recipe(run / "recipe.yaml")
    assert resolved.train.max_steps == 12 and resolved.data.resolution == 32
    assert (run / "pipeline" / "model_index.json").exists()
    assert sorted(p.name for p in (run / "samples").glob("step-*.png")) == ["step-000006.png", "step-000012.png"]
    assert (run / "loss.png").stat().st_size > 1000
    hist = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == [4, 8, 12] and all(np.isfinite(h["loss"]) for h in hist)
    metrics = json.loads((run / "metrics.json").read_text())["shapes_eval"]
    assert metrics["n"] == 6 and set(metrics) >= {"color", "shape", "size", "position", "seen", "heldout"}
    assert len(list((run / "eval" / "samples").glob("*.png"))) == 6
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["checkpoint-6"]


def test_stock_diffusers_loads_and_samples_without_ldm_lab(tiny_run):
    code = f"""
import sys, numpy as np
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained({str(tiny_run / 'run' / 'pipeline')!r})
out = pipe("a large red circle at the center on a white background", num_inference_steps=3, guidance_scale=4.0,
           output_type="np").images
assert out.shape == (1, 32, 32, 3), out.shape
assert np.isfinite(out).all()
assert not any(m.startswith("ldm_lab") for m in sys.modules), "ldm_lab was imported"
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_null_condition_is_the_same_in_training_and_in_the_stock_pipeline(tiny_run):
    """The conditioner's null (empty prompt) equals what a stock pipeline encodes for
    negative_prompt="", and embeddings-driven sampling equals prompt-driven sampling."""
    from diffusers import StableDiffusionPipeline

    from ldm_lab.components.text_encoders import TextEncoder
    from ldm_lab.conditioning import Conditioner
    from ldm_lab.sampling import generate

    pipe = StableDiffusionPipeline.from_pretrained(tiny_run / "run" / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    te = TextEncoder("clip", pipe.text_encoder, pipe.tokenizer, pipe.tokenizer.model_max_length)
    cond = Conditioner(te)
    _, neg = pipe.encode_prompt("x", "cpu", 1, True, negative_prompt="")
    torch.testing.assert_close(cond.null().states, neg, rtol=0, atol=0)
    prompts = ["a small blue square at the top left on a black background"] * 2
    a = generate(pipe, prompts, [3, 4], steps=3, guidance=4.0)
    b = generate(pipe, prompts, [3, 4], steps=3, guidance=4.0, prompt_embeds=cond.encode(prompts).states,
                 negative_embeds=cond.null().states)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))  # seeds matter


def test_resume_latest_continues_from_checkpoint(tiny_run, tiny_parts):
    root = tiny_run
    ov = tiny_t2i_overrides(tiny_parts, root / "run", root / "data")
    ck = root / "run" / "checkpoints" / "checkpoint-6"
    assert json.loads((ck / "loop.json").read_text())["step"] == 6
    ov = [o for o in ov if not o.startswith(("output.dir", "train.max_steps", "eval."))]
    out = root / "resumed"
    assert cli_main(["train", str(RECIPE), *ov, f"output.dir={out}", f"train.resume={ck}", "train.max_steps=9",
                     "eval.shapes=false"]) == 0
    hist = [json.loads(x)["step"] for x in (out / "history.jsonl").read_text().splitlines()]
    assert hist == [4, 8, 9]  # history up to the checkpoint, then steps 7-9 (not a restart at 0)
    assert (out / "pipeline" / "unet").exists()


def test_cross_attention_mismatch_is_a_recipe_error(tiny_parts, tmp_path):
    ov = tiny_t2i_overrides(tiny_parts, tmp_path / "run", tmp_path / "data")
    ov = [o for o in ov if not o.startswith("model.unet")] + [
        "model.unet.overrides={block_out_channels: [32, 32], cross_attention_dim: 48, norm_num_groups: 8}"]
    recipe = load_recipe(RECIPE, ov)
    from accelerate import Accelerator

    from ldm_lab.trainers.text_to_image import TextToImageTrainer

    with pytest.raises(UserError, match="cross_attention_dim is 48 .* hidden size is 32"):
        TextToImageTrainer(recipe, Accelerator(cpu=True), tmp_path).build_models()


def test_cached_and_raw_batches_give_the_same_loss(tiny_parts, tmp_path):
    """Precomputed latents/embeddings and on-the-fly encoding are the same data contract."""
    from accelerate import Accelerator

    from ldm_lab.trainers.text_to_image import TextToImageTrainer

    ov = tiny_t2i_overrides(tiny_parts, tmp_path / "run", tmp_path / "data") + ["data.caption_dropout=0"]
    losses = []
    for cached in (True, False):
        recipe = load_recipe(RECIPE, [*ov, f"data.cache_latents={cached}"])
        torch.manual_seed(0)  # same UNet init in both rounds
        tr = TextToImageTrainer(recipe, Accelerator(cpu=True), tmp_path)
        tr.setup()
        tr.unet = tr.unet.eval()
        if cached:
            from torch.utils.data import default_collate

            batch = default_collate([tr.cached[i] for i in range(4)])
        else:
            rows = [tr.rows[i] for i in range(4)]
            batch = {k: torch.stack([r[k] for r in rows]) for k in ("pixel_values", "input_ids")}
        torch.manual_seed(7)
        with torch.no_grad():
            losses.append(tr.loss(batch)[0].item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)



def test_sample_cli_then_eval(tiny_run, tmp_path, capsys):
    out = tmp_path / "s"
    prompts = ["a large red circle at the center on a white background", "a small blue star at the top on a gray background"]
    assert cli_main(["sample", str(tiny_run / "run"), "--prompt", prompts[0], "--prompt", prompts[1], "--n", "2",
                     "--steps", "2", "--sampler", "ddim", "--seed", "5", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in rows] == [5, 6, 7, 8] and len(list(out.glob("0*.png"))) == 4
    assert (out / "grid.png").exists()
    assert cli_main(["eval", "shapes", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["n"] == 4
    assert cli_main(["sample", str(tmp_path / "nothing"), "--prompt", "x"]) == 2
    assert "cannot load a pipeline" in capsys.readouterr().err


def test_adamw8bit_without_bitsandbytes_is_a_clear_error(tiny_parts, tmp_path, capsys):
    pytest.importorskip("torch")
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed here; the error path cannot be reached")
    except ImportError:
        pass
    ov = tiny_t2i_overrides(tiny_parts, tmp_path / "run", tmp_path / "data")
    assert cli_main(["train", str(RECIPE), *ov, "train.optimizer=adamw8bit"]) == 2
    err = capsys.readouterr().err
    assert "bitsandbytes is not installed" in err and "Traceback" not in err
