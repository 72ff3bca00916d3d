"""The conditioner: runs the frozen text encoder into a conditioning record and defines the null
condition once.

Classifier-free guidance trains with caption dropout; the dropped caption is the encoding of
the empty prompt. The raw path, the cached path and sampling all take it from
``Conditioner.null`` so they cannot disagree; a stock pipeline's ``negative_prompt=""`` encodes
to the same tensor because it uses the same tokenizer padding (tested). A record's fields
(token states, mask, pooled vector) are dropped together.
"""

from __future__ import annotations

import torch

from .components.record import Conditioning
from .components.text_encoders import TextEncoder


class Conditioner:
    def __init__(self, text_encoder: TextEncoder):
        self.text_encoder = text_encoder
        self._null: Conditioning | None = None

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        """The record (B rows) of ``prompts``."""
        return self.text_encoder(list(prompts))

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor) -> Conditioning:
        return self.text_encoder.encode_ids(ids)

    def null(self) -> Conditioning:
        """The null condition (one row): the encoding of the empty prompt."""
        if self._null is None:
            self._null = self.encode([""])
        return self._null

    def drop(self, cond: Conditioning, p: float, generator: torch.Generator | None = None, rng=None) -> Conditioning:
        """Replace each row of ``cond`` by the null condition with probability ``p`` (drawn from
        ``rng``, a training BatchRNG, when given)."""
        if p <= 0:
            return cond
        u = rng.rand(len(cond)).cpu() if rng is not None else torch.rand(len(cond), generator=generator, device="cpu")
        return cond.where(u >= p, self.null())
