"""Cached inference: prefill, one-token decode, sampling, batched generation and MTP speculation.

The cached forward (`extend`) feeds T new tokens per sequence at each sequence's own position
(`cache.lengths`), through the same parameters as the stateless forward, and gives the same logits
(spec §4.6: prefill of T tokens == prefill of T0 + decode steps). Per layer (spec §4.7):
  * window keys: the ring buffer read back in position order, followed by the new tokens' KV; query
    j at position p+j attends to the W keys ending at itself (banded, query chunks as in the reference);
  * compressor: the stored per-token values/logits of the open windows followed by the new tokens form
    whole windows again; every window completed by a valid new token becomes an entry, written into
    the entry buffer *before* attention (the entry completed by token t is visible to t);
  * CSA: the indexer scores the whole entry buffer of index keys with the visibility rule
    s < floor((t+1)/m) and takes top-k; HCA attends to every visible entry.
Sequences of a batch may hold different lengths; `n_valid` [B] says how many of the T new tokens of each
row are real: the rest (right padding) are computed but never enter a ring, a compressor window or
`lengths`, and a causal model never lets them change a real token's output.

Speculative decoding (spec §6): the MTP block drafts token t+2 from the last main block's streams at
t and the embedding of token t+1; the main model verifies [pending, draft] in one extend of T = 2. A
rejected draft is rolled back by not advancing `lengths`: its KV went to window slot (p+1) mod W and
compressor slot (p+1) mod kappa*m, which held positions p+1-W and p+1-kappa*m, that no later query
reads; an entry it completed is invisible until the window really completes and rewrites it.
"""

from __future__ import annotations

import time
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sharding.context import constrain
from v4jax.cache import Cache, LayerCache, init_cache
from v4jax.compressor import _overlap_candidates
from v4jax.indexer import map_query_chunks, select_topk_at
from v4jax.layers import rms_normalize
from v4jax.model import LOGITS, STREAMS, TOKENS
from v4jax.rope import apply_rope, inv_frequencies

# ----------------------------------------------------------------------------------------------------
# Cached layers


def _ring_read(ring: jax.Array, start: jax.Array) -> jax.Array:
    """ring [B, S, ...] (slot = position mod S) -> [B, S, ...] in position order from start - S."""
    S = ring.shape[1]
    idx = (start[:, None] + jnp.arange(S)) % S  # slot of position start - S + i
    return jnp.take_along_axis(ring, idx.reshape(*idx.shape, *([1] * (ring.ndim - 2))), axis=1)


def _ring_write(ring: jax.Array, new: jax.Array, start: jax.Array, n_valid: jax.Array) -> jax.Array:
    """Write the last min(n_valid, S) valid rows of new [B, T, ...] (positions start + j) into their slots."""
    S, T = ring.shape[1], new.shape[1]
    j = jnp.arange(T)[None, :]
    keep = (j < n_valid[:, None]) & (j >= n_valid[:, None] - S)  # no two kept rows share a slot
    slot = jnp.where(keep, (start[:, None] + j) % S, S)  # S = out of range: dropped
    return jax.vmap(lambda r, s, v: r.at[s].set(v.astype(r.dtype), mode="drop"))(ring, slot, new)


def compressor_extend(comp, x: jax.Array, start: jax.Array, n_valid: jax.Array, values: jax.Array,
                      logits: jax.Array, entries: jax.Array, inv_freq: np.ndarray):
    """Feed new tokens x [B, T, d] (positions start + j) to a `Compressor` with state.

    values/logits [B, kappa m, kappa c] fp32 ring (slot = position mod kappa m); entries [B, N, c].
    Returns (entries, values, logits) with every window completed by a valid new token emitted.
    """
    B, T, _ = x.shape
    m, c = comp.ratio, comp.width
    kappa = 2 if comp.overlap else 1
    S = kappa * m
    x32 = x.astype(jnp.float32)
    pos = start[:, None] + jnp.arange(T)  # [B, T]
    new_v = comp.wkv(x32, jnp.float32)  # [B, T, kappa c]
    new_l = comp.wgate(x32, jnp.float32) + comp.ape[...].astype(jnp.float32)[pos % m]  # ape by place in window

    # Combined sequence per row, from `base` (start of the oldest open window): stored tokens, then new ones.
    base = (start // m - (kappa - 1)) * m
    offset = start - base  # where the new tokens go: (kappa-1) m + (start mod m)
    n_win = -(-(S + T) // m)
    pad = ((0, 0), (0, n_win * m - S), (0, 0))
    seq_v = jnp.pad(_ring_read(values, base + S), pad)  # ring read in position order from `base`
    seq_l = jnp.pad(_ring_read(logits, base + S), pad, constant_values=-jnp.inf)
    put = jax.vmap(lambda buf, v, o: jax.lax.dynamic_update_slice_in_dim(buf, v, o, axis=0))
    seq_v, seq_l = put(seq_v, new_v, offset), put(seq_l, new_l, offset)

    win_v = seq_v.reshape(B, n_win, m, -1)
    win_l = seq_l.reshape(B, n_win, m, -1)
    if comp.overlap:
        win_v, win_l = _overlap_candidates(win_v, win_l, c)  # window k pools windows k-1 and k
    pooled = jnp.sum(jax.nn.softmax(win_l, axis=2) * win_v, axis=2)  # [B, n_win, c] fp32
    index = base[:, None] // m + jnp.arange(n_win)  # absolute entry id of each combined window
    new_entries = apply_rope(comp.norm(pooled).astype(entries.dtype), m * index, inv_freq)
    k = jnp.arange(n_win)[None, :]
    done = (k >= kappa - 1) & ((k + 1) * m <= (offset + n_valid)[:, None])  # whole, and not already emitted
    index = jnp.where(done, index, entries.shape[1])  # out of range: dropped
    entries = jax.vmap(lambda e, i, v: e.at[i].set(v, mode="drop"))(entries, index, new_entries)
    return entries, _ring_write(values, new_v, start, n_valid), _ring_write(logits, new_l, start, n_valid)


def cached_core_attention(q: jax.Array, keys: jax.Array, sinks: jax.Array, window: int, pos: jax.Array,
                          entries: jax.Array | None, topk_idx: jax.Array | None, ratio: int, chunk: int) -> jax.Array:
    """Core attention of new queries against the cache (same function as `sparse_attention`).

    q [B,T,H,c] at positions pos [B,T] = start + j; keys [B, W+T, c]: the window ring in position order
    (index i <-> position start - W + i) then the new tokens' KV; entries [B,N,c] or None; topk_idx
    [B,T,k] (CSA) or None (HCA: every entry s < floor((t+1)/m)). Returns [B,T,H,c] in q's dtype."""
    B, T, H, c = q.shape
    scale = c ** -0.5
    Q = min(chunk, T)
    keys = jnp.pad(keys, ((0, 0), (0, -(-T // Q) * Q - T), (0, 0)))
    start = pos[:, 0]
    sink_logits = sinks.astype(jnp.float32)[None, :, None, None]
    local = jnp.arange(Q + window - 1)

    def one_chunk(args):
        q_c, pos_c, idx_c, j = args  # [B,Q,H,c], [B,Q], [B,Q,k] | None, [Q]
        s = j[0]
        win = jax.lax.dynamic_slice_in_dim(keys, s + 1, Q + window - 1, axis=1)  # query s+u sees u..u+W-1
        key_pos = start[:, None] - window + s + 1 + local  # [B, Q+W-1]
        u = jnp.arange(Q)[:, None]
        band = (local[None, :] >= u) & (local[None, :] < u + window)  # [Q, Q+W-1]
        mask = band[None] & (key_pos[:, None, :] >= 0)  # [B, Q, Q+W-1]
        logits = [jnp.where(mask[:, None], scale * jnp.einsum("bqhc,bkc->bhqk", q_c, win,
                                                              preferred_element_type=jnp.float32), -jnp.inf)]
        values = [win]
        if entries is not None and entries.shape[1] > 0:
            if idx_c is None:  # HCA
                vis = jnp.arange(entries.shape[1]) < ((pos_c + 1) // ratio)[..., None]  # [B, Q, N]
                s_ = jnp.einsum("bqhc,bnc->bhqn", q_c, entries, preferred_element_type=jnp.float32)
                logits.append(jnp.where(vis[:, None], scale * s_, -jnp.inf))
                values.append(entries)
            else:  # CSA
                picked = jax.vmap(lambda e, i: e[jnp.maximum(i, 0)])(entries, idx_c)  # [B, Q, k, c]
                s_ = jnp.einsum("bqhc,bqkc->bhqk", q_c, picked, preferred_element_type=jnp.float32)
                logits.append(jnp.where((idx_c >= 0)[:, None], scale * s_, -jnp.inf))
                values.append(picked)
        mx = jnp.maximum(jnp.max(jnp.concatenate(logits, axis=-1), axis=-1, keepdims=True), sink_logits)
        probs = [jnp.exp(lg - mx) for lg in logits]
        denom = sum(jnp.sum(p, axis=-1, keepdims=True) for p in probs) + jnp.exp(sink_logits - mx)
        out = jnp.einsum("bhqk,bkc->bqhc", probs[0], win.astype(jnp.float32))
        if len(values) > 1:
            eq = "bhqn,bnc->bqhc" if idx_c is None else "bhqk,bqkc->bqhc"
            out += jnp.einsum(eq, probs[1], values[1].astype(jnp.float32))
        return (out / jnp.moveaxis(denom, 1, 2)).astype(q.dtype)

    if topk_idx is None:
        fn = lambda a: one_chunk((a[0], a[1], None, a[2]))  # noqa: E731
        return map_query_chunks(fn, (q, pos, jnp.arange(T)), T, chunk)
    return map_query_chunks(one_chunk, (q, pos, topk_idx, jnp.arange(T)), T, chunk)


def attention_extend(attn, x: jax.Array, lc: LayerCache, start: jax.Array, n_valid: jax.Array):
    """`Attention` on new tokens x [B,T,d] (attn_norm-ed) at positions start + j, with its cache."""
    cfg = attn.cfg
    B, T, _ = x.shape
    pos = start[:, None] + jnp.arange(T)  # [B, T]
    inv_freq = inv_frequencies(cfg, attn.kind)
    ratio = cfg.compress_ratio(attn.kind)

    cq = attn.q_norm(attn.wq_a(x))
    q = attn.wq_b(cq).reshape(B, T, cfg.n_heads, cfg.head_dim)
    q = apply_rope(rms_normalize(q, cfg.norm_eps), pos[..., None], inv_freq)
    kv = apply_rope(attn.kv_norm(attn.wkv(x)), pos, inv_freq)  # [B, T, c]
    keys = jnp.concatenate([_ring_read(lc.window, start).astype(kv.dtype), kv], axis=1)  # [B, W+T, c]

    entries = topk_idx = None
    updates = dict(window=_ring_write(lc.window, kv, start, n_valid))
    if attn.compressor is not None:
        entries, cv, cl = compressor_extend(attn.compressor, x, start, n_valid, lc.comp_values, lc.comp_logits,
                                            lc.entries, inv_freq)
        updates.update(entries=entries, comp_values=cv, comp_logits=cl)
        entries = entries.astype(kv.dtype)
    if attn.indexer is not None:
        ix = attn.indexer
        index_keys, iv, il = compressor_extend(ix.compressor, x, start, n_valid, lc.index_values, lc.index_logits,
                                               lc.index_keys, inv_freq)
        updates.update(index_keys=index_keys, index_values=iv, index_logits=il)
        qi = apply_rope(ix.wq_b(cq).reshape(B, T, ix.n_heads, ix.head_dim), pos[..., None], inv_freq)
        w = ix.weights_proj(x, jnp.float32) * (ix.head_dim * ix.n_heads) ** -0.5
        topk_idx = select_topk_at(qi, w, index_keys.astype(x.dtype), pos, ix.ratio, ix.topk, ix.chunk)

    o = cached_core_attention(q, keys, attn.sinks[...], cfg.window_size, pos, entries, topk_idx, ratio,
                              cfg.attention_chunk)
    o = apply_rope(o, pos[..., None], inv_freq, inverse=True)
    g = cfg.o_groups
    o = jnp.moveaxis(o.reshape(B * T, g, -1), 1, 0)  # [g, B*T, (H/g) c], as in Attention.__call__
    u = jnp.einsum("gni,gio->gno", o, attn.wo_a[...].astype(o.dtype), preferred_element_type=jnp.float32)
    out = attn.wo_b(jnp.moveaxis(u, 0, 1).astype(x.dtype).reshape(B, T, -1))
    return out, lc._replace(**updates)


def block_extend(block, streams: jax.Array, tokens: jax.Array, lc: LayerCache, start, n_valid):
    """`Block.__call__` on new tokens with the layer's cache: streams [B,T,n_hc,d] -> (streams, cache)."""
    streams = constrain(streams, STREAMS)
    u, post, comb = block.attn_hc.hc_pre(streams)
    a, lc = attention_extend(block.attn, block.attn_norm(u), lc, start, n_valid)
    streams = block.attn_hc.hc_post(a, streams, post, comb)
    v, post, comb = block.ffn_hc.hc_pre(constrain(streams, STREAMS))
    y, _ = block.ffn(block.ffn_norm(v), tokens)
    return block.ffn_hc.hc_post(y, streams, post, comb), lc


class Extended(NamedTuple):
    logits: jax.Array  # [B, T, V] fp32
    streams: jax.Array  # [B, T, n_hc, d] after the last main block (the MTP block's input)
    cache: Cache


def extend(model, cache: Cache, tokens: jax.Array, n_valid: jax.Array | None = None) -> Extended:
    """Feed tokens [B, T] at positions cache.lengths + j; n_valid [B] (default T) real tokens per row.

    Pure and jit-friendly (trace it with abstract inputs for AOT compilation). Positions past
    cache.max_len are not checked here (`prefill` / `generate` check concrete lengths)."""
    cfg = model.cfg
    B, T = tokens.shape
    if n_valid is None:
        n_valid = jnp.full((B,), T, jnp.int32)
    start = cache.lengths
    tokens = constrain(tokens, TOKENS)
    e = model.embed(tokens, jnp.dtype(cfg.dtype))
    streams = jnp.broadcast_to(e[:, :, None, :], (B, T, cfg.hc_mult, cfg.dim))
    new_stages = []
    for stage, stage_cache in zip(model.stages, cache.stages):
        splits = [nnx.split(b) for b in stage.blocks]

        def body(streams, xs):
            states, caches = xs
            out = []
            for (graphdef, _), state, lc in zip(splits, states, caches):
                streams, lc = block_extend(nnx.merge(graphdef, state), streams, tokens, lc, start, n_valid)
                out.append(lc)
            return streams, tuple(out)

        streams, caches = jax.lax.scan(body, streams, ([s for _, s in splits], stage_cache))
        new_stages.append(caches)
    h = model.norm(model.hc_head(streams))
    logits = constrain(model.head(h, jnp.float32), LOGITS)
    return Extended(logits, streams, cache.replace(lengths=start + n_valid, stages=tuple(new_stages)))


def mtp_extend(model, cache: Cache, streams: jax.Array, next_tokens: jax.Array, n_valid: jax.Array):
    """The MTP block at positions cache.mtp_lengths + j: streams [B,T,n_hc,d] of the main model at those
    positions and the tokens one further, next_tokens [B,T]. Returns (draft logits [B,T,V], cache);
    position t's logits predict token t+2 (spec §6)."""
    mtp, cfg = model.mtp, model.cfg
    if mtp is None or cache.mtp is None:
        raise ValueError("speculative decoding needs the MTP block and its cache (n_mtp_layers = 1)")
    start = cache.mtp_lengths
    e = model.embed(next_tokens, jnp.dtype(cfg.dtype))
    x = mtp.e_proj(mtp.enorm(e))[:, :, None, :] + mtp.h_proj(mtp.hnorm(streams))
    x, lc = block_extend(mtp.block, x, next_tokens, cache.mtp, start, n_valid)
    logits = constrain(model.head(mtp.norm(mtp.hc_head(x)), jnp.float32), LOGITS)
    return logits, cache.replace(mtp=lc, mtp_lengths=start + n_valid)


def decode_step(model, cache: Cache, tokens: jax.Array) -> tuple[jax.Array, Cache]:
    """One token per sequence: tokens [B, 1] -> (logits [B, 1, V] fp32, cache). Pure, jit-friendly."""
    out = extend(model, cache, tokens)
    return out.logits, out.cache


def _check_fits(cache: Cache, n_new: np.ndarray, what: str) -> None:
    lengths = np.asarray(cache.lengths)
    end = lengths + np.asarray(n_new)
    if np.any(end > cache.max_len):
        b = int(np.argmax(end - cache.max_len))
        raise ValueError(f"{what}: sequence {b} would hold {int(end[b])} tokens but the cache holds at most "
                         f"{cache.max_len} (max_len)")


def check_token_ids(tokens, vocab_size: int) -> np.ndarray:
    """Integer ids within [0, vocab_size), as an int32 array (ValueError otherwise)."""
    a = np.asarray(tokens)
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {a.dtype}")
    if a.size and (a.min() < 0 or a.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}); found {a.min()}..{a.max()}")
    return a.astype(np.int32)


def _concrete(x) -> np.ndarray | None:
    """x as a numpy array, or None while tracing (checks run on concrete inputs only)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def prefill(model, tokens: jax.Array, lengths: jax.Array | None, cache: Cache) -> tuple[jax.Array, Cache]:
    """Feed a (chunk of a) prompt: tokens [B, T] right-padded, lengths [B] real tokens per row (default
    T). Continues from the cache's current lengths, so calling it chunk by chunk equals one call.
    Returns (logits [B, T, V] fp32, cache); row b's next-token logits are at lengths[b] - 1.
    Checks concrete inputs (ids in the vocabulary, room in the cache); traceable with abstract ones."""
    B, T = tokens.shape
    lengths = jnp.full((B,), T, jnp.int32) if lengths is None else lengths
    ids, n, held = _concrete(tokens), _concrete(lengths), _concrete(cache.lengths)
    if ids is not None:
        check_token_ids(ids, model.cfg.vocab_size)
    if n is not None and held is not None:
        if np.any(n < 0) or np.any(n > T):
            raise ValueError(f"lengths must lie in [0, {T}] (the padded prompt width), got {n}")
        _check_fits(cache, n, "prefill")
    out = extend(model, cache, jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths, jnp.int32))
    return out.logits, out.cache


# ----------------------------------------------------------------------------------------------------
# Sampling


class Sampling(NamedTuple):
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    def validate(self, vocab_size: int) -> "Sampling":
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (isinstance(self.top_k, int) and 0 <= self.top_k <= vocab_size):
            raise ValueError(f"top_k must be an integer in [0, {vocab_size}], got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        return self

    def as_arrays(self) -> "Sampling":
        """The parameters as device scalars: jitted steps take them traced (no recompile per setting)."""
        return Sampling(jnp.float32(self.temperature), jnp.int32(self.top_k), jnp.float32(self.top_p))


def sampling_logprobs(logits: jax.Array, params: Sampling) -> jax.Array:
    """Log-probabilities [..., V] of the sampling distribution: logits / temperature, then top-k and
    top-p (nucleus: the smallest set of most likely tokens whose mass reaches top_p) masks.
    The parameters may be traced scalars (one compiled step serves every setting); temperature > 0."""
    logits = logits.astype(jnp.float32) / params.temperature
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]  # descending
    V = logits.shape[-1]
    k = jnp.where(params.top_k > 0, params.top_k, V)
    kth = jnp.take(sorted_logits, jnp.clip(k - 1, 0, V - 1), axis=-1)[..., None]
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
    sorted_logits = jnp.where(jnp.arange(V) < k, sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted token
    cutoff = jnp.min(jnp.where(before < params.top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.nn.log_softmax(logits, axis=-1)


def sample(logits: jax.Array, keys: jax.Array, params: Sampling) -> jax.Array:
    """logits [B, V], keys [B] (one PRNG key per row) -> tokens [B] int32. Greedy when temperature is 0.
    Parameters may be traced."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if isinstance(params.temperature, (int, float)) and params.temperature == 0:
        return greedy
    hot = Sampling(jnp.maximum(params.temperature, 1e-6), params.top_k, params.top_p)
    logp = sampling_logprobs(logits, hot)
    drawn = jax.vmap(lambda k, lp: jax.random.categorical(k, lp))(keys, logp).astype(jnp.int32)
    return jnp.where(params.temperature == 0, greedy, drawn)


def _row_keys(seed, rows: int, position: jax.Array) -> jax.Array:
    """One key per row and position [B] of the token drawn: a row's draws do not depend on its batch mates."""
    base = jax.random.key(seed)
    return jax.vmap(lambda r, t: jax.random.fold_in(jax.random.fold_in(base, r), t))(jnp.arange(rows), position)


# ----------------------------------------------------------------------------------------------------
# Generation


class GenerationStats(NamedTuple):
    prompt_tokens: int
    generated_tokens: int
    prefill_s: float
    decode_s: float
    steps: int  # decode calls of the main model after the prefill
    drafted: int  # speculative: drafts verified
    accepted: int  # speculative: drafts accepted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class Generation(NamedTuple):
    tokens: list[list[int]]  # generated ids per prompt (a stop token, when hit, is the last one)
    stats: GenerationStats


class Generator:
    """Batched generation with jitted, cache-donating steps; build once per model and reuse.

    >>> gen = Generator(model)
    >>> out = gen.generate([[1, 2, 3], [4, 5]], max_new_tokens=16)
    >>> for step in gen.stream(prompts, max_new_tokens=16): print(step)   # {row: [new ids]}
    """

    def __init__(self, model):
        self.model, self.cfg = model, model.cfg
        self.graphdef, self.state = nnx.split(model)
        gd = self.graphdef

        def _prefill(state, cache, tokens, n_valid):
            return extend(nnx.merge(gd, state), cache, tokens, n_valid)

        def _step(state, cache, pending, step, seed, params):
            out = extend(nnx.merge(gd, state), cache, pending[:, None])
            nxt = sample(out.logits[:, 0], _row_keys(seed, pending.shape[0], step), params)
            return nxt, out.logits[:, 0], out.cache

        def _mtp_prefill(state, cache, streams, next_tokens, n_valid):
            model = nnx.merge(gd, state)
            logits, cache = mtp_extend(model, cache, streams, next_tokens, n_valid)
            return jnp.take_along_axis(jnp.argmax(logits, -1), (n_valid - 1)[:, None], 1)[:, 0].astype(jnp.int32), cache

        def _spec_step(state, cache, pending, draft):
            model = nnx.merge(gd, state)
            out = extend(model, cache, jnp.stack([pending, draft], 1))
            target = jnp.argmax(out.logits, -1).astype(jnp.int32)  # [B, 2]: tokens p+1, p+2
            accept = target[:, 0] == draft
            n_acc = 1 + accept.astype(jnp.int32)
            cache = out.cache.replace(lengths=cache.lengths + n_acc)  # rollback = not advancing
            logits, cache = mtp_extend(model, cache, out.streams, target, n_acc)
            new_draft = jnp.take_along_axis(jnp.argmax(logits, -1), (n_acc - 1)[:, None], 1)[:, 0]
            return target, accept, new_draft.astype(jnp.int32), out.logits, cache

        self._prefill = jax.jit(_prefill, donate_argnums=1)
        self._step = jax.jit(_step, donate_argnums=1)
        self._mtp_prefill = jax.jit(_mtp_prefill, donate_argnums=1)
        self._spec_step = jax.jit(_spec_step, donate_argnums=1)

    def stream(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, sampling: Sampling = Sampling(),
               stop_tokens: Sequence[int] = (), seed: int = 0, speculative: bool = False,
               prefill_chunk: int | None = None, max_len: int | None = None, stats: list | None = None
               ) -> Iterator[dict[int, list[int]]]:
        """Yield {row: [new token ids]} after the prefill and after every step, until every row has hit a
        stop token or max_new_tokens. `stats` (a list) receives the GenerationStats at the end."""
        cfg = self.cfg
        sampling = Sampling(*sampling).validate(cfg.vocab_size)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        rows = [check_token_ids(p, cfg.vocab_size) for p in prompts]
        check_token_ids(list(stop_tokens), cfg.vocab_size)
        if speculative:
            if self.model.mtp is None:
                raise ValueError("--speculative needs an MTP block; this model has none (n_mtp_layers = 0)")
            if sampling.temperature != 0:
                raise ValueError("speculative decoding is implemented for greedy decoding (temperature 0) only")
        B = len(rows)
        lengths = np.array([len(r) for r in rows], np.int32)
        if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
            raise ValueError(f"prefill_chunk must be a positive integer, got {prefill_chunk!r}")
        need = int(lengths.max()) + max_new_tokens + (1 if speculative else 0)  # verify writes one ahead
        max_len = max_len or min(need, cfg.max_seq_len)
        if need > max_len:
            raise ValueError(f"prompt of {int(lengths.max())} tokens + max_new_tokens {max_new_tokens} needs "
                             f"{need} cache positions, more than max_len {max_len} (model max_seq_len "
                             f"{cfg.max_seq_len})")
        chunk = prefill_chunk or int(lengths.max())
        if speculative and chunk < lengths.max():
            raise ValueError("speculative decoding runs the prompt in one prefill (prefill_chunk unsupported)")
        T = -(-int(lengths.max()) // chunk) * chunk  # whole chunks: one compiled prefill shape per chunk size
        padded = np.zeros((B, T), np.int32)
        for b, r in enumerate(rows):
            padded[b, :len(r)] = r
        cache = init_cache(cfg, B, max_len)  # with the MTP block's (small) cache whenever there is one: one shape

        t0 = time.perf_counter()
        last_logits = np.zeros((B, cfg.vocab_size), np.float32)
        for s in range(0, T, chunk):
            n_valid = np.clip(lengths - s, 0, chunk).astype(np.int32)
            out = self._prefill(self.state, cache, jnp.asarray(padded[:, s:s + chunk]), jnp.asarray(n_valid))
            cache = out.cache
            logits = np.asarray(out.logits)
            for b in range(B):
                if s < lengths[b] <= s + chunk:
                    last_logits[b] = logits[b, lengths[b] - s - 1]
        traced = sampling.as_arrays()
        first = sample(jnp.asarray(last_logits), _row_keys(seed, B, jnp.asarray(lengths)), traced)
        first = np.asarray(first)
        draft = None
        if speculative:
            nxt = np.concatenate([padded[:, 1:], np.zeros((B, 1), np.int32)], axis=1)
            nxt[np.arange(B), lengths - 1] = first
            draft, cache = self._mtp_prefill(self.state, cache, out.streams, jnp.asarray(nxt), jnp.asarray(lengths))
        jax.block_until_ready(first)
        prefill_s = time.perf_counter() - t0

        stop = set(int(t) for t in stop_tokens)
        produced = [[] for _ in range(B)]
        done = np.zeros(B, bool)

        def emit(b, toks):
            new = []
            for t in toks:
                if done[b]:
                    break
                produced[b].append(int(t))
                new.append(int(t))
                if int(t) in stop or len(produced[b]) >= max_new_tokens:
                    done[b] = True
            return new

        yield {b: emit(b, [first[b]]) for b in range(B)}
        t1 = time.perf_counter()
        steps = drafted = accepted = 0
        pending = jnp.asarray(first)
        while not done.all():
            steps += 1
            if speculative:
                target, acc, draft, _, cache = self._spec_step(self.state, cache, pending, draft)
                target, acc = np.asarray(target), np.asarray(acc)
                live = ~done
                drafted += int(live.sum())
                accepted += int((acc & live).sum())
                update = {b: emit(b, target[b, :1 + int(acc[b])]) for b in range(B) if live[b]}
                pending = jnp.asarray(np.where(acc, target[:, 1], target[:, 0]))
            else:
                pending, _, cache = self._step(self.state, cache, pending, jnp.asarray(lengths + steps), seed, traced)
                nxt = np.asarray(pending)
                update = {b: emit(b, [nxt[b]]) for b in range(B) if not done[b]}
            yield update
        decode_s = time.perf_counter() - t1
        if stats is not None:
            stats.append(GenerationStats(int(lengths.sum()), sum(map(len, produced)), prefill_s, decode_s, steps,
                                         drafted, accepted))

    def generate(self, prompts: Sequence[Sequence[int]], **kw) -> Generation:
        """All of `stream`, collected: generated ids per prompt and GenerationStats."""
        produced = [[] for _ in prompts]
        stats: list = []
        for update in self.stream(prompts, stats=stats, **kw):
            for b, toks in update.items():
                produced[b].extend(toks)
        return Generation(produced, stats[0])


def generate(model, prompts: Sequence[Sequence[int]], **kw) -> Generation:
    """One-off `Generator(model).generate(prompts, **kw)` (compiles the steps each call)."""
    return Generator(model).generate(prompts, **kw)
