"""The exponential moving average of the trained weights.

``LerpEMA`` is diffusers' EMAModel with a fused update; the helpers say what it averages (the
trained parameters of the plugin's EMA module), where its weights live (the training device, or
pinned CPU memory with ``train.ema.offload``), when it steps, and swap its weights in for
validation, export and evaluation.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from .sharding import full_tensors, reshard_like


class LerpEMA(EMAModel):
    """diffusers' EMAModel (decay schedule, warm-up, state dict, ``copy_to``/``store``/``restore``)
    with its multi-tensor update as one fused kernel: ``shadow.lerp_(param, 1 - decay)`` is
    diffusers' ``shadow - (1 - decay) * (shadow - param)`` in one pass over memory, without the
    temporary copy of every parameter its ``_foreach_sub`` makes (the bench's EMA phase, shapes
    UNet on the AVX-512 host: 5 -> 3 ms). ``foreach=False`` keeps diffusers' per-tensor loop."""

    _pending = None  # a CUDA event recorded after an offloaded EMA's non-blocking copy back to the host

    def settle(self) -> None:
        """Wait for an offloaded EMA's copy to pinned host memory (``ema_step``): until it has
        finished, a host-side reader (checkpoint serialisation) could see a partly written average."""
        if self._pending is not None:
            self._pending.synchronize()
            self._pending = None

    def state_dict(self, *args, **kwargs):
        """The average as whole tensors: under FSDP (shards of it on each process) every process
        must call this, as the shards are gathered (``sharding.full_tensors``)."""
        self.settle()
        state = super().state_dict(*args, **kwargs)
        return {**state, "shadow_params": full_tensors(state["shadow_params"])}

    def load_state_dict(self, state_dict) -> None:
        """Whole tensors back; under FSDP each process keeps its shards of them, laid out like the
        parameters' (so a checkpoint of another process count loads too)."""
        self.settle()
        before = list(self.shadow_params)
        super().load_state_dict(state_dict)
        if len(self.shadow_params) != len(before):  # e.g. an EMA of the UNet alone, resumed with a trained text encoder
            raise RuntimeError(f"size mismatch: the checkpoint's EMA averages {len(self.shadow_params)} tensors, "
                               f"this run's {len(before)}")
        self.shadow_params = reshard_like(self.shadow_params, before)

    def copy_to(self, parameters) -> None:
        self.settle()
        with self._per_tensor_if_sharded():
            return super().copy_to(parameters)

    def restore(self, parameters) -> None:
        with self._per_tensor_if_sharded():
            return super().restore(parameters)

    @contextmanager
    def _per_tensor_if_sharded(self):
        """diffusers' per-tensor copies for FSDP shards (DTensors have no sharding rule for
        ``_foreach_copy_``)."""
        foreach = self.foreach
        if foreach and any(hasattr(s, "device_mesh") for s in self.shadow_params):
            self.foreach = False
        try:
            yield
        finally:
            self.foreach = foreach

    @torch.no_grad()
    def step(self, parameters) -> None:
        self.settle()
        parameters = list(parameters.parameters() if isinstance(parameters, torch.nn.Module) else parameters)
        if not self.foreach:
            return super().step(parameters)
        self.optimization_step += 1
        decay = self.get_decay(self.optimization_step)
        self.cur_decay_value = decay
        trained = [(s, p) for s, p in zip(self.shadow_params, parameters) if p.requires_grad]
        frozen = [(s, p) for s, p in zip(self.shadow_params, parameters) if not p.requires_grad]
        if frozen:
            torch._foreach_copy_([s for s, _ in frozen], [p for _, p in frozen])
        if trained:  # (a parameter in another precision than its average is cast, as diffusers' arithmetic promotes)
            torch._foreach_lerp_([s for s, _ in trained], [p if p.dtype == s.dtype else p.to(s.dtype) for s, p in trained],
                                 1 - decay)


def ema_params(plugin, accelerator) -> list[torch.nn.Parameter]:
    """What EMA averages: the trained parameters of the plugin's EMA modules, in their order
    (adapters only when the base is frozen)."""
    return [p for m in plugin.ema_modules() for p in accelerator.unwrap_model(m).parameters() if p.requires_grad]


def make_ema(t, plugin, accelerator: Accelerator) -> LerpEMA:
    """The run's EMA (``t`` is the recipe's ``train``), at home. Checkpoints hold it as files of
    their own (``checkpoints.save_checkpoint``'s shared states), not as accelerate's pickled custom state."""
    ema = LerpEMA(ema_params(plugin, accelerator), decay=t.ema.decay, use_ema_warmup=t.ema.warmup,
                  foreach=t.ema.foreach)
    ema_home(ema, t, accelerator)
    return ema


def ema_home(ema: EMAModel, t, accelerator: Accelerator) -> None:
    """EMA weights on the training device, or in pinned CPU memory with ``train.ema.offload``."""
    if t.ema.offload and accelerator.device.type == "cuda":
        ema.to("cpu")
        ema.pin_memory()
    else:
        ema.to(accelerator.device)


def ema_step(ema: EMAModel, t, plugin, accelerator: Accelerator) -> None:
    offload = t.ema.offload and accelerator.device.type == "cuda"
    if offload:
        ema.to(accelerator.device, non_blocking=True)
    ema.step(ema_params(plugin, accelerator))
    if offload:
        ema.to("cpu", non_blocking=True)
        # the copy runs on the device's stream while training goes on; readers of the host copy wait for it
        ema._pending = torch.cuda.Event()
        ema._pending.record()


class ema_weights:  # lower case: used like a function, in ``with``
    """Context: EMA weights in the tracked module while inside, the trained ones after."""

    def __init__(self, ema, plugin, accelerator):
        self.ema, self.plugin, self.accelerator = ema, plugin, accelerator

    def __enter__(self):
        if self.ema is not None:
            params = ema_params(self.plugin, self.accelerator)
            self.ema.store(params)
            self.ema.copy_to(params)
            self.params = params

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.params)
        return False
