"""Lightning indexer (architecture.md §4.4): picks, for each query, the top-k visible compressed entries.

Index keys come from a second, small overlapping compressor (width c_I) over the layer input; index
queries from the shared query latent cQ (no per-head norm). Score
`I[t, s] = sum_h w[t, h] * ReLU(q_I[t, h] . K_I[s])` with `w = weights_proj(x) / sqrt(c_I n_I)`.

Ties break towards the lowest entry index (`jax.lax.top_k` is stable); ReLU scores are often
exactly tied at zero, so any two implementations can differ there. Invisible picks become -1.
The [T, N_c] score matrix is never held whole: queries are scored and selected in chunks.

Training (architecture.md §8.2): `IndexerTraces` carries what the KL loss needs for one CSA layer; the scores
of the selected entries are recomputed from the gathered index keys (`entry_scores`), so they carry
a gradient into the indexer without any [T, N_c] tensor in the sparse stage.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.lightning_indexer_reference import index_scores
from pallas_kernels.query_chunks import map_query_chunks
from sharding.context import constrain
from v4jax.model import kernels
from v4jax.model.compressor import Compressor, CompressorState
from v4jax.model.documents import EntryLayout
from v4jax.config import AttentionImpl, Numerics, RunOptions, V4Config
from v4jax.model.layers import Linear
from v4jax.model.numerics import rotate_fp4
from v4jax.model.rope import apply_rope


class Indexer(nnx.Module):
    def __init__(self, cfg: V4Config, *, rngs: nnx.Rngs, options: RunOptions = RunOptions()):
        pd = options.param_dtype
        release = self.release = options.numerics is Numerics.RELEASE  # architecture.md §10.3
        self.wq_b = Linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim, ("q_lora", "index_heads"),
                           param_dtype=pd, rngs=rngs, act_quant=release)
        self.weights_proj = Linear(cfg.dim, cfg.index_n_heads, ("embed", "index_heads"), param_dtype=pd, rngs=rngs)
        self.compressor = Compressor(cfg.dim, cfg.index_head_dim, cfg.csa_ratio, True, cfg.norm_eps,
                                     param_dtype=pd, rngs=rngs, release=release, rotate=True)
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.ratio, self.chunk, self.impl = cfg.csa_ratio, options.attention_chunk, options.attention_impl

    def project(self, x: jax.Array, cq: jax.Array, positions: jax.Array, inv_freq: np.ndarray,
                state: CompressorState | None = None, n_valid: jax.Array | None = None,
                layout: EntryLayout | None = None):
        """x [B,T,d], cq [B,T,d_c] at positions [B,T] -> (index queries q [B,T,n_I,c_I], head weights
        w [B,T,n_I] fp32, index keys [B,N_c,c_I], the index-key compressor's state | None).
        layout: packed rows' entry layout (architecture.md §8.5), as the attention's compressor."""
        keys, state = self.compressor(x, positions, inv_freq, state, n_valid, layout)  # [B, N_c, c_I]
        q = self.wq_b(cq, heads=self.n_heads)  # [B, T, n_I, c_I]
        # split by head where the rules say (serve_tp): each device scores the entries for its heads
        q = constrain(apply_rope(q, positions[..., None], inv_freq), ("batch", "seq", "act_index_heads", None))
        scale = (self.head_dim * self.n_heads) ** -0.5
        # release: Hadamard + FP4 queries; BF16 head weights, so BF16 index scores (architecture.md §10.3)
        w = self.weights_proj(x, None if self.release else jnp.float32) * scale  # [B, T, n_I]
        w = constrain(w, ("batch", "seq", "act_index_heads"))
        return (rotate_fp4(q) if self.release else q), w, keys.astype(x.dtype), state

    def select(self, q: jax.Array, w: jax.Array, keys: jax.Array, positions: jax.Array,
               entry_start: jax.Array | None = None) -> jax.Array:
        """Top-k visible entries per query at positions [B, T]: [B, T, min(k_I, N_c)] int32, -1 = empty.
        entry_start [B, T] (packed rows): the query's document's first entry; positions in the document."""
        if self.impl is AttentionImpl.PALLAS:
            q, w, keys = jax.lax.stop_gradient((q, w, keys))  # indices carry no gradient (architecture.md §8.2)
        return kernels.select_topk(self.impl)(q, w, keys, positions, self.ratio, self.topk, self.chunk, entry_start)


class IndexerTraces(NamedTuple):
    """What the indexer KL loss (architecture.md §8.2, `losses.indexer_kl_loss`) needs from one CSA layer. The
    last axis holds the candidate entries: the top-k set [k] in the sparse stage, every compressed
    entry [N_c] in the dense stage (`RunOptions.csa_dense`). Stacked over CSA layers in ModelOutput."""

    attention_mass: jax.Array  # [B, T, k]: main-attention probability, summed over heads; fp32, no gradient
    index_scores: jax.Array  # [B, T, k]: the indexer's score I[t, s] of the entry; fp32, gradient into the indexer
    valid: jax.Array  # [B, T, k] bool: a real, causally visible entry (sparse: idx >= 0)


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
