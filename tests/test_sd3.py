"""The SD3 family (MMDiT, flow matching) through the seams: the combine rule against the stock
pipeline's own prompt encoding, per-encoder dropout, the adapter against a direct call, and a
tiny run whose artifact loads with stock StableDiffusion3Pipeline in a process that never imports
ldm_lab and reproduces the in-training sample."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel

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
from ldm_lab.components.backbones import SD3_PRESETS
from ldm_lab.components.denoiser import SD3Denoiser, denoiser_for
from ldm_lab.components.record import Conditioning
from ldm_lab.components.text_encoders import load_text_encoder
from ldm_lab.conditioning import Conditioner
from ldm_lab.errors import UserError
from ldm_lab.recipe.schema import TextEncoderSpec
from ldm_lab.sampling import build_family_pipeline
from ldm_lab.trainers.randomness import BatchRNG

RECIPE = REPO / "recipes/shapes/sd3.yaml"
PROMPT = "a large red circle at the center on a white background"


def _clip(parts, **kw):
    return load_text_encoder(TextEncoderSpec(kind="clip", pretrained=str(parts["clip"]), subfolder="text_encoder",
                                             projection=True, hidden_layer=-2, **kw))


def _t5(parts):
    return load_text_encoder(TextEncoderSpec(kind="t5", tokenizer=str(parts["clip"] / "tokenizer"), max_length=12, config=dict(
        d_model=48, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=49408)), use_mask=False)


def _net(joint=128):
    torch.manual_seed(0)
    return SD3Transformer2DModel(**{**SD3_PRESETS["tiny"], "num_layers": 1, "joint_attention_dim": joint})


@pytest.mark.parametrize("with_t5", [False, True])
def test_combine_is_the_stock_pipelines_prompt_encoding(tiny_parts, with_t5):
    torch.manual_seed(1)
    encs = [_clip(tiny_parts), _clip(tiny_parts)] + ([_t5(tiny_parts)] if with_t5 else [])
    net = _net(48 if with_t5 else 128)
    den = denoiser_for(net)
    cond = Conditioner(encs, den.combine)
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ldm_lab.components import load_autoencoder
    from ldm_lab.recipe.schema import AutoencoderSpec
    vae = load_autoencoder(AutoencoderSpec(pretrained=str(tiny_parts["vae"])))
    pipe = build_family_pipeline("sd3", vae, encs, net, FlowMatchEulerDiscreteScheduler(), "euler")
    L = encs[2].max_length if with_t5 else 0
    pe, npe, pooled, npooled = pipe.encode_prompt([PROMPT, "a blue star"], None, None, do_classifier_free_guidance=True,
                                                  negative_prompt=["", ""], max_sequence_length=L)
    ours, null = cond.encode([PROMPT, "a blue star"]), cond.null()
    torch.testing.assert_close(ours.states, pe, rtol=0, atol=0)
    torch.testing.assert_close(ours.pooled, pooled)  # float rounding of the projection only (~5e-7)
    torch.testing.assert_close(null.states.expand_as(npe), npe, rtol=0, atol=0)
    torch.testing.assert_close(null.pooled.expand_as(npooled), npooled)
    assert ours.states.shape[1] == encs[0].max_length + L


def test_the_adapter_is_the_direct_call(tiny_parts):
    net = _net()
    g = torch.Generator().manual_seed(0)
    x, c, p = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 20, 128, generator=g), torch.randn(2, 1024, generator=g)
    t = torch.tensor([10.0, 900.0])
    want = net(hidden_states=x, timestep=t, encoder_hidden_states=c, pooled_projections=p).sample
    assert torch.equal(SD3Denoiser(net)(net, x, t, Conditioning(c, None, p)), want)


def test_each_encoder_drops_on_its_own(tiny_parts):
    encs = [_clip(tiny_parts), _clip(tiny_parts)]
    cond = Conditioner(encs, denoiser_for(_net()).combine, dropouts=[1.0, None])
    parts = cond.encode_parts([PROMPT] * 64)
    out = cond.drop_parts(parts, 0.5, rng=BatchRNG(0))
    null0, null1 = cond.null_parts()
    assert torch.equal(out[0].states, null0.states.expand_as(out[0].states))  # always dropped
    dropped = (out[1].pooled == null1.pooled).all(1)
    assert 16 < int(dropped.sum()) < 48  # about half, drawn on its own
    assert torch.equal(out[1].pooled[~dropped], parts[1].pooled[~dropped])


def test_sd3_needs_two_projected_clips(tiny_parts, tmp_path, capsys):
    rc = cli_main(["train", str(RECIPE), f"model.text_encoders=[{{kind: clip, pretrained: {tiny_parts['clip']}, "
                   "subfolder: text_encoder}]", f"model.autoencoder.pretrained={tiny_parts['vae']}",
                   f"output.dir={tmp_path / 'run'}", "train.max_steps=1"])
    err = capsys.readouterr().err
    assert rc == 2 and "two CLIPs with projection: true" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def sd3_run(tiny_parts, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sd3")
    te = f"{{kind: clip, pretrained: {tiny_parts['clip']}, subfolder: text_encoder, projection: true, hidden_layer: -2}}"
    ov = [f"model.text_encoders=[{te}, {te}]", "model.denoiser.overrides={num_layers: 2}",
          *tiny_family_overrides(tiny_parts, root, PROMPT)]
    assert cli_main(["train", str(RECIPE), *ov]) == 0
    return root / "run"


def test_stock_sd3_pipeline_reproduces_the_in_training_sample(sd3_run):
    assert json.loads((sd3_run / "pipeline" / "scheduler" / "scheduler_config.json").read_text())["_class_name"] \
        == "FlowMatchEulerDiscreteScheduler"
    seed, ours = in_training_sample(sd3_run, 6)
    code = f"""
import sys, numpy as np, torch
from diffusers import StableDiffusion3Pipeline
# no T5 in this pipeline: passed as None, as diffusers documents for SD3 without its T5
pipe = StableDiffusion3Pipeline.from_pretrained({str(sd3_run / 'pipeline')!r}, text_encoder_3=None, tokenizer_3=None)
img = pipe({PROMPT!r}, negative_prompt="", num_inference_steps=3, guidance_scale=2.5, max_sequence_length=0,
           generator=torch.Generator().manual_seed({seed}), output_type="np").images[0]
np.save(sys.argv[1], (img * 255).round().astype(np.uint8))
"""
    out = sd3_run.parent / "stock.npy"
    run_without_ldm_lab(code, out)
    stock = np.load(out).astype(int)
    assert stock.shape == ours.shape == (32, 32, 3)
    assert np.abs(stock - ours).max() <= 1


def test_sd3_run_evaluates_and_logs(sd3_run):
    m = json.loads((sd3_run / "metrics.json").read_text())["shapes_eval"]
    assert m["n"] == 6
    hist = [json.loads(x) for x in (sd3_run / "history.jsonl").read_text().splitlines()]
    assert all(np.isfinite(h["loss"]) for h in hist)


def test_overrides_index_the_text_encoders():
    from ldm_lab.recipe import load_recipe

    r = load_recipe(RECIPE, ["model.text_encoders.1.dropout=0.3"], check_paths=False)
    assert r.model.text_encoders[1].dropout == 0.3 and r.model.text_encoders[0].dropout is None
    with pytest.raises(UserError, match="'5' is not an index of that list"):
        load_recipe(RECIPE, ["model.text_encoders.5.dropout=0"], check_paths=False)


def test_lora_on_sd3_loads_with_stock_load_lora_weights(sd3_run, tmp_path):
    """A LoRA on the MMDiT (both streams' attention + feed-forwards), trained on the tiny SD3 run's
    pipeline as its base, is written by StableDiffusion3Pipeline.save_lora_weights; a process that
    never imports ldm_lab loads it with load_lora_weights, the output changes, and it reproduces the
    in-training sample."""
    run = tmp_path / "lora"
    ov = [*tiny_lora_overrides(sd3_run / "pipeline", tmp_path, PROMPT, "euler"), "noise={}"]
    assert cli_main(["train", str(REPO / "recipes/shapes/lora.yaml"), *ov]) == 0
    recipe = json.loads(json.dumps(__import__("yaml").safe_load((run / "recipe.yaml").read_text())))
    assert recipe["noise"]["objective"] == "flow" and recipe["model"]["denoiser"]["family"] == "sd3"
    seed, ours = in_training_sample(run, 4)
    code = f"""
import sys, numpy as np, torch
from diffusers import StableDiffusion3Pipeline
pipe = StableDiffusion3Pipeline.from_pretrained({str(sd3_run / 'pipeline')!r}, text_encoder_3=None, tokenizer_3=None)
kw = dict(negative_prompt="", num_inference_steps=3, guidance_scale=2.5, max_sequence_length=0, output_type="np")
base = pipe({PROMPT!r}, generator=torch.Generator().manual_seed({seed}), **kw).images[0]
pipe.load_lora_weights({str(run)!r})
img = pipe({PROMPT!r}, generator=torch.Generator().manual_seed({seed}), **kw).images[0]
np.save(sys.argv[1], np.stack([(x * 255).round().astype(np.uint8) for x in (base, img)]))
"""
    stock_lora_check(code, tmp_path / "stock.npy", ours)
    # export lora converts UNet LoRAs: an SD3 one is one sentence saying how it loads, nothing written
    assert cli_main(["export", "lora", str(run), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")]) == 2
    assert not (tmp_path / "k.safetensors").exists()


def test_lokr_on_sd3_loads_with_lycoris_lora(sd3_run, tmp_path):
    """A LoKr on the MMDiT: its LyCORIS file (``lycoris_*`` keys) is built by lycoris-lora's
    create_lycoris_from_weights onto a stock SD3Transformer2DModel in a process that never imports
    ldm_lab, with every module matched; the output changes and reproduces the in-training sample."""
    run = tmp_path / "lora"
    ov = [*tiny_lora_overrides(sd3_run / "pipeline", tmp_path, PROMPT, "euler"), "noise={}", "plugin.adapter=lokr",
          "plugin.alpha=2"]
    assert cli_main(["train", str(REPO / "recipes/shapes/lora.yaml"), *ov]) == 0
    assert (run / "transformer" / "adapter_config.json").is_file() and not (run / "comfyui_weights.safetensors").exists()
    seed, ours = in_training_sample(run, 4)
    code = f"""
import sys, numpy as np, torch
from safetensors.torch import load_file
from diffusers import StableDiffusion3Pipeline
from lycoris import create_lycoris_from_weights
pipe = StableDiffusion3Pipeline.from_pretrained({str(sd3_run / 'pipeline')!r}, text_encoder_3=None, tokenizer_3=None)
kw = dict(negative_prompt="", num_inference_steps=3, guidance_scale=2.5, max_sequence_length=0, output_type="np")
base = pipe({PROMPT!r}, generator=torch.Generator().manual_seed({seed}), **kw).images[0]
sd = load_file({str(run / 'lycoris_weights.safetensors')!r})
net, _ = create_lycoris_from_weights(1.0, None, pipe.transformer, weights_sd=sd)
assert {{m.lora_name for m in net.loras}} == {{k.split(".")[0] for k in sd}}
net.apply_to()
with torch.no_grad():
    img = pipe({PROMPT!r}, generator=torch.Generator().manual_seed({seed}), **kw).images[0]
np.save(sys.argv[1], np.stack([(x * 255).round().astype(np.uint8) for x in (base, img)]))
"""
    stock_lora_check(code, tmp_path / "stock.npy", ours)
    # and ComfyUI's key rules for an MMDiT map every key (its "lycoris_" naming of diffusers modules)
    from safetensors.torch import load_file

    from comfyui_keys import key_map_mmdit, unmapped

    names = key_map_mmdit(SD3Transformer2DModel.from_pretrained(sd3_run / "pipeline" / "transformer").state_dict())
    keys = list(load_file(run / "lycoris_weights.safetensors"))
    assert keys and unmapped(keys, names) == []


def test_dreambooth_full_on_sd3_is_a_stock_sd3_pipeline(sd3_run, tmp_path):
    """Full DreamBooth on the MMDiT: every transformer weight trains, the artifact is a stock
    StableDiffusion3Pipeline dir that reproduces the in-training sample without ldm_lab."""
    run = tmp_path / "db"
    assert cli_main(dreambooth_flags(sd3_run / "pipeline", tmp_path, "euler")) == 0
    info = json.loads((run / "dreambooth.json").read_text())
    assert info["mode"] == "full" and info["identifier"] == "zwx"
    new = SD3Transformer2DModel.from_pretrained(run / "pipeline" / "transformer").state_dict()
    old = SD3Transformer2DModel.from_pretrained(sd3_run / "pipeline" / "transformer").state_dict()
    assert sum(not torch.equal(new[k], old[k]) for k in new) > 0.5 * len(new)
    seed, ours = in_training_sample(run, 4)
    code = f"""
import sys, numpy as np, torch
from diffusers import StableDiffusion3Pipeline
pipe = StableDiffusion3Pipeline.from_pretrained({str(run / 'pipeline')!r}, text_encoder_3=None, tokenizer_3=None)
img = pipe({DB_PROMPT!r}, negative_prompt="", num_inference_steps=3, guidance_scale=5.0, max_sequence_length=0,
           generator=torch.Generator().manual_seed({seed}), output_type="np").images[0]
np.save(sys.argv[1], (img * 255).round().astype(np.uint8))
"""
    run_without_ldm_lab(code, tmp_path / "stock.npy")
    assert np.abs(np.load(tmp_path / "stock.npy").astype(int) - ours).max() <= 1


def test_dreambooth_lora_with_prior_on_sd3_loads_with_load_lora_weights(sd3_run, tmp_path):
    """LoRA DreamBooth with prior preservation on the MMDiT: class images come from the base with
    its flow sampler; the adapter loads with stock load_lora_weights and changes the output."""
    run = tmp_path / "db"
    assert cli_main(dreambooth_flags(sd3_run / "pipeline", tmp_path, "euler", (
        "--lora", "--lr", "5e-2", "--rank", "4", "--targets", "attn_ff", "--prior-preservation",
        "--class-prompt", "a red circle", "--num-class-images", "2", "--class-dir", str(tmp_path / "class"))) +
        ["plugin.class_steps=2", "plugin.class_sampler=euler"]) == 0
    manifest = json.loads((tmp_path / "class" / "manifest.json").read_text())
    assert manifest["count"] == 2 and manifest["sampler"] == "euler"
    hist = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    assert all(np.isfinite(h["prior_loss"]) for h in hist)
    seed, ours = in_training_sample(run, 4)
    code = f"""
import sys, numpy as np, torch
from diffusers import StableDiffusion3Pipeline
pipe = StableDiffusion3Pipeline.from_pretrained({str(sd3_run / 'pipeline')!r}, text_encoder_3=None, tokenizer_3=None)
kw = dict(negative_prompt="", num_inference_steps=3, guidance_scale=5.0, max_sequence_length=0, output_type="np")
base = pipe({DB_PROMPT!r}, generator=torch.Generator().manual_seed({seed}), **kw).images[0]
pipe.load_lora_weights({str(run)!r})
img = pipe({DB_PROMPT!r}, generator=torch.Generator().manual_seed({seed}), **kw).images[0]
np.save(sys.argv[1], np.stack([(x * 255).round().astype(np.uint8) for x in (base, img)]))
"""
    stock_lora_check(code, tmp_path / "stock.npy", ours)


def test_dreambooth_text_encoder_training_is_unet_only_so_far(sd3_run, tmp_path, capsys):
    rc = cli_main(dreambooth_flags(sd3_run / "pipeline", tmp_path, "euler", ("--train-text-encoder",)))
    err = capsys.readouterr().err
    assert rc == 2 and "plugin.train_text_encoder is for the unet family so far" in err and "Traceback" not in err


def test_bench_runs_on_sd3_training_and_its_flow_samplers(sd3_run, tiny_parts, tmp_path, capsys):
    """`ldm-lab bench` on an SD3 recipe: the naive row runs both text encoders every step, ours reads
    the cache; the sampling benchmark runs exactly the samplers a flow SD3 pipeline can call."""
    from ldm_lab import bench

    te = f"{{kind: clip, pretrained: {tiny_parts['clip']}, subfolder: text_encoder, projection: true, hidden_layer: -2}}"
    ov = [f"model.text_encoders=[{te}, {te}]", "model.denoiser.overrides={num_layers: 2}",
          *tiny_family_overrides(tiny_parts, tmp_path, PROMPT)]
    assert cli_main(["bench", "--steps", "2", "--warmup", "1", "--compare", "naive", "--out", str(tmp_path / "b"),
                     str(RECIPE), *ov]) == 0
    table = capsys.readouterr().out
    assert "| naive |" in table and "denoiser fwd ms" in table
    by = {r["pipeline"]: r for r in json.loads((tmp_path / "b" / "training.json").read_text())["results"]}
    assert by["naive"]["phases_s"]["text_encoder"] > 0 and "text_encoder" not in by["ldm-lab"]["phases_s"]
    assert by["ldm-lab"]["model_flops_per_sample"] > 0 and by["ldm-lab"]["samples_per_s"] > 0
    rep = bench.run_sampling(str(sd3_run), n=2, batch=2, out=tmp_path / "s")
    assert [r["sampler"] for r in rep["samplers"]] == ["euler", "dpm++", "unipc"]
    assert all(r["s_per_image"] > 0 and 0 <= r["adherence"]["all"] <= 1 for r in rep["samplers"])
    assert "StableDiffusion3Pipeline; device:" in bench.format_sampling(rep)
