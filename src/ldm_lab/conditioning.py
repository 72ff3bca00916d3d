"""The conditioner: runs the frozen text encoder(s) into a conditioning record and defines the null
condition once.

Classifier-free guidance trains with caption dropout; the dropped caption is the encoding of
the empty prompt. The raw path, the cached path and sampling all take it from
``Conditioner.null`` so they cannot disagree; a stock pipeline's ``negative_prompt=""`` encodes
to the same tensor because it uses the same tokenizer padding (tested). A record's fields
(token states, mask, pooled vector) are dropped together.

With several text encoders (SD3: two CLIPs and a T5) each encoder gives its own record (its
*part*); each part is dropped on its own, with the encoder's own probability (``dropout`` of its
recipe entry, else ``data.caption_dropout``), to the encoder's part of the null condition; then
the denoiser's ``combine`` rule joins the parts into the one record the backbone reads. The
latent cache stores the parts, so the cached path drops exactly as the raw path does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .components.record import Conditioning
from .components.text_encoders import TextEncoder


def _one(parts: list[Conditioning]) -> Conditioning:
    if len(parts) != 1:
        raise ValueError("several text encoders need a combine rule (the denoiser adapter's)")
    return parts[0]


class Conditioner:
    def __init__(self, text_encoders: TextEncoder | Sequence[TextEncoder],
                 combine: Callable[[list[Conditioning]], Conditioning] | None = None,
                 dropouts: Sequence[float | None] | None = None):
        self.encoders = [text_encoders] if isinstance(text_encoders, TextEncoder) else list(text_encoders)
        self.text_encoder = self.encoders[0]
        self.combine = combine or _one
        self.dropouts = list(dropouts) if dropouts is not None else [None] * len(self.encoders)
        self._null: list[Conditioning] | None = None

    # -- encoding ----------------------------------------------------------------------
    @torch.no_grad()
    def encode_parts(self, prompts: list[str]) -> list[Conditioning]:
        """One record (B rows) of ``prompts`` per text encoder."""
        return [te(list(prompts)) for te in self.encoders]

    @torch.no_grad()
    def encode_ids_parts(self, ids: Sequence[torch.Tensor]) -> list[Conditioning]:
        """One record per text encoder from its token ids (``ids[k]``: encoder k's)."""
        return [te.encode_ids(i) for te, i in zip(self.encoders, ids)]

    def encode(self, prompts: list[str]) -> Conditioning:
        """The record (B rows) the denoiser reads for ``prompts``."""
        return self.combine(self.encode_parts(prompts))

    def encode_ids(self, ids: torch.Tensor) -> Conditioning:
        """The record of the first (only) encoder's token ids."""
        return self.combine(self.encode_ids_parts([ids]))

    def tokenize(self, prompts: list[str]) -> list[torch.Tensor]:
        """Token ids of ``prompts`` for every encoder."""
        return [te.tokenize(list(prompts)) for te in self.encoders]

    # -- the null condition and dropout ------------------------------------------------
    def null_parts(self) -> list[Conditioning]:
        """Each encoder's null condition (one row): its encoding of the empty prompt."""
        if self._null is None:
            self._null = self.encode_parts([""])
        return self._null

    def null(self) -> Conditioning:
        """The null condition (one row) the denoiser reads: the empty prompt through every encoder."""
        return self.combine(self.null_parts())

    def drop(self, cond: Conditioning, p: float, generator: torch.Generator | None = None, rng=None) -> Conditioning:
        """Replace each row of a (combined) record by the null condition with probability ``p``
        (drawn from ``rng``, a training BatchRNG, when given): all encoders at once."""
        if p <= 0:
            return cond
        return cond.where(_keep(len(cond), p, generator, rng), self.null())

    def drop_parts(self, parts: list[Conditioning], p: float, rng=None) -> list[Conditioning]:
        """Each encoder's rows replaced by its null with its own probability (its ``dropout``, else
        ``p``), one draw per encoder in order; encoders with probability 0 draw nothing."""
        out = []
        for part, null, q in zip(parts, self.null_parts(), self.dropouts):
            q = p if q is None else q
            out.append(part if q <= 0 else part.where(_keep(len(part), q, None, rng), null))
        return out


def _keep(n: int, p: float, generator, rng) -> torch.Tensor:
    u = rng.rand(n).cpu() if rng is not None else torch.rand(n, generator=generator, device="cpu")
    return u >= p
