"""GGUF loading: every tensor type, Q/K un-permutation, tied and untied heads.

The check is against an independent NumPy forward pass of HF's Llama (rotate-half
RoPE, [out, in] weights) on the same weights, dequantised the same way.
"""

import dataclasses
import functools

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from model.engine.engine import Engine
from model.nn.config import ModelConfig
from model.weights.gguf import GGUFFile, config_from_gguf, load_gguf, load_gguf_params
from model.weights.sources import bundled_model_path
from tests.gguf_writer import hf_random_weights, write_llama_gguf
from tests.tiny_models import TINY_LLAMA, write_tiny_gguf

Q = gguf.GGMLQuantizationType
CONFIG = dataclasses.replace(TINY_LLAMA, vocab_size=96, ffn_dim=96)  # small blocks


def reference_logits(
    config: ModelConfig, w: dict[str, np.ndarray], tokens: list[int]
) -> np.ndarray:
    """HF LlamaForCausalLM's forward in NumPy (float64), tokens [T] → logits [T, V]."""
    c, t = config, len(tokens)

    def norm(x, scale):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + c.norm_eps) * scale

    def rotate(x):  # x [T, heads, H]
        half = c.head_dim // 2
        inv = 1.0 / c.rope_theta ** (np.arange(half) / half)
        ang = np.arange(t)[:, None] * inv  # [T, H/2]
        cos = np.cos(np.concatenate([ang, ang], -1))[:, None]
        sin = np.sin(np.concatenate([ang, ang], -1))[:, None]
        rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
        return x * cos + rotated * sin

    h = w["model.embed_tokens.weight"][tokens].astype(np.float64)
    for i in range(c.n_layers):
        p = functools.partial(lambda i, name: w[f"model.layers.{i}.{name}"].astype(np.float64), i)
        x = norm(h, p("input_layernorm.weight"))
        q = rotate((x @ p("self_attn.q_proj.weight").T).reshape(t, c.n_heads, c.head_dim))
        k = rotate((x @ p("self_attn.k_proj.weight").T).reshape(t, c.n_kv_heads, c.head_dim))
        v = (x @ p("self_attn.v_proj.weight").T).reshape(t, c.n_kv_heads, c.head_dim)
        k, v = np.repeat(k, c.group_size, 1), np.repeat(v, c.group_size, 1)
        scores = np.einsum("tnh,snh->nts", q, k) / np.sqrt(c.head_dim)
        scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = np.einsum("nts,snh->tnh", probs, v).reshape(t, -1)
        h = h + attn @ p("self_attn.o_proj.weight").T
        x = norm(h, p("post_attention_layernorm.weight"))
        gate = x @ p("mlp.gate_proj.weight").T
        h = (
            h
            + (gate / (1 + np.exp(-gate)) * (x @ p("mlp.up_proj.weight").T))
            @ p("mlp.down_proj.weight").T
        )
    h = norm(h, w["model.norm.weight"])
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return h @ head.T.astype(np.float64)


def round_trip(w: np.ndarray, qtype) -> np.ndarray:
    """What a reader of a `qtype` tensor gets back (2-D matrices only are quantised)."""
    if w.ndim != 2 or qtype == Q.F32:
        return w
    return gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_gguf_forward_matches_numpy_reference(tmp_path, qtype, tied):
    config = dataclasses.replace(CONFIG, tie_embeddings=tied)
    weights = hf_random_weights(config, seed=1)
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path, config, weights, qtype)

    loaded_config, params, _ = load_gguf(path, jnp.float32)
    assert loaded_config.norm_eps == pytest.approx(config.norm_eps)  # stored as f32
    assert dataclasses.replace(loaded_config, norm_eps=config.norm_eps) == config

    tokens = [3, 17, 42, 5, 88, 1, 64, 30, 9, 11]
    expected = reference_logits(
        config, {k: round_trip(v, qtype) for k, v in weights.items()}, tokens
    )
    engine = Engine(config, params, max_seq_len=64)
    logits = np.asarray(engine.forward([tokens]))[0]
    np.testing.assert_allclose(logits, expected, atol=2e-4, rtol=1e-4)


def test_missing_tensor_is_named(tmp_path):
    """A file with fewer layers than its config claims fails naming the first gap."""
    path = tmp_path / "one_layer.gguf"
    one_layer = dataclasses.replace(CONFIG, n_layers=1)
    write_llama_gguf(path, one_layer, hf_random_weights(one_layer))
    reader = GGUFFile(path)
    with pytest.raises(ValueError, match=r"lacks tensors: blk\.1\."):
        load_gguf_params(reader, dataclasses.replace(CONFIG, n_layers=3), jnp.float32, "llama")


def test_llama31_rope_freqs_are_refused_not_ignored(tmp_path):
    path = tmp_path / "rope_freqs.gguf"
    factors = np.ones(CONFIG.head_dim // 2, np.float32)
    weights = hf_random_weights(CONFIG)
    write_llama_gguf(path, CONFIG, weights, extra_tensors={"rope_freqs.weight": factors})
    with pytest.raises(ValueError, match="rope_freqs tensor"):
        config_from_gguf(GGUFFile(path))


def same_as_gguf_reader(path) -> None:
    """GGUFFile gives gguf.GGUFReader's metadata values and tensors, byte for byte."""
    ours, reference = GGUFFile(path), gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reference.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata == fields
    assert [type(v) for v in ours.metadata.values()] == [type(v) for v in fields.values()]
    for mine, theirs in zip(ours.tensors, reference.tensors, strict=True):
        assert (mine.name, mine.tensor_type) == (theirs.name, theirs.tensor_type)
        assert mine.shape == tuple(int(d) for d in theirs.shape)
        assert mine.data.dtype == theirs.data.dtype and mine.data.shape == theirs.data.shape
        np.testing.assert_array_equal(mine.data, theirs.data)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_1])
def test_the_header_reader_reads_what_gguf_reads(tmp_path, qtype):
    """A SentencePiece vocabulary (strings, f32 scores, int types), plain and block
    tensor formats."""
    path = write_tiny_gguf(tmp_path, TINY_LLAMA, seed=3, qtype=qtype)
    same_as_gguf_reader(path)


def test_the_header_reader_reads_the_default_model_as_gguf_does():
    """SmolLM2's byte-level BPE: 49k tokens, 48k merges, a chat template."""
    same_as_gguf_reader(bundled_model_path())


def test_a_file_that_is_not_gguf_or_is_cut_short_is_refused(tmp_path):
    path = tmp_path / "not.gguf"
    path.write_bytes(b"GGML" + bytes(60))
    with pytest.raises(ValueError, match="not a little-endian GGUF"):
        GGUFFile(path)
    whole = write_tiny_gguf(tmp_path, TINY_LLAMA, seed=3).read_bytes()
    for cut in (20, 200, 2000):  # in the counts, a field, the vocabulary
        path.write_bytes(whole[:cut])
        with pytest.raises(ValueError, match="not a readable GGUF file"):
            GGUFFile(path)
