"""The Python API: load a model, then chat with it, streaming or not, with no HTTP.

from model import LLM
llm = LLM()                       # the bundled SmolLM2-135M-Instruct
print(llm.chat("What is JAX?", temperature=0))
for piece in llm.chat([{"role": "user", "content": "Hi"}], stream=True):
    print(piece, end="")
"""

import logging
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from functools import cached_property
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from model.engine.engine import BLOCK_SIZE, Engine
from model.engine.executables import open_compile_cache
from model.engine.pooling import mean_hidden_states
from model.engine.scheduler import Scheduler
from model.engine.speculative import Speculation
from model.engine.stats import SchedulerStats
from model.engine.variants import FIRST_NEEDED
from model.limits import (
    DEFAULT_BATCH,
    DEFAULT_MAX_QUEUE,
    DEFAULT_PREFILL_SHARE,
    DEFAULT_SPECULATIVE_TOKENS,
    PROMPT,
    Names,
    check_embedding_input,
    check_request,
)
from model.text.stream import ChoiceText
from model.types import Choices, Completion, Delta, Embeddings, SamplingParams
from model.weights.sources import cache_dir, load_model, resolve_model

if TYPE_CHECKING:
    from model.text.grammar import Grammars
from sharding import maybe_initialize_distributed

log = logging.getLogger(__name__)

Messages = str | Sequence[dict]
SEED_STRIDE = 0x9E3779B97F4A7C15  # choice i of a seeded request uses seed + i * stride
QUIET_S = 0.5  # idle seconds before the background loads another executable


def compute_dtype(name: str | None) -> jnp.dtype:
    """ "auto" (or None) is float32 on CPU, where XLA's bf16 matmuls are slow, else bfloat16."""
    if name in (None, "", "auto"):
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be auto, float32 or bfloat16, not {name!r}")
    return jnp.dtype(name)


def kv_cache_dtype(name: str | None):
    """The KV pool's element type named by JAXCHAT_KV_DTYPE (None for "auto")."""
    if name in (None, "auto"):
        return None
    if name not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"kv_dtype must be auto, float32, float16 or bfloat16, not {name!r}")
    return jnp.dtype(name)


class LLM:
    """A loaded model with its tokenizer, chat template and compiled engine.

    model: a GGUF path, a Hugging Face directory, a jaxchat checkpoint directory
    (model/weights/orbax.py), or None for the bundled default. max_seq_len bounds
    prompt + completion tokens (default and at most: the model's own context).
    batch: decode slots run together (continuous batching); max_queue bounds
    the requests waiting for a slot. kv_pool: the KV pool's size, in tokens
    ("65536" or an int) or as a fraction of free memory ("0.5"); default: see
    model/engine/state.py's `default_pool_tokens`. kv_dtype: the pool's element type,
    "float32", "float16" or "bfloat16" (None or "auto": the compute dtype; float16 halves
    the pool's memory, see the README). mesh: a Mesh or a
    "DATAxMODEL" spec such as "2x4" (default: every device, shaped to fit the
    model). compile_cache: a directory or gs:// prefix keeping compiled
    executables across restarts (model/engine/executables.py). unrolled_decode:
    whether small decode steps also get unrolled executables (see Engine; default:
    on CPU without the quantized kernels). speculative: "ngram" (prompt-lookup
    drafts, up to `speculative_tokens` per step: model/engine/speculative.py) or "off".
    prefill_share: prompt work beside decoding streams (model/engine/pacing.py).
    Any number of threads may share one LLM.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        max_seq_len: int | None = None,
        batch: int = DEFAULT_BATCH,
        max_queue: int = DEFAULT_MAX_QUEUE,
        kv_pool: str | int | None = None,
        mesh: str | Mesh | None = None,
        dtype: str | None = None,
        kv_dtype: str | None = None,
        compile_cache: str | None = None,
        unrolled_decode: bool | None = None,
        speculative: str = "ngram",
        speculative_tokens: int = DEFAULT_SPECULATIVE_TOKENS,
        prefill_share: float = DEFAULT_PREFILL_SHARE,
    ) -> None:
        maybe_initialize_distributed()  # multi-host slices: before any backend use
        self.compile_cache = open_compile_cache(compile_cache, cache_dir())
        self.path = resolve_model(model)
        self.dtype = compute_dtype(dtype)
        # With a compile cache, start-up is worth caching: a GGUF is prepared once.
        prepared = cache_dir() / "models" if self.compile_cache else None
        loaded = load_model(self.path, mesh, self.dtype, prepared)
        self.config, self.tokenizer = loaded.config, loaded.tokenizer
        self.template = loaded.template
        self.max_seq_len = min(max_seq_len or self.config.max_position, self.config.max_position)
        self.engine = Engine(
            self.config,
            loaded.params,
            max_seq_len=self.max_seq_len,
            batch=batch,
            pool_tokens=None if kv_pool is None else str(kv_pool),
            stop_ids=self.tokenizer.stop_ids,
            dtype=self.dtype,
            kv_dtype=kv_cache_dtype(kv_dtype),
            mesh=loaded.mesh,
            executables=self.compile_cache.executables if self.compile_cache else None,
            unrolled=unrolled_decode,
            blocks=loaded.blocks,
        )
        drafting = Speculation(speculative, speculative_tokens)
        self.scheduler = Scheduler(self.engine, max_queue, drafting, prefill_share)

    def describe(self) -> dict[str, object]:
        """What is served, for the start-up log (the quantized kernel: model/kernels)."""
        devices = list(self.engine.mesh.devices.flat)
        return {
            "model": str(self.path),
            "devices": f"{len(devices)} x {devices[0].device_kind}",
            "mesh": dict(self.engine.mesh.shape),
            "context": self.max_seq_len,
            "slots": self.batch,
            "kv_pool_tokens": self.engine.pool_blocks * BLOCK_SIZE,
            "dtype": str(self.dtype),
            "kv_dtype": str(self.engine.kv_dtype),
            "quantized_kernel": self.engine.kernel is not None,
            "speculative": self.scheduler.speculation.mode,
        }

    def stats(self) -> SchedulerStats:
        """What the scheduler is doing now (running, waiting, pool use, step times)."""
        return SchedulerStats.of(self.scheduler, self.engine.variants.pending())

    @property
    def failed(self) -> bool:
        """True once the engine raised: the scheduler no longer serves requests."""
        return self.scheduler.failed

    @property
    def batch(self) -> int:
        """Decode slots: the most choices one request can have."""
        return self.engine.batch

    @property
    def max_queue(self) -> int:
        """Requests that may wait for a slot (0: no bound)."""
        return self.scheduler.waiting.maxsize

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def width(self) -> int:
        """The model's hidden width: the length of its embeddings."""
        return self.config.dim

    @cached_property
    def grammars(self) -> "Grammars":
        """Grammar compilation for this tokenizer (built on first use: about a second)."""
        from model.text.grammar import Grammars

        return Grammars(self.tokenizer)

    def warmup(self, *, wait: bool = True) -> None:
        """Compile every step shape serving can use; afterwards no request compiles.

        With a compile cache, executables compiled here are saved (and pushed to a gs://
        cache), and cached ones loaded. wait=False returns once what a first short request
        needs is in memory (FIRST_NEEDED, loaded or compiled): the others load or compile
        in a background thread, then the upgrades (small or unrolled decode steps), each
        while nothing is served (they take the cores and the interpreter; a request that
        needs one first gets it itself).
        """
        if wait:
            self.engine.variants.warmup()
            self.engine.variants.preload()
            self.engine.variants.upgrade()
            self._push()
            return
        self.engine.variants.warmup(count=FIRST_NEEDED)
        self._push()  # (the rest once the background has compiled them)
        self.engine.variants.preload(count=FIRST_NEEDED)
        # Not a daemon, whoever starts it: at exit it finishes the executable it is on and
        # stops (a daemon thread inside XLA at finalisation aborts the process).
        threading.Thread(target=_preload, args=(self,), name="preload", daemon=False).start()

    def _push(self) -> None:
        if self.compile_cache is not None and self.engine.compilations:
            self.compile_cache.push()

    def encode_chat(self, messages: Messages, tools: list[dict] | None = None) -> list[int]:
        """Render messages with the chat template (plus the generation prompt) → token ids.

        Raises ValueError (TemplateError) when the template rejects the messages.
        """
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        text = self.template.render(list(messages), add_generation_prompt=True, tools=tools)
        return self.tokenizer.encode(text)

    def check(
        self, prompt_ids: Sequence[int], params: SamplingParams, names: Names = PROMPT
    ) -> int:
        """The completion budget of a request this model can serve; InvalidRequest (a
        ValueError) otherwise (model/limits.py). `names`: the caller's field names."""
        return check_request(
            prompt_ids,
            params,
            vocab_size=self.vocab_size,
            max_seq_len=self.max_seq_len,
            slots=self.batch,
            names=names,
        )

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[Delta]:
        """Generate from token ids, yielding a Delta per sampled token of each choice.

        Text in the deltas is final: whole UTF-8 characters, never a possible
        start of a stop string. Each choice's last delta has its finish_reason;
        deltas of the n choices interleave. Closing the iterator early cancels
        the request. Raises ValueError when the prompt is empty or holds ids
        outside the vocabulary, or the request cannot fit the context or the
        batch; QueueFull when the scheduler is full; RequestFailed (from the
        iterator) when this request failed inside the engine.
        """
        budget = self.check(prompt_ids, params)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        seeds = [(seed + i * SEED_STRIDE) & (2**64 - 1) for i in range(params.n)]
        constraints = None
        if params.grammar is not None:
            constraints = [self.grammars.matcher(params.grammar) for _ in range(params.n)]
        handle = self.scheduler.submit(
            prompt_ids,
            [self.engine.sampling(params, s, prompt_ids) for s in seeds],
            budget,
            not params.ignore_eos,
            constraints=constraints,
            top_logprobs=params.top_logprobs if params.logprobs else 0,
        )
        choices = [ChoiceText(self.tokenizer, params, i) for i in range(params.n)]
        running = params.n
        try:
            for event in handle:
                choice = choices[event.index]
                if choice.finished:
                    continue
                delta = choice.add(event)
                if delta.finish_reason and event.finish_reason is None:
                    handle.cancel(event.index)  # a stop string ended it: free the slot
                yield delta
                running -= delta.finish_reason is not None
                if not running:
                    return
        finally:
            handle.cancel()  # a no-op when finished; frees the slots when abandoned

    def embed(self, inputs: Sequence[str | Sequence[int]]) -> Embeddings:
        """Embeddings of texts (tokenized as prompts are) or token-id lists: each the mean
        of the model's final hidden states over its tokens, L2-normalised, computed in the
        engine's own steps beside generations. Raises InvalidRequest (a ValueError) for an
        empty or too long input or ids outside the vocabulary; QueueFull; RequestFailed."""
        ids = [self.tokenizer.encode(x) if isinstance(x, str) else list(x) for x in inputs]
        for i, one in enumerate(ids):
            name = f"input[{i}]" if len(ids) > 1 else "input"
            check_embedding_input(one, self.vocab_size, self.max_seq_len, name)
        means = mean_hidden_states(self.scheduler, self.engine, ids, window=self.batch)
        vectors = means / np.linalg.norm(means, axis=1, keepdims=True)
        return Embeddings(vectors, tuple(map(len, ids)))

    def generate_choices(
        self, prompt_ids: Sequence[int], params: SamplingParams
    ) -> list[Completion]:
        """Run `stream` to the end and collect each choice's result."""
        choices = Choices(params.n)
        for delta in self.stream(prompt_ids, params):
            choices.add(delta)
        return choices.completions()

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Completion:
        """Run `stream` to the end and collect the result (the first choice)."""
        return self.generate_choices(prompt_ids, params)[0]

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


def _preload(llm: LLM) -> None:
    """Load (or compile) the other executables, then get the faster ones, each once
    nothing has been served for QUIET_S: loading and compiling take the cores a request's
    steps run on (a request that needs one gets it itself), and the request that woke a
    new instance comes just after it is ready. Then push what was compiled to the cache."""
    alive = threading.main_thread().is_alive

    def when_idle() -> bool:
        quiet_since = time.monotonic()
        while alive() and time.monotonic() - quiet_since < QUIET_S:
            time.sleep(QUIET_S / 10)
            if not llm.scheduler.idle:
                quiet_since = time.monotonic()
        return alive()

    try:
        llm.engine.variants.preload(until=when_idle)
        llm.engine.variants.upgrade(until=when_idle)
        llm._push()
    except Exception:  # a request that needs a stored executable loads it itself
        log.exception("loading or compiling the faster executables failed")
