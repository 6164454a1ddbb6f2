"""model/nn/pytree.py and model/nn/params.py stand in for flax.struct and
flax.traverse_util (so that a restart need not import Flax): they behave as Flax's do."""

import pickle

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from model.nn.params import flatten_dict, unflatten_dict
from model.nn.pytree import PyTreeNode, static_field
from model.nn.quantize import BlockWeight
from model.nn.transformer import param_shapes
from tests.tiny_models import TINY_LLAMA


class Ours(PyTreeNode):
    values: jax.Array
    scale: jax.Array
    kind: int = static_field()


@flax.struct.dataclass
class Theirs:
    values: jax.Array
    scale: jax.Array
    kind: int = flax.struct.field(pytree_node=False)


def test_a_node_flattens_as_a_flax_struct_does():
    ours, theirs = Ours(jnp.ones(3), jnp.zeros(1), 7), Theirs(jnp.ones(3), jnp.zeros(1), 7)
    assert [x.tolist() for x in jax.tree.leaves(ours)] == [[1.0] * 3, [0.0]]
    assert jax.tree.structure(ours).num_leaves == jax.tree.structure(theirs).num_leaves == 2
    assert jax.tree.structure(ours) != jax.tree.structure(Ours(jnp.ones(3), jnp.zeros(1), 8))
    changed = ours.replace(scale=jnp.full(1, 2.0))
    assert changed.kind == 7 and float(changed.scale[0]) == 2.0 and float(ours.scale[0]) == 0
    with pytest.raises(AttributeError):  # frozen
        ours.kind = 1  # type: ignore[misc]
    doubled = jax.jit(lambda n: n.replace(values=n.values * n.kind))(ours)
    assert doubled.values.tolist() == [7.0] * 3 and doubled.kind == 7
    # The executable store pickles a step's input and output trees.
    tree = jax.tree.structure(ours)
    assert pickle.loads(pickle.dumps(tree)) == tree


def test_flat_parameter_trees_are_flax_traverse_utils():
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), param_shapes(TINY_LLAMA))
    params["blocks"] = {"lm_head": BlockWeight(np.zeros((4, 18), np.uint8), 2), "empty": {}}
    for sep in (None, "/"):
        flat = flatten_dict(params, sep=sep)
        assert list(flat) == list(traverse_util.flatten_dict(params, sep=sep))
        assert all(flat[k] is v for k, v in traverse_util.flatten_dict(params, sep=sep).items())
        again = unflatten_dict(flat, sep=sep)
        assert jax.tree.structure(again) == jax.tree.structure(
            traverse_util.unflatten_dict(flat, sep=sep)
        )
        assert "empty" not in again["blocks"]  # empty dicts drop out, as in Flax
