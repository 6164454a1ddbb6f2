"""Model architecture: a frozen description of a Llama-family transformer."""

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of a Llama-family decoder.

    Covers Llama-2/3, Mistral, Qwen2 and SmolLM2 by configuration: grouped-query
    attention (n_kv_heads <= n_heads), the RoPE base, RMSNorm epsilon, a tied or
    untied output head, and optional q/k/v biases (Qwen2).
    """

    vocab_size: int
    dim: int  # D
    n_layers: int
    n_heads: int  # N
    n_kv_heads: int  # K
    head_dim: int  # H
    ffn_dim: int  # F
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    max_position: int = 2048  # the context length the model was trained for
    # Llama-3.1 RoPE scaling: (factor, low_freq_factor, high_freq_factor,
    # original_max_position); None for plain RoPE.
    rope_scaling: tuple[float, float, float, int] | None = None

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )

    @property
    def group_size(self) -> int:
        """Query heads per KV head (G)."""
        return self.n_heads // self.n_kv_heads

    def rope_frequencies(self) -> np.ndarray:
        """RoPE's inverse frequencies [H/2] (f32): theta^(-2i/H), Llama-3.1-scaled if set.

        Llama 3.1 keeps wavelengths shorter than original_max_position /
        high_freq_factor, divides those longer than original_max_position /
        low_freq_factor by `factor`, and blends linearly (in 1/wavelength) between.
        """
        half = self.head_dim // 2
        inv_freq = 1.0 / self.rope_theta ** (np.arange(half, dtype=np.float64) / half)
        if self.rope_scaling is None:
            return inv_freq.astype(np.float32)
        factor, low, high, original = self.rope_scaling
        wavelength = 2 * math.pi / inv_freq
        smooth = np.clip((original / wavelength - low) / (high - low), 0.0, 1.0)
        scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        return scaled.astype(np.float32)
