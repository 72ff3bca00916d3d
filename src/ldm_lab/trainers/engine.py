"""The Accelerate engine a run trains on, built from its recipe.

Everything here turns recipe settings into accelerate and torch objects and checks them: the
``Accelerator`` (devices, processes, mixed precision, accumulation, the seedable sampler), the
distributed settings a recipe cannot combine, the trained modules' attention / compile / memory
options, the optimiser and its LR schedule, ``prepare``, gradient clipping of exactly the trained
parameters, and the one all-reduce of a step's values. Nothing here knows about checkpoints,
data positions or logs.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch._dynamo
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    GradientAccumulationPlugin,
    ProjectConfiguration,
    broadcast_object_list,
    gather_object,
    is_mps_available,
    is_npu_available,
    is_xpu_available,
)
from diffusers.models.attention_processor import AttnProcessor
from diffusers.optimization import get_scheduler
from torch._dynamo.utils import counters

from ..errors import UserError
from ..recipe import Recipe
from .sharding import fsdp_on_cpu, fsdp_requested


def multi_process_without_accelerator() -> bool:
    """True when torchrun / mpirun started several processes on a machine with no GPU: accelerate
    makes them one gloo group only when told the run is on CPU (``accelerate launch --cpu`` tells
    it through the environment; torchrun does not), and would otherwise run N unsynchronised
    single-process copies that all write the same files."""
    if os.environ.get("LOCAL_RANK") is None and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    return not (torch.cuda.is_available() or is_xpu_available() or is_npu_available() or is_mps_available())


def make_accelerator(recipe: Recipe, run_dir: Path, tracker: str | None) -> Accelerator:
    """TF32 as ``train.allow_tf32`` says, then the run's ``Accelerator``."""
    t = recipe.train
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = t.allow_tf32
        torch.backends.cudnn.allow_tf32 = t.allow_tf32
    accelerator = Accelerator(
        cpu=multi_process_without_accelerator(),
        dynamo_backend="inductor" if t.compile else "no",
        # every optimiser step is exactly gradient_accumulation_steps batches, also across epoch ends, so a
        # resumed run's data position (step x accumulation) is exact
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=t.gradient_accumulation_steps,
                                                                sync_with_dataloader=False),
        mixed_precision=t.mixed_precision,
        log_with=tracker,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        # the shuffle order of every epoch comes from (seed, epoch), so a resumed run sees the
        # batches the uninterrupted one would have seen
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=recipe.seed),
    )
    if fsdp_requested() and multi_process_without_accelerator():
        fsdp_on_cpu(accelerator)  # accelerate sets FSDP up on accelerators only (sharding.py)
    return accelerator


def check_distributed(accelerator: Accelerator, recipe: Recipe) -> None:
    """Recipe settings the engine accelerate was configured with cannot run, found before any
    model loads: EMA keeps a full copy of parameters that FSDP1 / ZeRO-3 shard (under FSDP2 each
    process averages its own shards, ``sharding.py``)."""
    kind = accelerator.distributed_type
    zero3 = kind == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3
    fsdp1 = kind == DistributedType.FSDP and accelerator.state.fsdp_plugin.fsdp_version == 1
    if recipe.train.ema.enabled and (fsdp1 or zero3):
        engine = "FSDP1" if fsdp1 else "DeepSpeed ZeRO-3"
        raise UserError(f"train.ema cannot average parameters that {engine} shards across processes; set "
                          "train.ema.enabled=false, or use FSDP2 (fsdp_version: 2), DDP or DeepSpeed ZeRO-2 "
                          "(docs/scaling.md).")


def set_up_modules(recipe: Recipe, plugin, modules: dict, accelerator: Accelerator) -> None:
    """The trained modules' options, in this order: classic attention (also on the plugin's UNet),
    the compile fallback, channels-last memory, gradient checkpointing."""
    t = recipe.train
    if t.attention == "classic":
        for m in {*modules.values(), getattr(plugin, "unet", None)} - {None}:
            if hasattr(m, "set_attn_processor"):
                m.set_attn_processor(AttnProcessor())
    if t.compile:
        compile_fallback(accelerator)
    if t.channels_last and accelerator.distributed_type == DistributedType.FSDP:
        # torch's FSDP2 shards contiguous parameters only ("FSDP does not support non-contiguous parameters")
        accelerator.print("train.channels_last is off under FSDP: FSDP2 shards contiguous parameters only")
    elif t.channels_last:
        for m in modules.values():
            m.to(memory_format=torch.channels_last)
    if t.gradient_checkpointing:
        for m in modules.values():
            if hasattr(m, "enable_gradient_checkpointing"):
                m.enable_gradient_checkpointing()


def make_optimizer(recipe: Recipe, param_groups: list[dict], device: torch.device | None = None) -> torch.optim.Optimizer:
    t = recipe.train
    kw = dict(lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, weight_decay=t.weight_decay)
    impl = t.optimizer_impl
    if impl == "auto":  # fused where the training device has the fused kernel
        impl = "fused" if (device.type if device is not None else "cpu") in ("cpu", "cuda") else "foreach"
    impl_kw = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}, "torch": {}}[impl]
    if t.optimizer == "adamw8bit":
        try:  # an optional dependency (the bnb extra), imported only by the runs that use it
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("train.optimizer is adamw8bit but bitsandbytes is not installed; "
                              "pip install 'ldm-lab[bnb]' or use train.optimizer=adamw.") from None
        return bnb.optim.AdamW8bit(param_groups, **kw)
    return torch.optim.AdamW(param_groups, **kw, **impl_kw)


def make_lr_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer, num_processes: int):
    """The LR schedule over ``train.max_steps``. Each process steps the scheduler once per
    optimiser step, and accelerate's prepared scheduler advances num_processes steps per call:
    scaled so the schedule spans max_steps."""
    t, n = recipe.train, num_processes
    return get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps * n,
                         num_training_steps=t.max_steps * n)


def prepare(accelerator: Accelerator, modules: dict, optimizer, dataloader, lr_scheduler, stream: bool) -> tuple:
    """accelerate ``prepare``; returns (wrapped modules, optimizer, dataloader, lr_scheduler). A
    stream (IterableDataset) is already split across processes (datasets' split_dataset_by_node);
    accelerate would dispatch or shard it again, so it stays unprepared and its batches move to the
    device as they are read."""
    names = list(modules)
    if stream:
        prepared = accelerator.prepare(*modules.values(), optimizer, lr_scheduler)
        wrapped, (optimizer, lr_scheduler) = prepared[: len(names)], prepared[len(names):]
    else:
        prepared = accelerator.prepare(*modules.values(), optimizer, dataloader, lr_scheduler)
        wrapped, (optimizer, dataloader, lr_scheduler) = prepared[: len(names)], prepared[len(names):]
    return wrapped, optimizer, dataloader, lr_scheduler


def is_deepspeed(accelerator: Accelerator) -> bool:
    """DeepSpeed steps inside backward: a non-finite step cannot be skipped."""
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def clip_gradients(accelerator: Accelerator, optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor | None:
    """Clip the gradients of exactly the parameters the optimiser trains (every param group:
    adapters of a LoRA run, both the UNet's and the text encoder's); returns the norm before, as a
    0-dim tensor on the device (no host sync), or None under DeepSpeed before its engine has one
    (it clips with its own gradient_clipping)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = accelerator.clip_grad_norm_(params, max_norm)
    return None if norm is None else torch.as_tensor(norm, device=accelerator.device).float().reshape(())


def main_decides(accelerator: Accelerator, value):
    """The main process's ``value`` on every process (one ``broadcast_object_list`` when there are
    several), so a decision only the main process can make (a run dir's lock, the free space, a
    failed save) ends every process the same way."""
    if accelerator.num_processes == 1:
        return value
    box = [value]
    broadcast_object_list(box)
    return box[0]


def everyone(accelerator: Accelerator, value) -> list:
    """Every process's ``value``, in process order, on every process (one all-gather of objects)."""
    if accelerator.num_processes == 1:
        return [value]
    return gather_object([value])


def step_values(accelerator: Accelerator, loss: torch.Tensor, bad, stop: bool, norm) -> tuple:
    """(loss averaged over processes, a bad step on any process, a stop signal on any process,
    gradient norm or None) from one all-reduce and one host sync: every rank takes the same path,
    and a GPU run waits for its device once per step, not once per logged value."""
    dev = accelerator.device

    def scalar(x) -> torch.Tensor:  # python numbers become fill kernels on the device, not host copies
        if isinstance(x, torch.Tensor):
            return x.to(dev).float().reshape(())
        return torch.full((), float(x), dtype=torch.float32, device=dev)

    v = torch.stack([scalar(loss.float().mean()), scalar(bad), scalar(stop), scalar(0.0 if norm is None else norm)])
    n = accelerator.num_processes
    if n > 1:
        v = accelerator.reduce(v, reduction="sum")
    loss_v, bad_v, stop_v, norm_v = v.tolist()
    return loss_v / n, bad_v > 0, stop_v > 0, None if norm is None else norm_v / n


def compile_fallback(accelerator: Accelerator) -> None:
    """A module that fails to compile runs eagerly instead of ending the run."""
    torch._dynamo.config.suppress_errors = True
    accelerator.print("train.compile: compiling the trained modules with inductor (the first steps are slow; "
                      "a module that fails to compile runs eagerly)")


def compile_report(accelerator: Accelerator) -> None:
    if not counters["stats"].get("unique_graphs"):
        accelerator.print("warning: train.compile was on but nothing was compiled (see the dynamo errors above); "
                          "the run went eagerly. Set train.compile=false to silence this.")
