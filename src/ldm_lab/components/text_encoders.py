"""Frozen text encoders: CLIP and T5 (transformers) and OpenCLIP (open_clip text tower).

Each is loaded from a hub id or a local dir, or built from a config (tests, new models),
and wrapped as a ``TextEncoder`` that turns prompts into the token states a UNet
cross-attends to plus a pooled vector.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from open_clip.tokenizer import SimpleTokenizer
from torch import nn
from transformers import (
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
)

from ..recipe.schema import TextEncoderSpec
from .record import Conditioning


def write_clip_bpe_vocab(out_dir: str | Path, model_max_length: int = 77) -> Path:
    """Write the real CLIP BPE vocabulary (shipped inside open_clip_torch) as a transformers
    CLIPTokenizer dir: vocab.json, merges.txt and tokenizer_config.json. Works offline."""

    sp = SimpleTokenizer()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(k, k): v for k, v in sp.encoder.items()}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    merges = sorted(sp.bpe_ranks.items(), key=lambda kv: kv[1])
    with open(out / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for (a, b), _ in merges:
            f.write(f"{a} {b}\n")

    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=model_max_length,
                        pad_token="<|endoftext|>")
    tok.save_pretrained(out)
    return out


class TextEncoder(nn.Module):
    """Prompts -> a conditioning record (token states, mask, pooled vector). ``kind`` is clip, t5
    or openclip. T5 runs with its attention mask (padding is not attended to) and the record
    carries it; CLIP and OpenCLIP read the whole padded sequence, as Stable Diffusion does."""

    def __init__(self, kind: str, model: nn.Module, tokenizer, max_length: int, hidden_layer: int = -1,
                 use_mask: bool | None = None):
        super().__init__()
        self.kind, self.model, self.tokenizer, self.max_length = kind, model, tokenizer, max_length
        self.hidden_layer = hidden_layer  # -1: the last state (after the final norm); -k: hidden_states[-k]
        # T5 reads its mask by default (SD3's does not); a CLIP reads one where the backbone's pipeline
        # passes the tokenizer's mask (PixArt)
        self.use_mask = kind == "t5" if use_mask is None else use_mask

    @property
    def hidden_size(self) -> int:
        if self.kind == "openclip":
            return int(self.model.ln_final.normalized_shape[0])
        return int(self.model.config.hidden_size if hasattr(self.model.config, "hidden_size")
                   else self.model.config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        if self.kind == "openclip":
            return self.tokenizer(prompts, context_length=self.max_length)
        return self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                              return_tensors="pt").input_ids

    def encode_ids(self, ids: torch.Tensor) -> Conditioning:
        ids = ids.to(self.device)
        if self.kind == "clip":
            deep, kw = self.hidden_layer != -1, {}
            if self.use_mask:  # the tokenizer's mask: every token up to the first end-of-text (= padding)
                eos = ids == self.tokenizer.eos_token_id
                mask = (eos.long().cumsum(1) - eos.long()) == 0
                kw["attention_mask"] = mask.long()
            out = self.model(ids, output_hidden_states=True, **kw) if deep else self.model(ids, **kw)
            states = out.hidden_states[self.hidden_layer] if deep else out.last_hidden_state
            # the projected end-of-text state with a projection head (SD3), else CLIP's pooler output
            return Conditioning(states, mask if self.use_mask else None,
                                out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output)
        if self.kind == "t5":
            mask = ids != self.tokenizer.pad_token_id
            out = self.model(ids, attention_mask=mask.long() if self.use_mask else None,
                             output_hidden_states=self.hidden_layer != -1)
            h = out.last_hidden_state if self.hidden_layer == -1 else out.hidden_states[self.hidden_layer]
            m = mask[..., None].to(h.dtype)
            return Conditioning(h, mask if self.use_mask else None, (h * m).sum(1) / m.sum(1).clamp(min=1))
        return self._encode_openclip(ids)

    def forward(self, prompts: list[str]) -> Conditioning:
        return self.encode_ids(self.tokenize(prompts))

    def _encode_openclip(self, ids: torch.Tensor) -> Conditioning:
        # Penultimate layer states, as Stable Diffusion 2.x conditions on them.
        m = self.model
        x = m.token_embedding(ids) + m.positional_embedding[: ids.shape[1]]
        attn_mask = m.attn_mask[: ids.shape[1], : ids.shape[1]] if m.attn_mask is not None else None
        blocks = m.transformer.resblocks
        batch_first = getattr(m.transformer, "batch_first", True)
        if not batch_first:
            x = x.permute(1, 0, 2)
        for blk in blocks[:-1]:
            x = blk(x, attn_mask=attn_mask)
        if not batch_first:
            x = x.permute(1, 0, 2)
        h = m.ln_final(x)
        pooled = h[torch.arange(h.shape[0]), ids.argmax(dim=-1)]
        return Conditioning(h, None, pooled)


def _load_openclip(spec: TextEncoderSpec):
    import open_clip  # here: only the openclip kind needs it, and it takes seconds to import

    if spec.config is not None:
        cfg = dict(spec.config)
        model = open_clip.model.TextTransformer(**cfg)
        tokenizer = open_clip.get_tokenizer("ViT-B-32")
        return model, tokenizer, cfg.get("context_length", 77)
    ref = spec.pretrained
    if Path(ref).is_dir():
        model_name = json.loads((Path(ref) / "open_clip_config.json").read_text())["model_name"]
        clip, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=str(Path(ref) / "open_clip_model.safetensors"))
    else:
        # "hf-hub:org/name" or "ViT-H-14:laion2b_s32b_b79k"
        name, _, tag = ref.partition(":") if not ref.startswith("hf-hub:") else (ref, "", "")
        clip, _, _ = open_clip.create_model_and_transforms(name, pretrained=tag or None)
        model_name = name
    tokenizer = open_clip.get_tokenizer(model_name)
    text = clip.transformer, clip.token_embedding, clip.positional_embedding, clip.ln_final, clip.attn_mask
    holder = nn.Module()
    holder.transformer, holder.token_embedding, holder.positional_embedding, holder.ln_final = text[:4]
    holder.register_buffer("attn_mask", text[4], persistent=False)  # moves with .to(device)
    return holder, tokenizer, clip.context_length


def load_text_encoder(spec: TextEncoderSpec, use_mask: bool | None = None) -> TextEncoder:
    """Build the text encoder a recipe names (hub id, local dir or config). ``use_mask``: whether a
    T5 runs with its attention mask (the denoiser family decides; default yes)."""
    sub = {"subfolder": spec.subfolder} if spec.subfolder else {}
    rev = {"revision": spec.revision} if spec.revision else {}
    if spec.kind == "openclip":
        model, tokenizer, ctx = _load_openclip(spec)
        enc = TextEncoder("openclip", model, tokenizer, spec.max_length or ctx)
    else:

        model_cls, cfg_cls = (CLIPTextModel, CLIPTextConfig) if spec.kind == "clip" else (T5EncoderModel, T5Config)
        if spec.kind == "clip" and spec.projection:
            model_cls = CLIPTextModelWithProjection  # a missing projection head starts from the run's seed
        if spec.config is not None:
            model = model_cls(cfg_cls(**spec.config))
        else:
            model = model_cls.from_pretrained(spec.pretrained, **sub, **rev)
        if spec.kind == "t5" and use_mask is not False:  # a stock pipeline holding it passes the mask too
            model.config.use_attention_mask = True
        tok_ref = spec.tokenizer or spec.pretrained
        # a pipeline's text_encoder_2 has its tokenizer in tokenizer_2 (SD3, SDXL)
        in_pipeline = (spec.subfolder or "").startswith("text_encoder")
        tok_sub = {} if spec.tokenizer else ({"subfolder": spec.subfolder.replace("text_encoder", "tokenizer", 1)}
                                             if in_pipeline else sub)
        if tok_ref is None:
            raise ValueError("a text encoder built from a config needs 'tokenizer' (a tokenizer dir or hub id)")
        tokenizer = AutoTokenizer.from_pretrained(tok_ref, **tok_sub, **rev)
        max_len = spec.max_length or min(tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", 512))
        enc = TextEncoder(spec.kind, model, tokenizer, int(max_len), spec.hidden_layer, use_mask)
    if not spec.trainable:
        enc.requires_grad_(False)
        enc.eval()
    return enc
