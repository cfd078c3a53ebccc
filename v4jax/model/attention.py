"""Hybrid attention: SWA, CSA and HCA (architecture.md §4).

All three share the query path (architecture.md §4.1), the sliding-window KV (architecture.md §4.2), the per-head sink, the output
de-rotation and the grouped low-rank output projection (architecture.md §4.5). CSA adds compressed entries chosen per
query by the lightning indexer; HCA adds every visible compressed entry. There is one softmax over
[window keys | compressed keys | sink]. K = V: one 512-d vector per key serves both.

One forward for training, prefill and decode (architecture.md §4.6-4.7): `Attention(x, positions, state)`.
Without a state the call is the whole sequence (training, parity). With a state (the layer's cache)
the new tokens attend to each other through the same core, and to the past (the window ring and
the compressed entries) through index lists into one buffer [ring | entries], the way DeepSeek's
inference code turns its window into top-k indices; prefill is a call with an empty state, decode
and speculative verification are calls with T = 1 or 2. The core (`kernels.sparse_attention`) is the
pure-JAX reference or the Pallas kernel, wherever configured.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.sparse_attention_reference import entry_attention_mass
from sharding.context import constrain
from v4jax.model import kernels
from v4jax.model.compressor import Compressor, CompressorState, ring_write
from v4jax.config import AttentionKind, Numerics, RunOptions, V4Config
from v4jax.model.documents import Documents, entry_layout
from v4jax.model.indexer import Indexer, IndexerTraces, entry_scores
from v4jax.model.layers import Linear, RMSNorm, param, rms_normalize
from v4jax.model.numerics import Stored, bf16_head_rms, decode, fp8_nope
from v4jax.model.rope import apply_rope, inv_frequencies


class AttentionState(NamedTuple):
    """One attention layer's cache for B sequences (architecture.md §4.7); absent parts are None."""

    window: Stored  # [B, W, c] ring of raw KV: slot = position mod W (stored as `init_cache` chose)
    compressor: CompressorState | None = None  # CSA, HCA
    indexer: CompressorState | None = None  # CSA: the lightning indexer's key compressor


class Attention(nnx.Module):
    def __init__(self, cfg: V4Config, kind: AttentionKind, *, rngs: nnx.Rngs, options: RunOptions = RunOptions()):
        pd = options.param_dtype
        H, c, g = cfg.n_heads, cfg.head_dim, cfg.o_groups
        fp8 = self.release = options.numerics is Numerics.RELEASE  # FP8 weights in the release: FP8 activations
        self.wq_a = Linear(cfg.dim, cfg.q_lora_rank, ("embed", "q_lora"), param_dtype=pd, rngs=rngs, act_quant=fp8)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps, "q_lora", rngs=rngs)
        self.wq_b = Linear(cfg.q_lora_rank, H * c, ("q_lora", "heads"), param_dtype=pd, rngs=rngs, act_quant=fp8)
        self.wkv = Linear(cfg.dim, c, ("embed", "head_dim"), param_dtype=pd, rngs=rngs, act_quant=fp8)
        self.kv_norm = RMSNorm(c, cfg.norm_eps, "head_dim", rngs=rngs)
        # Grouped output projection: group g' maps its (H/g)*c head outputs to d_g (row block g' of wo_a).
        self.wo_a = param(rngs, (g, H // g * c, cfg.o_lora_rank), ("o_groups", "heads", "o_lora"), pd)
        self.wo_b = Linear(g * cfg.o_lora_rank, cfg.dim, ("o_lora", "embed"), param_dtype=pd, rngs=rngs, act_quant=fp8)
        self.sinks = param(rngs, (H,), ("heads",), jnp.float32, init="zeros")  # sigma_h, fp32
        ratio = cfg.compress_ratio(kind)
        self.compressor = (Compressor(cfg.dim, c, ratio, kind is AttentionKind.CSA, cfg.norm_eps, param_dtype=pd,
                                      rngs=rngs, release=fp8) if ratio else None)
        self.indexer = Indexer(cfg, rngs=rngs, options=options) if kind is AttentionKind.CSA else None
        self.cfg, self.kind, self.options = cfg, kind, options

    def __call__(self, x: jax.Array, positions: jax.Array, state: AttentionState | None = None,
                 n_valid: jax.Array | None = None, return_indexer_traces: bool = False, docs: Documents | None = None):
        """x [B, T, d] (already attn_norm-ed) at positions [B, T] (consecutive per row; 0..T-1 without
        a state). n_valid [B]: real tokens per row (right padding never enters the state).
        docs (stateless packed rows, architecture.md §8.5): positions are then `docs.positions` and no
        window, compressor window, entry or index pick crosses a document boundary.
        Returns (out [B, T, d], state | None, IndexerTraces | None: CSA layers, stateless, on request)."""
        cfg, opt = self.cfg, self.options
        B, T, _ = x.shape
        inv_freq = inv_frequencies(cfg, self.kind)  # YaRN/compress table on CSA/HCA, plain on SWA (architecture.md §7)
        ratio = cfg.compress_ratio(self.kind)
        layout = entry_layout(docs, ratio) if docs is not None and ratio else None
        key_start = None if docs is None else docs.key_start  # [B, T]: the window stops at the document
        entry_start = None if layout is None else layout.entry_start  # [B, T]: its first compressed entry

        cq = self.q_norm(self.wq_a(x))  # [B, T, d_c], shared with the indexer
        q = constrain(self.wq_b(cq, heads=cfg.n_heads), ("batch", "seq", "act_heads", None))  # [B, T, H, c]
        q = (bf16_head_rms if self.release else rms_normalize)(q, cfg.norm_eps)  # per-head un-weighted norm
        q = apply_rope(q, positions[..., None], inv_freq)
        kv = apply_rope(self.kv_norm(self.wkv(x)), positions, inv_freq)  # [B, T, c]
        if self.release:  # the release's KV: FP8 on the non-RoPE dims (architecture.md §10.3)
            kv = fp8_nope(kv, cfg.rope_head_dim)

        compressed = topk_idx = traces = None
        comp_state = index_state = None
        if self.compressor is not None:  # [B, T // m, c], or the state's whole entry buffer [B, N, c]
            compressed, comp_state = self.compressor(x, positions, inv_freq, None if state is None else state.compressor,
                                                     n_valid, layout)
            compressed = compressed.astype(kv.dtype)
        sparse = self.indexer is not None and not opt.csa_dense  # dense stage (architecture.md §4.8): every visible entry
        if self.indexer is not None and (sparse or return_indexer_traces or state is not None):
            # architecture.md §8.2: detached inputs, so the indexer learns only from its KL loss
            x_i, cq_i = jax.lax.stop_gradient((x, cq)) if opt.indexer_detach else (x, cq)
            q_i, w_i, keys_i, index_state = self.indexer.project(
                x_i, cq_i, positions, inv_freq, None if state is None else state.indexer, n_valid, layout)
            if sparse:
                topk_idx = self.indexer.select(q_i, w_i, keys_i, positions, entry_start)  # [B, T, k]
            if return_indexer_traces:
                if state is not None:
                    raise ValueError("indexer traces are a training output: call without a cache")
                lo = jnp.zeros((B, T), jnp.int32) if entry_start is None else entry_start
                n = jnp.arange(keys_i.shape[1])
                valid = ((n >= lo[..., None]) & (n < (lo + (positions + 1) // ratio)[..., None])
                         if topk_idx is None else topk_idx >= 0)  # [B, T, N | k]
                traces = IndexerTraces(
                    entry_attention_mass(q, kv, self.sinks[...], cfg.window_size, compressed, topk_idx, ratio,
                                         opt.attention_chunk, key_start, entry_start),
                    entry_scores(q_i, w_i, keys_i, topk_idx, opt.attention_chunk), valid)

        core = kernels.sparse_attention(opt.attention_impl)
        if state is None:  # the window and the entries are this call's own
            o = core(q, kv, self.sinks[...], cfg.window_size, compressed, topk_idx, ratio, opt.attention_chunk,
                     key_start, entry_start)
        else:  # the new tokens' own window through the core's band, the past as index lists
            past, idx = past_indices(decode(state.window, kv.dtype), compressed, topk_idx, positions, ratio)
            o = core(q, kv, self.sinks[...], cfg.window_size, past, idx, ratio, opt.attention_chunk)
            n_valid = jnp.full((B,), T, jnp.int32) if n_valid is None else n_valid
            state = AttentionState(ring_write(state.window, kv, positions[:, 0], n_valid), comp_state, index_state)
        o = apply_rope(o, positions[..., None], inv_freq, inverse=True)  # [B, T, H, c]: de-rotate at the query
        g = cfg.o_groups
        o = jnp.moveaxis(o.reshape(B * T, g, -1), 1, 0)  # [g, B*T, (H/g)*c]: heads grouped contiguously
        # (group axis leading: XLA:CPU cannot run a bf16 x bf16 -> f32 dot with a trailing batch axis)
        u = jnp.einsum("gni,gio->gno", o, self.wo_a[...].astype(o.dtype), preferred_element_type=jnp.float32)
        out = self.wo_b(jnp.moveaxis(u, 0, 1).astype(x.dtype).reshape(B, T, -1))  # concat groups -> [B,T,d]
        return out, state, traces


def past_indices(window: jax.Array, entries: jax.Array | None, topk_idx: jax.Array | None, positions: jax.Array,
                 ratio: int) -> tuple[jax.Array, jax.Array]:
    """The history a cached call attends to, as one key buffer and per-query index lists (-1 = none).

    window [B, W, c]: the ring before this call (slot = position mod W); entries [B, N, c] or None;
    topk_idx [B, T, k] (CSA) or None (HCA and CSA's dense stage: every visible entry s < floor((t+1)/m)).
    The query at t = start + j sees the past window keys r in (t - W, start) and r >= 0 (the new
    tokens' own keys are the core's band). Returns buffer [B, W + N, c], indices [B, T, W - 1 + k|N]."""
    B, W, _ = window.shape
    start = positions[:, :1]  # [B, 1]
    r = positions[..., None] - W + 1 + jnp.arange(W - 1)  # [B, T, W-1]: candidate past positions
    idx = jnp.where((r >= 0) & (r < start[..., None]), r % W, -1)
    if entries is None:
        return window, idx
    if topk_idx is None:
        n = jnp.arange(entries.shape[1])
        topk_idx = jnp.where(n < ((positions + 1) // ratio)[..., None], n, -1)  # [B, T, N]
    return (jnp.concatenate([window, entries], axis=1),
            jnp.concatenate([idx, jnp.where(topk_idx >= 0, topk_idx + W, -1)], axis=-1))
