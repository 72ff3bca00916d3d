"""FSDP2 end to end on 2 CPU processes (gloo; trainers/sharding.py installs accelerate's FSDP
plugin there): training with EMA, validation and evaluation sampling, the final save, a resume,
all against the same recipe on 1 process with the same global batch; the artifact in stock
diffusers and through ``ldm-lab export single-file``; an FSDP checkpoint resumed without FSDP
is one sentence."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, in_training_sample, run_without_ldm_lab, tiny_t2i_overrides
from ldm_lab.cli import main as cli_main

RECIPE = REPO / "recipes/shapes/t2i.yaml"
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_TRANSFORMER_CLS_TO_WRAP": "BasicTransformerBlock,ResnetBlock2D",
            "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT", "OMP_NUM_THREADS": "1"}


def _ov(parts, run: Path, data: Path, batch: int, *extra: str) -> list[str]:
    keep = [o for o in tiny_t2i_overrides(parts, run, data)
            if not o.startswith(("train.batch_size", "train.max_steps", "train.checkpoint_every", "validation.every"))]
    return [*keep, f"train.batch_size={batch}", "train.max_steps=4", "train.checkpoint_every=2",
            "validation.every=4", "train.channels_last=false", "train.ema.enabled=true", "train.ema.decay=0.9",
            "train.learning_rate=1e-3", *extra]


def _fsdp(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "ldm_lab.cli",
                           "train", str(RECIPE), *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, **FSDP_ENV}, cwd=REPO)


def _unet(run: Path) -> dict[str, torch.Tensor]:
    return load_file(next((run / "pipeline" / "unet").glob("*.safetensors")))


def _close(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tiny_parts, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    assert cli_main(["train", str(RECIPE), *_ov(tiny_parts, root / "one", root / "data", 8)]) == 0
    r = _fsdp(_ov(tiny_parts, root / "two", root / "data", 4))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "accelerate: FSDP, 2 process(es)" in r.stdout
    return root


@pytest.mark.slow
def test_fsdp_trains_validates_evaluates_and_saves_like_one_process(runs):
    one, two = runs / "one", runs / "two"
    # same global batch, same update: the final (EMA) weights agree to float rounding
    assert _close(_unet(one), _unet(two)) < 1e-5
    ck = two / "checkpoints" / "checkpoint-2"
    assert (ck / "pytorch_model_fsdp_0").is_dir() and (ck / "ema.safetensors").exists()  # sharded weights, whole EMA
    ema_one = load_file(one / "checkpoints" / "checkpoint-2" / "ema.safetensors")
    ema_two = load_file(ck / "ema.safetensors")
    assert _close(ema_one, ema_two) < 1e-5  # the gathered shards are the 1-process average
    # validation and evaluation sampled the gathered weights on the main process
    s1, img1 = in_training_sample(one, 4)
    s2, img2 = in_training_sample(two, 4)
    assert s1 == s2 and np.abs(img1 - img2).max() <= 1
    m1 = json.loads((one / "metrics.json").read_text())["shapes_eval"]
    m2 = json.loads((two / "metrics.json").read_text())["shapes_eval"]
    assert m1["n"] == m2["n"] == 6 and m1["color"] == m2["color"]


@pytest.mark.slow
def test_fsdp_artifact_loads_in_stock_diffusers_and_exports(runs, tmp_path):
    code = """
import sys, numpy as np
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1])
out = pipe("a large red circle at the center on a white background", num_inference_steps=2, output_type="np").images
assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()
"""
    run_without_ldm_lab(code, runs / "two" / "pipeline")
    out = tmp_path / "two.safetensors"
    assert cli_main(["export", "single-file", str(runs / "two"), "--out", str(out)]) == 0
    assert any(k.startswith("model.diffusion_model.") for k in load_file(out))


@pytest.mark.slow
def test_fsdp_resume_continues_exactly(runs, tiny_parts, tmp_path):
    run = tmp_path / "two"
    shutil.copytree(runs / "two", run)
    shutil.rmtree(run / "pipeline")
    r = _fsdp(_ov(tiny_parts, run, runs / "data", 4, "train.resume=latest"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "checkpoint-2" in r.stdout
    assert _close(_unet(runs / "one"), _unet(run)) < 1e-5


@pytest.mark.slow
def test_an_fsdp_checkpoint_resumed_without_fsdp_is_one_sentence(runs, tiny_parts, tmp_path, capsys):
    run = tmp_path / "two"
    shutil.copytree(runs / "two", run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    rc = cli_main(["train", str(RECIPE), *_ov(tiny_parts, run, runs / "data", 8, "train.resume=latest")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(err) == 1 and "holds FSDP-sharded weights; resume it under FSDP" in err[0], err
    assert [str(p) for p, b in before.items() if not p.exists() or p.read_bytes() != b] == []


def test_sharded_and_whole_checkpoints_are_told_apart(tmp_path):
    from ldm_lab.errors import UserError
    from ldm_lab.trainers.checkpoints import check_sharding

    sharded, whole = tmp_path / "sharded", tmp_path / "whole"
    (sharded / "pytorch_model_fsdp_0").mkdir(parents=True)
    whole.mkdir()
    (whole / "model.safetensors").write_bytes(b"")
    check_sharding(sharded, fsdp=True)
    check_sharding(whole, fsdp=False)
    with pytest.raises(UserError, match="holds FSDP-sharded weights; resume it under FSDP"):
        check_sharding(sharded, fsdp=False)
    with pytest.raises(UserError, match="was written without FSDP"):
        check_sharding(whole, fsdp=True)
