"""Serving cases beyond steady load, for any OpenAI-compatible server (jaxchat or a peer).

Each case speaks only the public API through the official `openai` SDK:

- prefix: TTFT of the second turn of a chat whose history is ~2,000 tokens,
  when the server has just answered the first turn (its prefix cache can hit)
  and when it has never seen that history (a miss: same length, another text);
- interference: inter-token latency of 8 running streams, alone and while a
  ~4,000-token prompt arrives and prefills (from its send to its first token): the
  gaps between a stream's deliveries (tokens that arrive together are one), and
  the same gaps per token delivered (speculative decoding delivers several); alone
  again after it; and without it: the same streams run again with no prompt arriving,
  their gaps at the positions each had while it prefilled (the p50 "without it" at
  the same contexts);
- long: the seconds to answer a ~6,600-token prompt on an idle server, then a
  two-word request right after it;
- memory: resident memory of the server's process tree (with --pid).

Every history starts with its own nonce, so no run can hit another's cache.
Prompt sizes are the server's own `usage.prompt_tokens`, printed with each case.

    python -m benchmarks.serving_cases --base-url http://127.0.0.1:8080/v1 [--pid PID]
"""

import argparse
import asyncio
import random
import statistics
import sys
import time
import uuid
from pathlib import Path

import openai

from benchmarks.load import (
    PROMPTS,
    make_client,
    percentile,
    resolve_model,
)

# ~1.1 SmolLM2 tokens per word of this vocabulary; the cases print the real counts.
VOCABULARY = (
    "the river valley morning market train station garden letter window mountain "
    "village harbour bread music lantern winter summer forest bridge road clock "
    "teacher student library kitchen ocean island storm cloud field farmer horse "
    "quiet bright old new small large early late warm cold green blue golden silver "
    "walked found opened carried watched remembered wrote built painted followed "
    "and but because while after before under over through across beside near"
)
WORDS = VOCABULARY.split()
TOKENS_PER_WORD = 1.1


def filler(tokens: int, seed: str) -> str:
    """About `tokens` tokens of plain sentences, different for every seed."""
    rng = random.Random(seed)
    words, sentences = round(tokens / TOKENS_PER_WORD), []
    while words > 0:
        n = min(words, rng.randint(8, 16))
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + ".")
        words -= n
    return " ".join(sentences)


def history(tokens: int) -> list[dict]:
    """A first turn: a unique nonce first (so no earlier prefix matches), then notes."""
    nonce = uuid.uuid4().hex
    return [
        {"role": "system", "content": f"Session {nonce}. You are a helpful assistant."},
        {
            "role": "user",
            "content": f"My notes:\n{filler(tokens, nonce)}\n\nSummarise them in one line.",
        },
    ]


async def first_token_time(
    client: openai.AsyncOpenAI, model: str, messages: list[dict], max_tokens: int = 8
) -> tuple[float, int]:
    """(TTFT in seconds, prompt tokens) of one streamed greedy request."""
    start, ttft, prompt_tokens = time.perf_counter(), None, -1
    stream = await client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if ttft is None and any(choice.delta.content for choice in chunk.choices):
            ttft = time.perf_counter() - start
        if chunk.usage is not None:
            prompt_tokens = chunk.usage.prompt_tokens
    if ttft is None:
        raise RuntimeError("stream ended without content")
    return ttft, prompt_tokens


async def answer(
    client: openai.AsyncOpenAI, model: str, messages: list[dict], max_tokens: int
) -> tuple[str, float, int]:
    """(reply, seconds, prompt tokens) of one non-streamed greedy request."""
    start = time.perf_counter()
    response = await client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    seconds = time.perf_counter() - start
    return response.choices[0].message.content or "", seconds, response.usage.prompt_tokens


# ---------------------------------------------------------------- cases


async def prefix_case(client: openai.AsyncOpenAI, model: str, runs: int) -> None:
    """Second-turn TTFT over a ~2,000-token history: just answered (hit) vs never seen (miss)."""
    follow_up = {"role": "user", "content": "Now give three keywords from the notes."}
    hits, misses, tokens = [], [], -1
    for _ in range(runs):
        first = history(2000)
        reply, _, _ = await answer(client, model, first, max_tokens=24)
        second = [*first, {"role": "assistant", "content": reply}, follow_up]
        hit, tokens = await first_token_time(client, model, second)
        # The same conversation shape and length around a history the server never saw.
        unseen = [*history(2000), {"role": "assistant", "content": reply}, follow_up]
        miss, _ = await first_token_time(client, model, unseen)
        hits.append(hit)
        misses.append(miss)
    hit, miss = statistics.median(hits), statistics.median(misses)
    print(
        f"prefix       second turn over a {tokens}-token prompt, TTFT median of {runs}: "
        f"history cached {hit:.3f} s, not cached {miss:.3f} s  ({hit / miss:.0%} of a miss)",
        flush=True,
    )


TOGETHER = 0.002  # seconds: chunks closer than this arrived together


def deliveries_of(times: list[float]) -> list[tuple[int, list[float]]]:
    """A stream's chunk times as deliveries: (index of its first chunk, its chunks' times),
    chunks that arrived within TOGETHER of each other being one delivery."""
    out: list[tuple[int, list[float]]] = []
    for i, t in enumerate(times):
        if i == 0 or t - times[i - 1] > TOGETHER:
            out.append((i, []))
        out[-1][1].append(t)
    return out


async def stream_times(
    client: openai.AsyncOpenAI, model: str, index: int, max_tokens: int, times: list[float]
) -> None:
    """Stream `index`'s greedy request (PROMPTS[index], ignoring EOS), each content chunk's
    arrival appended to `times`."""
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    async with stream:  # closed when cancelled, so the server stops generating
        async for chunk in stream:
            if any(choice.delta.content for choice in chunk.choices):
                times.append(time.perf_counter())


async def gaps_without(
    client: openai.AsyncOpenAI, model: str, spans: dict[int, tuple[int, int]]
) -> tuple[list[float], float]:
    """The same streams again, with nothing else arriving: stream i's gaps between the
    deliveries that begin at chunk spans[i][0] … spans[i][1] (greedy, so the same tokens at
    the same positions), and their tokens a delivery. All run to the longest span's end, so
    the batch stays whole."""
    if not spans:  # (no stream delivered while it prefilled: nothing to compare)
        return [], 0.0
    end = max(hi for _, hi in spans.values()) + 1
    runs = {index: [] for index in spans}
    await asyncio.gather(*(stream_times(client, model, i, end, runs[i]) for i in spans))
    gaps, tokens = [], 0
    for index, (lo, hi) in spans.items():
        ds = deliveries_of(runs[index])
        later = [(a, b) for a, b in zip(ds, ds[1:], strict=False) if lo <= b[0] <= hi]
        gaps += [b[1][0] - a[1][0] for a, b in later]
        tokens += sum(len(b[1]) for _, b in later)
    return gaps, tokens / max(len(gaps), 1)


async def interference_case(
    client: openai.AsyncOpenAI, model: str, streams: int, alone_s: float, stream_tokens: int
) -> None:
    """ITL of `streams` running streams alone, then while a ~4,000-token prompt prefills.
    Each stream asks for `stream_tokens` tokens: enough that none ends (and a new request's
    prompt takes its place) while it is measured, or the new prompts' own steps are in the
    gaps too; one that does end is followed by a new one, and the case counts them."""
    chunk_times: list[tuple[int, list[float]]] = []  # per request: (stream, chunk times)
    starts: list[float] = []

    async def worker(index: int) -> None:
        while True:
            times: list[float] = []
            chunk_times.append((index, times))
            starts.append(time.perf_counter())
            await stream_times(client, model, index, stream_tokens, times)

    workers = [asyncio.ensure_future(worker(i)) for i in range(streams)]
    await asyncio.sleep(alone_s / 2)  # every stream running, prompts prefilled
    alone_from = time.perf_counter()
    await asyncio.sleep(alone_s)
    sent = time.perf_counter()
    ttft, tokens = await first_token_time(client, model, history(4000), max_tokens=4)
    arrived, done = sent + ttft, time.perf_counter()
    # Alone again, as long: the streams' contexts grew while the prompt prefilled, and
    # their steps with them (attention reads every position), prompt or not.
    await asyncio.sleep(alone_s)
    after_to = time.perf_counter()
    for task in workers:
        task.cancel()
    await asyncio.gather(*workers, return_exceptions=True)

    alone, during, after = [], [], []
    alone_token, during_token, after_token = [], [], []  # each gap over its tokens
    tokens_alone = deliveries_alone = tokens_after = 0
    spans: dict[int, tuple[int, int]] = {}  # each stream's chunks while the prompt prefilled
    for index, times in chunk_times:
        # Tokens that arrive together (a step that took drafts: speculative decoding, or
        # a server that sends several at once) are one delivery: the gaps are between
        # deliveries, or every such token would count a gap of zero.
        indexed = deliveries_of(times)
        deliveries = [d for _, d in indexed]
        inside = [i for i, d in indexed[1:] if sent <= d[0] <= arrived]
        if inside and times[0] < sent:
            spans[index] = (inside[0], inside[-1])
        tokens_alone += sum(1 for t in times if alone_from <= t < sent)
        deliveries_alone += sum(1 for d in deliveries if alone_from <= d[0] < sent)
        for earlier, later in zip(deliveries, deliveries[1:], strict=False):
            gap = later[0] - earlier[0]
            if alone_from <= later[0] < sent:
                alone.append(gap)
                alone_token.append(gap / len(later))
            elif sent <= later[0] <= arrived:
                during.append(gap)
                during_token.append(gap / len(later))
            elif done <= earlier[0] and later[0] < after_to:
                after.append(gap)
                after_token.append(gap / len(later))
                tokens_after += len(later)
    p50 = percentile(alone, 50)
    new = sum(1 for t in starts if alone_from <= t <= arrived)
    print(
        f"interference {streams} streams, ITL alone p50 {p50:.3f} s p99 "
        f"{percentile(alone, 99):.3f} s; while a {tokens}-token prompt prefills "
        f"({ttft:.1f} s to its first token) p50 {percentile(during, 50):.3f} s p99 "
        f"{percentile(during, 99):.3f} s = {percentile(during, 99) / p50:.1f}x the p50 alone "
        f"({new} streams replaced meanwhile; alone, {tokens_alone / max(deliveries_alone, 1):.2f} "
        "tokens a delivery)",
        flush=True,
    )
    # The same streams alone over as many seconds after the prompt: their contexts are
    # longer by what they decoded meanwhile (their steps with them: attention reads every
    # position), and where drafts are taken, the text they repeat may have changed.
    # Their p50 without the prompt while it prefilled lies between the two (a step's
    # attention grows with the contexts): the p99 beside it over their mean is what the
    # prompt itself costs them.
    bracket = (p50 + percentile(after, 50)) / 2
    print(
        f"interference alone after the prompt, p50 {percentile(after, 50):.3f} s a delivery, "
        f"{percentile(after_token, 50):.3f} s a token ({tokens_after / max(len(after), 1):.2f} "
        f"tokens a delivery); the p99 while it prefilled = {percentile(during, 99) / bracket:.1f}x "
        "the mean of the p50s alone before and after it",
        flush=True,
    )
    # Without it: the streams that ran through the prefill, run again from their start with
    # nothing arriving, over the same positions (the same contexts, the same drafts).
    without, per_delivery = await gaps_without(client, model, spans)
    print(
        f"interference without the prompt, the same {len(spans)} streams at the same "
        f"positions: p50 {percentile(without, 50):.3f} s p99 {percentile(without, 99):.3f} s "
        f"({per_delivery:.2f} tokens a delivery); the p99 while it prefilled = "
        f"{percentile(during, 99) / percentile(without, 50):.1f}x that p50",
        flush=True,
    )
    # Per token, each gap spread over the tokens it delivered: where drafts are taken,
    # a delivery alone carries more tokens than one beside a prefill, and the gaps above
    # compare unlike things.
    token_p50 = percentile(alone_token, 50)
    print(
        f"interference per token, ITL alone p50 {token_p50:.3f} s; while the prompt "
        f"prefills p50 {percentile(during_token, 50):.3f} s p99 "
        f"{percentile(during_token, 99):.3f} s = "
        f"{percentile(during_token, 99) / token_p50:.1f}x the p50 alone",
        flush=True,
    )


async def long_case(client: openai.AsyncOpenAI, model: str, tokens: int, max_tokens: int) -> None:
    """Seconds to answer one long prompt on an idle server, then a short request after it."""
    _, seconds, prompt_tokens = await answer(client, model, history(tokens), max_tokens)
    short = [{"role": "user", "content": "Hello there."}]
    _, after, _ = await answer(client, model, short, max_tokens=8)
    print(
        f"long         a {prompt_tokens}-token prompt answered ({max_tokens} tokens) in "
        f"{seconds:.1f} s; a two-word request right after it in {after:.2f} s",
        flush=True,
    )


def tree_memory(pid: int) -> tuple[float, float]:
    """(resident GB now, sum of each process's peak resident GB) of pid and its descendants."""
    pids, frontier = [pid], [pid]
    while frontier:
        children = Path(f"/proc/{frontier.pop()}/task")
        for task in children.iterdir() if children.exists() else ():
            text = (task / "children").read_text().split()
            pids.extend(int(c) for c in text)
            frontier.extend(int(c) for c in text)
    now = peak = 0.0
    for p in set(pids):
        status = dict(
            line.split(":", 1) for line in Path(f"/proc/{p}/status").read_text().splitlines()
        )
        now += int(status["VmRSS"].split()[0]) / 1e6
        peak += int(status["VmHWM"].split()[0]) / 1e6
    return now, peak


# ---------------------------------------------------------------- main

CASES = ("prefix", "interference", "long")


async def run(args: argparse.Namespace) -> None:
    client = make_client(args.base_url, args.api_key, args.timeout)
    async with client:
        model = await resolve_model(client, args.model)
        await first_token_time(client, model, [{"role": "user", "content": "Hi."}])  # warm-up
        if "prefix" in args.cases:
            await prefix_case(client, model, args.runs)
        if "interference" in args.cases:
            await interference_case(
                client, model, 8, alone_s=args.alone_seconds, stream_tokens=args.stream_tokens
            )
        if "long" in args.cases:
            await long_case(client, model, args.long_tokens, max_tokens=32)
    if args.pid:
        now, peak = tree_memory(args.pid)
        print(f"memory       server resident {now:.2f} GB now, {peak:.2f} GB at peak", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    parser.add_argument("--model", default=None, help="model id; default: the first listed")
    parser.add_argument("--api-key", default="unused")
    parser.add_argument("--cases", default=",".join(CASES), type=lambda s: s.split(","))
    parser.add_argument("--runs", type=int, default=3, help="prefix case repetitions")
    parser.add_argument("--alone-seconds", type=float, default=8.0)
    parser.add_argument("--long-tokens", type=int, default=6600)
    parser.add_argument(
        "--stream-tokens", type=int, default=2048, help="interference case: each stream's"
    )
    parser.add_argument("--pid", type=int, default=None, help="server process, for memory")
    parser.add_argument("--timeout", type=float, default=1800.0, help="per request, seconds")
    args = parser.parse_args(argv)
    unknown = set(args.cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; choose from {CASES}")
    print(f"{args.base_url}: serving cases {args.cases}", flush=True)
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
