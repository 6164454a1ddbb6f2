"""JAXCHAT_COMPILE_CACHE: a warm restart compiles nothing (every variant is a cache hit)."""

import json
import os
import subprocess
import sys

from tests.server_process import REPO

WARMUP = """
import json, sys
import jax
from jax import monitoring
from model.compile_cache import enable_compile_cache
from model.llm import LLM

counts = {"hits": 0, "misses": 0}


def count(event, **kwargs):
    kind = event.removeprefix("/jax/compilation_cache/cache_")
    if kind in counts:
        counts[kind] += 1


monitoring.register_event_listener(count)
enable_compile_cache(sys.argv[1])
llm = LLM(max_seq_len=256, batch=2, prefill_buckets=[64])
llm.warmup()
print(json.dumps({**counts, "variants": llm.engine.compilations}))
"""


def warmup(cache_dir) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    result = subprocess.run(
        [sys.executable, "-c", WARMUP, str(cache_dir)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_warm_restart_compiles_nothing(tmp_path):
    cold = warmup(tmp_path / "cache")
    assert cold["variants"] >= 4 and cold["misses"] >= cold["variants"]
    warm = warmup(tmp_path / "cache")
    assert warm["misses"] == 0
    assert warm["hits"] >= warm["variants"] == cold["variants"]
