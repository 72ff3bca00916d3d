"""The recipe layer: every trainer's ``plugin:`` keys are checked by ``recipe check``, the trainer
names are ``PLUGIN_OPTIONS``' keys, and ``ldm_lab.recipe`` imports nothing above it."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from conftest import REPO
from ldm_lab.cli import main as cli_main
from ldm_lab.errors import UserError
from ldm_lab.recipe import load_recipe
from ldm_lab.recipe.plugins import PLUGIN_OPTIONS, AutoencoderOptions, CLIPOptions
from ldm_lab.trainers import registry


@pytest.mark.parametrize("recipe, bad, good", [
    ("recipes/shapes/autoencoder.yaml", "kl_wieght", "kl_weight"),
    ("recipes/shapes/clip.yaml", "projection_dm", "projection_dim"),
])
def test_recipe_check_names_a_misspelt_stage_one_option(recipe, bad, good, capsys):
    assert cli_main(["recipe", "check", str(REPO / recipe), f"plugin.{bad}=1e-6"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"'plugin.{bad}'" in err and f"did you mean 'plugin.{good}'?" in err


def test_recipe_check_bounds_stage_one_options(capsys):
    assert cli_main(["recipe", "check", str(REPO / "recipes/shapes/autoencoder.yaml"), "plugin.kl_weight=-1"]) == 2
    assert "'plugin.kl_weight' is invalid" in capsys.readouterr().err
    assert cli_main(["recipe", "check", str(REPO / "recipes/shapes/clip.yaml"), "plugin.max_length=0"]) == 2
    assert "'plugin.max_length' is invalid" in capsys.readouterr().err


def test_stage_one_option_defaults():
    # the values the autoencoder and CLIP trainers have always trained with
    assert AutoencoderOptions().model_dump() == {"kl_weight": 1e-6, "mse_weight": 1.0, "crop": None,
                                                 "scale_batches": 8, "init_logvar": -6.0}
    tower = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4}
    assert CLIPOptions().model_dump() == {"max_length": 20, "projection_dim": 64, "text": tower,
                                          "vision": {**tower, "patch_size": 8}}
    # a text / vision mapping replaces the default one as a whole
    assert CLIPOptions(text={"hidden_size": 32}).text == {"hidden_size": 32}


def test_a_stray_plugin_key_under_text_to_image_is_an_error():
    with pytest.raises(UserError, match=r"unknown key 'plugin\.rank'"):
        load_recipe(REPO / "recipes/shapes/t2i.yaml", ["plugin.rank=4"], check_paths=False)


def test_registry_names_are_plugin_options_keys():
    assert set(registry._BUILTIN) == set(PLUGIN_OPTIONS)
    for name in PLUGIN_OPTIONS:
        assert registry.get_trainer(name).name == name
    assert set(registry._REGISTRY) == set(PLUGIN_OPTIONS) == set(registry.known_trainers())


def test_register_refuses_a_trainer_without_options_model():
    class Unnamed:
        name = "no_such_trainer"

    with pytest.raises(ValueError, match="no options model.*PLUGIN_OPTIONS"):
        registry.register(Unnamed)
    assert "no_such_trainer" not in registry._REGISTRY


def test_recipe_imports_nothing_above_it():
    allowed = {"ldm_lab.errors", "ldm_lab.recipe"}
    pkg = Path(importlib.import_module("ldm_lab.recipe").__file__).parent
    for f in sorted(pkg.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                # ldm_lab.recipe.X: level 1 is ldm_lab.recipe, level 2 is ldm_lab
                base = ["ldm_lab", "recipe"][: 3 - node.level]
                target = ".".join(base + ([node.module] if node.module else []))
            elif isinstance(node, ast.ImportFrom):
                target = node.module or ""
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
                assert not [t for t in targets if t.startswith("ldm_lab")], f"{f.name}: {targets}"
                continue
            else:
                continue
            if target.startswith("ldm_lab"):
                assert any(target == a or target.startswith(a + ".") for a in allowed), f"{f.name}: {target}"
