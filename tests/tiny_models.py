"""Tiny Llama-family models for tests: random weights, a SentencePiece tokenizer
trained on generated text, written as GGUF or as a Hugging Face directory."""

import io
import json
from functools import cache, partial
from pathlib import Path

import jax
import numpy as np
import sentencepiece as spm
from safetensors.numpy import save_file
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from model.nn.config import ModelConfig
from model.nn.network import forward_logits
from model.nn.transformer import Transformer
from tests.gguf_writer import hf_random_weights, write_llama_gguf

TINY_LLAMA = ModelConfig(
    vocab_size=320,
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    ffn_dim=128,
    rope_theta=10000.0,
    norm_eps=1e-5,
    tie_embeddings=False,
    max_position=256,
)

# Llama-2's chat format, reduced.
LLAMA2_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ bos_token }}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}"
)

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "hello",
    "world",
    "model",
    "token",
    "piece",
    "text",
    "small",
    "test",
    "number",
    "one",
    "two",
    "three",
    "four",
    "five",
    "red",
    "green",
    "blue",
    "sea",
    "shell",
    "home",
]


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Generated sentences of common words and digits (deterministic)."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(4, 12)))
        lines.append(" ".join(words).capitalize() + f" {rng.integers(0, 1000)}.")
    return lines


def train_sentencepiece(vocab_size: int = TINY_LLAMA.vocab_size) -> sp_pb2.ModelProto:
    """A Llama-style SentencePiece BPE model (byte fallback, <unk> <s> </s> = 0 1 2)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        user_defined_symbols=["[INST]", "[/INST]"],
        minloglevel=2,
    )
    return sp_pb2.ModelProto.FromString(model.getvalue())


def spm_gguf_kv(proto: sp_pb2.ModelProto, chat_template: str) -> dict:
    """GGUFWriter calls (method → value) for a SentencePiece tokenizer, as llama.cpp writes."""
    return {
        "add_tokenizer_model": "llama",
        "add_token_list": [p.piece for p in proto.pieces],
        "add_token_scores": [p.score for p in proto.pieces],
        "add_token_types": [int(p.type) for p in proto.pieces],
        "add_unk_token_id": 0,
        "add_bos_token_id": 1,
        "add_eos_token_id": 2,
        "add_add_bos_token": True,
        "add_add_space_prefix": proto.normalizer_spec.add_dummy_prefix,
        "add_chat_template": chat_template,
    }


def hf_config_json(config: ModelConfig, model_type: str = "llama", **extra) -> dict:
    """The config.json transformers would write for `config`."""
    return {
        "architectures": [{"qwen2": "Qwen2ForCausalLM"}.get(model_type, "LlamaForCausalLM")],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.ffn_dim,
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "max_position_embeddings": config.max_position,
        "torch_dtype": "float32",
        **extra,
    }


def write_safetensors(path: Path, weights: dict[str, np.ndarray], shards: int) -> None:
    """`model.safetensors`, or `shards` files plus model.safetensors.index.json."""
    if shards == 1:
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
        return
    names = sorted(weights)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: weights[n] for n in names[s::shards]}
        save_file(part, path / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    index = {"metadata": {"total_size": sum(w.nbytes for w in weights.values())}}
    (path / "model.safetensors.index.json").write_text(
        json.dumps(index | {"weight_map": weight_map})
    )


def write_hf_dir(
    path: Path,
    config: ModelConfig,
    weights: dict[str, np.ndarray],
    *,
    model_type: str = "llama",
    shards: int = 2,
    proto: sp_pb2.ModelProto | None = None,
    tokenizer_config: dict | None = None,
    **config_extra,
) -> Path:
    """A Hugging Face model directory: config.json, safetensors, and optionally a
    tokenizer.model from `proto` and a tokenizer_config.json."""
    path.mkdir(parents=True, exist_ok=True)
    hf_config = hf_config_json(config, model_type, **config_extra)
    (path / "config.json").write_text(json.dumps(hf_config))
    write_safetensors(path, weights, shards)
    if proto is not None:
        (path / "tokenizer.model").write_bytes(proto.SerializeToString())
    if tokenizer_config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return path


def llama2_tokenizer_config(chat_template: str = LLAMA2_TEMPLATE) -> dict:
    """tokenizer_config.json as Llama-2's, with `chat_template`."""
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": {"content": "<s>", "special": True},
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": chat_template,
        "tokenizer_class": "LlamaTokenizer",
    }


def write_tiny_gguf(path: Path, config: ModelConfig, seed: int, qtype=None) -> Path:
    """`path`/tiny.gguf: random weights (seed) for `config` and a trained tokenizer; the
    matrices as `qtype` (a GGMLQuantizationType; default F32)."""
    gguf_path = path / "tiny.gguf"
    kv = spm_gguf_kv(train_sentencepiece(), LLAMA2_TEMPLATE)
    weights = hf_random_weights(config, seed)
    extra = {"qtype": qtype} if qtype is not None else {}
    write_llama_gguf(gguf_path, config, weights, tokenizer_kv=kv, **extra)
    return gguf_path


def write_tiny_pair(
    path: Path, config: ModelConfig, weights: dict[str, np.ndarray], proto: sp_pb2.ModelProto
) -> tuple[Path, Path]:
    """The same model and tokenizer as a GGUF file and as a sharded HF directory."""
    gguf_path = path / "tiny.gguf"
    write_llama_gguf(gguf_path, config, weights, tokenizer_kv=spm_gguf_kv(proto, LLAMA2_TEMPLATE))
    hf_path = write_hf_dir(
        path / "hf", config, weights, proto=proto, tokenizer_config=llama2_tokenizer_config()
    )
    return gguf_path, hf_path


@cache
def dense_logits(config: ModelConfig):
    """The tests' reference pass over `config`: (params, tokens [B, T]) → logits [B, T, V],
    one causal pass with no pool, jitted (eager, each of its ~150 ops would compile an
    executable of its own: 12 s a call on a 2-core CPU)."""
    return jax.jit(partial(forward_logits, Transformer(config)))
