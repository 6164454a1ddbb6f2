"""Cache keys that cannot go stale: an edit to the code that built a cache entry misses it.

Each run is a fresh process (a restart after an upgrade) that imports the project
from a copy of its source tree, which the tests then edit. The edits change what the
code computes, so a stale entry would show in the result, not only in the counts:

- compiled executables (JAXCHAT_COMPILE_CACHE): flipping the sign of the logits, from
  a module in a new nested folder, changes the greedy tokens; changing that module
  alone must compile again and give the tokens back;
- prepared GGUF copies: an edit to config parsing must parse the GGUF again and
  give the edited config.
"""

import inspect
import os
import shutil
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from model.engine.engine import SCAN, Engine
from model.engine.variants import StepShape
from model.nn.transformer import Transformer, param_shapes
from model.weights import source_digest
from model.weights.gguf import config_from_metadata
from model.weights.source_digest import project_files
from tests.server_process import REPO, run_python_report
from tests.tiny_models import TINY_LLAMA, write_tiny_gguf

SERVE_ONE = """
import json, sys
from model import LLM, SamplingParams
from model.weights.gguf import GGUFFile

opened = []
init = GGUFFile.__init__
GGUFFile.__init__ = lambda self, *a, **k: opened.append(1) or init(self, *a, **k)
llm = LLM(sys.argv[1], max_seq_len=32, batch=2, compile_cache=sys.argv[2], unrolled_decode=False)
llm.warmup()
reply = llm.generate([5, 9, 17, 33], SamplingParams(temperature=0, max_tokens=8))
print(json.dumps({
    "compiled": llm.engine.compilations,
    "loaded": llm.engine.loaded,
    "gguf_opened": len(opened),
    "ids": list(reply.token_ids),
}))
"""

PREPARE = """
import json, sys
from pathlib import Path
import jax.numpy as jnp
from model.weights.gguf import GGUFFile
from model.weights.prepared import load_gguf_prepared

opened = []
init = GGUFFile.__init__
GGUFFile.__init__ = lambda self, *a, **k: opened.append(1) or init(self, *a, **k)
config, *_ = load_gguf_prepared(Path(sys.argv[1]), jnp.float32, Path(sys.argv[2]))
print(json.dumps({"gguf_opened": len(opened), "norm_eps": config.norm_eps}))
"""


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    return write_tiny_gguf(root, TINY_LLAMA, seed=11)


@pytest.fixture
def tree(tmp_path) -> Path:
    """A copy of the project's packages, importable on its own."""
    for package in ("model", "sharding"):
        shutil.copytree(
            REPO / package, tmp_path / "src" / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    return tmp_path / "src"


def run(tree: Path, script: str, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["PYTHONPATH"] = str(tree)
    env["JAXCHAT_CACHE_DIR"] = str(tree.parent / "downloads")
    return run_python_report(["-c", script, *args], env, cwd=tree)


def in_copy(tree: Path, obj: object) -> Path:
    """The copy of the source file that defines `obj`."""
    return tree / Path(inspect.getsourcefile(obj)).relative_to(REPO)


def append(file: Path, code: str) -> None:
    file.write_text(file.read_text() + "\n" + textwrap.dedent(code))


def test_an_edit_to_traced_code_in_a_nested_module_compiles_again(tree, tiny_gguf):
    """The logits' sign comes from a module in a new nested folder; editing only that
    module compiles every executable again, and the new ones give other tokens."""
    nested = tree / "model" / "probe" / "flip"
    nested.mkdir(parents=True)
    (nested.parent / "__init__.py").write_text("")
    (nested / "__init__.py").write_text("")
    (nested / "sign.py").write_text("SIGN = 1.0\n")
    append(
        in_copy(tree, Transformer),
        """
        from model.probe.flip import sign as _sign

        _logits = Transformer.logits
        Transformer.logits = lambda self, hidden, used=None: (
            _sign.SIGN * _logits(self, hidden, used)
        )
        """,
    )
    cache = str(tree.parent / "compile")
    first = run(tree, SERVE_ONE, str(tiny_gguf), cache)
    assert first["compiled"] >= 4 and first["loaded"] == 0
    # (That an unchanged tree loads them all again is tests/test_compile_cache.py's.)

    (nested / "sign.py").write_text("SIGN = -1.0\n")  # only the nested module changes
    flipped = run(tree, SERVE_ONE, str(tiny_gguf), cache)
    assert flipped["compiled"] == first["compiled"] and flipped["loaded"] == 0
    assert flipped["ids"] != first["ids"]  # the least likely tokens now; stale: the same


def test_an_edit_to_config_parsing_prepares_the_model_again(tree, tiny_gguf):
    prepared = str(tree.parent / "prepared")
    first = run(tree, PREPARE, str(tiny_gguf), prepared)
    assert first == {"gguf_opened": 1, "norm_eps": pytest.approx(TINY_LLAMA.norm_eps)}
    assert run(tree, PREPARE, str(tiny_gguf), prepared)["gguf_opened"] == 0

    append(
        in_copy(tree, config_from_metadata),
        """
        import dataclasses as _dataclasses

        _parse = config_from_metadata


        def config_from_metadata(meta, **kw):
            return _dataclasses.replace(_parse(meta, **kw), norm_eps=0.125)
        """,
    )
    edited = run(tree, PREPARE, str(tiny_gguf), prepared)
    assert edited == {"gguf_opened": 1, "norm_eps": 0.125}  # a stale copy: 0 and the old eps
    # From then on the new copy is read.
    assert run(tree, PREPARE, str(tiny_gguf), prepared) == {"gguf_opened": 0, "norm_eps": 0.125}


def test_engines_with_and_without_unrolled_steps_share_executables():
    """JAXCHAT_UNROLLED_DECODE=off drops the unrolled decode steps and their copy of the
    weights (on CPU the small shapes are then scanned upgrades), and keeps the key: its
    scanned executables are the other engine's."""
    config = TINY_LLAMA
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), param_shapes(config))
    on = Engine(config, params, max_seq_len=64, batch=8, unrolled=True)
    off = Engine(config, params, max_seq_len=64, batch=8, unrolled=False)
    rows = [size[0] for _, size in on.variants.upgrades]
    assert rows == [StepShape(1, 0), StepShape(8, 0), StepShape(2, 0), StepShape(4, 0)]
    scanned = [("step", (StepShape(2, 0), SCAN)), ("step", (StepShape(4, 0), SCAN))]
    assert list(off.variants.upgrades) == scanned
    assert off.params is None and on.params is not None
    assert on.variants.names == off.variants.names
    assert on.key() == off.key()
    assert Engine(config, params, max_seq_len=64, batch=4).key() != on.key()


def test_the_digest_reaches_every_module_the_engine_uses():
    """The engine's key covers the network, the state and the sharding rules it imports,
    found from the project's root wherever source_digest.py itself lives."""
    files = project_files("model.engine.engine")
    for module in ("model/nn/transformer.py", "model/engine/state.py", "sharding/rules.py"):
        assert REPO / module in files
    assert all(file.is_relative_to(REPO) for file in files)


MODULE = '''"""A module whose imports sit in functions and methods, and span lines.{doc}"""
import os


def f():
    from pkg import b
    from pkg.c import (
        x,
        y,
    )


class K:
    def g(self):
        import pkg.d as dd

        return dd


from . import e
'''


@pytest.mark.parametrize("doc", ["", "\nimport the weights from disk, a line no import parses as"])
def test_imports_are_found_at_any_depth_and_across_lines(tmp_path, monkeypatch, doc):
    """Every import reaches the digest, read from the import lines alone or, where those
    do not parse (a docstring's line starting with "import"), from the whole module."""
    package = tmp_path / "pkg"
    package.mkdir()
    for name in ("__init__", "b", "c", "d", "e"):
        (package / f"{name}.py").write_text("x = y = 1\n")
    (package / "a.py").write_text(MODULE.format(doc=doc))
    monkeypatch.setattr(source_digest, "ROOT", tmp_path)
    source_digest._project_file.cache_clear()
    try:
        found = source_digest._imports(package / "a.py")
        files = project_files("pkg.a")
    finally:
        source_digest._project_file.cache_clear()
    assert found == {"os", "pkg.b", "pkg.c", "pkg.d", "pkg.e"}
    assert files == {package / f"{name}.py" for name in ("__init__", "a", "b", "c", "d", "e")}
