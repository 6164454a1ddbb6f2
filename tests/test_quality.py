"""Quantized serving keeps the reference's next-token distributions: on the golden prompts,
the decode steps on the GGUF's 4-bit blocks (the quantized kernel) and the float32 path
against HF transformers' float32 (tests/fixtures/smollm2_quality.npz, made by
tests/reference/make_quality.py). benchmarks/quality.py prints the same figures beside
llama.cpp's (KL 3e-3 and 96.8% top-1 agreement on this machine, against jaxchat's 1e-9
and 100%).
"""

import numpy as np

from benchmarks.quality import compare, dense, kernel_logprobs, reference, scanned_logprobs


def test_the_4_bit_blocks_and_float32_give_the_reference_distributions(llm):
    assert llm.engine.kernel is not None  # make setup builds it; the decode steps use it
    for ids, top_ids, top_logprobs in reference():
        kernel = kernel_logprobs(llm, ids)
        kl, agree = compare(top_ids, top_logprobs, dense(kernel))
        assert kl < 1e-6 and agree == 1.0
        scanned = scanned_logprobs(llm, ids)
        assert compare(top_ids, top_logprobs, dense(scanned))[0] < 1e-6
        # The comparison can fail: one position's distribution shifted shows.
        kernel[len(ids) // 2] = np.roll(kernel[len(ids) // 2], 1)
        assert compare(top_ids, top_logprobs, dense(kernel))[0] > 1e-3
