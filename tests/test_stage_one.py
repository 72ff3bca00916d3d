"""Stage-one trainers (autoencoder, CLIP) run through the loop and write stock-loadable parts;
the shipped parts under data/pretrained/ load the same way."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO
from ldm_lab.cli import main as cli_main


def test_autoencoder_trainer_tiny_run(tmp_path):
    from diffusers import AutoencoderKL

    run = tmp_path / "ae"
    assert cli_main([
        "train", str(REPO / "recipes/shapes/autoencoder.yaml"),
        "model.autoencoder.config.block_out_channels=[8, 16, 16]", "model.autoencoder.config.norm_num_groups=8",
        "model.autoencoder.config.down_block_types=[DownEncoderBlock2D, DownEncoderBlock2D, DownEncoderBlock2D]",
        "model.autoencoder.config.up_block_types=[UpDecoderBlock2D, UpDecoderBlock2D, UpDecoderBlock2D]",
        "data.shapes.n=48", "data.shapes.resolution=32", "data.resolution=32", f"data.cache_dir={tmp_path / 'data'}",
        "train.batch_size=8", "train.max_steps=4", "validation.every=4", "plugin.scale_batches=1",
        f"output.dir={run}", f"output.export_to={tmp_path / 'exported'}",
    ]) == 0
    vae = AutoencoderKL.from_pretrained(tmp_path / "exported")
    metrics = json.loads((run / "metrics.json").read_text())
    assert vae.config.scaling_factor == pytest.approx(metrics["scaling_factor"])
    assert (run / "samples" / "reconstructions-000004.png").exists()
    assert metrics["reconstruction_adherence"]["n"] == 256
    assert cli_main(["eval", "autoencoder", str(tmp_path / "exported"), "--n", "8", "--resolution", "32"]) == 0
    assert cli_main(["eval", "autoencoder", str(tmp_path / "nothing")]) == 2


def test_clip_trainer_tiny_run(tmp_path):
    from transformers import CLIPTextModel, CLIPTokenizer

    run = tmp_path / "clip"
    assert cli_main([
        "train", str(REPO / "recipes/shapes/clip.yaml"),
        "plugin.text={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2}",
        "plugin.vision={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, patch_size: 8}",
        "plugin.projection_dim=16",
        "data.shapes.n=48", "data.shapes.resolution=32", "data.resolution=32", f"data.cache_dir={tmp_path / 'data'}",
        "train.batch_size=16", "train.max_steps=3", "validation.every=3", f"output.dir={run}", "output.export_to=null",
    ]) == 0
    tok = CLIPTokenizer.from_pretrained(run / "tokenizer")
    te = CLIPTextModel.from_pretrained(run / "text_encoder")
    ids = tok(["a small red star at the top on a gray background"], padding="max_length", max_length=20,
              return_tensors="pt").input_ids
    assert te(ids).last_hidden_state.shape == (1, 20, 32)
    # 48 rows -> the accuracy is counted over 48 candidates: a multiple of 1/48
    acc = json.loads((run / "metrics.json").read_text())["retrieval_top1_256"]
    assert abs(acc * 48 - round(acc * 48)) < 1e-6


def test_unknown_plugin_option_exits_2(tmp_path, capsys):
    code = cli_main(["train", str(REPO / "recipes/shapes/clip.yaml"), "plugin.max_lenght=20",
                     f"output.dir={tmp_path / 'x'}", "data.shapes.n=8", f"data.cache_dir={tmp_path / 'd'}"])
    assert code == 2
    assert "did you mean 'plugin.max_length'" in capsys.readouterr().err


def test_shipped_parts_load_with_stock_libraries():
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(REPO / "data/pretrained/shapes-autoencoder")
    tok = CLIPTokenizer.from_pretrained(REPO / "data/pretrained/shapes-clip/tokenizer")
    te = CLIPTextModel.from_pretrained(REPO / "data/pretrained/shapes-clip/text_encoder")
    assert vae.config.latent_channels == 4 and 0.05 < vae.config.scaling_factor < 20
    with torch.no_grad():
        h = te(tok(["a large red circle at the center on a white background", ""], padding="max_length",
                   max_length=tok.model_max_length, return_tensors="pt").input_ids).last_hidden_state
    assert h.shape[-1] == 64 and not torch.allclose(h[0], h[1])
