"""Trainer plugins by registered name. Recipes choose a plugin by name only: no importing of
arbitrary dotted paths from a recipe someone sent you."""

from __future__ import annotations

import importlib

from ..recipe.plugins import PLUGIN_OPTIONS

# name -> module that defines it (imported lazily so `recipe check` stays fast)
_BUILTIN = {
    "text_to_image": "ldm_lab.trainers.text_to_image",
    "autoencoder": "ldm_lab.trainers.autoencoder",
    "clip": "ldm_lab.trainers.clip",
    "lora": "ldm_lab.trainers.lora",
    "dreambooth": "ldm_lab.trainers.dreambooth",
    "controlnet": "ldm_lab.trainers.controlnet",
}
_REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make a TrainerPlugin subclass available under ``cls.name``.

    The name needs an options model in ``ldm_lab.recipe.plugins.PLUGIN_OPTIONS``: that map is the
    list of trainer names ``load_recipe`` (and so ``recipe check``) accepts, and its model checks
    the recipe's ``plugin:`` keys.
    """
    if cls.name not in PLUGIN_OPTIONS:
        raise ValueError(f"trainer {cls.__name__} is registered as '{cls.name}', which has no options model; add "
                         f"'{cls.name}': <a Strict model of its plugin: keys> to PLUGIN_OPTIONS in "
                         "ldm_lab/recipe/plugins.py")
    _REGISTRY[cls.name] = cls
    return cls


def known_trainers() -> list[str]:
    return sorted(set(_BUILTIN) | set(_REGISTRY))


def get_trainer(name: str) -> type:
    if name not in _REGISTRY and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _REGISTRY:
        raise KeyError(f"unknown trainer '{name}'; choose from {', '.join(known_trainers())}")
    return _REGISTRY[name]
