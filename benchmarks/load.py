"""Load generator for any OpenAI-compatible chat-completions server (streaming).

Speaks only the public API through the official `openai` SDK, so the same run
can be pointed at jaxchat, llama.cpp's `llama-server` or vLLM. For each
concurrency level it sends N streamed requests with at most `concurrency` in
flight, with fixed prompts and a fixed output length (`max_tokens` plus the
widely supported `ignore_eos`, greedy), and reports:

- aggregate output tok/s: all output tokens of the level / its wall time;
- per-request tok/s: median of tokens / (end - first content token);
- TTFT (time to first content token) p50/p99 and inter-token latency p50/p99;
- the number of failed requests.

    python -m benchmarks.load --base-url http://127.0.0.1:8080/v1 \\
        --model smollm2-135m-instruct --concurrency 1,8,32,64 --max-tokens 128
"""

import argparse
import asyncio
import itertools
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import openai

try:  # the HTTP library under the SDK: httpx2 from openai 3 on, httpx before
    import httpx2 as httpx
except ImportError:
    import httpx

# Varied user messages; request i of a level always gets PROMPTS[i % len(PROMPTS)],
# so every server sees the same prompts in the same order.
PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works to a ten-year-old.",
    "List ten uses for a paperclip and explain each one briefly.",
    "What are the main causes of the seasons on Earth?",
    "Describe a walk through a busy market in a coastal town.",
    "Give step-by-step instructions for baking a loaf of bread.",
    "Compare trains and airplanes for travelling between two cities.",
    "Write a friendly letter inviting a neighbour to a garden party.",
]


@dataclass
class RequestRecord:
    """Timings (time.perf_counter seconds) and outcome of one streamed request."""

    start: float
    chunk_times: list[float] = field(default_factory=list)  # arrival of each content chunk
    end: float | None = None
    usage_tokens: int | None = None  # completion_tokens of the final usage chunk, if sent
    error: str | None = None

    @property
    def first_token(self) -> float | None:
        return self.chunk_times[0] if self.chunk_times else None

    @property
    def output_tokens(self) -> int:
        """Usage's completion tokens; without usage, one token per content chunk."""
        return self.usage_tokens if self.usage_tokens is not None else len(self.chunk_times)


@dataclass
class LevelResult:
    """What one concurrency level measured; seconds unless named otherwise."""

    concurrency: int
    requests: int
    errors: int
    wall_s: float
    output_tokens: int
    tokens_per_request: float  # mean; shows whether the server honoured ignore_eos
    aggregate_tok_s: float
    request_tok_s_p50: float
    ttft_p50: float
    ttft_p99: float
    itl_p50: float
    itl_p99: float
    host_load_1m: float  # at the level's end, server and client included: shows other work
    error_samples: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- statistics


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linearly interpolated; NaN if there are no values."""
    return float(np.percentile(values, q)) if values else math.nan


def inter_token_latencies(record: RequestRecord) -> list[float]:
    """Gaps between successive content chunks, per token.

    A server may put several tokens in one chunk; dividing each gap by the
    mean tokens per chunk (usage tokens / content chunks) keeps the figure a
    per-token latency either way.
    """
    times = record.chunk_times
    if len(times) < 2:
        return []
    tokens_per_chunk = record.output_tokens / len(times)
    return [(later - earlier) / tokens_per_chunk for earlier, later in itertools.pairwise(times)]


def request_rate(record: RequestRecord) -> float | None:
    """Output tok/s of one request after its first token; None when it is undefined."""
    if record.first_token is None or record.end is None or record.end <= record.first_token:
        return None
    return record.output_tokens / (record.end - record.first_token)


def summarize(concurrency: int, records: list[RequestRecord], wall_s: float) -> LevelResult:
    """Aggregate one level; failed requests count only as errors."""
    good = [r for r in records if r.error is None]
    tokens = sum(r.output_tokens for r in good)
    ttfts = [r.first_token - r.start for r in good if r.first_token is not None]
    itls = [gap for r in good for gap in inter_token_latencies(r)]
    rates = [rate for r in good if (rate := request_rate(r)) is not None]
    return LevelResult(
        concurrency=concurrency,
        requests=len(records),
        errors=len(records) - len(good),
        wall_s=wall_s,
        output_tokens=tokens,
        tokens_per_request=tokens / len(good) if good else math.nan,
        aggregate_tok_s=tokens / wall_s if wall_s > 0 else math.nan,
        request_tok_s_p50=statistics.median(rates) if rates else math.nan,
        ttft_p50=percentile(ttfts, 50),
        ttft_p99=percentile(ttfts, 99),
        itl_p50=percentile(itls, 50),
        itl_p99=percentile(itls, 99),
        host_load_1m=os.getloadavg()[0],
        error_samples=sorted({r.error for r in records if r.error})[:5],
    )


# ---------------------------------------------------------------- traffic


@dataclass
class LoadConfig:
    """What every request of a run sends."""

    model: str
    max_tokens: int


async def stream_one(client: openai.AsyncOpenAI, config: LoadConfig, prompt: str) -> RequestRecord:
    """Send one streamed request and time its content chunks; never raises."""
    record = RequestRecord(start=time.perf_counter())
    try:
        stream = await client.chat.completions.create(
            model=config.model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=config.max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            # Not in OpenAI's API, but vLLM, llama.cpp and jaxchat honour it: a fixed
            # output length makes servers comparable whatever the model would say.
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            if chunk.usage is not None:
                record.usage_tokens = chunk.usage.completion_tokens
            if any(choice.delta.content for choice in chunk.choices):
                record.chunk_times.append(time.perf_counter())
    except Exception as exc:  # any failure is a data point, not a crash
        cause = f" ({exc.__cause__!r})" if exc.__cause__ else ""
        record.error = f"{type(exc).__name__}: {exc}{cause}"[:300]
    record.end = time.perf_counter()
    return record


async def run_level(
    client: openai.AsyncOpenAI, config: LoadConfig, concurrency: int, requests: int
) -> LevelResult:
    """Send `requests` requests from `concurrency` workers, each looping over its share."""
    records: list[RequestRecord] = []

    async def worker(first: int) -> None:
        for index in range(first, requests, concurrency):
            records.append(await stream_one(client, config, PROMPTS[index % len(PROMPTS)]))

    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(min(concurrency, requests))))
    return summarize(concurrency, records, time.perf_counter() - start)


async def resolve_model(client: openai.AsyncOpenAI, model: str | None) -> str:
    """The given model id, or else the first one the server lists."""
    if model:
        return model
    listing = await client.models.list()
    if not listing.data:
        raise RuntimeError("the server lists no models; pass --model")
    return listing.data[0].id


def make_client(base_url: str, api_key: str, timeout: float) -> openai.AsyncOpenAI:
    """The SDK's async client, set up so that only the server is measured.

    No retries: a failed request must show up as an error, not as a slow success.
    No keep-alive: a pooled connection that sat idle (while a level drained) can be
    closed by the server just as it is reused, failing a request for the client's
    sake; a fresh loopback connection per request costs well under a millisecond.
    """
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    return openai.AsyncOpenAI(
        base_url=base_url,
        api_key=api_key,
        max_retries=0,
        timeout=timeout,
        http_client=openai.DefaultAsyncHttpxClient(limits=limits, timeout=timeout),
    )


async def run_benchmark(args: argparse.Namespace) -> tuple[str, list[LevelResult]]:
    """Warm up once (not counted), then run every level in order; return the model id too."""
    client = make_client(args.base_url, args.api_key, args.timeout)
    async with client:
        config = LoadConfig(await resolve_model(client, args.model), args.max_tokens)
        warmup = await stream_one(client, config, PROMPTS[0])
        if warmup.error:
            raise RuntimeError(f"warm-up request failed: {warmup.error}")
        results = []
        for concurrency in args.concurrency:
            requests = args.requests_per_level or max(4, 2 * concurrency)
            result = await run_level(client, config, concurrency, requests)
            print_row(result)
            results.append(result)
        return config.model, results


# ---------------------------------------------------------------- reporting

COLUMNS = [
    ("conc", 5, "concurrency", "d"),
    ("reqs", 5, "requests", "d"),
    ("errs", 5, "errors", "d"),
    ("tok/req", 8, "tokens_per_request", ".1f"),
    ("agg tok/s", 10, "aggregate_tok_s", ".1f"),
    ("req tok/s", 10, "request_tok_s_p50", ".1f"),
    ("TTFT p50", 9, "ttft_p50", ".3f"),
    ("TTFT p99", 9, "ttft_p99", ".3f"),
    ("ITL p50", 9, "itl_p50", ".4f"),
    ("ITL p99", 9, "itl_p99", ".4f"),
    ("load", 5, "host_load_1m", ".1f"),
]


def print_header() -> None:
    print(" ".join(f"{title:>{width}}" for title, width, _, _ in COLUMNS) + "   (times in s)")


def print_row(result: LevelResult) -> None:
    cells = [f"{getattr(result, name):>{width}{fmt}}" for _, width, name, fmt in COLUMNS]
    print(" ".join(cells), flush=True)
    for sample in result.error_samples:
        print(f"      error: {sample}", flush=True)


def without_nan(row: dict) -> dict:
    """NaN (a statistic of no samples) as null, since JSON has no NaN."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


def parse_levels(text: str) -> list[int]:
    levels = [int(part) for part in text.split(",") if part.strip()]
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be positive integers")
    return levels


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    parser.add_argument("--model", default=None, help="model id; default: the first listed")
    parser.add_argument("--api-key", default="unused")
    parser.add_argument("--concurrency", type=parse_levels, default=[1, 8, 32, 64])
    parser.add_argument(
        "--requests-per-level", type=int, default=None, help="default: max(4, 2 x concurrency)"
    )
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=1800.0, help="per request, seconds")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(f"{args.base_url}: max_tokens={args.max_tokens}, levels {args.concurrency}")
    print_header()
    model, results = asyncio.run(run_benchmark(args))
    if args.json:
        report = {
            "base_url": args.base_url,
            "model": model,
            "max_tokens": args.max_tokens,
            "levels": [without_nan(asdict(result)) for result in results],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
