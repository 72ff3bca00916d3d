"""The LoRA plugin end to end on a tiny base pipeline: training through the CLI, the artifact in
stock diffusers, format conversion, gradient clipping, resume, and CLI == recipe form."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ldm_lab.cli import main as cli_main
from ldm_lab.lora_io import read_lora, read_metadata
from ldm_lab.recipe import dump_recipe, load_recipe, pipeline_defaults

PROMPT = "a large red circle at the center on a white background"


def _flags(base: Path, data: Path, out: Path, cache: Path, steps: int = 6, extra: tuple = ()) -> list[str]:
    """CLI flags (then ``extra`` flags), then dotted overrides last, as argparse wants them."""
    return ["finetune", "lora", "--base", str(base), "--data", str(data), "--out", str(out), "--rank", "4",
            "--alpha", "2", "--targets", "attn_ff", "--steps", str(steps), "--batch-size", "4", "--lr", "1e-2",
            "--validation-prompt", PROMPT, *extra, "train.checkpoint_every=3", "validation.every=3", "validation.steps=3",
            "validation.sampler=ddim", "train.lr_warmup_steps=0", "logging.tracker=none", "logging.log_every=1", f"data.cache_dir={cache}"]


@pytest.fixture(scope="module")
def lora_env(tiny_pipeline, tmp_path_factory):
    from ldm_lab.data import shapes

    root = tmp_path_factory.mktemp("lora")
    shapes.generate(root / "data", 24, seed=3, world=shapes.World(resolution=32))
    assert cli_main([*_flags(tiny_pipeline, root / "data", root / "run", root / "cache"),
                     f"output.export_to={root / 'exported'}"]) == 0
    return {"base": tiny_pipeline, "data": root / "data", "run": root / "run", "root": root}


def test_run_writes_diffusers_lora_with_metadata(lora_env):
    run = lora_env["run"]
    f = run / "pytorch_lora_weights.safetensors"
    assert f.exists() and (run / "recipe.yaml").exists() and (run / "loss.png").exists()
    meta = read_metadata(f)
    unet_cfg = meta["adapters"]["unet"]
    assert unet_cfg["r"] == 4 and unet_cfg["lora_alpha"] == 2
    assert set(unet_cfg["target_modules"]) == {"to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"}
    ours = meta["ldm_lab"]
    assert ours["base_model"] == str(lora_env["base"]) and ours["rank"] == 4 and ours["alpha"] == 2
    # only adapters were trained, and they moved away from their zero-initialised B
    assert 0 < ours["trainable_parameters"] < 0.2 * ours["unet_parameters"]
    w = load_file(f)
    assert all("lora" in k for k in w)
    assert any(k.endswith("lora.up.weight") and v.abs().max() > 0 for k, v in w.items())
    # output.export_to: the same file (weights and metadata) in the export dir
    assert (lora_env["root"] / "exported" / f.name).read_bytes() == f.read_bytes()


def _stock_samples(base: Path, loras: list, out: Path) -> list[np.ndarray]:
    """Stock diffusers in a fresh process (no ldm_lab import): one DDIM sample of PROMPT (seed 0)
    from ``base`` with each entry of ``loras`` (a run dir, or None for the bare base), 0-255."""
    code = f"""
import sys, numpy as np, torch
from diffusers import StableDiffusionPipeline, DDIMScheduler
for i, lora in enumerate({[str(x) if x else None for x in loras]!r}):
    pipe = StableDiffusionPipeline.from_pretrained({str(base)!r}, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, steps_offset=1)
    if lora:
        pipe.load_lora_weights(lora)
    im = pipe({PROMPT!r}, negative_prompt="", num_inference_steps=3, guidance_scale=5.0,
              generator=[torch.Generator().manual_seed(0)], output_type="np").images[0]
    np.save({str(out)!r} + f"/stock-{{i}}.npy", im)
assert not any(m.startswith("ldm_lab") for m in sys.modules)
print("ok")
"""
    out.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
    return [np.load(out / f"stock-{i}.npy") * 255 for i in range(len(loras))]


def test_stock_load_lora_weights_reproduces_in_training_samples(lora_env, tmp_path):
    """Stock diffusers, in a fresh process without ldm_lab: base pipeline + load_lora_weights(run)
    gives the image validation sampled from the in-memory adapted model at the last step."""
    run = lora_env["run"]
    stock, base = _stock_samples(lora_env["base"], [run, None], tmp_path)
    trained = np.asarray(Image.open(run / "samples" / "step-000006" / "00.png"), dtype=np.float64)
    assert np.abs(stock - trained).max() <= 2.0  # PNG rounding
    assert np.abs(base - trained).max() > 10.0  # and the adapter changes the image


def test_kohya_round_trip_is_exact_and_keeps_alpha(lora_env, tmp_path):
    src = lora_env["run"] / "pytorch_lora_weights.safetensors"
    assert cli_main(["export", "lora", str(src), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")]) == 0
    k = load_file(tmp_path / "k.safetensors")
    assert all(key.startswith("lora_unet_") for key in k)
    alphas = [v for key, v in k.items() if key.endswith(".alpha")]
    assert alphas and all(float(a) == 2.0 for a in alphas)  # the trained alpha, not the rank
    assert any(key.endswith(".lora_down.weight") for key in k)
    # back to diffusers through the CLI, then compare every tensor with the original
    assert cli_main(["export", "lora", str(tmp_path / "k.safetensors"), "--format", "diffusers",
                     "--out", str(tmp_path / "back.safetensors")]) == 0
    a, b = read_lora(src), read_lora(tmp_path / "back.safetensors")
    assert set(a.tensors) == set(b.tensors) and len(a.tensors) > 0
    assert all(torch.equal(a.tensors[x], b.tensors[x]) for x in a.tensors)
    assert a.alphas == b.alphas and set(a.alphas.values()) == {2.0}


def test_kohya_file_loads_in_stock_diffusers_with_the_same_effect(lora_env, tmp_path):
    from diffusers import StableDiffusionPipeline

    src = lora_env["run"] / "pytorch_lora_weights.safetensors"
    assert cli_main(["export", "lora", str(src), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")]) == 0
    outs = []
    for d, name in ((lora_env["run"], "pytorch_lora_weights.safetensors"), (tmp_path, "k.safetensors")):
        pipe = StableDiffusionPipeline.from_pretrained(lora_env["base"], safety_checker=None)
        pipe.load_lora_weights(str(d), weight_name=name)
        outs.append(pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(1),
                         output_type="np").images[0])
    assert np.abs(outs[0] - outs[1]).max() < 1e-4


def test_peft_export_loads_with_peft(lora_env, tmp_path):
    from diffusers import UNet2DConditionModel
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    src = lora_env["run"]
    assert cli_main(["export", "lora", str(src), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    unet = UNet2DConditionModel.from_pretrained(lora_env["base"], subfolder="unet")
    pm = PeftModel.from_pretrained(unet, tmp_path / "peft" / "unet")
    assert pm.peft_config["default"].lora_alpha == 2 and pm.peft_config["default"].r == 4
    got = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(pm).items()}
    want = read_lora(src).component("unet")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_sample_with_lora_scales(lora_env, tmp_path):
    base = lora_env["base"]
    lora = lora_env["run"] / "pytorch_lora_weights.safetensors"
    runs = {}
    for name, extra in (("base", []), ("zero", ["--lora", f"{lora}:0"]), ("one", ["--lora", f"{lora}:1.0"])):
        assert cli_main(["sample", str(base), "--prompt", PROMPT, "--steps", "2", "--seed", "4",
                         "--out", str(tmp_path / name), *extra]) == 0
        runs[name] = np.asarray(Image.open(tmp_path / name / "0000.png"), dtype=np.float64)
    assert np.abs(runs["base"] - runs["zero"]).max() <= 1.0
    assert np.abs(runs["base"] - runs["one"]).max() > 10.0


def test_merge_equals_lora_at_sampling(lora_env, tmp_path):
    lora = lora_env["run"] / "pytorch_lora_weights.safetensors"
    assert cli_main(["export", "merge", "--base", str(lora_env["base"]), "--lora", str(lora), "--out",
                     str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model_index.json").exists()
    for name, src, extra in (("fused", tmp_path / "merged", []), ("lora", lora_env["base"], ["--lora", str(lora)])):
        assert cli_main(["sample", str(src), "--prompt", PROMPT, "--steps", "2", "--out", str(tmp_path / name),
                         *extra]) == 0
    a = np.asarray(Image.open(tmp_path / "fused" / "0000.png"), dtype=np.float64)
    b = np.asarray(Image.open(tmp_path / "lora" / "0000.png"), dtype=np.float64)
    assert np.abs(a - b).max() <= 2.0


def test_resume_gives_the_weights_of_an_uninterrupted_run(lora_env, tmp_path):
    """Resume from checkpoint-3 of the finished 6-step run; the adapters at step 6 must match."""
    run = tmp_path / "run"
    shutil.copytree(lora_env["run"], run)
    ck = run / "checkpoints" / "checkpoint-3"
    assert (ck / "lora_adapters.safetensors").exists()
    assert not list(ck.glob("model*.safetensors")) and not list(ck.glob("pytorch_model*"))  # adapters only
    first = load_file(run / "pytorch_lora_weights.safetensors")
    args = _flags(lora_env["base"], lora_env["data"], run, lora_env["root"] / "cache", extra=("--resume", str(ck)))
    assert cli_main(args) == 0
    again = load_file(run / "pytorch_lora_weights.safetensors")
    assert set(first) == set(again)
    assert all(torch.equal(first[k], again[k]) for k in first)  # bit for bit: same batches, noise, dropout
    hist = [json.loads(x)["step"] for x in (run / "history.jsonl").read_text().splitlines()]
    assert hist == [1, 2, 3, 4, 5, 6]


def test_resume_with_adapters_the_checkpoint_lacks_is_refused(lora_env, tmp_path, capsys):
    """Text-encoder adapters switched on at resume (the change allowed on purpose): the checkpoint
    holds none, so they would train on from their initial values; one sentence, nothing lost."""
    run = tmp_path / "run"
    shutil.copytree(lora_env["run"], run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}  # the lock names its holder
    ck = run / "checkpoints" / "checkpoint-3"
    args = _flags(lora_env["base"], lora_env["data"], run, lora_env["root"] / "cache",
                  extra=("--resume", str(ck), "--train-text-encoder"))
    capsys.readouterr()
    assert cli_main([*args, "train.resume_allow_changes=[plugin.train_text_encoder]"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "is incompatible with the models this recipe builds" in err[0], err
    assert "holds no text_encoder adapter weights" in err[0], err
    assert [str(p) for p, b in before.items() if p.read_bytes() != b] == []


def test_ema_averages_the_text_encoder_adapters_with_the_unet(lora_env, tmp_path, capsys):
    """With text-encoder adapters, EMA averages them too: the artifact's text-encoder tensors are
    the EMA's (its last tensors), none of them the raw trained adapters left in the model."""
    from ldm_lab.trainers.loop import train
    from ldm_lab.trainers.lora import _adapter_state

    flags = _flags(lora_env["base"], lora_env["data"], tmp_path / "run", lora_env["root"] / "cache", steps=4,
                   extra=("--train-text-encoder", "--print-recipe"))
    assert cli_main(flags) == 0
    (tmp_path / "r.yaml").write_text(capsys.readouterr().out)
    recipe = load_recipe(tmp_path / "r.yaml", ["train.ema.enabled=true", "train.ema.decay=0.9", "validation.every=null",
                                               "train.checkpoint_every=null"])
    state: dict = {}
    train(recipe, state=state)
    plugin, ema = state["plugin"], state["ema"]
    raw = list(_adapter_state(plugin.unwrap(plugin.te_model)).values())
    written = [v for k, v in load_file(tmp_path / "run" / "pytorch_lora_weights.safetensors").items()
               if k.startswith("text_encoder.")]
    assert len(written) == len(raw) > 0
    averaged = [t.detach().cpu() for t in ema.shadow_params[-len(raw):]]

    def matches(xs, ys):
        return sum(any(x.shape == y.shape and torch.equal(x, y) for y in ys) for x in xs)

    assert matches(written, averaged) == len(written)
    assert matches(written, raw) == 0


def test_clipping_applies_to_exactly_the_adapters(lora_env, tmp_path):
    from accelerate import Accelerator

    from ldm_lab.trainers.engine import clip_gradients, make_optimizer
    from ldm_lab.trainers.lora import LoRATrainer

    recipe = pipeline_defaults(load_recipe(lora_env["run"] / "recipe.yaml", [f"output.dir={tmp_path}", "train.resume=null"]))
    acc = Accelerator(cpu=True)
    plugin = LoRATrainer(recipe, acc, tmp_path)
    plugin.setup()
    opt = make_optimizer(recipe, plugin.param_groups())
    names = {id(p): n for n, p in plugin.unet.named_parameters()}
    trained = [p for g in opt.param_groups for p in g["params"]]
    assert trained and all("lora_" in names[id(p)] for p in trained)
    assert sum(p.requires_grad for p in plugin.unet.parameters()) == len(trained)
    batch = next(iter(plugin.train_dataloader()))
    loss, _ = plugin.loss(batch)
    loss.backward()
    assert all(p.grad is None for n, p in plugin.unet.named_parameters() if "lora_" not in n)
    max_norm = 1e-4
    before = clip_gradients(acc, opt, max_norm)
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trained])).item()
    assert before > 10 * max_norm and after == pytest.approx(max_norm, rel=1e-3)


def test_cli_flags_and_recipe_form_resolve_the_same(lora_env, tmp_path, capsys):
    flags = _flags(lora_env["base"], lora_env["data"], tmp_path / "o", tmp_path / "c", extra=("--print-recipe",))
    assert cli_main(flags) == 0
    from_cli = capsys.readouterr().out
    recipe = tmp_path / "lora.yaml"
    recipe.write_text(from_cli)
    assert cli_main(["recipe", "show", str(recipe)]) == 0
    assert capsys.readouterr().out == from_cli
    r = load_recipe(recipe)
    assert r.trainer == "lora" and r.plugin["rank"] == 4 and r.plugin["targets"] == "attn_ff"
    assert r.noise.prediction_type == "v_prediction"  # from the base pipeline's scheduler
    assert dump_recipe(pipeline_defaults(r)) == from_cli


def test_bad_lora_options_are_one_sentence(lora_env, tmp_path, capsys):
    flags = _flags(lora_env["base"], lora_env["data"], tmp_path / "o", tmp_path / "c", extra=("--print-recipe",))
    assert cli_main([*flags, "plugin.rnak=4"]) == 2
    err = capsys.readouterr().err
    assert "plugin.rnak" in err and "plugin.rank" in err and "Traceback" not in err
    flags = _flags(lora_env["base"], lora_env["data"], tmp_path / "o", tmp_path / "c",
                   extra=("--targets", "nonexistent_module"))
    assert cli_main(flags) == 2
    err = capsys.readouterr().err
    assert "nonexistent_module" in err and "Traceback" not in err


def test_text_encoder_lora_trains_saves_and_loads_in_stock_diffusers(lora_env, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    run = tmp_path / "te-run"
    flags = _flags(lora_env["base"], lora_env["data"], run, lora_env["root"] / "cache", steps=4,
                   extra=("--train-text-encoder", "--text-encoder-lr", "5e-3"))
    assert cli_main([*flags, "data.caption_dropout=0.5", "validation.every=4"]) == 0
    w = read_lora(run / "pytorch_lora_weights.safetensors")
    te_keys = [k for k in w.tensors if k.startswith("text_encoder.")]
    assert te_keys and any(k.endswith("lora_B.weight") and w.tensors[k].abs().max() > 0 for k in te_keys)
    meta = read_metadata(run / "pytorch_lora_weights.safetensors")
    assert meta["adapters"]["text_encoder"]["r"] == 4 and meta["ldm_lab"]["text_encoder"] is True
    pipe = StableDiffusionPipeline.from_pretrained(lora_env["base"], safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, steps_offset=1)
    pipe.load_lora_weights(str(run))
    assert "default_0" in pipe.text_encoder.peft_config  # the text-encoder adapter was loaded
    im = pipe(PROMPT, negative_prompt="", num_inference_steps=3, guidance_scale=5.0,
              generator=[torch.Generator().manual_seed(0)], output_type="np").images[0] * 255
    trained = np.asarray(Image.open(run / "samples" / "step-000004" / "00.png"), dtype=np.float64)
    assert np.abs(im - trained).max() <= 2.0


def test_finetune_lora_on_the_shipped_shapes_base(tmp_path):
    """The CLI on the real shipped base (data/pretrained/shapes-t2i): a few steps on hearts, and
    the file loads into a stock pipeline of that base."""
    from diffusers import StableDiffusionPipeline

    from conftest import REPO
    from ldm_lab.data import shapes

    base = REPO / "data" / "pretrained" / "shapes-t2i"
    shapes.generate(tmp_path / "hearts", 16, seed=1, world=shapes.World(shapes=("heart",), holdout=()))
    args = ["finetune", "lora", "--base", str(base), "--data", str(tmp_path / "hearts"), "--out", str(tmp_path / "run"),
            "--steps", "4", "--batch-size", "4", "--train-text-encoder", "logging.tracker=none",
            f"data.cache_dir={tmp_path / 'cache'}", "train.checkpoint_every=null", "validation.every=null"]
    assert cli_main(args) == 0
    recipe = load_recipe(tmp_path / "run" / "recipe.yaml")
    assert recipe.data.resolution == 64 and recipe.noise.prediction_type == "epsilon"  # from the base
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    pipe.load_lora_weights(str(tmp_path / "run"))
    out = pipe("a large red heart at the center on a white background", num_inference_steps=2,
               output_type="np").images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_dora_and_locon_targets_train_and_load_in_stock_diffusers(lora_env, tmp_path):
    from diffusers import StableDiffusionPipeline

    run = tmp_path / "dora"
    flags = _flags(lora_env["base"], lora_env["data"], run, lora_env["root"] / "cache", steps=2,
                   extra=("--dora", "--targets", "attn_ff_conv"))
    assert cli_main([*flags, "validation.every=null", "train.checkpoint_every=null"]) == 0
    w = read_lora(run / "pytorch_lora_weights.safetensors")
    assert any("lora_magnitude_vector" in k for k in w.tensors)
    assert any(".resnets." in k and k.endswith("conv1.lora_A.weight") for k in w.tensors)  # LoCon-style convs
    pipe = StableDiffusionPipeline.from_pretrained(lora_env["base"], safety_checker=None)
    pipe.load_lora_weights(str(run))
    assert pipe.unet.peft_config["default_0"].use_dora
    # DoRA has no kohya layout A1111/ComfyUI read the same way: a clear refusal, exit 2
    assert cli_main(["export", "lora", str(run), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")]) == 2


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_artifacts_are_loras_of_the_original_base(lora_env, tmp_path, init):
    """PiSSA / OLoRA train on W - s B0 A0; the written file must still reproduce the trained model
    when stock diffusers loads it onto the untouched base (as a rank-2r LoRA)."""
    run = tmp_path / "run"
    assert cli_main(_flags(lora_env["base"], lora_env["data"], run, lora_env["root"] / "cache",
                           extra=("--init", init))) == 0
    meta = read_metadata(run / "pytorch_lora_weights.safetensors")["adapters"]["unet"]
    assert meta["r"] == 8 and meta["lora_alpha"] == 4  # rank 4, alpha 2, doubled
    stock, = _stock_samples(lora_env["base"], [run], tmp_path / "stock")
    trained = np.asarray(Image.open(run / "samples" / "step-000006" / "00.png"), dtype=np.float64)
    assert np.abs(stock - trained).max() <= 2.0


def test_export_lora_never_overwrites(lora_env, tmp_path, capsys):
    src = lora_env["run"] / "pytorch_lora_weights.safetensors"
    out = tmp_path / "k.safetensors"
    out.write_bytes(b"mine")
    assert cli_main(["export", "lora", str(src), "--format", "kohya", "--out", str(out)]) == 2
    assert "exists; choose a new name" in capsys.readouterr().err and out.read_bytes() == b"mine"
    assert cli_main(["export", "lora", str(src), "--format", "kohya", "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    blocker = tmp_path / "a-file"  # a path under a file cannot be written, even by root
    blocker.write_text("x")
    rc = cli_main(["export", "lora", str(src), "--format", "kohya", "--out", str(blocker / "k.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot write" in err and "Traceback" not in err


def test_artifact_dirs_get_model_cards_that_huggingface_hub_reads(lora_env, tmp_path):
    """README.md beside the LoRA file: huggingface_hub's ModelCard parses it, with the base model,
    the adapter type and rank, how to load it, the last sample grid and the recipe."""
    from huggingface_hub import ModelCard

    run = lora_env["run"]
    card = ModelCard.load(run / "README.md")
    assert card.data.base_model == str(lora_env["base"]) and card.data.library_name == "diffusers"
    assert {"ldm-lab", "lora"} <= set(card.data.tags)
    assert "| rank | 4 |" in card.text and "| alpha | 2.0 |" in card.text and "load_lora_weights" in card.text
    assert "![samples](samples.png)" in card.text and (run / "samples.png").read_bytes() == \
        sorted((run / "samples").glob("step-*.png"))[-1].read_bytes()
    assert "trainer: lora" in card.text  # the recipe
    # ldm-lab report rewrites them from the run's files
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "README.md").unlink()
    assert cli_main(["report", str(copy)]) == 0
    assert ModelCard.load(copy / "README.md").data.base_model == str(lora_env["base"])


def test_push_to_hub_without_network_is_one_sentence_and_keeps_the_run(lora_env, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    run = tmp_path / "run"
    flags = _flags(lora_env["base"], lora_env["data"], run, lora_env["root"] / "cache", steps=2)
    capsys.readouterr()
    assert cli_main([*flags, "validation.every=null", "train.checkpoint_every=null", "output.push_to_hub=me/my-lora"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "could not push" in err[0] and "huggingface-cli upload me/my-lora" in err[0], err
    assert (run / "pytorch_lora_weights.safetensors").is_file() and (run / "README.md").is_file()
