"""The real default model against HF transformers on the same GGUF (float32).

Fixtures come from tests/reference/make_golden.py. Both sides dequantise the
same Q4_1 weights exactly. Where the products take f32, only float summation
order differs: logits agree to 2e-3 (measured about 1.5e-4). On a CPU with
AVX-512 VNNI the kernel rounds every token's activations to 16 bits per block
of 32 (as it rounds decode rows everywhere): logits agree to 5e-2 (measured
1.0-3.1e-2; a KL of under 1e-6, tests/test_quality.py). The argmax agrees at
every position either way.
"""

import jax
import numpy as np
import pytest

from benchmarks.quality import prompt_logits
from model.nn.params import BLOCKS, LAYER_BLOCKS
from model.types import SamplingParams
from tests.numerics import rounds_prompts


def logit_atol(llm) -> float:
    return 5e-2 if rounds_prompts(llm) else 2e-3


@pytest.mark.parametrize("index", [0, 1, 2])
def test_full_forward_logits_match_reference(llm, golden, golden_logits, index):
    prompt = golden["prompts"][index]
    logits = np.asarray(llm.engine.forward([prompt["ids"]]))[0]  # [T, V]
    subset = logits[:, golden_logits["subset_ids"]]
    top_ids = golden_logits[f"p{index}_top_ids"]
    top = np.take_along_axis(logits, top_ids, axis=-1)

    atol = logit_atol(llm)
    np.testing.assert_allclose(subset, golden_logits[f"p{index}_subset_logits"], atol=atol)
    np.testing.assert_allclose(top, golden_logits[f"p{index}_top_logits"], atol=atol)
    assert (logits.argmax(-1) == top_ids[:, 0]).all(), "top-1 differs at some position"


@pytest.mark.parametrize("index", [0, 1, 2])
def test_greedy_tokens_match_reference(llm, golden, index):
    """32 greedy tokens through the serving path (admission, prefill and decode steps
    over the KV pool), past EOS like the reference."""
    prompt = golden["prompts"][index]
    params = SamplingParams(temperature=0, max_tokens=len(prompt["greedy"]), ignore_eos=True)
    assert list(llm.generate(prompt["ids"], params).token_ids) == prompt["greedy"]


def test_chunked_prefill_gives_the_logits_of_one_pass(llm, golden):
    """The longest golden prompt in chunks (of 9, 11, 16 and the rest; of one token, then
    the rest; of all but its last token, then that one) as the serving steps run them
    (through the pool, each chunk reading the earlier ones from it through a shuffled
    block table), against the prompt in one chunk: the same to the bit where every token
    takes the integer products (its norms, products and attention then do not depend on
    the step around it), else to f32's summation order. And the one chunk against one
    plain causal pass."""
    ids = golden["prompts"][2]["ids"]
    one = prompt_logits(llm, ids, [])
    for cuts in ([9, 20, 36], [1], [len(ids) - 1]):
        chunked = prompt_logits(llm, ids, cuts)
        if rounds_prompts(llm):
            np.testing.assert_array_equal(chunked, one)
        else:
            np.testing.assert_allclose(chunked, one, atol=logit_atol(llm))
    full = np.asarray(llm.engine.forward([ids]))[0]
    np.testing.assert_allclose(one, full, atol=logit_atol(llm))


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
