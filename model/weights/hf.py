"""Load a Hugging Face model directory (config.json + safetensors) into the parameter tree.

Like the GGUF loader, a declarative table maps checkpoint tensor names to
parameter paths and a pure transform of their [out, in] arrays; both loaders
produce the same tree. HF weights are already in the rotate-half RoPE layout,
so Q/K need no un-permutation. Weights come from `model.safetensors` or the
shards listed in `model.safetensors.index.json`.
"""

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from model.nn.config import ModelConfig
from model.nn.params import Params, unflatten_dict
from model.weights.gguf import Table

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")  # SmolLM2 is model_type "llama"
INDEX_FILE = "model.safetensors.index.json"


def _same(w: np.ndarray) -> np.ndarray:
    return w


def _concat_rows(*ws: np.ndarray) -> np.ndarray:
    """q/k/v [N·H|K·H, D] → qkv [(N+2K)·H, D]; gate/up [F, D] → [2F, D] (also 1-D biases)."""
    return np.concatenate(ws, axis=0)


def read_config_json(path: Path) -> dict[str, Any]:
    """The parsed config.json of the model directory `path`."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory: no config.json")
    return json.loads(file.read_text(encoding="utf-8"))


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    """Build a ModelConfig from a parsed config.json (Llama-2/3, Mistral, Qwen2, SmolLM2).

    Raises ValueError for an unsupported model_type or a feature the transformer
    lacks (RoPE scaling, o_proj / MLP biases).
    """
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported model_type {model_type!r} in config.json "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    scaling = cfg.get("rope_scaling") or {}
    scaling_type = scaling.get("rope_type", scaling.get("type", "default"))
    rope_scaling = None
    if scaling_type == "llama3":
        rope_scaling = (
            float(scaling["factor"]),
            float(scaling["low_freq_factor"]),
            float(scaling["high_freq_factor"]),
            int(scaling["original_max_position_embeddings"]),
        )
    elif scaling_type != "default":
        # Other scalings change the frequencies differently; ignoring one would be silently wrong.
        raise ValueError(f"rope_scaling type {scaling_type!r} in config.json is not supported yet")
    if model_type != "qwen2" and cfg.get("attention_bias"):
        raise ValueError("attention_bias true in config.json: o_proj biases are not supported")
    if cfg.get("mlp_bias"):
        raise ValueError("mlp_bias true in config.json: MLP biases are not supported")
    dim, n_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    max_position = int(cfg.get("max_position_embeddings", 2048))
    window = cfg.get("sliding_window")
    if window and cfg.get("use_sliding_window", model_type == "mistral"):
        # Full attention equals sliding-window attention up to the window's length.
        max_position = min(max_position, int(window))
    return ModelConfig(
        vocab_size=int(cfg["vocab_size"]),
        dim=dim,
        n_layers=int(cfg["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        head_dim=int(cfg.get("head_dim") or dim // n_heads),
        ffn_dim=int(cfg["intermediate_size"]),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
        max_position=max_position,
        rope_scaling=rope_scaling,
    )


def tensor_table(config: ModelConfig) -> Table:
    """Parameter path → (HF tensor names, transform of their [out, in] arrays)."""
    table: Table = {
        ("embed", "embedding"): (("model.embed_tokens.weight",), _same),
        ("final_norm", "scale"): (("model.norm.weight",), _same),
    }
    if not config.tie_embeddings:
        table[("lm_head",)] = (("lm_head.weight",), _same)
    for i in range(config.n_layers):
        layer, p = f"layers_{i}", f"model.layers.{i}"
        table |= {
            (layer, "attn_norm", "scale"): ((f"{p}.input_layernorm.weight",), _same),
            (layer, "attn", "qkv"): (
                tuple(f"{p}.self_attn.{x}_proj.weight" for x in "qkv"),
                _concat_rows,
            ),
            (layer, "attn", "o"): ((f"{p}.self_attn.o_proj.weight",), _same),
            (layer, "mlp_norm", "scale"): ((f"{p}.post_attention_layernorm.weight",), _same),
            (layer, "mlp", "gate_up"): (
                (f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight"),
                _concat_rows,
            ),
            (layer, "mlp", "down"): ((f"{p}.mlp.down_proj.weight",), _same),
        }
        if config.qkv_bias:
            table[(layer, "attn", "qkv_bias")] = (
                tuple(f"{p}.self_attn.{x}_proj.bias" for x in "qkv"),
                _concat_rows,
            )
    return table


def weight_files(path: Path) -> dict[str, Path]:
    """Tensor name → safetensors file, from the shard index or the single file."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{path} has no model.safetensors or {INDEX_FILE}")
    with safe_open(single, framework="np") as f:
        return dict.fromkeys(f.keys(), single)


def load_hf_params(path: Path, config: ModelConfig, dtype: jnp.dtype) -> Params:
    """Read the safetensors of directory `path` into the parameter tree as `dtype`."""
    files = weight_files(path)
    table = tensor_table(config)
    missing = sorted({n for names, _ in table.values() for n in names} - set(files))
    if missing:
        raise ValueError(f"{path} lacks tensors: {', '.join(missing[:5])}")
    with ExitStack() as stack:
        handles = {
            file: stack.enter_context(safe_open(file, framework="np"))
            for file in set(files.values())
        }

        def read(name: str) -> np.ndarray:
            # bf16/f16 checkpoints are widened so transforms and dtype casts are exact.
            return handles[files[name]].get_tensor(name).astype(np.float32, copy=False)

        flat = {
            param_path: jnp.asarray(transform(*map(read, names)), dtype=dtype)
            for param_path, (names, transform) in table.items()
        }
    return unflatten_dict(flat)


def load_hf(path: Path, dtype: jnp.dtype) -> tuple[ModelConfig, Params]:
    """(config, params) for the Hugging Face model directory `path`."""
    config = config_from_hf(read_config_json(path))
    return config, load_hf_params(path, config, dtype)
