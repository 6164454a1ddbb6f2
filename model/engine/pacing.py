"""Pacing: how much prompt work a step carries beside the streams that decode.

Every decoding stream waits for the whole step, so prompt tokens in it lengthen
their gaps between tokens by the tokens' cost. While streams decode, a prompt
too long to end within the step's region gets chunks cut to the room: the
prompt work that keeps a step within 1 + `share` times a decode-only step of
the same decode rows (JAXCHAT_PREFILL_SHARE, default 1). Its first chunk in a
step gets at least MIN_TOKENS, so a long prompt still advances every step. A
prompt that ends within the region goes whole and counts against the room: new
requests' first tokens are not held back (and a prompt cut into chunks could
continue only one a step, see the scheduler).

Costs are measured, not assumed: they differ by orders of magnitude between a
2-core CPU and a TPU, and a step with any prompt tokens may cost more than its
tokens (on CPU the quantized weights are expanded for a many-row product).
`Pacing` keeps the median time of recent decode-only steps (by their decode
rows: `decode_of`), and the room: the units of prompt work a step may carry,
steered after every step that carried prompt tokens towards the work that makes
such a step take 1 + share decode-only steps. A prompt token over a prior of p
positions (its prompt's positions already in the pool) is 1 + p / P0 units,
where P0 is the prior at which its attention takes as many FLOPs as its matrix
products (3,072 for SmolLM2: a token over a 4,000-token prior is 2.3 times one
over none), so the room carries fewer tokens as a long prompt's prior grows.
"""

import statistics
from collections import deque

from model.engine.variants import StepShape
from model.limits import DEFAULT_PREFILL_SHARE
from model.nn.config import ModelConfig

MIN_TOKENS = 4
FIRST_ROOM = 8.0  # units, until a step with prompt tokens has been timed
DECODE_STEPS = 32  # decode-only steps whose median is the baseline
STEER = (0.7, 1.3)  # the most one step changes the room by
OUTLIER = 20  # a step this many decode-only steps long steers nothing
LONG_STEP = 0.06  # seconds: a median decode-only step this long is "long" (see below)


def prior_scale(config: ModelConfig) -> float:
    """P0: matrix-product FLOPs per token per layer over attention FLOPs per token per
    prior position per layer (4·N·H: scores and values)."""
    c, heads = config, config.n_heads * config.head_dim
    weights = (
        c.dim * (heads + 2 * c.n_kv_heads * c.head_dim) + heads * c.dim + 3 * c.dim * c.ffn_dim
    )
    return 2 * weights / (4 * heads)


class Pacing:
    """Step costs, measured as steps are delivered, and the prompt work they allow."""

    def __init__(self, config: ModelConfig, share: float = DEFAULT_PREFILL_SHARE) -> None:
        self.scale = prior_scale(config)
        self.share = share
        self._decode: deque[float] = deque(maxlen=DECODE_STEPS)
        self._rows: dict[int, deque[float]] = {}  # the same, by their decode rows
        self._room = FIRST_ROOM
        self._timed: set[StepShape] = set()

    @property
    def decode(self) -> float | None:
        """The median seconds of the recent decode-only steps (None before any)."""
        return statistics.median(self._decode) if self._decode else None

    def decode_of(self, rows: int) -> float | None:
        """The median seconds of the recent decode-only steps of `rows` decode rows (of
        any, before one has been timed). A step with prompt tokens is held to the
        decode-only step with its own rows: where streams take speculative drafts, a
        decode-only step may carry their draft rows too (32 rows for 8 streams: about 2.5
        times as long on a 2-core CPU), while a step that carries a prompt chunk has no
        rows to spare for them, and the streams would be paced against steps they do not
        run."""
        timed = self._rows.get(rows)
        return statistics.median(timed) if timed else self.decode

    @property
    def long_steps(self) -> bool:
        """Whether decode-only steps take LONG_STEP or more (a median): then the scheduler
        reads the step in flight before it plans the next while a slot is free, so that a
        request that arrives during step n goes in n+1, not n+2 (32 streams on a 2-core CPU
        take about 110 ms a step). Where steps are short, the host's few milliseconds
        between steps, no longer overlapped with the step's, cost more than that saves."""
        decode = self.decode
        return decode is not None and decode >= LONG_STEP

    def units(self, prior: int, tokens: int) -> float:
        """The work of a chunk of `tokens` prompt tokens over `prior` computed positions."""
        return tokens * (1 + prior / self.scale)

    def fit(self, prior: int, room: float) -> int:
        """The most tokens a chunk over `prior` positions may have in `room` units."""
        return max(0, int(room / (1 + prior / self.scale)))

    def room(self) -> float | None:
        """Units of prompt work a step with decode rows may carry (None: any, as no
        decode-only step has been timed yet: there is nothing to measure against)."""
        return None if self.decode is None else self._room

    def measured(self, shape: StepShape, decoding: bool, units: float, seconds: float) -> None:
        """A step of `shape`, with or without decode rows, carrying `units` of prompt work,
        took `seconds`. Steps without decode rows pace nothing; a shape's first run (slowed
        by its start-up) is not counted, nor a step of over OUTLIER decode-only steps (a
        burst's large region, or a pause of the host).

        A step over its target shrinks the room to its own work, scaled down; one under it
        that used most of the room grows the room by as much. The square root of target / seconds
        damps the noise of single steps."""
        if not decoding or shape not in self._timed:
            self._timed.add(shape)
            return
        decode = self.decode_of(shape.rows)
        if units == 0:
            self._decode.append(seconds)
            self._rows.setdefault(shape.rows, deque(maxlen=DECODE_STEPS)).append(seconds)
        elif decode is not None and seconds < OUTLIER * decode:
            target = (1 + self.share) * decode
            low, high = STEER
            ratio = min(max((target / seconds) ** 0.5, low), high)
            if ratio < 1:
                self._room = max(1.0, min(self._room, units * ratio))
            elif units >= 0.8 * self._room:  # whole tokens fill a room only so far
                self._room *= ratio
