"""The DeepSeek-V4 transformer (spec §2), its block, and the MTP block (spec §6).

Data flow: token embedding -> copied into n_hc streams -> L blocks (each: mHC around attention,
mHC around MoE) -> hc head merges the streams -> final RMSNorm -> LM head (fp32). The MTP block
reads the last block's streams and the next token's embedding and predicts the token after it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax.attention import Attention
from v4jax.config import AttentionKind, RouterKind, V4Config
from v4jax.layers import Embed, Linear, RMSNorm
from v4jax.mhc import HyperConnection, HyperHead
from v4jax.moe import MoE, Routing


class ModelOutput(NamedTuple):
    logits: jax.Array  # [B, T, V] fp32
    mtp_logits: jax.Array | None  # [B, T-1, V] fp32: position t predicts token t+2 (None without MTP)
    final_hidden: jax.Array  # [B, T, d] after the hc head and the final norm
    hidden_states: tuple[jax.Array, ...] | None  # L+1 x [B, T, n_hc, d]: widened embedding, then each block
    routing: tuple[Routing, ...]  # per main layer, for balance losses and load metrics


class Block(nnx.Module):
    """One V4 block (spec §2.2); the attention variant and router kind are the only differences."""

    def __init__(self, cfg: V4Config, attention: AttentionKind, router: RouterKind, *, rngs: nnx.Rngs):
        self.attn_hc = HyperConnection(cfg, rngs=rngs)
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, "embed", rngs=rngs)
        self.attn = Attention(cfg, attention, rngs=rngs)
        self.ffn_hc = HyperConnection(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, "embed", rngs=rngs)
        self.ffn = MoE(cfg, router, rngs=rngs)

    def __call__(self, streams: jax.Array, tokens: jax.Array) -> tuple[jax.Array, Routing]:
        u, post, comb = self.attn_hc.hc_pre(streams)  # u [B, T, d]
        streams = self.attn_hc.hc_post(self.attn(self.attn_norm(u)), streams, post, comb)  # [B, T, n_hc, d]
        v, post, comb = self.ffn_hc.hc_pre(streams)
        y, routing = self.ffn(self.ffn_norm(v), tokens)  # the MoE sees raw token ids (hash layers)
        return self.ffn_hc.hc_post(y, streams, post, comb), routing


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
        x, routing = self.block(x, next_tokens)
        return self.norm(self.hc_head(x)), routing


class Transformer(nnx.Module):
    def __init__(self, cfg: V4Config, *, rngs: nnx.Rngs):
        pd = cfg.param_dtype
        self.embed = Embed(cfg.vocab_size, cfg.dim, param_dtype=pd, rngs=rngs)
        self.layers = nnx.List([Block(cfg, a, r, rngs=rngs) for a, r in zip(cfg.layer_types, cfg.router_types)])
        self.hc_head = HyperHead(cfg, rngs=rngs)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, "embed", rngs=rngs)
        self.head = Linear(cfg.dim, cfg.vocab_size, ("embed", "vocab"), param_dtype=pd, rngs=rngs)
        self.mtp = MTPBlock(cfg, rngs=rngs) if cfg.n_mtp_layers else None
        self.cfg = cfg

    def __call__(self, tokens: jax.Array, *, return_hidden_states: bool = False, with_mtp: bool = True) -> ModelOutput:
        """Stateless full-sequence forward. tokens: int [B, T] (ids must lie in [0, vocab_size))."""
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integer [B, T], got {tokens.dtype} {tokens.shape}")
        if tokens.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_seq_len {self.cfg.max_seq_len}")
        dtype = jnp.dtype(self.cfg.dtype)
        e = self.embed(tokens, dtype)  # [B, T, d]
        streams = jnp.broadcast_to(e[:, :, None, :], (*e.shape[:2], self.cfg.hc_mult, e.shape[-1]))  # widen
        hidden = [streams]
        routings = []
        for block in self.layers:
            streams, routing = block(streams, tokens)
            hidden.append(streams)
            routings.append(routing)
        h = self.norm(self.hc_head(streams))  # [B, T, d]
        logits = self.head(h, jnp.float32)  # LM head in fp32

        mtp_logits = None
        if self.mtp is not None and with_mtp and tokens.shape[1] > 1:
            h_mtp, _ = self.mtp(streams[:, :-1], e[:, 1:], tokens[:, 1:])
            mtp_logits = self.head(h_mtp, jnp.float32)  # shared LM head
        return ModelOutput(logits, mtp_logits, h, tuple(hidden) if return_hidden_states else None, tuple(routings))
