"""The parameter tree: what every loader in model/weights produces and the engine lays
out on the mesh, as plain nested dicts (no Flax: a restart that loads its executables
from the store never imports it; see model/nn/pytree.py), and its flat form."""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from model.nn.quantize import BlockWeight

# The parameter tree, {"embed": …, "layer_0": {"attn": {"qkv": …}, …}, …}: what every
# loader in model/weights produces and the engine lays out on the mesh.
Params = dict[str, Any]
# A parameter tree may carry, under this key, matmul weights kept as quantized blocks
# (model/nn/quantize.py's BlockWeight): {LAYER_BLOCKS: {"attn": {"qkv": …}, …},
# "lm_head": …}, each layer weight stacked over the layers ([L, out, bytes]), so unrolled
# and scanned layers read the same arrays. They are applied as their own variable
# collection, and the layers use them in place of those parameters.
BLOCKS = "blocks"
LAYER_BLOCKS = "all_layers"  # not a module's name: the scanned module is "layers"
# BLOCKS[LAYER_BLOCKS]: {"attn": {"qkv": BlockWeight, …}, "mlp": …}.
LayerBlocks = dict[str, dict[str, BlockWeight]]


def stack_layers(params: dict, n_layers: int) -> dict:
    """Unrolled parameters (layers_0 … layers_{L-1}) → scanned ones (layers: each [L, ...])."""
    layers = [params[f"layers_{i}"] for i in range(n_layers)]
    rest = {k: v for k, v in params.items() if not k.startswith("layers_")}
    return {**rest, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def flatten_dict(tree: Mapping[str, Any], sep: str | None = None) -> dict[Any, Any]:
    """A nested dict's leaves by path: a tuple of keys, or the keys joined by `sep`.
    Empty dicts are dropped (as flax.traverse_util's flatten_dict does)."""
    flat: dict[Any, Any] = {}

    def walk(node: Mapping[str, Any], path: tuple[str, ...]) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping):
                walk(value, (*path, key))
            else:
                flat[(*path, key) if sep is None else sep.join((*path, key))] = value

    walk(tree, ())
    return flat


def unflatten_dict(flat: Mapping[Any, Any], sep: str | None = None) -> dict[str, Any]:
    """The nested dict of `flatten_dict`'s output (paths as tuples, or joined by `sep`)."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        keys = path.split(sep) if sep is not None else path
        node = tree
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return tree


def rows_of(arrays: Sequence[np.ndarray]) -> np.ndarray | None:
    """The [L, ...] array whose rows `arrays` already are, in order, in one buffer (a
    prepared copy's layers: model/weights/prepared.py), as a view; None if they are not,
    and stacking them needs a copy."""
    first = arrays[0]
    if first.base is None or not first.flags.c_contiguous or first.nbytes == 0:
        return None
    address = first.__array_interface__["data"][0]
    for i, array in enumerate(arrays):
        same = array.shape == first.shape and array.dtype == first.dtype
        if not (same and array.base is first.base and array.flags.c_contiguous):
            return None
        if array.__array_interface__["data"][0] != address + i * first.nbytes:
            return None
    # One owner's buffer holds every row where the view reads it, and the view keeps it
    # alive (through `first`).
    shape, strides = (len(arrays), *first.shape), (first.nbytes, *first.strides)
    return np.lib.stride_tricks.as_strided(first, shape, strides, writeable=False)
