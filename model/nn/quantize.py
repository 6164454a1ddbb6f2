"""Int8 weight-only quantization of the matmul weights.

Symmetric, per output row: row r of a weight W [out, in] is kept as int8 values in
[-127, 127] and one f32 scale, max|W[r]| / 127, so W ≈ values * scale with an error of
at most scale/2 per entry. A scale per row, rather than one per matrix, keeps rows of
small weights from being rounded on the scale of the largest row.

Only the 2-D matmul weights are quantized (qkv, o, gate_up, down and an untied
lm_head). The embedding stays in the compute dtype (a lookup reads one row; as a tied
head it is also the output projection), and so do norms and biases (tiny).
Activations and the matmuls stay in the compute dtype: `dense` dequantizes inside the
jitted function, so stored and resident weights take a quarter of f32. XLA:CPU does not
fuse the dequantization into the matmul but writes the f32 matrix out every step, so
there an int8 model decodes slower than f32 (SmolLM2-135M: about 4x); the gain is size.

A `BlockWeight` is a matmul weight kept as shipped, in GGUF's block formats (or as
int8 rows): `project` multiplies it through jaxchat's CPU kernel (model/kernels), which
expands the blocks in registers, so a decode step reads 4-8 bits per weight. The
engine's steps use it on one CPU device once the kernel is loaded
(model/engine/quantized.py).
"""

import re
from collections.abc import Callable, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from model.nn.pytree import PyTreeNode, static_field

INT8_MAX = 127
# '/'-joined parameter paths of the matmul weights, all [out, in].
MATMUL_WEIGHTS = re.compile(r"layers_\d+/(attn/(qkv|o)|mlp/(gate_up|down))|lm_head")


class QuantizedWeight(PyTreeNode):
    """An int8 matmul weight: values [out, in] int8 and scale [out, 1] f32; W ≈ values * scale.

    `values` is the first field on purpose: Flax checks an existing param's shape
    against its first leaf, which is then the declared [out, in] shape.
    """

    values: jax.Array
    scale: jax.Array


Weight = jax.Array | QuantizedWeight

# The XLA custom-call target of the quantized product (registered by model/kernels).
QMATMUL_TARGET = "jaxchat_qmatmul"
# Block formats the kernel reads: name → (id, values per block, bytes per block). The
# ids are GGML's; INT8_ROW is jaxchat's int8 rows, each an f32 scale then the values.
BLOCK_FORMATS = {
    "Q4_0": (2, 32, 18),
    "Q4_1": (3, 32, 20),
    "Q8_0": (8, 32, 34),
    "Q4_K": (12, 256, 144),
    "Q6_K": (14, 256, 210),
}
INT8_ROW = 1024


class BlockWeight(PyTreeNode):
    """A matmul weight [out, in] as stored rows of quantized blocks: blocks [out, bytes]
    uint8, in format `kind` (BLOCK_FORMATS' ids, or INT8_ROW). Or one weight of every
    layer (`stack_blocks`): blocks [L, out, bytes] and `kind` a format per layer, each
    layer's rows padded to the longest. Loaders give host arrays; the engine puts them
    on the device only where it uses them."""

    blocks: jax.Array | np.ndarray
    kind: int | tuple[int, ...] = static_field()


def stack_blocks(layers: Sequence[BlockWeight]) -> BlockWeight:
    """The same weight of each layer as one stacked BlockWeight (on the host)."""
    width = max(w.blocks.shape[1] for w in layers)
    stacked = np.zeros((len(layers), layers[0].blocks.shape[0], width), np.uint8)
    for i, w in enumerate(layers):
        stacked[i, :, : w.blocks.shape[1]] = np.asarray(w.blocks)
    return BlockWeight(stacked, tuple(int(cast(int, w.kind)) for w in layers))


def int8_rows(w: QuantizedWeight) -> BlockWeight:
    """An int8 weight as the kernel's INT8_ROW rows: each row's f32 scale, then its values."""
    values = np.asarray(w.values, np.int8)
    scale = np.asarray(w.scale, np.float32).reshape(-1, 1)
    rows = np.concatenate([scale.view(np.uint8), values.view(np.uint8)], axis=1)
    return BlockWeight(rows, INT8_ROW)


def project(
    w: Weight | BlockWeight,
    x: jax.Array,
    dtype: jnp.dtype,
    layer=0,
    used=None,
    glu=False,
    rows=False,
) -> jax.Array:
    """w [out, in] @ x [in, T] → [out, T]; a BlockWeight through the quantized kernel
    (a stacked one: layer `layer`'s, read in place), which computes only x's first `used`
    columns (a traced count; None: all) and gives zeros for the rest. `used` may be
    [count, decode rows]: x's first columns that are decode rows, which the kernel takes
    as in a step of their own; the others are prompt tokens, which it may take in
    int_gemm.cc's integers (model/kernels/int_gemm.cc), each the same in any step.

    glu: x is SwiGLU's [gate; up] ([2 in, T]) and w multiplies silu(gate) * up, which the
    kernel takes for the used columns alone. rows: the product as [T, out] (a row per
    column of x, as the sampler reads the head's logits), which the kernel writes so
    rather than leave XLA a transpose."""
    if glu and not isinstance(w, BlockWeight):
        gate, up = jnp.split(x, 2)
        x = jax.nn.silu(gate) * up
    if isinstance(w, BlockWeight):
        stacked = isinstance(w.kind, tuple)
        blocks = w.blocks if stacked else w.blocks[None]
        kinds = np.asarray(w.kind if stacked else (w.kind,), np.int32)
        n, t = blocks.shape[1], x.shape[1]
        out = jax.ShapeDtypeStruct((t, n) if rows else (n, t), jnp.float32)
        call = jax.ffi.ffi_call(QMATMUL_TARGET, out)
        index = jnp.asarray(layer, jnp.int32)
        columns = jnp.asarray(x.shape[1] if used is None else used, jnp.int32)
        y = call(
            blocks,
            kinds,
            index,
            columns,
            x.astype(jnp.float32),
            threads=np.int64(0),
            glu=np.int64(glu),
            rows=np.int64(rows),
        )
        return y.astype(dtype)
    return jnp.einsum("OI,IT->TO" if rows else "OI,IT->OT", dense(w, dtype), x)


def dense(w: Weight, dtype: jnp.dtype) -> jax.Array:
    """A matmul weight as a plain array: `w` itself if it is one, else values * scale as dtype."""
    if isinstance(w, QuantizedWeight):
        return (w.values.astype(jnp.float32) * w.scale).astype(dtype)
    return w


def quantize_int8(w: Any) -> QuantizedWeight:
    """A weight [out, in] (any float array) → its QuantizedWeight, computed in NumPy f32."""
    w = np.asarray(w, np.float32)
    scale = np.abs(w).max(axis=1, keepdims=True) / INT8_MAX  # [out, 1]
    safe = np.where(scale == 0, 1.0, scale)  # an all-zero row stays zero
    values = np.clip(np.rint(w / safe), -INT8_MAX, INT8_MAX).astype(np.int8)
    return QuantizedWeight(jnp.asarray(values), jnp.asarray(scale, jnp.float32))


def quantized_shape(w: jax.ShapeDtypeStruct) -> QuantizedWeight:
    """The ShapeDtypeStructs of `quantize_int8(w)`: values [out, in] int8, scale [out, 1] f32
    (a tree of shapes in the weight's type, as jax.eval_shape gives)."""
    values = jax.ShapeDtypeStruct(w.shape, jnp.int8)
    scale = jax.ShapeDtypeStruct((w.shape[0], 1), jnp.float32)
    return QuantizedWeight(cast(jax.Array, values), cast(jax.Array, scale))


def path_str(path: tuple[Any, ...]) -> str:
    """A tree path as the '/'-joined names the sharding rules match ("layers_0/attn/qkv")."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def map_matmul_weights(fn: Callable[[Any], Any], params: Any, other=lambda x: x) -> Any:
    """The parameter tree with `fn` applied to each matmul weight and `other` to the rest."""

    def visit(path, leaf):
        return fn(leaf) if MATMUL_WEIGHTS.fullmatch(path_str(path)) else other(leaf)

    return jax.tree_util.tree_map_with_path(visit, params)
