"""The device mesh: axes ('data', 'model') from a "DATAxMODEL" spec or the model's shape.

'data' splits the decode slots (B); 'model' splits heads, the MLP hidden
dimension and the vocabulary. One device is the mesh (1, 1): the same code path.
"""

import math
import re
from collections.abc import Sequence
from typing import Protocol

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

DATA = "data"
MODEL = "model"
AXES = (DATA, MODEL)

_SPEC = re.compile(r"(\d+)x(\d+)")


def parse_mesh_spec(spec: str) -> tuple[int, int]:
    """Parse "2x4" → (2, 4): data 2 × model 4. ValueError naming the spec otherwise."""
    match = _SPEC.fullmatch(spec.strip().lower())
    if not match:
        raise ValueError(
            f"mesh spec {spec!r} is not DATAxMODEL, e.g. '2x4' (data 2 × model 4) or '8x1'"
        )
    data, model = int(match[1]), int(match[2])
    if data < 1 or model < 1:
        raise ValueError(f"mesh spec {spec!r}: both axis sizes must be at least 1")
    return data, model


class HasKVHeads(Protocol):
    """What the mesh's shape depends on: a model config's KV head count."""

    @property
    def n_kv_heads(self) -> int: ...


def default_mesh_shape(n_devices: int, config: HasKVHeads) -> tuple[int, int]:
    """(data, model) using all n_devices: the largest 'model' size dividing both
    n_devices and n_kv_heads (so KV heads, and hence query heads, split
    cleanly), the rest on 'data'."""
    model = math.gcd(n_devices, config.n_kv_heads)
    return n_devices // model, model


def make_mesh(
    spec: str | None,
    devices: Sequence[jax.Device] | None = None,
    config: HasKVHeads | None = None,
) -> Mesh:
    """A Mesh with axes ('data', 'model').

    spec: "DATAxMODEL" ("2x4", "8x1", "1x3" uses the first 3 devices), or
    None/"" for every device: shaped by `default_mesh_shape` when `config` is
    given, else all on 'data' (always valid, no tensor parallelism).
    devices: defaults to `jax.devices()`, the global list after
    `jax.distributed.initialize()`, so a multi-host slice gets one global mesh.
    """
    devices = list(jax.devices() if devices is None else devices)
    if spec:
        shape = parse_mesh_spec(spec)
    elif config is not None:
        shape = default_mesh_shape(len(devices), config)
    else:
        shape = (len(devices), 1)
    needed = shape[0] * shape[1]
    if needed > len(devices):
        raise ValueError(
            f"mesh spec {spec!r} needs {needed} devices (data {shape[0]} × model {shape[1]}) "
            f"but only {len(devices)} are available"
        )
    # Auto axes: jit propagates the input shardings through the unchanged
    # model code (GSPMD); jax.make_mesh would default to Explicit axes.
    axis_types = (AxisType.Auto, AxisType.Auto)
    if needed == len(devices):
        # Topology-aware device order (ICI rings on TPU); plain order on CPU.
        return jax.make_mesh(shape, AXES, axis_types, devices=devices)
    # A subset has no physical topology to respect: take the first devices in order.
    return Mesh(np.asarray(devices[:needed]).reshape(shape), AXES, axis_types=axis_types)
