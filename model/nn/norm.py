"""RMSNorm's arithmetic, in XLA or through jaxchat's CPU kernel (model/kernels/norm.cc)."""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# The XLA custom-call target of jaxchat's CPU RMSNorm (model/kernels/norm.cc): each token's
# norm the same to the bit whatever the step's shape, its real tokens alone.
RMS_NORM_TARGET = "jaxchat_rms_norm"


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, dtype, used=None) -> jax.Array:
    """x normalised over its feature axis, axis 0 of [D, ...], times scale [D], as `dtype`.
    With `used`, x [D, T] goes through the kernel: its first `used` columns, the rest zero."""
    if used is not None:
        call = jax.ffi.ffi_call(RMS_NORM_TARGET, jax.ShapeDtypeStruct(x.shape, jnp.float32))
        columns = jnp.asarray(used, jnp.int32)
        out = call(x.astype(jnp.float32), scale.astype(jnp.float32), columns, eps=np.float32(eps))
        return out.astype(dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=0, keepdims=True) + eps)
    scale = scale.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
    return (normed * scale).astype(dtype)
