"""The engine: jitted prefill, insert and generate over a static KV cache.

- `prefill(params, tokens[Tb], true_len, sampling, allowed)` runs a prompt
  padded to a bucket length Tb and samples its first token, returning a `Prefix`.
- `insert(prefix, state, slot, …)` copies the prefix KV into one slot of the
  decode state (the state is donated, so the cache is updated in place). A
  "restarted" insert leaves the first token to the decode step instead, which
  is how the n choices of one request share a single prefill.
- `generate(params, state, allowed)` decodes one token for every slot at once.

`allowed` is a grammar bitmask per row (see model/sampling.py); rows that are
not constrained have every bit set.

Shapes are static: B slots, a set of prefill buckets, and a set of cache
capacities (powers of two up to S = max_seq_len). The decode state's cache is
as long as the bucket of the longest active sequence: `generate` grows or
shrinks it (one copy) when that bucket changes, so attention reads exactly the
positions it needs from contiguous memory. `warmup` compiles every variant, so
serving never compiles. With an executable store (model/executables.py),
compiled variants are saved, and a later engine with the same fingerprint
loads them instead: `warmup` then returns at once and `preload` loads them in
the background, any variant a request needs first being loaded on demand.
"""

import logging
import os
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from model.config import ModelConfig
from model.executables import ExecutableStore, compile_variant, fingerprint
from model.sampling import SlotSampling, sample
from model.sampling_params import SamplingParams
from model.source_digest import source_digest
from model.transformer import LayerCache, Transformer, init_cache, resize_cache
from sharding import (
    MODEL,
    TENSOR_PARALLEL,
    ShardingRules,
    cache_sharding,
    fallbacks,
    fit_spec,
    make_mesh,
    param_shardings,
    slot_sharding,
)

log = logging.getLogger(__name__)

Params = dict


@flax.struct.dataclass
class Prefix:
    """A prefilled prompt: caches per layer, its length, last and first tokens."""

    caches: list[LayerCache]
    length: jax.Array  # i32 scalar: true prompt length
    last_token: jax.Array  # i32 scalar: the prompt's last token
    token: jax.Array  # i32 scalar: first sampled token
    logprob: jax.Array  # f32 scalar
    top_ids: jax.Array  # [TOP_LOGPROBS] i32: the most likely first tokens (if asked)
    top_logprobs: jax.Array  # [TOP_LOGPROBS] f32
    sampling: SlotSampling  # [1] settings: key advanced, prompt tokens seen, counts


@flax.struct.dataclass
class DecodeState:
    """Everything the decode step carries for B slots.

    tokens [B]: the last sampled token of each slot, the next step's input.
    positions [B]: where that token's key/value will be written.
    remaining [B]: tokens each slot may still generate (its max_tokens budget).
    stop_at_eos [B]: whether a stop token ends the slot (False for ignore_eos).
    """

    caches: list[LayerCache]  # per layer, `capacity` positions long
    tokens: jax.Array
    positions: jax.Array
    remaining: jax.Array
    stop_at_eos: jax.Array
    sampling: SlotSampling

    @property
    def capacity(self) -> int:
        """Cache positions per slot."""
        return self.caches[0].v.shape[2]


def buckets(smallest: int, largest: int) -> tuple[int, ...]:
    """Powers of two from `smallest`, capped by and always including `largest`."""
    sizes, n = [], smallest
    while n < largest:
        sizes.append(n)
        n *= 2
    sizes.append(largest)
    return tuple(sizes)


def prefill_bucket_sizes(sizes: Sequence[int] | None, max_seq_len: int) -> tuple[int, ...]:
    """Sorted prefill buckets, always ending with max_seq_len (None: powers of two from 32)."""
    if not sizes:
        return buckets(min(32, max_seq_len), max_seq_len)
    if min(sizes) < 1:
        raise ValueError(f"prefill buckets must be positive, got {list(sizes)}")
    return tuple(sorted({s for s in sizes if s < max_seq_len} | {max_seq_len}))


def row_bucket_sizes(batch: int) -> tuple[int, ...]:
    """Decode row counts compiled for a batch of B slots: 2, 8, 32, … and B.

    The smallest is 2, not 1: XLA:CPU compiles a one-row update of a larger
    cache into a guarded write that copies the whole cache every layer, which
    made a lone request's step 5x slower than a two-row one.
    """
    sizes, n = [], min(2, batch)
    while n < batch:
        sizes.append(n)
        n *= 4
    return (*sizes, batch)


def pick_bucket(sizes: Sequence[int], n: int) -> int:
    """The smallest size >= n."""
    for size in sizes:
        if size >= n:
            return size
    raise ValueError(f"length {n} exceeds the largest bucket {sizes[-1]}")


class Engine:
    """Compiled prefill/insert/generate for one model over a device mesh.

    Weights, KV cache and per-slot arrays are laid out by `rules` (see
    sharding/rules.py); the default mesh is one device, the same code path.
    """

    def __init__(
        self,
        config: ModelConfig,
        params: Params,
        *,
        max_seq_len: int,
        batch: int = 1,
        stop_ids: Sequence[int] = (),
        dtype=jnp.float32,
        prefill_buckets: Sequence[int] | None = None,
        min_capacity: int = 256,
        mesh: Mesh | None = None,
        rules: ShardingRules = TENSOR_PARALLEL,
        executables: os.PathLike | None = None,
    ) -> None:
        self.config = config
        self.mesh = mesh if mesh is not None else make_mesh(None, config=config)
        self.rules = rules
        for placement in fallbacks(params, self.mesh, rules):
            log.info("replicated instead of split: %s", placement)
        self.params = jax.device_put(params, param_shardings(params, self.mesh, rules))
        self.max_seq_len = max_seq_len
        self.batch = batch
        self.stop_ids = np.asarray(sorted(stop_ids) or [-1], np.int32)
        self.dtype = dtype
        self.model = Transformer(config, dtype)
        self.prefill_buckets = prefill_bucket_sizes(prefill_buckets, max_seq_len)
        self.capacities = buckets(min(min_capacity, max_seq_len), max_seq_len)
        self.row_buckets = row_bucket_sizes(batch)
        self.mask_words = -(-config.vocab_size // 32)
        # Fixed output layouts: donated buffers stay in place and every call
        # of a compiled variant sees the layouts it was compiled for.
        self.state_sharding = self._state_sharding()
        self.prefix_sharding = self._prefix_sharding()
        replicated = NamedSharding(self.mesh, P())
        self._init_state = jax.jit(self._init_state_impl, out_shardings=self.state_sharding)
        self._prefill = jax.jit(self._prefill_impl, out_shardings=self.prefix_sharding)
        self._insert = jax.jit(
            self._insert_impl, donate_argnums=(1,), out_shardings=self.state_sharding
        )
        self._generate = jax.jit(
            self._generate_impl,
            donate_argnums=(1,),
            static_argnums=(3,),
            out_shardings=(self.state_sharding, *[replicated] * 5),
        )
        self._resize = jax.jit(
            self._resize_impl,
            static_argnums=(1,),
            out_shardings=self.state_sharding,
        )
        self._forward = jax.jit(self._forward_impl)
        # Grammar masks [B, W] are split like the slots; a committed array must match.
        self.mask_sharding = slot_sharding(self.mesh, (batch, self.mask_words), rules)
        self._all_allowed = jax.device_put(self.unconstrained(batch), self.mask_sharding)
        self._compiled: dict[tuple[str, object], jax.stages.Compiled] = {}
        self._locks: defaultdict[tuple[str, object], threading.Lock] = defaultdict(threading.Lock)
        self._locks_lock = threading.Lock()
        self.compilations = 0  # variants compiled by this engine
        self.loaded = 0  # variants loaded from the store
        self.store = None if executables is None else ExecutableStore(executables, self.key())

    def key(self) -> str:
        """The fingerprint of everything this engine's executables depend on."""
        avals = jax.tree.map(lambda a: (a.shape, str(a.dtype), str(a.sharding.spec)), self.params)
        mesh = (dict(self.mesh.shape), self.mesh.device_ids.tolist())
        return fingerprint(
            (
                self.config,
                str(jnp.dtype(self.dtype)),
                self.batch,
                self.max_seq_len,
                self.prefill_buckets,
                self.capacities,
                self.row_buckets,
                self.stop_ids.tolist(),
                self.rules,
                mesh,
                jax.tree_util.tree_structure(self.params),
                jax.tree.leaves(avals, is_leaf=lambda x: isinstance(x, tuple)),
                source_digest(__name__),  # every module the traced code comes from
            )
        )

    def _state_sharding(self) -> DecodeState:
        """The decode state's layout: slots over 'data', KV heads over 'model'."""
        b, c = self.batch, self.config
        cache = cache_sharding(
            self.mesh, (b, c.n_kv_heads, self.max_seq_len, c.head_dim), self.rules
        )
        slots = slot_sharding(self.mesh, (b,), self.rules)
        sampling = jax.tree_util.tree_map(
            lambda a: slot_sharding(self.mesh, a.shape, self.rules),
            jax.eval_shape(partial(self._init_sampling, b)),
        )
        return DecodeState(
            [LayerCache(cache, cache) for _ in range(c.n_layers)],
            slots,
            slots,
            slots,
            slots,
            sampling,
        )

    def _prefix_sharding(self) -> Prefix:
        """A prefix's layout: one row, KV heads over 'model' where they divide."""
        c = self.config
        shape = (1, c.n_kv_heads, 1, c.head_dim)
        spec = fit_spec(shape, P(None, MODEL, None, None), self.mesh)
        cache = NamedSharding(self.mesh, spec)
        one = NamedSharding(self.mesh, P())
        return Prefix(
            [LayerCache(cache, cache) for _ in range(c.n_layers)],
            one,
            one,
            one,
            one,
            one,
            one,
            jax.tree_util.tree_map(lambda _: one, jax.eval_shape(partial(self._init_sampling, 1))),
        )

    def _init_sampling(self, rows: int) -> SlotSampling:
        """Disabled settings for `rows` slots, with the model's vocabulary width."""
        zeros = np.zeros(rows)
        key = np.zeros((rows, 2), np.uint32)
        return SlotSampling.create(zeros, zeros + 1, zeros, key, vocab_size=self.config.vocab_size)

    # ---- pure functions under jit ------------------------------------------------

    def _prefill_impl(self, params, tokens, true_len, sampling: SlotSampling, allowed) -> Prefix:
        """tokens [Tb] padded, true_len scalar, sampling [1], allowed [1, W] → Prefix."""
        bucket = tokens.shape[0]
        positions = jnp.arange(bucket, dtype=jnp.int32)[None]
        caches = init_cache(self.config, 1, bucket, self.dtype)
        hidden, caches = self.model.apply(
            {"params": params}, tokens[None], positions, jnp.zeros((1,), jnp.int32), caches
        )
        last = jax.lax.dynamic_index_in_dim(hidden[:, 0], true_len - 1, axis=1)  # [D, 1]
        logits = self.model.apply({"params": params}, last, method=Transformer.logits)
        in_prompt = jnp.arange(bucket) < true_len
        seen = sampling.seen.at[0, tokens].max(in_prompt)
        out = sample(logits, sampling.replace(seen=seen), allowed)
        return Prefix(
            caches,
            true_len,
            tokens[true_len - 1],
            out.tokens[0],
            out.logprobs[0],
            out.top_ids[0],
            out.top_logprobs[0],
            out.sampling,
        )

    def _insert_impl(
        self, prefix: Prefix, state: DecodeState, slot, remaining, stop_at_eos, restart, key
    ) -> DecodeState:
        """restart: re-run the prompt's last position in the decode step, which then
        samples this slot's first token with `key` (the prefill's token is not used)."""

        def put(cache, new):  # cache [B, ...], new [1, ...] (Tb positions of S)
            return jax.lax.dynamic_update_slice(cache, new, (slot, 0, 0, 0))

        caches = [
            LayerCache(put(c.k, p.k), put(c.v, p.v))
            for c, p in zip(state.caches, prefix.caches, strict=True)
        ]
        one = prefix.sampling.replace(
            key=jnp.where(restart, key[None], prefix.sampling.key),
            counts=jnp.where(restart, 0, prefix.sampling.counts),
        )
        sampling = jax.tree_util.tree_map(
            lambda all_, one: all_.at[slot].set(one[0]), state.sampling, one
        )
        return DecodeState(
            caches,
            state.tokens.at[slot].set(jnp.where(restart, prefix.last_token, prefix.token)),
            state.positions.at[slot].set(prefix.length - restart.astype(jnp.int32)),
            state.remaining.at[slot].set(remaining),
            state.stop_at_eos.at[slot].set(stop_at_eos),
            sampling,
        )

    def _generate_impl(self, params, state: DecodeState, allowed, rows: int):
        """One decode step for slots [0, rows) → (state, tokens [B], logprobs [B], done [B],
        top_ids [B, TOP_LOGPROBS], top_logprobs [B, TOP_LOGPROBS]).

        Slots from `rows` on are left as they are (their outputs are 0/False):
        the scheduler fills the lowest free slot first, so a lightly loaded
        server computes a few rows instead of all B. done: the slot sampled a
        stop token or used up its budget.
        """
        # Idle slots below `rows` keep stepping; clamp so their writes stay inside the cache.
        positions = jnp.minimum(state.positions[:rows], state.capacity - 1)
        hidden, caches = self.model.apply(
            {"params": params},
            state.tokens[:rows, None],
            positions[:, None],
            positions,
            state.caches,
        )
        logits = self.model.apply({"params": params}, hidden[:, :, 0], method=Transformer.logits)
        sampling = jax.tree_util.tree_map(lambda a: a[:rows], state.sampling)
        out = sample(logits, sampling, allowed[:rows])
        tokens = out.tokens
        remaining = state.remaining[:rows] - 1
        done = (jnp.isin(tokens, self.stop_ids) & state.stop_at_eos[:rows]) | (remaining <= 0)
        new_state = state.replace(
            caches=caches,
            tokens=state.tokens.at[:rows].set(tokens),
            positions=state.positions.at[:rows].set(positions + 1),
            remaining=state.remaining.at[:rows].set(remaining),
            sampling=state.sampling.replace(
                key=state.sampling.key.at[:rows].set(out.sampling.key),
                counts=state.sampling.counts.at[:rows].set(out.sampling.counts),
            ),
        )

        def padded(a: jax.Array) -> jax.Array:
            return jnp.zeros((self.batch, *a.shape[1:]), a.dtype).at[:rows].set(a)

        outputs = (tokens, out.logprobs, done, out.top_ids, out.top_logprobs)
        return new_state, *(padded(a) for a in outputs)

    def _resize_impl(self, state: DecodeState, capacity: int) -> DecodeState:
        """The state with every cache cut or zero-padded to `capacity` positions."""
        return state.replace(caches=[resize_cache(c, capacity) for c in state.caches])

    def _forward_impl(self, params, tokens):
        """Full-sequence logits [B, T, V] for tokens [B, T] (tests and scoring)."""
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        caches = init_cache(self.config, b, t, self.dtype)
        hidden, _ = self.model.apply(
            {"params": params}, tokens, positions, jnp.zeros((b,), jnp.int32), caches
        )
        return self.model.apply({"params": params}, hidden, method=Transformer.logits)

    # ---- host-side API ---------------------------------------------------------------

    def _init_state_impl(self, capacity: int | None = None) -> DecodeState:
        b = self.batch
        return DecodeState(
            init_cache(self.config, b, capacity or self.capacities[0], self.dtype),
            jnp.zeros((b,), jnp.int32),
            jnp.zeros((b,), jnp.int32),
            jnp.zeros((b,), jnp.int32),
            jnp.ones((b,), bool),
            self._init_sampling(b),
        )

    def init_state(self) -> DecodeState:
        """A fresh decode state, laid out on the mesh."""
        return self._executable("init", self.capacities[0])()

    def _lower(self, kind: str, size):
        """Trace one variant. size: the prefill bucket for prefill; (bucket, capacity) for
        insert; (capacity, rows) for generate; (from, to) capacities for resize; the
        capacity for init (a fresh state)."""
        sampling = jax.eval_shape(partial(self._init_sampling, 1))
        token_spec = jax.ShapeDtypeStruct((), jnp.int32)
        mask_spec = jax.ShapeDtypeStruct((1, self.mask_words), jnp.int32)
        if kind == "init":
            return self._init_state.lower()
        if kind == "prefill":
            tokens = jax.ShapeDtypeStruct((size,), jnp.int32)
            return self._prefill.lower(self.params, tokens, token_spec, sampling, mask_spec)
        capacity = size[0] if kind in ("generate", "resize") else size[1]
        state = jax.eval_shape(partial(self._init_state_impl, capacity))
        state = placed(state, self.state_sharding)
        if kind == "insert":
            tokens = jax.ShapeDtypeStruct((size[0],), jnp.int32)
            prefix = jax.eval_shape(
                self._prefill, self.params, tokens, token_spec, sampling, mask_spec
            )
            prefix = placed(prefix, self.prefix_sharding)
            flag = jax.ShapeDtypeStruct((), jnp.bool_)
            key = jax.ShapeDtypeStruct((2,), jnp.uint32)
            return self._insert.lower(prefix, state, token_spec, token_spec, flag, flag, key)
        if kind == "resize":
            return self._resize.lower(state, size[1])
        masks = jax.ShapeDtypeStruct(
            (self.batch, self.mask_words), jnp.int32, sharding=self.mask_sharding
        )
        return self._generate.lower(self.params, state, masks, size[1])

    def _executable(self, kind: str, size):
        """The compiled variant: loaded from the store or compiled on first use."""
        variant = (kind, size)
        compiled = self._compiled.get(variant)
        if compiled is not None:
            return compiled
        with self._locks_lock:
            lock = self._locks[variant]
        with lock:  # a request and the preloader may want the same variant
            if variant not in self._compiled:
                compiled = self.store.load(kind, size) if self.store else None
                if compiled is None:
                    compiled = self._compile(variant)
                else:
                    self.loaded += 1
                self._compiled[variant] = compiled
        return self._compiled[variant]

    def _compile(self, variant: tuple[str, object]) -> jax.stages.Compiled:
        """Compile a variant (counted in `compilations`) and save it to the store."""
        compiled, storable = compile_variant(self._lower(*variant))
        self.compilations += 1
        if self.store is not None and storable:
            self.store.save(*variant, compiled)
        return compiled

    def variants(self) -> list[tuple[str, object]]:
        """Every (kind, size) that serving can call."""
        caps = self.capacities
        return (
            [("init", caps[0])]
            + [("prefill", b) for b in self.prefill_buckets]
            + [("insert", (b, c)) for b in self.prefill_buckets for c in caps if c >= b]
            + [("generate", (c, r)) for c in caps for r in self.row_buckets]
            + [("resize", pair) for pair in zip(caps, caps[1:], strict=False)]
            + [("resize", pair) for pair in zip(caps[1:], caps, strict=False)]
        )

    def warmup(self, workers: int | None = None) -> None:
        """Compile every variant the store lacks (all of them without a store), a few
        at a time (XLA compiles off the GIL), with a progress bar on a terminal.
        Stored variants are left to `preload` or to first use."""
        store = self.store if self.store is not None else ()
        todo = [v for v in self.variants() if v not in self._compiled and v not in store]
        if not todo:
            return
        started = time.monotonic()
        quiet = not sys.stderr.isatty()
        bar = tqdm(total=len(todo), desc="compiling", unit="variant", disable=quiet)
        with bar, ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
            for _ in pool.map(lambda v: self._executable(*v), todo):
                bar.update()
        log.info("compiled %d variants in %.1f s", len(todo), time.monotonic() - started)

    def preload(self, until: Callable[[], bool] = lambda: True) -> None:
        """Load every variant not yet in memory, in the order short requests need them,
        so requests rarely wait for a load; stop early once `until()` is false.

        One at a time, in one thread: loading runs off the GIL, so a request that
        needs a variant not loaded yet loads it meanwhile on the other core.
        """
        for variant in sorted(self.variants(), key=self._first_needed):
            if not until():
                return
            self._executable(*variant)

    def _first_needed(self, variant: tuple[str, object]) -> tuple[int, int]:
        """Preload order: by the capacity a variant works at, then by the tokens or rows
        it handles (a few-row step first: every request needs one; a request loads its
        prefill bucket itself meanwhile)."""
        kind, size = variant
        if kind == "prefill":
            return pick_bucket(self.capacities, size), size
        if kind in ("insert", "resize"):
            return max(size), min(size)
        if kind == "generate":
            return size  # (capacity, rows)
        return 0, 0  # init

    def unconstrained(self, rows: int) -> np.ndarray:
        """A grammar bitmask [rows, W] that allows every token."""
        return np.full((rows, self.mask_words), -1, np.int32)

    def sampling(self, params: SamplingParams, seed: int) -> SlotSampling:
        """[1]-shaped settings for one request's prefill; its key comes from `seed`."""
        v = self.config.vocab_size
        bias = np.zeros((1, v), np.float32)
        for token, value in (params.logit_bias or {}).items():
            if not 0 <= token < v:
                raise ValueError(f"logit_bias token id {token} is not in the vocabulary [0, {v})")
            bias[0, token] = value
        return SlotSampling.create(
            [params.temperature],
            [params.top_p],
            [min(params.top_k, v)],  # keeping more than the vocabulary keeps all of it
            prng_key(seed)[None],
            vocab_size=v,
            min_p=[params.min_p],
            frequency_penalty=[params.frequency_penalty],
            presence_penalty=[params.presence_penalty],
            repetition_penalty=[params.repetition_penalty],
            top_logprobs=[params.top_logprobs],
            logit_bias=bias,
            xp=np,
        )

    def prefill(
        self, tokens: Sequence[int], sampling: SlotSampling, allowed: np.ndarray | None = None
    ) -> Prefix:
        """Prefill a prompt (list of ids) with one slot's sampling settings (see `sampling`)
        and optionally a grammar bitmask [1, W] for its first token."""
        n = len(tokens)
        if not 0 < n < self.max_seq_len:
            raise ValueError(f"prompt of {n} tokens does not fit max_seq_len {self.max_seq_len}")
        bucket = pick_bucket(self.prefill_buckets, n)
        padded = np.zeros(bucket, np.int32)
        padded[:n] = tokens
        allowed = self.unconstrained(1) if allowed is None else allowed
        run = self._executable("prefill", bucket)
        return run(self.params, padded, np.int32(n), sampling, allowed)

    def insert(
        self,
        prefix: Prefix,
        state: DecodeState,
        slot: int,
        remaining: int,
        stop_at_eos: bool = True,
        restart_seed: int | None = None,
    ) -> DecodeState:
        """Copy a prefix into `slot`, which may generate `remaining` more tokens.

        restart_seed: instead of continuing from the prefill's token, sample
        the slot's first token in the next decode step from this seed (used by
        the 2nd…nth choices of a request). The state's cache grows first if the
        prefix is longer. `state` is donated and must not be used again.
        """
        bucket = prefix.caches[0].v.shape[2]
        state = self.resize(state, max(state.capacity, pick_bucket(self.capacities, bucket)))
        restart = restart_seed is not None
        key = prng_key(restart_seed) if restart else np.zeros(2, np.uint32)
        args = (np.int32(slot), np.int32(remaining), np.bool_(stop_at_eos), np.bool_(restart), key)
        return self._executable("insert", (bucket, state.capacity))(prefix, state, *args)

    def generate(
        self,
        state: DecodeState,
        max_position: int,
        rows: int | None = None,
        allowed: np.ndarray | jax.Array | None = None,
    ):
        """One step for slots [0, rows) (default all); `max_position` bounds their positions.

        allowed: grammar bitmasks [B, W] (default: no constraint). The cache is
        first resized to the capacity bucket of max_position + 1. Returns
        (state, tokens [B], logprobs [B], done [B], top_ids [B, K], top_logprobs
        [B, K]); `state` is donated.
        """
        state = self.resize(state, pick_bucket(self.capacities, max_position + 1))
        rows = pick_bucket(self.row_buckets, rows or self.batch)
        if allowed is None:
            allowed = self._all_allowed
        run = self._executable("generate", (state.capacity, rows))
        return run(self.params, state, allowed)

    def resize(self, state: DecodeState, capacity: int) -> DecodeState:
        """The state with `capacity` cache positions, one bucket step at a time (donated)."""
        while state.capacity != capacity:
            i = self.capacities.index(state.capacity)
            step = self.capacities[i + 1 if capacity > state.capacity else i - 1]
            state = self._executable("resize", (state.capacity, step))(state)
        return state

    def forward(self, tokens) -> jax.Array:
        """Full-sequence logits [B, T, V] for tokens [B, T] (compiles per shape)."""
        return self._forward(self.params, jnp.asarray(tokens, jnp.int32))


def placed(specs, shardings):
    """ShapeDtypeStructs carrying the given shardings (for ahead-of-time lowering)."""
    return jax.tree_util.tree_map(
        lambda spec, sharding: jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=sharding),
        specs,
        shardings,
    )


def prng_key(seed: int) -> np.ndarray:
    """A PRNG key [2] u32 from a 64-bit seed, computed on the host (no device work).

    Equal to jax.random.PRNGKey(seed) for seeds below 2**32; the high word
    takes the key's first half, so distinct int64 seeds give distinct keys.
    """
    seed &= 0xFFFFFFFFFFFFFFFF
    return np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)
