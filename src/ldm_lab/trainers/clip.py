"""Stage one: a CLIP text encoder trained contrastively against images (transformers CLIPModel).

The tokenizer is the real CLIP BPE vocabulary shipped inside open_clip_torch, written out as a
transformers CLIPTokenizer, so stock diffusers pipelines load and use it like SD's.
The saved artifact is a ``text_encoder`` (CLIPTextModel) dir and a ``tokenizer`` dir; the whole
model is saved alongside as ``clip`` (CLIPModel + CLIPProcessor) for scoring: the feature space
of FID / KID / CMMD and the CLIP score (evaluation/image_metrics.py).

The contrastive loss is open_clip's ``ClipLoss`` over the *global* batch: every process gathers
all processes' embeddings (with gradients), so the negatives, the loss and the update are those
of one process with the whole batch, whatever the process count.

Plugin options: ``max_length`` (tokens, default 20), ``text`` / ``vision`` (CLIP config
overrides), ``projection_dim``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from open_clip.loss import ClipLoss
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextModel, CLIPTokenizer

from ..components import write_clip_bpe_vocab
from ..data.checks import to_rgb
from ..data.loader import make_loader
from ..data.sources import load_rows
from ..data.transforms import image_transform
from ..recipe.plugins import CLIPOptions
from .base import TrainerPlugin
from .registry import register


def clip_processor(tokenizer, resolution: int) -> CLIPProcessor:
    """The processor that prepares images as ``image_transform`` did in training: resized and
    centre-cropped to ``resolution``, scaled to [-1, 1] (mean 0.5, std 0.5 per channel)."""
    images = CLIPImageProcessor(do_resize=True, size={"shortest_edge": resolution}, do_center_crop=True,
                                crop_size={"height": resolution, "width": resolution}, do_rescale=True,
                                do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3, do_convert_rgb=True)
    return CLIPProcessor(image_processor=images, tokenizer=tokenizer)


@register
class ClipTrainer(TrainerPlugin):
    name = "clip"

    def setup(self) -> None:
        self.refuse_single_file("a CLIP run writes a text encoder")

        self.opts = CLIPOptions.model_validate(self.recipe.plugin)
        d = self.recipe.data
        tok_dir = self.run_dir / "tokenizer"
        if self.accelerator.is_main_process:
            write_clip_bpe_vocab(tok_dir, model_max_length=self.opts.max_length)
        self.accelerator.wait_for_everyone()
        self.tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
        text = dict(vocab_size=len(self.tokenizer),
                    max_position_embeddings=self.opts.max_length, bos_token_id=self.tokenizer.bos_token_id,
                    eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                    **self.opts.text)
        vision = dict(image_size=d.resolution, **self.opts.vision)
        cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=self.opts.projection_dim)
        self.clip = CLIPModel(cfg)
        with self.accelerator.main_process_first():
            self.rows = load_rows(d)
        tf = image_transform(d.resolution, d.center_crop, d.random_flip)
        icol, ccol = d.image_column, d.caption_column
        tok = self.tokenizer

        def transform(b):
            ids = tok(b[ccol], padding="max_length", max_length=self.opts.max_length, truncation=True,
                      return_tensors="pt").input_ids
            return {"pixel_values": [tf(to_rgb(im)) for im in b[icol]], "input_ids": list(ids)}

        self.rows.set_transform(transform)
        acc = self.accelerator
        self.contrastive = ClipLoss(local_loss=False, gather_with_grad=True, rank=acc.process_index,
                                    world_size=acc.num_processes)

    def trainable_modules(self):
        return {"clip": self.clip}

    def train_dataloader(self):
        return make_loader(self.rows, self.recipe.data, self.recipe.train.batch_size)

    def loss(self, batch):
        out = self.clip(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])
        loss = self.contrastive(out.image_embeds, out.text_embeds, self.unwrap(self.clip).logit_scale.exp())
        with torch.no_grad():
            acc = (out.logits_per_text.argmax(-1) == torch.arange(len(out.logits_per_text), device=out.logits_per_text.device)).float().mean()
        return loss, {"retrieval_acc": acc.detach()}

    @torch.no_grad()
    def retrieval_accuracy(self, n: int = 256) -> float:
        """Text->image top-1 accuracy on ``n`` training rows (batch of n candidates)."""
        clip = self.unwrap(self.clip)
        clip.eval()
        rows = [self.rows[i] for i in range(min(n, len(self.rows)))]
        ids = torch.stack([r["input_ids"] for r in rows]).to(self.accelerator.device)
        px = torch.stack([r["pixel_values"] for r in rows]).to(self.accelerator.device)
        logits = clip(input_ids=ids, pixel_values=px).logits_per_text
        caps = ids.tolist()
        # a caption that appears twice matches either image
        hits = [caps[int(j)] == caps[i] for i, j in enumerate(logits.argmax(-1))]
        clip.train()
        return sum(hits) / len(hits)

    def validate(self, step: int) -> dict[str, float]:
        acc = self.retrieval_accuracy()
        self.accelerator.print(f"step {step}: text->image retrieval top-1 {acc:.3f} (256 candidates)")
        return {"val_retrieval_acc": acc}

    def save(self, out_dir: Path) -> None:
        clip = self.unwrap(self.clip)

        text = CLIPTextModel(clip.config.text_config)
        getattr(text, "text_model", text).load_state_dict(clip.text_model.state_dict())  # transformers 4 and 5 layouts
        text.save_pretrained(out_dir / "text_encoder")
        self.tokenizer.save_pretrained(out_dir / "tokenizer")
        # the whole model with a processor that prepares images as training did: the image-metrics
        # feature extractor and CLIP-score model (evaluation/image_metrics.py)
        clip.save_pretrained(out_dir / "clip")
        clip_processor(self.tokenizer, self.recipe.data.resolution).save_pretrained(out_dir / "clip")
        acc = self.retrieval_accuracy()
        (out_dir / "metrics.json").write_text(json.dumps({"retrieval_top1_256": acc}, indent=2))
        if self.recipe.output.export_to:
            dst = Path(self.recipe.output.export_to)
            shutil.rmtree(dst, ignore_errors=True)
            dst.mkdir(parents=True)
            for part in ("text_encoder", "tokenizer", "clip"):
                shutil.copytree(out_dir / part, dst / part)
