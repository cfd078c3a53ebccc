"""DeepSeekMoE with sqrt(softplus) routing, hash routing and one shared expert (architecture.md §5).

Routing is fp32. The selection bias (aux-loss-free balancing) only chooses experts; the combine
weights are the unbiased affinities of the chosen experts, renormalised and scaled by route_scale.
Hash layers choose experts from a frozen token-id table instead. Routed experts run dropless:
tokens are sorted by expert and multiplied with `jax.lax.ragged_dot` (no capacity, no dropping); a
few rows (decode) each multiply their own expert's weights instead (architecture.md §5.5).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sharding.context import active
from sharding.expert_parallel import expert_axes, expert_parallel_ffn
from pallas_kernels.moe_dispatch_reference import dense_swiglu, gathered_swiglu, permute, swiglu, unpermute_combine
from v4jax.model import kernels
from v4jax.model.documents import Documents
from v4jax.config import MoEImpl, Numerics, RouterKind, RunOptions, V4Config
from v4jax.model.layers import Buffer, Linear, param
from v4jax.model.numerics import fp8_act_quant


def affinity(logits: jax.Array, score_func: str) -> jax.Array:
    """s_e from router logits (fp32). sqrtsoftplus for V4 (architecture.md §5.1 step 2)."""
    if score_func == "sqrtsoftplus":
        return jnp.sqrt(jax.nn.softplus(logits))
    if score_func == "sigmoid":
        return jax.nn.sigmoid(logits)
    return jax.nn.softmax(logits, axis=-1)


class Routing(NamedTuple):
    weights: jax.Array  # [N, k] fp32 combine weights (renormalised, times route_scale)
    experts: jax.Array  # [N, k] int32 chosen expert ids
    scores: jax.Array  # [N, E] fp32 affinities s_e (for the balance loss)


class RoutingStats(NamedTuple):
    """Per-sequence routing statistics of one MoE layer: all the training loop needs (architecture.md §5.4)."""

    load: jax.Array  # [B, E] fp32: how many of the row's tokens chose each expert
    mean_affinity: jax.Array  # [B, E] fp32: P_e, the mean over the row's tokens of s_e / sum_e' s_e'
    balance: jax.Array  # [B] fp32: sum over the row's documents of sum_e (load_de / T_d) P_de, load constant
    documents: jax.Array  # [B] fp32: documents in the row (1 without packing)


def routing_stats(routing: Routing, B: int, T: int, docs: Documents | None = None) -> RoutingStats:
    """The layer's RoutingStats; with packed rows (`docs`) the balance terms are per document: the
    statistics of each document's own T_d tokens, as if it were a sequence alone (architecture.md §5.4)."""
    E = routing.scores.shape[-1]
    chosen = jnp.sum(jax.nn.one_hot(routing.experts.reshape(B, T, -1), E, dtype=jnp.float32), axis=2)  # [B, T, E]
    s = (routing.scores / jnp.sum(routing.scores, axis=-1, keepdims=True)).reshape(B, T, E)
    load, P = jnp.sum(chosen, axis=1), jnp.mean(s, axis=1)  # [B, E] each
    if docs is None:  # one document per row
        balance = jnp.sum(jax.lax.stop_gradient(load) / T * P, axis=-1)
        return RoutingStats(load, P, balance, jnp.ones((B,), jnp.float32))
    # sums over each document's counted positions, kept at its first token's index
    counted = jnp.ones((B, T), jnp.float32) if docs.counted is None else docs.counted.astype(jnp.float32)
    by_document = jax.vmap(lambda a, start: jax.ops.segment_sum(a, start, num_segments=T))
    d_load = by_document(jax.lax.stop_gradient(chosen) * counted[..., None], docs.key_start)  # [B, T, E]
    d_s = by_document(s * counted[..., None], docs.key_start)  # [B, T, E]
    length = by_document(counted, docs.key_start)  # [B, T]: T_d at each document's start, else 0
    balance = jnp.sum(d_load * d_s, axis=-1) / jnp.maximum(length, 1.0) ** 2  # [B, T]
    return RoutingStats(load, P, jnp.sum(balance, axis=1), jnp.sum(length > 0, axis=1, dtype=jnp.float32))


class Gate(nnx.Module):
    def __init__(self, cfg: V4Config, kind: RouterKind, *, rngs: nnx.Rngs, options: RunOptions = RunOptions()):
        E, k = cfg.n_routed_experts, cfg.n_activated_experts
        self.weight = Linear(cfg.dim, E, ("embed", "experts"), param_dtype=options.param_dtype, rngs=rngs)
        if kind is RouterKind.HASH:
            # Frozen token -> k distinct experts table (architecture.md §5.2). Released checkpoints ship theirs; a
            # fresh model draws k distinct experts per token uniformly (generation undisclosed, architecture.md §11.4).
            keys = jax.random.uniform(rngs.params(), (cfg.vocab_size, E))
            self.tid2eid = Buffer(jnp.argsort(keys, axis=-1)[:, :k].astype(jnp.int32), logical_axes=("vocab", None))
        else:
            self.bias = Buffer(jnp.zeros((E,), jnp.float32), logical_axes=("experts",))  # selection only
        self.kind, self.topk, self.route_scale, self.score_func = kind, k, cfg.route_scale, cfg.score_func

    def __call__(self, x: jax.Array, tokens: jax.Array) -> Routing:
        """x [N, d] (after ffn_norm), tokens [N] -> Routing."""
        scores = affinity(self.weight(x, jnp.float32), self.score_func)  # [N, E]
        if self.kind is RouterKind.HASH:
            experts = self.tid2eid[...][tokens]
        else:
            experts = jax.lax.top_k(scores + self.bias[...], self.topk)[1]  # bias affects the choice only
        w = jnp.take_along_axis(scores, experts, axis=-1)
        w = w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-20) * self.route_scale
        return Routing(w, experts.astype(jnp.int32), scores)


GATHER_ROWS = 64  # up to this many (token, choice) rows, and no more than the experts: `gathered_swiglu`


class Experts(nnx.Module):
    """E routed SwiGLU experts stored stacked: w1, w3 [E, d, I] (gate, up), w2 [E, I, d]."""

    def __init__(self, cfg: V4Config, *, rngs: nnx.Rngs, options: RunOptions = RunOptions()):
        E, d, I, pd = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim, options.param_dtype
        self.w1 = param(rngs, (E, d, I), ("experts", "embed", "expert_mlp"), pd)
        self.w3 = param(rngs, (E, d, I), ("experts", "embed", "expert_mlp"), pd)
        self.w2 = param(rngs, (E, I, d), ("experts", "expert_mlp", "embed"), pd)
        self.limit, self.impl, self.dispatch_chunk = cfg.swiglu_limit, options.moe_impl, options.moe_dispatch_chunk
        self.gather_tokens = options.moe_gather_tokens  # up to this many tokens per expert group: gather dispatch
        self.dense_tokens = options.moe_dense_tokens  # up to this many: every local expert on every token
        self.capacity_factor = options.moe_capacity_factor  # all-to-all receive buffer / mean load
        self.release = options.numerics is Numerics.RELEASE  # FP4 weights used as stored, FP8 activations

    def __call__(self, x: jax.Array, routing: Routing) -> jax.Array:
        """Dropless sorted dispatch. x [B, T, d] -> sum_k w_k FFN_{e_k}(x) [B, T, d] fp32."""
        B, T, d = x.shape
        act_quant = fp8_act_quant if self.release else None  # release numerics: FP8 inputs to every GEMM
        ffn = functools.partial(kernels.grouped_swiglu(self.impl), limit=self.limit, act_quant=act_quant)
        w1, w3, w2 = self.w1[...], self.w3[...], self.w2[...]
        ctx = active()
        if ctx is not None and expert_axes(*ctx):  # experts split over the mesh (rules table), architecture.md §5.5
            k = routing.experts.shape[-1]
            # Pallas' interpreter (moe_impl=pallas off TPU and GPU) cannot take values typed as varying
            # over the mesh axes, so that one case runs in an untyped shard_map (same gradients)
            interpreted = self.impl is MoEImpl.PALLAS and ctx[0].devices.flat[0].platform not in ("tpu", "gpu")
            dense = functools.partial(dense_swiglu, limit=self.limit, act_quant=act_quant)
            return expert_parallel_ffn(x, routing.experts.reshape(B, T, k), routing.weights.reshape(B, T, k),
                                       w1, w3, w2, ffn, *ctx, chunk=self.dispatch_chunk,
                                       gather_tokens=self.gather_tokens, capacity_factor=self.capacity_factor,
                                       check_vma=not interpreted, dense=dense, dense_tokens=self.dense_tokens)
        E, k = w1.shape[0], routing.experts.shape[1]
        if B * T * k <= min(E, GATHER_ROWS):  # a few rows (decode): each row's own expert, architecture.md §5.5
            return gathered_swiglu(x.reshape(B * T, d), routing.experts, routing.weights, w1, w3, w2,
                                   self.limit, act_quant).reshape(B, T, d)
        xs, sizes, order = permute(x.reshape(B * T, d), routing.experts, E)  # [N*k, d] grouped by expert, [E]
        y = ffn(xs, sizes, w1, w3, w2, routing.weights.reshape(-1)[order])  # [N*k, d] in x.dtype, weighted per row
        return unpermute_combine(y, order, B * T, k).reshape(B, T, d)  # each token's k rows summed in fp32


class SharedExpert(nnx.Module):
    def __init__(self, cfg: V4Config, *, rngs: nnx.Rngs, options: RunOptions = RunOptions()):
        d, I, pd = cfg.dim, cfg.moe_inter_dim, options.param_dtype
        fp8 = options.numerics is Numerics.RELEASE  # FP8 weights in the release: FP8 activations
        self.w1 = Linear(d, I, ("embed", "mlp"), param_dtype=pd, rngs=rngs, act_quant=fp8)
        self.w3 = Linear(d, I, ("embed", "mlp"), param_dtype=pd, rngs=rngs, act_quant=fp8)
        self.w2 = Linear(I, d, ("mlp", "embed"), param_dtype=pd, rngs=rngs, act_quant=fp8)
        self.limit = cfg.swiglu_limit

    def __call__(self, x: jax.Array) -> jax.Array:
        h = swiglu(self.w1(x, jnp.float32), self.w3(x, jnp.float32), self.limit)
        return self.w2(h.astype(x.dtype), jnp.float32)


class MoE(nnx.Module):
    def __init__(self, cfg: V4Config, kind: RouterKind, *, rngs: nnx.Rngs, options: RunOptions = RunOptions()):
        self.gate = Gate(cfg, kind, rngs=rngs, options=options)
        self.experts = Experts(cfg, rngs=rngs, options=options)
        self.shared_experts = SharedExpert(cfg, rngs=rngs, options=options)

    def __call__(self, x: jax.Array, tokens: jax.Array) -> tuple[jax.Array, Routing]:
        """x [B, T, d], tokens [B, T] -> ([B, T, d], Routing over the B*T tokens)."""
        B, T, d = x.shape
        flat = x.reshape(B * T, d)
        routing = self.gate(flat, tokens.reshape(-1))
        y = self.experts(x, routing) + self.shared_experts(x)  # accumulated in fp32
        return y.astype(x.dtype), routing
