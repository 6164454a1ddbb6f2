"""Partition rules as data: which mesh axis splits which dimension of each array.

Parameters are matched by an ordered table of (regex over the '/'-joined path,
PartitionSpec); the first full match wins. The KV pool's blocks [NB, K, H, BS]
(and [NB, K, BS, H]) and the per-slot arrays [B] / [B, V] have one spec each.
Every spec is fitted to the array: a dimension whose size does not divide its
mesh axis size drops that axis (is replicated), so any model runs on any mesh;
`fallbacks` lists the tensors this happened to, for logging.

Weights are [out, in]. Fused matrices (why a plain row split is kept): qkv
[(N+2K)·H, D] stacks q, k, v and gate_up [2F, D] stacks gate, up along the
split axis, so a contiguous row split does not hand each device whole matching sections
(with 'model' = 2 device 0 holds all of gate, device 1 all of up). This is
still exact: under jit, GSPMD inserts the collectives where the model slices
the fused output. It costs extra communication per layer (XLA logs
"Involuntary full rematerialization"; a decode block measured 6-11
collective-permutes/all-gathers besides the 1-2 all-reduces). Removing it
needs a model layout change (qkv as [K, G+2, H, D], gate_up as [2, F, D], split
over K and F), not a different rule here.

An int8 weight (a `QuantizedWeight` node, model/nn/quantize.py) is placed by the rule
of its plain weight's path: `.../qkv/values` [out, in] gets qkv's spec, and
`.../qkv/scale` [out, 1] is split along its rows exactly where the values' rows are
split and is replicated otherwise. A scale thus never falls back on its own; only
its values can (and are logged as `.../values`).
"""

import re
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import jax
from jax.sharding import AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sharding.mesh import DATA, MODEL

AnyMesh = Mesh | AbstractMesh
Rule = tuple[str, P]


@dataclass(frozen=True)
class ShardingRules:
    """Specs for parameters, the KV pool and per-slot arrays.

    The field defaults shard nothing (a single-device layout on any mesh);
    `tensor_parallel()` is the layout for serving.
    """

    params: tuple[Rule, ...] = ((r".*", P()),)
    pool: P = P()  # [NB, K, H, BS] and [NB, K, BS, H]
    slots: P = P()  # [B] or [B, V]

    @classmethod
    def tensor_parallel(cls) -> "ShardingRules":
        """Heads, MLP hidden and vocab over 'model'; slots over 'data'.

        Each matrix split by its outputs is followed by one split by its inputs
        (qkv → o, gate_up → down), so attention and MLP each end in one
        all-reduce over 'model' (Megatron style). The pool's KV heads follow
        the heads; its blocks are on every 'data' device, since any sequence's
        blocks may be anywhere in it.
        """
        return cls(
            params=(
                (r"embed/embedding", P(MODEL, None)),  # [V, D]: rows by vocab
                (r"lm_head", P(MODEL, None)),  # [V, D]: logits split by vocab
                (r"layers_\d+/attn/qkv", P(MODEL, None)),  # [(N+2K)·H, D]
                (r"layers_\d+/attn/qkv_bias", P(MODEL)),  # [(N+2K)·H], as qkv's rows
                (r"layers_\d+/attn/o", P(None, MODEL)),  # [D, N·H]
                (r"layers_\d+/mlp/gate_up", P(MODEL, None)),  # [2F, D]
                (r"layers_\d+/mlp/down", P(None, MODEL)),  # [D, F]
                (r"(layers_\d+/)?\w+_norm/scale", P()),  # [D], tiny: replicated
            ),
            pool=P(None, MODEL, None, None),
            slots=P(DATA),
        )


TENSOR_PARALLEL = ShardingRules.tensor_parallel()


@dataclass(frozen=True)
class Placement:
    """How one tensor is laid out: its rule's spec and the spec fitted to its shape."""

    path: str
    shape: tuple[int, ...]
    wanted: P
    used: P

    @property
    def fell_back(self) -> bool:
        """Whether some axis the rule splits is replicated because it does not divide."""
        # `wanted` may be shorter than `used`; its missing trailing entries are None.
        pairs = zip(self.wanted, self.used, strict=False)
        return any(w is not None and u is None for w, u in pairs)

    def __str__(self) -> str:
        return f"{self.path} {list(self.shape)}: wanted {self.wanted}, using {self.used}"


def _axis_size(mesh: AnyMesh, axis: str | tuple[str, ...] | None) -> int:
    names = () if axis is None else (axis,) if isinstance(axis, str) else axis
    size = 1
    for name in names:
        if name not in mesh.shape:
            raise ValueError(f"PartitionSpec axis {name!r} is not a mesh axis {tuple(mesh.shape)}")
        size *= mesh.shape[name]
    return size


def fit_spec(shape: tuple[int, ...], spec: P, mesh: AnyMesh) -> P:
    """`spec` padded to the rank of `shape`, each axis dropped where the
    dimension does not divide the mesh axis size."""
    if len(spec) > len(shape):
        raise ValueError(f"{spec} has more entries than dimensions in shape {shape}")
    entries = (*spec, *(None,) * (len(shape) - len(spec)))
    return P(
        *(
            axis if dim % _axis_size(mesh, axis) == 0 else None
            for dim, axis in zip(shape, entries, strict=True)
        )
    )


def _path_str(path: tuple[Any, ...]) -> str:
    return "/".join(str(getattr(key, "key", getattr(key, "name", key))) for key in path)


def _placement(path: str, shape: tuple[int, ...], wanted: P, mesh: AnyMesh) -> Placement:
    return Placement(path, shape, wanted, fit_spec(shape, wanted, mesh))


@runtime_checkable
class Quantized(Protocol):
    """A quantized weight node (model/nn/quantize.py's QuantizedWeight): `values` laid
    out as the plain weight, per-row `scale`; a PyTreeNode (model/nn/pytree.py), so
    `replace` rebuilds it."""

    values: Any
    scale: Any

    def replace(self, **fields: Any) -> Any: ...


def _is_quantized(node: Any) -> bool:
    return isinstance(node, Quantized)


def _quantized_placement(path: str, weight: Quantized, wanted: P, mesh: AnyMesh) -> Quantized:
    """Placements of an int8 weight: values as the plain weight, scale rows as values' rows."""
    values = _placement(f"{path}/values", tuple(weight.values.shape), wanted, mesh)
    rows = P(values.used[0], None)
    scale = Placement(f"{path}/scale", tuple(weight.scale.shape), rows, rows)
    return weight.replace(values=values, scale=scale)


def param_placements(
    params_or_shapes, mesh: AnyMesh, rules: ShardingRules = TENSOR_PARALLEL
) -> Any:
    """The parameter tree (arrays or ShapeDtypeStructs) → same tree of `Placement`.

    Pass `variables["params"]`: paths are matched without the "params" prefix.
    A quantized weight becomes the same node of two Placements (see the module
    docstring). ValueError names a parameter that no rule matches.
    """

    def place(path, leaf) -> Placement | Quantized:
        name = _path_str(path)
        for pattern, spec in rules.params:
            if re.fullmatch(pattern, name):
                if isinstance(leaf, Quantized):
                    return _quantized_placement(name, leaf, spec, mesh)
                return _placement(name, tuple(leaf.shape), spec, mesh)
        raise ValueError(f"no partition rule matches parameter {name!r}")

    return jax.tree_util.tree_map_with_path(place, params_or_shapes, is_leaf=_is_quantized)


def param_shardings(params_or_shapes, mesh: AnyMesh, rules: ShardingRules = TENSOR_PARALLEL) -> Any:
    """The parameter tree (arrays or ShapeDtypeStructs) → same tree of NamedSharding."""
    placements = param_placements(params_or_shapes, mesh, rules)
    return jax.tree.map(lambda p: NamedSharding(mesh, p.used), placements)


def fallbacks(
    params_or_shapes,
    mesh: AnyMesh,
    rules: ShardingRules = TENSOR_PARALLEL,
    pool_shape: tuple[int, ...] | None = None,
) -> list[Placement]:
    """Tensors replicated along an axis their rule splits, in tree order, for logging.

    With `pool_shape` ([NB, K, H, BS]) the KV pool is checked too, as "kv_pool".
    """
    placements = jax.tree.leaves(param_placements(params_or_shapes, mesh, rules))
    if pool_shape is not None:
        placements.append(_placement("kv_pool", tuple(pool_shape), rules.pool, mesh))
    return [p for p in placements if p.fell_back]


def pool_sharding(
    mesh: AnyMesh, shape: tuple[int, ...], rules: ShardingRules = TENSOR_PARALLEL
) -> NamedSharding:
    """NamedSharding for one layer's pool array [NB, K, H, BS]: KV heads over 'model'
    where they divide."""
    return NamedSharding(mesh, fit_spec(tuple(shape), rules.pool, mesh))


def slot_sharding(
    mesh: AnyMesh, shape: tuple[int, ...], rules: ShardingRules = TENSOR_PARALLEL
) -> NamedSharding:
    """NamedSharding for a per-slot array [B] or [B, V]: B over 'data' where it divides."""
    return NamedSharding(mesh, fit_spec(tuple(shape), rules.slots, mesh))
