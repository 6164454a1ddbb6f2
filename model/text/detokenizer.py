"""Streaming token ids -> text, emitting only complete UTF-8 characters."""

from __future__ import annotations

import codecs

from model.text.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces, O(1) work per token.

    Works on each token's raw bytes with an incremental UTF-8 decoder, so a
    character split across tokens (emoji, CJK under byte fallback) is emitted
    once, when its last byte arrives. The concatenation of every `add` result
    and `flush` equals `tokenizer.decode(ids, skip_special_tokens=...)`.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        """tokenizer: the model's Tokenizer. skip_special_tokens: drop control tokens."""
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._started = False

    def add(self, token_id: int) -> str:
        """Feed one token; return the text it completes ('' if none yet)."""
        tok = self._tokenizer
        if self._skip and token_id in tok.special_ids:
            return ""
        if self._started:
            data = tok.token_bytes(token_id)
        else:
            # The first token may be rendered differently (SentencePiece dummy prefix).
            data = tok.first_token_bytes(token_id)
            self._started = True
        return self._decoder.decode(data)

    def flush(self) -> str:
        """End the stream; return held-back bytes, invalid ones as U+FFFD."""
        return self._decoder.decode(b"", final=True)
