"""The model's whole context by default: a 7,000-token prompt is served through the paged
engine (fourteen 512-token chunks over a pool of blocks), and its greedy continuation is
the one a dense forward pass over the same tokens gives (tiny Llama with 8,192 positions,
random weights, so the reference is independent of the engine's code path)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from model import LLM, SamplingParams
from model.weights.gguf import load_gguf
from tests.tiny_models import TINY_LLAMA, dense_logits, write_tiny_gguf

CONFIG = dataclasses.replace(TINY_LLAMA, max_position=8192)
PROMPT_TOKENS = 7000
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("long")
    return write_tiny_gguf(root, CONFIG, seed=5)


def dense_argmax(path, tokens: list[int]) -> list[int]:
    """The argmax after each of the last NEW_TOKENS + 1 positions of one full causal
    forward pass over `tokens`, no pool; each with a clear margin over the runner-up."""
    _, params, _ = load_gguf(path, jnp.float32)
    logits = dense_logits(CONFIG)(params, jnp.asarray([tokens], jnp.int32))
    last = np.asarray(logits[0, -(NEW_TOKENS + 1) :])
    top2 = np.sort(last, axis=-1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0] > 1e-4).all(), "a near tie: the reference cannot decide"
    return [int(i) for i in last.argmax(-1)]


def test_a_7000_token_prompt_is_served_at_default_settings(gguf_path):
    llm = LLM(str(gguf_path), batch=2, dtype="float32")  # no max_seq_len: the model's
    try:
        assert llm.max_seq_len == 8192
        rng = np.random.default_rng(0)
        prompt = [int(t) for t in rng.integers(3, CONFIG.vocab_size, PROMPT_TOKENS)]
        greedy = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
        out = list(llm.generate(prompt, greedy).token_ids)
        # Greedy: each generated token is the dense argmax after everything before it.
        assert out == dense_argmax(gguf_path, prompt + out)[:NEW_TOKENS]
    finally:
        llm.scheduler.stop()
