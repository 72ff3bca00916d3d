"""The conditioning record: what the frozen text encoders produce, what the latent cache stores and
what every denoiser adapter reads, the same on every path.

``states`` (B, L, D) are the token states cross-attention (or joint attention) reads; ``mask``
(B, L, bool) marks real tokens for encoders that run with an attention mask (T5), None where the
states are read whole (CLIP, as Stable Diffusion conditions); ``pooled`` (B, P) is the pooled
vector (CLIP's projected end-of-text state, the masked mean for T5), None where nothing gave one.
Rows index, move and select together, so the cached path, the on-the-fly path and the null
condition cannot disagree on one of the three.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Conditioning:
    states: torch.Tensor
    mask: torch.Tensor | None = None
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.states.shape[0]

    def __getitem__(self, index) -> Conditioning:
        """Rows ``index`` (an index tensor, a slice or an int kept as one row) of every field."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Conditioning(_pick(self.states, index), _pick(self.mask, index), _pick(self.pooled, index))

    def to(self, device=None, dtype: torch.dtype | None = None) -> Conditioning:
        """On ``device``; ``dtype`` applies to the floating fields (the mask stays bool)."""
        return Conditioning(self.states.to(device, dtype),
                            None if self.mask is None else self.mask.to(device),
                            None if self.pooled is None else self.pooled.to(device, dtype))

    @property
    def device(self) -> torch.device:
        return self.states.device

    def where(self, keep: torch.Tensor, other: Conditioning) -> Conditioning:
        """Row b from ``self`` where ``keep[b]``, else from ``other`` (one row, broadcast: the null
        condition for caption dropout)."""
        keep = keep.to(self.states.device)
        return Conditioning(
            torch.where(keep[:, None, None], self.states, other.states.to(self.states.device, self.states.dtype)),
            _where(keep, self.mask, other.mask), _where(keep, self.pooled, other.pooled))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields that are set, by name (what the latent cache writes)."""
        return {k: v for k, v in (("states", self.states), ("mask", self.mask), ("pooled", self.pooled))
                if v is not None}

    @classmethod
    def cat(cls, records: list[Conditioning]) -> Conditioning:
        """Rows of several records one after another (encoding in chunks)."""
        if not records:
            raise ValueError("no records to concatenate")
        return cls(torch.cat([r.states for r in records]),
                   None if records[0].mask is None else torch.cat([r.mask for r in records]),
                   None if records[0].pooled is None else torch.cat([r.pooled for r in records]))


def _pick(t: torch.Tensor | None, index):
    return None if t is None else t[index.to(t.device) if isinstance(index, torch.Tensor) else index]


def _where(keep: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None):
    if a is None or b is None:  # records of one conditioner have the same fields
        if (a is None) != (b is None):
            raise ValueError("records with different fields cannot be mixed")
        return None
    b = b.to(a.device, a.dtype)
    return torch.where(keep.reshape(-1, *([1] * (a.ndim - 1))), a, b)
