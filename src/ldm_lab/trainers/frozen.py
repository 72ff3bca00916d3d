"""Frozen weights in the compute dtype.

Under ``train.mixed_precision`` fp16/bf16 only the trained weights need fp32 (the optimiser's
master copy, as diffusers' ``cast_training_params`` keeps them); everything frozen — the
autoencoder, the text encoder(s), a LoRA's or ControlNet's base UNet, a LoRA-trained text
encoder's base weights — is only read by forwards that autocast runs in the compute dtype
anyway. Holding those in the compute dtype halves their memory (SD 1.5's UNet: 3.4 -> 1.7 GB).

The cast happens after the plugin's set-up, so latent and text caches (and DreamBooth's class
images) are computed with the weights as loaded. Sampling during training (validation,
evaluation) and the artifact run with the frozen weights back in their loaded dtype, for the
duration of that work only: the artifact holds fp32 weights that are exactly the values
training used (fp32 holds every fp16/bf16 value), and the in-training samples are the ones the
stock pipeline gives from the artifact in fp32.

Autoencoders whose config asks for ``force_upcast`` (SDXL's VAE overflows in fp16) stay in
fp32 under fp16. Under FSDP only modules without trained parameters are cast (FSDP flattens a
wrapped module's parameters into one dtype).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class FrozenWeights:
    """The fp32 frozen tensors of ``modules`` (parameters without ``requires_grad``; buffers too
    in modules that train nothing), cast to ``dtype`` and back."""

    def __init__(self, modules: list[nn.Module], dtype: torch.dtype, partly_trained: bool = True):
        self.dtype = dtype
        self.entries: list[tuple[nn.Module, str, bool]] = []  # (owner, name, is a parameter)
        seen: set[int] = set()
        for root in modules:
            trains = any(p.requires_grad for p in root.parameters())
            if trains and not partly_trained:
                continue
            for mod in root.modules():
                tensors = [(n, t, True) for n, t in mod._parameters.items() if t is not None and not t.requires_grad]
                if not trains:
                    tensors += [(n, t, False) for n, t in mod._buffers.items() if t is not None]
                for name, t, is_param in tensors:
                    if t.dtype == torch.float32 and id(t) not in seen:
                        seen.add(id(t))
                        self.entries.append((mod, name, is_param))

    @property
    def nbytes(self) -> int:
        return sum(self._get(m, n, p).nbytes for m, n, p in self.entries)

    @staticmethod
    def _get(mod: nn.Module, name: str, is_param: bool) -> torch.Tensor:
        return mod._parameters[name] if is_param else mod._buffers[name]

    def cast(self, dtype: torch.dtype) -> None:
        for mod, name, is_param in self.entries:
            if is_param:
                p = mod._parameters[name]
                p.data = p.data.to(dtype)
            else:
                mod._buffers[name] = mod._buffers[name].to(dtype)

    @contextmanager
    def as_loaded(self):
        """The frozen weights in fp32 for the duration (sampling, the artifact), then back."""
        if not self.entries:
            yield
            return
        self.cast(torch.float32)
        try:
            yield
        finally:
            self.cast(self.dtype)


def cast_frozen(plugin, trainable: dict[str, nn.Module], mixed_precision: str, frozen_dtype: str,
                fsdp: bool = False) -> FrozenWeights:
    """The plugin's frozen modules and the frozen parts of its trained ones, cast to the compute
    dtype (see the module docstring); a no-op without mixed precision or with ``frozen_dtype: fp32``."""
    dtype = DTYPES.get(mixed_precision)
    if dtype is None or frozen_dtype == "fp32":
        return FrozenWeights([], torch.float32)  # nothing held: every method is a no-op
    ids = {id(m) for m in trainable.values()}
    frozen = [m for m in plugin.frozen_modules() if id(m) not in ids]
    if dtype == torch.float16:
        frozen = [m for m in frozen if not getattr(getattr(m, "config", None), "force_upcast", False)]
    weights = FrozenWeights([*frozen, *trainable.values()], dtype, partly_trained=not fsdp)
    weights.cast(dtype)
    return weights
