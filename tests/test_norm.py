"""The RMSNorm kernel (model/kernels/norm.cc) against NumPy, and its columns' invariance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import kernels
from model.nn.transformer import RMSNorm

pytestmark = pytest.mark.usefixtures("vectors")  # at this CPU's width and the other


@pytest.fixture(scope="module", autouse=True)
def kernel():
    assert kernels.load(), "the kernels are built by `make setup` (python -m model.kernels)"


def norm(x: np.ndarray, scale: np.ndarray, used: int) -> np.ndarray:
    """The kernel's RMSNorm of x [D, T] over its first `used` columns, through the module."""
    module = RMSNorm(1e-5, jnp.float32, kernel=True)
    params = {"params": {"scale": jnp.asarray(scale)}}
    apply = jax.jit(lambda p, x, u: module.apply(p, x, u))
    return np.asarray(apply(params, jnp.asarray(x), jnp.int32(used)))


def test_the_kernel_normalises_each_used_column_and_zeroes_the_rest():
    """Each used column is x / sqrt(mean(x^2) + eps) * scale (float64 reference, features
    of very different sizes); columns past `used` (NaN here) come out zero."""
    rng = np.random.default_rng(3)
    d, t, used = 576, 40, 37
    x = (rng.standard_normal((d, t)) * np.exp(2 * rng.standard_normal((d, 1)))).astype(np.float32)
    x[:, used:] = np.nan
    scale = rng.standard_normal(d).astype(np.float32)
    y = norm(x, scale, used)
    x64 = x[:, :used].astype(np.float64)
    expected = x64 / np.sqrt((x64**2).mean(0) + 1e-5) * scale[:, None]
    np.testing.assert_allclose(y[:, :used], expected, rtol=2e-6, atol=1e-6)
    assert not y[:, used:].any()


def test_a_columns_norm_is_the_same_to_the_bit_in_any_step():
    """A token's norm does not depend on the step's width, on how many columns it uses or
    on where the token sits among them (whole groups of 16 and the last, partial one), as
    XLA's reduction over a step's shape did; so a prompt's activations are the same however
    it was cut into chunks."""
    rng = np.random.default_rng(5)
    d = 576
    x = (rng.standard_normal((d, 100)) * np.exp(rng.standard_normal((d, 1)))).astype(np.float32)
    scale = rng.standard_normal(d).astype(np.float32)
    alone = np.stack([norm(x[:, i : i + 1], scale, 1)[:, 0] for i in range(40)], axis=1)
    for t, used, first in [(100, 100, 0), (72, 40, 0), (64, 17, 23), (8, 5, 35), (3, 3, 37)]:
        y = norm(x[:, first : first + t], scale, used)
        n = min(used, 40 - first)
        assert np.array_equal(y[:, :n], alone[:, first : first + n]), (t, used, first)
