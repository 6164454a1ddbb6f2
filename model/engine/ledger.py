"""The scheduler's bookkeeping of pool blocks per sequence, and the plan of a step.

`Ledger` decides which blocks of the KV pool (model/engine/blocks.py) each
running sequence holds: it reuses cached prefixes (and copies the start of a begun
block that continues one: `reuse`), grows a sequence block by
block, preempts the newest sequence when the pool is out, and registers full
blocks in the prefix cache. `build_plan` turns the sequences a step runs into
the engine's StepPlan. Both run on the scheduler thread only.
"""

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np

from model.engine.blocks import BlockPool, chain_hash, prefix_hashes
from model.engine.pacing import MIN_TOKENS, Pacing
from model.engine.requests import Seq
from model.engine.state import COPIES, StepPlan
from model.engine.variants import (
    BURST_PROMPTS,
    BURST_SHARE,
    LARGE_CHUNK,
    SMALL_CHUNK,
    SMALL_PREFILL_MAX,
)
from model.nn.attention import PRIOR_GROUPS

log = logging.getLogger(__name__)

Sampler = tuple[int, Seq, list[int]]  # a sampled row, its sequence, the drafts after it
Prior = tuple[int, tuple[int, ...]]  # positions a chunk reads from the pool, and their blocks


class Ledger:
    """Which pool blocks each sequence holds (see the module docstring)."""

    def __init__(self, pool: BlockPool, pacing: Pacing, largest: int = LARGE_CHUNK) -> None:
        self.pool = pool
        self.pacing = pacing
        self.largest = largest  # the largest prefill region (the context, where shorter)
        self.block_size = pool.block_size
        self.copies: list[tuple[int, int]] = []  # the planned step's (source, destination)

    def check_fits(self, prompt_tokens: int) -> None:
        """ValueError if a prompt (and its first token) cannot fit the whole pool."""
        if -(-(prompt_tokens + 1) // self.block_size) > self.pool.blocks:
            raise ValueError(
                f"a prompt of {prompt_tokens} tokens does not fit the KV pool of "
                f"{self.pool.blocks * self.block_size} positions"
            )

    def room_for(self, seq: Seq, live: list[Seq]) -> bool:
        """Whether the pool can take this prompt besides what admitted sequences still need
        (the rest of their prompts, and a block each for decoding)."""
        bs = self.block_size
        promised = sum(
            max(0, -(-(max(s.target, s.length) + 1) // bs) - len(s.blocks)) for s in live
        )
        return -(-(len(seq.tokens) + 1) // bs) <= self.pool.available - promised

    def look_up(self, seq: Seq) -> None:
        """Reuse the cached blocks of the sequence's longest cached prefix (at most all but
        the last token: its output is needed to sample the next; none for an embedding,
        which needs every token's output)."""
        bs = self.block_size
        count = (seq.target - 1) // bs if seq.sample_at_target else seq.target // bs
        count = 0 if seq.embed else count
        hashes = prefix_hashes(seq.tokens, bs, count)
        seq.blocks = self.pool.lookup(hashes)
        seq.hashes = hashes[: len(seq.blocks)]
        seq.computed = len(seq.blocks) * bs
        seq.looked_up = True

    def grow(self, seq: Seq, positions: int) -> bool:
        """Blocks for the sequence's first `positions` positions; False if the pool ran out
        first (the blocks taken so far stay with the sequence)."""
        while len(seq.blocks) * self.block_size < positions:
            block = self.pool.allocate()
            if block is None:
                return False
            seq.blocks.append(block)
        return True

    def preempt(self, needy: Seq, live: list[Seq]) -> None:
        """Free the blocks of the newest running sequence other than `needy` (see the
        module docstring: it resumes with the same tokens)."""
        victims = [s for s in live if s is not needy and s.blocks]
        if not victims:
            raise RuntimeError("the KV pool cannot hold one sequence's context")
        victim = max(victims, key=lambda s: s.order)
        log.info("KV pool full: preempting a sequence of %d tokens", victim.length)
        self.pool.release(victim.blocks)
        victim.blocks, victim.hashes = [], []
        victim.computed = 0
        victim.looked_up = False
        victim.pooled, victim.pooled_tokens = None, 0  # no step in flight: sums start over
        if victim.length > len(victim.tokens):  # a first token not delivered: impossible here
            raise RuntimeError("preempting a sequence with a token in flight")
        if victim.generated:  # its newest token is the slot's input; prefill the rest
            victim.target, victim.sample_at_target = len(victim.tokens) - 1, False

    def register(self, seq: Seq) -> None:
        """Cache every full block whose tokens are known and whose keys are computed."""
        bs = self.block_size
        while (len(seq.hashes) + 1) * bs <= min(seq.computed, len(seq.tokens)):
            i = len(seq.hashes)
            parent = seq.hashes[-1] if seq.hashes else None
            seq.hashes.append(chain_hash(parent, seq.tokens[i * bs : (i + 1) * bs]))
            self.pool.register(seq.blocks[i], seq.hashes[-1])
        known, full = min(seq.computed, len(seq.tokens)), len(seq.hashes)
        if full * bs < known and full < len(seq.blocks):  # a block begun: note its tokens
            parent = seq.hashes[-1] if seq.hashes else None
            self.pool.note(seq.blocks[full], parent, tuple(seq.tokens[full * bs : known]))

    def pending(self, live: list[Seq]) -> int:
        """Prompt positions still to compute, of the sequences that may prefill now."""
        waiting = [s for s in live if not s.decoding and s.may_prefill]
        return sum(s.target - s.computed for s in waiting)

    def prefill_budget(self, live: list[Seq], decoding: bool) -> int:
        """The step's prefill region: small while few prompt tokens wait, or while streams
        decode and fewer than BURST_PROMPTS new prompts wait; large otherwise (see the
        scheduler's docstring), neither larger than the largest region there is. A prompt
        already cut into paced chunks is not new."""
        waiting = sum(1 for s in live if not s.decoding and s.may_prefill and not s.paced)
        few = self.pending(live) <= SMALL_PREFILL_MAX
        region = SMALL_CHUNK if few or (decoding and waiting < BURST_PROMPTS) else LARGE_CHUNK
        return min(region, self.largest)

    def prompt_chunks(self, live: list[Seq], budget: int, decoding: bool) -> list[tuple[Seq, int]]:
        """Prompt chunks for the prefill region: begun prompts first, the one with the
        least left first (their earlier positions are read from the pool, at most
        PRIOR_GROUPS distinct priors a step: prompts whose cached prefix is the same
        blocks share one), then new prompts, up to `budget` tokens, while the pool has
        blocks for them. With nothing decoding, a burst in the large region takes the
        first BURST_SHARE of its prompts (the rest go in the next step). Beside decode
        rows (`decoding`), a prompt that ends within the region goes whole, so a new
        request's first token is not held back; one that does not, or began in paced
        chunks, gets a chunk cut to the room pacing leaves (model/engine/pacing.py): at
        least MIN_TOKENS if it is the first, and at most half the room while other
        prompts wait."""
        pending = [s for s in live if not s.decoding and s.may_prefill]
        pending.sort(key=lambda s: (s.computed == 0 if s.looked_up else True, _rest(s), s.order))
        room = self.pacing.room() if decoding else None
        burst = not decoding and len(pending) >= BURST_PROMPTS and budget == LARGE_CHUNK
        quota = math.ceil(BURST_SHARE * len(pending)) if burst else len(pending)
        segments: list[tuple[Seq, int]] = []
        priors: set[Prior] = set()
        self.copies = []
        # A new prompt the same as one being computed waits for it, then reuses its blocks
        # (a burst of identical requests computes the prompt once). Only new prompts need
        # the keys: a long prompt's chunks alone make none.
        twins = any(not s.looked_up and not s.embed for s in pending)
        begun = {_prompt(s) for s in pending if twins and s.looked_up and not s.embed}
        for seq in pending:
            if budget <= 0 or len(segments) == quota:
                break
            if not seq.looked_up:
                if not seq.embed and _prompt(seq) in begun:
                    continue
                self.look_up(seq)
            prior = prior_of(seq, self.block_size)
            if prior is not None and prior not in priors and len(priors) == PRIOR_GROUPS:
                continue  # the step reads as many priors as it can
            # A start copied from a noted block costs the step nothing: the chunk is cut
            # from the positions after it (a copied start is a prior of its own).
            skip = (
                self.match(seq, seq.target - seq.computed)[1] if len(priors) < PRIOR_GROUPS else 0
            )
            left = seq.target - seq.computed - skip
            n = min(left, budget)
            if room is not None and (seq.paced or left > budget):
                # Half the room while others wait, so that a long prompt holds up no one.
                fit = self.pacing.fit(seq.computed + skip, room / 2 if len(pending) > 1 else room)
                n = min(n, max(fit, MIN_TOKENS) if not segments else fit)
                seq.paced = seq.paced or 0 < n < left
            if room is not None:
                room -= self.pacing.units(seq.computed + skip, n)
            if n <= 0:
                continue
            if not self.grow(seq, seq.computed + skip + n):
                break  # the pool is full: the rest waits
            if skip:  # (the noted block again: growing may have taken it)
                n = min(skip + n - self.reuse(seq, skip + n), budget)
            budget -= n
            segments.append((seq, n))
            if twins and n > 1 and not seq.embed:  # (a twin would compute these too)
                begun.add(_prompt(seq))
            if (prior := prior_of(seq, self.block_size)) is not None:
                priors.add(prior)
        return segments

    def reuse(self, seq: Seq, n: int) -> int:
        """Positions of a chunk of `n` that need not be computed: the start of a noted
        block that continues the prompt's computed blocks with its next tokens
        (model/engine/blocks.py) is copied into the prompt's next block before the step
        (`copies`). At most n - 1: the chunk's last token still runs."""
        bs, c = self.block_size, seq.computed
        block, m = self.match(seq, n)
        if m == 0:
            return 0
        self.copies.append((block, seq.blocks[c // bs]))
        seq.computed += m
        self.pool.partial_hits += m
        return m

    def match(self, seq: Seq, n: int) -> tuple[int, int]:
        """The noted block whose start a chunk of `n` may copy, and how many positions
        (0: none); the pool is not changed."""
        bs, c = self.block_size, seq.computed
        if seq.embed or c % bs or len(seq.hashes) != c // bs or len(self.copies) == COPIES:
            return -1, 0
        parent = seq.hashes[-1] if seq.hashes else None
        return self.pool.match(parent, seq.tokens[c : c + min(n - 1, bs)])

    def release(self, seq: Seq) -> None:
        """Give back a finished sequence's blocks (cached ones stay in the prefix cache)."""
        self.pool.release(seq.blocks)
        seq.blocks = []


def prior_of(seq: Seq, bs: int) -> "Prior | None":
    """What a prompt's next chunk reads from the pool: its computed positions and their
    blocks (None if it starts at position 0). Chunks with the same prior share a group.
    bs: the block size."""
    if seq.computed == 0:
        return None
    return seq.computed, tuple(seq.blocks[: -(-seq.computed // bs)])


def _prompt(seq: Seq) -> tuple[int, ...]:
    """The sequence's prompt, as a key."""
    return tuple(seq.tokens[: seq.target])


def _rest(seq: Seq) -> int:
    """A begun prompt's positions still to compute (the fewest go first: a new request cut
    by pacing is not held up behind a long prompt); 0 for the others, in admission order."""
    return seq.target - seq.computed if seq.looked_up and seq.computed else 0


def build_plan(
    plan: StepPlan,
    decode: list[Seq],
    segments: list[tuple[Seq, int]],
    bs: int,
    drafts: Mapping[Seq, list[int]] | None = None,
    copies: Sequence[tuple[int, int]] = (),
) -> tuple[StepPlan, list[Sampler]]:
    """Fill `plan` (an empty plan of the step's shape) with the decode rows (each followed
    by its sequence's draft rows, if it drafts: model/engine/speculative.py) and prompt
    chunks; returns it and its samplers. bs: the block size."""
    layout = plan.layout
    rows = len(layout.context)
    samplers = []
    r = 0  # the next row: rows 0, 1, … whatever slots they serve
    for seq in decode:
        own = (drafts or {}).get(seq, [])
        samplers.append((r, seq, own))
        p = seq.length - 1
        for i, token in enumerate([seq.tokens[-1], *own]):
            plan.slots[r] = seq.slot
            layout.positions[r] = layout.context[r] = p + i
            layout.block_tables[r, : len(seq.blocks)] = seq.blocks
            layout.write[r] = seq.blocks[(p + i) // bs] * bs + (p + i) % bs
            plan.sample[r] = True
            plan.sample_from[r] = r
            plan.draft[r] = i
            # The newest token comes from the device, unless it is stale there.
            plan.decode[r] = i == 0 and not seq.feed
            plan.tokens[r] = token if i or seq.feed else 0
            r += 1
    for i, copy in enumerate(copies):
        plan.copies[i] = copy
    start = rows
    groups: dict[Prior, int] = {}  # prior group of each distinct prior
    for g, (seq, n) in enumerate(segments):
        c = seq.computed
        where = slice(start, start + n)
        positions = np.arange(c, c + n)
        plan.tokens[where] = seq.tokens[c : c + n]
        layout.positions[where] = positions
        layout.segments[start - rows : start - rows + n] = g
        blocks = np.asarray(seq.blocks)
        layout.write[where] = blocks[positions // bs] * bs + positions % bs
        prior = prior_of(seq, bs)
        if prior is not None:
            j = groups.setdefault(prior, len(groups))
            layout.prior[j] = c
            layout.prior_blocks[j, : len(prior[1])] = prior[1]
            layout.prior_group[start - rows : start - rows + n] = j
        if seq.samples_after(n):
            plan.slots[r] = seq.slot
            plan.sample[r] = True
            plan.sample_from[r] = start + n - 1
            samplers.append((r, seq, []))
            r += 1
        start += n
    return plan.replace(layout=layout), samplers
