"""Speculative decoding (prompt lookup) on one stream: acceptance and speed-up.

Three fixed chat prompts, greedy, through the Python API (the serving path: the
scheduler, its policy, the detokenizer), each decoded with JAXCHAT_SPECULATIVE's
`ngram` and with `off` in the same process, alternating, medians over repeats.
Prints per prompt: decode tok/s both ways and their ratio, drafts verified and
taken (the acceptance rate), and tokens delivered per step; and checks that both
ways give the same tokens (after an untimed run, so that every timed one finds the
prompt in the prefix cache); where a timed run's tokens leave the untimed run's, with
drafts or without, a line under the prompt's says which run, at which token, and what
it took instead.

    python -m benchmarks.speculative_bench [--max-tokens 256] [--repeats 3]
"""

import argparse
import statistics
import time

from model import LLM, SamplingParams
from model.engine.speculative import Speculation
from model.limits import DEFAULT_SPECULATIVE_TOKENS

CODE = """import csv
from collections import defaultdict


def load_orders(path):
    orders = []
    with open(path) as f:
        for row in csv.DictReader(f):
            orders.append({"customer": row["customer"], "amount": float(row["amount"]),
                           "country": row["country"]})
    return orders


def totals_by_country(orders):
    totals = defaultdict(float)
    for order in orders:
        totals[order["country"]] += order["amount"]
    return dict(totals)


def top_customers(orders, n):
    spent = defaultdict(float)
    for order in orders:
        spent[order["customer"]] += order["amount"]
    return sorted(spent.items(), key=lambda item: item[1], reverse=True)[:n]
"""

TEXT = (
    "The Great Barrier Reef, off the coast of Queensland in north-eastern Australia, is "
    "the world's largest coral reef system. It is made of more than 2,900 individual "
    "reefs and 900 islands stretching over 2,300 kilometres, over an area of about "
    "344,400 square kilometres. The reef can be seen from outer space and is the "
    "world's biggest single structure made by living organisms. It was built by "
    "billions of tiny organisms known as coral polyps, and supports a wide diversity of "
    "life. It was selected as a World Heritage Site in 1981. Climate change, pollution, "
    "crown-of-thorns starfish and fishing are the main threats to the health of the "
    "reef. Since 1995 the reef has lost about half of its coral, mostly through mass "
    "bleaching events caused by warmer sea temperatures, in 1998, 2002, 2016, 2017, "
    "2020 and 2022. Tourism on the reef brings in billions of dollars every year."
)

PROMPTS = {
    "code edit": "Here is some Python code:\n\n" + CODE + "\nRewrite the code above with "
    "the function top_customers renamed to biggest_spenders. Output only the code.",
    "summary": "Summarise this text in a few sentences, keeping its figures:\n\n" + TEXT,
    "open chat": "What are some good habits for staying productive while working from home?",
}


def run(llm: LLM, ids: list[int], max_tokens: int) -> tuple[list[int], float, int]:
    """Greedy tokens, decode tok/s after the first token, and engine steps taken."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    steps = llm.stats().steps
    tokens, first = [], 0.0
    for delta in llm.stream(ids, params):
        tokens.extend(delta.token_ids)
        if not first:
            first = time.perf_counter()
    seconds = time.perf_counter() - first
    return tokens, (len(tokens) - 1) / seconds, llm.stats().steps - steps


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first index where two token lists differ (one ending counts), or None."""
    index = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    return index if index is not None or len(a) == len(b) else min(len(a), len(b))


def describe(repeat: int, reference: list[int], plain: list[int], fast: list[int], decode) -> str:
    """Where a repeat's tokens left the untimed run's (without drafts), with and without
    drafts: so a "NO" says whether drafting or something else moved them, and where."""
    parts = []
    for name, tokens in (("without drafts", plain), ("with drafts", fast)):
        at = first_difference(reference, tokens)
        if at is not None:
            was, got = reference[at : at + 1], tokens[at : at + 1]
            parts.append(f"{name} from token {at} ({decode(was)!r} -> {decode(got)!r})")
    return f"repeat {repeat}: " + "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    llm = LLM(args.model, speculative="ngram")
    llm.warmup()
    drafting = llm.scheduler.speculation
    off = Speculation("off", 1)
    print(f"speculative decoding, one stream, greedy, {DEFAULT_SPECULATIVE_TOKENS} drafts max")
    print(
        f"{'prompt':<10} {'tokens':>6} {'off tok/s':>9} {'on tok/s':>9} {'speed-up':>8} "
        f"{'drafted':>7} {'taken':>6} {'accept':>6} {'tok/step':>8} same"
    )
    for name, text in PROMPTS.items():
        ids = llm.encode_chat(text)
        rates: dict[str, list[float]] = {"off": [], "on": []}
        counts = (drafting.drafted, drafting.accepted)
        steps_on, same, differences = 0, True, []
        # An untimed run first, so that every timed one finds the prompt's blocks in the
        # prefix cache: a miss computes the prompt in other chunks than a hit, which moves
        # its logits by up to 2e-3 and can flip a near tie (this prompt's code-edit reply
        # once did at its fifth token, two logits 1.3e-4 apart): "same" is speculation's.
        llm.scheduler.speculation = off
        reference = run(llm, ids, args.max_tokens)[0]
        for repeat in range(args.repeats):
            llm.scheduler.speculation = off
            plain, rate, _ = run(llm, ids, args.max_tokens)
            rates["off"].append(rate)
            llm.scheduler.speculation = drafting
            fast, rate, steps = run(llm, ids, args.max_tokens)
            rates["on"].append(rate)
            steps_on += steps
            same = same and plain == fast
            if plain != fast or plain != reference:
                differences.append(describe(repeat, reference, plain, fast, llm.tokenizer.decode))
        drafted = drafting.drafted - counts[0]
        taken = drafting.accepted - counts[1]
        off_rate, on_rate = statistics.median(rates["off"]), statistics.median(rates["on"])
        print(
            f"{name:<10} {len(plain):>6} {off_rate:>9.1f} {on_rate:>9.1f} "
            f"{on_rate / off_rate:>7.2f}x {drafted:>7} {taken:>6} "
            f"{taken / max(drafted, 1):>6.2f} {len(fast) * args.repeats / steps_on:>8.2f} "
            f"{'yes' if same else 'NO'}"
        )
        for line in differences:
            print(f"  {line}")


if __name__ == "__main__":
    main()
