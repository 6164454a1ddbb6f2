"""What a caller asks of one generation, and what comes back, independent of HTTP."""

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

FinishReason = Literal["stop", "length", "tool_calls"]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings.

    temperature 0 means greedy. top_k 0, top_p 1 and min_p 0 disable those
    filters. max_tokens None means "until the context is full". seed None
    draws a fresh seed; a fixed seed makes sampling reproducible whatever else
    shares the batch. stop strings end the generation and are never part of
    the returned text. frequency/presence penalties follow OpenAI (-2..2),
    repetition_penalty transformers (1 disables). logit_bias maps token ids to
    a bias added to their logits. logprobs: report each token's log-probability
    and its top_logprobs most likely alternatives (0..20). n: choices that
    share one prompt prefill. grammar: an llguidance grammar (model/text/grammar.py)
    every choice's output must follow.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1
    grammar: str | None = None
    ignore_eos: bool = False  # keep generating past stop tokens (benchmarks)


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token with its log-probability and the most likely alternatives.

    text: the part of the reply this token accounts for (the texts of a
    choice's tokens concatenate to its content); top: (token id, logprob) pairs.
    """

    token_id: int
    text: str
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Delta:
    """One step of a streamed generation, for choice `index`.

    text: newly decoded text that is final (complete UTF-8, not a possible
    stop-string prefix); may be empty. token_ids: the tokens sampled since the
    previous delta. logprobs: entries for the tokens whose text is released in
    this delta (only when asked for). finish_reason: None until the choice's
    last delta.
    """

    text: str
    token_ids: tuple[int, ...] = field(default_factory=tuple)
    finish_reason: FinishReason | None = None
    index: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class TokenEvent:
    """One sampled token of choice `index`; finish_reason is set on its last token.

    top: the most likely tokens as (id, logprob) pairs, when the request asked.
    """

    token: int
    logprob: float
    finish_reason: FinishReason | None = None
    index: int = 0
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Pooled:
    """An embedding input's result from the engine: the mean of its final hidden states
    (after the model's final norm) over its `tokens` tokens, not normalised."""

    vector: np.ndarray  # [D] float32
    tokens: int
    index: int = 0
    finish_reason: FinishReason | None = "stop"


@dataclass(frozen=True)
class Embeddings:
    """Embeddings of N inputs: vectors [N, D] float32 (unit L2 norm) and each input's
    token count."""

    vectors: np.ndarray
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class Completion:
    """A finished generation (one choice): its text, every sampled token id, why it
    ended, and the tokens' log-probabilities when asked for."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    logprobs: tuple[TokenLogprob, ...] = ()


UNFINISHED = "the engine's stream ended before every choice finished"


@dataclass
class ChoiceResult:
    """One choice so far: its text, token ids, logprob entries and finish_reason."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None

    @property
    def tokens(self) -> int:
        """How many tokens the choice generated."""
        return len(self.token_ids)

    @property
    def reason(self) -> FinishReason:
        """The finish_reason of a finished choice."""
        if self.finish_reason is None:
            raise RuntimeError(UNFINISHED)
        return self.finish_reason


class Choices:
    """The choices of one generation, gathered from its deltas (n of them interleave)."""

    def __init__(self, n: int) -> None:
        self.results = [ChoiceResult() for _ in range(n)]

    def add(self, delta: Delta) -> ChoiceResult:
        """Add `delta` to its choice; returns that choice."""
        result = self.results[delta.index]
        result.text += delta.text
        result.token_ids.extend(delta.token_ids)
        result.logprobs.extend(delta.logprobs)
        result.finish_reason = delta.finish_reason or result.finish_reason
        return result

    @property
    def completion_tokens(self) -> int:
        return sum(result.tokens for result in self.results)

    def check_finished(self) -> None:
        """RuntimeError unless every choice has its finish_reason (the engine's stream ended)."""
        if any(result.finish_reason is None for result in self.results):
            raise RuntimeError(UNFINISHED)

    def completions(self) -> list[Completion]:
        """Each choice as a Completion (a choice cut short without a reason: "length")."""
        return [
            Completion(r.text, tuple(r.token_ids), r.finish_reason or "length", tuple(r.logprobs))
            for r in self.results
        ]
