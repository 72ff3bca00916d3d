"""The ControlNet plugin on the SD3 family: diffusers' SD3ControlNetModel through the denoiser seam
(the adapter is the call StableDiffusion3ControlNetPipeline makes; a new net leaves the base
unchanged), a few steps through `ldm-lab finetune controlnet` on a tiny SD3 base, and a process that
never imports ldm_lab loading RUN/controlnet with stock SD3ControlNetModel +
StableDiffusion3ControlNetPipeline, reproducing the in-training sample, with the control changing
the image against the base and a zero scale. A PixArt ControlNet recipe is one sentence, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import SD3ControlNetModel, SD3Transformer2DModel

from conftest import REPO, in_training_sample, run_without_ldm_lab, tiny_family_overrides
from ldm_lab.cli import main as cli_main
from ldm_lab.components.backbones import SD3_PRESETS
from ldm_lab.components.controlnets import new_controlnet
from ldm_lab.components.denoiser import Residuals, SD3Denoiser
from ldm_lab.components.record import Conditioning
from ldm_lab.recipe.plugins import ControlNetOptions

PROMPT = "a large red circle at the center on a white background"
TE = "{kind: clip, pretrained: CLIP, subfolder: text_encoder, projection: true, hidden_layer: -2}"


def _net():
    torch.manual_seed(0)
    return SD3Transformer2DModel(**{**SD3_PRESETS["tiny"], "num_layers": 2})


def _inputs():
    g = torch.Generator().manual_seed(0)
    x, c, p = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 20, 128, generator=g), torch.randn(2, 1024, generator=g)
    return x, torch.tensor([10.0, 900.0]), Conditioning(c, None, p), torch.randn(2, 4, 8, 8, generator=g)


def test_sd3_controlnet_through_the_adapter_is_the_stock_pipelines_call():
    net = _net()
    cn = new_controlnet("sd3", net, None, ControlNetOptions())
    assert cn.config.num_layers == 1 and not cn.config.force_zeros_for_pooled_projection
    assert net.config["num_layers"] == 2  # from_transformer wrote into a copy of the base's config
    x, t, cond, control = _inputs()
    den = SD3Denoiser(net)
    with torch.no_grad():
        plain = den(net, x, t, cond)
        res = den.control_residuals(cn, x, t, cond, control)
        assert torch.equal(den(net, x, t, cond, res), plain)  # zero-initialised: the base is unchanged
        for p in cn.controlnet_blocks.parameters():
            torch.nn.init.normal_(p, std=0.05)
        torch.nn.init.normal_(cn.pos_embed_input.proj.weight, std=0.05)
        res = den.control_residuals(cn, x, t, cond, control)
        blocks = cn(hidden_states=x, timestep=t, encoder_hidden_states=cond.states, pooled_projections=cond.pooled,
                    controlnet_cond=control, return_dict=False)[0]
        want = net(hidden_states=x, timestep=t, encoder_hidden_states=cond.states, pooled_projections=cond.pooled,
                   block_controlnet_hidden_states=blocks, return_dict=False)[0]
        assert all(torch.equal(a, b) for a, b in zip(res.blocks, blocks))
        assert torch.equal(den(net, x, t, cond, Residuals(blocks=res.blocks)), want)
        assert not torch.equal(want, plain)
        # InstantX-style nets read a zero pooled vector, as the pipeline gives them
        cn.register_to_config(force_zeros_for_pooled_projection=True)
        zeros = cn(hidden_states=x, timestep=t, encoder_hidden_states=cond.states,
                   pooled_projections=torch.zeros_like(cond.pooled), controlnet_cond=control, return_dict=False)[0]
        assert all(torch.equal(a, b) for a, b in zip(den.control_residuals(cn, x, t, cond, control).blocks, zeros))


@pytest.fixture(scope="module")
def sd3_base(tiny_parts, tmp_path_factory) -> Path:
    """A tiny SD3 pipeline dir, made as tests/test_sd3.py makes one (2 steps, no samples)."""
    root = tmp_path_factory.mktemp("sd3-base")
    te = TE.replace("CLIP", str(tiny_parts["clip"]))
    ov = [f"model.text_encoders=[{te}, {te}]", "model.denoiser.overrides={num_layers: 2}",
          *tiny_family_overrides(tiny_parts, root, PROMPT), "train.max_steps=2", "train.checkpoint_every=null",
          "validation.every=null", "eval.shapes=false"]
    assert cli_main(["train", str(REPO / "recipes/shapes/sd3.yaml"), *ov]) == 0
    return root / "run" / "pipeline"


@pytest.fixture(scope="module")
def cn_run(sd3_base, tmp_path_factory) -> Path:
    from ldm_lab.data import shapes

    root = tmp_path_factory.mktemp("sd3-cn")
    data = shapes.generate(root / "data", 16, seed=5, world=shapes.World(resolution=32))
    run = root / "run"
    assert cli_main(["finetune", "controlnet", "--base", str(sd3_base), "--data", str(data), "--out", str(run),
                     "--steps", "4", "--batch-size", "4", "--lr", "3e-2", "--prompt-dropout", "0",
                     "validation.every=4", "validation.steps=3", "validation.sampler=euler", "plugin.validation_n=1",
                     "train.checkpoint_every=null", "logging.tracker=none", "logging.log_every=1",
                     f"data.cache_dir={root / 'cache'}", "data.resolution=32"]) == 0
    return run


def test_stock_sd3_controlnet_pipeline_reproduces_the_in_training_sample(sd3_base, cn_run):
    net = SD3ControlNetModel.from_pretrained(cn_run / "controlnet")
    assert net.config.num_layers == 1 and not net.config.force_zeros_for_pooled_projection
    hist = [json.loads(x) for x in (cn_run / "history.jsonl").read_text().splitlines()]
    assert len(hist) == 4 and all(np.isfinite(h["loss"]) for h in hist)
    d = cn_run / "samples" / "step-000004"
    row = json.loads((d / "samples.jsonl").read_text().splitlines()[0])
    seed, ours = in_training_sample(cn_run, 4)
    guidance = yaml.safe_load((cn_run / "recipe.yaml").read_text())["validation"]["guidance_scale"]
    code = f"""
import sys, numpy as np, torch
from PIL import Image
from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline, StableDiffusion3Pipeline
net = SD3ControlNetModel.from_pretrained({str(cn_run / 'controlnet')!r})
# no T5 in this base: passed as None, as diffusers documents for SD3 without its T5
pipe = StableDiffusion3ControlNetPipeline.from_pretrained({str(sd3_base)!r}, controlnet=net, text_encoder_3=None,
                                                         tokenizer_3=None)
control = Image.open({str(d / row['control'])!r})
kw = dict(negative_prompt="", num_inference_steps=3, guidance_scale={guidance}, max_sequence_length=0, output_type="np")
def run(scale):
    torch.manual_seed({seed})  # the pipeline draws the control image's latent from torch's global generator
    return pipe({row['prompt']!r}, control_image=control, controlnet_conditioning_scale=scale,
                generator=torch.Generator().manual_seed({seed}), **kw).images[0]
base = StableDiffusion3Pipeline.from_pretrained({str(sd3_base)!r}, text_encoder_3=None, tokenizer_3=None)
plain = base({row['prompt']!r}, generator=torch.Generator().manual_seed({seed}), **kw).images[0]
np.save(sys.argv[1], np.stack([(x * 255).round().astype(np.uint8) for x in (run(1.0), run(0.0), plain)]))
"""
    out = cn_run.parent / "stock.npy"
    run_without_ldm_lab(code, out)
    stock, zero_scale, plain = np.load(out).astype(int)
    assert stock.shape == ours.shape == (32, 32, 3)
    assert np.abs(stock - ours).max() <= 1  # the saved ControlNet is the one that sampled in training
    assert np.abs(zero_scale - plain).max() <= 1  # scale 0 is the base alone
    assert np.abs(stock - plain).max() > 8  # and the control changes the image


def test_sd3_controlnet_samples_from_the_cli(sd3_base, cn_run, tmp_path, capsys):
    flags = ["sample", str(sd3_base), "--prompt", PROMPT, "--steps", "2", "--sampler", "euler",
             "--controlnet", f"{cn_run}:1.0", "--control-image",
             str(cn_run / "samples" / "step-000004" / "control-00.png")]
    assert cli_main([*flags, "--out", str(tmp_path / "one")]) == 0
    assert (tmp_path / "one" / "0000.png").exists()
    assert cli_main([*flags, "--guess-mode"]) == 2
    err = capsys.readouterr().err
    assert "StableDiffusion3ControlNetPipeline has none" in err and "Traceback" not in err


def test_a_pixart_controlnet_is_refused_in_one_sentence(tiny_parts, tmp_path, capsys):
    rc = cli_main(["train", str(REPO / "recipes/shapes/pixart.yaml"), "trainer=controlnet",
                   f"model.text_encoder.pretrained={tiny_parts['clip']}",
                   f"model.autoencoder.pretrained={tiny_parts['vae']}", f"output.dir={tmp_path / 'run'}",
                   "data.caption_dropout=0"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err[-800:]
    assert "diffusers 0.42 has no PixArt ControlNet model or pipeline" in err
    assert len([ln for ln in err.strip().splitlines() if ln.strip()]) == 1, err
