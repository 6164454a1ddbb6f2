"""A real Cloud Storage emulator process (gcp-storage-emulator) for the gs:// tests."""

import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest

from tests.server_process import free_port


def wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the emulator exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"the emulator at {url} did not answer in {timeout} s")


@pytest.fixture(scope="module")
def emulator() -> Iterator[str]:
    """A gcp-storage-emulator process on a free port, in memory; STORAGE_EMULATOR_HOST set."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--in-memory", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_up(url + "/", proc)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("STORAGE_EMULATOR_HOST", url)
            yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
