"""The data side of the latent text-to-image plugins: rows from the recipe's source, checked
(unusable rows skipped and reported), cached as latents + conditioning records or decoded on the
fly, cut into aspect-ratio buckets, and batched by the one loader builder. A batch holds either
cached posteriors + caption indices (``data.cache_latents``, the default) or images + token ids;
the caption variant a row uses this step is picked here, from the run's BatchRNG.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import torch
from torch.utils.data import Dataset

from ..data import cache as latent_cache
from ..data.bucket_report import bucket_report, format_report
from ..data.bucket_sampler import BucketBatchSampler
from ..data.bucket_transforms import bucket_transform
from ..data.buckets import assign, make_buckets, parse_buckets
from ..data.captions import caption_variants
from ..data.checks import check_rows, to_rgb
from ..data.loader import make_loader
from ..data.masks import as_mask, mask_column, read_mask
from ..data.sizes import image_sizes
from ..data.skip_report import summary
from ..data.sources import load_rows
from ..data.stream_checks import safe_rows
from ..data.transforms import image_transform
from ..errors import UserError
from .base import TrainerPlugin
from .heldout import VAL_SEED_OFFSET, split_rows, training_view, val_batches, validation_loss


class TextImageData(TrainerPlugin):
    """Rows, cache, buckets and batches of a text-to-image plugin (the models it encodes with,
    ``self.vae`` / ``self.conditioner`` / ``self.text_encoder`` / ``self.unet``, are built by the
    plugin before ``build_data``)."""

    stream = None  # this process's share of a streamed dataset (data.streaming)
    val_rows: list[int] = []  # the data.val_n held-out rows (hold_out)
    buckets = None  # aspect-ratio buckets (data.buckets.enabled)

    # -- data --------------------------------------------------------------------------
    def build_data(self, cache_out: Path | None = None) -> None:
        d = self.recipe.data
        rows = self.load_checked_rows()
        if self.stream is not None:
            return
        self.prepare_rows(rows, d.image_column, d.caption_column, cache_out=cache_out)

    def load_checked_rows(self):
        """The recipe's rows (this process's share when streaming), with unusable rows (corrupt or
        too small images, empty captions, duplicates) skipped and reported in RUN/data_report.json.
        A stream is checked lazily (``self.stream_skips`` counts) and its loader set up here."""
        d, acc = self.recipe.data, self.accelerator
        with acc.main_process_first():
            rows = load_rows(d, acc.process_index, acc.num_processes, seed=self.recipe.seed)
        self.stream = None
        if d.streaming:
            if d.buckets.enabled:
                raise UserError("aspect-ratio buckets need the image sizes up front, which a stream does not give; "
                                  "set data.buckets.enabled=false or data.streaming=false.")
            if d.check_rows:
                rows, self.stream_skips = safe_rows(rows, d.image_column, d.caption_column, d.min_image_size,
                                                    d.skip_empty_captions)
            self.stream = rows
            return rows
        if d.check_rows and d.source != "shapes":
            with acc.main_process_first():
                big = len(rows) > 20000  # datasets' map in several processes (cached on disk for the other ranks)
                rows, report = check_rows(rows, d.image_column, d.caption_column, d.min_image_size,
                                          d.skip_empty_captions, d.drop_duplicates,
                                          num_proc=min(8, os.cpu_count() or 1) if big else None)
            if acc.is_main_process:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / "data_report.json").write_text(json.dumps(report, indent=1))
                acc.print(summary(report))
        return rows

    def prepare_rows(self, rows, image_column: str, caption_column: str, fingerprint: str | None = None,
                     cache_out: Path | None = None) -> None:
        """``rows`` -> ``self.cached`` (latents and caption embeddings, encoded once, split across
        processes) when ``data.cache_latents``, else ``self.rows`` with a transform that decodes and
        tokenizes. With ``data.buckets.enabled`` each row is cropped to its aspect-ratio bucket."""
        d = self.recipe.data
        self.rows, self.cached, self.bucket_of_row = rows, None, None
        # the rows as read (images, captions): the held-out split's real images (a view that raw_rows'
        # set_transform below does not change)
        self.checked_rows = rows.with_format(None) if hasattr(rows, "with_format") else rows
        self.buckets = self.bucket_list() if d.buckets.enabled else None
        dropped: dict[str, list] = {}
        if d.cache_latents:
            bucket_of = (lambda hw: (lambda i: None if i is None else self.buckets[i])(
                assign(hw, self.buckets, d.buckets.max_upscale))) if self.buckets else None
            self.cached = latent_cache.build_or_load(
                rows, self.vae, self.conditioner, d, image_column, caption_column, self.accelerator,
                fingerprint=fingerprint, buckets=self.buckets, bucket_of=bucket_of, log=self.accelerator.print,
                out=cache_out)
            if self.buckets:
                index = {tuple(b): i for i, b in enumerate(self.buckets)}
                f = self.vae_factor
                self.bucket_of_row = [index[(s[1] * f, s[2] * f)] for s in self.cached.shapes]
                small = self.cached.manifest.get("too_small_rows", [])
                n_small = self.cached.manifest.get("skipped_reasons", {}).get("too small for its bucket", len(small))
                dropped = {"too small for its bucket": [f"row {x['row']} ({x['size'][0]}x{x['size'][1]})" for x in small]}
                dropped["too small for its bucket"] += [""] * (n_small - len(small))  # counted beyond the listed ones
        else:
            self.rows = self.raw_rows(rows, image_column, caption_column)
        if self.buckets:
            self.write_bucket_report(dropped)

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def bucket_list(self) -> list[tuple[int, int]]:
        """The recipe's aspect-ratio buckets (pixels): sides a multiple of the autoencoder factor ×
        the backbone's latent multiple (the UNet: one latent cell of its deepest level; a
        transformer: its patch size) unless ``data.buckets.step`` says otherwise, which must be a
        multiple of that."""
        b, d = self.recipe.data.buckets, self.recipe.data
        unit = self.vae_factor * self.denoiser.latent_multiple
        step = b.step or unit
        if step % unit:
            what = ("one latent cell of the UNet's deepest level" if self.denoiser.family == "unet" else
                    f"a {self.denoiser.latent_multiple}x{self.denoiser.latent_multiple} latent patch of the "
                    f"{self.denoiser.family} transformer")
            raise UserError(f"data.buckets.step is {step}, which is not a multiple of {unit} px ({what}, the "
                            f"autoencoder downsampling {self.vae_factor}x); choose a multiple of {unit}.")
        if b.sizes:
            try:
                buckets = parse_buckets(b.sizes, step)
            except ValueError as e:
                raise UserError(f"data.buckets.sizes: {e}") from None
        else:
            budget = b.pixel_budget or d.resolution ** 2
            if budget < step * step:
                raise UserError(f"data.buckets.pixel_budget {budget} is smaller than one {step}x{step} bucket; raise it.")
            buckets = make_buckets(budget, step, b.max_aspect)
        most = self.denoiser.max_latent_side
        if most is not None and max(max(hw) for hw in buckets) > most * self.vae_factor:
            h, w = max(buckets, key=max)
            raise UserError(f"bucket {h}x{w} has a side past {most * self.vae_factor} px, the largest the "
                            f"{self.denoiser.family} transformer's position embedding covers (pos_embed_max_size "
                            f"{most // self.denoiser.patch_size} patches); lower data.buckets.max_aspect or "
                            "pixel_budget, or raise model.denoiser.overrides.pos_embed_max_size.")
        return buckets

    def raw_rows(self, rows, image_column: str, caption_column: str):
        """On-the-fly rows: decoded, cropped (centre/random, or to the row's bucket), flipped, and
        every caption variant tokenized (one is picked per step, as in the cached path)."""
        d = self.recipe.data
        encs = self.conditioner.encoders
        caps = d.captions
        vmax = max((len(caption_variants(c, caps)) for c in rows.with_format(None)[caption_column]), default=1) \
            if (caps.shuffle_tags and caps.variants > 1) or _has_lists(rows, caption_column) else 1

        def tokens(captions) -> dict:
            if vmax == 1:
                texts = [caption_variants(c, caps)[0] for c in captions]
                return {key: list(te.tokenize(texts)) for key, te in zip(id_keys("input_ids", encs), encs)}
            out, counts = {key: [] for key in id_keys("variant_ids", encs)}, []
            for c in captions:
                v = caption_variants(c, caps)
                for key, te in zip(out, encs):
                    out[key].append(te.tokenize(v + [v[0]] * (vmax - len(v))))
                counts.append(torch.tensor(len(v)))
            return {**out, "variant_count": counts}

        masked = self.mask_reader(rows)
        if not self.buckets:
            tf = image_transform(d.resolution, d.center_crop, d.random_flip)

            def transform(b):
                if masked is None:
                    return {"pixel_values": [tf(to_rgb(im)) for im in b[image_column]], **tokens(b[caption_column])}
                pairs = [masked(tf, b, j, im) for j, im in enumerate(b[image_column])]
                return {"pixel_values": [x for x, _ in pairs], "loss_mask": [m for _, m in pairs],
                        **tokens(b[caption_column])}

            rows.set_transform(transform)
            return rows

        with self.accelerator.main_process_first():  # the other ranks read datasets' cached result
            sizes = image_sizes(rows.with_format(None), image_column,
                                num_proc=min(8, os.cpu_count() or 1) if len(rows) > 20000 else None)
        self.bucket_of_row = [assign(hw, self.buckets, d.buckets.max_upscale) if hw else None for hw in sizes]
        tfs = [bucket_transform(b, d.random_flip, d.center_crop) for b in self.buckets]
        self._dropped_raw = [i for i, b in enumerate(self.bucket_of_row) if b is None]
        return _BucketRows(rows, self.bucket_of_row, tfs, image_column, caption_column, tokens, masked)

    def mask_reader(self, rows):
        """``data.masked_loss``: a function (transform, batch, j, image) -> (pixels, mask) that crops
        and flips row j's image and its mask together; None without a masked loss."""
        spec = self.recipe.data.masked_loss
        if spec is None:
            return None
        try:
            col = mask_column(rows.column_names, spec.column)
        except ValueError as e:
            raise UserError(f"{e}.") from None
        root = self.recipe.data.path

        def read(tf, b, j, im):
            try:
                m = read_mask(None if col is None else b[col][j], im, root)
            except (OSError, ValueError) as e:
                raise UserError(f"the mask of a row could not be read ({e}); check data.masked_loss.column.") from None
            x, mk = tf(to_rgb(im), as_mask(m))
            return x, mk.as_subclass(torch.Tensor)

        return read

    def end_of_training(self) -> None:
        """Called on every process after the last step: a stream's skipped rows, per process."""
        counter = getattr(self, "stream_skips", None)
        if counter is None:
            return

        report = counter.report()
        rank = self.accelerator.process_index
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / f"data_report-rank{rank}.json").write_text(json.dumps(report, indent=1))
        print(f"[process {rank}] {summary(report)}", flush=True)

    def stream_collate(self):
        """Collate streamed rows (decoded PIL images + captions) into an on-the-fly batch."""
        d = self.recipe.data
        tf = image_transform(d.resolution, d.center_crop, d.random_flip)
        encs = self.conditioner.encoders

        def collate(rows: list[dict]) -> dict:
            caps = [caption_variants(r[d.caption_column], d.captions) for r in rows]
            vmax = max(len(v) for v in caps)
            out = {"pixel_values": torch.stack([tf(to_rgb(r[d.image_column])) for r in rows])}
            if vmax == 1:
                out.update({key: te.tokenize([v[0] for v in caps]) for key, te in zip(id_keys("input_ids", encs), encs)})
            else:
                out.update({key: torch.stack([te.tokenize(v + [v[0]] * (vmax - len(v))) for v in caps])
                            for key, te in zip(id_keys("variant_ids", encs), encs)})
                out["variant_count"] = torch.tensor([len(v) for v in caps])
            return out

        return collate

    def write_bucket_report(self, dropped: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        if self.cached is None:
            dropped = {"too small for its bucket": [f"row {i}" for i in getattr(self, "_dropped_raw", [])]}
        # batches are cut per process (accelerate deals them out: batch k to process k mod W)
        report = bucket_report([b if b is not None else -1 for b in self.bucket_of_row], self.buckets,
                               self.recipe.train.batch_size, dropped={k: v for k, v in dropped.items() if v})
        report["processes"] = self.accelerator.num_processes
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "buckets.json").write_text(json.dumps(report, indent=1))
        self.accelerator.print(format_report(report))

    def train_dataloader(self):
        d = self.recipe.data
        if self.stream is not None:  # already this process's share: the loop does not shard it again
            if d.val_n or self.recipe.eval.features:
                raise UserError("data.val_n (and eval.features, which scores against it) holds out rows of a dataset read whole, and a stream has no fixed rows "
                                "to hold out; set data.streaming=false or data.val_n=0.")
            return make_loader(self.stream, d, self.recipe.train.batch_size, self.stream_collate())
        ds = self.cached if self.cached is not None else self.rows
        ds, bucket_of_row = self.hold_out(ds, self.bucket_of_row if self.buckets else None)
        if self.buckets:
            sampler = BucketBatchSampler(bucket_of_row, self.recipe.train.batch_size, seed=self.recipe.seed)
            return make_loader(ds, d, self.recipe.train.batch_size, batch_sampler=sampler)
        return make_loader(ds, d, self.recipe.train.batch_size)

    def hold_out(self, ds, bucket_of_row=None):
        """``ds`` (or its bucket list) without the ``data.val_n`` held-out rows, which are kept for
        ``validation_loss``."""
        self.val_rows: list[int] = []
        if not self.recipe.data.val_n:
            if self.recipe.eval.features:
                raise UserError("eval.features scores samples against held-out real images, and none are held out; "
                                "set data.val_n (e.g. data.val_n=256) or leave eval.features out.")
            return ds, bucket_of_row
        if self.recipe.eval.features and self.recipe.data.val_n < 2:
            raise UserError(f"eval.features compares image sets, which needs at least 2 held-out rows, and "
                            f"data.val_n is {self.recipe.data.val_n}; set data.val_n=2 or more (e.g. 256).")
        # only rows that train at all can be held out (a bucketed raw row too small for every bucket has None)
        usable = None if bucket_of_row is None else [i for i, b in enumerate(bucket_of_row) if b is not None]
        _, self.val_rows = split_rows(len(ds), self.recipe.data.val_n, self.recipe.seed, usable)
        self.val_data = (ds, bucket_of_row)
        if bucket_of_row is not None:
            return ds, training_view(ds, self.val_rows, bucket_of_row)
        return training_view(ds, self.val_rows), None

    def heldout_examples(self) -> tuple[list, list[str]]:
        """The held-out rows' images (PIL) and first captions, read from the checked rows once (the
        rows are fixed for the run)."""
        if getattr(self, "_heldout_examples", None) is not None:
            return self._heldout_examples
        ds, _ = self.val_data
        source = getattr(ds, "source_rows", None)  # a latent cache: its rows' dataset rows
        d = self.recipe.data
        images, captions = [], []
        for i in self.val_rows:
            row = self.checked_rows[int(source[i]) if source is not None else i]
            c = row[d.caption_column]
            images.append(to_rgb(row[d.image_column]))
            captions.append(c if isinstance(c, str) else c[0])
        self._heldout_examples = images, captions
        return images, captions

    def validation_loss(self) -> dict[str, float]:
        """The deterministic loss on the ``data.val_n`` held-out rows (``heldout.py``)."""
        if not getattr(self, "val_rows", None):
            return {}
        ds, bucket_of_row = self.val_data
        batches = val_batches(ds, self.val_rows, self.recipe.train.batch_size, bucket_of_row,
                              self.recipe.seed + VAL_SEED_OFFSET)
        return {"val_loss": validation_loss(self, batches, self.recipe.seed + VAL_SEED_OFFSET,
                                            list(self.trainable_modules()))}

    def caption_choice(self, batch) -> torch.Tensor:
        """Index (into the cache's captions) of the caption variant each cached row uses this step."""
        v = batch["variants"]
        if v.shape[1] == 1:
            return v[:, 0]
        k = (self.rng.rand(v.shape[0]).cpu() * batch["variant_count"].cpu()).long()
        return v.cpu()[torch.arange(v.shape[0]), k]

    def token_choice(self, batch) -> torch.Tensor:
        """Token ids (B, L) of the caption variant each on-the-fly row uses this step (first encoder)."""
        return self.token_choices(batch)[0]

    def token_choices(self, batch) -> list[torch.Tensor]:
        """Per text encoder, the token ids (B, L) of the caption variant each on-the-fly row uses this
        step (one draw: every encoder reads the same variant)."""
        encs = self.conditioner.encoders
        if "variant_ids" not in batch:
            return [batch[key] for key in id_keys("input_ids", encs)]
        v = batch["variant_ids"]
        k = (self.rng.rand(v.shape[0]).cpu() * batch["variant_count"].cpu()).long()
        return [batch[key][torch.arange(v.shape[0]), k.to(v.device)] for key in id_keys("variant_ids", encs)]


def id_keys(name: str, encoders) -> list[str]:
    """Batch keys of the token ids per text encoder: ``name`` for the first, ``name_k`` after it."""
    return [name] + [f"{name}_{k}" for k in range(1, len(encoders))]


class _BucketRows(Dataset):
    """On-the-fly rows cropped to their aspect-ratio bucket (rows without one are never sampled)."""

    def __init__(self, rows, bucket_of_row, transforms, image_column, caption_column, tokens, masked=None):
        self.rows, self.bucket_of_row, self.tfs = rows, bucket_of_row, transforms
        self.icol, self.ccol, self.tokens, self.masked = image_column, caption_column, tokens, masked

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        tok = {k: v[0] for k, v in self.tokens([row[self.ccol]]).items()}
        tf = self.tfs[self.bucket_of_row[i]]
        if self.masked is not None:
            x, m = self.masked(tf, {k: [v] for k, v in row.items()}, 0, row[self.icol])
            return {"pixel_values": x, "loss_mask": m, **tok}
        return {"pixel_values": tf(to_rgb(row[self.icol])), **tok}


def _has_lists(rows, column: str) -> bool:
    f = rows.features.get(column)
    return isinstance(f, (datasets.Sequence, list)) or type(f).__name__ == "List"
