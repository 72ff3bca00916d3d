"""Our own checkpoint objects (the EMA, the plugin's BatchRNG, a stream position) as a safetensors
file of their tensors beside a JSON file of the rest, so resuming reads no pickle: a checkpoint
someone hands you cannot run code through them. ``stem.safetensors`` + ``stem.json``; the JSON
holds the state's structure with ``{"tensor": key}`` where a tensor was."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TENSOR = "tensor"


def _split(value, key: str, tensors: dict[str, torch.Tensor]):
    if torch.is_tensor(value):
        tensors[key] = value.detach().cpu().contiguous()
        return {TENSOR: key}
    if isinstance(value, dict):
        return {"dict": {str(k): _split(v, f"{key}.{k}" if key else str(k), tensors) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return {"list": [_split(v, f"{key}.{i}" if key else str(i), tensors) for i, v in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"{type(value).__name__} in a checkpoint state: only tensors, numbers, strings, lists and dicts")


def _join(node, tensors: dict[str, torch.Tensor]):
    if TENSOR in node:
        return tensors[node[TENSOR]]
    if "dict" in node:
        return {k: _join(v, tensors) for k, v in node["dict"].items()}
    if "list" in node:
        return [_join(v, tensors) for v in node["list"]]
    return node["value"]


def save_state(state: dict, stem: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    tree = _split(state, "", tensors)
    save_file(tensors, str(stem.with_suffix(".safetensors")))
    stem.with_suffix(".json").write_text(json.dumps(tree))


def exists(stem: Path) -> bool:
    return stem.with_suffix(".json").exists()


def load_state(stem: Path) -> dict:
    tensors = load_file(str(stem.with_suffix(".safetensors")))
    return _join(json.loads(stem.with_suffix(".json").read_text()), tensors)
