"""Interleaved partial RoPE with the YaRN table (architecture.md §7).

Pairs (2i, 2i+1) of the last `rope_head_dim` channels form one complex number. SWA-only layers use
plain RoPE at `rope_theta`; CSA/HCA layers use `compress_rope_theta` with YaRN (no mscale anywhere).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from v4jax.config import AttentionKind, V4Config


def inv_frequencies(cfg: V4Config, kind: AttentionKind) -> np.ndarray:
    """Angular frequency per pair, float32 [r/2]: plain for SWA layers, YaRN for compressed ones."""
    r = cfg.rope_head_dim
    if kind is AttentionKind.SLIDING:
        return (1.0 / cfg.rope_theta ** (np.arange(0, r, 2, dtype=np.float32) / r)).astype(np.float32)
    theta = cfg.compress_rope_theta
    base = (1.0 / theta ** (np.arange(0, r, 2, dtype=np.float32) / r)).astype(np.float32)
    if cfg.rope_factor == 1.0:
        return base
    lo, hi = yarn_correction_range(cfg.beta_fast, cfg.beta_slow, r, theta, cfg.original_seq_len)
    if lo == hi:
        hi += 0.001  # architecture.md §7: avoid a zero-width ramp
    ramp = np.clip((np.arange(r // 2, dtype=np.float32) - lo) / (hi - lo), 0, 1).astype(np.float32)
    return (base / cfg.rope_factor * ramp + base * (1 - ramp)).astype(np.float32)


def yarn_correction_range(beta_fast: float, beta_slow: float, r: int, theta: float, original_len: int):
    """(lo, hi) pair indices of the YaRN ramp: D(beta) = r ln(L0 / (2 pi beta)) / (2 ln theta)."""

    def d(beta):
        return r * math.log(original_len / (2 * math.pi * beta)) / (2 * math.log(theta))

    return max(math.floor(d(beta_fast)), 0), min(math.ceil(d(beta_slow)), r - 1)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, inverse: bool = False) -> jax.Array:
    """Rotate the last 2*len(inv_freq) channels of x (interleaved pairs) by position * inv_freq.

    x: [..., c]; positions: int array broadcastable against x.shape[:-1] (e.g. [T] for [B, T, c],
    [T, 1] for [B, T, H, c]). inverse=True applies the conjugate rotation (output de-rotation, architecture.md §4.5).
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [..., r/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    return _rotate(x, cos, -sin if inverse else sin)


@jax.custom_vjp
def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [..., c] with its last 2*cos.shape[-1] channels rotated pair by pair; cos, sin [..., r/2] in fp32.

    Written over the whole width as x * C + partner(x) * S: C is 1 and S is 0 on the unrotated
    channels; on pair i, C = cos_i on both channels, S = -sin_i on the first and +sin_i on the second;
    partner(x) swaps the two channels of each rotated pair (zero elsewhere). Per channel these are the
    products a cos - b sin and b cos + a sin exactly (negation and the swap are exact). The swap is a
    product with a constant 0/1 matrix, so TPUs do it on the MXU: slicing the rotated channels out,
    reading them pairwise and concatenating them back costs about twice the HBM traffic there."""
    c, r = x.shape[-1], 2 * cos.shape[-1]
    pad = ((0, 0),) * (cos.ndim - 1) + ((c - r, 0),)
    C = jnp.pad(jnp.repeat(cos, 2, axis=-1), pad, constant_values=1.0)  # [..., c]
    S = jnp.pad(jnp.stack([-sin, sin], axis=-1).reshape(*sin.shape[:-1], r), pad)  # [..., c]
    partner = jnp.matmul(x, _pair_swap(c, r, x.dtype), preferred_element_type=jnp.float32,
                         precision=jax.lax.Precision.HIGHEST)  # [..., c]: exact (one product per entry)
    return (x.astype(jnp.float32) * C + partner * S).astype(x.dtype)


def _pair_swap(c: int, r: int, dtype) -> np.ndarray:
    """[c, c] 0/1 with (x @ swap)[j] = x[j's partner]: channels 2i and 2i + 1 of the last r swap places;
    the columns of the first c - r channels are zero."""
    swap = np.zeros((c, c), dtype)
    first = np.arange(c - r, c, 2)
    swap[first + 1, first] = swap[first, first + 1] = 1
    return swap


def _rotate_fwd(x, cos, sin):
    return _rotate(x, cos, sin), (cos, sin)


def _rotate_bwd(residuals, g):
    # A rotation's transpose is the opposite rotation (architecture.md §7.1): the same one pass over g.
    # cos and sin come from integer positions: no gradient.
    cos, sin = residuals
    return _rotate(g, cos, -sin), None, None


_rotate.defvjp(_rotate_fwd, _rotate_bwd)
