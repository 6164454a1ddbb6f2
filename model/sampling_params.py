"""What a caller asks of one generation, and what comes back, independent of HTTP."""

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings.

    temperature 0 means greedy. top_k 0 and top_p 1 disable those filters.
    max_tokens None means "until the context is full". seed None draws a fresh
    seed; a fixed seed makes sampling reproducible. stop strings end the
    generation and are never part of the returned text.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # keep generating past stop tokens (benchmarks)


@dataclass(frozen=True)
class Delta:
    """One step of a streamed generation.

    text: newly decoded text that is final (complete UTF-8, not a possible
    stop-string prefix); may be empty. token_ids: the tokens sampled since the
    previous delta. finish_reason: None until the last delta of the stream.
    """

    text: str
    token_ids: tuple[int, ...] = field(default_factory=tuple)
    finish_reason: FinishReason | None = None
