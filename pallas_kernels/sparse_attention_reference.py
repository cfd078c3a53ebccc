"""Core attention (docs/architecture.md §4.5), pure JAX: the reference twin of the Pallas kernel in
`sparse_attention.py`, and the code that runs wherever the kernel is not chosen.

One fp32 softmax per (query, head) over [window keys | compressed entries | sink], scale c**-0.5,
key = value. It attends by gathering the selected entries (never through an S x S mask) and runs over
query chunks, so memory grows linearly in T for SWA and CSA; HCA's dense-over-visible-entries rule is
O(T * T/m') by definition. Queries sit at positions 0..T-1 of `kv`; a caller with history (the cached
forward) passes the past keys and entries as CSA-style index lists into `compressed`, the way DeepSeek's
inference code turns its window ring into top-k indices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.query_chunks import map_query_chunks


def sparse_attention(q: jax.Array, kv: jax.Array, sinks: jax.Array, window: int,
                     compressed: jax.Array | None = None, topk_idx: jax.Array | None = None,
                     ratio: int = 0, chunk: int = 512, key_start: jax.Array | None = None,
                     entry_start: jax.Array | None = None) -> jax.Array:
    """Reference core attention over window keys U compressed entries, with per-head sinks.

    q [B,T,H,c]; kv [B,T,c] (key = value); sinks [H]; positions are 0..T-1.
    compressed [B,N,c] or None (SWA). topk_idx [B,T,k] (CSA: entry ids, -1 empty) or None with
    compressed given (HCA: every entry s < floor((t+1)/ratio) is attended). Returns [B,T,H,c] in q's dtype.
    Softmax in fp32 with scale 1/sqrt(c); the sink is an extra logit with a zero value.
    key_start, entry_start [B,T] int32 (packed rows of several documents, docs/architecture.md §8.5):
    query t sees window keys r >= key_start[t] (its document's first token) and, HCA, the entries
    [entry_start[t], entry_start[t] + floor((t - key_start[t] + 1)/ratio)); None: 0.
    """
    T = q.shape[1]
    kv_padded = _padded_window_keys(kv, window, chunk)  # key i at index i + window - 1
    sink_logits = sinks.astype(jnp.float32)[None, :, None, None]  # [1, H, 1, 1]
    bounds = _default_bounds(q, key_start, entry_start)

    def one_chunk(args):
        logits, values, idx_c = _chunk_logits(args, kv_padded, window, compressed, topk_idx is not None, ratio)
        m = jnp.maximum(jnp.max(jnp.concatenate(logits, axis=-1), axis=-1, keepdims=True), sink_logits)
        probs = [jnp.exp(l - m) for l in logits]
        denom = sum(jnp.sum(p, axis=-1, keepdims=True) for p in probs) + jnp.exp(sink_logits - m)
        out = jnp.einsum("bhqk,bkc->bqhc", probs[0], values[0].astype(jnp.float32))
        if len(values) > 1:
            if idx_c is None:
                out += jnp.einsum("bhqn,bnc->bqhc", probs[1], values[1].astype(jnp.float32))
            else:
                out += jnp.einsum("bhqk,bqkc->bqhc", probs[1], values[1].astype(jnp.float32))
        return (out / jnp.moveaxis(denom, 1, 2)).astype(q.dtype)  # denom [B,H,Q,1] -> [B,Q,H,1]

    args = (q, *bounds, jnp.arange(T)) if topk_idx is None else (q, *bounds, topk_idx, jnp.arange(T))
    return map_query_chunks(jax.checkpoint(one_chunk), args, T, chunk)


def _default_bounds(q: jax.Array, *bounds):
    """key_start, entry_start [B, T]: the given ones, zeros for None (one document per row)."""
    return tuple(jnp.zeros(q.shape[:2], jnp.int32) if b is None else jnp.asarray(b, jnp.int32) for b in bounds)


def _padded_window_keys(kv: jax.Array, window: int, chunk: int) -> jax.Array:
    """kv [B,T,c] with window-1 zero keys in front and the last query chunk's padding behind."""
    T = kv.shape[1]
    Q = min(chunk, T)
    return jnp.pad(kv, ((0, 0), (window - 1, -(-T // Q) * Q - T), (0, 0)))


def _chunk_logits(args, kv_padded, window: int, compressed, sparse: bool, ratio: int):
    """Scaled fp32 logits of one query chunk: [window [B,H,Q,Q+W-1], entries [B,H,Q,k|N]] (masked
    keys -inf; entries only when compressed entries exist), their values, and the chunk's entry ids."""
    q_c, k0, e0, *rest = args  # [B,Q,H,c], key_start and entry_start [B,Q]
    idx_c, t = rest if sparse else (None, rest[0])  # [B,Q,k], [Q]
    Q = q_c.shape[1]
    scale = q_c.shape[-1] ** -0.5
    start = t[0]
    win = jax.lax.dynamic_slice_in_dim(kv_padded, start, Q + window - 1, axis=1)  # [B, Q+W-1, c]
    key_pos = (start - (window - 1) + jnp.arange(Q + window - 1))[None, None, :]  # [1, 1, Q+W-1]
    win_mask = ((key_pos >= k0[..., None]) & (key_pos <= t[None, :, None])
                & (key_pos > t[None, :, None] - window))  # [B, Q, Q+W-1]; k0 >= 0
    logits = [jnp.where(win_mask[:, None], scale * jnp.einsum("bqhc,bkc->bhqk", q_c, win,
                                                              preferred_element_type=jnp.float32), -jnp.inf)]
    values = [win]
    if compressed is not None and compressed.shape[1] > 0:
        if idx_c is None:  # HCA (and CSA's dense stage): all visible entries of the query's document
            n = jnp.arange(compressed.shape[1])[None, None, :]
            vis = (n >= e0[..., None]) & (n < (e0 + (t[None, :] - k0 + 1) // ratio)[..., None])  # [B, Q, N]
            s = jnp.einsum("bqhc,bnc->bhqn", q_c, compressed, preferred_element_type=jnp.float32)
            logits.append(jnp.where(vis[:, None], scale * s, -jnp.inf))
            values.append(compressed)
        else:  # CSA: gather the selected entries by index
            picked = jax.vmap(lambda comp, i: comp[jnp.maximum(i, 0)])(compressed, idx_c)  # [B, Q, k, c]
            s = jnp.einsum("bqhc,bqkc->bhqk", q_c, picked, preferred_element_type=jnp.float32)
            logits.append(jnp.where((idx_c >= 0)[:, None], scale * s, -jnp.inf))
            values.append(picked)
    return logits, values, idx_c


def entry_attention_mass(q: jax.Array, kv: jax.Array, sinks: jax.Array, window: int, compressed: jax.Array,
                         topk_idx: jax.Array | None, ratio: int, chunk: int, key_start: jax.Array | None = None,
                         entry_start: jax.Array | None = None) -> jax.Array:
    """The indexer's training target (architecture.md §8.2): the core attention's probability on each compressed
    entry (softmax over window keys, entries and the sink, as `sparse_attention`), summed over heads.
    topk_idx [B,T,k] -> [B,T,k] (sparse stage); None -> every entry [B,T,N] (dense stage, invisible 0).
    A chunked recomputation of the per-head log-sum-exp (memory linear in T), so it serves every
    attention_impl; fp32, no gradient. key_start, entry_start: as `sparse_attention`."""
    B, T, H, _ = q.shape
    n = compressed.shape[1] if topk_idx is None else topk_idx.shape[2]
    if compressed.shape[1] == 0 or n == 0:
        return jnp.zeros((B, T, n), jnp.float32)
    kv_padded = _padded_window_keys(kv, window, chunk)  # key i at index i + window - 1
    sink_logits = sinks.astype(jnp.float32)[None, :, None, None]  # [1, H, 1, 1]

    def one_chunk(args):
        logits, _, _ = _chunk_logits(args, kv_padded, window, compressed, topk_idx is not None, ratio)
        lse = jax.nn.logsumexp(jnp.concatenate(logits + [jnp.broadcast_to(sink_logits, (*logits[0].shape[:3], 1))],
                                               axis=-1), axis=-1, keepdims=True)  # [B, H, Q, 1]
        return jnp.sum(jnp.exp(logits[1] - lse), axis=1)  # [B, Q, k | N]

    q, kv, compressed = jax.lax.stop_gradient((q, kv, compressed))
    bounds = _default_bounds(q, key_start, entry_start)
    args = (q, *bounds, jnp.arange(T)) if topk_idx is None else (q, *bounds, topk_idx, jnp.arange(T))
    return map_query_chunks(one_chunk, args, T, chunk)
