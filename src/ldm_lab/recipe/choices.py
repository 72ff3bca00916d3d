"""Names a recipe (and the CLI) chooses from, defined once at the bottom of the stack.

The sampler registry: each name maps to the diffusers scheduler class that implements it, the
keyword arguments that make it that sampler, and its usual number of steps. ``sampling`` turns a
name into a scheduler built from the training objective's config; the recipe schema and the CLI
take their choices from here, so a new sampler is one entry.

The shapes world's vocabulary: the colours, shapes, sizes, positions and backgrounds a shapes
dataset draws from (with the values ``ldm_lab.data.shapes`` renders them with), so the recipe
schema checks ``data.shapes.colors`` / ``data.shapes.shapes`` without importing the data layer.
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
# Samplers of a flow-matching objective (the velocity it predicts): the same names where a flow
# variant exists; each is built with the objective's shift.
FLOW_SAMPLERS: dict[str, SamplerEntry] = {
    "euler": SamplerEntry("FlowMatchEulerDiscreteScheduler", {}, 28),
    "dpm++": SamplerEntry("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                         "use_flow_sigmas": True, "prediction_type": "flow_prediction"}, 20),
    "unipc": SamplerEntry("UniPCMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}, 20),
}
SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLERS)
SamplerName = Literal[SAMPLER_NAMES]  # type: ignore[valid-type]  # the schema's type for a sampler key

# Training objectives (``noise.objective``): each name is one class in ``diffusion.OBJECTIVES``.
OBJECTIVE_NAMES: tuple[str, ...] = ("ddpm", "flow")
ObjectiveName = Literal[OBJECTIVE_NAMES]  # type: ignore[valid-type]


# Shapes-world palettes. The default world trains on the first entries; the extra entries (pink, heart,
# sparkle) exist so fine-tuning demos can teach the base a concept it has never seen.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 40),
    "purple": (140, 50, 190),
    "orange": (250, 140, 30),
    "pink": (250, 130, 210),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "star", "heart", "sparkle")  # sparkle: a 4-pointed star
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top": (0.5, 0.25),
    "top right": (0.75, 0.25),
    "left": (0.25, 0.5),
    "center": (0.5, 0.5),
    "right": (0.75, 0.5),
    "bottom left": (0.25, 0.75),
    "bottom": (0.5, 0.75),
    "bottom right": (0.75, 0.75),
}
# Circumradius as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.13, "large": 0.22}

DEFAULT_COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
DEFAULT_SHAPES = ("circle", "square", "triangle", "star")
