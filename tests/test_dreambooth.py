"""The DreamBooth plugin: instance captions, the class-image manifest (reuse, extension,
invalidation, user-supplied sets), the prior-preservation loss, both modes end to end through
the CLI with their artifacts loaded by stock diffusers, and both modes on the shipped shapes base."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image

from ldm_lab.cli import main as cli_main
from ldm_lab.recipe import load_recipe, pipeline_defaults
from ldm_lab.recipe.plugins import DreamBoothOptions
from ldm_lab.trainers.dreambooth import DreamBoothTrainer, ensure_class_images, instance_rows

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = ROOT / "src" / "ldm_lab" / "builtin" / "dreambooth.yaml"
VAL = "a large {id} circle at the center on a white background"


def _instances(root: Path, n: int = 4) -> Path:
    """``n`` instance images (a green circle) with sidecar captions on all but the last."""
    from ldm_lab.data import shapes

    root.mkdir(parents=True, exist_ok=True)
    for i, pos in enumerate(["center", "left", "top", "right"][:n]):
        s = shapes.Shape("green", "circle", "large", pos, "white")
        img, _ = shapes.render(s, 32)
        img.save(root / f"img{i}.png")
        if i < n - 1:
            (root / f"img{i}.txt").write_text(f"a large {{id}} circle at the {pos} on a white background\n")
    return root


def _flags(base, inst, out, cache, extra=(), steps=4):
    return ["finetune", "dreambooth", "--base", str(base), "--instance-data", str(inst), "--out", str(out),
            "--instance-prompt", "a {id} circle", "--steps", str(steps), "--batch-size", "2", "--lr", "1e-3",
            "--validation-prompt", VAL, *extra, f"validation.every={steps}", "validation.steps=3",
            "validation.sampler=ddim", "train.checkpoint_every=null", "logging.tracker=none", "logging.log_every=1",
            f"data.cache_dir={cache}", "data.resolution=32"]


def _trainer(base, inst, out, cache, flags=(), overrides=()):
    """A DreamBooth trainer with its models built (not set up), for direct checks."""
    from ldm_lab.cli_args import build_parser
    from ldm_lab.commands.finetune import finetune_overrides

    args = build_parser().parse_args(_flags(base, inst, out, cache, extra=flags) + list(overrides))
    recipe = pipeline_defaults(load_recipe(BUILTIN, finetune_overrides(args)))
    t = DreamBoothTrainer(recipe, Accelerator(cpu=True), out)
    t.opts = DreamBoothOptions.model_validate(recipe.plugin)
    t.build_models()
    return t


def test_instance_captions_from_sidecars_metadata_or_prompt(tmp_path):
    rows = instance_rows(_instances(tmp_path / "a"))
    assert [r["caption"] for r in rows][:3] == [f"a large {{id}} circle at the {p} on a white background"
                                                for p in ("center", "left", "top")]
    assert rows[3]["caption"] is None  # -> the instance prompt
    b = tmp_path / "b"
    b.mkdir()
    Image.new("RGB", (8, 8)).save(b / "x.png")
    (b / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "{id} thing", "shape": "s"}) + "\n")
    assert instance_rows(b) == [{"file_name": "x.png", "text": "{id} thing", "shape": "s", "image": str(b / "x.png"),
                                 "caption": "{id} thing"}]


def test_class_images_manifest_reuse_extend_invalidate(tiny_pipeline, tmp_path):
    t = _trainer(tiny_pipeline, _instances(tmp_path / "inst"), tmp_path / "run", tmp_path / "cache")
    cdir = tmp_path / "class"
    o = DreamBoothOptions(instance_prompt="a {id} circle", class_prompt=["a red circle", "a blue square"],
                          prior_preservation=True, num_class_images=3, class_steps=2, class_batch_size=2)
    rows = ensure_class_images(t, o, cdir, "base-A")
    m = json.loads((cdir / "manifest.json").read_text())
    assert m["count"] == 3 and m["base"] == "base-A" and m["prompts"] == ["a red circle", "a blue square"]
    assert [c for _, c in rows] == ["a red circle", "a blue square", "a red circle"]
    assert (cdir / "00001.txt").read_text().strip() == "a blue square"
    first = {p: Path(p).read_bytes() for p, _ in rows}
    stamp = {p: Path(p).stat().st_mtime_ns for p, _ in rows}

    # same manifest: reused, nothing rewritten
    assert ensure_class_images(t, o, cdir, "base-A") == rows
    assert {p: Path(p).stat().st_mtime_ns for p, _ in rows} == stamp
    # more images asked for: the first three stay, one is added, and it equals what a fresh
    # generation of four (in another batching) makes for index 3
    o4 = o.model_copy(update={"num_class_images": 4})
    rows4 = ensure_class_images(t, o4, cdir, "base-A")
    assert len(rows4) == 4 and {p: Path(p).stat().st_mtime_ns for p, _ in rows4[:3]} == stamp
    fresh = ensure_class_images(t, o4.model_copy(update={"class_batch_size": 3}), tmp_path / "fresh", "base-A")
    assert [Path(p).read_bytes() for p, _ in fresh] == [Path(p).read_bytes() for p, _ in rows4]
    # a changed prompt regenerates; so does a changed base
    o_new = o.model_copy(update={"class_prompt": "a green triangle"})
    rows_new = ensure_class_images(t, o_new, cdir, "base-A")
    assert json.loads((cdir / "manifest.json").read_text())["prompts"] == ["a green triangle"]
    assert not (cdir / "00003.png").exists()  # the old set is gone, not mixed in
    assert any(Path(p).read_bytes() != first[p] for p, _ in rows_new)
    ensure_class_images(t, o_new, cdir, "base-B")
    assert json.loads((cdir / "manifest.json").read_text())["base"] == "base-B"
    # and a changed base *model* (same name, other weights) regenerates too
    before = json.loads((cdir / "manifest.json").read_text())["base_digest"]
    with torch.no_grad():
        next(t.unet.parameters()).add_(0.1)
    ensure_class_images(t, o_new, cdir, "base-B")
    assert json.loads((cdir / "manifest.json").read_text())["base_digest"] != before

    # a dir of the user's own class images (no manifest) is used as is and never touched
    own = tmp_path / "own"
    own.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (i * 100, 0, 0)).save(own / f"mine{i}.jpg")
    got = ensure_class_images(t, o, own, "base-A")
    assert [Path(p).name for p, _ in got] == ["mine0.jpg", "mine1.jpg"] and not (own / "manifest.json").exists()


def test_prior_loss_weight_enters_as_specified(tiny_pipeline, tmp_path):
    """loss = mean instance loss + λ · mean prior loss, with the instance rows first in the batch."""
    from ldm_lab.diffusion import diffusion_loss

    cache = tmp_path / "cache"
    t = _trainer(tiny_pipeline, _instances(tmp_path / "inst"), tmp_path / "run", cache,
                 ["--prior-preservation", "--class-prompt", "a red circle", "--num-class-images", "3", "--lora"],
                 [f"plugin.class_dir={tmp_path / 'class'}", "plugin.class_steps=2"])
    t.setup()
    batch = next(iter(t.train_dataloader()))
    assert batch["prior"].tolist() == [False, False, True, True]
    out = {}
    for lam in (0.0, 1.0, 2.5):
        t.opts.prior_loss_weight = lam
        t.rng.generator.manual_seed(7)
        loss, logs = t.loss(batch)
        out[lam] = (loss.item(), logs)
    t.rng.generator.manual_seed(7)  # the same draws, per sample
    z, cond = t.latents_and_condition(batch)
    d = t.objective.draw(z, t.rng)
    per = diffusion_loss(t.unet(d.x_t, d.t, encoder_hidden_states=cond.states).sample, d.target, d.weight,
                         reduction="none")
    inst, prior = per[:2].mean().item(), per[2:].mean().item()
    for lam, (loss, logs) in out.items():
        assert loss == pytest.approx(inst + lam * prior, rel=1e-5)
        assert logs["instance_loss"] == pytest.approx(inst, rel=1e-5) and logs["prior_loss"] == pytest.approx(prior, rel=1e-5)
    assert prior > 0 and out[2.5][0] > out[1.0][0] > out[0.0][0]


def _stock_sample(base: Path, prompt: str, out: Path, lora: Path | None = None, pipeline: Path | None = None):
    """Sample with stock diffusers in a fresh process (no ldm_lab import) -> ``out`` (.npy)."""
    code = f"""
import sys, numpy as np, torch
from diffusers import StableDiffusionPipeline, DDIMScheduler
pipe = StableDiffusionPipeline.from_pretrained({str(pipeline or base)!r}, safety_checker=None)
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, steps_offset=1)
if {str(lora) if lora else ''!r}:
    pipe.load_lora_weights({str(lora)!r})
im = pipe({prompt!r}, negative_prompt="", num_inference_steps=3, guidance_scale=5.0,
          generator=[torch.Generator().manual_seed(0)], output_type="np").images[0]
np.save({str(out)!r}, im)
assert not any(m.startswith("ldm_lab") for m in sys.modules)
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
    return np.load(out) * 255


def test_lora_mode_with_prior_loads_with_stock_load_lora_weights(tiny_pipeline, tmp_path):
    inst = _instances(tmp_path / "inst")
    run = tmp_path / "run"
    assert cli_main(_flags(tiny_pipeline, inst, run, tmp_path / "cache", extra=(
        "--lora", "--lr", "1e-2", "--rank", "4", "--targets", "attn_ff", "--prior-preservation", "--class-prompt", "a red circle",
        "--num-class-images", "4", "--class-dir", str(tmp_path / "class"), "--identifier", "auto"),
        steps=4) + ["plugin.class_steps=2"]) == 0
    info = json.loads((run / "dreambooth.json").read_text())
    ident = info["identifier"]
    assert info["class_images"] == 4 and info["instance_images"] == 4 and len(ident) <= 3
    assert info["instance_captions"][3] == f"a {ident} circle"  # no sidecar: the instance prompt
    assert info["instance_captions"][0] == f"a large {ident} circle at the center on a white background"
    assert json.loads((tmp_path / "class" / "manifest.json").read_text())["count"] == 4
    from ldm_lab.lora_io import read_metadata

    meta = read_metadata(run / "pytorch_lora_weights.safetensors")["ldm_lab"]
    assert meta["identifier"] == ident and meta["trainer"] == "dreambooth" and meta["prior_preservation"]
    hist = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    assert all(isinstance(h["prior_loss"], float) and isinstance(h["instance_loss"], float) for h in hist)

    prompt = VAL.replace("{id}", ident)
    stock = _stock_sample(tiny_pipeline, prompt, tmp_path / "stock.npy", lora=run)
    base = _stock_sample(tiny_pipeline, prompt, tmp_path / "base.npy")
    trained = np.asarray(Image.open(run / "samples" / "step-000004" / "00.png"), dtype=np.float64)
    assert np.abs(stock - trained).max() <= 2.0  # PNG rounding
    assert np.abs(base - trained).max() > 10.0


def test_full_mode_with_text_encoder_is_a_stock_pipeline(tiny_pipeline, tmp_path):
    from diffusers import StableDiffusionPipeline

    inst = _instances(tmp_path / "inst")
    run = tmp_path / "run"
    assert cli_main([*_flags(tiny_pipeline, inst, run, tmp_path / "cache", extra=(
        "--train-text-encoder", "--identifier", "zwx")), "output.single_file=fp32"]) == 0
    info = json.loads((run / "dreambooth.json").read_text())
    assert info["identifier"] == "zwx" and info["mode"] == "full" and info["class_images"] == 0
    new = StableDiffusionPipeline.from_pretrained(run / "pipeline", safety_checker=None)
    # output.single_file: the same trained weights in one original-layout file (text encoder included)
    one = StableDiffusionPipeline.from_single_file(str(run / "pipeline.safetensors"), config=str(run / "pipeline"),
                                                   local_files_only=True, safety_checker=None)
    for name in ("unet", "text_encoder"):
        a, b = getattr(one, name).state_dict(), getattr(new, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b), name
    old = StableDiffusionPipeline.from_pretrained(tiny_pipeline, safety_checker=None)
    for name in ("unet", "text_encoder"):  # both trained (all weights, no adapters)
        a, b = getattr(new, name).state_dict(), getattr(old, name).state_dict()
        assert set(a) == set(b)
        changed = sum(not torch.equal(a[k], b[k]) for k in a)
        assert changed > 0.5 * len(a), name
    stock = _stock_sample(tiny_pipeline, VAL.replace("{id}", "zwx"), tmp_path / "stock.npy", pipeline=run / "pipeline")
    trained = np.asarray(Image.open(run / "samples" / "step-000004" / "00.png"), dtype=np.float64)
    assert np.abs(stock - trained).max() <= 2.0


def test_cli_equals_recipe_and_bad_input_exits_2(tiny_pipeline, tmp_path, capsys):
    inst = _instances(tmp_path / "inst")
    flags = _flags(tiny_pipeline, inst, tmp_path / "run", tmp_path / "cache", extra=("--lora",))
    assert cli_main(flags[:2] + ["--print-recipe"] + flags[2:]) == 0
    shown = capsys.readouterr().out
    assert "trainer: dreambooth" in shown and "mode: lora" in shown and "learning_rate: 0.001" in shown
    bad = [
        (["--instance-prompt", "a photo of dog"], "{id}"),
        (["--prior-preservation"], "class_prompt"),
        (["--prior-preservation", "--class-prompt-file", str(tmp_path / "nope.txt")], "does not exist"),
    ]
    for extra, words in bad:
        code = cli_main(_flags(tiny_pipeline, inst, tmp_path / "bad", tmp_path / "cache", extra=extra))
        err = capsys.readouterr().err
        assert code == 2 and words in err and "Traceback" not in err, err
    code = cli_main(_flags(tiny_pipeline, tmp_path / "missing", tmp_path / "bad", tmp_path / "cache"))
    assert code == 2 and "not a directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    code = cli_main(_flags(tiny_pipeline, empty, tmp_path / "bad2", tmp_path / "cache"))
    assert code == 2 and "has no images" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_both_modes_on_the_shipped_shapes_base(mode, tmp_path):
    """The demo recipe, short: the shapes base, the purple-sparkle subject, prior preservation."""
    from ldm_lab.trainers.loop import train

    over = [f"output.dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", f"plugin.mode={mode}",
            f"plugin.class_dir={tmp_path / 'class'}", "plugin.num_class_images=8", "plugin.class_steps=4",
            "train.batch_size=4", "train.max_steps=6", "train.checkpoint_every=3", "validation.every=6",
            "validation.steps=4", "plugin.eval_per_context=1", "eval.steps=4", "logging.tracker=none"]
    if mode == "full":
        over.append("train.learning_rate=1e-4")
    run = train(load_recipe(ROOT / "recipes/shapes/dreambooth.yaml", over))
    m = json.loads((run / "metrics.json").read_text())["dreambooth"]
    for k in ("base", "after"):
        assert m[k]["subject"]["n"] == 27 and m[k]["class"]["n"] == 27
        assert 0 <= m[k]["subject"]["fidelity"] <= 1 and 0 <= m[k]["class"]["subject_leak"] <= 1
    assert m["base"]["class"]["shape"] > 0.7  # the base draws ordinary stars for star prompts
    art = run / ("pytorch_lora_weights.safetensors" if mode == "lora" else "pipeline/model_index.json")
    assert art.exists()


def test_sd15_recipe_trains_with_tiny_substitutes(tiny_parts, tiny_pipeline, tmp_path):
    """recipes/sd15/dreambooth.yaml (full mode, prior preservation) runs as written, with the
    tiny pipeline in place of SD 1.5 and CPU-sized steps."""
    from ldm_lab.trainers.loop import train
    from test_recipes import substitute

    path = ROOT / "recipes/sd15/dreambooth.yaml"
    over = substitute(path, tiny_parts, tiny_pipeline) + [
        f"output.dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", "data.resolution=32",
        f"plugin.class_dir={tmp_path / 'class'}", "plugin.num_class_images=2", "plugin.class_steps=2",
        "train.mixed_precision=no", "train.gradient_checkpointing=false", "train.max_steps=2",
        "validation.every=2", "validation.steps=2", "validation.images_per_prompt=1", "logging.tracker=none"]
    run = train(load_recipe(path, over))
    info = json.loads((run / "dreambooth.json").read_text())
    assert info["class_images"] == 2 and f" {info['identifier']} star" in info["instance_captions"][0]
    assert (run / "pipeline" / "model_index.json").exists()
    assert len(list((run / "samples" / "step-000002").glob("*.png"))) == 3


@pytest.mark.slow
def test_two_processes_split_class_generation_and_match_one(tiny_pipeline, tmp_path):
    """torchrun with 2 CPU ranks: each rank generates every other class image, the run trains to
    the end (no deadlock around generation, the manifest or saving), and the class set is
    byte-identical to the one a single process makes."""
    import os

    inst = _instances(tmp_path / "inst")
    flags = _flags(tiny_pipeline, inst, tmp_path / "run2", tmp_path / "cache2", extra=(
        "--lora", "--prior-preservation", "--class-prompt", "a red circle", "--class-prompt", "a blue square",
        "--num-class-images", "5", "--class-dir", str(tmp_path / "class2")), steps=2) + ["plugin.class_steps=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "ldm_lab.cli",
                        *flags], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run2" / "pytorch_lora_weights.safetensors").exists()
    assert json.loads((tmp_path / "class2" / "manifest.json").read_text())["count"] == 5
    t = _trainer(tiny_pipeline, inst, tmp_path / "run1", tmp_path / "cache1")
    o = DreamBoothOptions(instance_prompt="a {id} circle", class_prompt=["a red circle", "a blue square"],
                          prior_preservation=True, num_class_images=5, class_steps=2)
    one = ensure_class_images(t, o, tmp_path / "class1", str(tiny_pipeline))
    assert [Path(p).read_bytes() for p, _ in one] == \
        [(tmp_path / "class2" / Path(p).name).read_bytes() for p, _ in one]


def test_full_mode_resume_with_prior_is_bit_exact(tiny_pipeline, tmp_path):
    """Full mode with prior preservation and the text encoder trained: resuming from the step-2
    checkpoint of a 4-step run ends with the same UNet and text encoder, bit for bit."""
    import shutil

    from safetensors.torch import load_file

    inst = _instances(tmp_path / "inst")
    run = tmp_path / "run"
    extra = ("--train-text-encoder", "--prior-preservation", "--class-prompt", "a red circle",
             "--num-class-images", "3", "--class-dir", str(tmp_path / "class"))
    flags = _flags(tiny_pipeline, inst, run, tmp_path / "cache", extra=extra) + [
        "train.checkpoint_every=2", "plugin.class_steps=2", "train.checkpoints_total_limit=2"]
    assert cli_main(flags) == 0

    def weights(r):
        return {f"{c}/{k}": v for c in ("unet", "text_encoder")
                for f in sorted((r / "pipeline" / c).glob("*.safetensors")) for k, v in load_file(f).items()}

    first = weights(run)
    again_dir = tmp_path / "again"
    shutil.copytree(run, again_dir)
    shutil.rmtree(again_dir / "pipeline")
    ck = again_dir / "checkpoints" / "checkpoint-2"
    assert ck.exists()
    flags2 = _flags(tiny_pipeline, inst, again_dir, tmp_path / "cache", extra=(*extra, "--resume", str(ck))) + [
        "train.checkpoint_every=2", "plugin.class_steps=2", "train.checkpoints_total_limit=2"]
    assert cli_main(flags2) == 0
    again = weights(again_dir)
    assert set(first) == set(again) and len(first) > 10
    assert all(torch.equal(first[k], again[k]) for k in first)
