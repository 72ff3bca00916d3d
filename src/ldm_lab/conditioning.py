"""The conditioner: runs the frozen text encoder and defines the null condition once.

Classifier-free guidance trains with caption dropout; the dropped caption is the encoding of
the empty prompt. The raw path, the cached path and sampling all take it from
``Conditioner.null`` so they cannot disagree; a stock pipeline's ``negative_prompt=""`` encodes
to the same tensor because it uses the same tokenizer padding (tested).
"""

from __future__ import annotations

import torch

from .components.text_encoders import TextEncoder


class Conditioner:
    def __init__(self, text_encoder: TextEncoder):
        self.text_encoder = text_encoder
        self._null: torch.Tensor | None = None

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Token states (B, L, D) for ``prompts``."""
        return self.text_encoder(list(prompts)).hidden_states

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder.encode_ids(ids).hidden_states

    def null(self) -> torch.Tensor:
        """The null condition (1, L, D): the encoding of the empty prompt."""
        if self._null is None:
            self._null = self.encode([""])
        return self._null

    def drop(self, cond: torch.Tensor, p: float, generator: torch.Generator | None = None, rng=None) -> torch.Tensor:
        """Replace each row of ``cond`` by the null condition with probability ``p`` (drawn from
        ``rng``, a training BatchRNG, when given)."""
        if p <= 0:
            return cond
        u = rng.rand(cond.shape[0]).cpu() if rng is not None else torch.rand(cond.shape[0], generator=generator, device="cpu")
        keep = u >= p
        null = self.null().to(cond.device, cond.dtype)
        return torch.where(keep.to(cond.device)[:, None, None], cond, null)
