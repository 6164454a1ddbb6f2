"""Quantized serving keeps the reference's next-token distributions: on the golden prompts,
the decode steps, the prompt's steps and its forward pass on the GGUF's 4-bit blocks
(the quantized kernel) against HF transformers' float32 (tests/fixtures/smollm2_quality.npz,
made by tests/reference/make_quality.py). benchmarks/quality.py prints the same figures
beside llama.cpp's (KL 3e-3 and 96.8% top-1 agreement on this machine, against jaxchat's
3.5e-7 as decode steps, whose products round x to 16 bits, 1.5e-9 as prompt steps, and
100%).
"""

import numpy as np

from benchmarks.quality import (
    compare,
    dense,
    forward_logprobs,
    kernel_logprobs,
    prompt_logprobs,
    reference,
)


def test_the_4_bit_blocks_give_the_reference_distributions(llm):
    """As decode rows, as a prompt's steps and as a forward pass. (The float32 path, on
    several devices, gives the reference's replies in tests/test_mesh.py.)"""
    assert llm.engine.kernel is not None  # make setup builds it; the steps use it
    for ids, top_ids, top_logprobs in reference():
        kernel = kernel_logprobs(llm, ids)
        kl, agree = compare(top_ids, top_logprobs, dense(kernel))
        assert kl < 1e-6 and agree == 1.0
        prompt = prompt_logprobs(llm, ids)
        kl, agree = compare(top_ids, top_logprobs, dense(prompt))
        assert kl < 1e-6 and agree == 1.0
        forward = forward_logprobs(llm, ids)
        assert compare(top_ids, top_logprobs, dense(forward))[0] < 1e-6
        # The comparison can fail: one position's distribution shifted shows.
        kernel[len(ids) // 2] = np.roll(kernel[len(ids) // 2], 1)
        assert compare(top_ids, top_logprobs, dense(kernel))[0] > 1e-3
