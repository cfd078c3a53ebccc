"""The DeepSeek-V4 transformer (architecture.md §2), its block, and the MTP block (architecture.md §6).

Data flow: token embedding -> copied into n_hc streams -> L blocks (each: mHC around attention,
mHC around MoE; consecutive repeats of the layer schedule's period are scanned, see `Stage`) -> hc
head merges the streams -> final RMSNorm -> LM head (fp32). The MTP block reads the last block's
streams and the next token's embedding and predicts the token after it.

One forward for training, prefill and decode: `Transformer(tokens)` is the stateless call over
positions 0..T-1; `Transformer(tokens, cache=cache)` feeds the tokens at each sequence's own position
(`cache.lengths`) through the same layers, which read and update their part of the cache (architecture.md §4.7).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sharding.context import constrain
from v4jax.model.attention import Attention, AttentionState
from v4jax.model.cache import Cache
from v4jax.model.documents import Documents, documents
from v4jax.config import AttentionKind, Numerics, Remat, RouterKind, RunOptions, V4Config, layer_schedule, stage_units  # noqa: F401 (layer_schedule re-exported)
from v4jax.model.indexer import IndexerTraces
from v4jax.model.layers import Embed, Linear, RMSNorm
from v4jax.model.mhc import HyperConnection, HyperHead
from v4jax.model.moe import MoE, RoutingStats, routing_stats

TOKENS = ("batch", "seq")
STREAMS = ("batch", "seq", "act_hc", "act_embed")
LOGITS = ("batch", "seq", "act_vocab")


class ModelOutput(NamedTuple):
    logits: jax.Array  # [B, T, V] fp32
    mtp_logits: jax.Array | None  # [B, T-1, V] fp32: position t predicts token t+2 (None without MTP or with a cache)
    final_hidden: jax.Array  # [B, T, d] after the hc head and the final norm
    hidden_states: tuple[jax.Array, ...] | None  # L+1 x [B, T, n_hc, d]: widened embedding, then each block
    routing: RoutingStats  # [L, B, E] per main layer, in layer order (balance loss, bias update, load)
    mtp_routing: RoutingStats | None  # [B, E] of the MTP block's router
    indexer: IndexerTraces | None = None  # [n_CSA, B, T, k] per field, CSA layers in layer order (on request)
    streams: jax.Array | None = None  # [B, T, n_hc, d] after the last main block (the MTP block's input)
    cache: Cache | None = None  # the updated cache (a cached call)


class Block(nnx.Module):
    """One V4 block (architecture.md §2.3); the attention variant and router kind are the only differences."""

    def __init__(self, cfg: V4Config, attention: AttentionKind, router: RouterKind, *, rngs: nnx.Rngs,
                 options: RunOptions = RunOptions()):
        self.attn_hc = HyperConnection(cfg, rngs=rngs)
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, "embed", rngs=rngs)
        self.attn = Attention(cfg, attention, rngs=rngs, options=options)
        self.ffn_hc = HyperConnection(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, "embed", rngs=rngs)
        self.ffn = MoE(cfg, router, rngs=rngs, options=options)

    def __call__(self, streams: jax.Array, tokens: jax.Array, positions: jax.Array, state: AttentionState | None = None,
                 n_valid: jax.Array | None = None, return_indexer_traces: bool = False, docs: Documents | None = None):
        """streams [B, T, n_hc, d], tokens and positions [B, T] -> (streams, attention state | None,
        RoutingStats, IndexerTraces | None: CSA layers on request). docs: packed rows (architecture.md §8.5)."""
        streams = constrain(streams, STREAMS)  # [B, T, n_hc, d]
        u, post, comb = self.attn_hc.hc_pre(streams)  # u [B, T, d]
        a, state, traces = self.attn(self.attn_norm(u), positions, state, n_valid, return_indexer_traces, docs)
        streams = self.attn_hc.hc_post(a, streams, post, comb)
        v, post, comb = self.ffn_hc.hc_pre(constrain(streams, STREAMS))
        y, routing = self.ffn(self.ffn_norm(v), tokens)  # the MoE sees raw token ids (hash layers)
        return self.ffn_hc.hc_post(y, streams, post, comb), state, routing_stats(routing, *tokens.shape, docs), traces


class Stage(nnx.Module):
    """`repeats` copies of a unit of consecutive blocks, run with one `lax.scan`.

    Each position of the unit is one Block whose parameters are stacked on a leading `layers` axis
    (logical axis name "layers"), so a stage of any depth compiles its unit once.
    """

    def __init__(self, cfg: V4Config, unit: tuple[tuple[AttentionKind, RouterKind], ...], repeats: int, *,
                 rngs: nnx.Rngs, options: RunOptions = RunOptions()):
        blocks = []
        for attention, router in unit:
            def make(key, attention=attention, router=router):
                return nnx.split(Block(cfg, attention, router, rngs=nnx.Rngs(params=key), options=options))[1]

            graphdef = nnx.graphdef(nnx.eval_shape(lambda: Block(cfg, attention, router, rngs=nnx.Rngs(0),
                                                                options=options)))
            block = nnx.merge(graphdef, jax.vmap(make)(jax.random.split(rngs.params(), repeats)))
            for _, var in nnx.to_flat_state(nnx.state(block)):
                var.set_metadata(logical_axes=("layers",) + tuple(var.get_metadata()["logical_axes"]))
            blocks.append(block)
        self.blocks = nnx.List(blocks)
        self.unit, self.repeats, self.remat = unit, repeats, options.remat

    def __call__(self, streams: jax.Array, tokens: jax.Array, positions: jax.Array, keep_hidden: bool,
                 keep_traces: bool = False, states: tuple[AttentionState, ...] | None = None,
                 n_valid: jax.Array | None = None, docs: Documents | None = None):
        """streams [B, T, n_hc, d] -> (streams, hidden [R, P, B, T, n_hc, d] | None, stats [R, P, B, E],
        indexer traces [R * P_csa, B, T, k] in layer order | None (keep_traces and CSA in the unit),
        states: per unit position the stacked [R, ...] attention states | None (stateless call))."""
        splits = [nnx.split(b) for b in self.blocks]

        def body(streams, xs):
            params, caches = xs
            hidden, stats, traces, new = [], [], [], []
            for (graphdef, _), state, cache in zip(splits, params, caches):
                streams, cache, s, t = nnx.merge(graphdef, state)(streams, tokens, positions, cache, n_valid,
                                                                   keep_traces, docs)
                hidden.append(streams if keep_hidden else None)
                stats.append(s)
                new.append(cache)
                if t is not None:
                    traces.append(t)
            stack = lambda *a: jnp.stack(a)  # noqa: E731
            return streams, (hidden, jax.tree.map(stack, *stats), jax.tree.map(stack, *traces) if traces else None,
                             tuple(new))

        if self.remat is not Remat.NONE:
            policy = None if self.remat is Remat.FULL else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        caches = (None,) * len(splits) if states is None else states
        streams, (hidden, stats, traces, states) = jax.lax.scan(body, streams,
                                                                ([state for _, state in splits], caches))
        if traces is not None:  # [R, P_csa, ...] -> [R * P_csa, ...]: CSA layers in layer order
            traces = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), traces)
        return streams, (jnp.stack(hidden, axis=1) if keep_hidden else None), stats, traces, states


class MTPBlock(nnx.Module):
    """Multi-token prediction, depth 1 (architecture.md §6): an SWA block with a learned router."""

    def __init__(self, cfg: V4Config, *, rngs: nnx.Rngs, options: RunOptions = RunOptions()):
        pd, fp8 = options.param_dtype, options.numerics is Numerics.RELEASE  # FP8 weights: FP8 activations
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps, "embed", rngs=rngs)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps, "embed", rngs=rngs)
        self.e_proj = Linear(cfg.dim, cfg.dim, ("embed", "embed_out"), param_dtype=pd, rngs=rngs, act_quant=fp8)
        self.h_proj = Linear(cfg.dim, cfg.dim, ("embed", "embed_out"), param_dtype=pd, rngs=rngs, act_quant=fp8)
        self.block = Block(cfg, AttentionKind.SLIDING, RouterKind.LEARNED, rngs=rngs, options=options)
        self.hc_head = HyperHead(cfg, rngs=rngs)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, "embed", rngs=rngs)

    def __call__(self, streams: jax.Array, next_embedding: jax.Array, next_tokens: jax.Array, positions: jax.Array,
                 state: AttentionState | None = None, n_valid: jax.Array | None = None, docs: Documents | None = None):
        """streams [B, T, n_hc, d] of the last main block at positions [B, T]; next_embedding [B, T, d] =
        Embed(tok_{t+1}), next_tokens [B, T] = tok_{t+1}. Returns (hidden [B, T, d], routing, state).
        docs: packed rows (architecture.md §8.5); a document's last position mixes in the next document's
        first token, so its output is not the document's own (the MTP loss leaves it out)."""
        e = self.e_proj(self.enorm(next_embedding))  # [B, T, d]
        h = self.h_proj(self.hnorm(streams))  # same projection per stream: [B, T, n_hc, d]
        x = e[:, :, None, :] + h
        x, state, routing, _ = self.block(x, next_tokens, positions, state, n_valid, False, docs)
        return self.norm(self.hc_head(x)), routing, state


class Transformer(nnx.Module):
    """cfg: the architecture (config.json); options: how it runs (dtypes, kernels, chunks, remat,
    training-stage switches). Only options.param_dtype shapes the parameters (their dtype)."""

    def __init__(self, cfg: V4Config, *, rngs: nnx.Rngs, options: RunOptions = RunOptions()):
        pd = options.param_dtype
        self.embed = Embed(cfg.vocab_size, cfg.dim, param_dtype=pd, rngs=rngs)
        self.stages = nnx.List([Stage(cfg, unit, repeats, rngs=rngs, options=options)
                                for unit, repeats in stage_units(cfg)])
        self.hc_head = HyperHead(cfg, rngs=rngs)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, "embed", rngs=rngs)
        self.head = Linear(cfg.dim, cfg.vocab_size, ("embed", "vocab"), param_dtype=pd, rngs=rngs)
        self.mtp = MTPBlock(cfg, rngs=rngs, options=options) if cfg.n_mtp_layers else None
        self.cfg, self.options = cfg, options

    def layer_slots(self) -> list[tuple[int, int, int]]:
        """Main layer i -> (stage, position in the unit, repeat): where its stacked parameters live."""
        return [(s, p, r) for s, stage in enumerate(self.stages)
                for r in range(stage.repeats) for p in range(len(stage.unit))]

    def __call__(self, tokens: jax.Array, *, cache: Cache | None = None, n_valid: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, return_hidden_states: bool = False, with_mtp: bool = True,
                 return_indexer_traces: bool = False) -> ModelOutput:
        """tokens: int [B, T] (ids must lie in [0, vocab_size)).

        Without a cache: the stateless forward over positions 0..T-1 (training, parity), with the MTP
        block's logits. With a cache: the tokens at positions cache.lengths + j (prefill: an empty
        cache; decode: T = 1; speculative verification: T = 2); n_valid [B] (default T) real tokens per
        row, the rest right padding that never enters the cache; returns the updated cache and the last
        block's streams, no MTP logits (`draft` runs the MTP block with its own cache).
        segment_ids [B, T] (stateless calls; packed training rows, architecture.md §8.5): documents packed in a
        row, each seen as if alone: positions restart at each document and nothing (window, compressor
        window, compressed entry, index pick, MTP attention) crosses a boundary.
        return_indexer_traces: also return what the indexer's KL loss needs (ModelOutput.indexer, architecture.md §8.2); the logits are the same either way."""
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integer [B, T], got {tokens.dtype} {tokens.shape}")
        B, T = tokens.shape
        if cache is None and T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.cfg.max_seq_len}")
        if segment_ids is not None and (cache is not None or segment_ids.shape != (B, T)):
            raise ValueError(f"segment_ids must be [B, T] = {(B, T)} and come without a cache (packed training "
                             f"rows), got {segment_ids.shape}" + (" with a cache" if cache is not None else ""))
        start = jnp.zeros((B,), jnp.int32) if cache is None else cache.lengths
        docs = None if segment_ids is None else documents(constrain(segment_ids, TOKENS))
        positions = start[:, None] + jnp.arange(T, dtype=jnp.int32) if docs is None else docs.positions  # [B, T]
        if cache is not None and n_valid is None:
            n_valid = jnp.full((B,), T, jnp.int32)
        tokens = constrain(tokens, TOKENS)
        e = self.embed(tokens, jnp.dtype(self.options.dtype))  # [B, T, d]
        streams = jnp.broadcast_to(e[:, :, None, :], (B, T, self.cfg.hc_mult, e.shape[-1]))  # widen
        hidden, stats, traces, states = [streams], [], [], []
        for i, stage in enumerate(self.stages):
            streams, h, s, t, st = stage(streams, tokens, positions, return_hidden_states, return_indexer_traces,
                                         None if cache is None else cache.stages[i], n_valid, docs)
            if return_hidden_states:
                hidden += list(h.reshape(-1, *h.shape[2:]))  # [R, P, ...] -> layer order
            stats.append(jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), s))
            states.append(st)
            if t is not None:
                traces.append(t)
        h = self.norm(self.hc_head(streams))  # [B, T, d]
        logits = constrain(self.head(h, jnp.float32), LOGITS)  # LM head in fp32

        mtp_logits = mtp_stats = None
        if self.mtp is not None and with_mtp and cache is None and T > 1:
            mtp_docs = None if docs is None else Documents(docs.positions[:, :-1], docs.key_start[:, :-1],
                                                            counted=docs.positions[:, 1:] != 0)
            h_mtp, mtp_stats, _ = self.mtp(streams[:, :-1], e[:, 1:], tokens[:, 1:], positions[:, :-1], None, None,
                                           mtp_docs)
            mtp_logits = constrain(self.head(h_mtp, jnp.float32), LOGITS)  # shared LM head
        routing = jax.tree.map(lambda *a: jnp.concatenate(a), *stats)
        indexer = jax.tree.map(lambda *a: jnp.concatenate(a), *traces) if traces else None
        new_cache = None if cache is None else cache.replace(lengths=start + n_valid, stages=tuple(states))
        return ModelOutput(logits, mtp_logits, h, tuple(hidden) if return_hidden_states else None, routing, mtp_stats,
                           indexer, streams, new_cache)

    def draft(self, cache: Cache, streams: jax.Array, next_tokens: jax.Array, n_valid: jax.Array):
        """The MTP block at positions cache.mtp_lengths + j with its own cache (speculative decoding):
        streams [B, T, n_hc, d] of the main model at those positions, next_tokens [B, T] the tokens one
        further. Returns (logits [B, T, V] fp32: position t predicts token t+2, cache)."""
        if self.mtp is None or cache.mtp is None:
            raise ValueError("speculative decoding needs the MTP block and its cache (n_mtp_layers = 1)")
        start = cache.mtp_lengths
        positions = start[:, None] + jnp.arange(next_tokens.shape[1], dtype=jnp.int32)
        e = self.embed(next_tokens, jnp.dtype(self.options.dtype))
        h, _, state = self.mtp(streams, e, next_tokens, positions, cache.mtp, n_valid)
        logits = constrain(self.head(h, jnp.float32), LOGITS)
        return logits, cache.replace(mtp=state, mtp_lengths=start + n_valid)
