"""Where training rows come from. Every source ends up as a 🤗 ``datasets`` dataset with an image
column (a ``datasets.Image()`` feature) and a caption column, named by ``data.image_column`` /
``data.caption_column``. Each source (``shapes``, ``imagefolder``, ``hub``, ``parquet``, ``arrow``,
``webdataset``) is loaded in its own format by :mod:`ldm_lab.data.formats` and its columns made
standard by :mod:`ldm_lab.data.columns`; :func:`load_rows` here takes, splits, shuffles and mixes.

Map-style (``data.streaming: false``) datasets are returned whole; accelerate's sampler shards
them across processes later. ``max_samples`` keeps the first rows.

Streaming (``data.streaming: true``; every source, ``shapes`` and ``save_to_disk`` dirs via
``Dataset.to_iterable_dataset``): ``load_dataset(..., streaming=True)`` gives an
``IterableDataset``; then ``take(max_samples)``, then ``datasets.distributed.split_dataset_by_node``
and ``shuffle(seed, buffer_size=shuffle_buffer)``. The split and the shuffle are lazy and applied
when iterating, the split outermost whatever the call order. When the dataset's number of shards
(files) is a multiple of ``world_size`` each process reads its own shards (processes may then get
different row counts: a training loop must not assume equal lengths); otherwise every process
reads everything and keeps one row in ``world_size`` (the same seed on every process, so the rows
are still disjoint). ``take`` comes before the split so that ``max_samples`` counts rows over all
processes, as in map-style (with the shard split each process takes its share from the start of
its own shards); it fixes the shard order, so with ``max_samples`` only the buffer shuffles. (At
the end of an iteration over interleaved parquet shards, datasets sleeps
``datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN`` = 5 s to let pyarrow threads finish.)

Mixes (``data.mix``): each member is loaded with its own source/path/split/columns (columns default
to ``data.image_column`` / ``data.caption_column``, with the webdataset defaults of :mod:`ldm_lab.data.formats`), reduced to
the image and caption columns renamed to the top-level names, the image cast to ``Image()`` and the
caption to string (a list of strings stays a list of strings), so that features align. A member
with ``repeats: k`` is listed k times (``concatenate_datasets``; when streaming
``IterableDataset.repeat``, which repeats after the per-process split so processes stay disjoint).
If any member has a ``weight``, all must have one and the members are
``interleave_datasets(probabilities=normalised weights, seed=seed, stopping_strategy="all_exhausted")``:
each row draws a member by weight until every member has been drawn through whole, and a member
that runs out starts again (so light or small members are oversampled, and the length depends on
the weights); without weights the members are concatenated. Streaming mixes interleave (or
concatenate) the members' IterableDatasets and then split the result across processes: datasets
counts the shards of an interleave as the *smallest* member's shard count (of a concatenation, the
sum) and splits every member's shards when that is a multiple of ``world_size`` (a concatenation
may then give whole members to different processes), else one row in ``world_size``.
"""

from __future__ import annotations

import datasets
from datasets.distributed import split_dataset_by_node

from ..errors import UserError
from ..recipe.schema import DataSpec
from .columns import _features, _standardize
from .formats import Rows, _load_source, _Source


def load_rows(spec: DataSpec, rank: int = 0, world_size: int = 1, seed: int = 0) -> Rows:
    """The recipe's rows with ``spec.image_column`` (an ``Image()``) and ``spec.caption_column``.

    Map-style (``spec.streaming`` false): a ``datasets.Dataset`` of all rows (``max_samples``: the
    first ones); ``rank``/``world_size`` are not used, accelerate shards it later. Streaming: an
    ``IterableDataset`` holding this process's part (``rank`` of ``world_size``), shuffled with
    ``seed`` in a buffer of ``spec.shuffle_buffer`` rows. ``spec.mix`` combines several sources
    (see the module docstring). User mistakes (no such path or column, ...) raise UserError.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if spec.mix:
        ds = _load_mix(spec, world_size, seed)
    else:
        src = _Source(spec.source, spec.path, spec.split, spec.image_column, spec.caption_column, "data",
                      (spec.image_column == "image", spec.caption_column == "text"))
        ds = _standardize(_load_source(spec, src, spec.streaming, world_size), src, spec.image_column,
                          spec.caption_column, keep_all=True)
    if isinstance(ds, datasets.IterableDataset):
        if spec.max_samples:
            ds = ds.take(spec.max_samples)
        if world_size > 1:
            ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
        return ds.shuffle(seed=seed, buffer_size=spec.shuffle_buffer)
    if spec.max_samples:
        ds = ds.select(range(min(spec.max_samples, len(ds))))
    return ds


def _load_mix(spec: DataSpec, world_size: int, seed: int) -> Rows:
    weights = [m.weight for m in spec.mix]
    if any(w is not None for w in weights) and any(w is None for w in weights):
        missing = [f"data.mix[{i}]" for i, w in enumerate(weights) if w is None]
        raise UserError(f"{', '.join(missing)} {'has' if len(missing) == 1 else 'have'} no weight while other "
                          "members have one; give every data.mix member a weight, or none.")
    members = []
    for i, m in enumerate(spec.mix):
        src = _Source(m.source, m.path, m.split, m.image_column or spec.image_column,
                      m.caption_column or spec.caption_column, f"data.mix[{i}]",
                      (m.image_column is None and spec.image_column == "image",
                       m.caption_column is None and spec.caption_column == "text"))
        ds = _standardize(_load_source(spec, src, spec.streaming, world_size), src, spec.image_column,
                          spec.caption_column, keep_all=False)
        if m.repeats > 1:
            ds = ds.repeat(m.repeats) if spec.streaming else datasets.concatenate_datasets([ds] * m.repeats)
        members.append(ds)
    feats = [_features(d)[spec.caption_column] for d in members]
    if any(f != feats[0] for f in feats):
        kinds = ", ".join(f"data.mix[{i}]: {'list of captions' if isinstance(f, datasets.List) else 'caption'}"
                          for i, f in enumerate(feats))
        raise UserError(f"the data.mix members' caption columns differ in kind ({kinds}); "
                          "mix sources whose captions are all strings or all lists of strings.")
    if len(members) == 1 and weights[0] is None:
        return members[0]
    if weights[0] is not None:
        total = sum(weights)
        return datasets.interleave_datasets(members, probabilities=[w / total for w in weights], seed=seed,
                                            stopping_strategy="all_exhausted")
    return datasets.concatenate_datasets(members)
