"""The real default model against HF transformers on the same GGUF (float32).

Fixtures come from tests/reference/make_golden.py. Both sides dequantise the
same Q4_1 weights exactly, so only float summation order differs: logits agree
to 2e-3 (measured about 1.5e-4) and the argmax agrees at every position.
"""

import jax
import numpy as np
import pytest

from benchmarks.quality import prompt_logits
from model.nn.transformer import BLOCKS, LAYER_BLOCKS
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
    """The longest golden prompt in chunks of 9, 11, 16 and the rest, and in one chunk,
    both as the serving steps run them (through the pool, each chunk reading the earlier
    ones from it through a shuffled block table), against one plain causal pass. (Each
    chunk has more than 8 tokens, so every product takes the kernel's f32 path; up to 8
    rows it rounds x to 16 bits, and tests/test_quality.py holds that path to the
    reference.)"""
    ids = golden["prompts"][2]["ids"]
    full = np.asarray(llm.engine.forward([ids]))[0]
    for cuts in ([9, 20, 36], []):
        np.testing.assert_allclose(prompt_logits(llm, ids, cuts), full, atol=LOGIT_ATOL)


def test_prompt_tokens_match_reference(llm, golden):
    """Chat template + tokenizer give the reference's prompt ids."""
    for prompt in golden["prompts"]:
        assert llm.encode_chat(prompt["messages"]) == prompt["ids"]


def test_decode_after_the_upgrades_gives_the_reference_greedy_tokens(llm, golden):
    """Once the upgrades are in (loaded from the tests' compile cache or compiled: the
    small decode shapes, and with JAXCHAT_UNROLLED_DECODE unrolled steps), a lone stream
    decodes the reference's tokens. On one CPU device every step reads the GGUF's Q4_1
    and Q8_0 blocks through the quantized kernel, and no f32 copy of them is kept."""
    if llm.engine.mesh.size == 1 and jax.default_backend() == "cpu":
        assert llm.engine.kernel is not None
        blocks = llm.engine.stacked[BLOCKS]
        assert set(blocks) == {"lm_head", LAYER_BLOCKS}
        assert set(llm.engine.stacked["layers"]) == {"attn_norm", "mlp_norm"}  # f32 left
        if llm.engine.params is not None:  # unrolled steps read the same blocks
            assert llm.engine.params[BLOCKS] is blocks
            assert set(llm.engine.params["layers_0"]) == {"attn_norm", "mlp_norm"}
    llm.engine.variants.upgrade()
    assert llm.engine.variants.upgrades
    assert all(llm.engine.variants.ready(*variant) for variant in llm.engine.variants.upgrades)
    prompt = golden["prompts"][1]
    params = SamplingParams(temperature=0, max_tokens=len(prompt["greedy"]), ignore_eos=True)
    assert list(llm.generate(prompt["ids"], params).token_ids) == prompt["greedy"]
