"""Shared fixtures: the real default model, loaded once per test session (per xdist
worker; `--dist loadfile` keeps each module on one worker)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).parent.parent

# One compile cache for every engine the tests start with the same settings (the `llm`
# fixture, the e2e server, scripts), in this process and in the processes it starts, so
# each set of executables is compiled once per run. Keys cover the source and the JAX
# build, so a cache kept from an earlier run never hands out a stale executable. Tests
# about the cache itself pass their own.
os.environ.setdefault("JAXCHAT_COMPILE_CACHE", str(REPO / ".cache" / "test-compile"))

# XLA compiles the tests' programs at optimization level 0, here and in the processes the
# tests start (the flags are part of both compile caches' keys). The tests check what the
# programs compute, and XLA:CPU computes the same at either level (no fast math: LLVM may
# not reorder a float sum at any level); the server and the benchmarks run at the default.
# From empty caches, on 2 cores: 237 s of the suite's backend compiles at the default level
# against 162 here; the whole suite 533-538 s against 497-500 (alternating runs).
OPT_LEVEL = "--xla_backend_optimization_level=0"
if OPT_LEVEL not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {OPT_LEVEL}".strip()

# The e2e server process, shared by the e2e modules (started on first use).
# A Cloud Storage emulator process, per module that uses it.
# The functions-framework app over a fake engine (`serve`), for the handler's tests.
from tests.fake_model import serve  # noqa: E402, F401
from tests.gcs_emulator import emulator  # noqa: E402, F401
from tests.server_process import base_url, client  # noqa: E402, F401


@pytest.fixture(scope="session")
def golden() -> dict:
    """Reference outputs from HF transformers (tests/reference/make_golden.py)."""
    return json.loads((FIXTURES / "smollm2_golden.json").read_text())


@pytest.fixture(scope="session")
def golden_logits() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "smollm2_logits.npz") as data:
        return dict(data)


@pytest.fixture(scope="session")
def llm():
    """The bundled SmolLM2-135M-Instruct, float32, a 512-token context, 8 decode slots
    (the e2e server's settings, so the two share their executables)."""
    from model import LLM

    return LLM(
        max_seq_len=512, batch=8, dtype="float32", compile_cache=os.environ["JAXCHAT_COMPILE_CACHE"]
    )


# The slowest modules first (timed from a clean clone), so the two xdist workers, which
# `--dist loadfile` hands whole modules in collection order (`--no-loadscope-reorder`:
# xdist otherwise puts the modules with the most tests first, the quick unit tests),
# finish together rather than one waiting on a long module picked up late. The first e2e
# module's server fills the compile cache while the other worker runs the mesh tests, so
# the next server (or `llm`) loads its executables instead of compiling them again. The
# rest keep their order.
SLOW_FIRST = (
    "test_openai_surface.py",
    "test_mesh.py",
    "test_qmatmul.py",
    "test_limits_e2e.py",
    "test_compile_cache.py",
    "test_checkpoint.py",
    "test_cache_keys.py",
    "test_speculative.py",
    "test_transformer.py",
    "test_sharding.py",
    "test_batching.py",
    "test_request_fuzz.py",
    "test_server_e2e.py",
    "test_llm.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(params=["own", "other"])
def vectors(request):
    """The CPU kernels' f32 loops at the width this CPU picks, then at the other one
    (vectors of 8 where it picks 16, and the reverse: each runs on any CPU with AVX2), so
    that the tests that hold the products, SwiGLU, the norms and attention to their
    references cover both widths whichever CPU runs the suite."""
    from model import kernels

    own = kernels.wide_vectors()
    kernels.set_wide_vectors(own if request.param == "own" else not own)
    yield
    kernels.set_wide_vectors(own)


@pytest.fixture
def make():
    """Build schedulers (model/engine/scheduler.py) that are stopped after the test."""
    from model.engine.scheduler import Scheduler

    schedulers = []

    def build(engine, **kwargs):
        scheduler = Scheduler(engine, **kwargs)
        schedulers.append(scheduler)
        return scheduler

    yield build
    for scheduler in schedulers:
        scheduler.stop()
