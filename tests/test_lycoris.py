"""LoKr and LoHa adapters (PEFT LoKrConfig / LoHaConfig) in the LoRA plugin: trained on a tiny
base, written in LyCORIS / kohya keys and ComfyUI's generic keys, and loaded by the real
clients: lycoris-lora onto stock diffusers modules in a fresh process (reproducing the
in-training sample), PEFT adapter dirs through ``ldm-lab sample --lora``, and ComfyUI's key
rules (tests/comfyui_keys.py) with zero unmapped keys."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from comfyui_keys import key_map, unmapped
from conftest import run_without_ldm_lab
from ldm_lab.cli import main as cli_main

PROMPT = "a large red circle at the center on a white background"
STEPS = 4


def _flags(base: Path, data: Path, out: Path, cache: Path, adapter: str, extra: tuple = ()) -> list[str]:
    return ["finetune", "lora", "--base", str(base), "--data", str(data), "--out", str(out), "--adapter", adapter,
            "--rank", "4", "--alpha", "2", "--targets", "attn_ff_conv", "--steps", str(STEPS), "--batch-size", "4",
            "--lr", "2e-2", "--train-text-encoder", "--validation-prompt", PROMPT, *extra, "train.checkpoint_every=2",
            "validation.every=2", "validation.steps=3", "validation.sampler=ddim", "train.lr_warmup_steps=0",
            "logging.tracker=none", "logging.log_every=1", f"data.cache_dir={cache}"]


@pytest.fixture(scope="module")
def runs(tiny_pipeline, tmp_path_factory):
    from ldm_lab.data import shapes

    root = tmp_path_factory.mktemp("lycoris")
    shapes.generate(root / "data", 16, seed=5, world=shapes.World(resolution=32))
    out = {"base": tiny_pipeline, "data": root / "data", "root": root}
    for adapter in ("lokr", "loha"):  # LoHa with Tucker cores on its 3x3 convolutions (hada_t1 / hada_t2)
        extra = ["plugin.conv_tucker=true"] if adapter == "loha" else []
        assert cli_main([*_flags(tiny_pipeline, root / "data", root / adapter, root / "cache", adapter), *extra]) == 0
        out[adapter] = root / adapter
    return out


@pytest.mark.parametrize("adapter", ["lokr", "loha"])
def test_artifact_holds_lycoris_keys_and_peft_dirs(runs, adapter):
    run = runs[adapter]
    sd = load_file(run / "lycoris_weights.safetensors")
    names = {"lokr": ("lokr_w1", "lokr_w2"), "loha": ("hada_w1_a", "hada_w2_b")}[adapter]
    assert any(k.startswith("lora_unet_") and k.split(".")[-1] in names for k in sd)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in sd)
    assert any("_resnets_" in k for k in sd)  # LoCon-style convolutions
    if adapter == "loha":
        assert any(k.endswith(".hada_t1") for k in sd)
    modules = {k.rsplit(".", 1)[0] for k in sd}
    assert all(f"{m}.alpha" in sd for m in modules)
    with safe_open(str(run / "lycoris_weights.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["algo"] == adapter
    assert json.loads(meta["ldm_lab"])["adapter"] == adapter
    for comp, alpha in (("unet", 2), ("text_encoder", 4)):  # the text encoder's alpha defaults to its rank
        cfg = json.loads((run / comp / "adapter_config.json").read_text())
        assert (cfg["peft_type"], cfg["r"], cfg["alpha"]) == (adapter.upper(), 4, alpha)
    comfy = load_file(run / "comfyui_weights.safetensors")
    assert any(k.startswith("diffusion_model.input_blocks.") for k in comfy)
    assert len(comfy) == len(sd)


def _lycoris_samples(base: Path, files: list, out: Path) -> list[np.ndarray]:
    """lycoris-lora on a stock diffusers pipeline in a fresh process that never imports ldm_lab: each
    file's ``lora_unet_`` / ``lora_te_`` modules built with ``create_lycoris_from_weights`` and
    applied to the UNet and the text encoder (None: the bare base), then one DDIM sample of PROMPT."""
    code = f"""
import numpy as np, torch
from safetensors.torch import load_file
from diffusers import StableDiffusionPipeline, DDIMScheduler
from lycoris import create_lycoris_from_weights
from lycoris.wrapper import LycorisNetwork
for i, f in enumerate({[str(x) if x else None for x in files]!r}):
    pipe = StableDiffusionPipeline.from_pretrained({str(base)!r}, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, steps_offset=1)
    if f:
        sd = load_file(f)
        clip = torch.nn.Module()  # the files name CLIP's modules under text_model. (the classic layout)
        if not hasattr(pipe.text_encoder, "text_model"):  # which transformers 5 flattened away
            clip.text_model = pipe.text_encoder
        else:
            clip = pipe.text_encoder
        for prefix, module in (("lora_unet", pipe.unet), ("lora_te", clip)):
            part = {{k: v for k, v in sd.items() if k.startswith(prefix + "_")}}
            LycorisNetwork.apply_preset({{"lora_prefix": prefix}})
            net, _ = create_lycoris_from_weights(1.0, None, module, weights_sd=part)
            wanted = {{k.split(".")[0] for k in part}}
            loaded = {{m.lora_name for m in net.loras}}
            assert loaded == wanted, sorted(wanted - loaded)[:3]  # no key left unmatched
            net.apply_to()
            net.to(torch.float32)
    with torch.no_grad():
        im = pipe({PROMPT!r}, negative_prompt="", num_inference_steps=3, guidance_scale=5.0,
                  generator=[torch.Generator().manual_seed(0)], output_type="np").images[0]
    np.save({str(out)!r} + f"/lyco-{{i}}.npy", im)
"""
    out.mkdir(parents=True, exist_ok=True)
    run_without_ldm_lab(code)
    return [np.load(out / f"lyco-{i}.npy") * 255 for i in range(len(files))]


def _trained_sample(run: Path) -> np.ndarray:
    return np.asarray(Image.open(run / "samples" / f"step-{STEPS:06d}" / "00.png"), dtype=np.float64)


def test_lycoris_lora_loads_each_export_and_reproduces_the_in_training_sample(runs, tmp_path):
    """The bar's client: lycoris-lora reads the LoKr and the LoHa file onto stock diffusers modules
    with every module matched and gives ldm-lab's own validation image (PNG rounding)."""
    files = [runs["lokr"] / "lycoris_weights.safetensors", runs["loha"] / "lycoris_weights.safetensors", None]
    lokr, loha, base = _lycoris_samples(runs["base"], files, tmp_path)
    for got, run in ((lokr, runs["lokr"]), (loha, runs["loha"])):
        trained = _trained_sample(run)
        assert np.abs(got - trained).max() <= 2.0
        assert np.abs(base - trained).max() > 10.0  # the adapters change the image


@pytest.mark.parametrize("adapter", ["lokr", "loha"])
def test_sample_reads_the_peft_adapter_dirs(runs, tmp_path, adapter):
    run = runs[adapter]
    assert cli_main(["sample", str(runs["base"]), "--lora", str(run), "--prompt", PROMPT, "--steps", "3",
                     "--sampler", "ddim", "--guidance", "5", "--seed", "0", "--out", str(tmp_path / "s")]) == 0
    got = np.asarray(Image.open(tmp_path / "s" / "0000.png"), dtype=np.float64)
    assert np.abs(got - _trained_sample(run)).max() <= 2.0


def _comfy_names(base: Path, tmp_path: Path) -> set[str]:
    """ComfyUI's key map for the tiny base: original-layout UNet keys from the single-file
    checkpoint, and diffusers' own ldm -> diffusers conversion inverted by tagging each tensor."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    ckpt = tmp_path / "base.safetensors"
    assert cli_main(["export", "single-file", str(base), "--out", str(ckpt)]) == 0
    state = load_file(ckpt)
    prefix = "model.diffusion_model."
    unet_keys = [k[len("model."):] for k in state if k.startswith(prefix)]
    names = [k for k in state if k.startswith(prefix)]
    tagged = {k: torch.full(state[k].shape, float(i), dtype=torch.float64) for i, k in enumerate(names)}
    back = convert_ldm_unet_checkpoint(tagged, dict(UNet2DConditionModel.load_config(base / "unet")))
    to_orig = {d: names[int(v.flatten()[0])][len("model."):] for d, v in back.items()}
    layers = json.loads((base / "text_encoder" / "config.json").read_text())["num_hidden_layers"]
    return key_map(unet_keys, to_orig, layers)


def test_every_export_passes_comfyui_key_rules(runs, tmp_path):
    """0 unmapped keys: the LoKr and LoHa files in both namings, and the plain LoRA's kohya export."""
    names = _comfy_names(runs["base"], tmp_path)
    lora = tmp_path / "lora"
    flags = _flags(runs["base"], runs["data"], lora, runs["root"] / "cache", "lora")
    assert cli_main([*flags, "validation.every=null", "train.checkpoint_every=null"]) == 0
    assert cli_main(["export", "lora", str(lora), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")]) == 0
    files = [runs[a] / n for a in ("lokr", "loha") for n in ("lycoris_weights.safetensors", "comfyui_weights.safetensors")]
    for f in [*files, tmp_path / "k.safetensors"]:
        keys = list(load_file(f))
        assert keys and unmapped(keys, names) == [], (f, unmapped(keys, names)[:5])
    # the check can fail: a key of no module ComfyUI knows is reported
    assert unmapped(["lora_unet_no_such_block.lokr_w1", "lora_unet_conv_in.weird_suffix"], names) == \
        ["lora_unet_conv_in.weird_suffix", "lora_unet_no_such_block.lokr_w1"]


@pytest.mark.parametrize("adapter", ["lokr"])
def test_resume_keeps_the_adapters_exactly(runs, tmp_path, adapter):
    run = tmp_path / "run"
    shutil.copytree(runs[adapter], run)
    first = load_file(run / "lycoris_weights.safetensors")
    flags = _flags(runs["base"], runs["data"], run, runs["root"] / "cache", adapter,
                   extra=("--resume", str(run / "checkpoints" / "checkpoint-2")))
    assert cli_main(flags) == 0
    again = load_file(run / "lycoris_weights.safetensors")
    assert set(first) == set(again) and all(torch.equal(first[k], again[k]) for k in first)


def test_full_matrix_lokr_folds_the_scale_into_w1():
    """A LoKr module whose two factors are full has scale 1 in LyCORIS and ComfyUI: the written
    update (w1 kron w2, alpha 1) equals PEFT's (alpha / r) * (w1 kron w2)."""
    from ldm_lab.lycoris_io import lycoris_modules

    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(4, 4, generator=g), torch.randn(8, 8, generator=g)
    w2a, w2b = torch.randn(8, 2, generator=g), torch.randn(2, 8, generator=g)
    state = {"a.lokr_w1": w1, "a.lokr_w2": w2, "b.lokr_w1": w1, "b.lokr_w2_a": w2a, "b.lokr_w2_b": w2b}
    cfg = {"r": 2, "alpha": 3, "rank_pattern": {}, "alpha_pattern": {}}
    out = lycoris_modules(state, cfg)
    assert float(out["a"]["alpha"]) == 1.0
    assert torch.allclose(torch.kron(out["a"]["lokr_w1"], out["a"]["lokr_w2"]), 1.5 * torch.kron(w1, w2))
    # a low-rank factor: LyCORIS scales by alpha / dim (dim = r), as PEFT does; alpha kept
    assert float(out["b"]["alpha"]) == 3.0 and torch.equal(out["b"]["lokr_w1"], w1)


def test_export_lora_of_a_lokr_run_says_what_it_already_holds(runs, tmp_path, capsys):
    capsys.readouterr()
    assert cli_main(["export", "lora", str(runs["lokr"]), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "already holds lycoris_weights.safetensors" in err[0], err
    assert not (tmp_path / "k.safetensors").exists()


def test_lokr_options_are_checked_in_one_sentence(runs, tmp_path, capsys):
    flags = _flags(runs["base"], runs["data"], tmp_path / "bad", runs["root"] / "cache", "lokr", extra=("--init", "pissa"))
    capsys.readouterr()
    assert cli_main(flags) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "LoRA initialisation" in err[0], err


def test_lokr_model_card_names_the_adapter(runs):
    from huggingface_hub import ModelCard

    card = ModelCard.load(runs["lokr"] / "README.md")
    assert "lokr" in card.data.tags and "| adapter | lokr |" in card.text and 'PeftModel.from_pretrained(pipe.unet' in card.text


def test_dreambooth_lora_mode_trains_a_loha(runs, tmp_path):
    """DreamBooth's --lora takes --adapter too: its artifact is the LyCORIS file (and a card with
    the identifier), which lycoris-lora's key reader matches module for module."""
    from conftest import dreambooth_flags

    flags = dreambooth_flags(runs["base"], tmp_path, "ddim", extra=("--lora", "--adapter", "loha", "--rank", "4"))
    assert cli_main(flags) == 0
    sd = load_file(tmp_path / "db" / "lycoris_weights.safetensors")
    assert any(k.endswith(".hada_w1_a") for k in sd) and not (tmp_path / "db" / "pytorch_lora_weights.safetensors").exists()
    card = (tmp_path / "db" / "README.md").read_text()
    assert "zwx" in card and "LoHa adapter" in card
