"""The ControlNet plugin: zero-initialised control leaves the base unchanged, image and control
stay aligned through random crops and flips, the artifact runs in a stock
StableDiffusionControlNetPipeline, several ControlNets compose by summed residuals, and the
plugin runs end to end on the shipped shapes base and from the sd15 recipe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image

from ldm_lab.cli import main as cli_main
from ldm_lab.recipe import load_recipe, pipeline_defaults

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = ROOT / "src" / "ldm_lab" / "builtin" / "controlnet.yaml"


@pytest.fixture(scope="module")
def shapes32(tmp_path_factory):
    from ldm_lab.data import shapes

    root = tmp_path_factory.mktemp("cn-data")
    return shapes.generate(root / "data", 16, seed=5, world=shapes.World(resolution=32))


def _flags(base, data, out, cache, extra=(), steps=4):
    return ["finetune", "controlnet", "--base", str(base), "--data", str(data), "--out", str(out),
            "--steps", str(steps), "--batch-size", "4", "--lr", "1e-3", *extra, f"validation.every={steps}",
            "validation.steps=3", "validation.sampler=ddim", "plugin.validation_n=2", "train.checkpoint_every=null",
            "logging.tracker=none", "logging.log_every=1", f"data.cache_dir={cache}", "data.resolution=32"]


def _plugin(base, data, out, cache, extra=()):
    from ldm_lab.cli_args import build_parser
    from ldm_lab.commands.finetune import finetune_overrides
    from ldm_lab.trainers.controlnet import ControlNetTrainer

    recipe = pipeline_defaults(load_recipe(BUILTIN, finetune_overrides(build_parser().parse_args(
        _flags(base, data, out, cache, extra)))))
    t = ControlNetTrainer(recipe, Accelerator(cpu=True), out)
    t.setup()
    return t


def test_zero_initialised_controlnet_leaves_the_base_unchanged(tiny_pipeline, shapes32, tmp_path):
    t = _plugin(tiny_pipeline, shapes32, tmp_path / "run", tmp_path / "cache")
    assert not any(p.requires_grad for p in t.unet.parameters())
    assert all(p.requires_grad for p in t.controlnet.parameters())
    batch = next(iter(t.train_dataloader()))
    assert batch["control"].min() >= 0 and batch["control"].max() <= 1 and batch["control"].max() > 0.5
    z, cond = t.latents_and_condition(batch)
    draw = t.objective.draw(z, t.rng)
    noisy, ts = draw.x_t, draw.t
    res = t.residuals(batch, draw, cond)
    down, mid = res.down, res.mid
    assert all(torch.count_nonzero(d) == 0 for d in down) and torch.count_nonzero(mid) == 0
    with torch.no_grad():  # the backbone called directly, as a stock pipeline does
        plain = t.unet(noisy, ts, encoder_hidden_states=cond.states).sample
        controlled = t.unet(noisy, ts, encoder_hidden_states=cond.states, down_block_additional_residuals=down,
                            mid_block_additional_residual=mid).sample
    assert torch.equal(plain, controlled)
    # and the control does reach the net: one step of training makes the residuals non-zero
    loss, _ = t.loss(batch)
    loss.backward()
    zero_convs = [p for n, p in t.controlnet.named_parameters() if "controlnet_down_blocks" in n]
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in zero_convs)


def test_random_crop_and_flip_keep_image_and_control_aligned():
    """A shapes image on a wide canvas, randomly cropped and flipped: the shape found in the
    transformed image lies on the transformed control mask. Transforming the two separately
    (what a per-image transform does) misaligns them, so the check can fail."""
    from ldm_lab.data import shapes
    from ldm_lab.trainers.controlnet import finish, paired_transform

    tf = paired_transform(48, center_crop=False, random_flip=True)

    def iou(img, ctl):
        _, ctl01 = finish(img, ctl)
        fg = (img.float() - 245).abs().sum(0) > 150  # away from the white background
        m = ctl01[0] > 0.5
        return float((fg & m).sum() / (fg | m).sum())

    together, apart = [], []
    for k in range(12):
        torch.manual_seed(k)
        s = shapes.Shape("blue", ["triangle", "star", "heart"][k % 3], "large", "center", "white")
        img, mask = shapes.render(s, 64)
        wide = Image.new("RGB", (96, 64), (245, 245, 245))  # resized to 72 x 48, then a random 48 x 48 crop
        wide.paste(img, (16, 0))
        wmask = Image.new("RGB", (96, 64))
        wmask.paste(Image.fromarray((mask * 255).astype(np.uint8)).convert("RGB"), (16, 0))
        a, b = tf(wide, wmask)
        together.append(iou(a, b))
        apart.append(iou(tf(wide, wmask)[0], tf(wide, wmask)[1]))
    assert min(together) > 0.8  # (anti-aliased edges differ by a pixel here and there)
    assert min(apart) < 0.5


def test_stock_controlnet_pipeline_reproduces_in_training_samples(tiny_pipeline, shapes32, tmp_path):
    run = tmp_path / "run"
    assert cli_main(_flags(tiny_pipeline, shapes32, run, tmp_path / "cache")) == 0
    assert (run / "controlnet" / "config.json").exists()
    rows = [json.loads(x) for x in (run / "samples" / "step-000004" / "samples.jsonl").read_text().splitlines()]
    r = rows[0]
    import yaml

    guidance = yaml.safe_load((run / "recipe.yaml").read_text())["validation"]["guidance_scale"]
    code = f"""
import sys, numpy as np, torch
from PIL import Image
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, DDIMScheduler
net = ControlNetModel.from_pretrained({str(run / 'controlnet')!r})
pipe = StableDiffusionControlNetPipeline.from_pretrained({str(tiny_pipeline)!r}, controlnet=net, safety_checker=None)
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, steps_offset=1)
control = Image.open({str(run / 'samples' / 'step-000004' / r['control'])!r})
im = pipe({r['prompt']!r}, image=control, negative_prompt="", num_inference_steps=3, guidance_scale={guidance},
          generator=[torch.Generator().manual_seed({r['seed']})], output_type="np").images[0]
np.save({str(tmp_path / 'stock.npy')!r}, im)
assert not any(m.startswith("ldm_lab") for m in sys.modules)
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
    stock = np.load(tmp_path / "stock.npy") * 255
    trained = np.asarray(Image.open(run / "samples" / "step-000004" / r["file_name"]), dtype=np.float64)
    assert np.abs(stock - trained).max() <= 2.0


def test_multi_controlnet_sums_scaled_residuals_and_cli_samples(tiny_pipeline, tmp_path):
    from diffusers import ControlNetModel, StableDiffusionPipeline

    from ldm_lab.commands.sample import with_controlnets

    base = StableDiffusionPipeline.from_pretrained(tiny_pipeline, safety_checker=None)
    dirs = []
    for k in range(2):
        torch.manual_seed(10 + k)
        net = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(16, 32, 96))  # 4x VAE
        with torch.no_grad():  # non-zero "trained" zero convs so each net has residuals of its own
            for n, p in net.named_parameters():
                if "controlnet_down_blocks" in n or "controlnet_mid_block" in n:
                    p.normal_(0, 0.05)
        net.save_pretrained(tmp_path / f"cn{k}")
        dirs.append(tmp_path / f"cn{k}")
    ctl = [tmp_path / "c0.png", tmp_path / "c1.png"]
    Image.new("RGB", (32, 32), "white").save(ctl[0])
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(ctl[1])
    pipe, images, kw = with_controlnets(base, [(str(dirs[0]), 0.5, str(ctl[0])), (str(dirs[1]), 1.5, str(ctl[1]))])
    assert kw["controlnet_conditioning_scale"] == [0.5, 1.5]
    x = torch.randn(1, 4, 8, 8)
    t = torch.tensor([500])
    h = torch.randn(1, 20, 32)
    conds = [torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)[None] for im in images]
    with torch.no_grad():
        down, mid = pipe.controlnet(x, t, h, controlnet_cond=conds, conditioning_scale=[0.5, 1.5], return_dict=False)
        parts = [ControlNetModel.from_pretrained(d)(x, t, h, controlnet_cond=c, conditioning_scale=s, return_dict=False)
                 for d, c, s in zip(dirs, conds, (0.5, 1.5))]
    for i, d in enumerate(down):
        torch.testing.assert_close(d, parts[0][0][i] + parts[1][0][i])
    torch.testing.assert_close(mid, parts[0][1] + parts[1][1])
    assert parts[0][1].abs().max() > 0 and parts[1][1].abs().max() > 0

    prompt = ["--prompt", "a large red circle at the center on a white background", "--steps", "3", "--sampler", "ddim"]
    assert cli_main(["sample", str(tiny_pipeline), *prompt, "--out", str(tmp_path / "one"),
                     "--controlnet", f"{dirs[0]}:1.0", "--control-image", str(ctl[0])]) == 0
    assert cli_main(["sample", str(tiny_pipeline), *prompt, "--out", str(tmp_path / "two"), "--controlnet",
                     f"{dirs[0]}:1.0", "--control-image", str(ctl[0]), "--controlnet", f"{dirs[1]}:1.5",
                     "--control-image", str(ctl[1]), "--guess-mode"]) == 0
    a = np.asarray(Image.open(tmp_path / "one" / "0000.png"), dtype=float)
    b = np.asarray(Image.open(tmp_path / "two" / "0000.png"), dtype=float)
    assert np.abs(a - b).max() > 1
    meta = json.loads((tmp_path / "two" / "samples.jsonl").read_text().splitlines()[0])
    assert meta["guess_mode"] and len(meta["controlnets"]) == 2
    assert cli_main(["sample", str(tiny_pipeline), *prompt, "--controlnet", str(dirs[0])]) == 2


def test_cli_equals_recipe_and_bad_input_exits_2(tiny_pipeline, shapes32, tmp_path, capsys):
    flags = _flags(tiny_pipeline, shapes32, tmp_path / "run", tmp_path / "cache", extra=("--preprocessor", "canny"))
    assert cli_main(flags[:2] + ["--print-recipe"] + flags[2:]) == 0
    shown = capsys.readouterr().out
    assert "trainer: controlnet" in shown and "preprocessor: canny" in shown and "conditioning_column: null" in shown
    code = cli_main(_flags(tiny_pipeline, shapes32, tmp_path / "bad", tmp_path / "cache",
                           extra=("--conditioning-column", "depth")))
    err = capsys.readouterr().err
    assert code == 2 and "no column 'depth'" in err and "Traceback" not in err


def test_canny_preprocessor_trains(tiny_pipeline, shapes32, tmp_path):
    t = _plugin(tiny_pipeline, shapes32, tmp_path / "run", tmp_path / "cache", extra=("--preprocessor", "canny"))
    batch = next(iter(t.train_dataloader()))
    c = batch["control"]
    assert set(torch.unique(c).tolist()) <= {0.0, 1.0} and c.max() == 1.0  # binary edge maps


def test_shapes_demo_recipe_short(tmp_path):
    """The demo recipe on the shipped shapes base, a few steps on a small shapes set."""
    from ldm_lab.trainers.loop import train

    over = [f"output.dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", "data.shapes.n=64",
            "train.batch_size=8", "train.max_steps=4", "train.checkpoint_every=2", "validation.every=4",
            "validation.steps=3", "plugin.validation_n=2", "plugin.eval_n=6", "eval.steps=3", "logging.tracker=none"]
    run = train(load_recipe(ROOT / "recipes/shapes/controlnet.yaml", over))
    m = json.loads((run / "metrics.json").read_text())["control_eval"]
    assert m["n"] == 6 and 0 <= m["chance_iou"] < 0.3
    for part in ("no_prompt", "matching", "conflicting"):
        for model in ("controlnet", "base"):
            assert 0 <= m[part][model]["iou"] <= 1
    assert 0 <= m["no_prompt"]["controlnet_guess_mode"]["iou"] <= 1
    assert m["matching"]["base"]["iou"] > m["conflicting"]["base"]["iou"]  # the base puts shapes where the text says
    assert (run / "controlnet" / "diffusion_pytorch_model.safetensors").exists()
    # the same evaluation of the saved ControlNet with stock diffusers pipelines, settings from the run's recipe
    from ldm_lab.cli import main as cli_main

    assert cli_main(["eval", "controlnet", str(run), "--out", str(tmp_path / "ev")]) == 0
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert again["n"] == 6 and again["chance_iou"] == m["chance_iou"] and again["settings"]["kind"] == "mask"
    for part in ("no_prompt", "matching", "conflicting"):
        for model in m[part]:
            assert abs(again[part][model]["iou"] - m[part][model]["iou"]) < 0.05, (part, model)
    assert (tmp_path / "ev" / "no_prompt" / "controlnet").is_dir()


def test_eval_controlnet_bad_input_is_one_sentence(tmp_path, capsys):
    from ldm_lab.cli import main as cli_main

    assert cli_main(["eval", "controlnet", str(tmp_path), "--out", str(tmp_path / "ev")]) == 2
    assert "neither a ControlNet run dir nor a ControlNet dir" in capsys.readouterr().err
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "config.json").write_text("{}")
    assert cli_main(["eval", "controlnet", str(tmp_path / "net"), "--out", str(tmp_path / "ev")]) == 2
    assert "--kind" in capsys.readouterr().err


def test_sd15_recipe_trains_with_tiny_substitutes(tiny_parts, tiny_pipeline, shapes32, tmp_path):
    from ldm_lab.trainers.loop import train
    from test_recipes import substitute

    path = ROOT / "recipes/sd15/controlnet.yaml"
    over = substitute(path, tiny_parts, tiny_pipeline) + [
        f"output.dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", "data.resolution=32",
        "data.source=imagefolder", f"data.path={shapes32}", "data.num_workers=0", "train.mixed_precision=no",
        "train.gradient_checkpointing=false", "train.max_steps=2", "validation.every=2", "validation.steps=2",
        "plugin.validation_n=1", "logging.tracker=none"]
    run = train(load_recipe(path, over))
    assert (run / "controlnet" / "config.json").exists()


def test_continue_from_an_existing_controlnet(tiny_pipeline, shapes32, tmp_path):
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline, subfolder="unet")
    torch.manual_seed(3)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    net.save_pretrained(tmp_path / "prev")
    t = _plugin(tiny_pipeline, shapes32, tmp_path / "run", tmp_path / "cache", extra=("--controlnet", str(tmp_path / "prev")))
    a, b = t.controlnet.state_dict(), net.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    code = cli_main(_flags(tiny_pipeline, shapes32, tmp_path / "bad", tmp_path / "cache",
                           extra=("--controlnet", str(tmp_path / "missing"))))
    assert code == 2
