"""Frozen weights in the compute dtype under mixed precision (trainers/frozen.py): the frozen
modules and the frozen parts of trained ones are held in bf16 during training, the trained
weights stay fp32, sampling and the artifact see the weights back in fp32, and
``train.frozen_dtype=fp32`` keeps everything as loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import tiny_t2i_overrides
from ldm_lab.recipe import load_recipe
from ldm_lab.trainers.frozen import FrozenWeights
from ldm_lab.trainers.loop import train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one process-wide state, and its mixed precision cannot change once set: these
    runs use bf16 in a process where other tests already trained without it (and leave it unset)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_frozen_weights_cast_and_come_back_exactly():
    torch.manual_seed(0)
    frozen = nn.BatchNorm1d(4)  # a buffer (running_mean) beside frozen parameters
    frozen.running_mean.normal_()
    frozen.requires_grad_(False)
    trained = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    trained[0].weight.requires_grad_(False)  # a frozen base weight inside a trained module
    fw = FrozenWeights([frozen, trained], torch.bfloat16)
    fw.cast(torch.bfloat16)
    assert frozen.weight.dtype == frozen.running_mean.dtype == torch.bfloat16
    assert trained[0].weight.dtype == torch.bfloat16 and trained[0].bias.dtype == torch.float32
    assert trained[1].running_mean.dtype == torch.float32  # a trained module's buffers are left alone
    rounded = frozen.running_mean.clone()
    with fw.as_loaded():
        assert frozen.running_mean.dtype == torch.float32 and trained[0].weight.dtype == torch.float32
        assert torch.equal(frozen.running_mean, rounded.float())  # fp32 holds every bf16 value
    assert frozen.running_mean.dtype == torch.bfloat16 and torch.equal(frozen.running_mean, rounded)
    assert fw.nbytes == sum(t.nbytes for t in (frozen.weight, frozen.bias, frozen.running_mean, frozen.running_var,
                                                 trained[0].weight))


def _t2i(parts, tmp_path: Path, *extra: str):
    ov = [o for o in tiny_t2i_overrides(parts, tmp_path / "run", tmp_path / "data") if not o.startswith("train.max_steps")]
    recipe = load_recipe(REPO / "recipes/shapes/t2i.yaml", [*ov, "train.max_steps=3", "train.checkpoint_every=null",
                                                           "validation.every=3", "eval.shapes=false",
                                                           "train.mixed_precision=bf16", *extra])
    state: dict = {}
    train(recipe, state=state)
    return state


def test_full_finetune_holds_the_frozen_encoders_in_bf16_and_saves_them_in_fp32(tiny_parts, tmp_path):
    state = _t2i(tiny_parts, tmp_path)
    plugin, frozen = state["plugin"], state["frozen"]
    assert {p.dtype for p in plugin.unwrap(plugin.unet).parameters()} == {torch.float32}  # trained: fp32
    assert {p.dtype for p in plugin.vae.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in plugin.text_encoder.model.parameters()} == {torch.bfloat16}
    held = sum(p.numel() for m in (plugin.vae, plugin.text_encoder.model) for p in m.parameters())
    assert frozen.nbytes >= 2 * held  # two bytes per frozen parameter
    # the artifact: fp32 files whose values are the loaded weights rounded to bf16, the ones trained with
    pipe = tmp_path / "run" / "pipeline"
    for saved, loaded in ((pipe / "vae" / "diffusion_pytorch_model.safetensors",
                           tiny_parts["vae"] / "diffusion_pytorch_model.safetensors"),
                          (pipe / "text_encoder" / "model.safetensors",
                           tiny_parts["clip"] / "text_encoder" / "model.safetensors")):
        s, o = load_file(saved), load_file(loaded)
        floats = [k for k in o if o[k].is_floating_point()]
        assert floats and {s[k].dtype for k in floats} == {torch.float32}, saved
        assert all(torch.equal(s[k], o[k].to(torch.bfloat16).float()) for k in floats)
        assert any(not torch.equal(s[k], o[k]) for k in floats)  # it was rounded


def test_frozen_dtype_fp32_keeps_them_as_loaded(tiny_parts, tmp_path):
    state = _t2i(tiny_parts, tmp_path, "train.frozen_dtype=fp32")
    plugin = state["plugin"]
    assert {p.dtype for p in plugin.vae.parameters()} | {p.dtype for p in plugin.text_encoder.model.parameters()} == {
        torch.float32}
    assert state["frozen"].nbytes == 0


def test_lora_holds_its_base_in_bf16_and_trains_the_adapters_in_fp32(tiny_pipeline, tmp_path, capsys):
    from ldm_lab.cli import main as cli_main
    from ldm_lab.data import shapes

    shapes.generate(tmp_path / "data", 16, seed=3, world=shapes.World(resolution=32))
    flags = ["finetune", "lora", "--base", str(tiny_pipeline), "--data", str(tmp_path / "data"), "--out",
             str(tmp_path / "run"), "--rank", "4", "--steps", "3", "--batch-size", "4", "--train-text-encoder",
             "--validation-prompt", "a red circle", "--print-recipe", "validation.every=3", "validation.steps=2",
             "validation.sampler=ddim", "logging.tracker=none", f"data.cache_dir={tmp_path / 'cache'}"]
    assert cli_main(flags) == 0
    (tmp_path / "r.yaml").write_text(capsys.readouterr().out)
    state: dict = {}
    train(load_recipe(tmp_path / "r.yaml", ["train.mixed_precision=bf16", "train.ema.enabled=true"]), state=state)
    plugin = state["plugin"]
    for module in (plugin.unwrap(plugin.unet), plugin.unwrap(plugin.te_model)):
        dtypes = {n: p.dtype for n, p in module.named_parameters()}
        assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
        assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    assert {p.dtype for p in plugin.vae.parameters()} == {torch.bfloat16}
    written = load_file(tmp_path / "run" / "pytorch_lora_weights.safetensors")
    assert written and {v.dtype for v in written.values()} == {torch.float32}
    assert (tmp_path / "run" / "samples").is_dir()  # validation sampled with the base back in fp32
