"""Hybrid attention: SWA, CSA and HCA (spec §4).

All three share the query path (§4.1), the sliding-window KV (§4.2), the per-head sink, the output
de-rotation and the grouped low-rank output projection (§4.5). CSA adds compressed entries chosen per
query by the lightning indexer; HCA adds every visible compressed entry. There is one softmax over
[window keys | compressed keys | sink]. K = V: one 512-d vector per key serves both.

`sparse_attention` is the pure-JAX reference of the core: it attends by gathering the selected
entries (never through an S x S mask) and runs over query chunks, so memory grows linearly in T for
SWA and CSA; HCA's dense-over-visible-entries rule is O(T * T/m') by definition.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sharding.context import constrain
from v4jax.compressor import Compressor
from v4jax.config import AttentionImpl, AttentionKind, V4Config
from v4jax.indexer import Indexer, IndexerTraces, entry_scores, map_query_chunks
from v4jax.layers import Linear, RMSNorm, param, rms_normalize
from v4jax.rope import apply_rope, inv_frequencies


class Attention(nnx.Module):
    def __init__(self, cfg: V4Config, kind: AttentionKind, *, rngs: nnx.Rngs):
        pd = cfg.param_dtype
        H, c, g = cfg.n_heads, cfg.head_dim, cfg.o_groups
        self.wq_a = Linear(cfg.dim, cfg.q_lora_rank, ("embed", "q_lora"), param_dtype=pd, rngs=rngs)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps, "q_lora", rngs=rngs)
        self.wq_b = Linear(cfg.q_lora_rank, H * c, ("q_lora", "heads"), param_dtype=pd, rngs=rngs)
        self.wkv = Linear(cfg.dim, c, ("embed", "head_dim"), param_dtype=pd, rngs=rngs)
        self.kv_norm = RMSNorm(c, cfg.norm_eps, "head_dim", rngs=rngs)
        # Grouped output projection: group g' maps its (H/g)*c head outputs to d_g (row block g' of wo_a).
        self.wo_a = param(rngs, (g, H // g * c, cfg.o_lora_rank), ("o_groups", "heads", "o_lora"), pd)
        self.wo_b = Linear(g * cfg.o_lora_rank, cfg.dim, ("o_lora", "embed"), param_dtype=pd, rngs=rngs)
        self.sinks = param(rngs, (H,), ("heads",), jnp.float32, init="zeros")  # sigma_h, fp32
        ratio = cfg.compress_ratio(kind)
        self.compressor = (Compressor(cfg.dim, c, ratio, kind is AttentionKind.CSA, cfg.norm_eps, param_dtype=pd,
                                      rngs=rngs) if ratio else None)
        self.indexer = Indexer(cfg, rngs=rngs) if kind is AttentionKind.CSA else None
        self.cfg, self.kind = cfg, kind

    def __call__(self, x: jax.Array, return_indexer_traces: bool = False):
        """x: [B, T, d] (already attn_norm-ed); positions are 0..T-1. Returns [B, T, d], or
        ([B, T, d], IndexerTraces | None) with return_indexer_traces (traces only in CSA layers)."""
        cfg = self.cfg
        B, T, _ = x.shape
        positions = jnp.arange(T)
        inv_freq = inv_frequencies(cfg, self.kind)  # YaRN/compress table on CSA/HCA, plain on SWA (§1.3)

        cq = self.q_norm(self.wq_a(x))  # [B, T, d_c], shared with the indexer
        q = constrain(self.wq_b(cq).reshape(B, T, cfg.n_heads, cfg.head_dim), ("batch", "seq", "act_heads", None))
        q = apply_rope(rms_normalize(q, cfg.norm_eps), positions[:, None], inv_freq)  # per-head un-weighted norm
        kv = apply_rope(self.kv_norm(self.wkv(x)), positions, inv_freq)  # [B, T, c]

        compressed = topk_idx = traces = None
        if self.compressor is not None:
            compressed = self.compressor(x, inv_freq)  # [B, T // m, c]
        if self.indexer is not None and (return_indexer_traces or not cfg.csa_dense):
            # spec §8.6: detached inputs, so the indexer learns only from its KL loss
            x_i, cq_i = jax.lax.stop_gradient((x, cq)) if cfg.indexer_detach else (x, cq)
            q_i, w_i, keys_i = self.indexer.project(x_i, cq_i, positions, inv_freq)
            if not cfg.csa_dense:  # dense stage (spec §4.8): every visible entry, as HCA does
                topk_idx = self.indexer.select(q_i, w_i, keys_i, positions)  # [B, T, k]
            if return_indexer_traces:
                ratio = cfg.compress_ratio(self.kind)
                valid = (jnp.broadcast_to(jnp.arange(keys_i.shape[1]) < ((positions + 1) // ratio)[:, None],
                                          (B, T, keys_i.shape[1])) if topk_idx is None else topk_idx >= 0)
                traces = IndexerTraces(
                    entry_attention_mass(q, kv, self.sinks[...], cfg.window_size, compressed, topk_idx, ratio,
                                         cfg.attention_chunk),
                    entry_scores(q_i, w_i, keys_i, topk_idx, cfg.attention_chunk), valid)

        core = sparse_attention if cfg.attention_impl is AttentionImpl.REFERENCE else pallas_sparse_attention
        o = core(q, kv, self.sinks[...], cfg.window_size, compressed, topk_idx,
                 cfg.compress_ratio(self.kind), cfg.attention_chunk)  # [B, T, H, c]
        o = apply_rope(o, positions[:, None], inv_freq, inverse=True)  # de-rotate at the query position
        g = cfg.o_groups
        o = jnp.moveaxis(o.reshape(B * T, g, -1), 1, 0)  # [g, B*T, (H/g)*c]: heads grouped contiguously
        # (group axis leading: XLA:CPU cannot run a bf16 x bf16 -> f32 dot with a trailing batch axis)
        u = jnp.einsum("gni,gio->gno", o, self.wo_a[...].astype(o.dtype), preferred_element_type=jnp.float32)
        out = self.wo_b(jnp.moveaxis(u, 0, 1).astype(x.dtype).reshape(B, T, -1))  # concat groups -> [B,T,d]
        return (out, traces) if return_indexer_traces else out


def sparse_attention(q: jax.Array, kv: jax.Array, sinks: jax.Array, window: int,
                     compressed: jax.Array | None = None, topk_idx: jax.Array | None = None,
                     ratio: int = 0, chunk: int = 512) -> jax.Array:
    """Reference core attention over window keys U compressed entries, with per-head sinks.

    q [B,T,H,c]; kv [B,T,c] (key = value); sinks [H]; positions are 0..T-1.
    compressed [B,N,c] or None (SWA). topk_idx [B,T,k] (CSA: entry ids, -1 empty) or None with
    compressed given (HCA: every entry s < floor((t+1)/ratio) is attended). Returns [B,T,H,c] in q's dtype.
    Softmax in fp32 with scale 1/sqrt(c); the sink is an extra logit with a zero value.
    """
    T = q.shape[1]
    kv_padded = _padded_window_keys(kv, window, chunk)  # key i at index i + window - 1
    sink_logits = sinks.astype(jnp.float32)[None, :, None, None]  # [1, H, 1, 1]

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

    args = (q, jnp.arange(T)) if topk_idx is None else (q, topk_idx, jnp.arange(T))
    return map_query_chunks(jax.checkpoint(one_chunk), args, T, chunk)


def _padded_window_keys(kv: jax.Array, window: int, chunk: int) -> jax.Array:
    """kv [B,T,c] with window-1 zero keys in front and the last query chunk's padding behind."""
    T = kv.shape[1]
    Q = min(chunk, T)
    return jnp.pad(kv, ((0, 0), (window - 1, -(-T // Q) * Q - T), (0, 0)))


def _chunk_logits(args, kv_padded, window: int, compressed, sparse: bool, ratio: int):
    """Scaled fp32 logits of one query chunk: [window [B,H,Q,Q+W-1], entries [B,H,Q,k|N]] (masked
    keys -inf; entries only when compressed entries exist), their values, and the chunk's entry ids."""
    q_c, idx_c, t = args if sparse else (args[0], None, args[1])  # [B,Q,H,c], [B,Q,k], [Q]
    Q = q_c.shape[1]
    scale = q_c.shape[-1] ** -0.5
    start = t[0]
    win = jax.lax.dynamic_slice_in_dim(kv_padded, start, Q + window - 1, axis=1)  # [B, Q+W-1, c]
    key_pos = start - (window - 1) + jnp.arange(Q + window - 1)
    win_mask = (key_pos[None, :] >= 0) & (key_pos[None, :] <= t[:, None]) & (key_pos[None, :] > t[:, None] - window)
    logits = [jnp.where(win_mask[None, None], scale * jnp.einsum("bqhc,bkc->bhqk", q_c, win,
                                                                 preferred_element_type=jnp.float32), -jnp.inf)]
    values = [win]
    if compressed is not None and compressed.shape[1] > 0:
        if idx_c is None:  # HCA (and CSA's dense stage): all visible entries
            n = compressed.shape[1]
            vis = jnp.arange(n)[None, :] < ((t + 1) // ratio)[:, None]  # [Q, N]
            s = jnp.einsum("bqhc,bnc->bhqn", q_c, compressed, preferred_element_type=jnp.float32)
            logits.append(jnp.where(vis[None, None], scale * s, -jnp.inf))
            values.append(compressed)
        else:  # CSA: gather the selected entries by index
            picked = jax.vmap(lambda comp, i: comp[jnp.maximum(i, 0)])(compressed, idx_c)  # [B, Q, k, c]
            s = jnp.einsum("bqhc,bqkc->bhqk", q_c, picked, preferred_element_type=jnp.float32)
            logits.append(jnp.where((idx_c >= 0)[:, None], scale * s, -jnp.inf))
            values.append(picked)
    return logits, values, idx_c


def entry_attention_mass(q: jax.Array, kv: jax.Array, sinks: jax.Array, window: int, compressed: jax.Array,
                         topk_idx: jax.Array | None, ratio: int, chunk: int) -> jax.Array:
    """The indexer's training target (spec §8.6): the core attention's probability on each compressed
    entry (softmax over window keys, entries and the sink, as `sparse_attention`), summed over heads.
    topk_idx [B,T,k] -> [B,T,k] (sparse stage); None -> every entry [B,T,N] (dense stage, invisible 0).
    A chunked recomputation of the per-head log-sum-exp (memory linear in T), so it serves every
    attention_impl; fp32, no gradient."""
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
    args = (q, jnp.arange(T)) if topk_idx is None else (q, topk_idx, jnp.arange(T))
    return map_query_chunks(one_chunk, args, T, chunk)


def on_tpu_or_interpreted(kernel):
    """A Pallas TPU kernel as the model calls it (sharding/kernels.py): compiled by Mosaic when lowered
    for TPU (also AOT from a CPU host), its pure-JAX reference on GPU, Pallas' interpreter on CPU; on
    the active mesh it runs per device inside shard_map (batch and heads split as the rules say)."""
    from sharding.kernels import pallas_kernel
    return pallas_kernel(kernel)


def pallas_sparse_attention(*args):
    """attention_impl=pallas: pallas_kernels.sparse_attention, same function as `sparse_attention`."""
    from pallas_kernels.sparse_attention import sparse_attention as kernel  # imported only when chosen
    return on_tpu_or_interpreted(kernel)(*args)
