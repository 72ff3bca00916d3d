"""FSDP2: sharded trained modules, and the work that needs them whole.

Under FSDP every forward of a sharded module all-gathers its parameters, so a forward that only
the main process runs (validation and evaluation sampling, the artifact) would wait forever for
the others. Instead every process takes part in gathering the full weights once
(``accelerator.get_state_dict``, accelerate's FSDP2 state-dict handling) and the main process
does its work on an unsharded copy (``unsharded``); the other processes wait.

The EMA of sharded parameters is elementwise, so each process averages its own shards (the
shadow tensors are DTensors like the parameters); a checkpoint holds the full average, gathered
by every process and written by the main one, and a resume hands each process its shards of it
again (``distribute_tensor`` with the parameter's mesh and placements), so it also resumes on
another process count.

accelerate sets FSDP up for accelerator devices only: on CPU processes (gloo) it ignores the
FSDP settings of the launch config and runs an unsharded MULTI_CPU job. torch's FSDP2 runs on
CPU, so ``fsdp_on_cpu`` installs accelerate's FSDP plugin, from the same settings, by hand: a
CPU cluster, or a laptop checking an FSDP recipe before it goes to GPUs, trains sharded too.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from ..errors import UserError


def fsdp_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_on_cpu(accelerator: Accelerator) -> None:
    """accelerate's FSDP plugin, from the launch config's settings (the environment ``accelerate
    launch --config_file docs/accelerate/fsdp.yaml --cpu`` sets), on a CPU process group."""
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise UserError("FSDP on CPU processes runs FSDP2 only; set fsdp_version: 2 in the accelerate config "
                        "(docs/accelerate/fsdp.yaml).")
    state = AcceleratorState()
    PartialState().distributed_type = DistributedType.FSDP  # both views accelerate reads the type from
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin


def same_weights_everywhere(modules) -> None:
    """The main process's weights in every process's copy, before sharding. Each process seeds
    itself apart (``set_seed(..., device_specific=True)``), so a module built with random weights
    differs between them; DDP broadcasts rank 0's weights when it wraps a module, FSDP shards each
    process's own copy, so this does what DDP does first."""
    with torch.no_grad():
        for module in modules:
            for t in module.state_dict().values():
                torch.distributed.broadcast(t, src=0)


def is_fsdp(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def _plain_class(module: torch.nn.Module) -> type:
    """The module's own class (FSDP2 swaps in a subclass named FSDP<Class>)."""
    return next(c for c in type(module).__mro__ if not c.__name__.startswith("FSDP"))


def full_copy(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An unsharded module of ``module``'s class and config holding ``state``."""
    cls = _plain_class(module)
    with torch.device("meta"):
        copy = cls.from_config(module.config) if hasattr(cls, "from_config") else cls(module.config)
    copy.load_state_dict(state, assign=True)
    mine = dict(copy.named_buffers())
    for name, buf in module.named_buffers():  # buffers a state dict leaves out (non-persistent) are not sharded
        if name in mine and mine[name].is_meta:
            owner, _, leaf = name.rpartition(".")
            copy.get_submodule(owner)._buffers[leaf] = buf.detach().clone()
    return copy


@contextmanager
def unsharded(accelerator: Accelerator, plugin, names: list[str]):
    """Inside: on the main process, the plugin's trained modules ``names`` are unsharded copies
    of the current weights (EMA weights when swapped in before); on the others, unchanged. Every
    process must enter (the gathering is collective); a no-op without FSDP."""
    if not is_fsdp(accelerator):
        yield
        return
    kept = {name: getattr(plugin, name) for name in names}
    copies = {}
    for name, module in kept.items():
        state = accelerator.get_state_dict(module)  # collective; the full state on the main process only
        if accelerator.is_main_process:
            copies[name] = full_copy(accelerator.unwrap_model(module), state).to(accelerator.device)
        del state
    try:
        for name, copy in copies.items():
            setattr(plugin, name, copy)
        yield
    finally:
        for name, module in kept.items():
            setattr(plugin, name, module)
        accelerator.wait_for_everyone()


def full_tensors(tensors: list) -> list[torch.Tensor]:
    """Each DTensor's whole tensor (collective), plain tensors as they are."""
    return [t.full_tensor() if hasattr(t, "full_tensor") else t for t in tensors]


def reshard_like(tensors: list[torch.Tensor], like: list) -> list:
    """``tensors`` (whole) as shards laid out like the DTensors in ``like`` (plain ones as they are)."""
    from torch.distributed.tensor import distribute_tensor

    out = []
    for t, ref in zip(tensors, like):
        if hasattr(ref, "device_mesh"):
            out.append(distribute_tensor(t.to(ref.device, ref.dtype), ref.device_mesh, ref.placements))
        else:
            out.append(t)
    return out
