"""Lightning indexer (spec §4.4): picks, for each query, the top-k visible compressed entries.

Index keys come from a second, small overlapping compressor (width c_I) over the layer input; index
queries from the shared query latent cQ (no per-head norm). Score
`I[t, s] = sum_h w[t, h] * ReLU(q_I[t, h] . K_I[s])` with `w = weights_proj(x) / sqrt(c_I n_I)`.

Ties break towards the lowest entry index (`jax.lax.top_k` is stable); ReLU scores are often
exactly tied at zero, so any two implementations can differ there. Invisible picks become -1.
The [T, N_c] score matrix is never held whole: queries are scored and selected in chunks.

Training (spec §8.6): `IndexerTraces` carries what the KL loss needs for one CSA layer; the scores
of the selected entries are recomputed from the gathered index keys (`entry_scores`), so they carry
a gradient into the indexer without any [T, N_c] tensor in the sparse stage.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from v4jax.compressor import Compressor
from v4jax.config import AttentionImpl, V4Config
from v4jax.layers import Linear
from v4jax.rope import apply_rope


class Indexer(nnx.Module):
    def __init__(self, cfg: V4Config, *, rngs: nnx.Rngs):
        pd = cfg.param_dtype
        self.wq_b = Linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim, ("q_lora", "index_heads"),
                           param_dtype=pd, rngs=rngs)
        self.weights_proj = Linear(cfg.dim, cfg.index_n_heads, ("embed", "index_heads"), param_dtype=pd, rngs=rngs)
        self.compressor = Compressor(cfg.dim, cfg.index_head_dim, cfg.csa_ratio, True, cfg.norm_eps,
                                     param_dtype=pd, rngs=rngs)
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.ratio, self.chunk, self.impl = cfg.csa_ratio, cfg.attention_chunk, cfg.attention_impl

    def __call__(self, x: jax.Array, cq: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
        """x [B,T,d], cq [B,T,d_c], positions [T] -> selected entry ids [B, T, min(k_I, N_c)], -1 = empty."""
        return self.select(*self.project(x, cq, positions, inv_freq), positions)

    def project(self, x: jax.Array, cq: jax.Array, positions: jax.Array, inv_freq: np.ndarray):
        """Index queries q [B,T,n_I,c_I], head weights w [B,T,n_I] (fp32) and index keys [B,N_c,c_I]."""
        B, T, _ = x.shape
        keys = self.compressor(x, inv_freq)  # [B, N_c, c_I]
        q = self.wq_b(cq).reshape(B, T, self.n_heads, self.head_dim)
        q = apply_rope(q, positions[:, None], inv_freq)  # [B, T, n_I, c_I]
        w = self.weights_proj(x, jnp.float32) * (self.head_dim * self.n_heads) ** -0.5  # [B, T, n_I]
        return q, w, keys

    def select(self, q: jax.Array, w: jax.Array, keys: jax.Array, positions: jax.Array) -> jax.Array:
        """Top-k visible entries per query: [B, T, min(k_I, N_c)] int32, -1 = empty."""
        if self.impl is AttentionImpl.PALLAS:
            from pallas_kernels.lightning_indexer import select_topk as kernel  # imported only when chosen
            from v4jax.attention import on_tpu_or_interpreted

            q, w, keys = jax.lax.stop_gradient((q, w, keys))  # indices carry no gradient (spec §8.6)
            return on_tpu_or_interpreted(kernel)(q, w, keys, positions, self.ratio, self.topk, self.chunk)
        return select_topk(q, w, keys, positions, self.ratio, self.topk, self.chunk)


class IndexerTraces(NamedTuple):
    """What the indexer KL loss (spec §8.6, `losses.indexer_kl_loss`) needs from one CSA layer. The
    last axis holds the candidate entries: the top-k set [k] in the sparse stage, every compressed
    entry [N_c] in the dense stage (`V4Config.csa_dense`). Stacked over CSA layers in ModelOutput."""

    attention_mass: jax.Array  # [B, T, k]: main-attention probability, summed over heads; fp32, no gradient
    index_scores: jax.Array  # [B, T, k]: the indexer's score I[t, s] of the entry; fp32, gradient into the indexer
    valid: jax.Array  # [B, T, k] bool: a real, causally visible entry (sparse: idx >= 0)


def index_scores(q: jax.Array, w: jax.Array, keys: jax.Array) -> jax.Array:
    """I = sum_h w_h ReLU(q_h . K_s), fp32. q [B,Q,n_I,c_I], w [B,Q,n_I], keys [B,N,c_I] -> [B,Q,N]."""
    dots = jnp.einsum("bqhc,bnc->bqhn", q, keys, preferred_element_type=jnp.float32)
    return jnp.einsum("bqhn,bqh->bqn", jax.nn.relu(dots), w)


def entry_scores(q, w, keys, idx, chunk: int) -> jax.Array:
    """Index scores of chosen entries, differentiable: idx [B,T,k] (-1 = empty, scored as entry 0;
    mask it) or None for every entry [B,T,N_c] (dense stage). Chunked over queries and rematerialised
    per chunk, so training holds [B,T,k] scores and one chunk's gathered keys [B,Q,k,c_I]."""
    T = q.shape[1]
    if idx is None:
        return map_query_chunks(jax.checkpoint(lambda a: index_scores(a[0], a[1], keys)), (q, w, jnp.arange(T)), T,
                                chunk)

    def one_chunk(args):
        q_c, w_c, idx_c, _ = args  # [B,Q,n_I,c_I], [B,Q,n_I], [B,Q,k]
        picked = jax.vmap(lambda k, i: k[jnp.maximum(i, 0)])(keys, idx_c)  # [B, Q, k, c_I]
        dots = jnp.einsum("bqhc,bqkc->bqhk", q_c, picked, preferred_element_type=jnp.float32)
        return jnp.einsum("bqhk,bqh->bqk", jax.nn.relu(dots), w_c)

    return map_query_chunks(jax.checkpoint(one_chunk), (q, w, idx, jnp.arange(T)), T, chunk)


def select_topk(q, w, keys, positions, ratio: int, topk: int, chunk: int) -> jax.Array:
    """Chunked scoring + top-k for queries at positions [T] (the same for every row)."""
    return select_topk_at(q, w, keys, jnp.broadcast_to(positions, q.shape[:2]), ratio, topk, chunk)


def select_topk_at(q, w, keys, pos, ratio: int, topk: int, chunk: int) -> jax.Array:
    """Chunked scoring + top-k for queries at per-row positions pos [B, T] (the cached path's
    queries sit at different positions per sequence). Entry s is visible to query t iff
    s < floor((t+1)/m) (spec §4.6). q [B,T,n_I,c_I], w [B,T,n_I], keys [B,N,c_I] -> [B, T, min(k, N)]."""
    B, T = q.shape[:2]
    N = keys.shape[1]
    k = min(topk, N)
    if k == 0:
        return jnp.zeros((B, T, 0), jnp.int32)

    def one_chunk(args):
        q_c, w_c, pos_c, _ = args  # [B,Q,n_I,c_I], [B,Q,n_I], [B,Q], [Q]
        limit = ((pos_c + 1) // ratio)[..., None]  # [B, Q, 1]
        scores = jnp.where(jnp.arange(N) < limit, index_scores(q_c, w_c, keys), -jnp.inf)  # [B, Q, N]
        idx = jax.lax.top_k(scores, k)[1]  # [B, Q, k], lowest index first on ties
        return jnp.where(idx < limit, idx, -1).astype(jnp.int32)

    return map_query_chunks(one_chunk, (q, w, pos, jnp.arange(T)), T, chunk)


def map_query_chunks(fn, args, T: int, chunk: int):
    """Apply fn to query chunks of at most `chunk` rows and stitch the results along axis 1.

    args: arrays whose query axis is 1 ([B, T, ...]) except a leading positions array [T] (axis 0).
    Pads T up to a multiple of the chunk; padded rows are computed and dropped. Chunks run in sequence
    (lax.map) so per-chunk temporaries are never held for all of T at once.
    """
    Q = min(chunk, T)
    n = -(-T // Q)
    pad = n * Q - T

    def split(a, axis):
        a = jnp.pad(a, [(0, pad) if i == axis else (0, 0) for i in range(a.ndim)], mode="edge" if axis == 0 else "constant")
        a = a.reshape(*a.shape[:axis], n, Q, *a.shape[axis + 1:])
        return jnp.moveaxis(a, axis, 0)

    *batched, positions = args
    chunks = tuple(split(a, 1) for a in batched) + (split(positions, 0),)
    out = jax.lax.map(fn, chunks) if n > 1 else jax.tree.map(lambda o: o[None], fn(jax.tree.map(lambda c: c[0], chunks)))
    out = jnp.moveaxis(out, 0, 1)  # [B, n, Q, ...]
    return out.reshape(out.shape[0], n * Q, *out.shape[3:])[:, :T]
