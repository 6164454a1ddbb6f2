"""Speculative decoding without a draft model: prompt-lookup drafts, verified in one step.

Drafting: a decoding sequence whose last n tokens (n = MAX_NGRAM down to
MIN_NGRAM) occurred earlier in its prompt or output proposes the tokens that
followed their latest occurrence, d1 … dk (prompt lookup, as in vLLM's n-gram
proposer and llama.cpp's lookup decoding). Editing code, quoting or summarising
a given text repeats long runs of the context, and those are accepted.

Verifying: the step gives the sequence k + 1 rows at consecutive positions, its
newest token and each draft (every row writes its key and value to the pool before
attending, so row i sees the drafts before it: model/nn/attention.py), and samples
a token t0 … tk at every row with the sequence's own settings, each row with the
key of its position. The sequence takes t0 … ta, where a is the first i with
t_i ≠ d_(i+1) (or k). A prompt-lookup draft puts all its probability on one
token, and for such a draft this is exactly speculative sampling's rule (accept d
with probability min(1, p(d) / q(d)) = p(d), else draw from norm(max(0, p - q)),
which is p without d): t ~ p equals d with probability p(d), and a t that differs
is a draw from p given t ≠ d. So every token follows the model's distribution;
greedy decoding takes the same tokens as without drafts. Positions whose tokens
were not taken hold keys beyond the sequence's length, which nothing reads and
the next step overwrites.

When it pays (measured, per sequence and per step shape): a step's rows are
rounded up to a row bucket (model/engine/variants.py), and drafts first fill the
rows a step runs anyway. A decode-only step grows to a larger bucket only when
the tokens it is expected to deliver per second, from each sequence's measured
acceptance rate and the measured time of each step shape, beat those of the
smaller one; a busy batch that fills its rows gets no drafts and runs as it did.
A step that drafts needs the newest tokens, so it is planned after the previous
step's tokens are read, not while it runs. Sequences with a grammar, with
repetition, frequency or presence penalties (which would need the drafts counted
before they are sampled) or that are embeddings never draft.

Sampled (temperature > 0) sequences draft too: every row draws with its slot's key
folded with its position (model/engine/state.py's `sample_rows`), so a seeded
sequence's tokens do not depend on whether a position was drafted, nor on what
shared its steps.
"""

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from model.engine.requests import Seq
from model.engine.variants import StepShape, pick_shape
from model.nn.sampling import SlotSampling

if TYPE_CHECKING:
    from model.engine.scheduler import Scheduler

MODES = ("off", "ngram")
MAX_NGRAM, MIN_NGRAM = 4, 2
DECAY = 0.8  # weight of a sequence's earlier steps in its acceptance rate
PRIOR = (1.5, 1.0)  # a new sequence's (taken, refused) drafts: a rate of 0.6
RETRY = 0.9  # a step a proposal is not verified moves its rate this far less from PRIOR
COST_DECAY = 0.8  # weight of a step shape's earlier times in its measured cost
PROBE_EVERY = 8  # while nothing drafts, look for drafts every this many steps


def propose(tokens: Sequence[int], k: int) -> list[int]:
    """Up to k tokens that followed an earlier occurrence of the last n tokens (the
    longest n from MAX_NGRAM to MIN_NGRAM that occurred before; the latest occurrence
    that k tokens follow); [] if none did."""
    ids = np.asarray(tokens, np.int64)
    for n in range(MAX_NGRAM, MIN_NGRAM - 1, -1):
        if k <= 0 or len(ids) <= n:
            continue
        windows = sliding_window_view(ids[:-1], n)
        hits = np.flatnonzero((windows == ids[-n:]).all(axis=1))
        if len(hits):
            # The latest that k tokens follow (in a repeating run the latest of all has
            # one), else the earliest (the most tokens follow it).
            full = hits[hits + n + k <= len(ids)]
            start = int(full[-1] if len(full) else hits[0]) + n
            return ids[start : start + k].tolist()
    return []


def taken(sampled: Sequence[int] | np.ndarray, drafts: Sequence[int]) -> int:
    """a: how many drafts the sampled tokens t0 … tk confirm (t_i = d_(i+1) for i < a)."""
    a = 0
    while a < len(drafts) and int(sampled[a]) == drafts[a]:
        a += 1
    return a


def penalized(row: SlotSampling) -> bool:
    """Whether a sequence's settings count its tokens (penalties)."""
    return bool(
        np.any(np.asarray(row.frequency_penalty) != 0)
        or np.any(np.asarray(row.presence_penalty) != 0)
        or np.any(np.asarray(row.repetition_penalty) != 1)
    )


@dataclass
class Speculation:
    """Drafting settings (mode "off" or "ngram", up to `tokens` drafts per sequence and
    step), the measured time of each step shape, and the totals for metrics."""

    mode: str
    tokens: int = 1
    costs: dict[StepShape, float] = field(default_factory=dict)
    drafted: int = 0  # draft tokens verified, ever
    accepted: int = 0  # ... and taken
    drafting: bool = False  # the latest step planned with the newest tokens carried drafts
    idle: int = 0  # steps planned ahead (without drafts) since then
    timed: set[StepShape] = field(default_factory=set)  # shapes run once (not timed)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"speculative decoding must be one of {MODES}, not {self.mode!r}")
        if self.tokens < 1:
            raise ValueError("speculative tokens must be at least 1")

    def allows(self, seq: Seq) -> bool:
        """Whether a sequence may draft (see the module docstring)."""
        if self.mode == "off" or seq.constraint is not None or seq.embed:
            return False
        return not (isinstance(seq.row, SlotSampling) and penalized(seq.row))

    def wants(self, live: Sequence[Seq]) -> bool:
        """Whether the next step should be planned with the newest tokens, to draft: while
        drafts are being verified, and every PROBE_EVERY steps otherwise (planning ahead
        of the step in flight hides the host's work), if some decoding sequence may."""
        if not any(s.decoding and s.may_draft for s in live):
            return False
        self.idle += not self.drafting
        return self.drafting or self.idle >= PROBE_EVERY

    def drafts(
        self, decode: list[Seq], rows: int, prefill: int, scheduler: "Scheduler"
    ) -> dict[Seq, list[int]]:
        """The drafts a step verifies (`rows` sampled rows and `prefill` tokens without
        them), within the blocks their sequences can get without preempting."""
        proposals = self.proposals(decode)
        drafts = self.plan(proposals, rows, prefill, scheduler.engine.runnable())
        for seq, own in drafts.items():
            scheduler.ledger.grow(seq, seq.length + len(own))
            del own[len(seq.blocks) * scheduler.ledger.block_size - seq.length :]
        drafts = {seq: own for seq, own in drafts.items() if own}
        self.drafting, self.idle = bool(drafts), 0
        return drafts

    def proposals(self, decode: Sequence[Seq]) -> dict[Seq, list[int]]:
        """Each drafting sequence's proposal (none past its completion budget)."""
        found = {}
        for seq in decode:
            if seq.may_draft:
                drafts = propose(seq.tokens, min(self.tokens, seq.max_new - seq.generated - 1))
                if drafts:
                    found[seq] = drafts
        return found

    def plan(
        self,
        proposals: Mapping[Seq, list[int]],
        rows: int,
        prefill: int,
        shapes: Sequence[StepShape],
    ) -> dict[Seq, list[int]]:
        """The drafts a step carries: for the base shape (rows for `rows` sampled rows and
        `prefill` tokens) and, for a decode-only step, each larger one, the drafts that
        fill its spare rows with the most expected tokens; the shape delivering the most
        tokens per second wins."""
        if not proposals:
            return {}
        base = pick_shape(shapes, rows, prefill)
        options = [base]
        if prefill == 0:  # larger decode-only shapes, up to the one every draft fits
            wanted = rows + sum(map(len, proposals.values()))
            larger = sorted(s for s in shapes if s.prefill == 0 and s.rows > base.rows)
            for shape in larger:
                options.append(shape)
                if shape.rows >= wanted:
                    break
        best: tuple[float, dict[Seq, list[int]]] = (-1.0, {})
        for shape in options:
            chosen, gain = _fill(proposals, shape.rows - rows)
            rate = (rows + gain) / self.cost(shape, base)
            if rate > best[0]:
                best = (rate, chosen)
        for seq in proposals.keys() - best[1].keys():  # so that a rate once low is tried again
            hits, misses = seq.acceptance
            seq.acceptance = (
                RETRY * hits + (1 - RETRY) * PRIOR[0],
                RETRY * misses + (1 - RETRY) * PRIOR[1],
            )
        return best[1]

    def cost(self, shape: StepShape, base: StepShape) -> float:
        """A step shape's measured seconds; unmeasured, scaled from the base shape's (or
        from 1) by rows: a rough prior that measurements replace."""
        if shape in self.costs:
            return self.costs[shape]
        prior = lambda s: 1 + (s.rows - 1) / 7 + s.prefill / 16  # noqa: E731
        return self.costs.get(base, prior(base)) * prior(shape) / prior(base)

    def measured(self, shape: StepShape, seconds: float) -> None:
        """A step of `shape` took `seconds` (a shape's first run, slowed by its start-up,
        is not counted)."""
        if shape not in self.timed:
            self.timed.add(shape)
            return
        old = self.costs.get(shape)
        self.costs[shape] = (
            seconds if old is None else COST_DECAY * old + (1 - COST_DECAY) * seconds
        )

    def verified(self, seq: Seq, drafts: int, accepted: int) -> None:
        """A sequence's `drafts` drafts were verified and `accepted` of them taken."""
        self.drafted += drafts
        self.accepted += accepted
        hits, misses = seq.acceptance
        seq.acceptance = (DECAY * hits + accepted, DECAY * misses + (accepted < drafts))


def rate(seq: Seq) -> float:
    """A sequence's acceptance rate: the chance that its next draft is taken."""
    hits, misses = seq.acceptance
    return hits / max(hits + misses, 1e-9)


def _fill(proposals: Mapping[Seq, list[int]], spare: int) -> tuple[dict[Seq, list[int]], float]:
    """Drafts for `spare` rows, each row given to the draft expected to add the most tokens
    (the i-th draft of a sequence with acceptance rate r adds r**i); → (drafts, their
    expected tokens)."""
    heap: list[tuple[float, int, Seq, int]] = []
    for n, seq in enumerate(proposals):
        heapq.heappush(heap, (-rate(seq), n, seq, 1))
    counts: dict[Seq, int] = {}
    gain = 0.0
    while spare > 0 and heap:
        value, n, seq, i = heapq.heappop(heap)
        counts[seq], gain, spare = i, gain - value, spare - 1
        if i < len(proposals[seq]):
            heapq.heappush(heap, (value * rate(seq), n, seq, i + 1))
    return {seq: proposals[seq][:i] for seq, i in counts.items()}, gain
