"""The real default model against HF transformers on the same GGUF (float32).

Fixtures come from tests/reference/make_golden.py. Both sides dequantise the
same Q4_1 weights exactly, so only float summation order differs: logits agree
to 2e-3 (measured about 1.5e-4) and the argmax agrees at every position.
"""

import numpy as np
import pytest

from model.sampling_params import SamplingParams

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
    """32 greedy tokens through prefill → insert → generate, past EOS like the reference."""
    prompt = golden["prompts"][index]
    engine = llm.engine
    prefix = engine.prefill(prompt["ids"], engine.sampling(SamplingParams(temperature=0), seed=0))
    state = engine.insert(prefix, engine.init_state(), 0, remaining=len(prompt["greedy"]))
    tokens, position = [int(prefix.token)], len(prompt["ids"])
    while len(tokens) < len(prompt["greedy"]):
        state, step, *_ = engine.generate(state, position)
        tokens.append(int(step[0]))
        position += 1
    assert tokens == prompt["greedy"]


def test_prompt_tokens_match_reference(llm, golden):
    """Chat template + tokenizer give the reference's prompt ids."""
    for prompt in golden["prompts"]:
        assert llm.encode_chat(prompt["messages"]) == prompt["ids"]
