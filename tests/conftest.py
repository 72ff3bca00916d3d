"""Tiny local substitutes for every model a recipe names, built from configs (no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def make_tiny_parts(root: Path, hidden: int = 32, max_length: int = 20) -> dict[str, Path]:
    """Write a tiny CLIP text encoder + real-BPE tokenizer and a tiny autoencoder under ``root``."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ldm_lab.components import write_clip_bpe_vocab

    torch.manual_seed(0)
    clip = root / "clip"
    write_clip_bpe_vocab(clip / "tokenizer", model_max_length=max_length)
    tok = CLIPTokenizer.from_pretrained(clip / "tokenizer")
    CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=max_length, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )).save_pretrained(clip / "text_encoder")
    vae = root / "vae"
    AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=32,
    ).save_pretrained(vae)
    return {"clip": clip, "vae": vae}


@pytest.fixture(scope="session")
def tiny_parts(tmp_path_factory) -> dict[str, Path]:
    return make_tiny_parts(tmp_path_factory.mktemp("tiny-parts"))


TINY_UNET = {
    "preset": "tiny",
    "overrides": {"block_out_channels": [32, 32], "cross_attention_dim": 32, "attention_head_dim": 8,
                  "norm_num_groups": 8, "sample_size": 8},
}


def tiny_t2i_overrides(parts: dict[str, Path], run_dir: Path, data_dir: Path) -> list[str]:
    """Overrides that turn recipes/shapes/t2i.yaml into a seconds-long CPU run."""
    return [
        f"model.text_encoder.pretrained={parts['clip']}",
        f"model.autoencoder.pretrained={parts['vae']}",
        "model.unet.overrides={block_out_channels: [32, 32], cross_attention_dim: 32, attention_head_dim: 8, "
        "norm_num_groups: 8, sample_size: 8}",
        "data.shapes.n=64", "data.shapes.resolution=32", "data.resolution=32", f"data.cache_dir={data_dir}",
        "train.batch_size=8", "train.max_steps=12", "train.checkpoint_every=6", "validation.every=6",
        "validation.prompts=[a large red circle at the center on a white background]", "validation.steps=2",
        "eval.n=4", "eval.heldout_n=2", "eval.steps=2", "eval.every=0", "logging.tracker=none", "logging.log_every=4",
        f"output.dir={run_dir}",
    ]


def make_tiny_pipeline(root: Path, parts: dict[str, Path]) -> Path:
    """A stock StableDiffusionPipeline dir around the tiny parts and a tiny random UNet (a LoRA base)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from ldm_lab.components.unet import unet_config
    from ldm_lab.recipe.schema import UNetSpec

    torch.manual_seed(1)
    unet = UNet2DConditionModel(**unet_config(UNetSpec(**TINY_UNET)))
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(parts["vae"]),
        text_encoder=CLIPTextModel.from_pretrained(parts["clip"] / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(parts["clip"] / "tokenizer"), unet=unet,
        scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                prediction_type="v_prediction"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    out = root / "base-pipeline"
    pipe.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_parts, tmp_path_factory) -> Path:
    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny-pipeline"), tiny_parts)


def make_shards(root: Path, sizes: list[int], half: bool = False) -> str:
    """Webdataset tar shards of solid-colour 32 px JPEGs with captions, ``sizes[k]`` rows in shard
    k (``half``: the colour on the left half only, so a flip changes the image); returns the
    brace pattern naming them all."""
    import io
    import tarfile

    from PIL import Image

    colors = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
    names = list(colors)
    root.mkdir(parents=True)
    i = 0
    for k, size in enumerate(sizes):
        with tarfile.open(root / f"shard-{k:03d}.tar", "w") as tar:
            for _ in range(size):
                buf = io.BytesIO()
                im = Image.new("RGB", (32, 32), (255, 255, 255) if half else colors[names[i % 4]])
                if half:
                    im.paste(colors[names[i % 4]], (0, 0, 16, 32))
                im.save(buf, "JPEG", quality=95)
                for ext, payload in (("jpg", buf.getvalue()), ("txt", f"a {names[i % 4]} square {i}".encode())):
                    info = tarfile.TarInfo(f"{i:05d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                i += 1
    return str(root / f"shard-{{000..{len(sizes) - 1:03d}}}.tar")


def run_without_ldm_lab(code: str, *args) -> None:
    """Run ``code`` (argv: ``args``) in a fresh offline Python that must never import ldm_lab."""
    import subprocess
    import sys

    code += "\nimport sys as _s\nassert not any(m.startswith('ldm_lab') for m in _s.modules), 'ldm_lab was imported'\n"
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]


def in_training_sample(run: Path, step: int):
    """(seed, uint8 RGB array as int) of the first validation image a run wrote at ``step``."""
    import json

    import numpy as np
    from PIL import Image

    d = run / "samples" / f"step-{step:06d}"
    seed = json.loads((d / "samples.jsonl").read_text().splitlines()[0])["seed"]
    return seed, np.asarray(Image.open(d / "00.png").convert("RGB")).astype(int)


def tiny_family_overrides(parts: dict[str, Path], root: Path, prompt: str) -> list[str]:
    """Overrides that turn a shapes family recipe into a 6-step CPU run on the tiny parts (32 px,
    EMA off, so the saved pipeline holds the weights the last validation sampled with)."""
    return [f"model.autoencoder.pretrained={parts['vae']}",
            "data.shapes.n=64", "data.shapes.resolution=32", "data.resolution=32", f"data.cache_dir={root / 'data'}",
            "train.batch_size=8", "train.max_steps=6", "train.checkpoint_every=6", "validation.every=6",
            "train.ema.enabled=false", f"validation.prompts=[{prompt}]", "validation.steps=3",
            "eval.n=4", "eval.heldout_n=2", "eval.steps=2", "eval.every=0", "logging.tracker=none", "logging.log_every=3",
            f"output.dir={root / 'run'}"]


def tiny_lora_overrides(base: Path, root: Path, prompt: str, sampler: str) -> list[str]:
    """Overrides that turn recipes/shapes/lora.yaml into a 4-step LoRA run (rank 4, attention +
    feed-forward, a validation sample at step 4) on the pipeline ``base``, into ``root/lora``."""
    return [f"model.pipeline={base}", "plugin.train_text_encoder=false", "plugin.rank=4", "plugin.targets=attn_ff",
            "data.shapes.n=32", "data.shapes.resolution=32", f"data.cache_dir={root / 'data'}", "train.batch_size=8",
            "train.max_steps=4", "train.checkpoint_every=4", "train.learning_rate=5e-2", "train.lr_warmup_steps=0",
            "train.lr_scheduler=constant", "validation.every=4", f"validation.prompts=[{prompt}]", "validation.steps=3",
            f"validation.sampler={sampler}", "eval.shapes=false", "logging.tracker=none", f"output.dir={root / 'lora'}"]


def stock_lora_check(code: str, out: Path, ours):
    """Run ``code`` (it saves [base image, image with the LoRA] to argv[1]) without ldm_lab; the
    LoRA changes the image and reproduces ``ours``, the in-training sample. Returns (base, lora)."""
    import numpy as np

    run_without_ldm_lab(code, out)
    base, lora = np.load(out).astype(int)
    assert np.abs(lora - base).max() > 8  # the adapter changes the image
    assert np.abs(lora - ours).max() <= 1  # and is the one trained
    return base, lora


DB_PROMPT = "a large zwx circle at the center on a white background"  # dreambooth_flags' validation prompt


def dreambooth_flags(base: Path, root: Path, sampler: str, extra=()) -> list[str]:
    """`ldm-lab finetune dreambooth` on the pipeline ``base`` (32 px): 4 instance images of a
    green circle in ``root/inst``, identifier zwx, 4 steps, a validation sample (``DB_PROMPT``) at
    step 4 with ``sampler``, the run in ``root/db``."""
    from ldm_lab.data import shapes

    inst = root / "inst"
    inst.mkdir(parents=True)
    for i, pos in enumerate(["center", "left", "top", "right"]):
        shapes.render(shapes.Shape("green", "circle", "large", pos, "white"), 32)[0].save(inst / f"img{i}.png")
    return ["finetune", "dreambooth", "--base", str(base), "--instance-data", str(inst), "--out", str(root / "db"),
            "--instance-prompt", "a {id} circle", "--steps", "4", "--batch-size", "2", "--lr", "1e-3",
            "--identifier", "zwx", "--validation-prompt", DB_PROMPT.replace("zwx", "{id}"), *extra,
            "validation.every=4", "validation.steps=3", f"validation.sampler={sampler}", "train.checkpoint_every=null",
            "logging.tracker=none", f"data.cache_dir={root / 'cache'}", "data.resolution=32"]
