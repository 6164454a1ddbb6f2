"""Streaming text: token ids → final text, a choice at a time.

- `IncrementalDetokenizer`: token ids → text pieces of whole UTF-8 characters;
- `StopStringMatcher`: cuts the text at the first stop string, across chunk boundaries;
- `ChoiceText`: one choice's token events → `Delta`s (text, logprobs, finish reason).
"""

from __future__ import annotations

import codecs
from collections import deque
from collections.abc import Sequence

from model.text.tokenizer import Tokenizer
from model.types import Delta, SamplingParams, TokenEvent, TokenLogprob


def longest_prefix_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


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


class StopStringMatcher:
    """Filters a text stream, ending it where any stop string first completes.

    Text that might be the start of a stop string is held back until it is
    known either to complete a stop (then it and everything after it are
    dropped) or not to (then it is released, in order). The stop that
    completes first in the stream wins (earliest end; on a tie, the one that
    starts earliest), so the result does not depend on how text is chunked.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        """stops: stop strings; empty strings are ignored."""
        self._stops = tuple(dict.fromkeys(s for s in stops if s))
        self._held = ""
        self.stopped = False

    def add(self, text: str) -> tuple[str, bool]:
        """Feed a chunk; return (text safe to emit now, whether a stop was hit).

        After a stop every further call returns ("", True).
        """
        if self.stopped:
            return "", True
        if not self._stops:
            return text, False
        buffer = self._held + text
        cut = self._first_match(buffer)
        if cut is not None:
            self._held, self.stopped = "", True
            return buffer[:cut], True
        keep = self._pending_length(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """End of stream without a stop: return the held-back text."""
        held, self._held = self._held, ""
        return held

    def _first_match(self, buffer: str) -> int | None:
        """Start index of the stop that completes first in `buffer`, or None."""
        best: tuple[int, int] | None = None
        for stop in self._stops:
            start = buffer.find(stop)
            if start >= 0:
                key = (start + len(stop), start)
                best = key if best is None else min(best, key)
        return None if best is None else best[1]

    def _pending_length(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of a stop."""
        return max(longest_prefix_suffix(buffer, stop) for stop in self._stops)


class ChoiceText:
    """One choice's token events → Deltas of final text, cut at the first stop string.

    With logprobs, each token gets the part of the content it accounts for:
    what the detokenizer released at that token ("" for a token ending inside
    a UTF-8 character, whose text arrives with the token that completes it),
    cut where a stop string begins. Entries are released with their text, so
    the entries' texts always concatenate to the content sent so far.
    """

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, index: int) -> None:
        self.tokenizer = tokenizer
        self.index = index
        self.ignore_eos = params.ignore_eos
        self.logprobs = params.logprobs
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stops = StopStringMatcher(params.stop)
        self.pending: deque[list] = deque()  # [token id, text, logprob, top] awaiting release
        self.unassigned = ""  # released text not yet attributed to a token
        self.finished = False

    def add(self, event: TokenEvent) -> Delta:
        """The Delta for the choice's next sampled token."""
        token, reason = event.token, event.finish_reason
        is_stop_token = token in self.tokenizer.stop_ids and not self.ignore_eos
        piece = "" if is_stop_token else self.detok.add(token)
        text, stopped = self.stops.add(piece)
        if self.logprobs and not is_stop_token:
            self.pending.append([token, piece, event.logprob, event.top])
        if reason and not stopped:
            tail = self.detok.flush()
            if tail and self.pending:
                self.pending[-1][1] += tail
            more, stopped = self.stops.add(tail)
            text += more + ("" if stopped else self.stops.flush())
        if stopped:
            reason = "stop"
        self.finished = reason is not None
        entries = self._release(text, final=self.finished) if self.logprobs else ()
        return Delta(text, (token,), reason, self.index, entries)

    def _release(self, text: str, *, final: bool) -> tuple[TokenLogprob, ...]:
        """Entries for the pending tokens whose text is now fully released."""
        self.unassigned += text
        out = []
        while self.pending and len(self.pending[0][1]) <= len(self.unassigned):
            token, piece, logprob, top = self.pending.popleft()
            out.append(TokenLogprob(token, piece, logprob, top))
            self.unassigned = self.unassigned[len(piece) :]
        if final:
            if self.unassigned and self.pending:  # the token a stop string cut into
                token, _, logprob, top = self.pending.popleft()
                out.append(TokenLogprob(token, self.unassigned, logprob, top))
            self.pending.clear()
            self.unassigned = ""
        return tuple(out)
