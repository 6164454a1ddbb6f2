"""Multi-device sharding checks, run by tests/test_sharding.py in a child process.

`python -m tests.sharding_report` with XLA_FLAGS=--xla_force_host_platform_device_count=8
prints one JSON report: the meshes `make_mesh` builds, the errors it raises,
and for each (config, mesh, call) how far the sharded call is from the
unsharded one and how the weights and the KV pool were actually split. The
calls: "forward", a causal pass over 8 sequences without a pool; "step", a
step through a pool of random history with 8 decode rows at different
positions and a prefill region of two segments (one continuing a prompt).
This module computes; the test file asserts. (XLA fixes the CPU device count
when the backend first starts, which in a pytest process has likely happened
already.)
"""

import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from model.nn.attention import Layout, init_pool
from model.nn.config import ModelConfig
from model.nn.network import forward_layout
from model.nn.transformer import Transformer, param_shapes
from sharding import make_mesh, param_shardings, pool_sharding
from tests.tiny_models import TINY_LLAMA

CONFIGS = {
    "tiny": TINY_LLAMA,
    # K=3 splits under model=3 but not 2 or 4; q, k, v sections of 96, 48, 48
    # columns do not line up with a 3-way split of the fused 192; biases on.
    "gqa3": ModelConfig(
        vocab_size=384, dim=48, n_layers=2, n_heads=6, n_kv_heads=3, head_dim=16,
        ffn_dim=96, qkv_bias=True,
    ),
}  # fmt: skip
# (config, mesh, call). gqa3 adds what tiny lacks: 'model' = 3 splitting every
# weight, K=3 not splitting by 4.
CASES = [
    (config, mesh, call)
    for config, mesh in (
        ("tiny", "8x1"), ("tiny", "2x4"), ("tiny", "1x3"), ("gqa3", "2x4"), ("gqa3", "1x3")
    )
    for call in ("forward", "step")
]  # fmt: skip
BS, NB, MB = 4, 16, 8  # pool block size, blocks, blocks per sequence
MESH_SPECS = {"8x1": "8x1", "2x4": "2x4", "1x3": "1x3", "default": None}
BAD_SPECS = ("3x3", "abc", "9x1", "0x8")


def random_params(config: ModelConfig, seed: int) -> dict:
    """The parameter tree filled from numpy (no init compile): weights and
    biases ~ N(0, 0.05²), norm scales ~ 1 + N(0, 0.05²)."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf) -> np.ndarray:
        x = 0.05 * rng.standard_normal(leaf.shape).astype(np.float32)
        return x + 1 if path[-1].key == "scale" else x

    return jax.tree_util.tree_map_with_path(fill, param_shapes(config))


@partial(jax.jit, static_argnums=0)
def run(model, params, tokens, layout, pool):
    """(logits [T, V], pool) of one Transformer call."""
    hidden, pool = model.apply({"params": params}, tokens, layout, pool)
    return model.apply({"params": params}, hidden, method=Transformer.logits), pool


def call_inputs(config: ModelConfig, call: str, rng: np.random.Generator):
    """tokens [T], layout, pool (None for "forward")."""
    if call == "forward":
        tokens = rng.integers(0, config.vocab_size, 8 * 12).astype(np.int32)
        return tokens, forward_layout(8, 12), None
    shapes = init_pool(config.n_layers, NB, BS, config.n_kv_heads, config.head_dim, jnp.float32)
    pool = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), shapes)
    tables = np.stack([rng.permutation(NB)[:MB] for _ in range(9)]).astype(np.int32)
    context = np.array([3, 7, 0, 15, 9, 1, 12, 5], np.int32)  # 8 decode rows
    # The region: 5 tokens continuing a prompt after 6 pooled positions, 4 of a new one.
    region = np.array([6, 7, 8, 9, 10, 0, 1, 2, 3], np.int32)
    positions = np.concatenate([context, region])
    write = np.full(len(positions), NB * BS, np.int32)
    write[:8] = tables[np.arange(8), context // BS] * BS + context % BS
    layout = Layout(
        positions=positions,
        context=context,
        block_tables=tables[:8],
        segments=np.array([0] * 5 + [1] * 4, np.int32),
        prior=np.array([6], np.int32),
        prior_blocks=tables[8:],
        prior_group=np.array([0] * 5 + [-1] * 4, np.int32),
        write=write,
    )
    return rng.integers(0, config.vocab_size, len(positions)).astype(np.int32), layout, pool


def run_case(config: ModelConfig, params: dict, mesh_spec: str, call: str) -> dict:
    """Sharded vs unsharded outputs of one call on one mesh."""
    model = Transformer(config)
    tokens, layout, pool = call_inputs(config, call, np.random.default_rng(7))
    want_logits, want_pool = run(model, params, tokens, layout, pool)

    mesh = make_mesh(mesh_spec)
    placed = jax.device_put(params, param_shardings(params, mesh))
    if pool is not None:
        pool = jax.device_put(pool, jax.tree.map(lambda x: pool_sharding(mesh, x.shape), pool))
    logits, new_pool = run(model, placed, tokens, layout, pool)

    def shard(x) -> list[int]:
        return list(x.sharding.shard_shape(x.shape))

    layer = placed["layers_0"]

    def max_diff(a, b) -> float:  # on the host: no compile per sharding
        return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))

    pools = zip(jax.tree.leaves(new_pool), jax.tree.leaves(want_pool), strict=True)
    return {
        "max_logit_diff": max_diff(logits, want_logits),
        "max_pool_diff": max((max_diff(a, b) for a, b in pools), default=0.0),
        "shards": {
            "embed": shard(placed["embed"]["embedding"]),
            "qkv": shard(layer["attn"]["qkv"]),
            "o": shard(layer["attn"]["o"]),
            "gate_up": shard(layer["mlp"]["gate_up"]),
            "down": shard(layer["mlp"]["down"]),
            "lm_head": shard(placed["lm_head"]),
            "pool": shard(new_pool.k) if new_pool is not None else None,
        },
        "logits_devices": len(logits.sharding.device_set),
    }


def error_of(spec: str) -> dict | None:
    try:
        make_mesh(spec)
    except Exception as e:  # report any type: the test checks it is ValueError
        return {"type": type(e).__name__, "message": str(e)}
    return None


def report() -> dict:
    meshes = {}
    for name, spec in MESH_SPECS.items():
        mesh = make_mesh(spec, config=CONFIGS["tiny"])
        meshes[name] = {
            "shape": dict(mesh.shape),
            "device_ids": [d.id for d in mesh.devices.flat],
            "axis_types": [str(t) for t in mesh.axis_types],
        }
    meshes["default_no_config"] = {"shape": dict(make_mesh(None).shape)}
    params = {name: random_params(config, seed=0) for name, config in CONFIGS.items()}
    cases = {
        "/".join(case): run_case(CONFIGS[case[0]], params[case[0]], case[1], case[2])
        for case in CASES
    }
    return {
        "n_devices": jax.device_count(),
        "meshes": meshes,
        "errors": {spec: error_of(spec) for spec in BAD_SPECS},
        "cases": cases,
    }


if __name__ == "__main__":
    print(json.dumps(report()))
