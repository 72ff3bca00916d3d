"""Rare-token identifier choice (DreamBooth's [V]) on the real CLIP BPE vocabulary."""

from __future__ import annotations

import pytest
from transformers import CLIPTokenizer

from ldm_lab.components import write_clip_bpe_vocab
from ldm_lab.identifiers import COMMON_SHORT, choose_identifier, rare_tokens, single_token


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return CLIPTokenizer.from_pretrained(write_clip_bpe_vocab(tmp_path_factory.mktemp("tok")))


def test_rare_tokens_are_deterministic_single_short_and_rare(tok):
    a, b = rare_tokens(tok, 12), rare_tokens(tok, 12)
    assert a == b and len(a) == 12 and len(set(a)) == 12
    vocab = tok.get_vocab()
    for w in a:
        assert 2 <= len(w) <= 3 and w.isalpha() and w not in COMMON_SHORT
        assert single_token(tok, w) and tok(w, add_special_tokens=False).input_ids[0] == vocab[w + "</w>"]
        assert vocab[w + "</w>"] >= 0.6 * len(vocab)  # from the rarest 40% of merges
    assert choose_identifier(tok)[0] == a[0]
    assert choose_identifier(tok, avoid={a[0]})[0] == a[1]


def test_given_identifier_checked(tok):
    word, warning = choose_identifier(tok, "dog")
    assert word == "dog" and warning is None
    word, warning = choose_identifier(tok, "qxzvk")
    assert word == "qxzvk" and "tokens" in warning
