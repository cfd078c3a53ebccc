"""Basic layers: parameters with logical axis names, linear, embedding, RMSNorm.

Every parameter is declared with its logical axis names (`logical_axes` metadata, e.g.
`("embed", "q_lora")`); the sharding rules table maps those names to mesh axes. Model code never
names mesh axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax.model.numerics import fp8_act_quant

INIT_STD = 0.02  # N(0, 0.02) for matrices (HF transformers' initializer_range; architecture.md §11.3)


class Buffer(nnx.Variable):
    """Non-trainable state read by the forward pass: the hash routing table (architecture.md §5.2) and the
    aux-loss-free selection bias (architecture.md §5.4, updated outside the gradient)."""


def param(rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype,
          init: str = "normal") -> nnx.Param:
    """A parameter with logical axis names. init: 'normal' (std 0.02), 'zeros' or 'ones'."""
    assert len(shape) == len(axes), (shape, axes)
    if init == "normal":
        value = INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Param(value.astype(dtype), logical_axes=tuple(axes))


class Linear(nnx.Module):
    """y = x W with W stored [in, out] (the transpose of torch's [out, in]). Products accumulate
    in fp32; the result is cast to `dtype` (the compute dtype unless a caller asks for fp32).

    act_quant (release numerics, architecture.md §10.3; the layers whose released weight is FP8 or FP4):
    x is quantised to FP8 E4M3 in 1x128 blocks with UE8M0 scales first, and the product comes out in
    BF16, as DeepSeek's `fp8_gemm` returns it (x and W are then exact in BF16: the GEMM is exact
    products accumulated in fp32)."""

    def __init__(self, in_features: int, out_features: int, axes: tuple[str | None, str | None], *,
                 param_dtype, rngs: nnx.Rngs, act_quant: bool = False):
        self.kernel = param(rngs, (in_features, out_features), axes, param_dtype)
        self.act_quant = act_quant

    def __call__(self, x: jax.Array, dtype=None, heads: int | None = None) -> jax.Array:
        """x [..., in] -> [..., out], or [..., heads, out / heads] with `heads`: the product itself
        writes the per-head layout (the kernel viewed [in, heads, out / heads]), where a reshape of
        its [..., out] result would be a relayout copy on TPU (tiles over tokens x columns, not
        heads x columns). Except for one token per sequence (x [B, 1, in], decode): on a device that
        holds one sequence the per-head product is a vector times a 3-D kernel, which XLA:TPU rewrites
        into an fp32 multiply-reduce over a converted, re-laid-out copy of the kernel (9x the kernel's
        bytes per step); the flat product reads the kernel once, its small result is split into heads,
        and an optimisation barrier keeps XLA from folding the split back into the product
        (architecture.md §12.9)."""
        dtype = dtype or x.dtype
        w = self.kernel[...]
        one_token = heads is not None and x.ndim >= 3 and x.shape[-2] == 1
        if heads is not None and not one_token:
            w = w.reshape(w.shape[0], heads, -1)  # [in, heads, out / heads]
        if self.act_quant:
            x = fp8_act_quant(x.astype(jnp.bfloat16))  # [..., in] on the E4M3 grid
            y = jnp.tensordot(x, w.astype(jnp.bfloat16), axes=1, preferred_element_type=jnp.float32)
            y = y.astype(jnp.bfloat16).astype(dtype)
        else:
            y = jnp.tensordot(x.astype(dtype), w.astype(dtype), axes=1, preferred_element_type=jnp.float32).astype(dtype)
        if one_token:
            y = jax.lax.optimization_barrier(y).reshape(*y.shape[:-1], heads, -1)  # [B, 1, heads, out / heads]
        return y


class RMSNorm(nnx.Module):
    """Weighted RMSNorm; statistics and the weight product in fp32, cast back to the input dtype.
    The weight is stored in fp32 whatever the parameter dtype (as HF keeps it; bf16 weights load
    exactly), so the arithmetic kept in fp32 (architecture.md §10.2) sees the checkpoint's values."""

    def __init__(self, dim: int, eps: float, axis_name: str, *, rngs: nnx.Rngs):
        self.weight = param(rngs, (dim,), (axis_name,), jnp.float32, init="ones")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return (rms_normalize(x.astype(jnp.float32), self.eps) * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def rms_scale(x32: jax.Array, eps: float) -> jax.Array:
    """(mean(x^2) + eps)^(-1/2) over the last axis of an fp32 x, kept as a size-1 axis: [..., 1]."""
    return jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """Un-weighted RMS normalisation over the last axis (statistic in fp32)."""
    x32 = x.astype(jnp.float32)
    return (x32 * rms_scale(x32, eps)).astype(x.dtype)


class Embed(nnx.Module):
    def __init__(self, vocab_size: int, dim: int, *, param_dtype, rngs: nnx.Rngs):
        self.embedding = param(rngs, (vocab_size, dim), ("vocab", "embed"), param_dtype)

    def __call__(self, tokens: jax.Array, dtype) -> jax.Array:
        return jnp.take(self.embedding[...], tokens, axis=0).astype(dtype)  # [B, T, d]
