"""Orbax checkpoints (`jaxchat convert`): the tiny Llama converted from GGUF or from its
Hugging Face directory restores to the GGUF's params, logits, greedy tokens and text;
int8 weights are per-row int8 with the right scales; a 2x4 mesh restores each shard
in place; the CLI; errors name the checkpoint."""

import dataclasses
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from handler.cli import main
from model import LLM, SamplingParams
from model.nn.network import forward_logits
from model.nn.quantize import MATMUL_WEIGHTS, QuantizedWeight
from model.nn.transformer import Transformer
from model.weights.gguf import load_gguf
from model.weights.manifest import MANIFEST, is_checkpoint, read_manifest
from model.weights.orbax import convert, load_checkpoint, load_tokenizer
from sharding import make_mesh
from tests.gguf_text import gguf_tokenizer
from tests.gguf_writer import hf_random_weights
from tests.server_process import EIGHT_DEVICES, run_python_report
from tests.test_hf_loader import flat
from tests.tiny_models import TINY_LLAMA, train_sentencepiece, write_tiny_pair

TOKENS = [1, 17, 42, 5, 88, 3, 64, 30, 9, 211, 300]
MESSAGES = [{"role": "user", "content": "the quick brown fox"}]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def proto():
    return train_sentencepiece()


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tiny(request, tmp_path_factory, proto):
    """The tiny Llama as GGUF and HF, plus checkpoints converted from each and an int8 one."""
    config = dataclasses.replace(TINY_LLAMA, tie_embeddings=request.param)
    root = tmp_path_factory.mktemp("tied" if request.param else "untied")
    gguf_path, hf_path = write_tiny_pair(root, config, hf_random_weights(config, seed=2), proto)
    convert(gguf_path, root / "from_gguf")
    convert(hf_path, root / "from_hf")
    convert(gguf_path, root / "int8", quantize="int8")
    return config, root


def one_device(config):
    return make_mesh("1x1", config=config)


def logits(config, params) -> np.ndarray:
    """Logits [T, V] of TOKENS, one compile per config and tree structure."""
    return np.asarray(_forward(config)(params))


@functools.cache
def _forward(config):
    model = Transformer(config)
    tokens = jnp.asarray([TOKENS], jnp.int32)
    return jax.jit(lambda params: forward_logits(model, params, tokens)[0])


@functools.cache
def greedy(path) -> tuple[list[int], tuple[int, ...], str, frozenset[int]]:
    """(prompt ids, greedy ids, text, stop ids) of the model at `path`, one device."""
    llm = LLM(str(path), max_seq_len=64, batch=2, dtype="float32")
    prompt = llm.encode_chat(MESSAGES)
    out = llm.generate(prompt, GREEDY)
    llm.scheduler.stop()
    return prompt, out.token_ids, out.text, llm.tokenizer.stop_ids


# ---- identity with the GGUF -----------------------------------------------------------


@pytest.mark.parametrize("source", ["from_gguf", "from_hf"])
def test_checkpoint_restores_the_gguf_params_and_logits(tiny, source):
    config, root = tiny
    gguf_config, gguf_params, _ = load_gguf(root / "tiny.gguf", jnp.float32)
    manifest = read_manifest(root / source)
    assert (manifest.dtype, manifest.quantization) == ("float32", None)
    assert manifest.source == str(root / ("tiny.gguf" if source == "from_gguf" else "hf"))
    assert manifest.tokenizer == ("gguf" if source == "from_gguf" else "hf")

    loaded, params = load_checkpoint(root / source, one_device(config), jnp.float32)
    # GGUF stores norm_eps as f32; the HF config.json has it exactly.
    assert dataclasses.replace(loaded, norm_eps=config.norm_eps) == config
    got, want = flat(params), flat(gguf_params)
    assert got.keys() == want.keys() and ("['lm_head']" in got) is not config.tie_embeddings
    for key, value in want.items():
        assert got[key].dtype == np.float32 and np.array_equal(got[key], value), key
    np.testing.assert_array_equal(logits(loaded, params), logits(gguf_config, gguf_params))


def test_llm_on_checkpoints_gives_the_gguf_greedy_text(tiny):
    config, root = tiny
    if config.tie_embeddings:
        pytest.skip("one tying is enough for the end-to-end run")
    prompt, ids, text, stops = greedy(root / "tiny.gguf")
    assert len(ids) == 16 and text
    for source in ("from_gguf", "from_hf"):
        assert greedy(root / source) == (prompt, ids, text, stops), source


def test_bfloat16_restores_as_the_compute_dtype(tiny):
    config, root = tiny
    _, params = load_checkpoint(root / "from_gguf", one_device(config), jnp.bfloat16)
    _, gguf_params, _ = load_gguf(root / "tiny.gguf", jnp.bfloat16)
    for key, value in flat(gguf_params).items():
        got = flat(params)[key]
        assert got.dtype == jnp.bfloat16 and np.array_equal(got, value), key


# ---- int8 -----------------------------------------------------------------------------


def numpy_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-row int8, written independently: (values, scale [out, 1])."""
    scale = np.max(np.abs(w), axis=1, keepdims=True) / 127.0
    return np.round(w / scale), scale


def test_int8_weights_are_per_row_int8_with_their_scales(tiny):
    config, root = tiny
    assert read_manifest(root / "int8").quantization == "int8"
    _, params = load_checkpoint(root / "int8", one_device(config), jnp.float32)
    _, gguf_params, _ = load_gguf(root / "tiny.gguf", jnp.float32)
    quantized = 0
    for path, w in jax.tree_util.tree_leaves_with_path(gguf_params):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        node = params
        for key in name.split("/"):
            node = node[key]
        w = np.asarray(w)
        if not MATMUL_WEIGHTS.fullmatch(name):  # embedding, norms: unchanged f32
            assert node.dtype == np.float32 and np.array_equal(node, w), name
            continue
        quantized += 1
        values, scale = np.asarray(node.values), np.asarray(node.scale)
        assert values.dtype == np.int8 and scale.dtype == np.float32, name
        want_values, want_scale = numpy_int8(w)
        assert scale.shape == (w.shape[0], 1), name
        np.testing.assert_allclose(scale, want_scale, rtol=1e-6, err_msg=name)
        np.testing.assert_array_equal(values, want_values, err_msg=name)
        assert np.all(np.abs(values).max(axis=1) == 127), name
        assert np.all(np.abs(values * scale - w) <= scale / 2 * (1 + 1e-5)), name
    assert quantized == 4 * config.n_layers + (not config.tie_embeddings)


def test_int8_logits_are_the_dequantized_models_and_close_to_f32(tmp_path, proto):
    """Rows get magnitudes over a factor ~10 (lognormal), as real projections do, so a
    scale applied to the wrong rows is far off. Tolerance: int8 logits within 5% of the
    largest f32 |logit| (measured: ~1.3%; scales on reversed rows: ~100%)."""
    weights = hf_random_weights(TINY_LLAMA, seed=7)
    rng = np.random.default_rng(8)
    for name, w in weights.items():
        if w.ndim == 2 and "embed" not in name:
            weights[name] = w * rng.lognormal(0, 0.5, (w.shape[0], 1)).astype(np.float32)
    gguf_path, _ = write_tiny_pair(tmp_path, TINY_LLAMA, weights, proto)
    convert(gguf_path, tmp_path / "int8", quantize="int8")
    _, f32_params, _ = load_gguf(gguf_path, jnp.float32)
    _, int8_params = load_checkpoint(tmp_path / "int8", one_device(TINY_LLAMA), jnp.float32)

    is_weight = lambda x: isinstance(x, QuantizedWeight)  # noqa: E731
    dequantized = jax.tree.map(
        lambda x: np.asarray(x.values, np.float32) * np.asarray(x.scale) if is_weight(x) else x,
        int8_params,
        is_leaf=is_weight,
    )
    reversed_scales = jax.tree.map(
        lambda x: QuantizedWeight(x.values, x.scale[::-1]) if is_weight(x) else x,
        int8_params,
        is_leaf=is_weight,
    )
    want, got = logits(TINY_LLAMA, f32_params), logits(TINY_LLAMA, int8_params)
    np.testing.assert_allclose(got, logits(TINY_LLAMA, dequantized), atol=1e-5, rtol=1e-5)
    tolerance = 0.05 * np.abs(want).max()
    assert np.abs(got - want).max() <= tolerance
    assert np.abs(logits(TINY_LLAMA, reversed_scales) - want).max() > 5 * tolerance


# ---- sharded restore ------------------------------------------------------------------


def test_2x4_mesh_restores_each_shard_in_place_and_generates_the_gguf_tokens(tiny):
    config, root = tiny
    if config.tie_embeddings:
        pytest.skip("the untied model covers lm_head too")
    f32, int8 = str(root / "from_gguf"), str(root / "int8")
    report = run_python_report(
        ["-m", "tests.checkpoint_mesh", f32, int8], {**os.environ, **EIGHT_DEVICES}, timeout=600
    )
    # qkv [128, 64] and gate_up [256, 64] split by rows over model=4, o [64, 64] and
    # down [64, 128] by columns; embedding and lm_head [320, 64] by vocab rows.
    split = {
        "embed/embedding": [80, 64],
        "lm_head": [80, 64],
        "layers_1/attn/qkv": [32, 64],
        "layers_1/attn/o": [64, 16],
        "layers_1/mlp/gate_up": [64, 64],
        "layers_1/mlp/down": [64, 32],
        "layers_1/attn_norm/scale": [64],
    }
    scales = {  # int8 scales [out, 1]: split where the rows are
        "lm_head/scale": [80, 1],
        "layers_1/attn/qkv/scale": [32, 1],
        "layers_1/attn/o/scale": [64, 1],
        "layers_1/mlp/gate_up/scale": [64, 1],
        "layers_1/mlp/down/scale": [64, 1],
    }
    int8_split = {f"{k}/values" if MATMUL_WEIGHTS.fullmatch(k) else k: v for k, v in split.items()}
    for path, expected in ((f32, split), (int8, int8_split | scales)):
        arrays = report[path]["arrays"]
        assert all(a["target"] and a["shards"] == 8 for a in arrays.values()), path
        assert {k: arrays[k]["shard"] for k in expected} == expected, path
        assert report[path]["kept"], path
    assert report[int8]["arrays"]["layers_1/attn/o/scale"]["spec"] == str(P(None, None))

    # Sharded sums add in another order: equal to float rounding, not bit for bit.
    _, gguf_params, _ = load_gguf(root / "tiny.gguf", jnp.float32)
    _, int8_params = load_checkpoint(int8, one_device(config), jnp.float32)
    for path, params in ((f32, gguf_params), (int8, int8_params)):
        want = logits(config, params)
        np.testing.assert_allclose(report[path]["logits"], want, atol=1e-5, rtol=1e-5)
    prompt, ids, _, _ = greedy(root / "tiny.gguf")
    assert report[f32]["prompt"] == prompt and report[f32]["greedy"] == list(ids)


# ---- CLI ------------------------------------------------------------------------------


def test_cli_convert_writes_a_loadable_int8_bfloat16_checkpoint(tiny, tmp_path, capsys):
    config, root = tiny
    dest = tmp_path / "ckpt"
    args = ["convert", str(root / "tiny.gguf"), str(dest), "--int8", "--dtype", "bfloat16"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    # The result is stdout's last line (an app built earlier in this process may have
    # sent log records to stdout too: handler/logs.py).
    result = out.strip().splitlines()[-1]
    assert result.startswith(str(dest)) and result.endswith("MB")
    assert "loading" in err and "converted in" in err
    manifest = json.loads((dest / MANIFEST).read_text())
    assert (manifest["quantization"], manifest["dtype"]) == ("int8", "bfloat16")
    assert manifest["source"] == str(root / "tiny.gguf")

    _, params = load_checkpoint(dest, one_device(config), jnp.float32)
    _, gguf_params, _ = load_gguf(root / "tiny.gguf", jnp.float32)
    assert params["layers_0"]["mlp"]["down"].values.dtype == jnp.int8
    # The embedding was stored as bfloat16: restored as f32 it is the rounded original.
    embedding = np.asarray(gguf_params["embed"]["embedding"])
    rounded = embedding.astype(jnp.bfloat16).astype(np.float32)
    assert not np.array_equal(rounded, embedding)
    np.testing.assert_array_equal(params["embed"]["embedding"], rounded)
    tokenizer, template = load_tokenizer(dest)
    reference = gguf_tokenizer(root / "tiny.gguf")
    assert tokenizer.encode("the quick brown fox") == reference.encode("the quick brown fox")
    assert template.render(MESSAGES) == "<s>[INST] the quick brown fox [/INST]"


def test_cli_convert_refuses_a_non_empty_destination(tiny, tmp_path, capsys):
    _, root = tiny
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["convert", str(root / "tiny.gguf"), str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path} already exists and is not an empty directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]  # nothing staged left


def test_convert_into_an_empty_directory_and_refusing_a_checkpoint_source(tiny, tmp_path):
    config, root = tiny
    (tmp_path / "empty").mkdir()
    convert(root / "tiny.gguf", tmp_path / "empty")
    assert is_checkpoint(tmp_path / "empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    with pytest.raises(ValueError, match=f"{root / 'from_gguf'} is already a jaxchat checkpoint"):
        convert(root / "from_gguf", tmp_path / "again")
    with pytest.raises(ValueError, match="quantize must be None or 'int8' \\(got 'int4'\\)"):
        convert(root / "tiny.gguf", tmp_path / "int4", quantize="int4")


# ---- errors ---------------------------------------------------------------------------


def broken_copy(src, dest, edit):
    """A copy of checkpoint `src` at `dest` with its jaxchat.json dict passed through `edit`."""
    shutil.copytree(src, dest)
    manifest = json.loads((dest / MANIFEST).read_text())
    edit(manifest)
    (dest / MANIFEST).write_text(json.dumps(manifest))
    return dest


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["config"].pop("dim"), "config lacks the field 'dim'"),
        (lambda m: m["config"].update(n_layers="two"), "config field 'n_layers' .* 'two'"),
        (lambda m: m["config"].update(n_kv_heads=3), "n_heads \\(4\\) must be a multiple"),
        (lambda m: m["config"].update(rope_scaling=[8.0]), "config field 'rope_scaling'"),
        (
            lambda m: m["config"].update(n_experts=8),
            "unknown config field\\(s\\) \\['n_experts'\\]",
        ),
        (lambda m: m.update(quantization="int4"), "field 'quantization' is 'int4'"),
        (lambda m: m.update(version=2), "version 2 needs a newer jaxchat"),
        (lambda m: m.pop("format"), "field 'format' is None"),
    ],
    ids=["missing", "type", "heads", "rope", "unknown", "quantization", "version", "format"],
)
def test_a_malformed_manifest_is_named(tiny, tmp_path, edit, message):
    config, root = tiny
    path = broken_copy(root / "from_gguf", tmp_path / "broken", edit)
    with pytest.raises(ValueError, match=f"{path / MANIFEST}: {message}"):
        load_checkpoint(path, one_device(config), jnp.float32)


def test_corrupt_or_incomplete_checkpoints_are_named(tiny, tmp_path):
    config, root = tiny
    path = broken_copy(root / "from_gguf", tmp_path / "corrupt", lambda m: None)
    (path / MANIFEST).write_text('{"format": "jaxchat-orbax", "vers')
    with pytest.raises(ValueError, match=f"{path / MANIFEST} is not valid JSON"):
        LLM(str(path))

    # The manifest says int8 but params/ holds f32 weights.
    path = broken_copy(
        root / "from_gguf", tmp_path / "mislabelled", lambda m: m.update(quantization="int8")
    )
    mismatch = f"{path}/params does not match jaxchat.json: missing layers_0/attn/o/values"
    with pytest.raises(ValueError, match=mismatch):
        load_checkpoint(path, one_device(config), jnp.float32)
    # The manifest's ffn_dim is not the stored one.
    path = broken_copy(
        root / "from_gguf", tmp_path / "resized", lambda m: m["config"].update(ffn_dim=64)
    )
    mismatch = r"layers_0/mlp/down is \[64, 128\], expected \[64, 64\]"
    with pytest.raises(
        ValueError, match=f"{path}/params does not match jaxchat.json: .*{mismatch}"
    ):
        load_checkpoint(path, one_device(config), jnp.float32)

    path = broken_copy(root / "from_gguf", tmp_path / "no_params", lambda m: None)
    shutil.rmtree(path / "params")
    with pytest.raises(FileNotFoundError, match=f"{path} is not a complete jaxchat checkpoint"):
        load_checkpoint(path, one_device(config), jnp.float32)

    assert not is_checkpoint(root / "hf") and not is_checkpoint(root / "tiny.gguf")
    with pytest.raises(FileNotFoundError, match=f"{root / 'hf'} is not a jaxchat checkpoint"):
        read_manifest(root / "hf")
