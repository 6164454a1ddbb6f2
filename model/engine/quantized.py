"""The steps' matmul weights as quantized blocks, on CPU.

On one CPU device with jaxchat's kernels built (model/kernels), every step reads each
matmul weight as the file stores it (GGUF blocks: 4.5-8.5 bits a weight) or as int8
rows, instead of f32: a few-row decode step is bound by the bytes of weights it streams,
so it runs several times faster, and a many-row step expands each weight once for all
its rows (a small GEMM in the kernel) and needs no f32 copy of the weights at all. Each
layer matmul is stacked over the layers, so unrolled and scanned steps share one copy.
Every step's decode rows attend through the attention kernel there (`kernels`), and on
any CPU mesh its rows sample through the sampling kernel (`sampler`).
JAXCHAT_QUANTIZED_KERNEL=off turns them off (f32 and XLA everywhere, as on other backends).
"""

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import model.kernels
from model.nn.config import ModelConfig
from model.nn.params import (
    BLOCKS,
    LAYER_BLOCKS,
    Params,
    flatten_dict,
    rows_of,
    unflatten_dict,
)
from model.nn.quantize import BlockWeight, QuantizedWeight, int8_rows, stack_blocks


def kernels(mesh: Mesh) -> str | None:
    """The CPU kernels' digest where steps on `mesh` use them: one CPU device, the library
    built and not turned off; else None."""
    return sampler(mesh) if mesh.size == 1 else None


def sampler(mesh: Mesh) -> str | None:
    """The CPU kernels' digest where steps on `mesh` sample through jaxchat's CPU sampler
    (model/kernels/sample.cc): on CPU, the library built and not turned off, on any number
    of devices (each samples the step's few rows of logits whole, as XLA's sampler does
    with rows it cannot split), whatever the weights' type; else None."""
    if os.environ.get("JAXCHAT_QUANTIZED_KERNEL", "on") == "off":
        return None
    if jax.default_backend() != "cpu" or not model.kernels.load():
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
            layers = [quantized[k] for k in keys]
            arrays = [w.blocks for w in layers]
            rows = (  # a prepared copy's layers are rows of one array: no copy
                rows_of(arrays) if all(isinstance(a, np.ndarray) for a in arrays) else None
            )
            kinds = tuple(int(w.kind) for w in layers)
            moved[(LAYER_BLOCKS, *name)] = (
                stack_blocks(layers) if rows is None else BlockWeight(rows, kinds)
            )
            for k in keys:
                flat.pop(k, None)
    if ("lm_head",) in quantized:
        moved[("lm_head",)] = quantized[("lm_head",)]
        flat.pop(("lm_head",), None)
    if not moved:
        return params
    return {**unflatten_dict(flat), BLOCKS: unflatten_dict(moved)}


def split_blocks(
    params: Params, blocks: Params, mesh: Mesh, config: ModelConfig, dtype: Any
) -> tuple[Params, Params, str | None]:
    """(`params` without the weights that go as blocks, {BLOCKS: their tree} on the
    device, the kernels' digest) where steps on `mesh` use the kernels and some weight is
    quantized; else (`params`, {}, None). A weight that only `blocks` holds (a prepared
    GGUF copy keeps no f32 copy of them) and that goes as f32 is dequantised as `dtype`."""
    digest = kernels(mesh)
    moved = kernel_params(params, blocks, config.n_layers) if digest else params
    if BLOCKS not in moved:
        return with_dense(params, blocks, config, dtype), {}, None
    rest = {k: v for k, v in moved.items() if k != BLOCKS}
    placed = jax.device_put(moved[BLOCKS], NamedSharding(mesh, P()))
    gone = set(flatten_dict(moved[BLOCKS]))
    kept = {k: w for k, w in flatten_dict(blocks).items() if _stacked(k) not in gone}
    return with_dense(rest, unflatten_dict(kept), config, dtype), {BLOCKS: placed}, digest


def _stacked(path: tuple[str, ...]) -> tuple[str, ...]:
    """Where the weight at `path` goes under BLOCKS (a layer's: stacked over the layers)."""
    return (LAYER_BLOCKS, *path[1:]) if path[0].startswith("layers_") else path


def with_dense(params: Params, blocks: Params, config: ModelConfig, dtype: Any) -> Params:
    """`params` with each weight that only `blocks` holds dequantised as `dtype` (a tied
    head's blocks are the embedding's, which `params` has)."""
    flat = flatten_dict(params)
    for path, weight in flatten_dict(blocks).items():
        if path not in flat and not (path == ("lm_head",) and config.tie_embeddings):
            from model.weights.gguf import dequantize_blocks  # the GGUF reader, if needed

            flat[path] = dequantize_blocks(weight).astype(dtype)
    return unflatten_dict(flat)
