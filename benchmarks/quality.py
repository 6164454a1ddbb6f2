"""Quality of quantized serving: next-token distributions against HF's float32 reference.

On the golden prompts (each with the reference's greedy continuation), at every
position, it compares the next-token distribution of
- jaxchat's decode steps on the GGUF's 4-bit blocks (the quantized kernel, as a lone
  stream decodes: teacher-forced, 8 positions per step as draft rows are verified),
- the same blocks as prompt steps (chunks of SMALL_CHUNK through a pool, as prompts run beside
  decoding streams: the kernel's many-row path, f32),
- jaxchat's float32 path (JAXCHAT_QUANTIZED_KERNEL=off, a forward pass),
- llama.cpp's server on the same file (its top 100 log-probabilities), if one is given,
with the reference's (tests/fixtures/smollm2_quality.npz, written by
tests/reference/make_quality.py). It prints the mean KL divergence KL(reference ||
model) over the reference's 64 most likely tokens and the rest of the vocabulary as
one more outcome, and how often the model's most likely token is the reference's.

    python -m benchmarks.quality [--llama-server PATH]
"""

import argparse
import itertools
import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from model import LLM
from model.engine.variants import SMALL_CHUNK, StepShape
from model.nn.network import apply_logits, apply_step

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "smollm2_quality.npz"
ROWS = 8


def reference() -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per prompt: token ids [T], the reference's top ids and log-probabilities [T, 64]."""
    with np.load(FIXTURE) as data:
        count = sum(name.endswith("_ids") and name.count("_") == 1 for name in data.files)
        return [
            (data[f"p{i}_ids"], data[f"p{i}_top_ids"], data[f"p{i}_top_logprobs"])
            for i in range(count)
        ]


def kernel_logprobs(llm: LLM, ids: np.ndarray) -> np.ndarray:
    """Log-probabilities [T, V] of the token after each position, as decode rows through
    the steps' layers on their weights (the quantized blocks, where the kernel is in
    use), ROWS consecutive positions per step over a pool of its own."""
    engine = llm.engine

    def step(params, pool, tokens, layout):
        hidden, pool = apply_step(engine.network(), params, tokens, layout, pool)
        return jax.nn.log_softmax(apply_logits(engine.network(), params, hidden)), pool

    run = jax.jit(step, donate_argnums=(1,))
    pool = engine.init_state().pool
    table = np.arange(engine.table_width, dtype=np.int32)  # position p at flat pool slot p
    out = []
    for start in range(0, len(ids), ROWS):
        plan = engine.empty_plan(StepShape(ROWS, 0))
        layout, n = plan.layout, min(ROWS, len(ids) - start)
        positions = np.arange(start, start + n, dtype=np.int32)
        plan.tokens[:n] = ids[positions]
        layout.positions[:n] = layout.context[:n] = layout.write[:n] = positions
        layout.block_tables[:n] = table
        logprobs, pool = run(engine.stacked, pool, plan.tokens, layout)
        out.append(np.asarray(logprobs)[:n])
    return np.concatenate(out)


def prompt_logits(llm: LLM, ids: Sequence[int], cuts: Sequence[int] = ()) -> np.ndarray:
    """Logits [T, V] of a prompt prefilled as the serving steps run it: a prefill region
    per chunk (ending at `cuts`, the last at the prompt's end), each chunk reading the
    earlier ones from a pool of its own through a shuffled block table."""
    engine = llm.engine

    def step(params, pool, tokens, layout):
        hidden, pool = apply_step(engine.network(), params, tokens, layout, pool)
        return apply_logits(engine.network(), params, hidden), pool

    run = jax.jit(step, donate_argnums=(1,))
    pool = engine.init_state().pool
    shuffled = np.random.default_rng(3).permutation(engine.pool_blocks)
    table = shuffled[: engine.table_width].astype(np.int32)
    bounds = [0, *cuts, len(ids)]
    # One region shape for every prompt of up to SMALL_CHUNK tokens a chunk: compiled once.
    region = max(SMALL_CHUNK, *(end - start for start, end in itertools.pairwise(bounds)))
    out = []
    for start, end in itertools.pairwise(bounds):
        plan = engine.empty_plan(StepShape(0, region))
        layout, n = plan.layout, end - start
        positions = np.arange(start, end, dtype=np.int32)
        plan.tokens[:n] = np.asarray(ids)[positions]
        layout.positions[:n] = positions
        layout.segments[:n] = layout.prior_group[:n] = 0
        layout.prior[0], layout.prior_blocks[0] = start, table
        bs = engine.block_size
        layout.write[:n] = table[positions // bs] * bs + positions % bs
        logits, pool = run(engine.stacked, pool, plan.tokens, layout)
        out.append(np.asarray(logits)[:n])
    return np.concatenate(out)


def prompt_logprobs(llm: LLM, ids: np.ndarray) -> np.ndarray:
    """Log-probabilities [T, V] of the prompt as the serving steps prefill it, in chunks
    of SMALL_CHUNK tokens (as beside decoding streams)."""
    cuts = range(SMALL_CHUNK, len(ids), SMALL_CHUNK)
    return np.asarray(jax.nn.log_softmax(prompt_logits(llm, ids, cuts)))


def forward_logprobs(llm: LLM, ids: np.ndarray) -> np.ndarray:
    """Log-probabilities [T, V] of a full forward pass through the steps' layers (as a
    prompt: the many-row kernel on the blocks where it is in use, else float32)."""
    return np.asarray(jax.nn.log_softmax(llm.engine.forward(ids[None])[0]))


ROW_NAMES = (
    "jaxchat, 4-bit blocks: decode steps",
    "jaxchat, 4-bit blocks: prompt steps",
    "jaxchat, float32",
    "llama.cpp",
)


def compare(top_ids: np.ndarray, top_logprobs: np.ndarray, model) -> tuple[float, float]:
    """(mean KL(reference || model), top-1 agreement) over positions. `model(t, ids)` gives
    the model's log-probabilities of token ids at position t and its most likely token.
    The outcomes are the reference's top tokens and "any other token"."""
    kls, agree = [], []
    for t in range(len(top_ids)):
        p = np.exp(top_logprobs[t].astype(np.float64))
        logq, best = model(t, top_ids[t])
        q = np.exp(logq.astype(np.float64))
        p_rest, q_rest = max(1 - p.sum(), 1e-12), max(1 - q.sum(), 1e-12)
        kl = float(np.sum(p * (np.log(p) - np.log(q))) + p_rest * np.log(p_rest / q_rest))
        kls.append(max(kl, 0.0))
        agree.append(best == top_ids[t][0])
    return float(np.mean(kls)), float(np.mean(agree))


def dense(logprobs: np.ndarray):
    """A `compare` model of full log-probabilities [T, V]."""
    return lambda t, ids: (logprobs[t][ids], int(np.argmax(logprobs[t])))


class LlamaServer:
    """llama.cpp's server on the GGUF, asked for the next token's top 100 log-probabilities
    after each prefix (its prompt cache keeps the prefix)."""

    def __init__(self, binary: str, gguf: str, port: int = 8093):
        self.url = f"http://127.0.0.1:{port}"
        args = [binary, "-m", gguf, "--port", str(port), "-t", "2", "-c", "4096", "-np", "1"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(300):
            try:
                urllib.request.urlopen(self.url + "/health", timeout=1)
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("llama-server did not start")

    def top(self, prefix: list[int]) -> dict[int, float]:
        body = {"prompt": prefix, "n_predict": 1, "n_probs": 100, "temperature": 0}
        body["post_sampling_probs"] = False
        request = urllib.request.Request(
            self.url + "/completion", json.dumps(body).encode(), method="POST"
        )
        reply = json.load(urllib.request.urlopen(request, timeout=60))
        tops = reply["completion_probabilities"][0]["top_logprobs"]
        return {int(x["id"]): float(x["logprob"]) for x in tops}

    def model(self, ids: np.ndarray):
        """A `compare` model. A reference token outside its top 100 is given the 100th's
        log-probability (an upper bound: the KL is then slightly underestimated)."""
        tops = [self.top(ids[: t + 1].tolist()) for t in range(len(ids))]

        def at(t, wanted):
            floor = min(tops[t].values())
            logq = np.array([tops[t].get(int(i), floor) for i in wanted])
            return logq, max(tops[t], key=tops[t].get)

        return at

    def close(self) -> None:
        self.process.terminate()
        self.process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-server", default=None, help="llama.cpp's llama-server binary")
    args = parser.parse_args()
    llm = LLM()
    llm.scheduler.stop()
    os.environ["JAXCHAT_QUANTIZED_KERNEL"] = "off"
    f32 = LLM(max_seq_len=1024, batch=1)  # the float32 path
    f32.scheduler.stop()
    prompts = reference()
    rows: dict[str, list] = {name: [] for name in ROW_NAMES}
    server = LlamaServer(args.llama_server, str(llm.path)) if args.llama_server else None
    try:
        for ids, top_ids, top_logprobs in prompts:
            if llm.engine.kernel:
                for name, run in zip(ROW_NAMES, (kernel_logprobs, prompt_logprobs), strict=False):
                    rows[name].append(compare(top_ids, top_logprobs, dense(run(llm, ids))))
            f32_rows = dense(forward_logprobs(f32, ids))
            rows["jaxchat, float32"].append(compare(top_ids, top_logprobs, f32_rows))
            if server is not None:
                rows["llama.cpp"].append(compare(top_ids, top_logprobs, server.model(ids)))
    finally:
        if server is not None:
            server.close()
    positions = sum(len(ids) for ids, _, _ in prompts)
    print(f"next-token distributions vs HF transformers float32, {positions} positions")
    print(f"{'model':<40} {'KL (nats)':>10} {'top-1 agree':>12}")
    for name, results in rows.items():
        if results:
            kl = np.mean([r[0] for r in results])
            agree = np.mean([r[1] for r in results])
            print(f"{name:<40} {kl:>10.2e} {agree:>12.4f}")
        else:
            print(f"{name:<40} {'(not run)':>10}")


if __name__ == "__main__":
    main()
