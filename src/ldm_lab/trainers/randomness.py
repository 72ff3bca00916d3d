"""Training randomness that does not depend on the number of processes.

Every process holds the same generator (seeded from the recipe's seed) and draws the noise,
timesteps and dropout decisions of the *global* batch, then keeps its own slice: process ``r``
of ``W``, with local batch ``B``, keeps rows ``[r*B, (r+1)*B)``. Accelerate's batch sharding
gives process ``r`` exactly those rows of the global batch (batch ``k`` of the shared shuffle
order goes to process ``k mod W``), so a run on 2 processes with batch B draws the same noise
for the same image as a run on 1 process with batch 2B, and the two make the same update (up
to the order of floating-point sums). The generators stay in step because every process draws
the same amount every step; the state is saved in checkpoints (accelerate custom object), so a
resumed run continues the same stream.

Drawing W times the local noise costs nothing next to the UNet step.
"""

from __future__ import annotations

import torch


class BatchRNG:
    def __init__(self, seed: int, device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1):
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        gen_device = self.device if self.device.type in ("cpu", "cuda") else torch.device("cpu")
        self.generator = torch.Generator(device=gen_device).manual_seed(seed)

    def _mine(self, full: torch.Tensor, n: int) -> torch.Tensor:
        return full[self.rank * n:(self.rank + 1) * n].to(self.device)

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal of ``shape`` (``shape[0]`` = this process's batch)."""
        n = shape[0]
        full = torch.randn((n * self.world_size, *shape[1:]), generator=self.generator,
                           device=self.generator.device, dtype=dtype)
        return self._mine(full, n)

    def rand(self, n: int) -> torch.Tensor:
        """Uniform [0, 1) of shape (n,)."""
        return self._mine(torch.rand(n * self.world_size, generator=self.generator, device=self.generator.device), n)

    def randint(self, high: int, n: int) -> torch.Tensor:
        """Uniform integers in [0, high) of shape (n,), int64."""
        full = torch.randint(0, high, (n * self.world_size,), generator=self.generator, device=self.generator.device)
        return self._mine(full, n)

    def draw(self, fn, n: int) -> torch.Tensor:
        """This process's ``n`` values of ``fn(total, generator)``, a draw of ``total`` values for the
        global batch from the shared generator (a library's sampler, e.g. a timestep density)."""
        return self._mine(fn(n * self.world_size, self.generator), n)

    # accelerate's register_for_checkpointing protocol
    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
