"""Mesh and partition rules; sharded forward passes equal unsharded ones.

Two kinds of tests:
- Rules and mesh-shape logic run here, on `AbstractMesh`es (axis sizes
  without devices), so they need no particular device count.
- Real multi-device checks need 8 CPU devices, which XLA only creates if
  XLA_FLAGS=--xla_force_host_platform_device_count=8 is set before the backend
  starts; in a pytest session another test has usually started it already with
  one device. So one child process (`python -m tests.sharding_report`, with
  that flag) computes a JSON report of meshes, errors and sharded-vs-unsharded
  differences, once per module, and the tests below assert on it.
"""

import os
from pathlib import Path

import jax
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from model.nn.config import ModelConfig
from model.nn.quantize import map_matmul_weights, path_str, quantized_shape
from model.nn.transformer import param_shapes
from sharding import (
    AXES,
    ShardingRules,
    default_mesh_shape,
    distributed_requested,
    fallbacks,
    fit_spec,
    make_mesh,
    maybe_initialize_distributed,
    param_shardings,
    parse_mesh_spec,
    pool_sharding,
    slot_sharding,
)
from tests.server_process import EIGHT_DEVICES, run_python_report
from tests.sharding_report import BS, CASES, CONFIGS, NB
from tests.tiny_models import TINY_LLAMA

REPO = Path(__file__).resolve().parents[1]
D, M = "data", "model"


def mesh(data: int, model: int) -> AbstractMesh:
    return AbstractMesh((data, model), AXES)


def specs_by_path(tree) -> dict[str, P]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(k.key for k in path): s.spec for path, s in flat}


# ---- rules --------------------------------------------------------------------------------


def test_every_tensor_kind_gets_its_spec():
    config = ModelConfig(
        vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
        ffn_dim=128, qkv_bias=True,
    )  # fmt: skip
    specs = specs_by_path(param_shardings(param_shapes(config), mesh(2, 4)))
    expected = {
        "embed/embedding": P(M, None),
        "lm_head": P(M, None),
        "final_norm/scale": P(None),
    }
    for i in range(config.n_layers):
        expected |= {
            f"layers_{i}/attn_norm/scale": P(None),
            f"layers_{i}/attn/qkv": P(M, None),
            f"layers_{i}/attn/qkv_bias": P(M),
            f"layers_{i}/attn/o": P(None, M),
            f"layers_{i}/mlp_norm/scale": P(None),
            f"layers_{i}/mlp/gate_up": P(M, None),
            f"layers_{i}/mlp/down": P(None, M),
        }
    assert specs == expected


# Odd vocab and F, K=3: which tensors split depends on the 'model' size.
ODD = ModelConfig(
    vocab_size=257, dim=32, n_layers=2, n_heads=3, n_kv_heads=3, head_dim=6, ffn_dim=45
)


def test_tensors_whose_dim_does_not_divide_are_replicated():
    # model=2: V=257 and F=45 are odd; qkv 54 rows, o 18 columns and gate_up 90 rows are even.
    specs = specs_by_path(param_shardings(param_shapes(ODD), mesh(4, 2)))
    assert specs["embed/embedding"] == P(None, None)
    assert specs["lm_head"] == P(None, None)
    assert specs["layers_1/mlp/down"] == P(None, None)
    assert specs["layers_1/attn/qkv"] == P(M, None)
    assert specs["layers_1/attn/o"] == P(None, M)
    assert specs["layers_1/mlp/gate_up"] == P(M, None)
    # model=3: F=45 now divides; the vocab still does not.
    specs = specs_by_path(param_shardings(param_shapes(ODD), mesh(2, 3)))
    assert specs["layers_1/mlp/down"] == P(None, M)
    assert specs["lm_head"] == P(None, None)


def test_fallbacks_names_the_replicated_tensors_and_the_pool():
    pool = (64, ODD.n_kv_heads, ODD.head_dim, 16)
    found = fallbacks(param_shapes(ODD), mesh(4, 2), pool_shape=pool)
    assert [f.path for f in found] == [
        "embed/embedding",
        "layers_0/mlp/down",
        "layers_1/mlp/down",
        "lm_head",
        "kv_pool",
    ]
    # K=3 does not split over model=2: the pool stays whole.
    assert found[-1].used == P(None, None, None, None)
    assert "kv_pool [64, 3, 6, 16]" in str(found[-1])
    assert [f.path for f in fallbacks(param_shapes(ODD), mesh(2, 3), pool_shape=pool)] == [
        "embed/embedding",
        "lm_head",
    ]


def test_int8_weights_take_their_plain_weights_layout_and_scales_never_fall_back():
    shapes = map_matmul_weights(quantized_shape, param_shapes(ODD))
    placed = jax.tree_util.tree_leaves_with_path(param_shardings(shapes, mesh(4, 2)))
    specs = {path_str(path): s.spec for path, s in placed}
    # model=2: qkv's 54 and gate_up's 90 rows split, so do their scales [rows, 1]; o
    # splits its columns, its scale stays whole; down (F=45) and lm_head (V=257) do not split.
    assert specs["layers_1/attn/qkv/values"] == specs["layers_1/attn/qkv/scale"] == P(M, None)
    assert specs["layers_1/mlp/gate_up/scale"] == P(M, None)
    assert specs["layers_1/attn/o/values"] == P(None, M)
    assert specs["layers_1/attn/o/scale"] == P(None, None)
    assert specs["layers_1/mlp/down/values"] == specs["layers_1/mlp/down/scale"] == P(None, None)
    assert specs["lm_head/values"] == specs["lm_head/scale"] == P(None, None)
    assert specs["embed/embedding"] == P(None, None)  # not quantized
    assert [f.path for f in fallbacks(shapes, mesh(4, 2))] == [
        "embed/embedding",
        "layers_0/mlp/down/values",
        "layers_1/mlp/down/values",
        "lm_head/values",
    ]


@pytest.mark.parametrize(
    "shape, data, model, spec",
    [
        ((64, 2, 16, 16), 4, 2, P(None, M, None, None)),  # blocks on every data device
        ((64, 3, 16, 16), 4, 2, P(None, None, None, None)),  # K=3 over model=2
        ((64, 3, 16, 16), 1, 3, P(None, M, None, None)),
    ],
)
def test_pool_sharding(shape, data, model, spec):
    assert pool_sharding(mesh(data, model), shape).spec == spec


@pytest.mark.parametrize(
    "shape, spec",
    [((8,), P(D)), ((8, 2), P(D, None)), ((6,), P(None)), ((1, 2), P(None, None))],
)
def test_slot_sharding(shape, spec):
    assert slot_sharding(mesh(4, 2), shape).spec == spec


def test_default_rules_shard_nothing():
    rules = ShardingRules()
    specs = specs_by_path(param_shardings(param_shapes(TINY_LLAMA), mesh(2, 4), rules))
    assert all(all(a is None for a in spec) for spec in specs.values())
    assert pool_sharding(mesh(2, 4), (64, 2, 16, 16), rules).spec == P(None, None, None, None)
    assert slot_sharding(mesh(2, 4), (8,), rules).spec == P(None)


def test_a_parameter_without_a_rule_is_an_error():
    wrapped = {"params": param_shapes(TINY_LLAMA)}  # the whole variables dict
    with pytest.raises(ValueError, match="no partition rule matches parameter 'params/"):
        param_shardings(wrapped, mesh(1, 1))


def test_fit_spec_rejects_specs_that_do_not_fit_the_mesh_or_rank():
    with pytest.raises(ValueError, match="'heads' is not a mesh axis"):
        fit_spec((4, 4), P("heads", None), mesh(1, 2))
    with pytest.raises(ValueError, match="more entries than dimensions"):
        fit_spec((4,), P(D, M), mesh(1, 2))
    assert fit_spec((8, 6), P((D, M), None), mesh(2, 2)) == P((D, M), None)
    assert fit_spec((6, 6), P((D, M), None), mesh(2, 2)) == P(None, None)


# ---- mesh shapes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_devices, n_kv_heads, shape",
    [
        (8, 2, (4, 2)),
        (8, 3, (8, 1)),
        (8, 8, (1, 8)),
        (8, 32, (1, 8)),
        (6, 3, (2, 3)),
        (1, 4, (1, 1)),
    ],
)
def test_default_mesh_shape_splits_kv_heads_cleanly(n_devices, n_kv_heads, shape):
    config = TINY_LLAMA
    config = ModelConfig(**{**config.__dict__, "n_heads": n_kv_heads, "n_kv_heads": n_kv_heads})
    assert default_mesh_shape(n_devices, config) == shape


@pytest.mark.parametrize("spec, shape", [("2x4", (2, 4)), ("8x1", (8, 1)), (" 1X3 ", (1, 3))])
def test_parse_mesh_spec(spec, shape):
    assert parse_mesh_spec(spec) == shape


@pytest.mark.parametrize("spec", ["abc", "2x", "2x4x1", "0x8", "-1x2"])
def test_parse_mesh_spec_rejects(spec):
    with pytest.raises(ValueError, match=f"mesh spec {spec!r}"):
        parse_mesh_spec(spec)


def test_one_device_is_the_one_by_one_mesh():
    one = [jax.devices()[0]]
    for built in (make_mesh(None, one, TINY_LLAMA), make_mesh("1x1", one)):
        assert dict(built.shape) == {D: 1, M: 1}


# ---- distributed --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "environ, wanted",
    [
        ({}, False),
        ({"JAXCHAT_DISTRIBUTED": "1"}, True),
        ({"JAXCHAT_DISTRIBUTED": "0", "TPU_WORKER_HOSTNAMES": "h0,h1"}, False),
        ({"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3"}, True),
        ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),  # single-host TPU VM on GKE
        ({"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476,10.0.0.2:8476"}, True),
        ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1"}, True),
    ],
)
def test_distributed_requested(environ, wanted):
    assert distributed_requested(environ) is wanted


def test_maybe_initialize_distributed_initializes_once(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: bool(calls))
    monkeypatch.setattr(jax.distributed, "initialize", lambda: calls.append(1))
    assert maybe_initialize_distributed({}) is False
    assert calls == []
    env = {"JAXCHAT_DISTRIBUTED": "1"}
    assert maybe_initialize_distributed(env) is True
    assert maybe_initialize_distributed(env) is True
    assert calls == [1]


# ---- on 8 fake CPU devices (child process) ------------------------------------------------


@pytest.fixture(scope="module")
def report() -> dict:
    env = {**os.environ, **EIGHT_DEVICES}
    return run_python_report(["-m", "tests.sharding_report"], env, timeout=800)


def test_child_has_eight_devices(report):
    assert report["n_devices"] == 8


@pytest.mark.parametrize(
    "name, shape, device_ids",
    [
        ("8x1", {D: 8, M: 1}, list(range(8))),
        ("2x4", {D: 2, M: 4}, list(range(8))),
        ("1x3", {D: 1, M: 3}, [0, 1, 2]),
        ("default", {D: 4, M: 2}, list(range(8))),  # tiny: K=2
    ],
)
def test_make_mesh(report, name, shape, device_ids):
    built = report["meshes"][name]
    assert built["shape"] == shape
    assert sorted(built["device_ids"]) == device_ids
    assert built["axis_types"] == ["AxisType.Auto", "AxisType.Auto"]


def test_default_mesh_without_a_config_is_all_data(report):
    assert report["meshes"]["default_no_config"]["shape"] == {D: 8, M: 1}


@pytest.mark.parametrize("spec", ["3x3", "abc", "9x1", "0x8"])
def test_make_mesh_rejects(report, spec):
    error = report["errors"][spec]
    assert error is not None and error["type"] == "ValueError"
    assert f"mesh spec {spec!r}" in error["message"]


# How many ways 'model' splits each config's weights on each mesh (1: replicated),
# and the axis each weight splits along.
MODEL_SPLIT = {
    ("tiny", "8x1"): 1,
    ("tiny", "2x4"): 4,
    ("tiny", "1x3"): 1,  # 64, 128, 256 do not divide by 3: all fall back
    ("gqa3", "2x4"): 4,
    ("gqa3", "1x3"): 3,
}
SPLIT_AXIS = {"embed": 0, "qkv": 0, "o": 1, "gate_up": 0, "down": 1, "lm_head": 0}


def full_shapes(c: ModelConfig) -> dict[str, list[int]]:
    return {
        "embed": [c.vocab_size, c.dim],
        "qkv": [(c.n_heads + 2 * c.n_kv_heads) * c.head_dim, c.dim],
        "o": [c.dim, c.n_heads * c.head_dim],
        "gate_up": [2 * c.ffn_dim, c.dim],
        "down": [c.dim, c.ffn_dim],
        "lm_head": [c.vocab_size, c.dim],
    }


@pytest.mark.parametrize("config, mesh_spec, call", CASES, ids=["/".join(c) for c in CASES])
def test_sharded_calls_equal_unsharded(report, config, mesh_spec, call):
    case = report["cases"][f"{config}/{mesh_spec}/{call}"]
    assert case["max_logit_diff"] <= 1e-5
    assert case["max_pool_diff"] <= 1e-5

    # The weights really were split as the rules say (not silently replicated).
    c, split = CONFIGS[config], MODEL_SPLIT[(config, mesh_spec)]
    for name, shape in full_shapes(c).items():
        shape[SPLIT_AXIS[name]] //= split
        assert case["shards"][name] == shape, name

    # Pool [L·NB, K, H, BS]: K over 'model' where it divides, blocks everywhere.
    data, model = parse_mesh_spec(mesh_spec)
    if call == "step":
        k_local = c.n_kv_heads // model if c.n_kv_heads % model == 0 else c.n_kv_heads
        assert case["shards"]["pool"] == [c.n_layers * NB, k_local, c.head_dim, BS]
    assert case["logits_devices"] == data * model
