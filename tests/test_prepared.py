"""Prepared GGUF copies (model/weights/prepared.py): a second load reads the copy, not the GGUF,
and gives identical config, parameters, tokenizer and template; a changed or damaged
source or copy is prepared again."""

import mmap
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from jax.sharding import Mesh

from model import kernels
from model.engine.quantized import kernel_params, split_blocks
from model.nn.params import BLOCKS, LAYER_BLOCKS, rows_of
from model.nn.quantize import stack_blocks
from model.text.chat_template import ChatTemplate
from model.text.tokenizer import Tokenizer
from model.weights.gguf import (
    GGUFFile,
    config_from_gguf,
    load_gguf,
    load_gguf_blocks,
    read_metadata,
)
from model.weights.prepared import load_gguf_prepared
from tests.tiny_models import TINY_LLAMA, write_tiny_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return write_tiny_gguf(root, TINY_LLAMA, seed=4)


@pytest.fixture(scope="module")
def q4_gguf(tmp_path_factory):
    """The tiny Llama with its matrices (embedding and head too) as Q4_1 blocks."""
    root = tmp_path_factory.mktemp("q4")
    return write_tiny_gguf(root, TINY_LLAMA, seed=5, qtype=gguf.GGMLQuantizationType.Q4_1)


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """Paths GGUFFile parses from now on."""
    paths: list[str] = []
    init = GGUFFile.__init__

    def counting(self, path, *args, **kwargs):
        paths.append(str(path))
        init(self, path, *args, **kwargs)

    monkeypatch.setattr(GGUFFile, "__init__", counting)
    return paths


def assert_same_params(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_second_load_reads_the_copy_and_gives_the_same_model(tiny_gguf, tmp_path, opened):
    config, params, reader = load_gguf(tiny_gguf, jnp.float32)
    first = load_gguf_prepared(tiny_gguf, jnp.float32, tmp_path)
    second = load_gguf_prepared(tiny_gguf, jnp.float32, tmp_path)
    assert len(opened) == 2  # load_gguf and the first prepared load; the second reads JSON
    assert len(list(tmp_path.iterdir())) == 1
    for got_config, got_params, meta, _ in (first, second):
        assert got_config == config
        assert_same_params(got_params, params)
        tokenizer = Tokenizer.from_metadata(meta)
        reference = Tokenizer.from_metadata(read_metadata(reader))
        text = "the quick brown fox, 42 times"
        assert tokenizer.encode(text) == reference.encode(text)
        assert tokenizer.stop_ids == reference.stop_ids
        messages = [{"role": "user", "content": "hi"}]
        assert ChatTemplate.from_metadata(meta, tokenizer).render(messages) == (
            ChatTemplate.from_metadata(read_metadata(reader), reference).render(messages)
        )


def test_bfloat16_is_cast_from_the_f32_copy(tiny_gguf, tmp_path):
    load_gguf_prepared(tiny_gguf, jnp.float32, tmp_path)
    _, params, *_ = load_gguf_prepared(tiny_gguf, jnp.bfloat16, tmp_path)
    _, reference, _ = load_gguf(tiny_gguf, jnp.bfloat16)
    assert_same_params(params, reference)


def test_a_changed_source_is_prepared_again_and_its_old_copy_removed(
    tiny_gguf, q4_gguf, tmp_path, opened
):
    load_gguf_prepared(tiny_gguf, jnp.float32, tmp_path)
    load_gguf_prepared(q4_gguf, jnp.float32, tmp_path)  # another file's copy
    before = set(tmp_path.iterdir())
    stat = tiny_gguf.stat()
    os.utime(tiny_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    load_gguf_prepared(tiny_gguf, jnp.float32, tmp_path)
    assert len(opened) == 3
    after = set(tmp_path.iterdir())
    assert len(before) == len(after) == 2 and len(before & after) == 1  # the other file's
    _, params, *_ = load_gguf_prepared(tiny_gguf, jnp.float32, tmp_path)
    _, reference, _ = load_gguf(tiny_gguf, jnp.float32)
    assert len(opened) == 4 and set(tmp_path.iterdir()) == after  # (load_gguf's own)
    assert_same_params(params, reference)


def test_a_damaged_copy_is_prepared_again(tiny_gguf, tmp_path, opened):
    _, params, *_ = load_gguf_prepared(tiny_gguf, jnp.float32, tmp_path)
    (copy,) = tmp_path.iterdir()
    weights = copy / "params.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    _, again, *_ = load_gguf_prepared(tiny_gguf, jnp.float32, tmp_path)
    assert len(opened) == 2
    assert_same_params(again, params)
    _, third, *_ = load_gguf_prepared(tiny_gguf, jnp.float32, tmp_path)  # repaired
    assert len(opened) == 2
    assert_same_params(third, params)


def test_the_copys_layers_stack_without_a_copy(tiny_gguf, tmp_path):
    """The copy stores each weight of every layer as one [L, ...] array; the layers read
    back are its rows, which the engine's scanned layers take as a view of it."""
    load_gguf_prepared(tiny_gguf, jnp.float32, tmp_path)
    config, params, *_ = load_gguf_prepared(tiny_gguf, jnp.float32, tmp_path)
    layers = [params[f"layers_{i}"] for i in range(config.n_layers)]
    for rows in zip(*(jax.tree.leaves(layer) for layer in layers), strict=True):
        stacked = rows_of(rows)
        assert stacked is not None and np.shares_memory(stacked, rows[0])
        np.testing.assert_array_equal(stacked, np.stack(rows))
        assert not stacked.flags.writeable


def test_the_copys_layer_blocks_go_to_the_kernels_without_a_copy(q4_gguf, tmp_path):
    """The copy stores each matmul weight's blocks of every layer as one [L, rows, bytes]
    array: the kernels' stacked weight is a view of it (no copy at start-up), and equals
    the blocks the GGUF itself gives, stacked."""
    if not kernels.load():
        pytest.skip("the kernels are not built")
    reader = GGUFFile(q4_gguf)
    config = config_from_gguf(reader)
    fresh = flatten_dict(
        load_gguf_blocks(reader, config, read_metadata(reader)["general.architecture"])
    )
    load_gguf_prepared(q4_gguf, jnp.float32, tmp_path)
    _, params, _, blocks = load_gguf_prepared(q4_gguf, jnp.float32, tmp_path)
    moved = flatten_dict(kernel_params(params, blocks, config.n_layers)[BLOCKS])
    names = {k[1:] for k in fresh if k[0].startswith("layers_")}
    assert names and all((LAYER_BLOCKS, *name) in moved for name in names)
    for name in names:
        stacked = moved[(LAYER_BLOCKS, *name)]
        layers = [blocks[f"layers_{i}"] for i in range(config.n_layers)]
        first = flatten_dict(layers[0])[name].blocks
        assert np.shares_memory(stacked.blocks, first) and not stacked.blocks.flags.writeable
        expected = stack_blocks([fresh[(f"layers_{i}", *name)] for i in range(config.n_layers)])
        np.testing.assert_array_equal(stacked.blocks, expected.blocks)
        assert stacked.kind == expected.kind


def test_rows_elsewhere_are_stacked_by_copying():
    stacked = np.arange(24, dtype=np.float32).reshape(4, 2, 3)
    assert rows_of(list(stacked)).base is not None
    assert rows_of([stacked[0], stacked[2]]) is None  # not adjacent
    assert rows_of([stacked[1], stacked[0]]) is None  # not in order
    assert rows_of([stacked[0, :, :2], stacked[1, :, :2]]) is None  # not contiguous
    apart = [np.ones((2, 3), np.float32) for _ in range(3)]  # separate buffers
    assert rows_of(apart) is None
    pool = np.zeros(12, np.float32)  # adjacent views of one buffer, but of other shapes
    assert rows_of([pool[:6].reshape(2, 3), pool[6:].reshape(3, 2)]) is None


def test_the_copy_is_mapped_not_read(tiny_gguf, tmp_path):
    """The copy's arrays are read-only views of its files mapped into memory: a weight is
    paged in when used, and one that the kernels take as blocks is never read."""
    load_gguf_prepared(tiny_gguf, jnp.float32, tmp_path)
    _, params, _, blocks = load_gguf_prepared(tiny_gguf, jnp.float32, tmp_path)
    for array in jax.tree.leaves((params, blocks)):
        owner = array
        while isinstance(owner, np.ndarray | memoryview):
            owner = owner.obj if isinstance(owner, memoryview) else owner.base
        assert isinstance(owner, mmap.mmap)
        assert not array.flags.writeable


MATMULS = [("layers_0", "attn", "qkv"), ("layers_1", "mlp", "gate_up"), ("lm_head",)]


def one_device() -> Mesh:
    return Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))


@pytest.mark.parametrize("fresh", [True, False])
def test_weights_kept_as_blocks_have_no_f32_copy_until_a_step_needs_one(
    q4_gguf, tmp_path, fresh, monkeypatch
):
    """Prepared (fresh, or read from the copy), the matmul weights are blocks only; an
    engine without the kernels gets them dequantised: exactly the GGUF's f32 weights."""
    _, reference, _ = load_gguf(q4_gguf, jnp.float32)
    if not fresh:
        load_gguf_prepared(q4_gguf, jnp.float32, tmp_path)
    config, params, _, blocks = load_gguf_prepared(q4_gguf, jnp.float32, tmp_path)
    flat, kept = flatten_dict(params), flatten_dict(blocks)
    assert all(path in kept and path not in flat for path in MATMULS)
    assert ("embed", "embedding") in flat  # the lookup reads f32 rows
    monkeypatch.setenv("JAXCHAT_QUANTIZED_KERNEL", "off")
    dense, placed, digest = split_blocks(params, blocks, one_device(), config, jnp.float32)
    assert placed == {} and digest is None
    assert_same_params(dense, reference)


def test_a_weight_not_stacked_as_blocks_in_every_layer_is_dequantised(q4_gguf, tmp_path):
    """The kernels take a layer weight as blocks only if every layer has it so; where
    one layer's is f32, the others' blocks are dequantised for the steps."""
    if not kernels.load():
        pytest.skip("the kernels are not built")
    _, reference, _ = load_gguf(q4_gguf, jnp.float32)
    config, params, _, blocks = load_gguf_prepared(q4_gguf, jnp.float32, tmp_path)
    qkv = reference["layers_1"]["attn"]["qkv"]
    params["layers_1"]["attn"] = {"qkv": np.asarray(qkv)}  # as a loader leaves a format
    del blocks["layers_1"]["attn"]["qkv"]  # the kernels do not read
    rest, placed, digest = split_blocks(params, blocks, one_device(), config, jnp.float32)
    assert digest is not None
    moved = flatten_dict(placed[BLOCKS])
    assert (LAYER_BLOCKS, "mlp", "gate_up") in moved and ("lm_head",) in moved
    assert (LAYER_BLOCKS, "attn", "qkv") not in moved
    for i in range(config.n_layers):
        got = rest[f"layers_{i}"]["attn"]["qkv"]
        np.testing.assert_array_equal(got, reference[f"layers_{i}"]["attn"]["qkv"])
        assert (f"layers_{i}", "mlp", "gate_up") not in flatten_dict(rest)
