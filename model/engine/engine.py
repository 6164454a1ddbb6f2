"""The engine: one compiled step that decodes and prefills together over a paged KV pool.

JetStream's engine roles, in two calls over typed pytrees:
- insert: `admit(state, slot, row)` puts a new sequence's sampling settings (its
  PRNG key, penalties, logit bias, the prompt's tokens for the repetition
  penalty) into its slot;
- prefill and generate: `step(state, plan)` runs R decode rows (each the newest
  token of the slot the plan gives the row, taken from the state) and a prefill
  region of prompt chunks in one forward pass over the pool, and samples one
  token for every row the plan marks: decode rows, and rows of slots whose
  prompt's last chunk is in the region. Rows are handed out in order, so R
  follows how many sequences sample, not which slots they hold. A speculating
  slot's draft rows follow its decode row (model/engine/speculative.py).

The plan is built on the host by the scheduler (model/engine/scheduler.py) from
its block tables: which positions each token has, which blocks hold its keys,
where its key and value go. The device keeps only the pool, each slot's newest
token and its sampling state. Shapes come from a few `StepShape`s
(model/engine/variants.py), so no context length or pool size adds an
executable; `warmup` compiles them all (or loads them from an executable store)
before serving, and serving never compiles (a server that starts with some of them
missing from its store compiles those in the background: model/llm.py's `warmup`).
"""

import logging
from collections.abc import Collection, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from model.engine.executables import ExecutableStore, fingerprint
from model.engine.quantized import kernels, sampler, split_blocks
from model.engine.state import (
    BLOCK_SIZE,
    EngineState,
    StepOutputs,
    StepPlan,
    copy_blocks,
    empty_plan,
    pool_blocks,
    sample_rows,
    sampling_row,
    table_width,
)
from model.engine.variants import (
    StepShape,
    Variants,
    small_shapes,
    step_shapes,
    unrolled_shapes,
)
from model.nn.attention import Pool, init_pool
from model.nn.config import ModelConfig
from model.nn.network import apply_logits, apply_step, forward_logits, network
from model.nn.params import Params, rows_of, stack_layers
from model.nn.sampling import TOP_LOGPROBS, SlotSampling
from model.types import SamplingParams
from model.weights.source_digest import source_digest
from sharding import (
    TENSOR_PARALLEL,
    ShardingRules,
    fallbacks,
    make_mesh,
    param_shardings,
    pool_sharding,
    slot_sharding,
)

if TYPE_CHECKING:
    from model.nn.transformer import Transformer

log = logging.getLogger(__name__)

SCAN, UNROLLED = "scan", "unrolled"  # how a step executable runs the layers


class Engine:
    """Compiled admit/step for one model over a device mesh and a paged KV pool.

    batch: decode slots B. pool_tokens: KV pool positions, or JAXCHAT_KV_POOL's form (a str,
    or None: see `pool_blocks`). kv_dtype: the pool's element type (None: dtype's). Weights,
    pool and per-slot arrays are laid out by `rules` (sharding/rules.py); the default mesh
    is one device, the same code path. `params` holds the unrolled layers' weights (None
    where no step unrolls them), `stacked` the scanned layers' weights.
    """

    def __init__(
        self,
        config: ModelConfig,
        params: Params,
        *,
        max_seq_len: int,
        batch: int = 1,
        pool_tokens: int | str | None = None,
        stop_ids: Collection[int] = (),
        dtype=jnp.float32,
        kv_dtype=None,
        mesh: Mesh | None = None,
        rules: ShardingRules = TENSOR_PARALLEL,
        executables: Path | None = None,
        unrolled: bool | None = None,
        blocks: Params | None = None,
    ) -> None:
        self.config = config
        self.mesh = mesh if mesh is not None else make_mesh(None, config=config)
        self.rules = rules
        # The matmuls as quantized blocks where the CPU kernels apply (their digest).
        params, placed, self.kernel = split_blocks(params, blocks or {}, self.mesh, config, dtype)
        pool_shape = (1, config.n_kv_heads, config.head_dim, BLOCK_SIZE)
        for placement in fallbacks(params, self.mesh, rules, pool_shape=pool_shape):
            log.info("replicated instead of split: %s", placement)
        shardings = param_shardings(params, self.mesh, rules)
        self.max_seq_len, self.batch = max_seq_len, batch
        self.stop_ids = np.asarray(sorted(stop_ids) or [-1], np.int32)
        self.dtype = dtype
        # Decode rows attend, and rows sample, through jaxchat's CPU kernels where they apply.
        self.attention_kernel = kernels(self.mesh) if jnp.dtype(dtype) == jnp.float32 else None
        self.sampler = sampler(self.mesh)
        self.kv_dtype = jnp.dtype(kv_dtype or dtype)
        kernel = self.attention_kernel is not None
        self._network = partial(network, config, dtype, kernels=kernel, kv_dtype=self.kv_dtype)
        # Every step shape runs its layers as one scan (compiled 3-4x faster than unrolled).
        # XLA:CPU copies a layer's f32 weights out of the stack every step, which small
        # decode steps feel: on CPU without the kernels (which read the blocks in place) they
        # also get unrolled layers, compiled as upgrades in the background. unrolled: force
        # them on or off; None: CPU without the kernels.
        cpu = jax.default_backend() == "cpu"
        if unrolled is None:
            unrolled = cpu and self.kernel is None
        self.unrolled_shapes = unrolled_shapes(batch, max_seq_len) if unrolled else ()
        # The two trees share the blocks; `params`: the unrolled steps' (None if no step unrolls).
        self.stacked = {**stack_params(params, shardings, self.mesh, config.n_layers), **placed}
        self.params = None
        if self.unrolled_shapes:
            self.params = {**jax.device_put(params, shardings), **placed}
        self.block_size = BLOCK_SIZE
        self.pool_blocks = pool_blocks(config, self.kv_dtype, batch, max_seq_len, pool_tokens)
        self.table_width = table_width(max_seq_len, BLOCK_SIZE)
        self.shapes = step_shapes(batch, max_seq_len)
        self.mask_words = -(-config.vocab_size // 32)
        self.state_sharding = self._state_sharding()
        self._init_state = jax.jit(self._init_state_impl, out_shardings=self.state_sharding)
        self._admit = jax.jit(
            self._admit_impl, donate_argnums=(0,), out_shardings=self.state_sharding
        )
        replicated = NamedSharding(self.mesh, P())
        self._steps = {
            scanned: jax.jit(
                partial(traced_step, self, scanned),
                donate_argnums=(1,),
                # A tree of shardings in the shape of the outputs.
                out_shardings=(self.state_sharding, StepOutputs(*[replicated] * 5)),  # type: ignore[arg-type]
            )
            for scanned in (False, True)
        }
        self._forward = jax.jit(
            lambda params, tokens: forward_logits(self.network(), params, tokens)
        )
        names = [("init", 0), ("admit", 0), *(("step", (s, SCAN)) for s in self.shapes)]
        # Upgrades: the unrolled steps, named by their weights too (f32, or which blocks
        # and kernel); without them, on CPU, the small shapes scanned.
        self.upgraded = UNROLLED if unrolled else SCAN  # how the upgrades run the layers
        if unrolled and self.kernel is not None:
            avals = jax.tree.map(lambda a: (a.shape, str(a.dtype)), self.params)
            weights = (jax.tree.structure(self.params), avals, self.kernel)
            self.upgraded += "-" + fingerprint(weights)[:12]
        upgraded = self.unrolled_shapes or (small_shapes(batch) if cpu else ())
        upgrades = [("step", (s, self.upgraded)) for s in upgraded]
        store = (
            None
            if executables is None
            else ExecutableStore(executables, self.key(), devices=list(self.mesh.devices.flat))
        )
        self.variants = Variants(names, self._lower, store, upgrades)

    def key(self) -> str:
        """The fingerprint of everything this engine's executables depend on."""
        avals = jax.tree.map(lambda a: (a.shape, str(a.dtype), str(a.sharding.spec)), self.stacked)
        mesh = (dict(self.mesh.shape), self.mesh.device_ids.tolist())
        return fingerprint(
            (
                self.config,
                str(jnp.dtype(self.dtype)),
                str(self.kv_dtype),
                self.batch,
                self.max_seq_len,
                self.pool_blocks,
                self.block_size,
                self.shapes,  # unrolled steps are stored by name: any engine may use them
                self.stop_ids.tolist(),
                self.rules,
                mesh,
                jax.tree_util.tree_structure(self.stacked),
                jax.tree.leaves(avals, is_leaf=lambda x: isinstance(x, tuple)),
                source_digest(__name__),  # every module the traced code comes from
                (self.kernel, self.attention_kernel, self.sampler),  # the kernels they call
            )
        )

    def runnable(self) -> tuple[StepShape, ...]:
        """The step shapes a step may have now: `shapes`, and the small ones (upgrades)
        whose executable is in memory."""
        ready = [
            s for s in small_shapes(self.batch) if self.variants.ready("step", (s, self.upgraded))
        ]
        return tuple(sorted((*self.shapes, *ready)))

    @property
    def compilations(self) -> int:
        """Executables compiled by this engine."""
        return self.variants.compilations

    @property
    def loaded(self) -> int:
        """Executables loaded from the store."""
        return self.variants.loaded

    # ---- layouts -------------------------------------------------------------------

    def _state_sharding(self) -> EngineState:
        """The state's layout: KV heads over 'model', slots over 'data'."""
        c = self.config
        k_shape = (c.n_layers * self.pool_blocks, c.n_kv_heads, c.head_dim, self.block_size)
        pool = pool_sharding(self.mesh, k_shape, self.rules)
        slots = slot_sharding(self.mesh, (self.batch,), self.rules)
        sampling = jax.tree_util.tree_map(
            lambda a: slot_sharding(self.mesh, a.shape, self.rules),
            jax.eval_shape(partial(self._init_sampling, self.batch)),
        )
        # A tree of shardings in the shape of the state.
        return EngineState(Pool(pool, pool), slots, sampling)  # type: ignore[arg-type]

    def _init_sampling(self, rows: int) -> SlotSampling:
        """Disabled settings for `rows` slots, with the model's vocabulary width."""
        zeros = np.zeros(rows)
        key = np.zeros((rows, 2), np.uint32)
        return SlotSampling.create(zeros, zeros + 1, zeros, key, vocab_size=self.config.vocab_size)

    # ---- pure functions under jit --------------------------------------------------

    def _init_state_impl(self) -> EngineState:
        c = self.config
        shape = (c.n_layers, self.pool_blocks, self.block_size, c.n_kv_heads, c.head_dim)
        pool = init_pool(*shape, self.kv_dtype, kernel=self.attention_kernel is not None)
        return EngineState(
            pool, jnp.zeros((self.batch,), jnp.int32), self._init_sampling(self.batch)
        )

    def _admit_impl(self, state: EngineState, slot, row: SlotSampling) -> EngineState:
        """`row` ([1]-shaped settings) into slot `slot`; its newest token reset."""
        sampling = jax.tree_util.tree_map(
            lambda all_, one: all_.at[slot].set(one[0]), state.sampling, row
        )
        return state.replace(sampling=sampling, tokens=state.tokens.at[slot].set(0))

    def network(self, scanned: bool = True) -> "Transformer":
        """The Flax network, its layers one scan or unrolled (built where a step is traced)."""
        return self._network(scan_layers=scanned)

    # ---- compiled variants ---------------------------------------------------------

    def _lower(self, kind: str, size) -> jax.stages.Lowered:
        """Trace one variant: "init", "admit", or "step" of a StepShape."""
        if kind == "init":
            return self._init_state.lower()
        state = jax.eval_shape(self._init_state_impl)
        state = jax.tree_util.tree_map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            state,
            self.state_sharding,
        )
        if kind == "admit":
            row = jax.eval_shape(partial(self._init_sampling, 1))
            return self._admit.lower(state, jax.ShapeDtypeStruct((), jnp.int32), row)
        plan = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.empty_plan(size[0])
        )
        shape, layers = size
        params = self.stacked if layers == SCAN else self.params
        return self._steps[layers == SCAN].lower(params, state, plan)

    # ---- host-side API -------------------------------------------------------------

    def init_state(self) -> EngineState:
        """A zeroed pool and idle slots, laid out on the mesh."""
        return self.variants("init")()

    def admit(self, state: EngineState, slot: int, row: SlotSampling) -> EngineState:
        """Slot `slot` gets the settings `row` (see `sampling`); `state` is donated."""
        return self.variants("admit")(state, np.int32(slot), row)

    def step(self, state: EngineState, plan: StepPlan) -> tuple[EngineState, StepOutputs]:
        """Run one step (`plan` shaped by one of `shapes`); `state` is donated."""
        shape = StepShape(plan.layout.rows, plan.tokens.shape[0] - plan.layout.rows)
        layers = self.upgraded if self.variants.ready("step", (shape, self.upgraded)) else SCAN
        params = self.stacked if layers == SCAN else self.params
        return self.variants("step", (shape, layers))(params, state, plan)

    def empty_plan(self, shape: StepShape) -> StepPlan:
        """A plan of `shape` that changes nothing: idle rows, padding, no writes, no samples."""
        blocks, bs = self.pool_blocks, self.block_size
        return empty_plan(shape, self.table_width, blocks * bs, self.mask_words, self.batch, bs)

    def sampling(
        self, params: SamplingParams, seed: int, prompt_ids: Sequence[int] = ()
    ) -> SlotSampling:
        """[1]-shaped settings for one sequence (see `sampling_row`)."""
        return sampling_row(params, seed, prompt_ids, self.config.vocab_size)

    def forward(self, tokens) -> jax.Array:
        """Full-sequence logits [B, T, V] for tokens [B, T], through the scanned layers
        the steps use (tests and scoring; compiles per shape)."""
        return self._forward(self.stacked, jnp.asarray(tokens, jnp.int32))


def traced_step(engine: Engine, scanned: bool, params, state: EngineState, plan: StepPlan):
    """One step of `engine` (see the module docstring) → (state, StepOutputs [R]): what its
    step executables run."""
    model = engine.network(scanned)
    r, slots = plan.layout.rows, plan.slots  # row i serves slot slots[i] (B: none)
    newest = state.tokens.at[slots].get(mode="fill", fill_value=0)
    tokens = plan.tokens.at[:r].set(jnp.where(plan.decode, newest, plan.tokens[:r]))
    copied = copy_blocks(state.pool, plan.copies, engine.pool_blocks)  # reused prompt starts
    hidden, pool = apply_step(model, params, tokens, plan.layout, copied)
    assert pool is not None  # a step with a pool returns it
    chosen = hidden[:, plan.sample_from]  # [D, R]
    logits = apply_logits(model, params, chosen, plan.head_rows(engine.batch))
    sampling, newest, out = sample_rows(state, newest, logits, plan, engine.batch, engine.sampler)
    state = EngineState(pool, newest, sampling)
    # Embeddings: each prompt chunk's hidden states summed (padding's segment, -1, drops).
    region = hidden[:, r:].T.astype(jnp.float32)  # [P, D]
    pooled = jax.ops.segment_sum(region, plan.layout.segments, num_segments=engine.batch)
    return state, StepOutputs(out.tokens, out.logprobs, out.top_ids, out.top_logprobs, pooled)


def stack_params(params: Params, shardings, mesh: Mesh, n_layers: int) -> Params:
    """The layers' weights stacked for the scanned layers, each laid out on `mesh` as its
    layer's is (`shardings`): stacked on the host when they are host arrays (a
    loader's), else on the devices."""
    layer = shardings["layers_0"]
    stacked_shardings = {
        **{k: v for k, v in shardings.items() if not k.startswith("layers_")},
        "layers": jax.tree.map(lambda s: NamedSharding(mesh, P(None, *s.spec)), layer),
    }
    if all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params)):
        stacked = jax.tree.map(
            lambda *xs: np.stack(xs) if (rows := rows_of(xs)) is None else rows,
            *[{"layers": params[f"layers_{i}"]} for i in range(n_layers)],
        )
        rest = {k: v for k, v in params.items() if not k.startswith("layers_")}
        return jax.device_put({**rest, **stacked}, stacked_shardings)
    stack = partial(stack_layers, n_layers=n_layers)
    return jax.jit(stack, out_shardings=stacked_shardings)(params)


__all__ = ["BLOCK_SIZE", "TOP_LOGPROBS", "Engine", "EngineState", "StepOutputs", "StepPlan"]
