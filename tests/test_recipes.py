"""Recipe schema, overrides, error messages, and the smoke test that instantiates every recipe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, TINY_UNET
from ldm_lab.errors import UserError
from ldm_lab.recipe import load_recipe

RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


def write(tmp_path: Path, data: dict, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_unknown_key_names_file_key_and_closest(tmp_path):
    p = write(tmp_path, {"train": {"lerning_rate": 1e-4}})
    with pytest.raises(UserError) as e:
        load_recipe(p, check_paths=False)
    msg = str(e.value)
    assert str(p) in msg and "train.lerning_rate" in msg and "train.learning_rate" in msg


def test_wrong_type_and_literal(tmp_path):
    with pytest.raises(UserError, match="train.batch_size"):
        load_recipe(write(tmp_path, {"train": {"batch_size": "many"}}))
    with pytest.raises(UserError, match="noise.prediction_type"):
        load_recipe(write(tmp_path, {"noise": {"prediction_type": "eps"}}))


def test_unknown_trainer_suggests(tmp_path):
    with pytest.raises(UserError, match="did you mean 'text_to_image'"):
        load_recipe(write(tmp_path, {"trainer": "text_to_imag"}))


def test_missing_local_path_is_an_error_but_hub_id_is_not(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_recipe(write(tmp_path, {"model": {"autoencoder": {"pretrained": str(tmp_path / "nope")}}}))
    r = load_recipe(write(tmp_path, {"model": {"autoencoder": {"pretrained": "org-x/vae-y"}}}))
    assert r.model.autoencoder.pretrained == "org-x/vae-y"


def test_dotted_overrides_typed(tmp_path):
    r = load_recipe(REPO / "recipes/shapes/t2i.yaml",
                    ["train.max_steps=200", "data.resolution=32", "train.ema.enabled=false", "validation.prompts=[a, b]"],
                    check_paths=False)
    assert r.train.max_steps == 200 and r.data.resolution == 32 and r.train.ema.enabled is False
    assert r.validation.prompts == ["a", "b"]
    with pytest.raises(UserError, match="train.max_step'.*train.max_steps"):
        load_recipe(REPO / "recipes/shapes/t2i.yaml", ["train.max_step=3"], check_paths=False)
    with pytest.raises(UserError, match="key=value"):
        load_recipe(REPO / "recipes/shapes/t2i.yaml", ["train.max_steps"], check_paths=False)


def test_yaml_is_read_safely(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("trainer: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(p)


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ldm_lab.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_cli_bad_recipe_exit_2_no_traceback(tmp_path):
    p = write(tmp_path, {"train": {"lerning_rate": 1e-4}})
    r = run_cli("recipe", "check", str(p))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "did you mean 'train.learning_rate'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run_cli("train", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_cli_recipe_show_resolves_overrides():
    r = run_cli("recipe", "show", "recipes/shapes/t2i.yaml", "train.max_steps=7")
    assert r.returncode == 0, r.stderr
    shown = yaml.safe_load(r.stdout)
    assert shown["train"]["max_steps"] == 7 and shown["train"]["ema"]["decay"] == 0.999


# ---- the smoke test: every recipe under recipes/ builds with tiny local substitutes ----------------

def substitute(path: Path, parts: dict[str, Path], pipeline: Path | None = None) -> list[str]:
    """Overrides replacing every model a recipe names with the tiny local parts."""
    raw = yaml.safe_load(path.read_text())
    ov = []
    model = raw.get("model") or {}
    if model.get("pipeline"):
        ov.append(f"model.pipeline={pipeline}")
    if "text_encoder" in model:
        te = model["text_encoder"]
        if te.get("kind", "clip") == "t5":
            ov += ["model.text_encoder.pretrained=null", "model.text_encoder.subfolder=null",
                   f"model.text_encoder.tokenizer={parts['clip'] / 'tokenizer'}",
                   "model.text_encoder.config={d_model: 32, d_ff: 64, num_layers: 1, num_heads: 2, d_kv: 16, vocab_size: 49408}"]
        else:
            if te.get("config"):  # a CLIP built from a config (recipes/sd15/bench-random.yaml): the tiny one instead
                ov += ["model.text_encoder.config=null", "model.text_encoder.tokenizer=null",
                       "model.text_encoder.max_length=null"]
            ov += [f"model.text_encoder.pretrained={parts['clip']}", "model.text_encoder.subfolder=text_encoder"]
    for k in range(len(model.get("text_encoders") or [])):
        ov += [f"model.text_encoders.{k}.pretrained={parts['clip']}", f"model.text_encoders.{k}.subfolder=text_encoder"]
    if model.get("autoencoder", {}).get("pretrained"):
        ov += [f"model.autoencoder.pretrained={parts['vae']}", "model.autoencoder.subfolder=null"]
    if "unet" in model:
        ov += ["model.unet.pretrained=null", "model.unet.subfolder=null", "model.unet.config=null",
               f"model.unet.preset={TINY_UNET['preset']}", f"model.unet.overrides={TINY_UNET['overrides']}"]
    return ov


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(REPO)) for p in RECIPES])
def test_every_recipe_instantiates(path, tiny_parts, tiny_pipeline):
    from ldm_lab.components import load_autoencoder, load_text_encoder, load_unet
    from ldm_lab.recipe import pipeline_defaults
    from ldm_lab.trainers.registry import get_trainer

    recipe = pipeline_defaults(load_recipe(path, substitute(path, tiny_parts, tiny_pipeline)))
    assert get_trainer(recipe.trainer).name == recipe.trainer
    m = recipe.model
    te = load_text_encoder(m.text_encoder) if m.text_encoder else None
    vae = load_autoencoder(m.autoencoder) if m.autoencoder else None
    if m.unet is not None:
        unet = load_unet(m.unet)
        assert unet.config.cross_attention_dim == te.hidden_size
    if m.denoiser is not None:  # a transformer family: its backbone, and the text encoders it reads
        from ldm_lab.components.backbones import load_backbone
        from ldm_lab.components.denoiser import denoiser_for
        from ldm_lab.trainers.text_to_image import check_backbone

        encs = [load_text_encoder(s) for s in m.encoder_specs()]
        small = {"num_layers": 1, **({"caption_channels": encs[0].hidden_size} if m.denoiser.family == "pixart" else {})}
        spec = m.denoiser.model_copy(update={"overrides": {**m.denoiser.overrides, **small}})
        net = load_backbone(spec)
        check_backbone(spec.family, net, encs)
        cond = denoiser_for(net).combine([e(["a red circle"]) for e in encs])
        width = net.config.joint_attention_dim if spec.family == "sd3" else net.config.caption_channels
        assert cond.states.shape[-1] == width
    if te is not None:
        h = te(["a red circle"]).states
        assert h.shape[0] == 1 and h.shape[-1] == te.hidden_size
    if vae is not None:
        z = vae.encode(torch.randn(1, 3, 32, 32)).latent_dist.mean
        assert z.shape[1] == vae.config.latent_channels
