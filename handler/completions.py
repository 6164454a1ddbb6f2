"""`POST /v1/completions`: the legacy prompt API, on the same engine as chat.

The prompt is sent to the model as it is (no chat template): a string, token
ids, or a batch of either. Every prompt gets n choices; choice p*n + i is the
i-th choice of prompt p. All prompts are submitted before any is read, so a
batch decodes together. Streams carry `text_completion` chunks; a streamed
batch sends each prompt's choices in turn.
"""

import logging
import time
import uuid
from collections.abc import Iterator

import flask

from handler import sse
from handler.chat import ChoiceResult, check_choices, collect, parse_request, start_generation
from handler.errors import internal_error, invalid_request
from handler.schemas import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    TextCompletion,
    Usage,
)
from model.types import TokenLogprob

log = logging.getLogger(__name__)


def parse_completion_request(body) -> CompletionRequest:
    """Validate a decoded JSON body; raises a 400 APIError naming the bad field."""
    return parse_request(CompletionRequest, body)


def prompts_of(request: CompletionRequest) -> list[str | list[int]]:
    """The request's prompts: one string or id list, or a batch of them (`[]` is one
    empty prompt)."""
    prompts = request.prompt
    if isinstance(prompts, str) or not prompts or isinstance(prompts[0], int):
        return [prompts]
    return list(prompts)


def prompt_ids(llm, request: CompletionRequest) -> list[list[int]]:
    """Each prompt as token ids; 400 when one does not fit with its max_tokens.

    An empty prompt starts from the model's BOS token (as OpenAI's models start
    from <|endoftext|>); a model without one cannot continue nothing: 400.
    """
    prompts = prompts_of(request)
    if llm.max_queue and len(prompts) > llm.max_queue:
        raise invalid_request(
            f"A batch of {len(prompts)} prompts is more than this server queues at once "
            f"({llm.max_queue}); send smaller batches.",
            param="prompt",
        )
    encoded = []
    for index, prompt in enumerate(prompts):
        ids = llm.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            if llm.tokenizer.bos_id is None:
                raise invalid_request(
                    f"prompt {index} is empty, and this model has no BOS token to start from.",
                    param="prompt",
                )
            ids = [llm.tokenizer.bos_id]
        if any(not 0 <= t < llm.vocab_size for t in ids):
            raise invalid_request(
                f"prompt {index} holds token ids outside the vocabulary "
                f"(0 to {llm.vocab_size - 1}).",
                param="prompt",
            )
        budget = request.max_tokens or 1
        if len(ids) + budget > llm.max_seq_len:
            raise invalid_request(
                f"This model's maximum context length is {llm.max_seq_len} tokens. However, you "
                f"requested {len(ids) + budget} tokens ({len(ids)} in prompt {index}, {budget} "
                "in the completion). Reduce the length of the prompt or max_tokens.",
                param="max_tokens" if request.max_tokens else "prompt",
                code="context_length_exceeded",
            )
        encoded.append(ids)
    return encoded


class LegacyShaper:
    """Engine output → legacy choices: echoed prompts and the parallel-list logprobs."""

    def __init__(self, llm, request: CompletionRequest) -> None:
        self.tokenizer = llm.tokenizer
        self.request = request
        self.n = request.n or 1
        self.echoes = [self._echo(p) if request.echo else "" for p in prompts_of(request)]

    def _echo(self, prompt: str | list[int]) -> str:
        """The prompt as sent: its text, or its ids decoded."""
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)

    def logprobs(self, entries: list[TokenLogprob], offset: int) -> CompletionLogprobs | None:
        """Logprobs for `entries`, whose text starts at `offset` in the choice's text."""
        if self.request.logprobs is None:
            return None
        offsets = []
        for entry in entries:
            offsets.append(offset)
            offset += len(entry.text)
        top = None
        if self.request.logprobs:
            top = [{self._text(i): lp for i, lp in entry.top} for entry in entries]
        return CompletionLogprobs(
            tokens=[e.text for e in entries],
            token_logprobs=[e.logprob for e in entries],
            top_logprobs=top,
            text_offset=offsets,
        )

    def _text(self, token_id: int) -> str:
        return self.tokenizer.token_bytes(token_id).decode("utf-8", "replace")

    def choice(self, prompt: int, index: int, result: ChoiceResult) -> CompletionChoice:
        echo = self.echoes[prompt]
        return CompletionChoice(
            index=prompt * self.n + index,
            text=echo + result.text,
            logprobs=self.logprobs(result.logprobs, len(echo)),
            finish_reason=result.finish_reason,
        )


def completion(llm, request: CompletionRequest, fingerprint: str) -> flask.Response:
    """Generate the completions of a validated request, streamed or as one JSON object."""
    prompts = prompt_ids(llm, request)
    check_choices(llm, request)
    params = request.sampling_params()
    started = []
    try:
        for ids in prompts:
            started.append(start_generation(llm, ids, params))
    except BaseException:
        for engine_stream, _ in started:
            engine_stream.close()
        raise
    shaper = LegacyShaper(llm, request)
    reply = TextCompletion(
        id=f"cmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=request.model,
        system_fingerprint=fingerprint,
        choices=[],
    )
    prompt_tokens = sum(len(ids) for ids in prompts)
    if request.stream:
        events = stream_events(reply, shaper, started, prompt_tokens)
        response = flask.Response(events, mimetype=sse.CONTENT_TYPE, headers=sse.HEADERS)
        response.call_on_close(lambda: [s.close() for s, _ in started])
        return response
    try:
        results = [collect(deltas, params.n) for _, deltas in started]
    finally:
        for engine_stream, _ in started:
            engine_stream.close()
    reply.choices = [
        shaper.choice(p, i, result)
        for p, choices in enumerate(results)
        for i, result in enumerate(choices)
    ]
    completion_tokens = sum(r.tokens for choices in results for r in choices)
    reply.usage = Usage.of(prompt_tokens, completion_tokens)
    return flask.Response(reply.model_dump_json(), mimetype="application/json")


def stream_events(
    reply: TextCompletion, shaper: LegacyShaper, started, prompt_tokens: int
) -> Iterator[str]:
    """The SSE body: text chunks per choice (the echo first), one finish each, [usage], [DONE]."""

    def chunk(index: int, text: str, reason: str | None = None, logprobs=None) -> str:
        choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=reason)
        return sse.event(reply.model_copy(update={"choices": [choice]}))

    completion_tokens = 0
    try:
        for prompt, (_, deltas) in enumerate(started):
            offsets = dict.fromkeys(range(shaper.n), len(shaper.echoes[prompt]))
            if shaper.echoes[prompt]:
                for i in range(shaper.n):
                    yield chunk(prompt * shaper.n + i, shaper.echoes[prompt])
            for delta in deltas:
                completion_tokens += len(delta.token_ids)
                logprobs = shaper.logprobs(list(delta.logprobs), offsets[delta.index])
                offsets[delta.index] += len(delta.text)
                if delta.text or delta.finish_reason or delta.logprobs:
                    index = prompt * shaper.n + delta.index
                    yield chunk(index, delta.text, delta.finish_reason, logprobs)
        if shaper.request.include_usage:
            usage = Usage.of(prompt_tokens, completion_tokens)
            yield sse.event(reply.model_copy(update={"choices": [], "usage": usage}))
    except Exception:
        log.exception("generation failed after the response started")
        yield sse.error(internal_error())
    finally:
        for engine_stream, _ in started:
            engine_stream.close()
    yield sse.done()
