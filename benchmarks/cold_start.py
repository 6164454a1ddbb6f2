"""Cold start of the real server: process start → /health 200 → first streamed token.

Starts `functions-framework --source=main.py` on a free loopback port twice:
with an empty JAXCHAT_COMPILE_CACHE (cold), then with the cache the first run
filled (warm: the engine's executables and the prepared model copy). Speaks only
HTTP, so it measures what a Cloud Run user feels.

    python -m benchmarks.cold_start [--max-seq-len 2048]
"""

import argparse
import http.client
import json
import tempfile
import time
from pathlib import Path

from benchmarks.serve_and_load import free_port, server_env, start_server, stop, wait_healthy


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


def run_once(cache_dir: str, max_seq_len: int) -> tuple[float, float]:
    """(seconds to /health 200, seconds to the first streamed token), from process start."""
    port = free_port()
    env = server_env(port, max_seq_len) | {
        "JAXCHAT_COMPILE_CACHE": cache_dir,
        "JAXCHAT_CACHE_DIR": str(Path(cache_dir) / "downloads"),
    }
    env.pop("JAX_COMPILATION_CACHE_DIR")  # only jaxchat's cache: nothing else warm
    log = Path(cache_dir) / f"server-{port}.log"
    start = time.monotonic()
    proc = start_server(port, env, log)
    try:
        wait_healthy(port, proc, timeout=900, log=log, poll=0.05)
        healthy = time.monotonic() - start
        first_token(port)
        return healthy, time.monotonic() - start
    finally:
        stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-seq-len", type=int, default=2048)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache_dir:
        for label in ("cold cache", "warm cache"):
            healthy, token = run_once(cache_dir, args.max_seq_len)
            print(f"{label}: start → /health 200 {healthy:6.1f} s, → first token {token:6.1f} s")


if __name__ == "__main__":
    main()
