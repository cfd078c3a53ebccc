"""Token-level KV compressor (spec §4.3).

Every `m` tokens become one compressed entry: a per-channel softmax over the window's gate logits
(plus a learned position bias `ape`) weighting the window's values. CSA's compressor overlaps: entry
i pools its own window (channels [c, 2c)) and the previous window (channels [0, c)), 2m candidates.
HCA's does not. All compressor arithmetic is fp32; the entry is RMS-normalised, cast to the compute
dtype and rotated (RoPE at position m*i, the layer's table).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from v4jax.layers import Linear, RMSNorm, param
from v4jax.rope import apply_rope


class Compressor(nnx.Module):
    """Stateless compressor over a full sequence: [B, T, d] -> entries [B, T // m, c].

    ratio m; width c (head_dim for attention, index_head_dim for the indexer); overlap=True for CSA.
    Only complete windows produce entries (a trailing partial window is dropped, spec §4.3).
    """

    def __init__(self, dim: int, width: int, ratio: int, overlap: bool, norm_eps: float, *, param_dtype,
                 rngs: nnx.Rngs):
        kappa = 2 if overlap else 1
        self.wkv = Linear(dim, kappa * width, ("embed", "compress_width"), param_dtype=param_dtype, rngs=rngs)
        self.wgate = Linear(dim, kappa * width, ("embed", "compress_width"), param_dtype=param_dtype, rngs=rngs)
        self.ape = param(rngs, (ratio, kappa * width), (None, None), jnp.float32, init="zeros")  # small: replicated
        self.norm = RMSNorm(width, norm_eps, "head_dim", rngs=rngs)
        self.width, self.ratio, self.overlap = width, ratio, overlap

    def __call__(self, x: jax.Array, inv_freq: np.ndarray) -> jax.Array:
        B, T, _ = x.shape
        m, c = self.ratio, self.width
        n = T // m
        if n == 0:
            return jnp.zeros((B, 0, c), x.dtype)
        x32 = x[:, : n * m].astype(jnp.float32)
        values = self.wkv(x32, jnp.float32).reshape(B, n, m, -1)  # [B, n, m, kappa*c]
        logits = self.wgate(x32, jnp.float32).reshape(B, n, m, -1) + self.ape[...].astype(jnp.float32)
        if self.overlap:
            values, logits = _overlap_candidates(values, logits, c)  # [B, n, 2m, c]
        weights = jax.nn.softmax(logits, axis=2)  # per channel over the window's candidates
        entries = jnp.sum(weights * values, axis=2)  # [B, n, c] fp32
        entries = self.norm(entries).astype(x.dtype)
        return apply_rope(entries, m * jnp.arange(n), inv_freq)  # RoPE at each window's first token


def _overlap_candidates(values: jax.Array, logits: jax.Array, c: int):
    """CSA's two series: entry i = own window's channels [c, 2c) and window i-1's channels [0, c).
    Window 0 has no predecessor: value 0, logit -inf (softmax weight 0)."""
    own_v, own_l = values[..., c:], logits[..., c:]
    prev_v = jnp.pad(values[:, :-1, :, :c], ((0, 0), (1, 0), (0, 0), (0, 0)))
    prev_l = jnp.pad(logits[:, :-1, :, :c], ((0, 0), (1, 0), (0, 0), (0, 0)), constant_values=-jnp.inf)
    return jnp.concatenate([prev_v, own_v], axis=2), jnp.concatenate([prev_l, own_l], axis=2)
