"""Bad recipes end in one sentence and exit code 2, never a traceback: duplicate keys, an alias
bomb, deep nesting, binary files, empty recipes or ones without a model section, NaN / inf
numbers, seeds out of range, beta order, an empty output dir; and a property-based fuzz of
``recipe check`` over every recipe key with arbitrary values, and of the CLI's arguments."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO
from ldm_lab.cli import main as cli_main
from ldm_lab.recipe.schema import Recipe

T2I = REPO / "recipes/shapes/t2i.yaml"


def _check(capsys, path, *overrides) -> str:
    rc = cli_main(["recipe", "check", str(path), *overrides])
    out, err = capsys.readouterr()
    assert rc == 2, out + err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_a_duplicate_section_is_refused(tmp_path, capsys):
    p = tmp_path / "dup.yaml"
    p.write_text(T2I.read_text() + "\ntrain:\n  batch_size: 4\n")
    err = _check(capsys, p)
    assert "key 'train' appears twice" in err


def test_an_alias_bomb_is_refused_fast(tmp_path, capsys):
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    p = tmp_path / "bomb.yaml"
    p.write_text("\n".join(lines) + "\nmodel: *a9\n")
    t = time.perf_counter()
    err = _check(capsys, p)
    assert "expands to more than" in err and time.perf_counter() - t < 10


def test_deep_nesting_and_binary_files_are_refused(tmp_path, capsys):
    deep = tmp_path / "deep.yaml"
    deep.write_text("model: " + "[" * 5000 + "]" * 5000 + "\n")
    assert "nested deeper than 60 levels" in _check(capsys, deep)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(bytes(range(256)) * 8)
    assert "not a text file" in _check(capsys, binary)
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"trainer: lora\x00\n")
    assert "not a text file" in _check(capsys, nul)


@pytest.mark.parametrize("text", ["", "# nothing\n", "trainer: text_to_image\ntrain: {batch_size: 4}\n"])
def test_a_recipe_without_models_is_refused(tmp_path, capsys, text):
    p = tmp_path / "empty.yaml"
    p.write_text(text)
    assert "has no model section" in _check(capsys, p)


@pytest.mark.parametrize("override, words", [
    ("train.learning_rate=.inf", "train.learning_rate"), ("train.learning_rate=.nan", "train.learning_rate"),
    ("seed=-1", "'seed'"), ("seed=4294967296", "'seed'"),
    ("noise.beta_start=0.02", "beta_start (0.02) must be below beta_end"),
    ('output.dir=""', "output.dir is empty"),
    ("model.unet.overrides={not_a_unet_key: 1}", "not_a_unet_key"),
])
def test_bad_values_name_their_key(capsys, override, words):
    assert words in _check(capsys, T2I, override)


def _keys() -> list[str]:
    out = []

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict) and v:
                walk(v, f"{prefix}{k}.")
            else:
                out.append(f"{prefix}{k}")
    walk(Recipe().model_dump(mode="json"), "")
    return out


_values = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from([".inf", "-.inf", ".nan", "null", "~", "[]", "{}", "[1, [2, {a: 3}]]", "yes", "no", "0x1f",
                     "!!binary aGVsbG8=", "&a [*a]", "'", '"', "{", "]", "- x", "a: b: c", "\t", "*undefined"]),
    st.text(max_size=30),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(_keys() + ["train", "model", "x.y", "model.unet.overrides.zz", "plugin.q",
                                                      "model.text_encoders.0.dropout", "data.mix.0.path"]),
                          _values), min_size=1, max_size=4))
def test_fuzz_recipe_check_never_raises(capsys, pairs):
    """Any override of any key: ``recipe check`` says ok (0) or one sentence (2), never a traceback."""
    rc = cli_main(["recipe", "check", str(T2I), *[f"{k}={v}" for k, v in pairs]])
    out, err = capsys.readouterr()
    assert rc in (0, 2) and "Traceback" not in err
    if rc == 2:
        assert err.startswith("error: ") and err.strip().count("\n") == 0, err


_args = st.lists(st.one_of(st.sampled_from(["--n", "--steps", "--guidance", "--seed", "--sampler", "--out", "--lora",
                                            "--prompt", "--heldout-n", "--format", "--base", "--dtype", "0", "-1",
                                            "nan", "euler", "x:y", "/dev/null", "--help-me"]),
                           st.text(min_size=1, max_size=12).filter(lambda s: not s.startswith("-h"))), max_size=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from([["sample"], ["eval", "pipeline"], ["eval", "shapes"], ["export", "lora"],
                        ["export", "merge"], ["cache"], ["recipe", "check"]]), _args)
def test_fuzz_cli_arguments_end_in_one_sentence(tmp_path_factory, capsys, command, args):
    """Arbitrary arguments to the commands, on a source that does not exist: exit code 2 and an
    error line (argparse's usage + error, or ours), never a traceback and nothing written."""
    missing = str(tmp_path_factory.getbasetemp() / "no-such-run")
    try:
        rc = cli_main([*command, missing, *args])
    except SystemExit as e:  # argparse's own error exit
        rc = e.code
    out, err = capsys.readouterr()
    assert rc == 2 and "Traceback" not in err, (command, args, err[-500:])
    assert not Path(missing).exists()
