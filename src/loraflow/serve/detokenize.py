"""Incremental detokenization: the text of a growing token sequence, one token at a time.

Decoding the whole sequence after every token costs O(n) per token; decoding only the new token is
wrong for tokenizers whose decode is not a concatenation of per-token pieces (SentencePiece's
leading-space strip, byte fallback that spreads one character over several tokens). As TGI's
`decode_token` and vLLM's `detokenize_incrementally` do, each step decodes a short window of tokens
twice, `ids[prefix:read]` (already read) and `ids[prefix:]` (with the new tokens), and the new text
is what the second adds to the first; both windows start at the same token, so whatever the decoder
does to a sequence's first token cancels out. A window ending in U+FFFD (a character cut between
tokens) waits for the next token. The windows move forward, so the work is linear in the length.

Byte-fallback tokens (`<0xE4>`, SentencePiece's way to spell a character outside the vocabulary)
also wait: the decoder turns a whole run of them into U+FFFD per byte when the run is not valid
UTF-8, so a later byte can change the text of earlier ones; a run's text is read once a token that
is not a byte ends it (or at the end).

Windows are decoded without transformers' `clean_up_tokenization_spaces` (" ." -> "." and the like,
which looks across token boundaries); when the tokenizer applies it, it is applied here to text that
can no longer change: everything before the last space that no cleanup pattern can reach back over.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_CLEANUPS = (" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're")  # transformers' clean_up_tokenization


def applies_cleanup(tokenizer) -> bool:
    """Whether `tokenizer.decode` cleans up tokenization spaces (it skips the cleanup for BPE models)."""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    ids = tokenizer.encode("a . b ,", add_special_tokens=False)
    return tokenizer.decode(ids) != tokenizer.decode(ids, clean_up_tokenization_spaces=False)


def byte_fallback_ids(tokenizer) -> frozenset[int]:
    """Ids of the tokens a ByteFallback decoder reads as raw bytes (named `<0xHH>`)."""
    byte = re.compile(r"<0x[0-9A-Fa-f]{2}>")
    return frozenset(i for t, i in tokenizer.get_vocab().items() if len(t) == 6 and byte.fullmatch(t))


def _clean(text: str) -> str:
    for pattern in _CLEANUPS:
        text = text.replace(pattern, pattern[1:] if pattern != " ' " else "'")
    return text


class IncrementalDetokenizer:
    """The text of generated tokens, built one token at a time.

    After `finish()`, `text` equals `tokenizer.decode(ids, skip_special_tokens=True)` without a
    trailing cut character (U+FFFD), as `loraflow.core.generation.generate_texts` reports it. Before,
    `text` holds every complete character read so far, and its first `stable` characters are final:
    later tokens only append to them.

    Args:
        tokenizer: a transformers tokenizer (not shared with another thread while in use).
        cleanup: apply transformers' tokenization-space cleanup (None: as `tokenizer.decode` does).
        byte_ids: the byte-fallback token ids (None: `byte_fallback_ids(tokenizer)`).
    Both are properties of the tokenizer; pass them when building many detokenizers for one tokenizer.
    """

    def __init__(self, tokenizer, *, cleanup: bool | None = None, byte_ids: Iterable[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.cleanup = applies_cleanup(tokenizer) if cleanup is None else cleanup
        self.byte_ids = byte_fallback_ids(tokenizer) if byte_ids is None else frozenset(byte_ids)
        self._skipped = frozenset(tokenizer.all_special_ids)  # what decode(skip_special_tokens=True) drops
        self.ids: list[int] = []
        self._prefix = 0  # the window starts here ...
        self._read = 0  # ... and its text up to here has been read
        self._head = ""  # cleaned text that can no longer change
        self._tail = ""  # raw text after it (everything, without cleanup)
        self.text = ""
        self.stable = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token: int) -> str:
        """Read one token; returns the raw text it completes ("" while a character is cut)."""
        token = int(token)
        self.ids.append(token)
        if token in self.byte_ids or (token in self._skipped and self._in_byte_run()):
            return ""  # a byte run's text is known once the run ends
        return self._advance(final=False)

    def _in_byte_run(self) -> bool:
        for token in reversed(self.ids):
            if token not in self._skipped:
                return token in self.byte_ids
        return False

    def finish(self) -> str:
        """No more tokens: read what the window still holds, dropping a cut character at the end."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self.ids):
            return ""
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if final:
            after = after.rstrip("\ufffd")
        elif after.endswith("\ufffd"):
            return ""
        if len(after) <= len(before):
            return ""
        new = after[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        self._tail += new
        if not self.cleanup:
            self._head, self._tail = self._head + self._tail, ""
        else:
            cut = self._last_safe_space()
            if cut > 0:
                self._head += _clean(self._tail[:cut])
                self._tail = self._tail[cut:]
        self.text = self._head + (_clean(self._tail) if self._tail else "")
        self.stable = len(self.text) if final else len(self._head)
        return new

    def _last_safe_space(self) -> int:
        """The last space of the raw tail where the cleanup can be split: no pattern spans it."""
        tail = self._tail
        at = tail.rfind(" ")
        while at > 0:
            if tail[at - 1] not in " '":  # " ' " is the one pattern with an inner space
                return at
            at = tail.rfind(" ", 0, at)
        return 0
