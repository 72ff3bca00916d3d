"""One-file checkpoints in the original Stable Diffusion layout (A1111, ComfyUI, Forge, kohya):
the key map agrees with diffusers' own reader on the SD 1.5 architecture, and a written
pipeline reads back through stock diffusers' ``from_single_file`` with every weight equal."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, tiny_t2i_overrides
from ldm_lab.cli import main as cli_main

SHAPES_PIPELINE = REPO / "data/pretrained/shapes-t2i"


def test_sd15_key_map_is_the_one_diffusers_reads():
    """SD 1.5's UNet and VAE (from the sd15 preset and the SD VAE config, on the meta device):
    written keys are SD 1.5's original names, and diffusers' single-file converters map them back
    to every diffusers weight with its shape."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from ldm_lab import single_file
    from ldm_lab.components import unet_config
    from ldm_lab.recipe import load_recipe

    r = load_recipe(REPO / "recipes/sd15/bench-random.yaml", [])
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(r.model.unet))
        vae = AutoencoderKL(**r.model.autoencoder.config)
    u_state, v_state = unet.state_dict(), vae.state_dict()
    u_orig = {single_file.UNET_PREFIX + k: v for k, v in single_file.unet_to_original(u_state, unet.config).items()}
    v_orig = {single_file.VAE_PREFIX + k: v for k, v in single_file.vae_to_original(v_state, vae.config).items()}
    # names every SD 1.5 checkpoint has (input block 1 = level 0 resnet 0 + its transformer; the
    # upsampler of the attention-free deepest up level at index 1, of the others at index 2)
    for key in ("input_blocks.1.0.in_layers.0.weight", "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                "input_blocks.3.0.op.weight", "middle_block.1.proj_in.weight", "middle_block.2.emb_layers.1.weight",
                "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "output_blocks.11.1.proj_out.bias",
                "time_embed.0.weight", "out.2.bias"):
        assert single_file.UNET_PREFIX + key in u_orig, key
    assert len(u_orig) == len(u_state) == 686
    for key, shape in (("encoder.mid.attn_1.q.weight", (512, 512, 1, 1)), ("decoder.up.3.upsample.conv.weight", None),
                       ("encoder.down.0.downsample.conv.weight", None), ("decoder.up.0.block.0.nin_shortcut.weight", None),
                       ("quant_conv.weight", None), ("encoder.norm_out.weight", None)):
        assert single_file.VAE_PREFIX + key in v_orig, key
        assert shape is None or tuple(v_orig[single_file.VAE_PREFIX + key].shape) == shape
    back = convert_ldm_unet_checkpoint(u_orig, dict(unet.config))
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in u_state.items()}
    back = convert_ldm_vae_checkpoint(v_orig, dict(vae.config))
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in v_state.items()}


def test_export_single_file_reads_back_in_stock_diffusers(tmp_path, capsys):
    """The shipped main-job pipeline (a 2-level UNet with attention only at the lower level):
    `ldm-lab export single-file` then diffusers' from_single_file gives every weight back exactly;
    fp16 halves the file; an existing file and a non-pipeline are one-sentence errors."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "shapes.safetensors"
    assert cli_main(["export", "single-file", str(SHAPES_PIPELINE), "--out", str(out)]) == 0
    keys = load_file(str(out))
    assert any(k.startswith("cond_stage_model.transformer.text_model.encoder.layers.0.") for k in keys)
    pipe = StableDiffusionPipeline.from_single_file(str(out), config=str(SHAPES_PIPELINE), local_files_only=True,
                                                    safety_checker=None)
    ref = StableDiffusionPipeline.from_pretrained(SHAPES_PIPELINE, safety_checker=None)
    for name in ("unet", "vae", "text_encoder"):
        got, want = getattr(pipe, name).state_dict(), getattr(ref, name).state_dict()
        assert got.keys() == want.keys(), name
        assert all(torch.equal(got[k], want[k]) for k in want), name
    half = tmp_path / "half.safetensors"
    assert cli_main(["export", "single-file", str(SHAPES_PIPELINE), "--out", str(half), "--dtype", "fp16"]) == 0
    assert {v.dtype for v in load_file(str(half)).values()} == {torch.float16}
    assert half.stat().st_size < 0.55 * out.stat().st_size
    capsys.readouterr()
    before = out.read_bytes()
    assert cli_main(["export", "single-file", str(SHAPES_PIPELINE), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before  # nothing overwritten
    assert cli_main(["export", "single-file", str(tmp_path), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "model_index.json" in capsys.readouterr().err


def test_training_writes_the_single_file_and_plugins_that_write_adapters_refuse_it(tiny_parts, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    run = tmp_path / "run"
    ov = tiny_t2i_overrides(tiny_parts, run, tmp_path / "data")
    ov = [o for o in ov if not o.startswith(("train.max_steps", "train.checkpoint_every", "validation.every"))]
    assert cli_main(["train", str(REPO / "recipes/shapes/t2i.yaml"), *ov, "train.max_steps=2",
                     "train.checkpoint_every=null", "validation.every=null", "eval.shapes=false",
                     "output.single_file=bf16"]) == 0
    f = run / "pipeline.safetensors"
    assert {v.dtype for v in load_file(str(f)).values()} == {torch.bfloat16}
    pipe = StableDiffusionPipeline.from_single_file(str(f), config=str(run / "pipeline"), local_files_only=True,
                                                    safety_checker=None, torch_dtype=torch.bfloat16)
    ref = StableDiffusionPipeline.from_pretrained(run / "pipeline", safety_checker=None)
    w = ref.unet.state_dict()
    assert all(torch.equal(v, w[k].to(torch.bfloat16)) for k, v in pipe.unet.state_dict().items())
    capsys.readouterr()
    assert cli_main(["train", str(REPO / "recipes/shapes/lora.yaml"), "output.single_file=fp16",
                     f"output.dir={tmp_path / 'lora'}"]) == 2
    err = capsys.readouterr().err
    assert "output.single_file" in err and "Traceback" not in err


@pytest.mark.parametrize("bad", ["output.single_file=fp8"])
def test_single_file_precision_is_checked(bad, capsys):
    assert cli_main(["recipe", "check", str(REPO / "recipes/shapes/t2i.yaml"), bad]) == 2
    assert "single_file" in capsys.readouterr().err


def test_what_cannot_be_one_file_is_refused_and_what_a1111_cannot_load_is_named(tmp_path, tiny_parts, capsys):
    import json
    import shutil

    from diffusers import DDPMScheduler, UNet2DConditionModel

    from ldm_lab import single_file
    from ldm_lab.components import unet_config
    from ldm_lab.recipe import load_recipe

    # a T5 (or any non-CLIP) text encoder: refused before anything is read or written
    t5 = tmp_path / "t5-pipeline"
    shutil.copytree(SHAPES_PIPELINE, t5)
    index = json.loads((t5 / "model_index.json").read_text())
    index["text_encoder"] = ["transformers", "T5EncoderModel"]
    (t5 / "model_index.json").write_text(json.dumps(index))
    capsys.readouterr()
    assert cli_main(["export", "single-file", str(t5), "--out", str(tmp_path / "t5.safetensors")]) == 2
    assert "T5EncoderModel" in capsys.readouterr().err and not (tmp_path / "t5.safetensors").exists()
    # layers per level: a uniform list is the int; mixed counts have no original layout
    cfg = dict(UNet2DConditionModel.load_config(SHAPES_PIPELINE / "unet"))
    assert single_file._unet_prefixes({**cfg, "layers_per_block": [1, 1]}) == single_file._unet_prefixes(cfg)
    with pytest.raises(single_file.SingleFileError):
        single_file._unet_prefixes({**cfg, "layers_per_block": [1, 2]})
    # a weight with no place in the layout is found by the check before training, not when saving
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    vae = AutoencoderKL.from_pretrained(SHAPES_PIPELINE / "vae")
    te = CLIPTextModel.from_pretrained(SHAPES_PIPELINE / "text_encoder")
    single_file.check_models(UNet2DConditionModel(**cfg), vae, te)
    with pytest.raises(single_file.SingleFileError, match="class_embedding"):
        single_file.check_models(UNet2DConditionModel(**{**cfg, "class_embed_type": "timestep"}), vae, te)
    # the SD 1.5 architecture and schedule (configs only): nothing for A1111/ComfyUI to trip on
    r = load_recipe(REPO / "recipes/sd15/bench-random.yaml", [])
    sd15 = tmp_path / "sd15-configs"
    for part, cfg_ in (("unet", unet_config(r.model.unet)), ("vae", r.model.autoencoder.config),
                       ("text_encoder", r.model.text_encoder.config)):
        (sd15 / part).mkdir(parents=True)
        (sd15 / part / "config.json").write_text(json.dumps(cfg_))
    n = r.noise
    DDPMScheduler(beta_schedule=n.beta_schedule, beta_start=n.beta_start, beta_end=n.beta_end,
                  prediction_type=n.prediction_type).save_config(sd15 / "scheduler")
    assert single_file.sd15_differences(sd15) == []
    shapes = single_file.sd15_differences(SHAPES_PIPELINE)
    assert any(d.startswith("vae scaling_factor") for d in shapes) and any("cross_attention_dim" in d for d in shapes)
    # training refuses up front (exit 2, before any step) what cannot be written at the end
    run = tmp_path / "run"
    ov = tiny_t2i_overrides(tiny_parts, run, tmp_path / "data")
    ov = [o if not o.startswith("model.unet.overrides=") else o[:-1] + ", class_embed_type: timestep}" for o in ov]
    assert cli_main(["train", str(REPO / "recipes/shapes/t2i.yaml"), *ov, "output.single_file=fp16"]) == 2
    err = capsys.readouterr().err
    assert "output.single_file cannot be written" in err and "class_embedding" in err
    assert not (run / "checkpoints").exists()


def test_fp32_means_fp32_for_a_pipeline_saved_in_fp16(tmp_path):
    from diffusers import StableDiffusionPipeline

    half = tmp_path / "half"
    StableDiffusionPipeline.from_pretrained(SHAPES_PIPELINE, torch_dtype=torch.float16,
                                            safety_checker=None).save_pretrained(half)
    out = tmp_path / "f.safetensors"
    assert cli_main(["export", "single-file", str(half), "--out", str(out), "--dtype", "fp32"]) == 0
    assert {v.dtype for v in load_file(str(out)).values()} == {torch.float32}


def test_sd2_class_pipeline_writes_the_openclip_text_layout_and_reads_back(tmp_path):
    """An SD 2.x-class pipeline (linear attention projections, a gelu CLIP text tower): the text
    encoder goes under cond_stage_model.model.* in open_clip's names with q/k/v fused, diffusers'
    OpenCLIP reader maps the SD 2.1 sizes back to every weight, and a small such pipeline reads
    back through from_single_file with every weight equal."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ldm_lab import single_file
    from ldm_lab.components import PRESETS

    # the SD 2.1 text tower's sizes (OpenCLIP-H less its last layer), on the meta device
    sd21_text = CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                               num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu")
    with torch.device("meta"):
        te = CLIPTextModel(sd21_text)
    state = {k: v for k, v in te.state_dict().items() if not k.endswith("position_ids")}
    orig = {single_file.OPENCLIP_PREFIX + k: v for k, v in single_file.text_to_openclip(state).items()}
    assert tuple(orig["cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"].shape) == (3072, 1024)
    back = convert_open_clip_checkpoint(te, orig)
    norm = lambda d: {k.removeprefix("text_model."): tuple(v.shape) for k, v in d.items()}  # noqa: E731
    assert norm(back) == norm(state)

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**PRESETS["tiny"], "cross_attention_dim": 32, "use_linear_projection": True,
                                   "attention_head_dim": [4, 8]})
    vae = AutoencoderKL(block_out_channels=[16, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8, latent_channels=4)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu"))
    tok = CLIPTokenizer.from_pretrained(REPO / "data/pretrained/shapes-clip/tokenizer")
    src = tmp_path / "sd2-class"
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                            scheduler=DDPMScheduler(prediction_type="v_prediction"), safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(src)
    out = tmp_path / "sd2.safetensors"
    assert cli_main(["export", "single-file", str(src), "--out", str(out)]) == 0
    keys = load_file(str(out))
    assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in keys
    assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)
    pipe = StableDiffusionPipeline.from_single_file(str(out), config=str(src), local_files_only=True,
                                                    safety_checker=None)
    for name, ref in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        got, want = getattr(pipe, name).state_dict(), ref.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want if not k.endswith("position_ids")), name
