"""Hugging Face directories: the same tiny model as GGUF and as safetensors loads to
the same parameters, logits, greedy tokens and text; tokenizers; configs; errors."""

import dataclasses
import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from model import SamplingParams
from model.engine.engine import Engine
from model.llm import LLM
from model.nn.config import ModelConfig
from model.text.chat_template import ChatTemplate
from model.text.tokenizer import Tokenizer
from model.weights.gguf import load_gguf
from model.weights.hf import config_from_hf, load_hf
from tests.gguf_text import gguf_tokenizer
from tests.gguf_writer import hf_random_weights
from tests.test_gguf_loader import reference_logits
from tests.tiny_models import (
    TINY_LLAMA,
    corpus,
    hf_config_json,
    train_sentencepiece,
    write_hf_dir,
    write_tiny_pair,
)

TOKENS = [1, 17, 42, 5, 88, 3, 64, 30, 9, 211, 300]


@pytest.fixture(scope="module")
def proto():
    return train_sentencepiece()


def flat(params) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_hf_and_gguf_give_identical_params_and_logits(tmp_path, proto, tied):
    config = dataclasses.replace(TINY_LLAMA, tie_embeddings=tied)
    weights = hf_random_weights(config, seed=2)
    gguf_path, hf_path = write_tiny_pair(tmp_path, config, weights, proto)
    assert len(list(hf_path.glob("*.safetensors"))) == 2

    gguf_config, gguf_params, _ = load_gguf(gguf_path, jnp.float32)
    hf_config, hf_params = load_hf(hf_path, jnp.float32)
    assert hf_config == config
    assert dataclasses.replace(gguf_config, norm_eps=config.norm_eps) == hf_config
    gguf_flat, hf_flat = flat(gguf_params), flat(hf_params)
    assert gguf_flat.keys() == hf_flat.keys()
    assert ("['lm_head']" in hf_flat) is not tied
    for key, value in hf_flat.items():
        assert value.dtype == np.float32 and np.array_equal(value, gguf_flat[key]), key

    hf_logits = np.asarray(Engine(hf_config, hf_params, max_seq_len=64).forward([TOKENS]))[0]
    gguf_logits = np.asarray(Engine(config, gguf_params, max_seq_len=64).forward([TOKENS]))[0]
    np.testing.assert_array_equal(hf_logits, gguf_logits)
    # And both are HF Llama's forward pass (independent NumPy reference).
    np.testing.assert_allclose(
        hf_logits, reference_logits(config, weights, TOKENS), atol=2e-4, rtol=1e-4
    )


def test_single_file_and_bf16_weights(tmp_path):
    weights = hf_random_weights(TINY_LLAMA, seed=3)
    bf16 = {k: v.astype(jnp.bfloat16) for k, v in weights.items()}
    path = write_hf_dir(tmp_path, TINY_LLAMA, bf16, shards=1)
    _, params = load_hf(path, jnp.float32)
    expected = np.concatenate([bf16[f"model.layers.1.mlp.{x}_proj.weight"] for x in ("gate", "up")])
    np.testing.assert_array_equal(params["layers_1"]["mlp"]["gate_up"], expected.astype(np.float32))


def test_llm_greedy_tokens_and_text_match_gguf(tmp_path, proto):
    weights = hf_random_weights(TINY_LLAMA, seed=4)
    gguf_path, hf_path = write_tiny_pair(tmp_path, TINY_LLAMA, weights, proto)
    messages = [{"role": "user", "content": "the quick brown fox"}]
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    results = []
    for path in (gguf_path, hf_path):
        llm = LLM(str(path), max_seq_len=64, batch=2, dtype="float32")
        prompt = llm.encode_chat(messages)
        results.append((prompt, llm.generate(prompt, greedy), llm.tokenizer.stop_ids))
        llm.scheduler.stop()
    (gguf_prompt, gguf_out, gguf_stops), (hf_prompt, hf_out, hf_stops) = results
    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    # The template writes "<s>" and add_bos_token adds another, in both formats alike.
    assert hf_prompt == gguf_prompt == [1, 1, *sp.encode("[INST] the quick brown fox [/INST]")]
    assert hf_stops == gguf_stops == frozenset({2})
    assert len(hf_out.token_ids) == 16
    assert hf_out.token_ids == gguf_out.token_ids
    assert hf_out.text == gguf_out.text
    assert hf_out.text == sp.decode([i for i in hf_out.token_ids if i > 2])


def test_tokenizer_model_matches_sentencepiece_and_gguf(tmp_path, proto):
    gguf_path, hf_path = write_tiny_pair(tmp_path, TINY_LLAMA, hf_random_weights(TINY_LLAMA), proto)
    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    hf_tok, gguf_tok = Tokenizer.from_hf_dir(hf_path), gguf_tokenizer(gguf_path)
    assert hf_tok.vocab_size == gguf_tok.vocab_size == 320
    assert (hf_tok.bos_id, hf_tok.eos_id, hf_tok.bos_token, hf_tok.eos_token) == (
        1,
        2,
        "<s>",
        "</s>",
    )
    assert hf_tok.special_ids == gguf_tok.special_ids == frozenset({0, 1, 2})
    for text in ["Hello world 42", "  two  spaces\n", "[INST] fox [/INST]", "😀 ünï", ""]:
        ids = hf_tok.encode(text, add_bos=False)
        assert ids == sp.encode(text) == gguf_tok.encode(text, add_bos=False), text
        assert hf_tok.decode(ids) == sp.decode(ids) == text
    assert hf_tok.encode("hi</s>") == [1, *sp.encode("hi"), 2]  # add_bos_token; eos in text


def test_added_tokens_past_the_sentencepiece_model(tmp_path, proto):
    config = {
        "bos_token": "<s>",
        "eos_token": "<|im_end|>",
        "added_tokens_decoder": {
            "320": {"content": "<|im_start|>", "special": True},
            "321": {"content": "<|im_end|>", "special": True},
        },
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "tokenizer.model").write_bytes(proto.SerializeToString())
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 328}))
    tok = Tokenizer.from_hf_dir(tmp_path)
    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    assert tok.vocab_size == 328  # padded to the model's embedding rows
    assert tok.eos_id == 321 and tok.stop_ids == frozenset({321})
    assert tok.encode("<|im_start|>fox<|im_end|>", add_bos=False) == [320, *sp.encode("fox"), 321]
    assert tok.decode([320, 321, 325]) == "<|im_start|><|im_end|>"
    assert tok.special_ids >= {320, 321}


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A byte-level BPE tokenizer.json trained here, ChatML specials, SmolLM2-style config."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(corpus(), trainer)
    path = tmp_path_factory.mktemp("bpe")
    hf.save(str(path / "tokenizer.json"))
    chatml = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
        "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    tok_config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": chatml}
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    return path


def test_tokenizer_json_matches_tokenizers_library(bpe_dir):
    reference = HFTokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    tok = Tokenizer.from_hf_dir(bpe_dir)
    assert tok.vocab_size == reference.get_vocab_size() == 400
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, False)
    assert tok.special_ids == frozenset({0, 1, 2})
    assert tok.stop_ids == frozenset({0, 2})
    texts = [
        "Hello world 123",
        " leading",
        "a\n\nb\tc",
        "😀 ünï 中文",
        "<|im_start|>user\nhi<|im_end|>",
    ]
    for text in texts:
        ids = tok.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=False) == text
        assert tok.decode(ids, skip_special_tokens=True) == reference.decode(ids)
    assert tok.encode("x", add_bos=True)[0] == 1


def test_chat_template_from_tokenizer_config(bpe_dir):
    tok = Tokenizer.from_hf_dir(bpe_dir)
    template = ChatTemplate.from_hf_dir(bpe_dir, tok)
    text = template.render([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_named_templates_and_bos_eos(tmp_path):
    config = {
        "chat_template": [
            {"name": "default", "template": "{{ bos_token }}{{ messages[0]['content'] }}"},
            {"name": "tool_use", "template": "T{{ tools | length }}{{ eos_token }}"},
        ]
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = SimpleNamespace(bos_token="<s>", eos_token="</s>")
    template = ChatTemplate.from_hf_dir(tmp_path, tokenizer)
    assert template.render([{"role": "user", "content": "x"}]) == "<s>x"
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert template.render([{"role": "user", "content": "x"}], tools=tools) == "T1</s>"


def test_qwen2_biases_load(tmp_path):
    config = dataclasses.replace(TINY_LLAMA, qkv_bias=True, tie_embeddings=True)
    weights = hf_random_weights(config, seed=5)
    rng = np.random.default_rng(6)
    for i in range(config.n_layers):
        for x, rows in (("q", 64), ("k", 32), ("v", 32)):
            weights[f"model.layers.{i}.self_attn.{x}_proj.bias"] = rng.normal(size=rows).astype(
                np.float32
            )
    path = write_hf_dir(tmp_path, config, weights, model_type="qwen2", use_sliding_window=False)
    loaded, params = load_hf(path, jnp.float32)
    assert loaded == config
    bias = params["layers_1"]["attn"]["qkv_bias"]
    expected = [weights[f"model.layers.1.self_attn.{x}_proj.bias"] for x in "qkv"]
    np.testing.assert_array_equal(bias, np.concatenate(expected))
    assert "lm_head" not in params


# Real configs (values copied from the models' config.json files).
SMOLLM2_135M = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "max_position_embeddings": 8192,
    "num_attention_heads": 9,
    "num_hidden_layers": 30,
    "num_key_value_heads": 3,
    "rms_norm_eps": 1e-05,
    "rope_theta": 100000,
    "rope_scaling": None,
    "tie_word_embeddings": True,
    "vocab_size": 49152,
}
MISTRAL_7B_V01 = {
    "model_type": "mistral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "vocab_size": 32000,
}
LLAMA_31_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "vocab_size": 128256,
}


def test_real_configs_parse():
    assert config_from_hf(SMOLLM2_135M) == ModelConfig(
        vocab_size=49152,
        dim=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        head_dim=64,
        ffn_dim=1536,
        rope_theta=100000.0,
        norm_eps=1e-5,
        tie_embeddings=True,
        max_position=8192,
    )
    mistral = config_from_hf(MISTRAL_7B_V01)
    assert (mistral.head_dim, mistral.group_size, mistral.max_position) == (128, 4, 4096)
    llama3 = config_from_hf({**LLAMA_31_8B, "rope_scaling": None})
    assert (llama3.rope_theta, llama3.max_position, llama3.tie_embeddings) == (
        500000.0,
        131072,
        False,
    )


def test_llama31_rope_scaling_keeps_high_divides_low_and_blends_the_middle():
    config = config_from_hf(LLAMA_31_8B)
    assert config.rope_scaling == (8.0, 1.0, 4.0, 8192)
    plain = 1.0 / 500000.0 ** (np.arange(64) / 64)  # head_dim 128
    scaled = config.rope_frequencies().astype(np.float64)
    wavelength = 2 * np.pi / plain
    short, long = wavelength < 8192 / 4.0, wavelength > 8192 / 1.0
    assert short.any() and long.any() and (~short & ~long).any()
    np.testing.assert_allclose(scaled[short], plain[short], rtol=1e-6)
    np.testing.assert_allclose(scaled[long], plain[long] / 8.0, rtol=1e-6)
    middle = ~short & ~long
    assert np.all(scaled[middle] < plain[middle]) and np.all(scaled[middle] > plain[middle] / 8)
    # In the middle band, 1/wavelength blends linearly: at the band's edges it meets both.
    smooth = (8192 / wavelength[middle] - 1.0) / (4.0 - 1.0)
    np.testing.assert_allclose(
        scaled[middle], (1 - smooth) * plain[middle] / 8 + smooth * plain[middle], rtol=1e-6
    )


def test_other_rope_scalings_are_refused_not_ignored():
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        config_from_hf({**LLAMA_31_8B, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_unsupported_model_type_is_named():
    with pytest.raises(ValueError, match="model_type 'gemma2'"):
        config_from_hf({**SMOLLM2_135M, "model_type": "gemma2"})


def test_missing_files_name_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*config.json"):
        load_hf(tmp_path, jnp.float32)
    (tmp_path / "config.json").write_text(json.dumps(hf_config_json(TINY_LLAMA)))
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*model.safetensors"):
        load_hf(tmp_path, jnp.float32)
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor tokenizer.model"):
        Tokenizer.from_hf_dir(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    weights = hf_random_weights(TINY_LLAMA)
    del weights["model.layers.1.mlp.up_proj.weight"]
    path = write_hf_dir(tmp_path, TINY_LLAMA, weights)
    with pytest.raises(ValueError, match=r"lacks tensors: model\.layers\.1\.mlp\.up_proj"):
        load_hf(path, jnp.float32)
