"""The incremental detokenizer: deltas that concatenate to `tokenizer.decode(all tokens)`, for
tokenizers whose decode is not prefix-stable, with work linear in the length.

Tokenizers are built here, no hub: a Llama-style BPE with byte fallback (transformers' own
LlamaTokenizer: SentencePiece's leading-space strip, characters spelled as <0xHH> bytes), a
Unigram with byte fallback whose decode cleans up tokenization spaces (" ." -> "."), and the suite's
byte-level BPE. The reference is the tokenizer's own `decode` of the whole sequence.
"""

from __future__ import annotations

import random

import pytest
from conftest import build_tokenizer
from serve_helpers import llama_byte_fallback_tokenizer, unigram_cleanup_tokenizer

from loraflow.serve.detokenize import IncrementalDetokenizer, applies_cleanup

TEXTS = ["hello 中文 🙂 don't . , it 's", "I ' m here ! naïve ?", "😀😀 the 世界 ...", " ' ' n't 's 've 're 'm"]


TOKENIZERS = {"llama-byte-fallback": llama_byte_fallback_tokenizer, "unigram-cleanup": unigram_cleanup_tokenizer,
              "byte-level-bpe": build_tokenizer}


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def tok(request):
    return TOKENIZERS[request.param]()


def _reference(tok, ids) -> str:
    """What a finished request's text must be: the whole decode, a character cut at the end left out."""
    return tok.decode(ids, skip_special_tokens=True).rstrip("\ufffd")


def _sequences(tok, count: int = 150):
    """Encoded texts and random token sequences (invalid byte runs, special tokens and all)."""
    rng = random.Random(0)
    out = [tok.encode(t, add_special_tokens=False) for t in TEXTS]
    out += [[rng.randrange(len(tok)) for _ in range(rng.randint(1, 40))] for _ in range(count)]
    return out


def test_the_tokenizers_are_not_prefix_stable():
    """Guards the test's point: token-by-token decoding gives the wrong text for the first two."""
    for make in (llama_byte_fallback_tokenizer, unigram_cleanup_tokenizer):
        tok = make()
        ids = tok.encode(TEXTS[0], add_special_tokens=False)
        assert "".join(tok.decode([i]) for i in ids) != tok.decode(ids)
        assert any(not tok.decode(ids).startswith(tok.decode(ids[:n])) for n in range(1, len(ids)))
    assert "中" in TEXTS[0] and len([t for t in llama_byte_fallback_tokenizer().tokenize("中") if t.startswith("<0x")]) == 3
    assert applies_cleanup(unigram_cleanup_tokenizer()) and not applies_cleanup(llama_byte_fallback_tokenizer())


def test_deltas_concatenate_to_the_whole_decode(tok):
    for ids in _sequences(tok):
        for n in (len(ids), max(1, len(ids) - 1), max(1, len(ids) // 2)):  # also ends inside a character
            detok = IncrementalDetokenizer(tok)
            deltas, stable = [], []
            for token in ids[:n]:
                deltas.append(detok.add(token))
                stable.append(detok.text[:detok.stable])
            deltas.append(detok.finish())
            expected = _reference(tok, ids[:n])
            assert detok.text == expected, (tok.convert_ids_to_tokens(ids[:n]), detok.text, expected)
            if not detok.cleanup:
                assert "".join(deltas) == expected
            assert all(expected.startswith(s) for s in stable), "text once stable changed later"


def test_encoded_text_round_trips_with_multibyte_characters_split_across_tokens(tok):
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        detok = IncrementalDetokenizer(tok)
        for token in ids:
            detok.add(token)
        detok.finish()
        assert detok.text == tok.decode(ids, skip_special_tokens=True)
        for char in "中文🙂😀世界":
            assert detok.text.count(char) == text.count(char)


def test_the_work_is_linear_in_the_length(tok):
    """Tokens handed to decode over a 2,000-token sequence: a small constant per token, not n^2/2."""
    rng = random.Random(1)
    ids = tok.encode(" ".join(TEXTS * 10), add_special_tokens=False)
    ids = [rng.choice(ids) for _ in range(2000)]
    seen = []
    decode = tok.decode
    tok.decode = lambda t, **kw: (seen.append(len(t)), decode(t, **kw))[1]
    try:
        detok = IncrementalDetokenizer(tok)
        for token in ids:
            detok.add(token)
        detok.finish()
    finally:
        del tok.decode
    assert detok.text == _reference(tok, ids)
    assert sum(seen) < 40 * len(ids)  # the whole-sequence re-decode would hand over ~2,000,000
