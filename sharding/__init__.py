"""Sharding as data: a ('data', 'model') device mesh and partition rules."""

from sharding.distributed import distributed_requested, maybe_initialize_distributed
from sharding.mesh import AXES, DATA, MODEL, default_mesh_shape, make_mesh, parse_mesh_spec
from sharding.rules import (
    TENSOR_PARALLEL,
    Placement,
    ShardingRules,
    fallbacks,
    fit_spec,
    param_placements,
    param_shardings,
    pool_sharding,
    slot_sharding,
)

__all__ = [
    "AXES",
    "DATA",
    "MODEL",
    "TENSOR_PARALLEL",
    "Placement",
    "ShardingRules",
    "default_mesh_shape",
    "distributed_requested",
    "fallbacks",
    "fit_spec",
    "make_mesh",
    "maybe_initialize_distributed",
    "param_placements",
    "param_shardings",
    "parse_mesh_spec",
    "pool_sharding",
    "slot_sharding",
]
