"""The network (model/nn/transformer.py's Flax modules) built and run: over a step's
tokens, to logits, as a plain forward pass.

Only `network` imports Flax, and it is called where a step is traced: a serving process
that loads every executable from its store (model/engine/executables.py) runs them
without building the network, and skips Flax's import (about 0.4 s of its start on a
2-core CPU; the engine's pytrees are model/nn/pytree.py's, not flax.struct's).
"""

from typing import TYPE_CHECKING, Any, cast

import jax
import numpy as np

from model.nn.attention import Layout, Pool
from model.nn.config import ModelConfig
from model.nn.params import BLOCKS, Params

if TYPE_CHECKING:
    from model.nn.transformer import Transformer


def network(config: ModelConfig, dtype, **options: Any) -> "Transformer":
    """Transformer(config, dtype, **options): kernels, kv_dtype, scan_layers."""
    from model.nn.transformer import Transformer

    return Transformer(config, dtype, **options)


def forward_layout(batch: int, length: int) -> Layout:
    """The layout of a causal forward pass, without a pool, over `batch` sequences of
    `length` tokens flattened row by row: each sequence is a segment."""
    return Layout.host(
        positions=np.tile(np.arange(length, dtype=np.int32), batch),
        context=np.zeros((0,), np.int32),
        block_tables=np.zeros((0, 1), np.int32),
        segments=np.repeat(np.arange(batch, dtype=np.int32), length),
        prior=np.zeros((1,), np.int32),
        prior_blocks=np.zeros((1, 1), np.int32),
        prior_group=np.full(batch * length, -1, np.int32),
        write=np.zeros((batch * length,), np.int32),
    )


def apply_step(
    model: "Transformer", params: Params, tokens: jax.Array, layout: Layout, pool: Pool | None
) -> tuple[jax.Array, Pool | None]:
    """`model` over a step's tokens [T] → (hidden [D, T], the pool with their keys and values)."""
    return cast(tuple[jax.Array, Pool | None], model.apply(variables(params), tokens, layout, pool))


def apply_logits(model: "Transformer", params: Params, hidden: jax.Array, used=None) -> jax.Array:
    """`model`'s logits [..., V] (f32) of hidden states [D, ...] (`used`: see `project`)."""
    logits = model.apply(variables(params), hidden, used, method="logits")
    return cast(jax.Array, logits)


def variables(params: Params) -> dict[str, Any]:
    """Flax's variables for `params`: the BLOCKS entry, if any, as its own collection."""
    if BLOCKS not in params:
        return {"params": params}
    rest = {k: v for k, v in params.items() if k != BLOCKS}
    return {"params": rest, BLOCKS: params[BLOCKS]}


def forward_logits(model: "Transformer", params: dict, tokens: jax.Array) -> jax.Array:
    """Logits [B, T, V] (f32) of a causal forward pass over tokens [B, T], no pool."""
    batch, length = tokens.shape
    hidden, _ = apply_step(model, params, tokens.reshape(-1), forward_layout(batch, length), None)
    logits = apply_logits(model, params, hidden)  # [B·T, V]
    return logits.reshape(batch, length, -1)
