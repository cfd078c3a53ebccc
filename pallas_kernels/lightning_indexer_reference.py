"""Lightning indexer selection (docs/architecture.md §4.4), pure JAX: the reference twin of the Pallas
kernel in `lightning_indexer.py`.

Score `I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . K[s])` in fp32 (bf16 steps for bf16 weights); entry s
is visible to the query at position t iff s < floor((t+1)/m); top-k per query, ties towards the lowest entry index
(`jax.lax.top_k` is stable); invisible picks become -1. The [T, N] score matrix is never held whole:
queries are scored and selected in chunks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.query_chunks import map_query_chunks


def index_scores(q: jax.Array, w: jax.Array, keys: jax.Array) -> jax.Array:
    """I = sum_h w_h ReLU(q_h . K_s) in w's dtype. q [B,Q,n_I,c_I], w [B,Q,n_I], keys [B,N,c_I] -> [B,Q,N].
    fp32 w: fp32 throughout. bf16 w (release numerics, architecture.md §10.3): every step rounded to bf16 as
    DeepSeek's bf16 einsum, product and head sum are (the sum itself accumulated in fp32)."""
    dots = jnp.einsum("bqhc,bnc->bqhn", q, keys, preferred_element_type=jnp.float32)
    if w.dtype == jnp.float32:
        return jnp.einsum("bqhn,bqh->bqn", jax.nn.relu(dots), w)
    terms = jax.nn.relu(dots.astype(w.dtype)) * w[..., None]  # [B, Q, n_I, N], rounded per product
    return jnp.sum(terms.astype(jnp.float32), axis=2).astype(w.dtype)


def select_topk(q, w, keys, positions, ratio: int, topk: int, chunk: int = 512,
                entry_start: jax.Array | None = None) -> jax.Array:
    """Chunked scoring + top-k. q [B,T,n_I,c_I], w [B,T,n_I], keys [B,N,c_I], positions [B, T] (or [T],
    the same for every row; a cached call's queries sit at different positions per sequence)
    -> [B, T, min(k, N)] int32, -1 = empty. Entry s is visible to the query at t iff s < floor((t+1)/m).
    entry_start [B, T] (packed rows, docs/architecture.md §8.5; positions then count from each document's
    first token): the query sees entries [entry_start, entry_start + floor((t+1)/m)) instead."""
    B, T = q.shape[:2]
    pos = jnp.broadcast_to(positions, (B, T))
    lo = jnp.zeros((B, T), jnp.int32) if entry_start is None else jnp.asarray(entry_start, jnp.int32)
    N = keys.shape[1]
    k = min(topk, N)
    if k == 0:
        return jnp.zeros((B, T, 0), jnp.int32)

    def one_chunk(args):
        q_c, w_c, pos_c, lo_c, _ = args  # [B,Q,n_I,c_I], [B,Q,n_I], [B,Q], [B,Q], [Q]
        lo_c = lo_c[..., None]
        hi_c = lo_c + ((pos_c + 1) // ratio)[..., None]  # [B, Q, 1]
        n = jnp.arange(N)
        scores = jnp.where((n >= lo_c) & (n < hi_c), index_scores(q_c, w_c, keys), -jnp.inf)  # [B, Q, N]
        idx = jax.lax.top_k(scores, k)[1]  # [B, Q, k], lowest index first on ties
        return jnp.where((idx >= lo_c) & (idx < hi_c), idx, -1).astype(jnp.int32)

    return map_query_chunks(one_chunk, (q, w, pos, lo, jnp.arange(T)), T, chunk)
