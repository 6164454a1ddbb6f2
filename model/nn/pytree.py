"""Frozen dataclasses that are JAX pytrees.

`PyTreeNode` is what `flax.struct.PyTreeNode` is (a frozen dataclass whose fields are
the pytree's children, `static_field`s its static metadata, `replace` a copy with some
fields changed), registered with JAX itself: importing Flax costs a serving process
about 0.4 s of start-up on a 2-core CPU, and a restart that loads its executables from
the store traces nothing, so the engine's types do not import it (only the Flax modules
of model/nn/transformer.py do, when a step is traced).
"""

import dataclasses
from typing import Any, Self, dataclass_transform

import jax


def static_field(**kwargs: Any) -> Any:
    """A field that is part of the pytree's structure (hashable; a change retraces)."""
    return dataclasses.field(metadata={"static": True}, **kwargs)


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field, static_field))
class PyTreeNode:
    """Base class: every subclass is a frozen dataclass registered as a pytree."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        dataclasses.dataclass(frozen=True)(cls)
        jax.tree_util.register_dataclass(cls)

    def replace(self, **changes: Any) -> Self:
        """A copy with `changes` to its fields."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]
