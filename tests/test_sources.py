"""Data sources: every ``data.source`` (and mixes, streaming, rank splits) on tiny local data.

Every image is a 16x16 solid colour and its caption names the colour and a row number, so each
test checks real pixels against captions, not only counts."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import datasets
import pytest
from PIL import Image

from ldm_lab.data.formats import expand_braces
from ldm_lab.data.sources import load_rows
from ldm_lab.errors import UserError
from ldm_lab.recipe.schema import DataSpec

PALETTE = {
    "red": (220, 30, 30), "green": (30, 170, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30),
    "cyan": (30, 210, 220), "magenta": (210, 30, 210), "black": (10, 10, 10), "white": (245, 245, 245),
}
NAMES = list(PALETTE)


def _png(name: str, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), PALETTE[name]).save(buf, fmt)
    return buf.getvalue()


def _colour(img: Image.Image) -> str:
    """The palette colour nearest the image's centre pixel (asserting it is close: JPEG is lossy)."""
    px = img.convert("RGB").getpixel((8, 8))
    dist, name = min((sum((a - b) ** 2 for a, b in zip(px, rgb)), n) for n, rgb in PALETTE.items())
    assert dist < 30**2, f"pixel {px} is no palette colour"
    return name


def _caption(name: str, i: int) -> str:
    return f"a {name} square, number {i}"


def _check(rows, image_column: str = "image", caption_column: str = "text") -> list[str]:
    """Every row's image has the colour its caption names; returns the captions in order."""
    caps = []
    for r in rows:
        assert isinstance(r[image_column], Image.Image)
        assert r[image_column].size == (16, 16)
        name = _colour(r[image_column])
        assert r[caption_column].startswith(f"a {name} square"), (name, r[caption_column])
        caps.append(r[caption_column])
    return caps


def _rows(items: list[tuple[str, int]]) -> dict:
    return {"image": [{"bytes": _png(n), "path": None} for n, _ in items], "text": [_caption(n, i) for n, i in items]}


def _table(items: list[tuple[str, int]]) -> datasets.Dataset:
    return datasets.Dataset.from_dict(_rows(items)).cast_column("image", datasets.Image())


def _tar(path: Path, items: list[tuple[str, int]], caption: str) -> None:
    """A LAION-style shard: KEY.jpg plus KEY.txt (caption='txt') or KEY.json (caption='json')."""
    def add(tf, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w") as tf:
        for n, i in items:
            key = f"{path.stem}-{i:05d}"
            add(tf, f"{key}.jpg", _png(n, "JPEG"))
            if caption == "txt":
                add(tf, f"{key}.txt", _caption(n, i).encode())
            else:
                add(tf, f"{key}.json", json.dumps({"caption": _caption(n, i), "width": 16, "key": key}).encode())


def ITEMS(start: int, n: int) -> list[tuple[str, int]]:
    return [(NAMES[i % len(NAMES)], i) for i in range(start, start + n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """All the tiny datasets, built once; datasets' cache goes to a temp dir."""
    root = tmp_path_factory.mktemp("sources")
    mp = pytest.MonkeyPatch()
    mp.setattr(datasets.config, "HF_DATASETS_CACHE", root / "hf-cache")
    # datasets sleeps this long (5 s) after every interleave of parquet shards (streaming shuffle,
    # mixes) to let pyarrow threads wind down; these tests exhaust their iterators, so no need
    mp.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    datasets.disable_progress_bars()

    folder = root / "folder"
    folder.mkdir()
    with (folder / "metadata.jsonl").open("w") as f:
        for n, i in ITEMS(0, 8):
            (folder / f"{i}.png").write_bytes(_png(n))
            f.write(json.dumps({"file_name": f"{i}.png", "text": _caption(n, i)}) + "\n")

    pq = root / "parquet"
    pq.mkdir()
    _table(ITEMS(0, 6)).to_parquet(str(pq / "part-0.parquet"))
    _table(ITEMS(6, 6)).to_parquet(str(pq / "part-1.parquet"))
    (pq / "notes.txt").write_text("not data")
    # other column names, as a user's parquet might have
    _table(ITEMS(20, 4)).rename_columns({"image": "img", "text": "caption"}).to_parquet(str(root / "named.parquet"))

    _table(ITEMS(30, 5)).save_to_disk(str(root / "saved"))
    datasets.DatasetDict({"train": _table(ITEMS(40, 3)), "test": _table(ITEMS(50, 2))}).save_to_disk(str(root / "dd"))

    hub = root / "hub" / "data"
    hub.mkdir(parents=True)
    _table(ITEMS(60, 4)).to_parquet(str(hub / "train-00000-of-00001.parquet"))
    _table(ITEMS(70, 2)).to_parquet(str(hub / "test-00000-of-00001.parquet"))

    wds = root / "wds"
    wds.mkdir()
    _tar(wds / "txt-000.tar", ITEMS(100, 4), "txt")
    _tar(wds / "txt-001.tar", ITEMS(104, 4), "txt")
    _tar(wds / "txt-002.tar", ITEMS(108, 4), "txt")
    (root / "wjson").mkdir()
    _tar(root / "wjson" / "json-000.tar", ITEMS(200, 3), "json")
    (root / "wmixed").mkdir()
    _tar(root / "wmixed" / "a.tar", ITEMS(300, 2), "txt")
    _tar(root / "wmixed" / "b.tar", ITEMS(310, 2), "json")

    # for weighted mixes: one colour per member
    _table([("red", i) for i in range(400, 405)]).to_parquet(str(root / "red.parquet"))
    _table([("blue", i) for i in range(500, 505)]).to_parquet(str(root / "blue.parquet"))
    yield root
    mp.undo()


def _caps(items) -> list[str]:
    return [_caption(n, i) for n, i in items]


def _spec(**kw) -> DataSpec:
    if kw.get("streaming"):
        kw.setdefault("cache_latents", False)
    return DataSpec(**kw)


# --- map-style single sources ----------------------------------------------------------------


def test_imagefolder(data):
    ds = load_rows(_spec(source="imagefolder", path=str(data / "folder")))
    assert isinstance(ds, datasets.Dataset) and isinstance(ds.features["image"], datasets.Image)
    assert sorted(_check(ds)) == sorted(_caps(ITEMS(0, 8)))
    assert len(load_rows(_spec(source="imagefolder", path=str(data / "folder"), max_samples=3))) == 3


def test_parquet_file_dir_and_glob(data):
    one = load_rows(_spec(source="parquet", path=str(data / "parquet" / "part-1.parquet")))
    assert isinstance(one.features["image"], datasets.Image)
    assert _check(one) == _caps(ITEMS(6, 6))
    everything = _caps(ITEMS(0, 12))
    for path in (data / "parquet", data / "parquet" / "part-*.parquet", data / "parquet" / "part-{0..1}.parquet"):
        assert sorted(_check(load_rows(_spec(source="parquet", path=str(path))))) == sorted(everything), path
    # the user's own column names
    named = load_rows(_spec(source="parquet", path=str(data / "named.parquet"), image_column="img",
                            caption_column="caption"))
    assert _check(named, "img", "caption") == _caps(ITEMS(20, 4))


def test_arrow_save_to_disk_and_arrow_files(data):
    saved = load_rows(_spec(source="arrow", path=str(data / "saved")))
    assert _check(saved) == _caps(ITEMS(30, 5))
    files = load_rows(_spec(source="arrow", path=str(data / "saved" / "*.arrow")))
    assert isinstance(files.features["image"], datasets.Image)
    assert _check(files) == _caps(ITEMS(30, 5))
    assert _check(load_rows(_spec(source="arrow", path=str(data / "dd"), split="test"))) == _caps(ITEMS(50, 2))
    with pytest.raises(UserError, match="split 'valid'.*train, test"):
        load_rows(_spec(source="arrow", path=str(data / "dd"), split="valid"))


def test_hub_style_local_dir(data):
    assert _check(load_rows(_spec(source="hub", path=str(data / "hub")))) == _caps(ITEMS(60, 4))
    assert _check(load_rows(_spec(source="hub", path=str(data / "hub"), split="test"))) == _caps(ITEMS(70, 2))
    with pytest.raises(UserError, match="split 'valid'"):
        load_rows(_spec(source="hub", path=str(data / "hub"), split="valid"))


def test_webdataset_txt_shards_with_braces(data):
    ds = load_rows(_spec(source="webdataset", path=str(data / "wds" / "txt-{000..001}.tar")))
    assert isinstance(ds.features["image"], datasets.Image) and "jpg" not in ds.column_names
    assert sorted(_check(ds)) == sorted(_caps(ITEMS(100, 8)))
    assert len(load_rows(_spec(source="webdataset", path=str(data / "wds")))) == 12


def test_webdataset_json_captions(data):
    ds = load_rows(_spec(source="webdataset", path=str(data / "wjson" / "json-000.tar")))
    assert isinstance(ds.features["image"], datasets.Image)
    assert _check(ds) == _caps(ITEMS(200, 3))
    # an explicit image column is kept as named
    jpg = load_rows(_spec(source="webdataset", path=str(data / "wjson"), image_column="jpg"))
    assert _check(jpg, "jpg") == _caps(ITEMS(200, 3))


def test_webdataset_shards_with_different_fields_are_an_error(data):
    with pytest.raises(UserError, match="same fields.*data.mix"):
        load_rows(_spec(source="webdataset", path=str(data / "wmixed")))
    # as separate mix members each shard gets its own caption field (txt / json), streaming or not
    mix = [{"source": "webdataset", "path": str(data / "wmixed" / "a.tar")},
           {"source": "webdataset", "path": str(data / "wmixed" / "b.tar")}]
    want = sorted(_caps(ITEMS(300, 2)) + _caps(ITEMS(310, 2)))
    assert sorted(_check(load_rows(_spec(mix=mix)))) == want
    streamed = load_rows(_spec(mix=mix, streaming=True))
    assert streamed.features == datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    assert sorted(_check(streamed)) == want


def test_expand_braces():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("x{y}z{8..10}") == ["x{y}z8", "x{y}z9", "x{y}z10"]
    assert expand_braces("plain.tar") == ["plain.tar"]


# --- errors ------------------------------------------------------------------------------------


def test_wrong_columns_name_the_column_and_the_existing_ones(data):
    with pytest.raises(UserError, match=r"no column 'caption'.*columns: image, text.*data.caption_column"):
        load_rows(_spec(source="parquet", path=str(data / "parquet"), caption_column="caption"))
    with pytest.raises(UserError, match=r"data.mix\[1\].*no column 'pixels'.*img, caption"):
        load_rows(_spec(mix=[{"source": "parquet", "path": str(data / "red.parquet")},
                             {"source": "parquet", "path": str(data / "named.parquet"), "image_column": "pixels"}]))
    # columns that exist but hold the wrong kind of data
    with pytest.raises(UserError, match=r"data: column 'json' .* not an image"):
        load_rows(_spec(source="webdataset", path=str(data / "wjson"), image_column="json"))
    with pytest.raises(UserError, match=r"data.mix\[0\]: column 'img' .* not text"):
        load_rows(_spec(mix=[{"source": "parquet", "path": str(data / "named.parquet"), "image_column": "img",
                              "caption_column": "img"}]))
    # a json webdataset whose json has no caption field names the json's fields
    with pytest.raises(UserError, match=r"no column 'alt'.*json column has caption, width, key"):
        load_rows(_spec(source="webdataset", path=str(data / "wjson"), caption_column="alt"))


def test_missing_paths_are_recipe_errors(data):
    for source, path in (("parquet", data / "nope.parquet"), ("parquet", data / "parquet" / "x-*.parquet"),
                         ("webdataset", data / "wds" / "txt-{000..009}.tar"), ("imagefolder", data / "nope"),
                         ("arrow", data / "folder"), ("hub", data / "nope")):
        with pytest.raises(UserError, match=str(path.name).replace("{", r"\{").replace("*", r"\*")):
            load_rows(_spec(source=source, path=str(path)))


def test_weight_on_some_members_only_is_an_error(data):
    with pytest.raises(UserError, match=r"data.mix\[1\] has no weight"):
        load_rows(_spec(mix=[{"source": "parquet", "path": str(data / "red.parquet"), "weight": 1.0},
                             {"source": "parquet", "path": str(data / "blue.parquet")}]))


# --- mixes -------------------------------------------------------------------------------------


def test_mix_concatenates_with_repeats_and_renames(data):
    ds = load_rows(_spec(mix=[
        {"source": "parquet", "path": str(data / "parquet" / "part-0.parquet"), "repeats": 2},
        {"source": "webdataset", "path": str(data / "wjson")},
        {"source": "parquet", "path": str(data / "named.parquet"), "image_column": "img", "caption_column": "caption"},
        {"source": "arrow", "path": str(data / "saved")},
    ]))
    assert ds.column_names == ["image", "text"]
    assert ds.features == datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    caps = Counter(_check(ds))
    want = Counter(_caps(ITEMS(0, 6)) * 2 + _caps(ITEMS(200, 3)) + _caps(ITEMS(20, 4)) + _caps(ITEMS(30, 5)))
    assert caps == want


def test_mix_weights_give_proportions(data):
    # red: 5 rows, weight 3; blue: 5 rows x 50 repeats, weight 1. "all_exhausted" draws until all
    # 250 blue rows were seen (~1000 draws). Over the first 800 draws the red share is binomial:
    # 0.75 +- 0.015 (one sd), so the tolerance 0.05 is over 3 sd.
    spec = _spec(mix=[{"source": "parquet", "path": str(data / "red.parquet"), "weight": 3},
                      {"source": "parquet", "path": str(data / "blue.parquet"), "weight": 1, "repeats": 50}])
    ds = load_rows(spec, seed=1)
    caps = ds["text"]
    assert len(caps) > 800
    assert abs(sum(c.startswith("a red ") for c in caps[:800]) / 800 - 0.75) < 0.05
    blue = Counter(c for c in caps if c.startswith("a blue "))
    assert blue == Counter({_caption("blue", i): 50 for i in range(500, 505)})  # every repeat, once
    assert set(caps) == set(_caps([("red", i) for i in range(400, 405)])) | set(blue)
    _check(ds.select(range(0, len(ds), 25)))  # the images match the captions
    # the seed decides the order; the same seed gives the same rows
    assert load_rows(spec, seed=1)["text"] == caps
    assert load_rows(spec, seed=2)["text"] != caps


# --- streaming ---------------------------------------------------------------------------------


def test_streaming_parquet(data):
    spec = _spec(source="parquet", path=str(data / "parquet"), streaming=True, shuffle_buffer=4)
    ds = load_rows(spec, seed=3)
    assert isinstance(ds, datasets.IterableDataset) and isinstance(ds.features["image"], datasets.Image)
    caps = _check(ds)
    assert sorted(caps) == sorted(_caps(ITEMS(0, 12)))
    assert caps != _caps(ITEMS(0, 12))  # shuffled (fixed seed, so not flaky)
    assert _check(load_rows(spec, seed=3)) == caps
    # max_samples: the first rows, shuffled
    few = _check(load_rows(spec.model_copy(update={"max_samples": 5}), seed=3))
    assert sorted(few) == sorted(_caps(ITEMS(0, 5)))


def test_streaming_webdataset_txt_and_json(data):
    ds = load_rows(_spec(source="webdataset", path=str(data / "wds"), streaming=True))
    assert isinstance(ds, datasets.IterableDataset)
    assert sorted(_check(ds)) == sorted(_caps(ITEMS(100, 12)))
    js = load_rows(_spec(source="webdataset", path=str(data / "wjson" / "*.tar"), streaming=True))
    assert isinstance(js.features["image"], datasets.Image)
    assert sorted(_check(js)) == sorted(_caps(ITEMS(200, 3)))


@pytest.mark.parametrize("source, path, n", [
    ("parquet", "parquet", 12),  # 2 files: each rank reads its own file
    ("webdataset", "wds", 12),  # 3 shards: not a multiple of 2, each rank keeps every other row
])
def test_streaming_splits_across_ranks(data, source, path, n):
    spec = _spec(source=source, path=str(data / path), streaming=True, shuffle_buffer=3)
    parts = [_check(load_rows(spec, rank=r, world_size=2, seed=5)) for r in (0, 1)]
    assert all(parts) and not set(parts[0]) & set(parts[1])
    assert len(parts[0]) + len(parts[1]) == n and len(set(parts[0]) | set(parts[1])) == n


def test_streaming_mix_weights_and_ranks(data):
    spec = _spec(streaming=True, mix=[
        {"source": "parquet", "path": str(data / "parquet"), "weight": 1},  # 2 shards, 12 rows
        {"source": "webdataset", "path": str(data / "wds" / "txt-00{0,1}.tar"), "weight": 1},  # 2 shards, 8 rows
    ])
    full = load_rows(spec, seed=2)
    assert full.features == datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    caps = _check(full)
    assert set(caps) == set(_caps(ITEMS(0, 12)) + _caps(ITEMS(100, 8)))  # all_exhausted: every row at least once
    parts = [_check(load_rows(spec, rank=r, world_size=2, seed=2)) for r in (0, 1)]
    assert not set(parts[0]) & set(parts[1])
    assert set(parts[0]) | set(parts[1]) == set(caps)
