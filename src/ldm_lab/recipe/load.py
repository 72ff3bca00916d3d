"""Read a YAML recipe, apply ``key=value`` overrides, validate, and explain what is wrong.

Every problem becomes a ``UserError`` whose message is one sentence naming the file, the
key and (for unknown keys) the closest valid key; the CLI prints it and exits with code 2.
"""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import UserError
from .pipeline_base import fill_from_pipeline, looks_local, pipeline_defaults  # noqa: F401 (re-exported)
from .plugins import PLUGIN_OPTIONS
from .schema import PretrainedSpec, Recipe

MODEL_FREE = {"clip"}  # trainers whose recipe needs no model section (the shapes CLIP is built from data)


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Valid field names of the (sub)model at ``loc``."""
    cur: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(cur, "model_fields", None)
        if not fields or part not in fields:
            return []
        ann = fields[part].annotation
        cur = _model_in(ann)
        if cur is None:
            return []
    return list(getattr(cur, "model_fields", {}))


def _model_in(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for a in getattr(ann, "__args__", ()) or ():
        m = _model_in(a)
        if m is not None:
            return m
    return None


def _explain(err: ValidationError, source: str, root: type[BaseModel] = Recipe, prefix: tuple = ()) -> str:
    e = err.errors()[0]
    loc = tuple(e["loc"])
    key = ".".join(str(p) for p in prefix + loc) or "(top level)"
    if e["type"] == "extra_forbidden":
        valid = _fields_at(root, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"did you mean '{'.'.join(str(p) for p in prefix + loc[:-1] + (close[0],))}'?" if close else (
            f"valid keys here: {', '.join(valid)}." if valid else "remove it.")
        return f"{source}: unknown key '{key}'; {hint}"
    if e["type"] == "literal_error":
        return f"{source}: '{key}' is {e['input']!r}; {e['msg'].lower()}."
    msg = e["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if loc:
        return f"{source}: '{key}' is invalid ({msg}); got {e.get('input')!r}."
    return f"{source}: {msg}."


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UserError(f"override '{text}' is not of the form key=value (for example train.max_steps=200).")
    key, raw = text.split("=", 1)
    if not key:
        raise UserError(f"override '{text}' has an empty key; write key=value.")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``a.b.c=value`` into nested sections; an integer key indexes a list (``model.text_encoders.1.dropout=0``)."""
    for ov in overrides:
        keys, value = parse_override(ov)
        cur = data
        for k in keys[:-1]:
            if isinstance(cur, list):
                cur = cur[_index(cur, k, ov)]
                if not isinstance(cur, (dict, list)):
                    raise UserError(f"override '{ov}': '{k}' is a value, not a section.")
                continue
            nxt = cur.get(k)
            if not isinstance(nxt, (dict, list)):
                nxt = {} if nxt is None else nxt
                if not isinstance(nxt, dict):
                    raise UserError(f"override '{ov}': '{k}' is a value, not a section.")
                cur[k] = nxt
            cur = nxt
        if isinstance(cur, list):
            cur[_index(cur, keys[-1], ov)] = value
        else:
            cur[keys[-1]] = value
    return data


def _index(items: list, key: str, ov: str) -> int:
    if not (key.isdigit() and int(key) < len(items)):
        raise UserError(f"override '{ov}': '{key}' is not an index of that list (0 to {len(items) - 1}).")
    return int(key)


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of keys; a bigger file is not one
MAX_RECIPE_NODES = 100_000  # values after alias expansion (an alias bomb expands exponentially)
MAX_RECIPE_DEPTH = 60


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys (a second ``train:`` would silently replace the
    first) and nesting deeper than a recipe has."""

    def compose_node(self, parent, index):
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_RECIPE_DEPTH:
                raise yaml.YAMLError(f"nested deeper than {MAX_RECIPE_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key != "<<" and key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep)


class _DuplicateKey(Exception):
    def __init__(self, key, line: int):
        self.key, self.line = key, line


def _count_nodes(data, budget: int = MAX_RECIPE_NODES) -> int:
    """Values in ``data`` counting each alias at every place it is used; stops past ``budget``."""
    stack, n = [data], 0
    while stack and n <= budget:
        cur = stack.pop()
        n += 1
        if isinstance(cur, dict):
            stack.extend(cur.values())
        elif isinstance(cur, list):
            stack.extend(cur)
    return n


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"recipe file '{path}' does not exist; give the path of a .yaml recipe (see recipes/).")
    if p.stat().st_size > MAX_RECIPE_BYTES:
        raise UserError(f"{path}: {p.stat().st_size} bytes is not a recipe (at most {MAX_RECIPE_BYTES}); give a "
                        ".yaml recipe file.")
    try:
        text = p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as e:
        raise UserError(f"{path}: not a text file ({type(e).__name__}); give a .yaml recipe file.") from None
    if "\0" in text:
        raise UserError(f"{path}: not a text file (it holds NUL bytes); give a .yaml recipe file.")
    try:
        data = yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as e:
        raise UserError(f"{path}: key '{e.key}' appears twice in one section (line {e.line}); keep one, the "
                        "second would replace the first.") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        detail = "" if mark else f" ({e})"
        raise UserError(f"{path}: not valid YAML{where}{detail}; check indentation and quoting.") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be a recipe; check indentation.") from None
    if _count_nodes(data) > MAX_RECIPE_NODES:
        raise UserError(f"{path}: expands to more than {MAX_RECIPE_NODES} values (aliases used many times over); a "
                        "recipe is a page of keys, write them out.")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a mapping of keys to values.")
    return data


def _check_paths(recipe: Recipe, source: str) -> None:
    pipe = recipe.model.pipeline
    if pipe is not None and looks_local(pipe) and not (Path(pipe).expanduser() / "model_index.json").exists():
        raise UserError(f"{source}: 'model.pipeline' is '{pipe}', which is not a diffusers pipeline dir "
                          "(no model_index.json); give a dir written by save_pretrained, a run's pipeline/ or a hub id.")
    specs: list[tuple[str, PretrainedSpec | None]] = [
        ("model.text_encoder", recipe.model.text_encoder),
        ("model.autoencoder", recipe.model.autoencoder),
        ("model.unet", recipe.model.unet),
        ("model.denoiser", recipe.model.denoiser),
        *((f"model.text_encoders.{k}", te) for k, te in enumerate(recipe.model.text_encoders or [])),
    ]
    for key, spec in specs:
        if spec is None or spec.pretrained is None:
            continue
        if looks_local(spec.pretrained) and not Path(spec.pretrained).expanduser().exists():
            raise UserError(
                f"{source}: '{key}.pretrained' points to '{spec.pretrained}', which does not exist; "
                "give an existing directory or a hub id (org/name)."
            )
        local = Path(spec.pretrained).expanduser()
        sub = getattr(spec, "subfolder", None)
        if local.is_dir() and getattr(spec, "kind", None) != "openclip" and not (local / (sub or "") / "config.json").exists():
            raise UserError(f"{source}: '{key}.pretrained' is '{spec.pretrained}', a directory without a model (no "
                            f"{sub + '/' if sub else ''}config.json); give a dir written by save_pretrained, or a hub id.")
    d = recipe.data
    if d.source == "imagefolder" and not Path(d.path).is_dir():
        raise UserError(f"{source}: 'data.path' is '{d.path}', which is not a directory; give an imagefolder dir.")


def load_recipe(path: str | Path | None, overrides: list[str] | None = None, data: dict | None = None,
                check_paths: bool = True) -> Recipe:
    """Load and validate a recipe file (or a dict) with dotted overrides applied."""
    source = str(path) if path is not None else "recipe"
    raw = read_yaml(path) if path is not None else dict(data or {})
    raw = apply_overrides(raw, list(overrides or []))
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise UserError(_explain(e, source)) from None
    # the trainer names are PLUGIN_OPTIONS' keys (the trainer registry accepts no other name)
    trainers = sorted(PLUGIN_OPTIONS)
    if recipe.trainer not in PLUGIN_OPTIONS:
        close = difflib.get_close_matches(recipe.trainer, trainers, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"choose from {', '.join(trainers)}."
        raise UserError(f"{source}: unknown trainer '{recipe.trainer}'; {hint}")
    try:
        PLUGIN_OPTIONS[recipe.trainer].model_validate(recipe.plugin)
    except ValidationError as e:
        raise UserError(_explain(e, source, PLUGIN_OPTIONS[recipe.trainer], ("plugin",))) from None
    if path is not None and recipe.trainer not in MODEL_FREE and not raw.get("model"):
        raise UserError(f"{source}: the recipe has no model section; a {recipe.trainer} recipe "
                        "names its models (model.pipeline, or model.text_encoder / autoencoder / unet), see "
                        "recipes/shapes/t2i.yaml.")
    _check_overrides(recipe, source)
    if check_paths:
        _check_paths(recipe, source)
    return fill_from_pipeline(recipe)


def _check_overrides(recipe: Recipe, source: str) -> None:
    """The backbone's ``overrides`` against its diffusers class's constructor arguments (before any
    weights load: ``train`` would otherwise fail deep inside the model's construction)."""
    spec = recipe.model.denoiser_spec()
    if not spec.overrides:
        return
    from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    cls = {"unet": UNet2DConditionModel, "pixart": PixArtTransformer2DModel, "sd3": SD3Transformer2DModel}[spec.family]
    valid = [k for k in inspect.signature(cls.__init__).parameters if k not in ("self", "args", "kwargs")]
    bad = [k for k in spec.overrides if k not in valid]
    if bad:
        key = "model.denoiser" if recipe.model.denoiser is not None else "model.unet"
        close = difflib.get_close_matches(str(bad[0]), valid, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else f"see the arguments of diffusers' {cls.__name__}."
        raise UserError(f"{source}: '{key}.overrides.{bad[0]}' is not an argument of {cls.__name__}; {hint}")


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
