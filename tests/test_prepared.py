"""Prepared GGUF copies (model/weights/prepared.py): a second load reads the copy, not the GGUF,
and gives identical config, parameters, tokenizer and template; a changed or damaged
source or copy is prepared again."""

import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.text.chat_template import ChatTemplate
from model.text.tokenizer import Tokenizer
from model.weights.gguf import load_gguf, read_metadata
from model.weights.prepared import load_gguf_prepared
from tests.tiny_models import TINY_LLAMA, write_tiny_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return write_tiny_gguf(root, TINY_LLAMA, seed=4)


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """Paths GGUFReader parses from now on."""
    paths: list[str] = []
    init = gguf.GGUFReader.__init__

    def counting(self, path, *args, **kwargs):
        paths.append(str(path))
        init(self, path, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFReader, "__init__", counting)
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
    for got_config, got_params, meta in (first, second):
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
    _, params, _ = load_gguf_prepared(tiny_gguf, jnp.bfloat16, tmp_path)
    _, reference, _ = load_gguf(tiny_gguf, jnp.bfloat16)
    assert_same_params(params, reference)


def test_a_changed_source_is_prepared_again(tiny_gguf, tmp_path, opened):
    load_gguf_prepared(tiny_gguf, jnp.float32, tmp_path)
    stat = tiny_gguf.stat()
    os.utime(tiny_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    load_gguf_prepared(tiny_gguf, jnp.float32, tmp_path)
    assert len(opened) == 2 and len(list(tmp_path.iterdir())) == 2


def test_a_damaged_copy_is_prepared_again(tiny_gguf, tmp_path, opened):
    _, params, _ = load_gguf_prepared(tiny_gguf, jnp.float32, tmp_path)
    (copy,) = tmp_path.iterdir()
    weights = copy / "params.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    _, again, _ = load_gguf_prepared(tiny_gguf, jnp.float32, tmp_path)
    assert len(opened) == 2
    assert_same_params(again, params)
    _, third, _ = load_gguf_prepared(tiny_gguf, jnp.float32, tmp_path)  # repaired
    assert len(opened) == 2
    assert_same_params(third, params)
