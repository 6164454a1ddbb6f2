"""The real default model against HF transformers on the same GGUF (float32).

Fixtures come from tests/reference/make_golden.py. Both sides dequantise the
same Q4_1 weights exactly, so only float summation order differs: logits agree
to 2e-3 (measured about 1.5e-4) and the argmax agrees at every position.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.nn.attention import Layout, init_pool
from model.nn.transformer import BLOCKS, Transformer
from model.types import SamplingParams

LOGIT_ATOL = 2e-3


@pytest.mark.parametrize("index", [0, 1, 2])
def test_full_forward_logits_match_reference(llm, golden, golden_logits, index):
    prompt = golden["prompts"][index]
    logits = np.asarray(llm.engine.forward([prompt["ids"]]))[0]  # [T, V]
    subset = logits[:, golden_logits["subset_ids"]]
    top_ids = golden_logits[f"p{index}_top_ids"]
    top = np.take_along_axis(logits, top_ids, axis=-1)

    np.testing.assert_allclose(subset, golden_logits[f"p{index}_subset_logits"], atol=LOGIT_ATOL)
    np.testing.assert_allclose(top, golden_logits[f"p{index}_top_logits"], atol=LOGIT_ATOL)
    assert (logits.argmax(-1) == top_ids[:, 0]).all(), "top-1 differs at some position"


@pytest.mark.parametrize("index", [0, 1, 2])
def test_greedy_tokens_match_reference(llm, golden, index):
    """32 greedy tokens through the serving path (admission, prefill and decode steps
    over the KV pool), past EOS like the reference."""
    prompt = golden["prompts"][index]
    params = SamplingParams(temperature=0, max_tokens=len(prompt["greedy"]), ignore_eos=True)
    assert list(llm.generate(prompt["ids"], params).token_ids) == prompt["greedy"]


def test_chunked_prefill_gives_the_logits_of_one_pass(llm, golden):
    """The longest golden prompt in chunks of 7, 13, 16 and the rest, through the pool
    (each chunk reading the earlier ones from it), against one plain causal pass."""
    ids = golden["prompts"][2]["ids"]
    engine, bs, blocks = llm.engine, 4, 32
    config = engine.config
    pool = init_pool(config.n_layers, blocks, bs, config.n_kv_heads, config.head_dim, jnp.float32)
    table = np.random.default_rng(3).permutation(blocks).astype(np.int32)
    model = engine.scanned_model  # the layers as the steps run them
    step = jax.jit(
        lambda params, pool, tokens, layout: model.apply({"params": params}, tokens, layout, pool)
    )
    head = jax.jit(
        lambda params, hidden: model.apply({"params": params}, hidden, method=Transformer.logits)
    )
    logits = []
    for start, end in ((0, 7), (7, 20), (20, 36), (36, len(ids))):
        positions = np.arange(start, end, dtype=np.int32)
        layout = Layout(
            positions=positions,
            context=np.zeros((0,), np.int32),
            block_tables=np.zeros((0, blocks), np.int32),
            segments=np.zeros(end - start, np.int32),
            prior=np.int32(start),
            prior_blocks=table,
            write=(table[positions // bs] * bs + positions % bs).astype(np.int32),
        )
        hidden, pool = step(engine.stacked, pool, np.asarray(ids[start:end], np.int32), layout)
        logits.append(np.asarray(head(engine.stacked, hidden)))
    full = np.asarray(engine.forward([ids]))[0]
    np.testing.assert_allclose(np.concatenate(logits), full, atol=LOGIT_ATOL)


def test_prompt_tokens_match_reference(llm, golden):
    """Chat template + tokenizer give the reference's prompt ids."""
    for prompt in golden["prompts"]:
        assert llm.encode_chat(prompt["messages"]) == prompt["ids"]


def test_unrolled_decode_steps_give_the_reference_greedy_tokens(llm, golden):
    """Once the unrolled decode steps are in (JAXCHAT_UNROLLED_DECODE; loaded from the
    tests' compile cache or compiled), a lone stream decodes through them: on one CPU
    device, with the GGUF's Q4_1 and Q8_0 blocks read by the quantized kernel."""
    if llm.engine.mesh.size == 1 and jax.default_backend() == "cpu":
        assert llm.engine.kernel is not None
        blocks = llm.engine.params[BLOCKS]
        assert {"lm_head", "layers_0"} <= set(blocks)
        assert set(llm.engine.params["layers_0"]) == {"attn_norm", "mlp_norm"}  # f32 left
    llm.engine.variants.upgrade()
    assert llm.engine.variants.upgrades
    assert all(llm.engine.variants.ready(*variant) for variant in llm.engine.variants.upgrades)
    prompt = golden["prompts"][1]
    params = SamplingParams(temperature=0, max_tokens=len(prompt["greedy"]), ignore_eos=True)
    assert list(llm.generate(prompt["ids"], params).token_ids) == prompt["greedy"]
