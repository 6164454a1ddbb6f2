"""The serving process's model: loaded and warmed up in a background thread.

functions-framework imports the source (and so builds the handler) in the
gunicorn master, then forks the workers. JAX must not initialise a backend in
the master, and threads do not survive a fork, so nothing loads at import:
loading starts in each forked worker (an `os.register_at_fork` hook), or on the
first request when there was no fork (Flask test client, debug server).
Until the load finishes, requests get 503 with Retry-After.

`ServedModel` is what the handler uses of `model.llm.LLM`; the tests serve a fake.
"""

import functools
import gc
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

from handler.errors import engine_failed, model_failed, model_loading
from handler.settings import Settings
from model.limits import Names
from model.types import Delta, Embeddings, SamplingParams

if TYPE_CHECKING:
    from model.engine.stats import SchedulerStats
    from model.llm import LLM
    from model.text.grammar import Grammars
    from model.text.tokenizer import Tokenizer

log = logging.getLogger(__name__)

Status = Literal["loading", "ready", "failed"]


class ServedModel(Protocol):
    """What the handler uses of a loaded `model.llm.LLM` (see it for the details)."""

    @property
    def tokenizer(self) -> "Tokenizer": ...
    @property
    def grammars(self) -> "Grammars": ...
    @property
    def max_seq_len(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def batch(self) -> int:
        """Decode slots: the most choices one request can have."""

    @property
    def max_queue(self) -> int:
        """Requests that may wait for a slot (0: no bound)."""

    @property
    def failed(self) -> bool:
        """True once the engine failed: it serves no more requests."""

    @property
    def width(self) -> int:
        """The model's hidden width: the length of its embeddings."""

    def embed(self, inputs: Sequence[str | Sequence[int]]) -> "Embeddings": ...

    def warmup(self, *, wait: bool = True) -> None: ...

    def describe(self) -> dict[str, object]:
        """What is served (model, devices, mesh, context…), for the start-up log."""

    def stats(self) -> "SchedulerStats":
        """Running and waiting requests, pool use and step times, for /metrics."""

    def encode_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """Render the chat template and tokenize; ValueError when the template refuses."""

    def check(self, prompt_ids: Sequence[int], params: SamplingParams, names: Names) -> int:
        """The completion budget; InvalidRequest unless the model can serve the request."""

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[Delta]:
        """Generate; closing the iterator cancels. Raises what model/llm.py documents."""


def load_llm(settings: Settings) -> "LLM":
    """Build the engine from settings (the production factory)."""
    # Imported here, not at module level: the model package pulls in JAX, which
    # the gunicorn master must not set up before it forks.
    from model.llm import LLM

    return LLM(
        settings.model,
        max_seq_len=settings.max_seq_len,
        batch=settings.max_batch,
        max_queue=settings.max_queue,
        kv_pool=settings.kv_pool,
        mesh=settings.mesh,
        dtype=settings.llm_dtype,
        kv_dtype=settings.kv_dtype,
        compile_cache=settings.compile_cache,
        unrolled_decode=settings.llm_unrolled_decode,
        speculative=settings.speculative,
        speculative_tokens=settings.speculative_tokens,
        prefill_share=settings.prefill_share,
    )


def resume_collector() -> None:
    """Where main.py paused Python's cyclic collector for the start-up, resume it, with
    everything that exists now (the modules, the loaded model) frozen out of its passes.
    That holds the few cycles the load left for good: about 2,000 objects for SmolLM2,
    warm or compiling, where a full pass to find them first takes 0.2-0.3 s on a 2-core
    CPU. Elsewhere (the collector running: tests, notebooks) nothing changes."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


class ModelHost:
    """Owns one LLM: `start()` loads it in the background, `llm()` hands it out.

    `factory` builds the (not yet warmed up) LLM; tests pass a fake.
    """

    def __init__(self, factory: Callable[[], ServedModel]):
        self._factory = factory
        self._reset()

    @classmethod
    def from_settings(cls, settings: Settings) -> "ModelHost":
        """A host that loads the model named by `settings`."""
        return cls(functools.partial(load_llm, settings))

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._finished = threading.Event()  # set once loading succeeded or failed
        self._thread: threading.Thread | None = None
        self._llm: ServedModel | None = None
        self._error: str | None = None

    def start(self) -> None:
        """Begin loading in a thread, unless already begun. Cheap to call often.

        Not a daemon: a process told to stop while it loads (SIGTERM, as Cloud Run sends
        when it scales in) finishes the load and then exits. A daemon thread inside XLA
        when the interpreter finalises aborts the process (seen with model/llm.py's
        background loader)."""
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._load, name="model-load", daemon=False)
                self._thread.start()

    def start_in_forked_children(self) -> None:
        """Start loading in every process forked from this one (gunicorn workers)."""
        # A weak reference, so that the hook (which lives as long as the process)
        # does not keep a discarded host alive, e.g. in tests building many handlers.
        ref = weakref.ref(self)

        def after_fork_in_child() -> None:
            host = ref()
            if host is not None:
                host._restart_after_fork()

        os.register_at_fork(after_in_child=after_fork_in_child)

    def _restart_after_fork(self) -> None:
        # The parent's loader thread (if any) did not survive the fork, and a JAX
        # backend inherited through fork is unusable: load afresh in the child.
        self._reset()
        self.start()

    def _load(self) -> None:
        started = time.monotonic()
        try:
            llm = self._factory()
            loaded = time.monotonic()
            # Cached executables finish loading in the background while requests
            # are served (a request loads what it needs itself).
            llm.warmup(wait=False)
        except Exception as exc:
            log.exception("model failed to load")
            self._error = f"{type(exc).__name__}: {exc}"
        else:
            self._llm = llm
            times = {
                "load_s": round(loaded - started, 2),
                "compile_s": round(time.monotonic() - loaded, 2),
            }
            served = llm.describe()
            log.info(
                "model ready: %s; loaded in %.1f s, executables compiled or loaded in %.1f s",
                ", ".join(f"{k} {v}" for k, v in served.items()),
                times["load_s"],
                times["compile_s"],
                extra={"fields": {**served, **times}},
            )
        finally:
            resume_collector()
            self._finished.set()

    @property
    def status(self) -> Status:
        """ "ready" once warmed up, "failed" if loading or the engine failed, else "loading"."""
        if self._llm is not None:
            return "failed" if self._llm.failed else "ready"
        return "failed" if self._error is not None else "loading"

    @property
    def error(self) -> str | None:
        """Why loading or the engine failed, or None."""
        if self._llm is not None and self._llm.failed:
            return "the engine failed; restart the server"
        return self._error

    def wait(self, timeout: float | None = None) -> Status:
        """Start loading if needed and block until it finishes or `timeout` passes."""
        self.start()
        self._finished.wait(timeout)
        return self.status

    def llm(self) -> ServedModel:
        """The ready LLM; raises a 503 APIError while loading or after a failed load."""
        self.start()
        if self._llm is not None and not self._llm.failed:
            return self._llm
        if self._llm is not None:
            raise engine_failed()
        raise model_failed() if self.status == "failed" else model_loading()
