"""`make bench`'s load run: start jaxchat's real server, run benchmarks.load against it, stop it.

Starts `functions-framework --target=app --source=main.py` on a free loopback
port (at default settings, with the repo's JAX compilation cache unless the
environment says otherwise), waits for GET /health == 200 and then for
/metrics' `jaxchat:executables_pending` to reach 0 (the steps a server loads or
compiles in the background after it turns healthy: measured while they compile,
a lone stream's inter-token p99 was 0.35 s), then runs the load levels. How long
a cold server takes to its first token is benchmarks/cold_start.py's. Every
option it does not know is passed on to benchmarks.load. With --cases it then
runs benchmarks.serving_cases against the same server, its resident memory
included.

The server runs at a lower CPU priority than the load generator (`nice`
SERVER_NICE, BENCH_SERVER_NICE overrides it; llamacpp_peer.sh does the same for
llama.cpp's server). The two share the machine's cores, where a client of a real
deployment has its own: at the same priority, on 2 cores, a chunk reached the
client 13-28 ms (p99) after the server wrote it, waiting for a core behind the
server's compute threads, so the inter-token tails measured the client's waits.

    python -m benchmarks.serve_and_load --concurrency 1,8,32,64 --max-tokens 128 --cases
"""

import argparse
import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import load, serving_cases

ROOT = Path(__file__).resolve().parent.parent
SERVER_NICE = int(os.environ.get("BENCH_SERVER_NICE", "5"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(port: int, max_seq_len: int | None = None) -> dict[str, str]:
    """The environment for the server: the caller's, plus defaults it did not set."""
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".cache" / "jax"))
    if max_seq_len is not None:
        env.setdefault("JAXCHAT_MAX_SEQ_LEN", str(max_seq_len))
    env["PORT"] = str(port)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def health_status(port: int) -> int | None:
    """GET /health's status, or None while nothing listens."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/health")
        return conn.getresponse().status
    except OSError:
        return None


def niced(command: list[str], nice: int) -> list[str]:
    """`command` run at CPU priority `nice` (coreutils' nice execs it: the same pid)."""
    return ["nice", "-n", str(nice), *command] if nice else command


def start_server(port: int, env: dict[str, str], log: Path, nice: int = 0) -> subprocess.Popen:
    """`functions-framework --source=main.py` on 127.0.0.1:port at priority `nice`, output
    to `log`."""
    command = [
        sys.executable,
        "-m",
        "functions_framework",
        "--target=app",
        "--source=main.py",
        f"--port={port}",
        "--host=127.0.0.1",
    ]
    with log.open("wb") as sink:
        return subprocess.Popen(
            niced(command, nice),
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so `stop` can kill the master and its workers
        )


def wait_healthy(
    port: int, proc: subprocess.Popen, timeout: float, log: Path, poll: float = 1.0
) -> None:
    """Poll /health until 200; fail with the log's tail if the server dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{tail(log)}")
        if health_status(port) == 200:
            return
        time.sleep(poll)
    raise TimeoutError(f"server not healthy after {timeout:.0f} s:\n{tail(log)}")


def pending_executables(port: int) -> float | None:
    """/metrics' jaxchat:executables_pending, or None if it is not there."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/metrics")
    for line in conn.getresponse().read().decode().splitlines():
        if line.startswith("jaxchat:executables_pending "):
            return float(line.split()[1])
    return None


def wait_settled(port: int, timeout: float, poll: float = 1.0) -> None:
    """Wait until the server has every executable in memory (at most `timeout` s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pending_executables(port):
            return
        time.sleep(poll)
    print(f"executables still pending after {timeout:.0f} s; measuring anyway", flush=True)


def tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:]


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (gunicorn's master stops its workers), then SIGKILL to the process group
    of a server started in its own session if it lingers."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-seq-len", type=int, default=None, help="default: the model's")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds")
    parser.add_argument("--cases", action="store_true", help="then benchmarks.serving_cases")
    args, load_args = parser.parse_known_args(argv)

    port = free_port()
    # JAXCHAT_API_KEYS, if set, is inherited by the server: use its first key.
    api_key = os.environ.get("JAXCHAT_API_KEYS", "").split(",")[0].strip() or "unused"
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        proc = start_server(port, server_env(port, args.max_seq_len), log, SERVER_NICE)
        try:
            started = time.monotonic()
            wait_healthy(port, proc, args.startup_timeout, log)
            print(f"jaxchat healthy after {time.monotonic() - started:.1f} s", flush=True)
            wait_settled(port, args.startup_timeout)
            print(
                f"every executable in memory after {time.monotonic() - started:.1f} s",
                flush=True,
            )
            base = ["--base-url", f"http://127.0.0.1:{port}/v1", "--api-key", api_key]
            # load_args come last, so an explicit --base-url or --api-key still wins;
            # with no --model, load asks /v1/models (JAXCHAT_MODEL_NAME may rename it).
            status = load.main(base + load_args)
            if args.cases:
                status = status or serving_cases.main(base + ["--pid", str(proc.pid)])
            return status
        finally:
            stop(proc)


if __name__ == "__main__":
    sys.exit(main())
