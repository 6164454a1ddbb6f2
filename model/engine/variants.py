"""The engine's compiled variants: the few step shapes, and their executables.

A step has R decode rows (slot r is row r) and a prefill region of P tokens.
Its cost follows its shape, not the context: a lone stream wants a one-row step
(a matrix-vector product streams the weights once), a full batch all B rows,
and prefill a region whose size trades time to first token against the pause
it puts on the streams already decoding. The shapes, for B slots:

- decode only: R = 1, 8, 32, … up to B, with P = 0;
- decode with a small prefill chunk (SMALL_CHUNK tokens): R = 8, 32, … B, so
  new prompts join a running batch without stalling it for long;
- a large chunk (LARGE_CHUNK tokens) with R = B, for prompts when nothing decodes.

With B = 32 that is six step shapes, whatever the context length or pool size.
Each is compiled with its layers in one scan (about 1.3 s for SmolLM2-135M on
a 2-core CPU). On CPU, decode-only steps of 2 and 4 rows (`small_shapes`) are
upgrades, run only once compiled. Where the f32 weights are sliced out of the
stack every step (CPU without jaxchat's kernels), the decode-only shapes of up
to 8 rows and the small ones are also compiled with unrolled layers (3-6 s, but
a one-row f32 step then runs in 30 ms instead of 48), as upgrades.

`Variants` holds the executables by name: loaded from an executable store, or
compiled, on first use, once (a lock per variant). The required ones are what
serving needs (`warmup` compiles them before the model is ready: all of them, or for
a server those a lone short request needs, the rest then compiled in the background
while nothing is served); upgrades are faster executables for the same steps, which
`upgrade` loads or compiles in the background and the engine uses once they are
there: no request ever compiles an upgrade.
"""

import logging
import os
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import cast

import jax

from model.engine.executables import ExecutableStore, compile_variant

log = logging.getLogger(__name__)

# The small region: a step's XLA ops run over all of its columns, used or not, so beside
# decoding streams a region of 32 costs less than one of 64 for the same prompt tokens.
# 8 streams while a 4,000-token prompt prefills through the server, 2-core CPU, one run
# each: streams' gaps p99 5.1x their p50 alone and the prompt's first token after 16.0 s
# with 64, 4.3x and 12.1 s with 32, 3.5x and 18.0 s with 16; the load at 1, 8, 32 and 64
# streams was level between 32 and 64, while 16 took a lone request's first token from
# 0.065 to 0.099 s (its prompt in several steps).
SMALL_CHUNK = 32
LARGE_CHUNK = 512
# Prompt tokens waiting, up to which small chunks beat one large chunk even with nothing
# decoding: four (32, 64) steps took 0.82 s on a 2-core CPU, one (32, 512) step 0.97 s,
# and the first prompts among them get their first token after the first small step.
SMALL_PREFILL_MAX = 4 * SMALL_CHUNK
# Prompts waiting, from which the large region runs even while streams decode (if more
# than SMALL_PREFILL_MAX tokens wait): a burst of new requests is prefilled in one or two
# large steps instead of a small chunk a step (32 streams through the server: TTFT p50
# 1.36 -> 0.50 s, 324 -> 414 tok/s in all), while one long prompt still goes in small
# chunks beside the streams it would stall.
BURST_PROMPTS = 4
# With nothing decoding, a burst's first step takes this share of its prompts (the first
# admitted), the next step the rest: most first tokens then come after a step of about
# half the work instead of all of it (mean time to first token is flat from a half to
# two thirds, and at three fifths the median request is in the first step). 32 chat
# prompts at once past their cached prefixes, in-process, one run each: TTFT p50 0.73 ->
# 0.49 s, p99 0.76 -> 0.91 s.
BURST_SHARE = 0.6


@dataclass(frozen=True, order=True)
class StepShape:
    """R decode rows and a prefill region of P tokens."""

    rows: int
    prefill: int

    @property
    def tokens(self) -> int:
        """T = R + P."""
        return self.rows + self.prefill


def row_buckets(batch: int) -> tuple[int, ...]:
    """Decode row counts for B slots: 1, then 8, 32, … below B, then B."""
    sizes, n = [1], 8
    while n < batch:
        sizes.append(n)
        n *= 4
    return tuple(sorted({*sizes, batch}))


def step_shapes(batch: int, max_seq_len: int) -> tuple[StepShape, ...]:
    """Every step shape an engine with `batch` slots compiles (see the module docstring)."""
    rows = row_buckets(batch)
    small, large = min(SMALL_CHUNK, max_seq_len), min(LARGE_CHUNK, max_seq_len)
    shapes = {StepShape(r, 0) for r in rows}
    shapes |= {StepShape(r, small) for r in rows if r >= min(8, batch)}
    shapes.add(StepShape(batch, large))
    return tuple(sorted(shapes))


def small_shapes(batch: int) -> tuple[StepShape, ...]:
    """Decode-only steps of 2 and 4 rows (below the 8-row bucket), compiled as upgrades
    on CPU: a lone stream verifying a few drafts, or 2-4 streams, run them instead of 8
    rows (on a 2-core CPU a 4-row step costs about 1.4 one-row steps, an 8-row step 3)."""
    return tuple(StepShape(r, 0) for r in (2, 4) if r < min(8, batch))


def unrolled_shapes(batch: int, max_seq_len: int) -> tuple[StepShape, ...]:
    """The step shapes also compiled with unrolled layers (on CPU), in the order they are:
    the decode-only buckets of up to 8 rows, then the small shapes, which only save time
    on top of them."""
    buckets = [s for s in step_shapes(batch, max_seq_len) if s.prefill == 0 and s.rows <= 8]
    return (*buckets, *small_shapes(batch))


def pick_shape(shapes: Sequence[StepShape], rows: int, prefill: int) -> StepShape:
    """The cheapest shape with at least `rows` rows and room for `prefill` tokens
    (the largest region there is, if none has room: the rest waits for the next step)."""
    fits = [s for s in shapes if s.rows >= rows and s.prefill >= prefill]
    if not fits:
        fits = [max((s for s in shapes if s.rows >= rows), key=lambda s: s.prefill)]
    return min(fits, key=lambda s: (s.tokens, s.rows))


Variant = tuple[str, object]  # (kind, size): ("step", StepShape), ("admit", 0), ("init", 0)


class Variants:
    """Compiled executables by variant: loaded from `store` or compiled by `lower(*variant)`.

    names: the required variants; upgrades: optional faster ones (see the module
    docstring).
    """

    def __init__(
        self,
        names: Sequence[Variant],
        lower: Callable[[str, object], jax.stages.Lowered],
        store: ExecutableStore | None,
        upgrades: Sequence[Variant] = (),
    ) -> None:
        self.names = tuple(names)
        self.upgrades = tuple(upgrades)
        self._lower = lower
        self._store = store
        self._compiled: dict[Variant, jax.stages.Compiled] = {}
        self._locks: defaultdict[Variant, threading.Lock] = defaultdict(threading.Lock)
        self._locks_lock = threading.Lock()
        self.compilations = 0  # variants compiled here
        self.loaded = 0  # variants loaded from the store

    def __call__(self, kind: str, size: object = 0) -> jax.stages.Compiled:
        """The executable of a variant, loaded or compiled on first use."""
        variant = (kind, size)
        compiled = self._compiled.get(variant)
        if compiled is not None:
            return compiled
        with self._locks_lock:
            lock = self._locks[variant]
        with lock:  # a request and the preloader may want the same variant
            if variant not in self._compiled:
                compiled = self._store.load(kind, _key(size)) if self._store else None
                if compiled is None:
                    compiled = self._compile(variant)
                else:
                    self.loaded += 1
                self._compiled[variant] = compiled
        return self._compiled[variant]

    def pending(self) -> int:
        """Required variants and upgrades not yet in memory (while the server loads or
        compiles them in the background, a request may stall behind that work)."""
        return sum(v not in self._compiled for v in (*self.names, *self.upgrades))

    def ready(self, kind: str, size: object = 0) -> bool:
        """Whether a variant is in memory (calling it will not load or compile)."""
        return (kind, size) in self._compiled

    def _compile(self, variant: Variant) -> jax.stages.Compiled:
        compiled, storable = compile_variant(self._lower(*variant))
        self.compilations += 1
        if self._store is not None and storable:
            self._store.save(variant[0], _key(variant[1]), compiled)
        return compiled

    def warmup(self, workers: int | None = None, count: int | None = None) -> None:
        """Compile every required variant the store lacks (of the first `count` in the
        order a lone short request needs them, if given: `preload` compiles the rest), a
        few at a time (XLA compiles off the GIL), with a progress bar on a terminal;
        stored ones are left to `preload`."""
        stored = self._store if self._store is not None else ()
        names = sorted(self.names, key=_load_order)[:count]
        todo = [v for v in names if v not in self._compiled and (v[0], _key(v[1])) not in stored]
        if not todo:
            return
        from tqdm import tqdm  # (20 ms of a start that compiles nothing)

        started = time.monotonic()
        quiet = not sys.stderr.isatty()
        bar = tqdm(total=len(todo), desc="compiling", unit="variant", disable=quiet)
        with bar, ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
            for _ in pool.map(lambda v: self(*v), todo):
                bar.update()
        log.info("compiled %d variants in %.1f s", len(todo), time.monotonic() - started)

    def preload(self, until: Callable[[], bool] = lambda: True, count: int | None = None) -> None:
        """Load (or compile, where the store lacks them) the required variants not yet in
        memory (the first `count` only, if given), in the order a lone short request needs
        them, stopping once `until()` is false."""
        for variant in sorted(self.names, key=_load_order)[:count]:
            if not until():
                return
            self(*variant)

    def upgrade(self, until: Callable[[], bool] = lambda: True) -> None:
        """Load or compile every upgrade not yet in memory, stopping early once `until()`
        is false (call it off the serving path)."""
        for variant in self.upgrades:
            if not until():
                return
            self(*variant)


def _key(size: object) -> object:
    """A variant's size as the store names it: a step's (shape, layers) → (R, P, layers)."""
    if isinstance(size, tuple) and isinstance(size[0], StepShape):
        return (size[0].rows, size[0].prefill, size[1])
    return size


FIRST_NEEDED = 4  # init, admit, a short prompt's step and a lone stream's decode step


def _load_order(variant: Variant) -> tuple[int, int]:
    """init and admit, then the smallest step with a prefill region (a short prompt's),
    then the rest by size (the one-row decode step first)."""
    kind, size = variant
    if kind != "step":
        return (-2, 0)
    shape = cast(tuple[StepShape, str], size)[0]
    first_prefill = shape.prefill and shape.prefill <= SMALL_CHUNK and shape.rows <= 8
    return (-1, 0) if first_prefill else (shape.tokens, shape.rows)
