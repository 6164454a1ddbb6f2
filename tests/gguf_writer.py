"""Write small Llama-family GGUF files for tests, laid out as llama.cpp's converter does.

Weights are given in Hugging Face layout ([out, in] matrices, rotate-half
RoPE); Q and K rows are permuted into llama.cpp's interleaved layout on the
way out, exactly as `convert_hf_to_gguf.py` does.
"""

from pathlib import Path

import gguf
import numpy as np

from model.nn.config import ModelConfig


def hf_random_weights(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random HF-named weights for a config (std 0.05; norms near 1)."""
    rng = np.random.default_rng(seed)
    c = config

    def mat(rows: int, cols: int) -> np.ndarray:
        return rng.normal(0, 0.05, (rows, cols)).astype(np.float32)

    w = {"model.embed_tokens.weight": mat(c.vocab_size, c.dim)}
    w["model.norm.weight"] = rng.uniform(0.5, 1.5, c.dim).astype(np.float32)
    if not c.tie_embeddings:
        w["lm_head.weight"] = mat(c.vocab_size, c.dim)
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = mat(c.n_heads * c.head_dim, c.dim)
        w[p + "self_attn.k_proj.weight"] = mat(c.n_kv_heads * c.head_dim, c.dim)
        w[p + "self_attn.v_proj.weight"] = mat(c.n_kv_heads * c.head_dim, c.dim)
        w[p + "self_attn.o_proj.weight"] = mat(c.dim, c.n_heads * c.head_dim)
        w[p + "mlp.gate_proj.weight"] = mat(c.ffn_dim, c.dim)
        w[p + "mlp.up_proj.weight"] = mat(c.ffn_dim, c.dim)
        w[p + "mlp.down_proj.weight"] = mat(c.dim, c.ffn_dim)
        w[p + "input_layernorm.weight"] = rng.uniform(0.5, 1.5, c.dim).astype(np.float32)
        w[p + "post_attention_layernorm.weight"] = rng.uniform(0.5, 1.5, c.dim).astype(np.float32)
    return w


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


GGUF_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def gguf_tensors(config: ModelConfig, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF names and layout → GGUF names, with Q/K permuted."""
    out = {"token_embd.weight": weights["model.embed_tokens.weight"]}
    out["output_norm.weight"] = weights["model.norm.weight"]
    if "lm_head.weight" in weights:
        out["output.weight"] = weights["lm_head.weight"]
    for i in range(config.n_layers):
        for hf, gg in GGUF_NAMES.items():
            w = weights[f"model.layers.{i}.{hf}"]
            if hf.startswith("self_attn.q"):
                w = llama_cpp_permute(w, config.n_heads)
            elif hf.startswith("self_attn.k"):
                w = llama_cpp_permute(w, config.n_kv_heads)
            out[f"blk.{i}.{gg}"] = w
    return out


def write_llama_gguf(
    path: Path,
    config: ModelConfig,
    weights: dict[str, np.ndarray],
    qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    tokenizer_kv: dict | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
) -> None:
    """Write a llama-architecture GGUF; 2-D matrices stored as `qtype`, norms as F32.

    extra_tensors are written as they are (e.g. llama.cpp's `rope_freqs.weight`)."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(config.n_layers)
    writer.add_context_length(config.max_position)
    writer.add_embedding_length(config.dim)
    writer.add_feed_forward_length(config.ffn_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    for key, value in (tokenizer_kv or {}).items():
        getattr(writer, key)(value)
    for name, w in {**gguf_tensors(config, weights), **(extra_tensors or {})}.items():
        if w.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
