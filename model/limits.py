"""What one request may ask of a loaded model: each rule's single home.

`LLM.stream` checks every request with `check_request`; the HTTP handler calls
it before streaming starts, so that a violation is a 400 naming the request's
own field (`InvalidRequest.param`). Pure Python: the handler imports it without
JAX.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from model.types import SamplingParams

# Serving defaults, for `LLM` and the server's settings (handler/settings.py).
DEFAULT_BATCH = 32  # decode slots: the most sequences generating at once
DEFAULT_MAX_QUEUE = 256  # requests that may wait for a slot
# Speculative drafts per sequence and step: a lone stream's 8-row step holds 7.
DEFAULT_SPECULATIVE_TOKENS = 7
# Prompt work beside decoding streams, as a share of their step (model/engine/pacing.py):
# their gaps stay within 1 + this times their length alone. 8 streams while a 3,900-token
# prompt prefills, in process on a 2-core CPU: at 3 their p99 4.4x their p50 before it and
# its first token after 13 s, at 1 2.5x and 19-26 s (at 0.7 2.7x and 49 s: their own
# steps grow as they wait).
DEFAULT_PREFILL_SHARE = 1.0
MAX_EMBEDDING_INPUTS = 2048  # inputs in one embeddings request (OpenAI's bound)


class InvalidRequest(ValueError):
    """A request the model cannot serve as asked; `param` names the offending field
    as the caller called it, `code` is OpenAI's error code (or None)."""

    def __init__(self, message: str, param: str, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class Names:
    """What the caller calls the prompt and the completion budget, for messages
    (chat: "messages" and "max_tokens" or "max_completion_tokens")."""

    prompt: str = "prompt"
    max_tokens: str = "max_tokens"


PROMPT = Names()  # the Python API's names


def check_request(
    prompt_ids: Sequence[int],
    params: SamplingParams,
    *,
    vocab_size: int,
    max_seq_len: int,
    slots: int,
    names: Names = PROMPT,
) -> int:
    """The completion budget (tokens each choice may generate) of a valid request.

    Raises InvalidRequest when the prompt is empty or holds ids outside
    [0, vocab_size), when prompt plus max_tokens exceed max_seq_len, when n is
    more than the decode slots, or when logit_bias names a token outside the
    vocabulary.
    """
    check_prompt(prompt_ids, vocab_size, names.prompt)
    if params.n > slots:
        raise InvalidRequest(f"n={params.n} is more than this server's {slots} decode slots.", "n")
    for token in params.logit_bias or {}:
        if not 0 <= int(token) < vocab_size:
            raise InvalidRequest(
                f"logit_bias: token id {token} is not in the vocabulary (0 to {vocab_size - 1}).",
                "logit_bias",
            )
    return completion_budget(len(prompt_ids), params.max_tokens, max_seq_len, names)


def check_prompt(prompt_ids: Sequence[int], vocab_size: int, name: str = "prompt") -> None:
    """InvalidRequest unless the prompt is at least one token, each in [0, vocab_size)."""
    if not prompt_ids:
        raise InvalidRequest(f"The {name} is empty; it needs at least one token.", name)
    outside = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if outside:
        raise InvalidRequest(
            f"The {name} holds token ids outside the vocabulary [0, {vocab_size}): "
            f"{', '.join(map(str, outside[:5]))}{' ...' if len(outside) > 5 else ''}.",
            name,
        )


def completion_budget(
    prompt_len: int, max_tokens: int | None, max_seq_len: int, names: Names = PROMPT
) -> int:
    """Tokens a choice may generate: max_tokens, or all the room the context leaves.

    InvalidRequest (code context_length_exceeded) when the prompt leaves no room,
    or prompt plus max_tokens exceed max_seq_len; the message gives the counts.
    """
    limit = f"This model's maximum context length is {max_seq_len} tokens"
    room = max_seq_len - prompt_len
    if room <= 0:
        raise InvalidRequest(
            f"{limit}. However, your {names.prompt} resulted in {prompt_len} tokens, leaving "
            f"no room for a completion. Reduce the length of the {names.prompt}.",
            names.prompt,
            "context_length_exceeded",
        )
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise InvalidRequest(
            f"{limit}. However, you requested {prompt_len + max_tokens} tokens "
            f"({prompt_len} in the {names.prompt}, {max_tokens} in the completion). "
            f"Reduce the length of the {names.prompt} or {names.max_tokens}.",
            names.max_tokens,
            "context_length_exceeded",
        )
    return max_tokens


def check_embedding_input(ids: Sequence[int], vocab_size: int, max_seq_len: int, name: str) -> None:
    """InvalidRequest unless an embedding input (called `name`) is 1 to max_seq_len
    tokens, each in the vocabulary; the message gives the counts."""
    check_prompt(ids, vocab_size, name)
    if len(ids) > max_seq_len:
        raise InvalidRequest(
            f"This model's maximum context length is {max_seq_len} tokens, however {name} "
            f"has {len(ids)} tokens. Reduce the length of the input.",
            name.split("[")[0],
            "context_length_exceeded",
        )
