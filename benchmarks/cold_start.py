"""Cold start of the real server: process start → /health 200 → first streamed token.

Starts `functions-framework --source=main.py` on a free loopback port three
times, at default settings: with nothing cached; with the prepared model copy
that the Docker image ships but an empty JAXCHAT_COMPILE_CACHE (what a new
revision or machine type meets); and with both warm, WARM_RUNS times (the median
and range printed: one start swings by 0.3-0.5 s on a noisy 2-core machine). Speaks
only HTTP, so it
measures what a Cloud Run user feels. The executables it counts are the files
the runs stored: the ones a lone short request needs, before /health turns 200,
and the others and the faster decode steps, compiled in the background after it
(each run waits until no new one has come for 15 s, and prints when the last did).

    python -m benchmarks.cold_start [--max-seq-len N]
"""

import argparse
import http.client
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.serve_and_load import free_port, server_env, start_server, stop, wait_healthy

WARM_RUNS = 5


def first_token(port: int) -> None:
    """Send a streamed chat request and return once the first content chunk arrives."""
    body = json.dumps(
        {
            "model": "smollm2-135m-instruct",
            "messages": [{"role": "user", "content": "Say hello."}],
            "stream": True,
            "max_tokens": 16,
            "temperature": 0,
        }
    )
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    while line := response.readline():
        if line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
            return
    raise RuntimeError("stream ended without content")


def run_once(
    cache_dir: str, models_dir: str, max_seq_len: int | None, wait_stored: bool = True
) -> tuple[float, float, float]:
    """(seconds to /health 200, to the first streamed token, to the last executable
    stored, or NaN unless `wait_stored`), from process start."""
    port = free_port()
    env = server_env(port, max_seq_len) | {
        "JAXCHAT_COMPILE_CACHE": cache_dir,
        "JAXCHAT_CACHE_DIR": models_dir,
    }
    env.pop("JAX_COMPILATION_CACHE_DIR")  # only jaxchat's cache: nothing else warm
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    log = Path(cache_dir) / f"server-{port}.log"
    start = time.monotonic()
    proc = start_server(port, env, log)
    try:
        wait_healthy(port, proc, timeout=900, log=log, poll=0.05)
        healthy = time.monotonic() - start
        first_token(port)
        token = time.monotonic() - start
        last = wait_until_stored(Path(cache_dir)) - start if wait_stored else float("nan")
        return healthy, token, last
    finally:
        stop(proc)


def wait_until_stored(cache_dir: Path, quiet: float = 15.0, limit: float = 300.0) -> float:
    """Wait until the server stored no new executable for `quiet` seconds: the steps a
    lone short request does not need, and the faster decode steps, compile in the
    background after /health, as on a long-lived instance. → when the last was stored
    (time.monotonic()), as first seen here."""
    deadline, last, count = time.monotonic() + limit, time.monotonic(), -1
    while time.monotonic() < deadline and time.monotonic() - last < quiet:
        now = len(list(cache_dir.glob("executables/*/*.xla")))
        if now != count:
            count, last = now, time.monotonic()
        time.sleep(1)
    return last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-seq-len", type=int, default=None, help="default: the model's")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = str(Path(tmp) / "models")
        runs = (
            ("nothing cached", Path(tmp) / "a"),
            ("model copy, empty compile cache", Path(tmp) / "b"),
        )
        for label, cache in runs:
            healthy, token, last = run_once(str(cache), models, args.max_seq_len)
            stored = len(list(cache.glob("executables/*/*.xla")))
            print(
                f"{label:32} start → /health 200 {healthy:5.1f} s, → first token {token:5.1f} s"
                f"  ({stored} executables stored, the last {last:5.1f} s after start)"
            )
        warm = [
            run_once(str(Path(tmp) / "b"), models, args.max_seq_len, wait_stored=False)
            for _ in range(WARM_RUNS)
        ]
        healthy, token = (sorted(run[i] for run in warm) for i in (0, 1))
        print(
            f"{'both warm':32} start → /health 200 {statistics.median(healthy):5.2f} s "
            f"({healthy[0]:.2f}-{healthy[-1]:.2f}), → first token "
            f"{statistics.median(token):5.2f} s ({token[0]:.2f}-{token[-1]:.2f}), "
            f"medians of {WARM_RUNS} starts"
        )


if __name__ == "__main__":
    main()
