"""JAXCHAT_COMPILE_CACHE: a warm restart compiles nothing, reads no GGUF and imports
neither Flax nor the GGUF reader, from a local directory or from a gs:// cache shared
through a real Cloud Storage emulator.

Each run is a fresh process (what a restart is) that serves one greedy request from a
tiny Llama GGUF, counts XLA backend compilations and GGUF parses, and reports them; the
reply must be the greedy continuation of one dense forward pass over the same tokens
every time, so a wrong executable cannot pass. (The cache's code is the same for any
model; the real one's executables only take longer to compile.)
"""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from google.cloud import storage

from model.weights.gguf import load_gguf
from tests.server_process import cpu_devices, run_python_report
from tests.tiny_models import TINY_LLAMA, dense_logits, write_tiny_gguf

BUCKET = "compile-cache"

RUN = """
import json, sys
from jax import monitoring
from model import LLM, SamplingParams

backend_compiles = []
monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **_: backend_compiles.append(event)
    if event == "/jax/core/compile/backend_compile_duration" else None
)
gguf_opened = []
sys.addaudithook(
    lambda event, args: gguf_opened.append(1)
    if event == "open" and str(args[0]).endswith(".gguf") else None
)

mesh = sys.argv[4] if len(sys.argv) > 4 else None
llm = LLM(
    sys.argv[3], max_seq_len=256, batch=2, dtype="float32", compile_cache=sys.argv[1], mesh=mesh
)
llm.warmup()
greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
reply = llm.generate(json.loads(sys.argv[2]), greedy)
print(json.dumps({
    "compiled": llm.engine.compilations,
    "loaded": llm.engine.loaded,
    "variants": len(llm.engine.variants.names) + len(llm.engine.variants.upgrades),
    "backend_compiles": len(backend_compiles),
    "gguf_opened": len(gguf_opened),
    "flax": "flax" in sys.modules,
    "gguf_reader": "gguf" in sys.modules or "model.weights.gguf" in sys.modules,
    "ids": list(reply.token_ids),
}))
"""


def run(cache: str, prompt: dict, download_dir, mesh: str | None = None) -> dict:
    """One process start with the compile cache `cache` (on `mesh` of 2 CPU devices, if
    given); its report."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["JAXCHAT_CACHE_DIR"] = str(download_dir)
    args = ["-c", RUN, cache, json.dumps(prompt["ids"]), str(prompt["path"])]
    if mesh:
        env |= cpu_devices(2)
        args.append(mesh)
    report = run_python_report(args, env)
    assert len(report["ids"]) == 12
    assert report["ids"] == prompt["greedy"](report["ids"]), "not the reference reply"
    return report


@pytest.fixture(scope="module")
def prompt(tmp_path_factory) -> dict:
    """A tiny model, a prompt, and its reference: the argmax after each position of one
    dense forward pass (no pool, no scan) over the prompt and a reply."""
    path = write_tiny_gguf(tmp_path_factory.mktemp("tiny"), TINY_LLAMA, seed=21)
    ids = [1, 5, 9, 17, 33, 40, 41, 42, 100, 7]
    _, params, _ = load_gguf(path, jnp.float32)

    def greedy(reply: list[int]) -> list[int]:
        tokens = jnp.asarray([ids + reply], jnp.int32)
        logits = np.asarray(dense_logits(TINY_LLAMA)(params, tokens))[0]
        return [int(t) for t in logits[len(ids) - 1 : -1].argmax(-1)]

    return {"path": path, "ids": ids, "greedy": greedy}


@pytest.fixture(scope="module")
def cold(emulator, prompt, tmp_path_factory):
    """The first start of the first instance: gs:// cache and local mirror both empty."""
    storage.Client().create_bucket(BUCKET)
    mirror = tmp_path_factory.mktemp("instance-a")
    return run(f"gs://{BUCKET}/tiny", prompt, mirror), mirror


def executable_blobs() -> list[str]:
    blobs = storage.Client().bucket(BUCKET).list_blobs(prefix="tiny/")
    return sorted(blob.name for blob in blobs)


def test_a_cold_start_compiles_every_variant_and_shares_it(cold):
    report, _ = cold
    assert report["compiled"] == report["variants"] >= 6
    assert report["loaded"] == 0 and report["gguf_opened"] == 1
    names = executable_blobs()
    assert len(names) == report["variants"]
    assert all(name.startswith("tiny/executables/") for name in names)  # no model copy


def test_a_restart_compiles_nothing_reads_no_gguf_and_imports_no_flax(cold, prompt):
    _, mirror = cold
    warm = run(f"gs://{BUCKET}/tiny", prompt, mirror)
    assert warm["compiled"] == warm["backend_compiles"] == 0
    assert warm["loaded"] == warm["variants"]
    assert warm["gguf_opened"] == 0  # the prepared copy was read instead
    # Only tracing a step needs the Flax modules (model/nn/pytree.py): the cold start
    # imported Flax, the restart, which traces nothing, does not.
    assert cold[0]["flax"] and not warm["flax"]
    # Nor the GGUF reader and the `gguf` package (60 ms of imports): the model's copy,
    # tokenizer and template come from the prepared copy.
    assert cold[0]["gguf_reader"] and not warm["gguf_reader"]


def test_a_new_instance_loads_the_executables_from_cloud_storage(cold, prompt, tmp_path):
    warm = run(f"gs://{BUCKET}/tiny", prompt, tmp_path)  # an empty mirror
    assert warm["compiled"] == warm["backend_compiles"] == 0
    assert warm["loaded"] == warm["variants"]
    assert warm["gguf_opened"] == 1  # the model copy is not shared: prepared locally
    assert executable_blobs() == sorted(
        f"tiny/{p.relative_to(tmp_path / 'compile' / BUCKET / 'tiny').as_posix()}"
        for p in (tmp_path / "compile" / BUCKET / "tiny" / "executables").rglob("*.xla")
    )


def test_a_local_directory_cache_with_a_damaged_entry_recompiles_only_that(cold, prompt, tmp_path):
    _, mirror = cold
    local = tmp_path / "cache"
    shutil.copytree(mirror / "compile" / BUCKET / "tiny", local)
    damaged = sorted(local.glob("executables/*/step-*.xla"))[0]
    damaged.write_bytes(damaged.read_bytes()[:1000])
    warm = run(str(local), prompt, mirror)  # the prepared model copy is in the downloads
    assert warm["compiled"] == warm["backend_compiles"] == 1
    assert warm["loaded"] == warm["variants"] - 1
    assert warm["gguf_opened"] == 0
    assert len(damaged.read_bytes()) > 1000  # replaced by the recompiled variant


def test_a_mesh_on_some_of_the_devices_loads_its_executables_again(prompt, tmp_path):
    """JAXCHAT_MESH=1x1 uses 1 of the 2 devices: its executables load onto that one
    (loaded onto both, XLA aborts the process) and give the same tokens."""
    cache = str(tmp_path / "cache")
    first = run(cache, prompt, tmp_path, mesh="1x1")
    assert first["compiled"] == first["variants"] and first["loaded"] == 0
    again = run(cache, prompt, tmp_path, mesh="1x1")
    assert again["compiled"] == again["backend_compiles"] == 0
    assert again["loaded"] == again["variants"]
