"""The unrolled decode steps' weights with their matmuls as quantized blocks.

On one CPU device with jaxchat's quantized kernel built (model/kernels), the few-row
decode steps read each matmul weight as the file stores it (GGUF blocks: 4.5-8.5 bits a
weight) or as int8 rows, instead of f32: a decode step is bound by the bytes of weights
it streams, so it runs several times faster. The scanned steps, for many rows and for
prefill, keep the f32 weights, where XLA's own matmuls are faster. Every step's decode
rows attend through the attention kernel there (`kernels`).
JAXCHAT_QUANTIZED_KERNEL=off turns both off (f32 and XLA everywhere, as on other backends).
"""

import os

import jax
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import Mesh

import model.kernels
from model.nn.quantize import QuantizedWeight, int8_rows
from model.nn.transformer import BLOCKS, Params


def kernels(mesh: Mesh) -> str | None:
    """The CPU kernels' digest where steps on `mesh` use them: one CPU device, the library
    built and not turned off; else None."""
    if os.environ.get("JAXCHAT_QUANTIZED_KERNEL", "on") == "off":
        return None
    if mesh.size > 1 or jax.default_backend() != "cpu" or not model.kernels.load():
        return None
    return model.kernels.digest()


def kernel_params(params: Params, blocks: Params, mesh: Mesh) -> tuple[Params, str | None]:
    """(`params` with the matmul weights that `blocks` has, and the int8 ones, as
    BlockWeights under BLOCKS; the kernel's digest), or (`params`, None) where the kernel
    does not apply: several devices, not CPU, not built, or no quantized weights."""
    if kernels(mesh) is None:
        return params, None
    flat = flatten_dict(params)
    quantized = {k: int8_rows(w) for k, w in flat.items() if isinstance(w, QuantizedWeight)}
    quantized |= flatten_dict(blocks)
    if not quantized:
        return params, None
    kept = {k: w for k, w in flat.items() if k not in quantized}
    placed = {k: jax.device_put(w) for k, w in quantized.items()}
    return {**unflatten_dict(kept), BLOCKS: unflatten_dict(placed)}, model.kernels.digest()
