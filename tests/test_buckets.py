"""Aspect-ratio buckets: bucket sets, assignment, transform, one-bucket sampler (also through accelerate), report."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from ldm_lab.data.bucket_report import bucket_report, format_report
from ldm_lab.data.bucket_sampler import BucketBatchSampler
from ldm_lab.data.bucket_transforms import CoverResize, bucket_transform
from ldm_lab.data.buckets import assign, bucket_key, cover_size, make_buckets, parse_buckets, upscale_needed

CONFIGS = [  # (pixel_budget, step, max_aspect)
    (512 * 512, 64, 2.0),
    (512 * 512, 8, 2.0),
    (70 * 70, 8, 2.0),  # square 64x64 is contained in 64x72
    (1024 * 1024, 64, 4.0),
    (96 * 40, 16, 1.5),
    (4096, 8, 1.0),  # square only
]


def _valid(h: int, w: int, budget: int, step: int, max_aspect: float) -> bool:
    return (h > 0 and w > 0 and h % step == 0 and w % step == 0 and h * w <= budget
            and max(h, w) / min(h, w) <= max_aspect + 1e-12)


def _brute_frontier(budget: int, step: int, max_aspect: float) -> set[tuple[int, int]]:
    """Every valid pair on a grid (no side can exceed sqrt(budget * max_aspect), since h * w <= budget and
    h <= max_aspect * w), minus those with another valid pair in their upper-right quadrant."""
    sides = list(range(step, math.isqrt(int(budget * max_aspect)) + step + 1, step))
    n = len(sides)
    valid = np.array([[_valid(h, w, budget, step, max_aspect) for w in sides] for h in sides])
    # quad[i, j]: some valid pair with h >= sides[i] and w >= sides[j]
    quad = np.zeros((n + 1, n + 1), dtype=bool)
    for i in range(n - 1, -1, -1):
        for j in range(n - 1, -1, -1):
            quad[i, j] = valid[i, j] or quad[i + 1, j] or quad[i, j + 1]
    return {(sides[i], sides[j]) for i in range(n) for j in range(n)
            if valid[i, j] and not (quad[i + 1, j] or quad[i, j + 1])}


# ------------------------------------------------------------------------------------------- buckets


@pytest.mark.parametrize("budget,step,max_aspect", CONFIGS)
def test_make_buckets_constraints_and_maximality(budget, step, max_aspect):
    buckets = make_buckets(budget, step, max_aspect)
    assert len(set(buckets)) == len(buckets)
    for h, w in buckets:
        assert _valid(h, w, budget, step, max_aspect), (h, w)
    side = math.isqrt(budget) // step * step
    assert (side, side) in buckets
    frontier = _brute_frontier(budget, step, max_aspect)
    # exactly the maximal buckets (brute force over every valid pair), plus the square
    assert set(buckets) == frontier | {(side, side)}
    for h, w in buckets:
        if (h, w) in frontier:  # cannot grow by one step in either side
            assert not _valid(h + step, w, budget, step, max_aspect)
            assert not _valid(h, w + step, budget, step, max_aspect)
    # sorted by aspect h/w: landscape first
    ratios = [h / w for h, w in buckets]
    assert ratios == sorted(ratios)


def test_make_buckets_known_set():
    # 512**2, step 64, aspect <= 2: for h = 384..640 the widest width within budget is
    # floor(262144 / h / 64) * 64 = 640, 576, 512, 448, 384; h = 256 and 320 are capped at 512 / 640 by
    # the aspect and contained in 320x640 / 384x640; h >= 704 allows at most 320 wide (aspect > 2).
    assert make_buckets(512 * 512, 64, 2.0) == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]
    # 70*70 budget: 64x64 is not maximal (64x72 contains it) but is kept as the square bucket
    b = make_buckets(70 * 70, 8, 2.0)
    assert (64, 64) in b and (64, 72) in b and (72, 64) in b


def test_make_buckets_rejects_impossible():
    with pytest.raises(ValueError):
        make_buckets(60, 8, 2.0)
    with pytest.raises(ValueError):
        make_buckets(4096, 8, 0.5)


def test_parse_buckets():
    expected = [(512, 768), (512, 512), (768, 512)]  # sorted by h/w like make_buckets
    assert parse_buckets("768,512; 512,768;512,512", step=64) == expected  # diffusers' format
    assert parse_buckets(["768x512", "512x768", [512, 512]], step=64) == expected
    assert parse_buckets([(768, 512)], step=8) == [(768, 512)]
    with pytest.raises(ValueError, match="multiples of 64"):
        parse_buckets("500,512", step=64)
    with pytest.raises(ValueError, match="twice"):
        parse_buckets([(512, 512), "512x512"], step=64)
    with pytest.raises(ValueError, match="budget"):
        parse_buckets([(768, 768)], step=64, pixel_budget=512 * 512)
    with pytest.raises(ValueError, match="max_aspect"):
        parse_buckets([(256, 768)], step=64, max_aspect=2.0)
    with pytest.raises(ValueError):
        parse_buckets([], step=64)
    with pytest.raises(ValueError):
        parse_buckets(["512"], step=64)
    assert bucket_key((384, 640)) == "384x640"


# ---------------------------------------------------------------------------------------- assignment


def test_assign_portrait_goes_to_portrait_bucket():
    buckets = make_buckets(512 * 512, 64, 2.0)
    # a 512 wide x 768 tall portrait: aspect h/w = 1.5; |log 1.5 - log(640/384)| = 0.105 beats
    # |log 1.5 - log(576/448)| = 0.154, and 640x384 needs only a 0.833 downscale
    i = assign((768, 512), buckets, max_upscale=1.0)
    assert buckets[i] == (640, 384)
    # the mirror image goes to the mirror bucket
    assert buckets[assign((512, 768), buckets, 1.0)] == (384, 640)
    # with an explicit 2:3 bucket it is an exact match
    explicit = parse_buckets([(512, 512), (768, 512), (512, 768)], step=64)
    assert explicit[assign((768, 512), explicit, 1.0)] == (768, 512)


def test_assign_drops_what_needs_too_much_upscaling():
    buckets = make_buckets(64 * 64, 8, 2.0)
    # every bucket of a 64*64 budget needs >= 1.6x to be covered by 40x40 (the square needs exactly 1.6)
    assert assign((40, 40), buckets, max_upscale=1.0) is None
    assert assign((40, 40), buckets, max_upscale=1.5) is None
    assert buckets[assign((40, 40), buckets, max_upscale=2.0)] == (64, 64)
    assert upscale_needed((40, 40), (64, 64)) == pytest.approx(1.6)
    assert buckets[assign((40, 40), buckets, max_upscale=1.6)] == (64, 64)  # the limit is inclusive


def test_assign_prefers_largest_fitting_bucket_of_nearest_aspect():
    # same aspect, two sizes: the larger when it needs no upscale, else the smaller; never another aspect
    b = [(256, 256), (512, 512), (256, 512)]
    assert b[assign((600, 600), b, 1.0)] == (512, 512)
    assert b[assign((300, 300), b, 1.0)] == (256, 256)
    assert assign((200, 200), b, 1.0) is None  # 256x512 would need 2.56x, and is another aspect anyway
    # two aspects equally far from a square image (log 2 both): the larger bucket if it fits
    b = [(32, 64), (128, 64)]
    assert b[assign((200, 200), b, 1.0)] == (128, 64)
    assert b[assign((100, 100), b, 1.0)] == (32, 64)  # 128x64 would need 1.28x


def test_assign_is_scale_invariant_unlike_diffusers_metric():
    from diffusers.training_utils import find_nearest_bucket

    b = [(512, 512), (256, 512)]
    # a 300x400 image (h/w 0.75) is nearer the square (|log .75| = 0.29) than 1:2 (|log 1.5| = 0.41);
    # diffusers' |h*bw - w*bh| gives 51200 for both and keeps the last
    assert b[assign((300, 400), b, 10.0)] == (512, 512)
    assert b[find_nearest_bucket(300, 400, b)] == (256, 512)
    rng = random.Random(0)
    buckets = make_buckets(512 * 512, 32, 3.0)
    for _ in range(200):
        h, w = rng.randint(16, 2000), rng.randint(16, 2000)
        i = assign((h, w), buckets, max_upscale=1e6)
        assert i == assign((7 * h, 7 * w), buckets, max_upscale=1e6)
        # brute force: nearest in |log aspect|, then the largest
        d = [abs(math.log(h / w) - math.log(bh / bw)) for bh, bw in buckets]
        assert d[i] == pytest.approx(min(d))


def test_assign_random_sizes_respect_upscale_limit():
    rng = random.Random(1)
    buckets = make_buckets(256 * 256, 16, 2.0)
    for _ in range(300):
        size = (rng.randint(50, 700), rng.randint(50, 700))
        i = assign(size, buckets, max_upscale=1.2)
        d = [abs(math.log(size[0] / size[1]) - math.log(bh / bw)) for bh, bw in buckets]
        nearest = [j for j in range(len(buckets)) if d[j] <= min(d) + 1e-9]
        fits = [j for j in nearest if upscale_needed(size, buckets[j]) <= 1.2 + 1e-9]
        if fits:
            assert i in fits and upscale_needed(size, buckets[i]) <= 1.2 + 1e-9
        else:
            assert i is None


# ----------------------------------------------------------------------------------------- transform


def test_cover_size():
    assert cover_size((768, 512), (640, 384)) == (640, 427)  # scale 640/768; 512 * 5/6 = 426.7
    assert cover_size((40, 40), (64, 32)) == (64, 64)
    assert cover_size((100, 400), (50, 50)) == (50, 200)
    out = CoverResize((640, 384))(Image.new("RGB", (512, 768)))  # PIL size is (w, h)
    assert out.size == (427, 640)


@pytest.mark.parametrize("size_hw,bucket", [((768, 512), (640, 384)), ((300, 900), (384, 640)),
                                            ((40, 40), (64, 32)), ((64, 64), (64, 64))])
def test_transform_output_is_the_bucket(size_hw, bucket):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size_hw, 3), dtype=np.uint8))
    for center in (True, False):
        x = bucket_transform(bucket, random_flip=True, center_crop=center)(img)
        assert x.dtype == torch.float32 and tuple(x.shape) == (3, *bucket)
        assert x.min() >= -1 and x.max() <= 1


def test_transform_crops_the_centre():
    # 100 tall x 400 wide: red | green (columns 140..259) | blue. Covering a 50x50 bucket halves it to
    # 50x200, the green band lands on columns 70..129 and the centre crop takes 75..124: all green.
    a = np.zeros((100, 400, 3), dtype=np.uint8)
    a[:, :140, 0] = 255
    a[:, 140:260, 1] = 255
    a[:, 260:, 2] = 255
    x = bucket_transform((50, 50))(Image.fromarray(a))
    green = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 50, 50)
    assert torch.allclose(x, green, atol=1e-6)
    # a random crop can land off centre
    torch.manual_seed(0)
    outs = [bucket_transform((50, 50), center_crop=False)(Image.fromarray(a)) for _ in range(20)]
    assert any(not torch.allclose(o, green, atol=1e-3) for o in outs)


# ------------------------------------------------------------------------------------------- sampler

# hand-made rows: bucket 0: 10 rows, bucket 1: 7, bucket 2: 3, bucket 3: none; 4 rows skipped
SMALL = [0] * 10 + [1] * 7 + [2] * 3 + [-1, None, -1, None]
random.Random(5).shuffle(SMALL)
SMALL_BUCKETS = [(32, 64), (48, 48), (64, 32), (64, 40)]


def _bucket_of(rows):
    return {SMALL[r] for r in rows}


def test_sampler_one_bucket_per_batch_and_leftovers():
    s = BucketBatchSampler(SMALL, batch_size=4, seed=3)
    # 10 // 4 + 7 // 4 + 3 // 4 = 2 + 1 + 0 batches; leftovers 2, 3, 3
    assert len(s) == 3
    for epoch in range(4):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == 3
        seen = [r for b in batches for r in b]
        assert len(seen) == len(set(seen))  # every row at most once
        for b in batches:
            assert len(b) == 4 and len(_bucket_of(b)) == 1
            assert None not in _bucket_of(b) and -1 not in _bucket_of(b)
        left = {k: SMALL.count(k) - sum(SMALL[r] == k for r in seen) for k in (0, 1, 2)}
        assert left == {0: 2, 1: 3, 2: 3}
        report = bucket_report(SMALL, SMALL_BUCKETS, batch_size=4)
        assert {k: report["buckets"][bucket_key(SMALL_BUCKETS[k])]["leftover"] for k in left} == left
        assert all(v < 4 for v in left.values())


def test_sampler_is_deterministic_per_seed_and_epoch():
    rows = [random.Random(i).randrange(5) for i in range(400)]
    a, b = BucketBatchSampler(rows, 4, seed=7), BucketBatchSampler(rows, 4, seed=7)
    assert list(a) == list(b)
    e0 = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    e1 = list(a)
    assert e1 == list(b) and e1 != e0
    assert a.batches(0) == e0 and a.batches(1) == e1
    assert BucketBatchSampler(rows, 4, seed=8).batches(0) != e0
    # shuffled within buckets (not in row order) and across buckets (not grouped by bucket)
    assert any(bt != sorted(bt) for bt in e0)
    order = [rows[bt[0]] for bt in e0]
    assert order != sorted(order)
    # the rows left out differ between epochs
    assert {r for bt in e0 for r in bt} != {r for bt in e1 for r in bt}


def test_sampler_without_drop_last_tops_up_from_the_same_bucket():
    s = BucketBatchSampler(SMALL, batch_size=4, seed=0, drop_last=False)
    assert len(s) == 3 + 2 + 1  # ceil(10/4) + ceil(7/4) + ceil(3/4)
    batches = list(s)
    assert len(batches) == len(s)
    for b in batches:
        assert len(b) == 4 and len(_bucket_of(b)) == 1
    assert {r for b in batches for r in b} == {i for i, k in enumerate(SMALL) if k is not None and k >= 0}
    report = bucket_report(SMALL, SMALL_BUCKETS, batch_size=4, drop_last=False)
    assert report["batches_per_epoch"] == len(s)
    assert [report["buckets"][bucket_key(SMALL_BUCKETS[k])]["padded"] for k in (0, 1, 2)] == [2, 1, 1]


def _index_batches(loader):
    return [b[0].tolist() for b in loader]


def test_sampler_through_accelerate_prepared_loader():
    from accelerate import Accelerator

    rows = [random.Random(i).randrange(4) for i in range(90)]
    ds = TensorDataset(torch.arange(len(rows)))
    s = BucketBatchSampler(rows, batch_size=4, seed=11)
    acc = Accelerator(cpu=True)
    dl = acc.prepare(DataLoader(ds, batch_sampler=s))
    assert len(dl) == len(s)
    dl.set_epoch(0)
    assert _index_batches(dl) == s.batches(0)
    dl.set_epoch(1)
    assert s.epoch == 1
    e1 = _index_batches(dl)
    assert e1 == s.batches(1) and e1 != s.batches(0)
    dl.set_epoch(1)
    assert _index_batches(dl) == e1  # same epoch, same order
    # the prepared loader sets the epoch itself at every iteration (its own counter), overriding a
    # set_epoch made on the sampler directly: the loop must call it on the prepared loader
    s.set_epoch(5)
    assert _index_batches(dl) != s.batches(5)
    # the loop's resume path: set the epoch, then skip the batches already seen
    dl.set_epoch(1)
    skipping = acc.skip_first_batches(dl, 2)
    skipping.set_epoch(1)
    assert _index_batches(skipping) == e1[2:]


@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_sharded_across_processes(drop_last):
    """What ``prepare`` builds with 2 processes: a DataLoaderShard over BatchSamplerShard(our sampler)."""
    from accelerate import Accelerator
    from accelerate.data_loader import BatchSamplerShard, DataLoaderShard

    Accelerator(cpu=True)  # initialises the state DataLoaderShard uses
    rows = [random.Random(100 + i).randrange(3) for i in range(61)]
    ds = TensorDataset(torch.arange(len(rows)))
    samplers = [BucketBatchSampler(rows, 4, seed=2, drop_last=drop_last) for _ in range(2)]
    loaders = [DataLoaderShard(ds, batch_sampler=BatchSamplerShard(samplers[p], num_processes=2, process_index=p))
               for p in range(2)]
    for epoch in (0, 3):
        per_process = []
        for p in range(2):
            loaders[p].set_epoch(epoch)
            assert samplers[p].epoch == epoch  # reaches through BatchSamplerShard via .sampler
            per_process.append(_index_batches(loaders[p]))
        full = samplers[0].batches(epoch)
        assert len(per_process[0]) == len(per_process[1]) == len(loaders[0])
        for batches in per_process:
            for b in batches:
                assert len(b) == 4 and len({rows[r] for r in b}) == 1
        n = len(per_process[0])
        if drop_last:  # round robin; the last odd batch is skipped; nothing seen twice
            assert per_process[0] == full[0:2 * n:2] and per_process[1] == full[1:2 * n:2]
            seen = [r for pp in per_process for b in pp for r in b]
            assert len(seen) == len(set(seen))
        else:  # every row seen
            assert {r for pp in per_process for b in pp for r in b} == set(range(len(rows)))
    # resume mid-epoch as the loop does: the epoch set on the prepared loader, then a skipping loader
    # (whose own set_epoch cannot reach through BatchSamplerShard)
    from accelerate.data_loader import skip_first_batches

    for p in range(2):
        loaders[p].set_epoch(0)
        skipping = skip_first_batches(loaders[p], 1)
        skipping.set_epoch(0)
        assert samplers[p].epoch == 0
        assert _index_batches(skipping) == _index_batches(loaders[p])[1:]


# -------------------------------------------------------------------------------------------- report


def test_report_counts_small_buckets_and_drops():
    dropped = {"upscale>1.0": [f"img/{i}.png" for i in range(8)], "unreadable": ["bad.jpg"]}
    r = bucket_report(SMALL, SMALL_BUCKETS, batch_size=4, dropped=dropped)
    json.dumps(r)  # serialisable
    assert r["rows"] == 20 and r["skipped_rows"] == 4
    assert r["batches_per_epoch"] == 3 and r["rows_per_epoch"] == 12 and r["leftover_rows"] == 8
    assert r["buckets"]["32x64"] == {"index": 0, "height": 32, "width": 64, "rows": 10, "batches": 2, "leftover": 2}
    assert r["buckets"]["48x48"]["rows"] == 7 and r["buckets"]["48x48"]["batches"] == 1
    assert r["buckets"]["64x32"] == {"index": 2, "height": 64, "width": 32, "rows": 3, "batches": 0, "leftover": 3}
    assert r["unused_buckets"] == ["64x40"]
    assert r["small_buckets"] == ["64x32"]
    assert any("64x32" in w and "fewer than one batch" in w for w in r["warnings"])
    assert r["dropped"]["upscale>1.0"] == {"count": 8, "examples": [f"img/{i}.png" for i in range(5)]}
    assert r["dropped"]["unreadable"]["count"] == 1 and r["dropped_total"] == 9
    text = format_report(r)
    first = text.splitlines()[0]
    assert "3 used of 4" in first and "20 rows" in first and "3 batches/epoch" in first and "9 images dropped" in first
    assert "64x32" in text and "< one batch" in text and "img/0.png" in text and "warning" in text
    # the sampler agrees with the report
    assert len(BucketBatchSampler(SMALL, 4)) == r["batches_per_epoch"]


def test_report_rejects_bad_index():
    with pytest.raises(ValueError):
        bucket_report([0, 5], SMALL_BUCKETS, batch_size=2)
