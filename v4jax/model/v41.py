"""The DeepSeek-V4.1 text model (architecture.md §12): the second model family, built from V4's parts.

Shared with V4 unchanged: RMSNorm / Linear, interleaved partial RoPE with the YaRN table, the mHC
coefficients (Sinkhorn) and hc_post, the core attention over [window | selected entries | sink], the
routed experts (dropless dispatch, expert parallelism) and the shared expert, the index score.
Different in V4.1 (architecture.md §12.3):

* Compressors of ratio 2 (fp32 gated pooling of 2 tokens, no `ape`, no overlap) and 1 (a normed
  projection per token, no gate); the latent's RoPE position is the first token of its group.
* Cross-layer sharing: only KV-source layers own a compressor; the layers after a source (up to the
  next) attend over the source's entries. Only index-source layers score; the layers between reuse
  the latest source's top-k. Index keys come from the source's compressor latent (`wk`, `k_norm`).
* Two-level top-k: the candidate source keeps the best blocks of entries per query; later index
  sources score only inside them.
* Queries have no per-head norm; every compressed layer picks its entries by top-k (no HCA rule).
* mHC pre-shift: each sublayer collapses the streams with the `pre` computed by the previous sublayer's
  unit (one-hot on stream 0 before the first); the final merge uses the last FFN unit's `pre` (no hc head).
* The router divides its logits by `gate_temp` and selects image-span tokens with `bias_vl`.
* Engram (`Engram`): at its layers, before the block, an n-gram table lookup is gated into each
  stream; the hash row ids are computed on the host (`v4jax.model.engram_hash`) and passed in.

One forward for prefill and decode (architecture.md §12.7): without a cache the call covers positions
0..T-1; with one (`init_v41_cache`) the tokens sit at each row's `lengths` and the layers read and
update their part of it (window ring, a KV source's pending tokens, entries and index keys).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.lightning_indexer_reference import index_scores
from pallas_kernels.sparse_attention_reference import entry_attention_mass
from sharding.context import constrain
from v4jax.config import AttentionKind, Remat, RunOptions, layer_schedule
from v4jax.config_v41 import V41Config
from v4jax.model import kernels
from v4jax.model.attention import past_indices
from v4jax.model.compressor import open_windows, ring_write
from v4jax.model.indexer import IndexerTraces
from v4jax.model.layers import Buffer, Embed, Linear, RMSNorm, param, rms_scale
from v4jax.model.mhc import HyperConnection, collapse
from v4jax.model.moe import Experts, Routing, RoutingStats, SharedExpert, affinity, routing_stats
from v4jax.model.rope import apply_rope, inv_frequencies
from v4jax.model.vision import (TOKEN_IMAGE, TOKEN_IMAGE_END, TOKEN_IMAGE_NEWLINE, TOKEN_IMAGE_START, Aligner,
                                VisionTower, encode_image, image_span_layout)


class Shared(NamedTuple):
    """What a layer hands to the layers after it (architecture.md §12.3); None until a source writes it."""

    entries: jax.Array | None = None  # [B, N, c] the latest KV source's compressed entries (RoPE'd)
    index_keys: jax.Array | None = None  # [B, N, c_I] its index keys (RoPE'd)
    topk: jax.Array | None = None  # [B, T, k] the latest index source's picks, -1 = none
    candidates: jax.Array | None = None  # [B, T, N] bool: the candidate source's kept entries


class LayerState(NamedTuple):
    """One layer's cache for B sequences; absent parts are None (architecture.md §12.7)."""

    window: jax.Array  # [B, W, c] ring of raw KV, slot = position mod W
    values: jax.Array | None = None  # ratio-2 KV source: [B, m, c] fp32 ring of the open group's values
    logits: jax.Array | None = None  # [B, m, c] fp32 gate logits, -inf where no token
    entries: jax.Array | None = None  # KV source: [B, N, c] entries (RoPE'd), N = max_len // m
    index_keys: jax.Array | None = None  # KV source: [B, N, c_I] index keys (RoPE'd)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class V41Cache:
    lengths: jax.Array  # [B] int32: tokens held per sequence (= the next token's position)
    layers: tuple[tuple[LayerState, ...], ...]  # per segment, per run (`layer_plan`): [*stack_dims, B, ...]
    dspark: tuple[jax.Array, ...]  # per DSpark stage [B, W, c]: ring of the main tokens' KV (slot = position mod W)
    dspark_lengths: jax.Array  # [B] int32: main tokens seeded into the DSpark rings
    max_len: int = dataclasses.field(metadata=dict(static=True))


def layer_kind(cfg: V41Config, layer: int) -> tuple:
    """What makes a backbone block's parameters and computation what they are: layers of one kind
    stack and scan together (architecture.md §12.3). Engram layers are their own kind (each its own table)."""
    index = layer in cfg.index_source_layers
    uses = index and cfg.candidate_source_layer is not None and cfg.candidate_source_layer < layer
    target = bool(cfg.n_mtp_layers) and layer in cfg.dspark_target_layer_ids  # DSpark reads its input streams
    return (cfg.ratio(layer), layer in cfg.kv_source_layers, index, layer == cfg.candidate_source_layer, uses,
            layer if layer in cfg.engram_layer_ids else None, target)


Run = tuple[tuple[int, ...], ...]  # a run's layer ids [repeats][count]


def layer_plan(cfg: V41Config) -> tuple[tuple[Run, ...], ...]:
    """How the backbone is stacked and scanned: consecutive blocks of one kind form a run (scanned
    over `count`), and a unit of runs repeated `repeats` times forms a segment (scanned over the
    repeats). The split minimises the blocks XLA compiles (`layer_schedule` over the runs).
    v41-flash without DSpark: 0 | 1 | (2, 3-7) x 2 | 14 | 15-19 | 20 | 21-23 | (24, 25-27) x 4: 10
    compiled blocks for 40 layers; with DSpark (37-39 feed it): ... | 20 | (21-23, 24) x 4 | 37-39."""
    runs: list[tuple[tuple, int]] = []
    for i in range(cfg.n_layers):
        kind = layer_kind(cfg, i)
        if runs and runs[-1][0] == kind:
            runs[-1] = (kind, runs[-1][1] + 1)
        else:
            runs.append((kind, 1))
    plan, layer = [], 0
    for unit, repeats in layer_schedule(tuple(runs)):
        ids = [np.zeros((repeats, count), np.int64) for _, count in unit]
        for r in range(repeats):
            for q, (_, count) in enumerate(unit):
                ids[q][r] = np.arange(layer, layer + count)
                layer += count
        plan.append(tuple(tuple(map(tuple, a.tolist())) for a in ids))
    return tuple(plan)


def stack_dims(run: Run) -> tuple[int, ...]:
    """The leading axes a run's parameters and cache carry: [repeats] if > 1, then [count] if > 1."""
    return tuple(n for n in np.shape(run) if n > 1)


def init_v41_cache(cfg: V41Config, batch: int, max_len: int, dtype=jnp.float32) -> V41Cache:
    """An empty cache for `batch` sequences of up to `max_len` tokens, stacked as the blocks are."""
    if max_len > cfg.max_seq_len:
        raise ValueError(f"max_len {max_len} exceeds the model's max_seq_len {cfg.max_seq_len}")

    def layer(i: int) -> LayerState:
        m, source = cfg.ratio(i), i in cfg.kv_source_layers
        state = LayerState(jnp.zeros((batch, cfg.window_size, cfg.head_dim), dtype))
        if source:
            n = max_len // m
            state = state._replace(entries=jnp.zeros((batch, n, cfg.head_dim), dtype),
                                   index_keys=jnp.zeros((batch, n, cfg.index_head_dim), dtype))
            if m > 1:
                state = state._replace(values=jnp.zeros((batch, m, cfg.head_dim), jnp.float32),
                                       logits=jnp.full((batch, m, cfg.head_dim), -jnp.inf, jnp.float32))
        return state

    def stacked(ids: np.ndarray) -> LayerState:  # layers of one kind: one state, broadcast over the stack
        return jax.tree.map(lambda a: jnp.broadcast_to(a, stack_dims(ids) + a.shape), layer(ids[0][0]))

    layers = tuple(tuple(stacked(ids) for ids in segment) for segment in layer_plan(cfg))
    rings = tuple(jnp.zeros((batch, cfg.window_size, cfg.head_dim), dtype) for _ in range(cfg.n_mtp_layers))
    return V41Cache(jnp.zeros((batch,), jnp.int32), layers, rings, jnp.zeros((batch,), jnp.int32), max_len)


def v41_cache_shardings(cache: V41Cache, mesh: jax.sharding.Mesh, rules) -> V41Cache:
    """NamedShardings for every V4.1 cache array (concrete or abstract): the sequences over the rules'
    `batch` axes (after a layer state's stack axes), the rest whole; a batch that does not divide them
    stays whole."""
    from jax.sharding import NamedSharding

    def shard(a, lead=0):
        axes = (None,) * lead + ("batch",) + (None,) * (a.ndim - lead - 1)
        return NamedSharding(mesh, rules.spec(axes, a.shape, mesh, what="activation"))

    layers = tuple(tuple(jax.tree.map(lambda a, n=state.window.ndim - 3: shard(a, n), state)  # window [*stack, B, W, c]
                         for state in states) for states in cache.layers)
    return dataclasses.replace(jax.tree.map(shard, dataclasses.replace(cache, layers=())), layers=layers)


def _rope_table(cfg: V41Config, ratio: int):
    """Ratio-0 layers: plain RoPE at rope_theta; compressed layers: compress_rope_theta with YaRN."""
    return inv_frequencies(cfg, AttentionKind.SLIDING if ratio == 0 else AttentionKind.CSA)


class Compressor(nnx.Module):
    """Ratio 2: per-channel softmax of fp32 gate logits over each pair of tokens weighting fp32 values;
    ratio 1: one latent per token, no gate. Then RMSNorm. Returns the latent before RoPE."""

    def __init__(self, cfg: V41Config, ratio: int, *, rngs: nnx.Rngs, options: RunOptions):
        pd, c = options.param_dtype, cfg.head_dim
        self.wkv = Linear(cfg.dim, c, ("embed", "compress_width"), param_dtype=pd, rngs=rngs)
        self.wgate = Linear(cfg.dim, c, ("embed", "compress_width"), param_dtype=pd, rngs=rngs) if ratio > 1 else None
        self.norm = RMSNorm(c, cfg.norm_eps, "head_dim", rngs=rngs)
        self.ratio = ratio

    def __call__(self, x: jax.Array, start: jax.Array | None = None, state: LayerState | None = None,
                 count: jax.Array | None = None):
        """x [B, T, d]. Without a state (positions 0..T-1): latents [B, T // m, c] (a trailing partial
        group pools nothing). With one (positions start + j, start [B]; each row's first `count` [B]
        tokens its own, the rest right padding): (latents [B, G, c], their group ids [B, G] (out of
        range: not complete in this call), values ring, logits ring) over the G windows the open group
        and the new tokens span."""
        B, T, _ = x.shape
        m = self.ratio
        if self.wgate is None:  # ratio 1: a latent per token, no state
            latents = self.norm(self.wkv(x))  # [B, T, c]
            if state is None:
                return latents
            j = jnp.arange(T)[None, :]
            return latents, jnp.where(j < count[:, None], start[:, None] + j, jnp.iinfo(jnp.int32).max), None, None
        x32 = x.astype(jnp.float32)
        new_v, new_l = self.wkv(x32, jnp.float32), self.wgate(x32, jnp.float32)  # [B, T, c]
        if state is None:
            n = T // m
            values, logits = new_v[:, :n * m].reshape(B, n, m, -1), new_l[:, :n * m].reshape(B, n, m, -1)
        else:  # the open group's tokens (from `base`), then the new ones, cut into whole windows
            base = (start // m) * m
            offset = start - base  # [B]
            seq_v, seq_l = open_windows(state.values, state.logits, new_v, new_l, base, offset, m)
            n = seq_v.shape[1] // m
            values, logits = seq_v.reshape(B, n, m, -1), seq_l.reshape(B, n, m, -1)
        pooled = jnp.sum(values * jax.nn.softmax(logits, axis=2), axis=2)  # [B, n, c] per channel over the group
        latents = self.norm(pooled.astype(x.dtype))
        if state is None:
            return latents
        k = jnp.arange(n)[None, :]
        done = ((k + 1) * m > offset[:, None]) & ((k + 1) * m <= (offset + count)[:, None])  # completed by a new token
        groups = jnp.where(done, base[:, None] // m + k, jnp.iinfo(jnp.int32).max)
        return (latents, groups, ring_write(state.values, new_v, start, count),
                ring_write(state.logits, new_l, start, count))


class Indexer(nnx.Module):
    """An index source: its own query projection and head weights; if it is also a KV source, the
    projection of its compressor's latents into index keys (`wk`, `k_norm`)."""

    def __init__(self, cfg: V41Config, owns_keys: bool, *, rngs: nnx.Rngs, options: RunOptions):
        pd = options.param_dtype
        self.wq_b = Linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim, ("q_lora", "index_heads"),
                           param_dtype=pd, rngs=rngs)
        self.weights_proj = Linear(cfg.dim, cfg.index_n_heads, ("embed", "index_heads"), param_dtype=pd, rngs=rngs)
        self.wk = Linear(cfg.head_dim, cfg.index_head_dim, ("head_dim", None), param_dtype=pd,
                         rngs=rngs) if owns_keys else None
        self.k_norm = RMSNorm(cfg.index_head_dim, cfg.norm_eps, None, rngs=rngs) if owns_keys else None
        self.n_heads, self.head_dim = cfg.index_n_heads, cfg.index_head_dim

    def keys(self, latents: jax.Array, positions: jax.Array, inv_freq) -> jax.Array:
        """latents [B, N, c] (before RoPE) at their groups' first tokens [N] -> index keys [B, N, c_I]."""
        return apply_rope(self.k_norm(self.wk(latents)), positions, inv_freq)

    def scores(self, x: jax.Array, cq: jax.Array, keys: jax.Array, positions: jax.Array, inv_freq) -> jax.Array:
        """I[t, s] = sum_h w[t, h] ReLU(q[t, h] . K[s]): [B, T, N] fp32 (architecture.md §4.4)."""
        q = apply_rope(self.wq_b(cq, heads=self.n_heads), positions[..., None], inv_freq)  # [B, T, n_I, c_I]
        w = self.weights_proj(x, jnp.float32) * (self.head_dim * self.n_heads) ** -0.5  # [B, T, n_I]
        return index_scores(q, w, keys)


def candidate_blocks(scores: jax.Array, visible: jax.Array, n_blocks: int, block: int) -> jax.Array:
    """Level one of the two-level top-k (architecture.md §12.3): scores [B, T, N] (-inf = not visible),
    visible [B, T] entries each query sees -> bool [B, T, N]: the entries of the `n_blocks` blocks of
    `block` entries with the best maximum score, the block of the newest visible entry always kept,
    blocks with no visible entry never."""
    B, T, N = scores.shape
    nb = -(-N // block)
    best = jnp.max(jnp.pad(scores, ((0, 0), (0, 0), (0, nb * block - N)), constant_values=-jnp.inf)
                   .reshape(B, T, nb, block), axis=-1)  # [B, T, nb]
    best = jnp.where(jnp.arange(nb) == ((visible - 1) // block)[..., None], jnp.inf, best)
    value, picked = jax.lax.top_k(best, min(n_blocks, nb))
    keep = jnp.zeros((B, T, nb), bool)
    keep = jax.vmap(jax.vmap(lambda k, i, v: k.at[i].set(v > -jnp.inf)))(keep, picked, value)
    return jnp.repeat(keep, block, axis=-1)[..., :N]


class Attention(nnx.Module):
    """Sliding window + (ratio > 0) the top-k entries of the layer's KV group, one softmax with sinks."""

    def __init__(self, cfg: V41Config, layer: int, *, rngs: nnx.Rngs, options: RunOptions):
        pd = options.param_dtype
        H, c, g = cfg.n_heads, cfg.head_dim, cfg.o_groups
        self.wq_a = Linear(cfg.dim, cfg.q_lora_rank, ("embed", "q_lora"), param_dtype=pd, rngs=rngs)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps, "q_lora", rngs=rngs)
        self.wq_b = Linear(cfg.q_lora_rank, H * c, ("q_lora", "heads"), param_dtype=pd, rngs=rngs)
        self.wkv = Linear(cfg.dim, c, ("embed", "head_dim"), param_dtype=pd, rngs=rngs)
        self.kv_norm = RMSNorm(c, cfg.norm_eps, "head_dim", rngs=rngs)
        self.wo_a = param(rngs, (g, H // g * c, cfg.o_lora_rank), ("o_groups", "heads", "o_lora"), pd)
        self.wo_b = Linear(g * cfg.o_lora_rank, cfg.dim, ("o_lora", "embed"), param_dtype=pd, rngs=rngs)
        self.sinks = param(rngs, (H,), ("heads",), jnp.float32, init="zeros")
        self.ratio = ratio = cfg.ratio(layer)
        kv_source, index_source = layer in cfg.kv_source_layers, layer in cfg.index_source_layers
        self.compressor = Compressor(cfg, ratio, rngs=rngs, options=options) if kv_source else None
        self.indexer = Indexer(cfg, kv_source, rngs=rngs, options=options) if index_source else None
        self.candidate_source = layer == cfg.candidate_source_layer
        self.uses_candidates = cfg.candidate_source_layer is not None and cfg.candidate_source_layer < layer
        self.cfg, self.options = cfg, options

    def __call__(self, x: jax.Array, shared: Shared, positions: jax.Array, state: LayerState | None = None,
                 traces: bool = False, count: jax.Array | None = None):
        """x [B, T, d] (attn_norm-ed) at positions [B, T] (0..T-1 without a state) -> (out [B, T, d],
        what later layers read, the layer's updated state | None, IndexerTraces | None: an index source's
        KL-loss inputs on request, architecture.md §12.10). count [B] (with a state): each row's first
        `count` tokens enter the cache, the rest are right padding."""
        cfg, m = self.cfg, self.ratio
        B, T, _ = x.shape
        inv_freq = _rope_table(cfg, m)
        cq = self.q_norm(self.wq_a(x))  # [B, T, d_c]
        q = apply_rope(self.wq_b(cq, heads=cfg.n_heads), positions[..., None], inv_freq)
        kv = apply_rope(self.kv_norm(self.wkv(x)), positions, inv_freq)  # [B, T, c]; q has no head norm
        entries = topk = trace = None
        if m:
            if self.compressor is not None:  # a KV source: its entries (and index keys) serve its group
                shared, state = self._compress(x, shared, positions, state, inv_freq, count)
            entries = shared.entries
            if self.indexer is not None:  # an index source: score, pick, publish
                topk, candidates, scores = self._select(x, cq, shared, positions, inv_freq)
                shared = shared._replace(topk=topk, candidates=candidates)
                if traces:  # the main attention's mass on the picks is the indexer's target (architecture.md §8.2)
                    if state is not None:
                        raise ValueError("indexer traces are a training output: call without a cache")
                    mass = entry_attention_mass(q, kv, self.sinks[...], cfg.window_size, entries, topk, m,
                                                self.options.attention_chunk)  # [B, T, k]
                    trace = IndexerTraces(mass, jnp.take_along_axis(scores, jnp.maximum(topk, 0), axis=-1), topk >= 0)
            topk = shared.topk
        core = kernels.sparse_attention(self.options.attention_impl)
        if state is None:
            o = core(q, kv, self.sinks[...], cfg.window_size, entries, topk, m, self.options.attention_chunk)
        else:  # the new tokens' own window through the core's band, the past as index lists
            past, idx = past_indices(state.window, entries, topk, positions, m)
            o = core(q, kv, self.sinks[...], cfg.window_size, past, idx, m, self.options.attention_chunk)
            state = state._replace(window=ring_write(state.window, kv, positions[:, 0], count))
        return self.project_out(o, positions, inv_freq, x.dtype), shared, state, trace

    def project_out(self, o: jax.Array, positions: jax.Array, inv_freq, dtype) -> jax.Array:
        """o [B, T, H, c] -> de-rotated at the query, grouped low-rank output projection -> [B, T, d]."""
        B, T = o.shape[:2]
        g = self.cfg.o_groups
        o = apply_rope(o, positions[..., None], inv_freq, inverse=True)  # [B, T, H, c]
        o = jnp.moveaxis(o.reshape(B * T, g, -1), 1, 0)  # [g, B*T, (H/g)*c]
        u = jnp.einsum("gni,gio->gno", o, self.wo_a[...].astype(o.dtype), preferred_element_type=jnp.float32)
        return self.wo_b(jnp.moveaxis(u, 0, 1).astype(dtype).reshape(B, T, -1))

    def _compress(self, x, shared: Shared, positions, state: LayerState | None, inv_freq, count=None):
        """A KV source's entries and index keys (the whole call's, or the cache's buffers with the groups
        this call completes written in) published for its group."""
        m = self.ratio
        if state is None:
            latents = self.compressor(x)  # [B, N, c] before RoPE
            first = m * jnp.arange(latents.shape[1], dtype=jnp.int32)  # each group's first token
            # index keys read the latent detached: the indexers learn only from their KL loss (architecture.md §8.2)
            key_in = jax.lax.stop_gradient(latents) if self.options.indexer_detach else latents
            return shared._replace(entries=apply_rope(latents, first, inv_freq),
                                   index_keys=self.indexer.keys(key_in, first, inv_freq)), None
        latents, groups, values, logits = self.compressor(x, positions[:, 0], state, count)  # groups [B, G]
        first = m * jnp.where(groups < state.entries.shape[1], groups, 0)  # [B, G]: each group's first token
        entries = apply_rope(latents, first, inv_freq).astype(state.entries.dtype)
        keys = self.indexer.keys(latents, first, inv_freq).astype(state.index_keys.dtype)
        write = jax.vmap(lambda buf, i, v: buf.at[i].set(v, mode="drop"))  # incomplete groups: out of range
        state = state._replace(values=values, logits=logits, entries=write(state.entries, groups, entries),
                               index_keys=write(state.index_keys, groups, keys))
        return shared._replace(entries=state.entries, index_keys=state.index_keys), state

    def _select(self, x, cq, shared: Shared, positions, inv_freq):
        """Top-k entries per query: [B, T, k] sorted ids, -1 for picks the query cannot see; the
        candidate mask this layer publishes (the source's own, or the one it received); the scores
        [B, T, N] before any masking (the KL loss reads them at the picks)."""
        cfg, m = self.cfg, self.ratio
        keys = shared.index_keys  # [B, N, c_I]
        N = keys.shape[1]
        visible = (positions + 1) // m  # [B, T] entries each query sees
        if self.options.indexer_detach:  # the indexer learns only from its KL loss (architecture.md §8.2)
            x, cq = jax.lax.stop_gradient((x, cq))
        raw = self.indexer.scores(x, cq, keys, positions, inv_freq)
        scores = jnp.where(jnp.arange(N) < visible[..., None], raw, -jnp.inf)  # [B, T, N]
        candidates = shared.candidates
        if self.candidate_source:  # its own top-k stays unrestricted
            candidates = candidate_blocks(scores, visible, cfg.candidate_topk_blocks, cfg.candidate_block_size)
        elif self.uses_candidates:
            scores = jnp.where(candidates, scores, -jnp.inf)
        k = min(cfg.index_topk, N)
        picked = jnp.sort(jax.lax.top_k(scores, k)[1], axis=-1)
        return jnp.where(picked < visible[..., None], picked, -1).astype(jnp.int32), candidates, raw


class Gate(nnx.Module):
    """Learned router: affinities of logits / gate_temp; `bias` (or `bias_vl` on image-span tokens)
    only chooses the experts; weights renormalised (k > 1) and scaled."""

    def __init__(self, cfg: V41Config, *, rngs: nnx.Rngs, options: RunOptions):
        E = cfg.n_routed_experts
        self.weight = Linear(cfg.dim, E, ("embed", "experts"), param_dtype=options.param_dtype, rngs=rngs)
        self.bias = Buffer(jnp.zeros((E,), jnp.float32), logical_axes=("experts",))
        self.bias_vl = Buffer(jnp.zeros((E,), jnp.float32), logical_axes=("experts",)) if cfg.vision_n_layers else None
        self.cfg = cfg

    def __call__(self, x: jax.Array, image: jax.Array | None) -> Routing:
        """x [N, d], image [N] bool or None -> Routing."""
        cfg = self.cfg
        scores = affinity(self.weight(x, jnp.float32) / cfg.gate_temp, cfg.score_func)  # [N, E]
        bias = self.bias[...]
        if image is not None and self.bias_vl is not None:
            bias = jnp.where(image[:, None], self.bias_vl[...], bias)
        experts = jax.lax.top_k(scores + bias, cfg.n_activated_experts)[1]
        w = jnp.take_along_axis(scores, experts, axis=-1)
        if cfg.norm_topk_prob and cfg.n_activated_experts > 1:
            w = w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-20)
        return Routing(w * cfg.route_scale, experts.astype(jnp.int32), scores)


class MoE(nnx.Module):
    def __init__(self, cfg: V41Config, *, rngs: nnx.Rngs, options: RunOptions):
        self.gate = Gate(cfg, rngs=rngs, options=options)
        self.experts = Experts(cfg, rngs=rngs, options=options)
        self.shared_experts = SharedExpert(cfg, rngs=rngs, options=options)

    def __call__(self, x: jax.Array, image: jax.Array | None) -> tuple[jax.Array, Routing]:
        """x [B, T, d], image [B, T] bool or None -> ([B, T, d], Routing over the B*T tokens)."""
        B, T, d = x.shape
        routing = self.gate(x.reshape(B * T, d), None if image is None else image.reshape(-1))
        return (self.experts(x, routing) + self.shared_experts(x)).astype(x.dtype), routing


ENGRAM_ROW_MULTIPLE = 4096  # Engram tables are padded to this many rows: they split over any mesh up to 4096


def engram_table_rows(rows: int) -> int:
    """Rows allocated for a table of `rows` hash buckets (the padding is never hashed to)."""
    return -(-rows // ENGRAM_ROW_MULTIPLE) * ENGRAM_ROW_MULTIPLE


class Engram(nnx.Module):
    """Engram conditional memory at one layer (architecture.md §12.4): the rows of the hashed n-grams
    -> one key per stream and a shared value; each stream takes the value times a gate from the
    normalised stream-key product (signed square root, then sigmoid); image positions pass unchanged.
    The table (384e6 rows at the released size) splits its columns (`engram_cols`): every device looks
    up its columns of every token's rows, and one all-to-all hands each token its row (architecture.md
    §12.9; split by rows, the partitioner gathered every token's rows on every device)."""

    def __init__(self, cfg: V41Config, rows: int, *, rngs: nnx.Rngs, options: RunOptions):
        pd, n, d = options.param_dtype, cfg.hc_mult, cfg.dim
        cols = (cfg.engram_max_ngram_size - 1) * cfg.engram_n_heads
        rows = engram_table_rows(rows)
        self.table = param(rngs, (rows, cfg.engram_head_dim), (None, "engram_cols"), pd)  # [rows, hd]
        self.wkv = Linear(cols * cfg.engram_head_dim, (n + 1) * d, (None, "embed"), param_dtype=pd, rngs=rngs)
        self.q_weight = param(rngs, (n, d), ("hc", "embed"), jnp.float32, init="ones")
        self.k_weight = param(rngs, (n, d), ("hc", "embed"), jnp.float32, init="ones")
        self.n, self.d, self.eps = n, d, cfg.norm_eps

    def __call__(self, streams: jax.Array, ids: jax.Array, text: jax.Array | None) -> jax.Array:
        """streams [B, T, n_hc, d]; ids [B, T, cols] rows of this layer's table; text [B, T] bool or None
        (False: an image position, gate 0)."""
        B, T = ids.shape[:2]
        ids = constrain(ids, (None, None, None))  # every token's ids on every device
        rows = jnp.take(self.table[...], ids, axis=0).astype(streams.dtype)  # [B, T, cols, head_dim]
        rows = constrain(constrain(rows, (None, None, None, "engram_cols")), ("batch", "seq", None, None))
        kv = self.wkv(rows.reshape(B, T, -1), jnp.float32)  # [B, T, (n_hc + 1) d]
        key, value = kv[..., :self.n * self.d].reshape(B, T, self.n, self.d), kv[..., self.n * self.d:]
        h = streams.astype(jnp.float32)
        rstd = (rms_scale(h, self.eps) * rms_scale(key, self.eps))[..., 0]  # [B, T, n_hc]: per stream
        dot = jnp.sum(h * (self.q_weight[...] * self.k_weight[...]) * key, axis=-1) * rstd * self.d ** -0.5
        gate = jax.nn.sigmoid(jnp.sign(dot) * jnp.sqrt(jnp.maximum(jnp.abs(dot), 1e-6)))
        if text is not None:
            gate = jnp.where(text[..., None], gate, 0.0)
        return (h + gate[..., None] * value[:, :, None, :]).astype(streams.dtype)


def widen(e: jax.Array, n_hc: int) -> tuple[jax.Array, jax.Array]:
    """Embeddings [B, T, d] -> (n_hc copies [B, T, n_hc, d], the one-hot pre on stream 0 [B, T, n_hc]
    that the first sublayer collapses with)."""
    B, T, d = e.shape
    return (jnp.broadcast_to(e[:, :, None, :], (B, T, n_hc, d)),
            jnp.zeros((B, T, n_hc), jnp.float32).at[..., 0].set(1.0))


def preshift_sublayers(unit, streams: jax.Array, pre: jax.Array, attend, image):
    """mHC with the pre-shift around a unit's attention and MoE (architecture.md §12.3), shared by the
    backbone blocks and the DSpark stages: the attention input is collapsed with `pre` (the previous
    sublayer's), the FFN input with the `pre` computed from the unit's input. attend(x [B, T, d]) ->
    (out [B, T, d], aux). Returns (streams, the pre for the next unit, aux, the MoE's Routing)."""
    attn_pre, post, comb = unit.attn_hc.coefficients(streams)  # from the unit's input
    a, aux = attend(unit.attn_norm(collapse(pre, streams)))
    streams = unit.attn_hc.hc_post(a, streams, post, comb)
    ffn_pre, post, comb = unit.ffn_hc.coefficients(streams)
    y, routing = unit.ffn(unit.ffn_norm(collapse(attn_pre, streams)), image)
    return unit.ffn_hc.hc_post(y, streams, post, comb), ffn_pre, aux, routing


class Block(nnx.Module):
    """One V4.1 block: [Engram], mHC around attention and around the MoE with the pre-shift."""

    def __init__(self, cfg: V41Config, layer: int, *, rngs: nnx.Rngs, options: RunOptions):
        self.attn_hc = HyperConnection(cfg, rngs=rngs)
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, "embed", rngs=rngs)
        self.attn = Attention(cfg, layer, rngs=rngs, options=options)
        self.ffn_hc = HyperConnection(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, "embed", rngs=rngs)
        self.ffn = MoE(cfg, rngs=rngs, options=options)
        engram = layer in cfg.engram_layer_ids
        rows = cfg.engram_num_embeddings[cfg.engram_layer_ids.index(layer)] if engram else 0
        self.engram = Engram(cfg, rows, rngs=rngs, options=options) if engram else None

    def __call__(self, streams, pre, shared: Shared, image, positions, state: LayerState | None = None,
                 traces: bool = False, count: jax.Array | None = None):
        """streams [B, T, n_hc, d]; pre [B, T, n_hc] from the previous sublayer -> (streams, the pre
        for the next block's attention, shared, the layer's state | None, RoutingStats [B, E],
        IndexerTraces | None). count [B]: the tokens of each row that enter the cache."""
        def attend(x):
            out, new_shared, new_state, trace = self.attn(x, shared, positions, state, traces, count)
            return out, (new_shared, new_state, trace)

        streams, pre, (shared, state, trace), routing = preshift_sublayers(self, streams, pre, attend, image)
        return streams, pre, shared, state, routing_stats(routing, *streams.shape[:2]), trace


class Context(NamedTuple):
    """What every backbone layer of one call reads besides the carried streams."""

    positions: jax.Array  # [B, T]
    image: jax.Array | None  # [B, T] bool: image-span positions (bias_vl)
    text: jax.Array | None  # [B, T] bool: not image (Engram's gate)
    engram_ids: jax.Array | None  # [B, T, n_engram_layers, cols]
    keep_hidden: bool
    traces: bool = False  # index sources return their IndexerTraces
    count: jax.Array | None = None  # [B] (cached calls): each row's tokens that enter the cache


def _settle(fn, carry, xs):
    """`carry` with each Shared field that `fn` (a scan body) writes but does not receive in the written
    shape set to zeros of that shape (a KV source's entries after ratio-0 layers, or after another
    ratio's), so the scan's carry keeps one structure. The body overwrites such a field before any of
    its layers reads it: a layer reads the latest source of its own ratio."""
    written = jax.eval_shape(fn, carry, jax.tree.map(lambda a: a[0], xs))[0][2]
    streams, pre, shared = carry
    fill = {f: jnp.zeros(w.shape, w.dtype) for f, have, w in zip(Shared._fields, shared, written)
            if w is not None and (have is None or (have.shape, have.dtype) != (w.shape, w.dtype))}
    return streams, pre, shared._replace(**fill)


class Segment(nnx.Module):
    """A unit of runs repeated `repeats` times (`layer_plan`). Run q is `count` consecutive blocks of
    one kind whose parameters are stacked on leading "layers" axes ([repeats] if > 1, then [count]
    if > 1): a scan over the count inside a scan over the repeats, so each kind compiles once."""

    def __init__(self, cfg: V41Config, ids: tuple[Run, ...], *, rngs: nnx.Rngs, options: RunOptions):
        runs = []
        for run in ids:
            layer, lead = run[0][0], stack_dims(run)
            if not lead:
                runs.append(Block(cfg, layer, rngs=rngs, options=options))
                continue

            def make(key, layer=layer):
                return nnx.split(Block(cfg, layer, rngs=nnx.Rngs(params=key), options=options))[1]

            graphdef = nnx.graphdef(nnx.eval_shape(lambda layer=layer: Block(cfg, layer, rngs=nnx.Rngs(0),
                                                                             options=options)))
            keys = jax.random.split(rngs.params(), math.prod(lead))
            build = make
            for _ in lead:
                build = jax.vmap(build)
            block = nnx.merge(graphdef, build(keys.reshape(lead + keys.shape[1:])))
            for _, var in nnx.to_flat_state(nnx.state(block)):
                var.set_metadata(logical_axes=("layers",) * len(lead) + tuple(var.get_metadata()["logical_axes"]))
            runs.append(block)
        self.runs = nnx.List(runs)
        self.ids, self.cfg, self.remat = ids, cfg, options.remat

    def _step(self, q: int, ctx: Context):
        """One block of run q as a scan body: ((streams, pre, shared), (params, state)) -> (carry,
        (streams | None, DSpark target | None, Engram input | None, RoutingStats, IndexerTraces | None,
        state | None))."""
        cfg, layer = self.cfg, self.ids[q][0][0]
        graphdef = nnx.graphdef(self.runs[q])
        target = layer_kind(cfg, layer)[-1]

        def step(carry, xs):
            streams, pre, shared = carry
            params, state = xs
            block = nnx.merge(graphdef, params)
            engram_in = feature = None
            if block.engram is not None:  # Engram layers are their own kind: never stacked
                streams = block.engram(streams, ctx.engram_ids[:, :, cfg.engram_layer_ids.index(layer)], ctx.text)
                engram_in = streams
            if target:
                feature = jnp.mean(streams.astype(jnp.float32), axis=2)  # [B, T, d]
            streams, pre, shared, state, stats, trace = block(streams, pre, shared, ctx.image, ctx.positions, state,
                                                              ctx.traces, ctx.count)
            return (streams, pre, shared), (streams if ctx.keep_hidden else None, feature, engram_in, stats, trace,
                                            state)

        if self.remat is not Remat.NONE:
            policy = None if self.remat is Remat.FULL else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
            step = jax.checkpoint(step, policy=policy, prevent_cse=False)
        return step

    def __call__(self, carry, ctx: Context, states: tuple[LayerState, ...] | None):
        """carry (streams [B, T, n_hc, d], pre [B, T, n_hc], Shared); states: per run the stacked cache
        (None: a stateless call) -> (carry, per run the step outputs stacked [*stack_dims, ...]).

        A stateless call (training) scans the parameter stacks themselves: each iteration's slice is the
        scan's input, so the backward pass returns each layer's gradient as its own slice. A cached call
        (prefill, decode; never differentiated) scans layer indices instead and each block reads its
        slice of the full stacks in place: a repeat's slice of a run's [repeats, count, ...] stack, fed
        to the inner scan, would be copied out of the stack once per repeat (architecture.md §12.3)."""
        params = [nnx.state(run) for run in self.runs]
        in_place = states is not None
        states = (None,) * len(self.runs) if states is None else states
        repeats, counts = len(self.ids[0]), [len(run[0]) for run in self.ids]

        def layer(q, r, c):  # run q's block at repeat r, position c (None: that stack dim is absent)
            idx = tuple(i for i in (r, c) if i is not None)
            return jax.tree.map(lambda a: a[idx], params[q]) if idx else params[q]

        def unit(carry, xs):  # one repeat of the unit
            r, runs = xs
            outs = []
            for q, (p, st) in enumerate(runs):
                step = self._step(q, ctx)
                if counts[q] > 1 and in_place:
                    def indexed(carry, xs, q=q, step=step):
                        return step(carry, (layer(q, r, xs[0]), xs[1]))

                    inputs = (jnp.arange(counts[q]), st)
                    carry, out = jax.lax.scan(indexed, _settle(indexed, carry, inputs), inputs)
                elif counts[q] > 1:
                    carry, out = jax.lax.scan(step, _settle(step, carry, (p, st)), (p, st))
                else:
                    carry, out = step(carry, (layer(q, r, None) if in_place else p, st))
                outs.append(out)
            return carry, tuple(outs)

        runs = tuple(zip([None] * len(params) if in_place else params, states))
        if repeats > 1:
            xs = (jnp.arange(repeats) if in_place else None, runs)
            return jax.lax.scan(unit, _settle(unit, carry, xs), xs)
        return unit(carry, (None, runs))


def sink_attention(q: jax.Array, keys: jax.Array, valid: jax.Array, sinks: jax.Array) -> jax.Array:
    """A few queries over an explicit key set (DSpark's draft block): q [B, Q, H, c], keys [B, K, c]
    (key = value), valid [B, K] bool -> [B, Q, H, c]; one fp32 softmax over the keys and the per-head
    sink, scale c**-0.5 (the core attention's rule, architecture.md §4.5, for a non-causal key set)."""
    logits = jnp.einsum("bqhc,bkc->bhqk", q, keys, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    logits = jnp.where(valid[:, None, None, :], logits, -jnp.inf)
    sink = sinks.astype(jnp.float32)[None, :, None, None]  # [1, H, 1, 1]
    top = jnp.maximum(jnp.max(logits, axis=-1, keepdims=True), sink)
    p = jnp.exp(logits - top)
    out = jnp.einsum("bhqk,bkc->bqhc", p, keys.astype(jnp.float32))
    return (out / jnp.moveaxis(jnp.sum(p, axis=-1, keepdims=True) + jnp.exp(sink - top), 1, 2)).astype(q.dtype)


class DSparkStage(nnx.Module):
    """One DSpark drafting stage (architecture.md §12.8): a ratio-0 block whose attention keys are the
    main model's tokens (their features through `main_proj` / `main_norm`, kept in a window ring) and
    the draft block itself (not causal inside the block); its MoE has the DSpark expert count. The
    first stage owns the feature projection, the last the norm, the Markov bias head and the
    confidence head."""

    def __init__(self, cfg: V41Config, stage: int, *, rngs: nnx.Rngs, options: RunOptions):
        pd, d = options.param_dtype, cfg.dim
        layer = cfg.n_layers + stage
        self.attn_hc = HyperConnection(cfg, rngs=rngs)
        self.attn_norm = RMSNorm(d, cfg.norm_eps, "embed", rngs=rngs)
        self.attn = Attention(cfg, layer, rngs=rngs, options=options)
        self.ffn_hc = HyperConnection(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(d, cfg.norm_eps, "embed", rngs=rngs)
        self.ffn = MoE(cfg.replace(n_routed_experts=cfg.dspark_n_routed_experts,
                                   n_activated_experts=cfg.dspark_n_activated_experts), rngs=rngs, options=options)
        first, last = stage == 0, stage == cfg.n_mtp_layers - 1
        n_t, r, V = len(cfg.dspark_target_layer_ids), cfg.dspark_markov_rank, cfg.vocab_size
        self.main_proj = Linear(d * n_t, d, (None, "embed"), param_dtype=pd, rngs=rngs) if first else None
        self.main_norm = RMSNorm(d, cfg.norm_eps, "embed", rngs=rngs) if first else None
        self.norm = RMSNorm(d, cfg.norm_eps, "embed", rngs=rngs) if last else None
        self.markov_embed = param(rngs, (V, r), ("vocab", None), pd) if last else None
        self.markov_head = Linear(r, V, (None, "vocab"), param_dtype=pd, rngs=rngs) if last else None
        self.confidence = Linear(d + r, 1, (None, None), param_dtype=jnp.float32, rngs=rngs) if last else None
        self.cfg = cfg

    def attend(self, x: jax.Array | None, main_x: jax.Array, ring: jax.Array, start: jax.Array, count: jax.Array):
        """Write the main tokens' KV (main_x [B, S, d] at positions start + j, each row's first `count`)
        into the ring; with a draft block x [B, bs, d] (positions after the last main token), attend over
        the ring and the block. -> (out [B, bs, d] | None, ring)."""
        a, cfg = self.attn, self.cfg
        inv_freq = _rope_table(cfg, 0)
        B, S, _ = main_x.shape
        main_pos = start[:, None] + jnp.arange(S, dtype=jnp.int32)
        ring = ring_write(ring, apply_rope(a.kv_norm(a.wkv(main_x)), main_pos, inv_freq).astype(ring.dtype),
                          start, count)
        if x is None:
            return None, ring
        bs, W = x.shape[1], ring.shape[1]
        newest = start + count - 1  # [B]: the last main token's position
        pos = newest[:, None] + 1 + jnp.arange(bs, dtype=jnp.int32)  # [B, bs]
        q = apply_rope(a.wq_b(a.q_norm(a.wq_a(x)), heads=cfg.n_heads), pos[..., None], inv_freq)
        kv = apply_rope(a.kv_norm(a.wkv(x)), pos, inv_freq)  # [B, bs, c]
        held = newest[:, None] - (newest[:, None] - jnp.arange(W)) % W  # [B, W]: position in each ring slot
        valid = jnp.concatenate([held >= 0, jnp.ones((B, bs), bool)], axis=1)
        o = sink_attention(q, jnp.concatenate([ring.astype(kv.dtype), kv], axis=1), valid, a.sinks[...])
        return a.project_out(o, pos, inv_freq, x.dtype), ring


class Draft(NamedTuple):
    ids: jax.Array  # [B, bs + 1]: the sampled token, then the bs drafted ones (greedy)
    logits: jax.Array  # [B, bs, V] fp32: head + Markov bias per draft position
    confidence: jax.Array  # [B, bs] fp32


class Image(NamedTuple):
    """One image of a prompt: its span starts at `start` in row `row`; patches [h*w, 3*p*p] on the ViT
    grid (h, w) (static ints)."""

    row: int
    start: int
    patches: jax.Array
    grid: tuple[int, int]


class V41Output(NamedTuple):
    logits: jax.Array  # [B, T, V] fp32
    hidden_states: tuple[jax.Array, ...] | None  # L x [B, T, n_hc, d]: each block's output streams
    engram_inputs: tuple[jax.Array, ...]  # per Engram layer [B, T, n_hc, d]: the streams after its update
    target_features: jax.Array | None  # [B, T, n_targets * d]: DSpark's inputs (stream means); None without DSpark
    routing: RoutingStats | None = None  # [L, B, E] per backbone layer, in layer order (balance loss, bias update)
    indexer: tuple[IndexerTraces, ...] | None = None  # per index source, layer order ([B, T, k] each), on request
    cache: V41Cache | None = None  # the updated cache (a cached call)


class V41Transformer(nnx.Module):
    """embed -> n_hc copies -> blocks (Engram before its layers) -> collapse with the last pre -> norm -> head."""

    def __init__(self, cfg: V41Config, *, rngs: nnx.Rngs, options: RunOptions = RunOptions()):
        pd = options.param_dtype
        self.embed = Embed(cfg.vocab_size, cfg.dim, param_dtype=pd, rngs=rngs)
        self.plan = layer_plan(cfg)
        self.segments = nnx.List([Segment(cfg, ids, rngs=rngs, options=options) for ids in self.plan])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, "embed", rngs=rngs)
        self.head = Linear(cfg.dim, cfg.vocab_size, ("embed", "vocab"), param_dtype=pd, rngs=rngs)
        self.dspark = nnx.List([DSparkStage(cfg, k, rngs=rngs, options=options) for k in range(cfg.n_mtp_layers)])
        if cfg.vision_n_layers:  # the ViT, its aligner and the span delimiters' learned embeddings
            self.vision = VisionTower(cfg, rngs, param_dtype=pd)
            self.aligner = Aligner(cfg, rngs, param_dtype=pd)
            self.image_start, self.image_end, self.image_newline = (
                param(rngs, (cfg.dim,), ("embed",), pd) for _ in range(3))
        self.cfg, self.options = cfg, options

    def embed_prompt(self, tokens: jax.Array, images: tuple[Image, ...] = ()) -> tuple[jax.Array, jax.Array]:
        """Input embeddings with each image's span replaced (architecture.md §12.5): IMAGE slots take
        the aligner rows in row-major order, START / NEWLINE / END their learned vectors.
        tokens [B, T] -> (embeddings [B, T, d], image [B, T] bool: the span positions)."""
        e = self.embed(tokens, jnp.dtype(self.options.dtype))  # [B, T, d]
        image = jnp.zeros(tokens.shape, bool)
        for img in images:
            span = image_span_layout(img.grid, self.cfg.vision_downsample_ratio)
            types = span.token_types  # [n] static
            rows = encode_image(self.vision, self.aligner, img.patches, img.grid).astype(e.dtype)  # [h'*w', d]
            slot = np.maximum(np.cumsum(types == TOKEN_IMAGE) - 1, 0)  # aligner row of each IMAGE slot
            delim = {TOKEN_IMAGE_START: self.image_start, TOKEN_IMAGE_NEWLINE: self.image_newline,
                     TOKEN_IMAGE_END: self.image_end}
            values = jnp.stack([rows[slot[j]] if k == TOKEN_IMAGE else delim[k][...].astype(e.dtype)
                                for j, k in enumerate(types)])  # [n, d]
            e = e.at[img.row, img.start:img.start + span.n_tokens].set(values)
            image = image.at[img.row, img.start:img.start + span.n_tokens].set(True)
        return e, image

    def __call__(self, tokens: jax.Array, engram_ids: jax.Array | None = None, image: jax.Array | None = None,
                 embeddings: jax.Array | None = None, cache: V41Cache | None = None,
                 return_hidden_states: bool = True, return_indexer_traces: bool = False,
                 n_valid: jax.Array | None = None) -> V41Output:
        """tokens [B, T]: from position 0, or with a cache at each row's cache.lengths (prefill into an
        empty cache, decode, chunks). engram_ids [B, T, n_engram_layers, cols] (host-computed hash rows,
        `engram_hash`, with the history for a cached call); image [B, T] bool: image-span positions
        (bias_vl, Engram gate 0); embeddings [B, T, d] or None: the input embeddings with the image
        spans already placed (`embed_prompt`). return_hidden_states=False: no per-layer streams (a
        training step keeps only what its backward needs); return_indexer_traces: each index source's
        KL-loss inputs (V41Output.indexer, architecture.md §12.10), stateless calls only. n_valid [B]
        (with a cache): each row's first n_valid tokens are its own and enter the cache, the rest are
        right padding (rows of several lengths in one call; a row with 0 is left as it was); their
        outputs are computed and meaningless."""
        cfg = self.cfg
        B, T = tokens.shape
        if n_valid is not None and cache is None:
            raise ValueError("n_valid is for cached calls (right-padded rows entering a cache)")
        start = jnp.zeros((B,), jnp.int32) if cache is None else cache.lengths
        count = None if cache is None else (jnp.full((B,), T, jnp.int32) if n_valid is None else
                                            jnp.asarray(n_valid, jnp.int32))
        positions = start[:, None] + jnp.arange(T, dtype=jnp.int32)  # [B, T]
        if cfg.engram_layer_ids and engram_ids is None:
            raise ValueError(f"this model has Engram layers {list(cfg.engram_layer_ids)}: pass engram_ids "
                             f"[B, T, {len(cfg.engram_layer_ids)}, cols] (v4jax.model.engram_hash)")
        e = self.embed(tokens, jnp.dtype(self.options.dtype)) if embeddings is None else embeddings  # [B, T, d]
        ctx = Context(positions, image, None if image is None else ~image, engram_ids, return_hidden_states,
                      return_indexer_traces, count)
        carry = (*widen(e, cfg.hc_mult), Shared())  # streams [B, T, n_hc, d], one-hot pre
        per_layer: dict[int, tuple] = {}  # layer -> (streams, DSpark target, Engram input, stats, indexer traces)
        states = []
        for s, (segment, ids) in enumerate(zip(self.segments, self.plan)):
            carry, outs = segment(carry, ctx, None if cache is None else cache.layers[s])
            for run, out in zip(ids, outs):
                run = np.asarray(run)
                for at in np.ndindex(*run.shape):  # the stacked outputs back in layer order
                    idx = tuple(i for i, n in zip(at, run.shape) if n > 1)
                    per_layer[int(run[at])] = tuple(None if o is None else jax.tree.map(lambda a: a[idx], o)
                                                    for o in out[:5])
            states.append(tuple(out[5] for out in outs))
        streams, pre, _ = carry
        h = self.norm(collapse(pre, streams))  # [B, T, d]: the last FFN unit's pre, no hc head
        logits = self.head(h, jnp.float32)
        ordered = [per_layer[i] for i in range(cfg.n_layers)]
        targets = [t for _, t, *_ in ordered if t is not None]
        new_cache = None if cache is None else dataclasses.replace(cache, lengths=start + count, layers=tuple(states))
        routing = jax.tree.map(lambda *a: jnp.stack(a), *(r for *_, r, _ in ordered))
        indexer = tuple(t for *_, t in ordered if t is not None) if return_indexer_traces else None
        return V41Output(logits, tuple(h for h, *_ in ordered) if return_hidden_states else None,
                         tuple(g for _, _, g, *_ in ordered if g is not None),
                         jnp.concatenate(targets, axis=-1) if targets else None, routing, indexer, new_cache)

    def block(self, layer: int) -> Block:
        """Backbone layer `layer`'s block, its parameters sliced out of their stack (a copy, for reading)."""
        for segment, ids in zip(self.segments, self.plan):
            for run, block_ids in zip(segment.runs, map(np.asarray, ids)):
                hit = np.argwhere(block_ids == layer)
                if len(hit):
                    idx = tuple(int(i) for i, n in zip(hit[0], block_ids.shape) if n > 1)
                    graphdef, state = nnx.split(run)
                    return nnx.merge(graphdef, jax.tree.map(lambda a: a[idx], state))
        raise IndexError(f"layer {layer} out of range: the model has {self.cfg.n_layers}")

    def draft(self, features: jax.Array, cache: V41Cache, token: jax.Array | None = None,
              n_valid: jax.Array | None = None):
        """DSpark (architecture.md §12.8). features [B, S, n_targets * d]: `V41Output.target_features` of
        the main tokens at positions cache.dspark_lengths + j (a prefill's, or one decode step's); their
        KV enters every stage's ring. With `token` [B] (the token just sampled after them) the stages
        draft a block [token, noise...] and return a Draft. n_valid [B]: each row's features are its first
        n_valid (a right-padded prefill's). -> (Draft | None, cache)."""
        cfg, stages = self.cfg, self.dspark
        if not stages:
            raise ValueError("this model has no DSpark stages (n_mtp_layers = 0)")
        B, S, _ = features.shape
        start = cache.dspark_lengths
        count = jnp.full((B,), S, jnp.int32) if n_valid is None else jnp.asarray(n_valid, jnp.int32)
        main_x = stages[0].main_norm(stages[0].main_proj(features.astype(jnp.dtype(self.options.dtype))))  # [B, S, d]
        rings, h, pre = list(cache.dspark), None, None
        if token is not None:
            bs = cfg.dspark_block_size
            block = jnp.concatenate([token[:, None], jnp.full((B, bs - 1), cfg.dspark_noise_token_id, token.dtype)], 1)
            h, pre = widen(self.embed(block, jnp.dtype(self.options.dtype)), cfg.hc_mult)  # [B, bs, n_hc, d]
        for k, stage in enumerate(stages):
            if h is None:
                _, rings[k] = stage.attend(None, main_x, rings[k], start, count)
            else:  # drafts are text: no bias_vl
                h, pre, rings[k], _ = preshift_sublayers(
                    stage, h, pre, lambda x, ring=rings[k], stage=stage: stage.attend(x, main_x, ring, start, count),
                    None)
        cache = dataclasses.replace(cache, dspark=tuple(rings), dspark_lengths=start + count)
        if h is None:
            return None, cache
        last = stages[-1]
        x = collapse(pre, h)  # [B, bs, d]
        logits = self.head(last.norm(x), jnp.float32)  # [B, bs, V]
        ids, marks, rows = [token], [], []
        for i in range(cfg.dspark_block_size):  # the Markov bias of the previous token, then greedy
            mark = jnp.take(last.markov_embed[...], ids[-1], axis=0)  # [B, r]
            row = logits[:, i] + last.markov_head(mark, jnp.float32)
            ids.append(jnp.argmax(row, axis=-1).astype(token.dtype))
            marks.append(mark)
            rows.append(row)
        confidence = last.confidence(jnp.concatenate([x, jnp.stack(marks, 1).astype(x.dtype)], -1).astype(jnp.float32),
                                     jnp.float32)[..., 0]
        return Draft(jnp.stack(ids, 1), jnp.stack(rows, 1), confidence), cache
