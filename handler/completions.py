"""`POST /v1/completions`: the legacy prompt API, on the same engine as chat.

The prompt is sent to the model as it is (no chat template): a string, token
ids, or a batch of either. Every prompt gets n choices; choice p*n + i is the
i-th choice of prompt p. All prompts are submitted before any is read, so a
batch decodes together. Streams carry `text_completion` chunks; a streamed
batch sends each prompt's choices in turn.
"""

import functools
from collections.abc import Iterator, Sequence

from handler import sse
from handler.errors import invalid_request
from handler.generation import (
    Generation,
    Reply,
    ReplyHeader,
    check_request,
    close_all,
    collect,
    start_generations,
)
from handler.model_host import ServedModel
from handler.quota import Meter
from handler.requests import CompletionRequest
from handler.responses import (
    CompletionChoice,
    CompletionLogprobs,
    TextCompletion,
    Usage,
)
from model.limits import Names
from model.text.tokenizer import Tokenizer
from model.types import ChoiceResult, Choices, TokenLogprob

# What this API calls the prompt and the completion budget, in 400s.
NAMES = Names(prompt="prompt", max_tokens="max_tokens")


def completion(
    llm: ServedModel, request: CompletionRequest, fingerprint: str, meter: Meter
) -> Reply:
    """Generate the completions of a validated request, streamed or as one JSON object;
    the request's tokens are reserved with `meter` before it starts."""
    prompts = prompt_ids(llm, request)
    params = request.sampling_params()
    reserved = 0
    for index, ids in enumerate(prompts):
        batch_index = index if len(prompts) > 1 else None
        reserved += len(ids) + params.n * check_request(llm, ids, params, NAMES, batch_index)
    meter.admit(reserved)
    generations = start_generations(llm, prompts, params)
    shaper = LegacyShaper(llm.tokenizer, request)
    reply = TextCompletion(
        **ReplyHeader.new("cmpl", request.model, fingerprint).fields(), choices=[]
    )
    if request.stream:
        events = legacy_events(reply, shaper, generations)
        return Reply(generations, events=events, close=functools.partial(close_all, generations))
    results = collect(generations, params.n)
    reply.choices = [
        shaper.choice(p, i, result)
        for p, choices in enumerate(results)
        for i, result in enumerate(choices)
    ]
    completion_tokens = sum(r.tokens for choices in results for r in choices)
    reply.usage = Usage.of(sum(g.prompt_tokens for g in generations), completion_tokens)
    return Reply(generations, body=reply)


def prompt_ids(llm: ServedModel, request: CompletionRequest) -> list[list[int]]:
    """Each prompt as token ids (checked against the model by `check_request`).

    An empty prompt starts from the model's BOS token (as OpenAI's models start
    from <|endoftext|>); a model without one cannot continue nothing: 400.
    """
    prompts = request.prompts
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
            bos_id = llm.tokenizer.bos_id
            if bos_id is None:
                raise invalid_request(
                    f"prompt {index} is empty, and this model has no BOS token to start from.",
                    param="prompt",
                )
            ids = [bos_id]
        encoded.append(ids)
    return encoded


class LegacyShaper:
    """Engine output → legacy choices: echoed prompts and the parallel-list logprobs."""

    def __init__(self, tokenizer: Tokenizer, request: CompletionRequest) -> None:
        self.tokenizer = tokenizer
        self.request = request
        self.n = request.n or 1
        self.echoes = [self._echo(p) if request.echo else "" for p in request.prompts]

    def _echo(self, prompt: str | list[int]) -> str:
        """The prompt as sent: its text, or its ids decoded."""
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)

    def logprobs(self, entries: Sequence[TokenLogprob], offset: int) -> CompletionLogprobs | None:
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
            finish_reason=result.reason,
        )


def legacy_events(
    reply: TextCompletion, shaper: LegacyShaper, generations: Sequence[Generation]
) -> Iterator[str]:
    """The SSE events: text chunks per choice (the echo first), one finish each, and the
    usage chunk when asked for (handler/sse.py adds [DONE])."""

    def event(
        index: int, text: str, reason: str | None = None, logprobs: CompletionLogprobs | None = None
    ) -> str:
        choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=reason)
        return sse.event(reply.model_copy(update={"choices": [choice]}))

    n = shaper.n
    completion_tokens = 0
    for prompt, generation in enumerate(generations):
        echo = shaper.echoes[prompt]
        if echo:
            for i in range(n):
                yield event(prompt * n + i, echo)
        choices = Choices(n)
        for delta in generation.deltas:
            result = choices.add(delta)
            if delta.text or delta.finish_reason or delta.logprobs:
                offset = len(echo) + len(result.text) - len(delta.text)
                logprobs = shaper.logprobs(delta.logprobs, offset)
                yield event(prompt * n + delta.index, delta.text, delta.finish_reason, logprobs)
        choices.check_finished()
        completion_tokens += choices.completion_tokens
    if shaper.request.include_usage:
        usage = Usage.of(sum(g.prompt_tokens for g in generations), completion_tokens)
        yield sse.event(reply.model_copy(update={"choices": [], "usage": usage}))
