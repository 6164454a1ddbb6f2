"""The Python API: load a model, then chat with it, streaming or not, with no HTTP.

from model import LLM
llm = LLM()                       # the bundled SmolLM2-135M-Instruct
print(llm.chat("What is JAX?", temperature=0))
for piece in llm.chat([{"role": "user", "content": "Hi"}], stream=True):
    print(piece, end="")
"""

import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from model.chat_template import ChatTemplate
from model.detokenizer import IncrementalDetokenizer
from model.engine import Engine, one_slot_sampling
from model.gguf_loader import load_gguf
from model.sampling_params import Delta, FinishReason, SamplingParams
from model.scheduler import Scheduler, TokenEvent
from model.sources import resolve_model
from model.stop_strings import StopStringMatcher
from model.tokenizer import Tokenizer
from sharding import make_mesh, maybe_initialize_distributed

DEFAULT_MAX_SEQ_LEN = 2048
DEFAULT_BATCH = 32
DEFAULT_MAX_QUEUE = 256
Messages = str | Sequence[dict]


def compute_dtype(name: str | None) -> jnp.dtype:
    """ "auto" (or None) is float32 on CPU, where XLA's bf16 matmuls are slow, else bfloat16."""
    if name in (None, "", "auto"):
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be auto, float32 or bfloat16, not {name!r}")
    return jnp.dtype(name)


@dataclass(frozen=True)
class Completion:
    """A finished generation: its text, every sampled token id, and why it ended."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason


class LLM:
    """A loaded model with its tokenizer, chat template and compiled engine.

    model: a GGUF path, or None for the bundled default. max_seq_len bounds
    prompt + completion tokens (default 2048, at most the model's context).
    batch: decode slots run together (continuous batching); max_queue bounds
    the requests waiting for a slot. prefill_buckets: prompt lengths prefill
    is compiled for (default powers of two). mesh: a Mesh or a "DATAxMODEL"
    spec such as "2x4" (default: every device, shaped to fit the model).
    Any number of threads may share one LLM.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        max_seq_len: int | None = None,
        batch: int = DEFAULT_BATCH,
        max_queue: int = DEFAULT_MAX_QUEUE,
        prefill_buckets: Sequence[int] | None = None,
        mesh: str | Mesh | None = None,
        dtype: str | None = None,
    ) -> None:
        maybe_initialize_distributed()  # multi-host slices: before any backend use
        self.path = resolve_model(model)
        self.dtype = compute_dtype(dtype)
        self.config, params, reader = load_gguf(self.path, self.dtype)
        if not isinstance(mesh, Mesh):
            mesh = make_mesh(mesh, config=self.config)
        self.tokenizer = Tokenizer.from_gguf(reader)
        self.template = ChatTemplate.from_gguf(reader, self.tokenizer)
        self.max_seq_len = min(max_seq_len or DEFAULT_MAX_SEQ_LEN, self.config.max_position)
        self.engine = Engine(
            self.config,
            params,
            max_seq_len=self.max_seq_len,
            batch=batch,
            stop_ids=self.tokenizer.stop_ids,
            prefill_buckets=prefill_buckets,
            dtype=self.dtype,
            mesh=mesh,
        )
        self.scheduler = Scheduler(self.engine, max_queue=max_queue)

    @property
    def failed(self) -> bool:
        """True once the engine raised: the scheduler no longer serves requests."""
        return self.scheduler.failed

    def warmup(self) -> None:
        """Compile every shape serving can use; afterwards no request compiles."""
        self.engine.warmup()

    def encode_chat(self, messages: Messages, tools: list[dict] | None = None) -> list[int]:
        """Render messages with the chat template (plus the generation prompt) → token ids.

        Raises ValueError (TemplateError) when the template rejects the messages.
        """
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        text = self.template.render(list(messages), add_generation_prompt=True, tools=tools)
        return self.tokenizer.encode(text)

    def max_new_tokens(self, prompt_len: int, max_tokens: int | None) -> int:
        """How many tokens a request may generate; ValueError when it cannot fit."""
        room = self.max_seq_len - prompt_len
        if room <= 0:
            raise ValueError(
                f"This model's maximum context length is {self.max_seq_len} tokens. "
                f"However, your messages resulted in {prompt_len} tokens."
            )
        if max_tokens is None:
            return room
        if max_tokens > room:
            raise ValueError(
                f"This model's maximum context length is {self.max_seq_len} tokens. "
                f"However, you requested {prompt_len + max_tokens} tokens "
                f"({prompt_len} in the messages, {max_tokens} in the completion)."
            )
        return max_tokens

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[Delta]:
        """Generate from token ids, yielding a Delta per sampled token.

        Text in the deltas is final: whole UTF-8 characters, never a possible
        start of a stop string. The last delta has the finish_reason. Closing
        the iterator early cancels the request. Raises ValueError when the
        request cannot fit the context, QueueFull when the scheduler is full.
        """
        budget = self.max_new_tokens(len(prompt_ids), params.max_tokens)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        sampling = one_slot_sampling(params.temperature, params.top_p, params.top_k, seed)
        handle = self.scheduler.submit(prompt_ids, sampling, budget, not params.ignore_eos)
        try:
            yield from self._text_deltas(handle, params.stop, params.ignore_eos)
        finally:
            handle.cancel()  # a no-op when finished; frees the slot when abandoned

    def _text_deltas(
        self, events: Iterator[TokenEvent], stop: Sequence[str], ignore_eos: bool
    ) -> Iterator[Delta]:
        """Token events → Deltas of final text, cut at the first stop string."""
        detok = IncrementalDetokenizer(self.tokenizer)
        stops = StopStringMatcher(stop)

        def final_text(text: str) -> tuple[str, bool]:
            """`text` plus whatever detokenizer and stop matcher still hold."""
            tail, stopped = stops.add(detok.flush())
            return text + tail + ("" if stopped else stops.flush()), stopped

        for event in events:
            token, reason = event.token, event.finish_reason
            if token in self.tokenizer.stop_ids and not ignore_eos:
                text, stopped = "", False
            else:
                text, stopped = stops.add(detok.add(token))
            if reason and not stopped:
                text, stopped = final_text(text)
            if stopped:
                yield Delta(text, (token,), "stop")
                return
            yield Delta(text, (token,), reason)
            if reason:
                return

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Completion:
        """Run `stream` to the end and collect the result."""
        text, ids, reason = [], [], "length"
        for delta in self.stream(prompt_ids, params):
            text.append(delta.text)
            ids.extend(delta.token_ids)
            reason = delta.finish_reason or reason
        return Completion("".join(text), tuple(ids), reason)

    def chat(self, messages: Messages, *, stream: bool = False, **sampling) -> str | Iterator[str]:
        """Reply to a conversation (or a single user string).

        sampling: SamplingParams fields (temperature, top_p, top_k, max_tokens,
        seed, stop). Returns the reply text, or with stream=True an iterator of
        text pieces.
        """
        if isinstance(sampling.get("stop"), str):
            sampling["stop"] = (sampling["stop"],)
        params = SamplingParams(**sampling)
        ids = self.encode_chat(messages)
        if stream:
            return (d.text for d in self.stream(ids, params) if d.text)
        return self.generate(ids, params).text
