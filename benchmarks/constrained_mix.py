"""Do grammar-constrained requests slow the unconstrained ones sharing their batch?

Runs, on the default model through the Python API (scheduler included), the
same 8 plain sampled streams in three batches, interleaved over several rounds:

- alone: the 8 plain streams;
- +8 plain: with 8 more plain streams (the cost of a fuller batch);
- +8 JSON: with 8 grammar-constrained streams instead (a JSON-schema array of
  at least 64 integers, which never ends before max_tokens).

Prints the plain streams' median inter-token time in each (the first gap,
which waits for the other prompts' prefills, left out), and the ratio
"+8 JSON" / "+8 plain": the cost of the constraint itself (the token masks
computed on the host, and the step no longer overlapping host work, see
model/engine/scheduler.py), beyond the cost of the rows. Also prints the
constrained streams' own rate.

    python -m benchmarks.constrained_mix [--tokens 64] [--rounds 3]
"""

import argparse
import statistics
import threading
import time

from model import LLM, SamplingParams

PROMPT = "Write a long story about a lighthouse keeper."
# At least 64 items: the constrained streams cannot end before max_tokens.
NUMBERS = {"type": "array", "items": {"type": "integer"}, "minItems": 64}


def run_batch(llm: LLM, plain: int, constrained: int, extra_plain: int, tokens: int):
    """Start every stream at once; return the median inter-token time of the measured
    plain streams and of the constrained ones (s)."""
    prompt = llm.encode_chat(PROMPT)
    grammar = llm.grammars.json_schema(NUMBERS)
    jobs = [("plain", SamplingParams(temperature=1.0, max_tokens=tokens, ignore_eos=True))] * (
        plain + extra_plain
    )
    jobs += [
        ("json", SamplingParams(temperature=1.0, max_tokens=tokens, grammar=grammar))
    ] * constrained
    per_token: dict[str, list[float]] = {"plain": [], "json": []}
    start_gate = threading.Barrier(len(jobs))

    def stream(kind: str, params: SamplingParams, measured: bool) -> None:
        start_gate.wait()
        times = [time.perf_counter() for _ in llm.stream(prompt, params)]
        if measured and len(times) > 2:
            gaps = [b - a for a, b in zip(times[1:], times[2:], strict=False)]
            per_token[kind].append(statistics.median(gaps))

    threads = [
        threading.Thread(target=stream, args=(kind, params, i < plain or kind == "json"))
        for i, (kind, params) in enumerate(jobs)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statistics.median(per_token["plain"]), (
        statistics.median(per_token["json"]) if per_token["json"] else None
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    llm = LLM(max_seq_len=512, batch=16)
    llm.warmup()
    run_batch(llm, 8, 8, 0, 8)  # first use of the grammar engine and every row bucket
    results: dict[str, list[float]] = {"alone": [], "+8 plain": [], "+8 JSON": []}
    json_rates = []
    for _ in range(args.rounds):
        results["alone"].append(run_batch(llm, 8, 0, 0, args.tokens)[0])
        results["+8 plain"].append(run_batch(llm, 8, 0, 8, args.tokens)[0])
        plain, constrained = run_batch(llm, 8, 8, 0, args.tokens)
        results["+8 JSON"].append(plain)
        json_rates.append(constrained)
    print(
        f"\nconstrained batch mix: 8 plain sampled streams, {args.tokens} tokens, "
        f"{args.rounds} rounds (medians)"
    )
    for name, values in results.items():
        print(f"  plain streams, {name:9s} {1000 * statistics.median(values):7.1f} ms/token")
    ratio = statistics.median(results["+8 JSON"]) / statistics.median(results["+8 plain"])
    print(f"  +8 JSON / +8 plain:           {ratio:7.2f}x")
    print(f"  constrained streams themselves: {1000 * statistics.median(json_rates):7.1f} ms/token")


if __name__ == "__main__":
    main()
