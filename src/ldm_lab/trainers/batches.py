"""The training batches, forever, from where a run stands.

A run reads its batches as one endless sequence, and a resumed run continues it at its data
position (steps done x accumulation) with the batches the uninterrupted run would have seen: a
map-style dataset jumps there inside its epoch (that epoch's seeded shuffle, the batches of it
already seen skipped); a stream (IterableDataset) replays from the start of the epoch its saved
``StreamPosition`` names. Loader generators are seeded per epoch so the workers' augmentations
do not depend on how the run got there.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device

from ..errors import UserError
from ..recipe import Recipe


def set_up_loader(recipe: Recipe, dataloader, accelerator: Accelerator) -> None:
    """Pinned host memory as ``data.pin_memory`` says (default: on CUDA), and a seeded generator
    of its own for a loader that has none."""
    pin = recipe.data.pin_memory if recipe.data.pin_memory is not None else accelerator.device.type == "cuda"
    dataloader.pin_memory = pin
    if dataloader.generator is None:
        # a new DataLoader iterator draws its base seed from this generator, not from the global
        # RNG that noise and dropout use (a resumed run starts a new iterator mid-epoch)
        dataloader.generator = torch.Generator().manual_seed(recipe.seed)


def cycle(accelerator: Accelerator, dataloader, start: int, batches_per_epoch: int, seed: int = 0):
    """Batches forever from batch ``start`` on: a resumed run starts in the epoch it stopped in,
    with that epoch's shuffle order, and skips the batches of it already seen. The epoch is set
    explicitly because a new (or skipping) dataloader counts its epochs from 0 and would replay
    epoch 0's order."""
    epoch, skip = divmod(start, batches_per_epoch)
    while True:
        if getattr(dataloader, "generator", None) is not None:
            # the workers' seeds of this epoch, the same whether the run resumed or not (the shuffle
            # order has its own seed, set by the seedable sampler)
            dataloader.generator.manual_seed(seed + epoch)
        # on the prepared loader, which reaches the shared sampler even when it is sharded across
        # processes (a skipping loader's own set_epoch does not)
        if hasattr(dataloader, "set_epoch"):
            dataloader.set_epoch(epoch)
        dl = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        if dl is not dataloader and hasattr(dl, "set_epoch"):
            dl.set_epoch(epoch)
        skip = 0
        yield from dl
        epoch += 1


class StreamPosition:
    """Where this process is in its stream: the epoch and the batches of it trained on. Saved per
    process with each checkpoint, so a resumed run replays only the current epoch's batches, not
    every epoch before it (a stream has no index to jump to, and datasets' own resume state drops
    its shuffle buffer, which would change the order)."""

    checkpoint_name = "stream_position"  # its own file per process (not numbered among the plugin's states)
    per_process = True  # never another process's file: each process has its own part of the stream

    def __init__(self, world_size: int = 1, rank: int = 0):
        self.epoch, self.batch, self.world_size, self.rank = 0, 0, world_size, rank
        self.valid, self.mismatch = False, None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "world_size": self.world_size, "rank": self.rank}

    def load_state_dict(self, state: dict) -> None:
        # a resumed run on another number of processes splits the stream otherwise: no position in it holds
        if state.get("world_size") != self.world_size:
            self.mismatch = f"it was saved on {state.get('world_size')} processes, this run has {self.world_size}"
        elif state.get("rank") != self.rank:
            self.mismatch = f"process {self.rank} found process {state.get('rank')}'s position"
        else:
            self.epoch, self.batch, self.valid = int(state["epoch"]), int(state["batch"]), True


def cycle_stream(accelerator: Accelerator, dataloader, start: int, position: StreamPosition | None = None,
                 seed: int = 0):
    """Batches of a stream forever, on this process's device, from batch ``start`` on. Each epoch
    reshuffles (datasets' ``set_epoch``); a resumed run replays the stream up to where it stopped
    (read, not trained on), so it sees the batches the uninterrupted run would have: from the
    start of the checkpoint's epoch when ``position`` was restored from it, else from the start.
    The loader's generator is seeded with ``seed + epoch`` before each epoch's iterator is made
    (the workers' seeds, and so their random crops and flips, come from it), so an epoch's batches
    do not depend on how many iterators were made before it."""
    position = position or StreamPosition(accelerator.num_processes)
    if position.valid:  # resume inside the saved epoch
        epoch, replay = position.epoch, position.batch
        accelerator.print(f"stream: resuming in epoch {epoch} after its first {replay} batches (read again, not "
                          "trained on)")
    else:
        epoch, replay = 0, start
        if start:
            why = position.mismatch or "the checkpoint holds no stream position"
            accelerator.print(f"stream: replaying the first {start} batches from the first epoch ({why})")
    if dataloader.generator is None:
        dataloader.generator = torch.Generator()
    while True:
        if hasattr(dataloader.dataset, "set_epoch"):
            dataloader.dataset.set_epoch(epoch)
        dataloader.generator.manual_seed(seed + epoch)
        position.epoch, position.batch = epoch, 0
        n = 0
        it = iter(dataloader)
        while True:
            if replay > 0:  # replayed: read, not trained on, and augmentations must not draw from the RNG
                with torch.random.fork_rng(devices=[]):
                    batch = next(it, None)
            else:
                batch = next(it, None)
            if batch is None:
                break
            n += 1
            position.batch = n
            if replay > 0:
                replay -= 1
                continue
            yield send_to_device(batch, accelerator.device)
        if n == 0:
            raise UserError(f"process {accelerator.process_index} got no full batch from the stream; lower "
                              "train.batch_size, add data, or use fewer processes than the stream has shards.")
        epoch += 1


def endless_batches(recipe: Recipe, accelerator: Accelerator, dataloader, step: int, stream: bool,
                    position: StreamPosition):
    """The run's batches from optimiser step ``step`` on (``step`` x accumulation batches seen)."""
    t = recipe.train
    seen_batches = step * t.gradient_accumulation_steps
    if stream:
        return cycle_stream(accelerator, dataloader, seen_batches, position, recipe.seed)
    batches_per_epoch = len(dataloader)
    if batches_per_epoch == 0:
        raise UserError(f"the dataset has fewer rows than one batch (train.batch_size={t.batch_size} x "
                          f"{accelerator.num_processes} processes); lower train.batch_size or add data.")
    return cycle(accelerator, dataloader, seen_batches, batches_per_epoch, recipe.seed)


def batch_size(batch) -> int:
    """Rows in a batch: the first tensor's or list's length in a dict batch."""
    if isinstance(batch, dict):
        for v in batch.values():
            if isinstance(v, torch.Tensor):
                return v.shape[0]
            if isinstance(v, list):
                return len(v)
    return len(batch)
