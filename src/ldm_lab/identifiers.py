"""Rare-token identifiers for subject-driven fine-tuning (DreamBooth's "[V]").

DreamBooth binds a subject to an identifier whose token carries little prior meaning: it picks
rare tokens of the tokenizer's vocabulary that decode to at most three characters, rather than
an English word (whose meaning the model would have to unlearn) or a random letter string
(which splits into common letter tokens). For a BPE vocabulary ordered by merge rank, as CLIP's
is, the late entries are the rarest; we take whole-word tokens from the rarest part of the
vocabulary that are 2-3 lowercase letters, are not common short words, and tokenize back to
exactly one token.
"""

from __future__ import annotations

# Short words that are common in captions and so carry meaning even when rare in BPE rank.
COMMON_SHORT = frozenset("""
a an the of in on at to by for and or but not is are was be as it its he she we you they me my
our his her him them us do go no so up if oh ok yes all any one two six ten new old big red tan
sun sky sea car cat dog man boy toy art pop hat cap cup box bag bed pen pin key map war way day
air arm leg eye ear lip toe sit run fly sky ice fog oil gas gem jar jet kid kit log mud net nut
owl pig rat rod rug saw toy tub van web wig zip zoo sks fck fuk wtf omg lol sex xxx
""".split())


def _is_candidate(text: str) -> bool:
    return 2 <= len(text) <= 3 and text.isascii() and text.isalpha() and text.islower() and text not in COMMON_SHORT


def single_token(tokenizer, word: str) -> bool:
    """True when ``word`` (as a whole word in a prompt) is exactly one token."""
    return len(tokenizer(word, add_special_tokens=False).input_ids) == 1


def rare_tokens(tokenizer, n: int = 10, rare_fraction: float = 0.4, avoid: set[str] | None = None) -> list[str]:
    """``n`` identifier candidates, rarest first and always the same for the same tokenizer:
    whole-word vocabulary entries in the rarest ``rare_fraction`` of ids that decode to 2-3
    lowercase letters, are not common short words or in ``avoid``, and tokenize to one token."""
    vocab = tokenizer.get_vocab()
    size = len(vocab)
    start = int(size * (1 - rare_fraction))
    avoid = {a.lower() for a in (avoid or set())}
    out: list[str] = []
    for token, idx in sorted(vocab.items(), key=lambda kv: -kv[1]):
        if idx < start:
            break
        if not token.endswith("</w>"):  # CLIP marks whole words; word pieces are not identifiers
            continue
        text = token[: -len("</w>")]
        if not _is_candidate(text) or text in avoid:
            continue
        if single_token(tokenizer, text):
            out.append(text)
            if len(out) == n:
                break
    return out


def choose_identifier(tokenizer, identifier: str = "auto", avoid: set[str] | None = None) -> tuple[str, str | None]:
    """(identifier, warning). ``auto`` picks the rarest candidate; a given token is kept, with a
    warning when it splits into several tokens."""
    if identifier == "auto":
        cands = rare_tokens(tokenizer, n=1, avoid=avoid)
        if not cands:
            raise ValueError("no rare single-token identifier found in this tokenizer's vocabulary; give one")
        return cands[0], None
    n = len(tokenizer(identifier, add_special_tokens=False).input_ids)
    if n != 1:
        return identifier, (f"identifier {identifier!r} is {n} tokens for this tokenizer; a single rare token "
                            "binds the subject more cleanly (try --identifier auto)")
    return identifier, None
