"""The real server process for end-to-end tests: functions-framework serving the
default model, started once per test session and shared by every e2e module."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from benchmarks.serve_and_load import free_port, stop, wait_healthy

REPO = Path(__file__).resolve().parent.parent


def cpu_devices(count: int) -> dict[str, str]:
    """Environment for a process with `count` fake CPU devices, even on a machine with
    accelerators (XLA's other flags kept: the tests' optimization level, tests/conftest.py)."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"
    return {"XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu"}


EIGHT_DEVICES = cpu_devices(8)  # for multi-device tests
MODEL = "smollm2-135m-instruct"
KEY = "e2e-test-key"
MAX_SEQ_LEN = 512
MAX_BATCH = 8  # the `llm` fixture's too: they share executables
LOAD_TIMEOUT_S = 360


def run_python_report(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 900, cwd: Path = REPO
):
    """Run `python ARGS` in `cwd` (the repository; a fresh process) and return the JSON
    value it printed on its last line; the test fails with its stderr if it exits non-zero."""
    result = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env if env is not None else dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode:
        pytest.fail(f"python {' '.join(args)[:80]} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def running_server(workdir: Path, env: dict[str, str], *, cli: bool = False):
    """Run `functions-framework --target=app --source=main.py` (as `make serve` does), or
    with cli=True `jaxchat serve`, with `env` added; yield its URL."""
    port = free_port()
    log_path = workdir / "server.log"
    bin_dir = REPO / ".venv" / "bin"
    if cli:
        command = [str(bin_dir / "jaxchat"), "serve", "--host=127.0.0.1", f"--port={port}"]
    else:
        command = [str(bin_dir / "functions-framework"), "--target=app", "--source=main.py"]
        command += ["--host=127.0.0.1", f"--port={port}"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so `stop` can kill the master and its workers
        )
    try:
        wait_healthy(port, process, LOAD_TIMEOUT_S, log_path)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)


@pytest.fixture(scope="session")
def base_url(tmp_path_factory):
    env = {
        "JAXCHAT_API_KEYS": f"{KEY},another-key",
        "JAXCHAT_MAX_SEQ_LEN": str(MAX_SEQ_LEN),
        # Fewer slots than the concurrency test's streams, so requests also queue.
        "JAXCHAT_MAX_BATCH": str(MAX_BATCH),
        "JAXCHAT_MODEL_ALIASES": "default,fast",
        # Every request runs the scanned steps (tests/test_golden.py covers the unrolled
        # ones), and nothing compiles while the server idles between tests.
        "JAXCHAT_UNROLLED_DECODE": "off",
    }
    # Started through the `jaxchat serve` command: the e2e tests cover it too.
    with running_server(tmp_path_factory.mktemp("server"), env, cli=True) as url:
        yield url


@pytest.fixture(scope="session")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0, timeout=300)
