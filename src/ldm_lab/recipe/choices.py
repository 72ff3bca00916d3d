"""Names a recipe (and the CLI) chooses from, defined once at the bottom of the stack.

The sampler registry: each name maps to the diffusers scheduler class that implements it, the
keyword arguments that make it that sampler, and its usual number of steps. ``sampling`` turns a
name into a scheduler built from the training objective's config; the recipe schema and the CLI
take their choices from here, so a new sampler is one entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class SamplerEntry:
    scheduler: str  # a diffusers scheduler class name
    kwargs: dict[str, Any] = field(default_factory=dict)
    default_steps: int = 20


SAMPLERS: dict[str, SamplerEntry] = {
    "ddpm": SamplerEntry("DDPMScheduler", {}, 1000),
    "ddim": SamplerEntry("DDIMScheduler", {}, 50),
    "dpm++": SamplerEntry("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, 20),
    "euler": SamplerEntry("EulerDiscreteScheduler", {}, 30),
    "unipc": SamplerEntry("UniPCMultistepScheduler", {}, 20),
}
SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLERS)
SamplerName = Literal[SAMPLER_NAMES]  # type: ignore[valid-type]  # the schema's type for a sampler key
