"""The recipe's ``data`` section: sources, a mix of datasets, buckets, caption augmentation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .choices import COLORS, SHAPES
from .strict import Strict


class ShapesSourceSpec(Strict):
    n: int = Field(20000, ge=1)
    seed: int = 0
    resolution: int = 64
    colors: list[str] | None = None  # default: the six base colours (pink is the extra one)
    shapes: list[str] | None = None  # default: circle, square, triangle, star (heart is extra)
    background_noise: float = Field(0.0, ge=0, le=128)  # std (0-255) of smooth colour blotches on the background

    @model_validator(mode="after")
    def _known(self):
        for name, vals, allowed in (("colors", self.colors, COLORS), ("shapes", self.shapes, SHAPES)):
            bad = [v for v in vals or [] if v not in allowed]
            if bad:
                raise ValueError(f"{name} has {bad[0]!r}; choose from {', '.join(allowed)}")
        return self


SOURCES = ("shapes", "imagefolder", "hub", "parquet", "arrow", "webdataset")


class SourceSpec(Strict):
    """One dataset of a mix (``data.mix``): rows of every member are renamed to the top-level
    ``data.image_column`` / ``data.caption_column`` and interleaved by ``weight`` (or
    concatenated when no member has a weight); ``repeats`` lists a member that many times."""

    source: Literal["shapes", "imagefolder", "hub", "parquet", "arrow", "webdataset"] = "imagefolder"
    path: str | None = None  # dir, file, glob of shards, or hub dataset id
    split: str = "train"
    image_column: str | None = None  # default: data.image_column (webdataset: jpg/jpeg/png/webp)
    caption_column: str | None = None  # default: data.caption_column (webdataset: txt, or json's caption)
    weight: float | None = Field(None, gt=0)
    repeats: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _path_needed(self):
        if self.source != "shapes" and not self.path:
            raise ValueError(f"source '{self.source}' needs a path")
        return self


class BucketSpec(Strict):
    """Aspect-ratio buckets: each image goes to the bucket nearest its aspect ratio, is resized to
    cover it (never upscaled by more than ``max_upscale``) and centre-cropped; a batch holds one
    bucket."""

    enabled: bool = False
    pixel_budget: int | None = Field(None, ge=64)  # max height*width; default data.resolution**2
    step: int | None = Field(None, ge=1)  # side multiple in pixels; default: one latent cell of the UNet's deepest level
    max_aspect: float = Field(2.0, ge=1)
    max_upscale: float = Field(1.0, ge=1)  # images that would need more upscaling are dropped (counted)
    sizes: list[str] | None = None  # an explicit bucket list ("HxW" each) instead of the generated one


class CaptionSpec(Strict):
    """Caption augmentation. Works with cached embeddings: every caption gets ``variants``
    deterministic variants (tag shuffles), all encoded once; a step picks one at random. A caption
    column holding a list of strings gives several captions per image (all kept as variants)."""

    shuffle_tags: bool = False  # comma-separated tags in shuffled order (kohya's shuffle_caption)
    keep_tags: int = Field(0, ge=0)  # leading tags that keep their place
    separator: str = ","
    variants: int = Field(1, ge=1)  # shuffled variants per caption (1 = the caption as written)


class MaskedLossSpec(Strict):
    """A per-pixel loss mask: 1 where the image is learned, 0 where it is not (a subject cut-out, a
    watermark left out), downsampled to the latent grid (area average) to weight the loss there."""

    column: str | None = None  # an image column holding the mask (white = learned); None: the image's alpha
    unmasked_weight: float = Field(0.0, ge=0, le=1)  # the loss weight outside the mask
    # divide each sample's loss by its mean weight (the loss scale does not shrink with the masked area)
    normalize: bool = True


class DataSpec(Strict):
    source: Literal["shapes", "imagefolder", "hub", "parquet", "arrow", "webdataset"] = "shapes"
    path: str | None = None  # imagefolder dir, hub dataset id, parquet/arrow file, dir or glob, webdataset shards
    split: str = "train"
    mix: list[SourceSpec] | None = None  # several datasets instead of source/path (weights, repeats)
    streaming: bool = False  # read as an IterableDataset (hub or local shards), split across processes
    shuffle_buffer: int = Field(1000, ge=1)  # streaming: rows in the shuffle buffer
    shapes: ShapesSourceSpec = Field(default_factory=ShapesSourceSpec)
    image_column: str = "image"
    caption_column: str = "text"
    resolution: int = Field(64, ge=8)
    center_crop: bool = True
    random_flip: bool = False
    buckets: BucketSpec = Field(default_factory=BucketSpec)
    caption_dropout: float = Field(0.0, ge=0, le=1)
    # rows held out of training for the deterministic validation loss (logged at eval.every steps):
    # a fixed random set of this many rows (recipe seed), never in a training batch
    val_n: int = Field(0, ge=0)
    captions: CaptionSpec = Field(default_factory=CaptionSpec)
    masked_loss: MaskedLossSpec | None = None  # weight the loss by a per-pixel mask (see MaskedLossSpec)
    cache_latents: bool = True
    cache_dir: str | None = None  # root of generated data and latent caches (default data/cache)
    latent_cache: str | None = None  # a cache dir from `ldm-lab cache --out DIR`; refused if built for other inputs
    num_workers: int = Field(0, ge=0)
    pin_memory: bool | None = None  # default: on when training on a GPU
    max_samples: int | None = Field(None, ge=1)
    # bad input: rows that cannot be used are skipped, counted and listed in RUN/data_report.json
    check_rows: bool = True  # decode every image once before training (sources other than shapes)
    min_image_size: int = Field(0, ge=0)  # images whose shorter side is below this are skipped
    skip_empty_captions: bool = True
    drop_duplicates: bool = True  # identical image bytes: the first is kept

    @model_validator(mode="after")
    def _path_needed(self):
        if self.mix is None and self.source != "shapes" and not self.path:
            raise ValueError(f"data.source '{self.source}' needs data.path")
        if self.cache_latents and (self.random_flip or not self.center_crop):
            raise ValueError("cached latents are encoded from centre crops without flips; set data.random_flip=false "
                             "and data.center_crop=true, or data.cache_latents=false")
        if self.masked_loss is not None and self.streaming:
            raise ValueError("data.masked_loss reads masks with the rows of a map-style dataset; set "
                             "data.streaming=false or remove data.masked_loss")
        if self.cache_latents and self.streaming:
            raise ValueError("streaming data is encoded on the fly; set data.cache_latents=false, or read the data "
                             "without streaming so it can be cached (ldm-lab cache RECIPE)")
        return self
