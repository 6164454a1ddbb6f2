"""JAXCHAT_COMPILE_CACHE: a warm restart compiles nothing and reads no GGUF, from a local
directory or from a gs:// cache shared through a real Cloud Storage emulator.

Each run is a fresh process (what a restart is) that serves one greedy request, counts
XLA backend compilations and GGUF parses, and reports them; the reply must equal the HF
reference's greedy tokens every time, so a wrong executable cannot pass.
"""

import json
import os
import shutil

import pytest
from google.cloud import storage

from tests.server_process import run_python_report

BUCKET = "compile-cache"

RUN = """
import json, sys
import gguf
from jax import monitoring
from model import LLM, SamplingParams

backend_compiles = []
monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **_: backend_compiles.append(event)
    if event == "/jax/core/compile/backend_compile_duration" else None
)
gguf_opened = []
open_gguf = gguf.GGUFReader.__init__
gguf.GGUFReader.__init__ = lambda self, *a, **k: gguf_opened.append(1) or open_gguf(self, *a, **k)

llm = LLM(max_seq_len=256, batch=2, compile_cache=sys.argv[1])
llm.warmup()
reply = llm.generate(json.loads(sys.argv[2]), SamplingParams(temperature=0, max_tokens=12))
print(json.dumps({
    "compiled": llm.engine.compilations,
    "loaded": llm.engine.loaded,
    "variants": len(llm.engine.variants.names) + len(llm.engine.variants.upgrades),
    "backend_compiles": len(backend_compiles),
    "gguf_opened": len(gguf_opened),
    "ids": list(reply.token_ids),
}))
"""


def run(cache: str, prompt: dict, download_dir) -> dict:
    """One process start with the compile cache `cache`; its report."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["JAXCHAT_CACHE_DIR"] = str(download_dir)
    report = run_python_report(["-c", RUN, cache, json.dumps(prompt["ids"])], env)
    assert report["ids"] == prompt["greedy"][: len(report["ids"])], "not the reference reply"
    return report


@pytest.fixture(scope="module")
def prompt(golden) -> dict:
    return golden["prompts"][0]


@pytest.fixture(scope="module")
def cold(emulator, prompt, tmp_path_factory):
    """The first start of the first instance: gs:// cache and local mirror both empty."""
    storage.Client().create_bucket(BUCKET)
    mirror = tmp_path_factory.mktemp("instance-a")
    return run(f"gs://{BUCKET}/smollm2", prompt, mirror), mirror


def executable_blobs() -> list[str]:
    blobs = storage.Client().bucket(BUCKET).list_blobs(prefix="smollm2/")
    return sorted(blob.name for blob in blobs)


def test_a_cold_start_compiles_every_variant_and_shares_it(cold):
    report, _ = cold
    assert report["compiled"] == report["variants"] >= 6
    assert report["loaded"] == 0 and report["gguf_opened"] == 1
    names = executable_blobs()
    assert len(names) == report["variants"]
    assert all(name.startswith("smollm2/executables/") for name in names)  # no model copy


def test_a_restart_compiles_nothing_and_reads_no_gguf(cold, prompt):
    _, mirror = cold
    warm = run(f"gs://{BUCKET}/smollm2", prompt, mirror)
    assert warm["compiled"] == warm["backend_compiles"] == 0
    assert warm["loaded"] == warm["variants"]
    assert warm["gguf_opened"] == 0  # the prepared copy was read instead


def test_a_new_instance_loads_the_executables_from_cloud_storage(cold, prompt, tmp_path):
    warm = run(f"gs://{BUCKET}/smollm2", prompt, tmp_path)  # an empty mirror
    assert warm["compiled"] == warm["backend_compiles"] == 0
    assert warm["loaded"] == warm["variants"]
    assert warm["gguf_opened"] == 1  # the model copy is not shared: prepared locally
    assert executable_blobs() == sorted(
        f"smollm2/{p.relative_to(tmp_path / 'compile' / BUCKET / 'smollm2').as_posix()}"
        for p in (tmp_path / "compile" / BUCKET / "smollm2" / "executables").rglob("*.xla")
    )


def test_a_local_directory_cache_with_a_damaged_entry_recompiles_only_that(cold, prompt, tmp_path):
    _, mirror = cold
    local = tmp_path / "cache"
    shutil.copytree(mirror / "compile" / BUCKET / "smollm2", local)
    damaged = sorted(local.glob("executables/*/step-*.xla"))[0]
    damaged.write_bytes(damaged.read_bytes()[:1000])
    warm = run(str(local), prompt, mirror)  # the prepared model copy is in the downloads
    assert warm["compiled"] == warm["backend_compiles"] == 1
    assert warm["loaded"] == warm["variants"] - 1
    assert warm["gguf_opened"] == 0
    assert len(damaged.read_bytes()) > 1000  # replaced by the recompiled variant
