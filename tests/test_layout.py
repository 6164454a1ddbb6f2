"""The tree's layout holds: imports run one way between model/'s rooms, and the parts
that must not load JAX do not.

model/ has four rooms (README "Layout"): text <- weights <- engine <- llm, with nn
used by weights and engine; types.py and limits.py are plain data and checks that
any part may use. The static test reads every import statement (module level,
inside functions and under TYPE_CHECKING alike); the process tests import a part in
a fresh interpreter and look at what got loaded.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server_process import REPO

# Which project packages each part may import (itself included).
ALLOWED = {
    "model.types": {"model.types"},
    "model.limits": {"model.limits", "model.types"},
    "model.text": {"model.text", "model.types"},
    "model.nn": {"model.nn"},
    "model.kernels": {"model.kernels", "model.nn"},
    "model.weights": {"model.weights", "model.text", "model.nn", "model.types", "sharding"},
    "model.engine": {
        "model.engine",
        "model.weights",
        "model.kernels",
        "model.nn",
        "model.types",
        "model.limits",
        "sharding",
    },
    "model.llm": {"model", "sharding"},
    "model": {"model"},  # model/__init__.py: lazy re-exports only
    "sharding": {"sharding"},
    "handler": {"handler", "model"},
}
# nn is the network and nothing else: no files, no network, no processes.
NN_MAY_IMPORT = {"math", "re", "dataclasses", "typing", "functools", "collections", "jax"}
NN_MAY_IMPORT |= {"flax", "numpy", "model"}


def modules() -> list[tuple[str, Path]]:
    """(dotted name, file) of every module in model/, sharding/ and handler/."""
    found = []
    for package in ("model", "sharding", "handler"):
        for file in sorted((REPO / package).rglob("*.py")):
            parts = file.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found.append((name, file))
    return found


def imported(file: Path) -> set[str]:
    """Every module name an import statement in `file` names, at any depth."""
    names = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            # `from model import LLM` names model; `from model.weights import gcs` a module.
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def part_of(name: str) -> str:
    """The entry of ALLOWED that a module belongs to (its longest matching prefix)."""
    return max((p for p in ALLOWED if name == p or name.startswith(p + ".")), key=len)


def used_parts(file: Path) -> set[str]:
    """The parts of the project that `file` imports. A name resolves to the longest
    prefix that is a module of the tree (`from model import LLM` → model)."""
    ours = {name for name, _ in modules()}
    used = set()
    for name in imported(file):
        if name.split(".")[0] in ("model", "sharding", "handler"):
            module = max((m for m in ours if name == m or name.startswith(m + ".")), key=len)
            used.add(part_of(module))
    return used


def wrong_imports(name: str, file: Path) -> list[str]:
    allowed = ALLOWED[part_of(name)]
    return sorted(
        f"{name} imports {used}"
        for used in used_parts(file)
        if not any(used == a or used.startswith(a + ".") for a in allowed)
    )


def test_each_part_imports_only_what_it_may():
    assert [w for name, file in modules() for w in wrong_imports(name, file)] == []


def test_the_rules_catch_a_wrong_way_import(tmp_path):
    """The static test can fail: a text module importing weights, or sharding importing
    the model, is caught."""
    bad = REPO / "model" / "text" / "tokenizer.py"
    copy = tmp_path / "tokenizer.py"
    copy.write_text(bad.read_text() + "\nfrom model.weights.gguf import read_metadata\n")
    assert used_parts(copy) >= {"model.weights"}
    copy.write_text("from model.nn.config import ModelConfig\n")
    assert wrong_imports("model.text.tokenizer", copy) != []
    assert wrong_imports("sharding.mesh", copy) != []
    assert wrong_imports("model.weights.gguf", copy) == []


def test_nn_does_no_io():
    for name, file in modules():
        if part_of(name) != "model.nn":
            continue
        tree = ast.parse(file.read_text())
        roots = {n.split(".")[0] for n in imported(file)}
        assert roots <= NN_MAY_IMPORT, f"{name} imports {roots - NN_MAY_IMPORT}"
        calls = {
            node.func.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        }
        assert not calls & {"open", "print", "input", "exec", "eval"}, name


def loaded_after(statement: str) -> list[str]:
    """The top-level packages and project modules loaded by `statement` in a fresh
    interpreter."""
    code = (
        f"import json, sys\n{statement}\n"
        "print(json.dumps(sorted({m if m.split('.')[0] in ('model', 'sharding') "
        "else m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


@pytest.mark.parametrize(
    "statement, absent",
    [
        # The server's master imports this before it forks: nothing a request can do
        # without, from libraries whose import alone costs tens of milliseconds.
        (
            "import handler.app",
            ["jax", "flax", "jaxlib", "pydantic_settings", "sentencepiece", "gguf", "tqdm"],
        ),
        # What a restart from the prepared copy imports: not the GGUF reader, Orbax,
        # the Cloud Storage client's helpers or Flax (only tracing a step needs it).
        (
            "from model.llm import LLM",
            ["gguf", "model.weights.gguf", "orbax", "tqdm", "google_crc32c", "flax"],
        ),
        ("import model", ["jax", "flax", "model.llm", "model.engine"]),
        (
            "import model.text.tokenizer, model.text.chat_template, model.text.stream, "
            "model.text.tool_calls, model.text.grammar",
            ["jax", "flax", "model.weights", "model.engine", "model.nn"],
        ),
        ("import sharding", ["model"]),
        ("import model.limits", ["jax", "flax", "model.llm"]),
    ],
    ids=["handler.app", "llm", "model", "text", "sharding", "limits"],
)
def test_light_parts_load_nothing_heavy(statement, absent):
    loaded = loaded_after(statement)
    for module in absent:
        assert not any(m == module or m.startswith(module + ".") for m in loaded), module


def test_the_model_package_loads_its_names_on_use():
    loaded = loaded_after("from model import LLM")
    assert "model.llm" in loaded and "jax" in loaded


def test_no_module_over_400_lines_nor_class_over_250():
    """A module is one concept a reader takes in at once (README "Layout")."""
    too_long = []
    for name, file in modules():
        source = file.read_text()
        if len(source.splitlines()) > 400:
            too_long.append(f"{name}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno >= 250:
                too_long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert too_long == []
