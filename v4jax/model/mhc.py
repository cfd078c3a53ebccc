"""Manifold-Constrained Hyper-Connections (architecture.md §3).

The residual state of a token is `n_hc` streams `X: [n_hc, d]`. Around each sublayer one mHC unit
computes, from the streams themselves, a collapse `pre`, an expand `post` and a doubly stochastic
mixing `comb` (Sinkhorn–Knopp); all coefficient arithmetic is fp32 (architecture.md §3.2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax.config import V4Config
from v4jax.model.layers import param, rms_scale


def sinkhorn(logits: jax.Array, iters: int, eps: float) -> jax.Array:
    """architecture.md §3.2 step 8, exactly as the official code: row softmax + eps, then column normalise,
    then (iters - 1) x (row normalise, column normalise). logits: [..., n_hc, n_hc] fp32."""
    m = jax.nn.softmax(logits, axis=-1) + eps
    m = m / (jnp.sum(m, axis=-2, keepdims=True) + eps)

    def row_col(_, m):
        m = m / (jnp.sum(m, axis=-1, keepdims=True) + eps)
        return m / (jnp.sum(m, axis=-2, keepdims=True) + eps)

    return jax.lax.fori_loop(0, iters - 1, row_col, m)


def _mixes(streams: jax.Array, fn: jax.Array, eps: float) -> jax.Array:
    """mu = rho * (Phi vec(X)) in fp32 (architecture.md §3.2 steps 1-3). streams [B,T,n_hc,d].

    The RMS scale multiplies the 24 mixes, not the n_hc*d inputs, as DeepSeek's code does: no
    normalised copy of the flattened streams is formed (or differentiated)."""
    flat = streams.reshape(*streams.shape[:-2], -1).astype(jnp.float32)  # [B, T, n_hc*d], stream-major
    rho = rms_scale(flat, eps)  # [B, T, 1]
    return jnp.einsum("btk,mk->btm", flat, fn.astype(jnp.float32)) * rho


def collapse(pre: jax.Array, streams: jax.Array) -> jax.Array:
    """u = sum_j pre_j X_j in fp32: pre [B, T, n_hc], streams [B, T, n_hc, d] -> [B, T, d] in the
    streams' dtype (architecture.md §3.3; V4.1 collapses with the previous sublayer's pre, §12)."""
    return jnp.einsum("btj,btjd->btd", pre, streams.astype(jnp.float32)).astype(streams.dtype)


class HyperConnection(nnx.Module):
    """One mHC unit: `hc_pre` (collapse) before a sublayer and `hc_post` (expand + mix) after it."""

    def __init__(self, cfg: V4Config, *, rngs: nnx.Rngs):
        n, mix = cfg.hc_mult, (2 + cfg.hc_mult) * cfg.hc_mult
        self.fn = param(rngs, (mix, n * cfg.dim), ("hc_mix", "hc_embed"), jnp.float32)  # Phi, always fp32
        self.base = param(rngs, (mix,), ("hc_mix",), jnp.float32, init="zeros")  # beta
        # alpha: the report says the gating factors start small (architecture.md §11.3); HF uses 1.
        self.scale = nnx.Param(jnp.full((3,), 0.01, jnp.float32), logical_axes=(None,))
        self.n_hc, self.iters, self.hc_eps, self.norm_eps = n, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.norm_eps

    def coefficients(self, streams: jax.Array):
        """pre, post: [B, T, n_hc]; comb: [B, T, n_hc(src), n_hc(dst)]; all fp32 (architecture.md §3.2 steps 4-8)."""
        n = self.n_hc
        mu = _mixes(streams, self.fn[...], self.norm_eps)  # [B, T, (2+n)n]
        beta, alpha = self.base[...], self.scale[...]
        pre = jax.nn.sigmoid(alpha[0] * mu[..., :n] + beta[:n]) + self.hc_eps
        post = 2.0 * jax.nn.sigmoid(alpha[1] * mu[..., n:2 * n] + beta[n:2 * n])
        comb_logits = (alpha[2] * mu[..., 2 * n:] + beta[2 * n:]).reshape(*mu.shape[:-1], n, n)
        return pre, post, sinkhorn(comb_logits, self.iters, self.hc_eps)

    def hc_pre(self, streams: jax.Array):
        """Collapse u = sum_j pre_j X_j in fp32 from the un-normalised streams (architecture.md §3.3).
        Returns (u [B,T,d] in the stream dtype, post, comb)."""
        pre, post, comb = self.coefficients(streams)
        return collapse(pre, streams), post, comb

    @staticmethod
    def hc_post(y: jax.Array, streams: jax.Array, post: jax.Array, comb: jax.Array) -> jax.Array:
        """X'_k = post_k y + sum_j comb[j, k] X_j (architecture.md §3.3: comb applied transposed). [B,T,n_hc,d]."""
        mixed = jnp.einsum("btjk,btjd->btkd", comb, streams.astype(jnp.float32))
        return (post[..., None] * y.astype(jnp.float32)[..., None, :] + mixed).astype(streams.dtype)


class HyperHead(nnx.Module):
    """Final stream merge before the last RMSNorm (architecture.md §3.4): h = sum_j (sigmoid(a mu_j + b_j) + eps) X_j."""

    def __init__(self, cfg: V4Config, *, rngs: nnx.Rngs):
        n = cfg.hc_mult
        self.fn = param(rngs, (n, n * cfg.dim), ("hc", "hc_embed"), jnp.float32)
        self.base = param(rngs, (n,), ("hc",), jnp.float32, init="zeros")
        self.scale = nnx.Param(jnp.full((1,), 0.01, jnp.float32), logical_axes=(None,))
        self.hc_eps, self.norm_eps = cfg.hc_eps, cfg.norm_eps

    def __call__(self, streams: jax.Array) -> jax.Array:
        mu = _mixes(streams, self.fn[...], self.norm_eps)  # [B, T, n_hc]
        w = jax.nn.sigmoid(self.scale[...][0] * mu + self.base[...]) + self.hc_eps
        return jnp.einsum("btj,btjd->btd", w, streams.astype(jnp.float32)).astype(streams.dtype)
