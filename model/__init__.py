"""jaxchat's model package: the network, generation and the Python API (no HTTP).

`from model import LLM` works as before, but nothing heavy is imported until a
name is used: importing a submodule (or `handler.app`) does not load the engine.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model.llm import LLM
    from model.types import Completion, Delta, SamplingParams

__all__ = ["LLM", "Completion", "Delta", "SamplingParams"]

_HOMES = {
    "LLM": "model.llm",
    "Completion": "model.types",
    "Delta": "model.types",
    "SamplingParams": "model.types",
}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_HOMES[name]), name)
