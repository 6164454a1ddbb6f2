"""Digests of the project's own code, for cache keys that must change with it.

Something cached because computing it is slow (a compiled executable, a
prepared copy of the weights) goes stale as soon as any module that shaped it
changes. `source_digest(*modules)` follows the imports of the given modules
transitively, through every module of this project wherever it lies (any
package, any depth of folders), and hashes each source file it reaches, with
its path. Imports are read from the source (`ast`) and modules found on
disk, so modules imported only inside functions count too, and nothing is
imported to find them.
"""

import ast
import hashlib
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the directory holding the project's packages

# The text of an import statement at any indentation (imports inside functions count):
# `import a, b as c`, `from .a import b`, `from a import (b,\n c)`. Parsing only these,
# not the whole module, makes a server's start 0.2 s quicker; a file they do not parse
# as (a line of a docstring that starts with "import") is parsed whole.
IMPORT = re.compile(
    r"^[ \t]*(import[ \t][^\n]*|from[ \t]+[.\w]+[ \t]+import[ \t]*(\([^)]*\)|[^\n]*))", re.M
)


def source_digest(*modules: str) -> str:
    """A hex digest of the source files `modules` reach through imports (see above)."""
    digest = hashlib.sha256()
    for file in sorted(project_files(*modules)):
        digest.update(file.relative_to(ROOT).as_posix().encode() + b"\0")
        digest.update(file.read_bytes())
    return digest.hexdigest()


def project_files(*modules: str) -> set[Path]:
    """The source files of `modules` and of every project module they import, transitively.

    A parent package's __init__ runs before its submodules, so its file counts; its
    own imports are followed only when something is imported from the package itself.
    """
    files: set[Path] = set()
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        file = _project_file(name)
        if name in seen or file is None:
            continue
        seen.add(name)
        files.add(file)
        files.update(f for parent in _parents(name) if (f := _project_file(parent)) is not None)
        todo.extend(_imports(file))
    return files


@cache
def _project_file(name: str) -> Path | None:
    """The source file of module `name` if it is one of this project's, else None."""
    path = ROOT.joinpath(*name.split("."))
    for file in (path.with_suffix(".py"), path / "__init__.py"):
        if file.is_file():
            return file
    return None


def _imports(file: Path) -> frozenset[str]:
    """The modules whose code `file` uses: for `from a.b import c`, a.b.c if it is a
    module, else a.b (c is defined there). Parsed once per version of the file."""
    stat = file.stat()
    return _imports_of(file, stat.st_mtime_ns, stat.st_size)


@cache
def _imports_of(file: Path, mtime_ns: int, size: int) -> frozenset[str]:
    package = _package_of(file)
    source = file.read_text(encoding="utf-8")  # (the project's sources are UTF-8)
    try:
        tree = ast.parse("\n".join(m[1] for m in IMPORT.finditer(source)), str(file))
    except SyntaxError:
        tree = ast.parse(source, str(file))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module or "", node.level, package)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                names.add(submodule if _project_file(submodule) is not None else base)
    return frozenset(names)


def _package_of(file: Path) -> str:
    parts = file.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts if parts[-1] == "__init__" else parts[:-1]).removesuffix(".__init__")


def _absolute(module: str, level: int, package: str) -> str:
    """The absolute name of a (possibly relative) `from` import."""
    if not level:
        return module
    base = package.split(".")[: len(package.split(".")) - level + 1]
    return ".".join([*base, module] if module else base)


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]
