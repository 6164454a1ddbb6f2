"""Multi-device sharding checks, run by tests/test_sharding.py in a child process.

`python -m tests.sharding_report` with XLA_FLAGS=--xla_force_host_platform_device_count=8
prints one JSON report: the meshes `make_mesh` builds, the errors it raises,
and for each (config, mesh, call) how far the sharded forward pass is from the
unsharded one and how the weights and cache were actually split. This module
computes; the test file asserts. (XLA fixes the CPU device count when the
backend first starts, which in a pytest process has likely happened already.)
"""

import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig
from model.transformer import Transformer, init_cache
from sharding import cache_sharding, make_mesh, param_shardings, slot_sharding

CONFIGS = {
    "tiny": ModelConfig.tiny(),
    # K=3 splits under model=3 but not 2 or 4; q, k, v sections of 96, 48, 48
    # columns do not line up with a 3-way split of the fused 192; biases on.
    "gqa3": ModelConfig(
        vocab_size=384, dim=48, n_layers=2, n_heads=6, n_kv_heads=3, head_dim=16,
        ffn_dim=96, qkv_bias=True,
    ),
}  # fmt: skip
# (config, mesh, call): "prefill" and "decode" have B=8 slots so 'data' splits;
# "prefill1" is the engine's B=1 prefill, whose slots cannot split. gqa3 adds
# what tiny lacks: 'model' = 3 splitting every weight, K=3 not splitting by 4.
CASES = [
    ("tiny", "8x1", "prefill"),
    ("tiny", "8x1", "decode"),
    ("tiny", "2x4", "prefill"),
    ("tiny", "2x4", "decode"),
    ("tiny", "2x4", "prefill1"),
    ("tiny", "1x3", "prefill"),
    ("tiny", "1x3", "decode"),
    ("gqa3", "2x4", "prefill"),
    ("gqa3", "2x4", "decode"),
    ("gqa3", "1x3", "prefill"),
    ("gqa3", "1x3", "decode"),
]
CACHE_LEN = 16
MESH_SPECS = {"8x1": "8x1", "2x4": "2x4", "1x3": "1x3", "default": None}
BAD_SPECS = ("3x3", "abc", "9x1", "0x8")


def random_params(config: ModelConfig, seed: int) -> dict:
    """The parameter tree filled from numpy (no init compile): weights and
    biases ~ N(0, 0.05²), norm scales ~ 1 + N(0, 0.05²)."""
    model = Transformer(config)
    tokens = jnp.zeros((1, 4), jnp.int32)

    def init():
        caches = init_cache(config, 1, 4, jnp.float32)
        return model.init(jax.random.PRNGKey(0), tokens, tokens, tokens[:, 0], caches)

    rng = np.random.default_rng(seed)

    def fill(path, leaf) -> np.ndarray:
        x = 0.05 * rng.standard_normal(leaf.shape).astype(np.float32)
        return x + 1 if path[-1].key == "scale" else x

    return jax.tree_util.tree_map_with_path(fill, jax.eval_shape(init)["params"])


@partial(jax.jit, static_argnums=0)
def forward(model, params, tokens, positions, start, caches):
    """(logits [B, T, V], caches) of one Transformer call."""
    hidden, caches = model.apply({"params": params}, tokens, positions, start, caches)
    return model.apply({"params": params}, hidden, method=Transformer.logits), caches


def call_inputs(config: ModelConfig, call: str, rng: np.random.Generator):
    """tokens [B, T], positions [B, T], start [B], caches per layer (S = CACHE_LEN)."""
    shape = (1 if call == "prefill1" else 8, 1 if call == "decode" else 12)
    tokens = rng.integers(0, config.vocab_size, shape).astype(np.int32)
    if call == "decode":
        # Slots at different offsets, attending over a cache of random history.
        positions = np.array([[3], [7], [0], [15], [9], [1], [12], [5]], np.int32)
        caches = [
            jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), layer)
            for layer in init_cache(config, shape[0], CACHE_LEN, jnp.float32)
        ]
    else:
        positions = np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy()
        caches = init_cache(config, shape[0], CACHE_LEN, jnp.float32)
    return tokens, positions, positions[:, 0].copy(), caches


def run_case(config: ModelConfig, params: dict, mesh_spec: str, call: str) -> dict:
    """Sharded vs unsharded outputs of one call on one mesh."""
    model = Transformer(config)
    tokens, positions, start, caches = call_inputs(config, call, np.random.default_rng(7))
    want_logits, want_caches = forward(model, params, tokens, positions, start, caches)

    mesh = make_mesh(mesh_spec)
    placed = jax.device_put(params, param_shardings(params, mesh))
    caches = jax.device_put(caches, jax.tree.map(lambda x: cache_sharding(mesh, x.shape), caches))
    tokens, positions, start = (
        jax.device_put(x, slot_sharding(mesh, x.shape)) for x in (tokens, positions, start)
    )
    logits, new_caches = forward(model, placed, tokens, positions, start, caches)

    def shard(x) -> list[int]:
        return list(x.sharding.shard_shape(x.shape))

    layer = placed["layers_0"]

    def max_diff(a, b) -> float:  # on the host: no compile per sharding
        return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))

    return {
        "max_logit_diff": max_diff(logits, want_logits),
        "max_cache_diff": max(
            max_diff(a, b)
            for a, b in zip(jax.tree.leaves(new_caches), jax.tree.leaves(want_caches), strict=True)
        ),
        "shards": {
            "embed": shard(placed["embed"]["embedding"]),
            "qkv": shard(layer["attn"]["qkv"]),
            "o": shard(layer["attn"]["o"]),
            "gate_up": shard(layer["mlp"]["gate_up"]),
            "down": shard(layer["mlp"]["down"]),
            "lm_head": shard(placed["lm_head"]),
            "cache": shard(caches[0].k),
            "tokens": shard(tokens),
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
