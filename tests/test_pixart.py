"""The PixArt family (text DiT, DDPM with a learned variance) through the seams: the VLB pieces
against closed forms, the hybrid loss, the adapter against a direct call, the CLIP mask against the
tokenizer's, and a tiny run whose artifact loads with stock PixArtSigmaPipeline in a process that
never imports ldm_lab and reproduces the in-training sample."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, PixArtTransformer2DModel

from conftest import (
    DB_PROMPT,
    REPO,
    dreambooth_flags,
    in_training_sample,
    run_without_ldm_lab,
    stock_lora_check,
    tiny_family_overrides,
    tiny_lora_overrides,
)
from ldm_lab.cli import main as cli_main
from ldm_lab.components.backbones import PIXART_PRESETS
from ldm_lab.components.denoiser import PixArtDenoiser, denoiser_for
from ldm_lab.components.record import Conditioning
from ldm_lab.components.text_encoders import load_text_encoder
from ldm_lab.diffusion.ddpm import DDPMObjective
from ldm_lab.diffusion.vlb import gaussian_nll, normal_kl, posterior, vlb_terms
from ldm_lab.recipe.schema import TextEncoderSpec
from ldm_lab.trainers.randomness import BatchRNG

RECIPE = REPO / "recipes/shapes/pixart.yaml"
PROMPT = "a large red circle at the center on a white background"


def test_gaussian_kl_and_nll_closed_forms():
    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2, x = (torch.randn(50, generator=g) for _ in range(5))
    want = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (lv1 / 2).exp()),
                                             torch.distributions.Normal(m2, (lv2 / 2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), want)
    torch.testing.assert_close(gaussian_nll(x, m1, lv1), -torch.distributions.Normal(m1, (lv1 / 2).exp()).log_prob(x))


def test_posterior_by_hand():
    s = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(1)
    x0, xt = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t = torch.tensor([0, 10, 999])
    mean, logvar, log_beta = posterior(s, x0, xt, t)
    ab = s.alphas_cumprod.double()
    for i, k in enumerate(t.tolist()):
        prev = ab[k - 1] if k > 0 else torch.tensor(1.0, dtype=torch.float64)
        beta = s.betas[k].double()
        m = (prev.sqrt() * beta / (1 - ab[k])) * x0[i] + ((1 - beta).sqrt() * (1 - prev) / (1 - ab[k])) * xt[i]
        torch.testing.assert_close(mean[i], m.float())
        var = beta * (1 - prev) / (1 - ab[k]) if k > 0 else s.betas[1].double() * (1 - ab[0]) / (1 - ab[1])
        assert logvar[i].item() == pytest.approx(math.log(var.item()), rel=1e-6)
        assert log_beta[i].item() == pytest.approx(math.log(beta.item()), rel=1e-6)
        if k > 0:  # the scheduler's own fixed-small variance is β̃_t
            assert s._get_variance(k).item() == pytest.approx(var.item(), rel=1e-4)


def test_the_bound_is_zero_for_the_true_mean_and_variance():
    s = DDPMScheduler()
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(4, 4, 2, 2, generator=g), torch.randn(4, 4, 2, 2, generator=g)
    t = torch.tensor([1, 50, 500, 999])
    xt = s.add_noise(x0, eps, t)
    vb = vlb_terms(s, x0, xt, t, eps, -torch.ones_like(x0))  # v = −1: the posterior's variance
    assert vb.abs().max().item() < 1e-4
    assert (vlb_terms(s, x0, xt, t, eps, torch.ones_like(x0)) > 0).all()  # β_t instead: a positive KL


def test_hybrid_loss_trains_the_variance_by_the_bound_only():
    obj = DDPMObjective(learned_variance=True)
    x0 = torch.randn(8, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    d = obj.draw(x0, BatchRNG(0))
    out = torch.randn(8, 8, 4, 4, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    loss = obj.loss(out, d)
    mse = (out[:, :4] - d.target).pow(2).flatten(1).mean(1)
    vb = vlb_terms(obj.scheduler, x0, d.x_t, d.t, out[:, :4], out[:, 4:])
    torch.testing.assert_close(loss, mse + 0.001 * 1000 * vb)
    loss.sum().backward()
    torch.testing.assert_close(out.grad[:, :4], 2 * (out[:, :4] - d.target).detach() / (4 * 4 * 4))  # MSE only


def _net(out_channels=8, caption=32):
    torch.manual_seed(0)
    return PixArtTransformer2DModel(**{**PIXART_PRESETS["tiny"], "num_layers": 1, "out_channels": out_channels,
                                       "caption_channels": caption})


def test_the_adapter_is_the_direct_call():
    net = _net()
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 20, 32, generator=g)
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[:, :7] = True
    t = torch.tensor([10, 900])
    want = net(x, encoder_hidden_states=c, encoder_attention_mask=mask.float(), timestep=t,
               added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    den = denoiser_for(net)
    assert isinstance(den, PixArtDenoiser) and den.learned_variance
    assert torch.equal(den(net, x, t, Conditioning(c, mask)), want)
    assert not denoiser_for(_net(out_channels=4)).learned_variance


def test_clip_mask_is_the_tokenizers(tiny_parts):
    te = load_text_encoder(TextEncoderSpec(kind="clip", pretrained=str(tiny_parts["clip"]), subfolder="text_encoder"),
                           use_mask=True)
    prompts = [PROMPT, "", "a blue star"]
    tok = te.tokenizer(prompts, padding="max_length", max_length=te.max_length, truncation=True, return_tensors="pt")
    rec = te(prompts)
    assert torch.equal(rec.mask.long(), tok.attention_mask)
    want = te.model(tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
    torch.testing.assert_close(rec.states, want, rtol=0, atol=0)


def test_flow_with_a_learned_variance_is_refused(tiny_parts, tmp_path, capsys):
    rc = cli_main(["train", str(RECIPE), "noise={objective: flow}", f"model.text_encoder.pretrained={tiny_parts['clip']}",
                   f"model.autoencoder.pretrained={tiny_parts['vae']}", "model.denoiser.overrides={caption_channels: 32}",
                   f"output.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "flow matching has none" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def pixart_run(tiny_parts, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pixart")
    ov = [f"model.text_encoder.pretrained={tiny_parts['clip']}", "model.denoiser.overrides={num_layers: 2, caption_channels: 32}",
          *tiny_family_overrides(tiny_parts, root, PROMPT)]
    assert cli_main(["train", str(RECIPE), *ov]) == 0
    return root / "run"


def _stock_matches_in_training(run: Path, out: Path) -> None:
    """Stock PixArtSigmaPipeline, in a process that never imports ldm_lab, reproduces the run's
    in-training sample (step 6) for its seed within one 8-bit level."""
    seed, ours = in_training_sample(run, 6)
    code = f"""
import sys, numpy as np, torch
from diffusers import PixArtSigmaPipeline
pipe = PixArtSigmaPipeline.from_pretrained({str(run / 'pipeline')!r})
img = pipe({PROMPT!r}, negative_prompt="", num_inference_steps=3, guidance_scale=2.5, clean_caption=False,
           use_resolution_binning=False, max_sequence_length=pipe.tokenizer.model_max_length,
           generator=torch.Generator().manual_seed({seed}), output_type="np").images[0]
np.save(sys.argv[1], (img * 255).round().astype(np.uint8))
"""
    run_without_ldm_lab(code, out)
    stock = np.load(out).astype(int)
    assert stock.shape == ours.shape == (32, 32, 3)
    assert np.abs(stock - ours).max() <= 1


def test_stock_pixart_pipeline_reproduces_the_in_training_sample(pixart_run):
    index = json.loads((pixart_run / "pipeline" / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtSigmaPipeline" and index["transformer"][1] == "PixArtTransformer2DModel"
    _stock_matches_in_training(pixart_run, pixart_run.parent / "stock.npy")


def test_stock_pixart_pipeline_samples_the_flow_recipe_as_in_training(tiny_parts, tmp_path):
    """recipes/shapes/pixart-flow.yaml: the same DiT trained with flow matching; its artifact's
    scheduler is the flow DPM-Solver, and stock PixArtSigmaPipeline reproduces the in-training sample."""
    ov = [f"model.text_encoder.pretrained={tiny_parts['clip']}",
          "model.denoiser.overrides={num_layers: 2, caption_channels: 32, out_channels: 4}",
          *tiny_family_overrides(tiny_parts, tmp_path, PROMPT)]
    assert cli_main(["train", str(REPO / "recipes/shapes/pixart-flow.yaml"), *ov]) == 0
    run = tmp_path / "run"
    sched = json.loads((run / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "flow_prediction" and sched["use_flow_sigmas"]
    _stock_matches_in_training(run, tmp_path / "stock.npy")


def test_pixart_run_evaluates_and_logs(pixart_run):
    m = json.loads((pixart_run / "metrics.json").read_text())["shapes_eval"]
    assert m["n"] == 6
    hist = [json.loads(x) for x in (pixart_run / "history.jsonl").read_text().splitlines()]
    assert all(np.isfinite(h["loss"]) for h in hist)


def test_dit_init_starts_from_a_zero_prediction():
    from ldm_lab.components.backbones import load_backbone
    from ldm_lab.recipe.schema import DenoiserSpec

    torch.manual_seed(0)
    net = load_backbone(DenoiserSpec(family="pixart", preset="tiny", init="dit",
                                     overrides={"num_layers": 2, "caption_channels": 32}))
    g = torch.Generator().manual_seed(0)
    out = PixArtDenoiser(net)(net, torch.randn(2, 4, 8, 8, generator=g), torch.tensor([5, 500]),
                              Conditioning(torch.randn(2, 20, 32, generator=g), torch.ones(2, 20, dtype=torch.bool)))
    assert torch.equal(out, torch.zeros_like(out))
    assert all(b.attn2.to_out[0].weight.abs().sum() == 0 for b in net.transformer_blocks)
    assert net.transformer_blocks[0].attn1.to_q.weight.std() > 0.05  # xavier, not zeroed
    with pytest.raises(ValueError, match="init dit initialises a pixart backbone"):
        DenoiserSpec(family="sd3", preset="tiny", init="dit")


def test_lora_on_pixart_loads_with_stock_peft(pixart_run, tmp_path):
    """A LoRA on the DiT (self- and cross-attention + feed-forward), trained on the tiny PixArt run's
    pipeline as its base. PixArt's pipelines have no ``load_lora_weights``: the artifact is a PEFT
    adapter dir (RUN/transformer) that a process that never imports ldm_lab loads with
    ``PeftModel.from_pretrained(pipe.transformer, ...)``; the output changes and it reproduces the
    in-training sample. ``ldm-lab sample --lora`` reads the same dir."""
    run = tmp_path / "lora"
    ov = tiny_lora_overrides(pixart_run / "pipeline", tmp_path, PROMPT, "dpm++")
    assert cli_main(["train", str(REPO / "recipes/shapes/lora.yaml"), *ov]) == 0
    cfg = json.loads((run / "transformer" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and "ff.net.2" in cfg["target_modules"]
    seed, ours = in_training_sample(run, 4)
    code = f"""
import sys, numpy as np, torch
from diffusers import PixArtSigmaPipeline
from peft import PeftModel
pipe = PixArtSigmaPipeline.from_pretrained({str(pixart_run / 'pipeline')!r})
kw = dict(negative_prompt="", num_inference_steps=3, guidance_scale=2.5, clean_caption=False, use_resolution_binning=False,
          max_sequence_length=pipe.tokenizer.model_max_length, output_type="np")
base = pipe({PROMPT!r}, generator=torch.Generator().manual_seed({seed}), **kw).images[0]
PeftModel.from_pretrained(pipe.transformer, {str(run / 'transformer')!r})
img = pipe({PROMPT!r}, generator=torch.Generator().manual_seed({seed}), **kw).images[0]
np.save(sys.argv[1], np.stack([(x * 255).round().astype(np.uint8) for x in (base, img)]))
"""
    base, _ = stock_lora_check(code, tmp_path / "stock.npy", ours)
    # our own sampler reads the run dir as a LoRA for this pipeline, at scale 1 and 0
    for scale in (1.0, 0.0):
        d = tmp_path / f"sample-{scale}"
        assert cli_main(["sample", str(pixart_run / "pipeline"), "--lora", f"{run}:{scale}", "--prompt", PROMPT,
                         "--seed", str(seed), "--steps", "3", "--guidance", "2.5", "--sampler", "dpm++",
                         "--out", str(d)]) == 0
        img = np.asarray(__import__("PIL.Image").Image.open(d / "0000.png").convert("RGB")).astype(int)
        assert np.abs(img - (ours if scale else base)).max() <= 1
    # export lora converts UNet LoRAs: a PixArt adapter dir is one sentence saying how it loads
    assert cli_main(["export", "lora", str(run), "--format", "peft", "--out", str(tmp_path / "p")]) == 2
    assert not (tmp_path / "p").exists()


def test_dreambooth_full_with_prior_on_pixart_is_a_stock_pixart_pipeline(pixart_run, tmp_path):
    """Full DreamBooth with prior preservation on the DiT: class images from the base (DDPM,
    DPM-Solver), every transformer weight trains, and the artifact is a stock PixArtSigmaPipeline
    dir that reproduces the in-training sample in a process that never imports ldm_lab."""
    run = tmp_path / "db"
    assert cli_main(dreambooth_flags(pixart_run / "pipeline", tmp_path, "dpm++", (
        "--prior-preservation", "--class-prompt", "a red circle", "--num-class-images", "2",
        "--class-dir", str(tmp_path / "class"))) + ["plugin.class_steps=2"]) == 0
    assert json.loads((tmp_path / "class" / "manifest.json").read_text())["count"] == 2
    new = PixArtTransformer2DModel.from_pretrained(run / "pipeline" / "transformer").state_dict()
    old = PixArtTransformer2DModel.from_pretrained(pixart_run / "pipeline" / "transformer").state_dict()
    assert sum(not torch.equal(new[k], old[k]) for k in new) > 0.5 * len(new)
    seed, ours = in_training_sample(run, 4)
    code = f"""
import sys, numpy as np, torch
from diffusers import PixArtSigmaPipeline
pipe = PixArtSigmaPipeline.from_pretrained({str(run / 'pipeline')!r})
img = pipe({DB_PROMPT!r}, negative_prompt="", num_inference_steps=3, guidance_scale=5.0, clean_caption=False,
           use_resolution_binning=False, max_sequence_length=pipe.tokenizer.model_max_length,
           generator=torch.Generator().manual_seed({seed}), output_type="np").images[0]
np.save(sys.argv[1], (img * 255).round().astype(np.uint8))
"""
    run_without_ldm_lab(code, tmp_path / "stock.npy")
    assert np.abs(np.load(tmp_path / "stock.npy").astype(int) - ours).max() <= 1
