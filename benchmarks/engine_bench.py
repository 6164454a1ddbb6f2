"""Single-stream engine benchmark on the default model: decode and prefill rates.

Prints, with medians over repeats:
- batch-1 decode tok/s through the serving path (one step dispatched ahead,
  every token fetched to the host), and the same-run bound set by memory
  bandwidth: bytes of weights read per token / measured streaming bandwidth;
- prefill tok/s for a 512-token prompt (time to the first sampled token);
- the sampler's time for 1, 8 and 32 rows of the model's vocabulary: greedy, at
  temperature 1, and with top_p 0.9, through XLA beside a Gumbel draw
  (jax.random.categorical) over the same logits, and through jaxchat's CPU kernel.

    python -m benchmarks.engine_bench [--model PATH] [--decode-tokens 256]
"""

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import model.kernels
from model import LLM, SamplingParams
from model.nn.sampling import SlotSampling, kernel_sample, sample


def weight_bytes(llm: LLM) -> int:
    """Bytes read per decode step: every weight; the embedding only as a tied head.

    Looking up a token's embedding reads one row, but a tied head reads it all. With the
    quantized kernel, the one-row step reads the matmuls' blocks (and the head's, if any).
    """
    params = llm.engine.params if llm.engine.params and llm.engine.kernel else llm.engine.stacked
    leaves = jax.tree_util.tree_leaves_with_path(params)
    tied = llm.config.tie_embeddings and not (llm.engine.kernel and "lm_head" in params["blocks"])
    return sum(x.nbytes for path, x in leaves if tied or "embed" not in jax.tree_util.keystr(path))


def median_ms(fn, *args, repeats: int = 20) -> float:
    """Median milliseconds of a jitted call, after one to compile it."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def streaming_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Bytes/s of a jitted reduction over `nbytes` of f32 held in 64 separate arrays."""
    chunks = [jnp.ones((nbytes // 4 // 64,), jnp.float32) for _ in range(64)]
    total = jax.jit(lambda xs: sum(x.sum() for x in xs))
    return nbytes / (median_ms(total, chunks, repeats=repeats) / 1e3)


def decode_rate(llm: LLM, tokens: int, repeats: int) -> float:
    """Median tok/s of `tokens` greedy steps after a short prompt, EOS ignored.

    Measured through `LLM.stream`, the serving path: scheduler, one step in
    flight, detokenizer.
    """
    prompt = llm.encode_chat("Write a long story about a lighthouse keeper.")
    rates = []
    for _ in range(repeats):
        params = SamplingParams(temperature=0.0, max_tokens=tokens + 1, ignore_eos=True)
        steps = llm.stream(prompt, params)
        next(steps)  # the first token comes from prefill: not a decode step
        start = time.perf_counter()
        for _ in steps:
            pass
        rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates)


def prefill_rate(llm: LLM, length: int, repeats: int) -> float:
    """Median tok/s to prefill `length` tokens and sample the first token."""
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(repeats):
        prompt = rng.integers(100, llm.config.vocab_size, length).tolist()
        start = time.perf_counter()
        first = next(llm.stream(prompt, SamplingParams(temperature=0.0, max_tokens=1)))
        assert first.finish_reason is not None
        rates.append(length / (time.perf_counter() - start))
    return statistics.median(rates)


def sampling_costs(vocab: int) -> None:
    """The sampler's milliseconds per step for rows of `vocab` logits: XLA's (the path on
    GPU and TPU) and, where it is built, jaxchat's CPU kernel (the path on CPU)."""
    tokens = jax.jit(lambda logits, s: sample(logits, s).tokens)
    kernel = jax.jit(
        lambda logits, s, slots, allowed: kernel_sample(logits, s, slots, slots, allowed).tokens
    )
    gumbel = jax.jit(jax.vmap(jax.random.categorical))
    print(f"sampling {vocab} logits a row, ms:  greedy  temperature 1  top_p 0.9  Gumbel draw")
    for rows in (1, 8, 32):
        logits = jnp.asarray(np.random.default_rng(rows).standard_normal((rows, vocab)) * 3)
        keys = np.zeros((rows, 2), np.uint32)
        greedy, hot, nucleus = (
            SlotSampling.create(np.full(rows, t), np.full(rows, p), None, keys, vocab_size=vocab)
            for t, p in ((0.0, 1.0), (1.0, 1.0), (1.0, 0.9))
        )
        times = [median_ms(tokens, logits, s) for s in (greedy, hot, nucleus)]
        times.append(median_ms(gumbel, jnp.asarray(keys), logits))
        print(f"  {rows:2d} rows, XLA    " + "".join(f"{t:13.2f}" for t in times))
        if model.kernels.load():
            slots, allowed = np.arange(rows), np.full((rows, -(-vocab // 32)), -1, np.int32)
            times = [median_ms(kernel, logits, s, slots, allowed) for s in (greedy, hot, nucleus)]
            print(f"  {rows:2d} rows, kernel " + "".join(f"{t:13.2f}" for t in times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF path (default: bundled SmolLM2)")
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    rates = {}
    # The quantized kernel's decode (where it applies: one CPU device), then f32's.
    for kernel in ("on", "off"):
        os.environ["JAXCHAT_QUANTIZED_KERNEL"] = kernel
        llm = LLM(args.model, max_seq_len=1024, batch=1)
        llm.warmup()
        if kernel == "on" and not llm.engine.kernel:
            print("the quantized kernel is not in use (not built, or not one CPU device)")
        nbytes, vocab = weight_bytes(llm), llm.vocab_size
        bandwidth = streaming_bandwidth(nbytes)
        decode = decode_rate(llm, args.decode_tokens, args.repeats)
        rates[kernel] = decode
        prefill = prefill_rate(llm, args.prefill_tokens, args.repeats)
        bound = bandwidth / nbytes
        rows = [
            ("memory bandwidth (same run)", f"{bandwidth / 1e9:6.1f} GB/s", ""),
            ("batch-1 decode", f"{decode:6.1f} tok/s", f"median of {args.repeats}"),
            ("  bandwidth bound", f"{bound:6.1f} tok/s", f"decode reaches {decode / bound:.0%}"),
            (f"prefill, {args.prefill_tokens}-token prompt", f"{prefill:6.1f} tok/s", "1st token"),
        ]
        dtype = jnp.dtype(llm.dtype).name
        weights = "quantized kernel" if llm.engine.kernel else "f32 matmuls"
        print(f"backend {jax.default_backend()}, {dtype}, {weights}: ", end="")
        print(f"{nbytes / 1e6:.0f} MB of weights per token")
        for name, value, note in rows:
            print(f"{name:32} {value:>12}  {note}")
        del llm
    print(f"batch-1 decode, quantized kernel / f32: {rates['on'] / rates['off']:.2f}x")
    sampling_costs(vocab)


if __name__ == "__main__":
    main()
