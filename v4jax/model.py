"""The DeepSeek-V4 transformer (spec §2), its block, and the MTP block (spec §6).

Data flow: token embedding -> copied into n_hc streams -> L blocks (each: mHC around attention,
mHC around MoE; consecutive repeats of the layer schedule's period are scanned, see `Stage`) -> hc head merges the streams -> final RMSNorm -> LM head (fp32). The MTP block
reads the last block's streams and the next token's embedding and predicts the token after it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax.attention import Attention
from sharding.context import constrain
from v4jax.config import AttentionKind, Remat, RouterKind, V4Config
from v4jax.indexer import IndexerTraces
from v4jax.layers import Embed, Linear, RMSNorm
from v4jax.mhc import HyperConnection, HyperHead
from v4jax.moe import MoE, RoutingStats, routing_stats

TOKENS = ("batch", "seq")
STREAMS = ("batch", "seq", "act_hc", "act_embed")
LOGITS = ("batch", "seq", "act_vocab")


class ModelOutput(NamedTuple):
    logits: jax.Array  # [B, T, V] fp32
    mtp_logits: jax.Array | None  # [B, T-1, V] fp32: position t predicts token t+2 (None without MTP)
    final_hidden: jax.Array  # [B, T, d] after the hc head and the final norm
    hidden_states: tuple[jax.Array, ...] | None  # L+1 x [B, T, n_hc, d]: widened embedding, then each block
    routing: RoutingStats  # [L, B, E] per main layer, in layer order (balance loss, bias update, load)
    mtp_routing: RoutingStats | None  # [B, E] of the MTP block's router
    indexer: IndexerTraces | None = None  # [n_CSA, B, T, k] per field, CSA layers in layer order (on request)


class Block(nnx.Module):
    """One V4 block (spec §2.2); the attention variant and router kind are the only differences."""

    def __init__(self, cfg: V4Config, attention: AttentionKind, router: RouterKind, *, rngs: nnx.Rngs):
        self.attn_hc = HyperConnection(cfg, rngs=rngs)
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, "embed", rngs=rngs)
        self.attn = Attention(cfg, attention, rngs=rngs)
        self.ffn_hc = HyperConnection(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, "embed", rngs=rngs)
        self.ffn = MoE(cfg, router, rngs=rngs)

    def __call__(self, streams: jax.Array, tokens: jax.Array, return_indexer_traces: bool = False):
        """streams [B, T, n_hc, d] -> (streams, RoutingStats, IndexerTraces | None: CSA layers on request)."""
        streams = constrain(streams, STREAMS)  # [B, T, n_hc, d]
        u, post, comb = self.attn_hc.hc_pre(streams)  # u [B, T, d]
        a, traces = self.attn(self.attn_norm(u), return_indexer_traces=True) if return_indexer_traces else (
            self.attn(self.attn_norm(u)), None)
        streams = self.attn_hc.hc_post(a, streams, post, comb)
        v, post, comb = self.ffn_hc.hc_pre(constrain(streams, STREAMS))
        y, routing = self.ffn(self.ffn_norm(v), tokens)  # the MoE sees raw token ids (hash layers)
        return self.ffn_hc.hc_post(y, streams, post, comb), routing_stats(routing, *tokens.shape), traces


def layer_schedule(kinds: tuple) -> tuple[tuple[tuple, int], ...]:
    """Split a layer schedule into stages `(unit, repeats)`: `unit` is a run of consecutive block
    kinds repeated `repeats` times. Minimises the total unit length, i.e. the number of distinct
    blocks XLA compiles, so compile time follows the schedule's period rather than its depth
    (v4-flash: 2 SWA layers, then (CSA, HCA) x 20, then CSA -> a handful of compiled blocks)."""
    n = len(kinds)
    best: list[tuple[int, tuple]] = [(0, ())] * (n + 1)  # best[i]: (cost, stages) for kinds[i:]
    for i in range(n - 1, -1, -1):
        options = []
        for p in range(1, n - i + 1):
            unit = kinds[i:i + p]
            r = 1
            while i + (r + 1) * p <= n and kinds[i + r * p:i + (r + 1) * p] == unit:
                r += 1
            for reps in {1, r}:
                cost, rest = best[i + p * reps]
                options.append((cost + p, ((unit, reps),) + rest))
        best[i] = min(options, key=lambda o: (o[0], len(o[1])))
    return best[0][1]


class Stage(nnx.Module):
    """`repeats` copies of a unit of consecutive blocks, run with one `lax.scan`.

    Each position of the unit is one Block whose parameters are stacked on a leading `layers` axis
    (logical axis name "layers"), so a stage of any depth compiles its unit once.
    """

    def __init__(self, cfg: V4Config, unit: tuple[tuple[AttentionKind, RouterKind], ...], repeats: int, *,
                 rngs: nnx.Rngs):
        blocks = []
        for attention, router in unit:
            def make(key, attention=attention, router=router):
                return nnx.split(Block(cfg, attention, router, rngs=nnx.Rngs(params=key)))[1]

            graphdef = nnx.graphdef(nnx.eval_shape(lambda: Block(cfg, attention, router, rngs=nnx.Rngs(0))))
            block = nnx.merge(graphdef, jax.vmap(make)(jax.random.split(rngs.params(), repeats)))
            for _, var in nnx.to_flat_state(nnx.state(block)):
                var.set_metadata(logical_axes=("layers",) + tuple(var.get_metadata()["logical_axes"]))
            blocks.append(block)
        self.blocks = nnx.List(blocks)
        self.unit, self.repeats, self.remat = unit, repeats, cfg.remat

    def __call__(self, streams: jax.Array, tokens: jax.Array, keep_hidden: bool, keep_traces: bool = False):
        """streams [B, T, n_hc, d] -> (streams, hidden [R, P, B, T, n_hc, d] | None, stats [R, P, B, E],
        indexer traces [R * P_csa, B, T, k] in layer order | None (keep_traces and CSA in the unit))."""
        splits = [nnx.split(b) for b in self.blocks]

        def body(streams, states):
            hidden, stats, traces = [], [], []
            for (graphdef, _), state in zip(splits, states):
                streams, s, t = nnx.merge(graphdef, state)(streams, tokens, keep_traces)
                hidden.append(streams if keep_hidden else None)
                stats.append(s)
                if t is not None:
                    traces.append(t)
            stack = lambda *a: jnp.stack(a)  # noqa: E731
            return streams, (hidden, jax.tree.map(stack, *stats), jax.tree.map(stack, *traces) if traces else None)

        if self.remat is not Remat.NONE:
            policy = None if self.remat is Remat.FULL else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        streams, (hidden, stats, traces) = jax.lax.scan(body, streams, [state for _, state in splits])
        if traces is not None:  # [R, P_csa, ...] -> [R * P_csa, ...]: CSA layers in layer order
            traces = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), traces)
        return streams, (jnp.stack(hidden, axis=1) if keep_hidden else None), stats, traces


class MTPBlock(nnx.Module):
    """Multi-token prediction, depth 1 (spec §6): an SWA block with a learned router."""

    def __init__(self, cfg: V4Config, *, rngs: nnx.Rngs):
        pd = cfg.param_dtype
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps, "embed", rngs=rngs)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps, "embed", rngs=rngs)
        self.e_proj = Linear(cfg.dim, cfg.dim, ("embed", "embed_out"), param_dtype=pd, rngs=rngs)
        self.h_proj = Linear(cfg.dim, cfg.dim, ("embed", "embed_out"), param_dtype=pd, rngs=rngs)
        self.block = Block(cfg, AttentionKind.SLIDING, RouterKind.LEARNED, rngs=rngs)
        self.hc_head = HyperHead(cfg, rngs=rngs)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, "embed", rngs=rngs)

    def __call__(self, streams: jax.Array, next_embedding: jax.Array, next_tokens: jax.Array):
        """streams [B, T, n_hc, d] of the last main block; next_embedding [B, T, d] = Embed(tok_{t+1})."""
        e = self.e_proj(self.enorm(next_embedding))  # [B, T, d]
        h = self.h_proj(self.hnorm(streams))  # same projection per stream: [B, T, n_hc, d]
        x = e[:, :, None, :] + h
        x, routing, _ = self.block(x, next_tokens)
        return self.norm(self.hc_head(x)), routing


class Transformer(nnx.Module):
    def __init__(self, cfg: V4Config, *, rngs: nnx.Rngs):
        pd = cfg.param_dtype
        self.embed = Embed(cfg.vocab_size, cfg.dim, param_dtype=pd, rngs=rngs)
        self.stages = nnx.List([Stage(cfg, unit, repeats, rngs=rngs)
                                for unit, repeats in layer_schedule(tuple(zip(cfg.layer_types, cfg.router_types)))])
        self.hc_head = HyperHead(cfg, rngs=rngs)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, "embed", rngs=rngs)
        self.head = Linear(cfg.dim, cfg.vocab_size, ("embed", "vocab"), param_dtype=pd, rngs=rngs)
        self.mtp = MTPBlock(cfg, rngs=rngs) if cfg.n_mtp_layers else None
        self.cfg = cfg

    def layer_slots(self) -> list[tuple[int, int, int]]:
        """Main layer i -> (stage, position in the unit, repeat): where its stacked parameters live."""
        return [(s, p, r) for s, stage in enumerate(self.stages)
                for r in range(stage.repeats) for p in range(len(stage.unit))]

    def __call__(self, tokens: jax.Array, *, return_hidden_states: bool = False, with_mtp: bool = True,
                 return_indexer_traces: bool = False) -> ModelOutput:
        """Stateless full-sequence forward. tokens: int [B, T] (ids must lie in [0, vocab_size)).
        return_indexer_traces: also return what the indexer's KL loss needs (ModelOutput.indexer, spec
        §8.6); the logits are the same either way."""
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integer [B, T], got {tokens.dtype} {tokens.shape}")
        if tokens.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_seq_len {self.cfg.max_seq_len}")
        dtype = jnp.dtype(self.cfg.dtype)
        tokens = constrain(tokens, TOKENS)
        e = self.embed(tokens, dtype)  # [B, T, d]
        streams = jnp.broadcast_to(e[:, :, None, :], (*e.shape[:2], self.cfg.hc_mult, e.shape[-1]))  # widen
        hidden, stats, traces = [streams], [], []
        for stage in self.stages:
            streams, h, s, t = stage(streams, tokens, return_hidden_states, return_indexer_traces)
            if return_hidden_states:
                hidden += list(h.reshape(-1, *h.shape[2:]))  # [R, P, ...] -> layer order
            stats.append(jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), s))
            if t is not None:
                traces.append(t)
        h = self.norm(self.hc_head(streams))  # [B, T, d]
        logits = constrain(self.head(h, jnp.float32), LOGITS)  # LM head in fp32

        mtp_logits = mtp_stats = None
        if self.mtp is not None and with_mtp and tokens.shape[1] > 1:
            h_mtp, mtp_stats = self.mtp(streams[:, :-1], e[:, 1:], tokens[:, 1:])
            mtp_logits = constrain(self.head(h_mtp, jnp.float32), LOGITS)  # shared LM head
        routing = jax.tree.map(lambda *a: jnp.concatenate(a), *stats)
        indexer = jax.tree.map(lambda *a: jnp.concatenate(a), *traces) if traces else None
        return ModelOutput(logits, mtp_logits, h, tuple(hidden) if return_hidden_states else None, routing, mtp_stats,
                           indexer)
