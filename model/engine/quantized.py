"""The steps' matmul weights as quantized blocks, on CPU.

On one CPU device with jaxchat's kernels built (model/kernels), every step reads each
matmul weight as the file stores it (GGUF blocks: 4.5-8.5 bits a weight) or as int8
rows, instead of f32: a few-row decode step is bound by the bytes of weights it streams,
so it runs several times faster, and a many-row step expands each weight once for all
its rows (a small GEMM in the kernel) and needs no f32 copy of the weights at all. Each
layer matmul is stacked over the layers, so unrolled and scanned steps share one copy.
Every step's decode rows attend through the attention kernel there (`kernels`).
JAXCHAT_QUANTIZED_KERNEL=off turns both off (f32 and XLA everywhere, as on other backends).
"""

import os
from typing import Any

import jax
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import model.kernels
from model.nn.quantize import BlockWeight, QuantizedWeight, int8_rows, stack_blocks
from model.nn.transformer import BLOCKS, LAYER_BLOCKS, Params


def kernels(mesh: Mesh) -> str | None:
    """The CPU kernels' digest where steps on `mesh` use them: one CPU device, the library
    built and not turned off; else None."""
    if os.environ.get("JAXCHAT_QUANTIZED_KERNEL", "on") == "off":
        return None
    if mesh.size > 1 or jax.default_backend() != "cpu" or not model.kernels.load():
        return None
    return model.kernels.digest()


def kernel_params(params: Params, blocks: Params, n_layers: int) -> Params:
    """`params` with the matmul weights that `blocks` has, and the int8 ones, moved under
    BLOCKS as BlockWeights: the layers' stacked under LAYER_BLOCKS (a weight that some
    layer lacks as blocks stays as it is), an lm_head as it is. Host arrays stay on the
    host."""
    flat = flatten_dict(params)
    quantized: dict[tuple[str, ...], Any] = flatten_dict(blocks)
    quantized |= {k: int8_rows(w) for k, w in flat.items() if isinstance(w, QuantizedWeight)}
    moved: dict[tuple[str, ...], BlockWeight] = {}
    names = {k[1:] for k in quantized if k[0].startswith("layers_")}
    for name in sorted(names):
        keys = [(f"layers_{i}", *name) for i in range(n_layers)]
        if all(k in quantized for k in keys):
            moved[(LAYER_BLOCKS, *name)] = stack_blocks([quantized[k] for k in keys])
            for k in keys:
                flat.pop(k, None)
    if ("lm_head",) in quantized:
        moved[("lm_head",)] = quantized[("lm_head",)]
        flat.pop(("lm_head",), None)
    if not moved:
        return params
    return {**unflatten_dict(flat), BLOCKS: unflatten_dict(moved)}


def split_blocks(
    params: Params, blocks: Params, mesh: Mesh, n_layers: int
) -> tuple[Params, Params, str | None]:
    """(`params` without the weights that go as blocks, {BLOCKS: their tree} on the
    device, the kernels' digest) where steps on `mesh` use the kernels and some weight is
    quantized; else (`params`, {}, None)."""
    digest = kernels(mesh)
    moved = kernel_params(params, blocks, n_layers) if digest else params
    if BLOCKS not in moved:
        return params, {}, None
    rest = {k: v for k, v in moved.items() if k != BLOCKS}
    placed = jax.device_put(moved[BLOCKS], NamedSharding(mesh, P()))
    return rest, {BLOCKS: placed}, digest
