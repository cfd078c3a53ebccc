"""The V4 inference cache (architecture.md §4.7): the state the attention layers own, for the whole model.

The cache is the state the attention layers own (`AttentionState`, `CompressorState`), gathered
for the whole model. Per attention layer and sequence:
  window               [W, c]             ring buffer of raw KV, slot t mod W holds kv_t (every layer)
  compressor.entries   [N, c]             compressed KV, N = max_len // m; entry i is written when token
                                          m(i+1)-1 arrives (CSA, HCA)
  compressor.values    [kappa m, kappa c] the compressor's per-token values and logits (fp32, logits with
  compressor.logits                       `ape` added; slot t mod kappa m): HCA keeps the current partial
                                          window (kappa = 1), CSA the previous full window as well (kappa = 2)
  indexer.entries      [N, c_I]           the lightning indexer's compressed keys (CSA)
  indexer.values/logits [2m, 2c_I]        the indexer compressor's state (CSA)
Missing parts are None. The cache is a plain pytree of arrays (no nnx): `Cache.stages[s][p]` is the
AttentionState of unit position p of stage s with every array stacked on a leading [repeats] axis,
so the forward scans the stages with their caches. `Cache.lengths` [B] is the number of tokens each
sequence holds: everything is addressed by absolute position, so rolling back rejected speculative
tokens is resetting `lengths` (the rings are sized so that one rejected token overwrites only a slot
nobody reads again; see `v4jax.inference.generate`). `cache_logical_axes` gives the parallel pytree of logical
axis names for the sharding rules table, `cache_shardings` resolves it on a mesh.

Storage is the compute dtype (fp32 or bf16), or with `numerics=release` the release's formats
(architecture.md §10.3): window and compressed KV as `Fp8KV` (FP8 non-RoPE dims, UE8M0 scales, BF16 RoPE
dims), the indexer's keys as `Fp4Keys` (MXFP4); compressor states stay fp32. The layers read and
write whichever format the cache holds. `v4jax.inference.cache_size` reports the bytes of each layout.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from v4jax.model.attention import AttentionState
from v4jax.model.compressor import CompressorState
from v4jax.config import AttentionKind, Numerics, V4Config, stage_units
from v4jax.model.numerics import Fp4Keys, Fp8KV


LayerCache = AttentionState  # one attention layer's cache


def _compressor_axes(width: str | None) -> CompressorState:
    return CompressorState(values=("batch", None, None), logits=("batch", None, None),
                           entries=("batch", "seq", width))


# Logical axis names of each cache array without the leading "layers" axis.
_LAYER_AXES = AttentionState(window=("batch", None, "head_dim"), compressor=_compressor_axes("head_dim"),
                             indexer=_compressor_axes(None))


@dataclasses.dataclass(frozen=True)
class Cache:
    """The whole model's cache. `max_len` is static (pytree metadata); the rest are arrays."""

    lengths: jax.Array  # [B] int32: tokens held per sequence (= position of the next token)
    stages: tuple[tuple[AttentionState, ...], ...]  # per stage, per unit position, stacked [R, ...]
    mtp: AttentionState | None  # the MTP block's SWA cache (speculative decoding), or None
    mtp_lengths: jax.Array | None  # [B] int32: positions the MTP block has processed
    max_len: int = 0

    def replace(self, **changes) -> "Cache":
        return dataclasses.replace(self, **changes)

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]


jax.tree_util.register_dataclass(Cache, data_fields=["lengths", "stages", "mtp", "mtp_lengths"],
                                 meta_fields=["max_len"])


def _layer_cache(cfg: V4Config, kind: AttentionKind, batch: int, max_len: int, dtype,
                 lead: tuple[int, ...], release: bool = False) -> AttentionState:
    """An empty AttentionState; lead: leading stacking dims ([repeats] for a scanned stage)."""

    def kv(rows: int):  # [*lead, B, rows, c]
        shape = lead + (batch, rows)
        if release:
            return Fp8KV.zeros(shape, cfg.head_dim, cfg.rope_head_dim)
        return jnp.zeros(shape + (cfg.head_dim,), dtype)

    def compressor(ratio: int, width: int, kappa: int, entries) -> CompressorState:
        ring = lead + (batch, kappa * ratio, kappa * width)
        return CompressorState(jnp.zeros(ring, jnp.float32),  # no token yet: logits -inf, softmax weight 0
                               jnp.full(ring, -jnp.inf, jnp.float32), entries)

    m = cfg.compress_ratio(kind)
    n, c_i = max_len // m if m else 0, cfg.index_head_dim
    keys = Fp4Keys.zeros(lead + (batch, n), c_i) if release else jnp.zeros(lead + (batch, n, c_i), dtype)
    return AttentionState(
        kv(cfg.window_size),
        compressor(m, cfg.head_dim, 2 if kind is AttentionKind.CSA else 1, kv(n)) if m else None,
        compressor(m, c_i, 2, keys) if kind is AttentionKind.CSA else None)


def init_cache(cfg: V4Config, batch: int, max_len: int, dtype="float32", *, mtp: bool | None = None,
               numerics: Numerics | str = Numerics.EXACT) -> Cache:
    """An empty cache for `batch` sequences of up to `max_len` tokens (prompt + generated).

    dtype: storage dtype of KV (callers pass the model's RunOptions.dtype); compressor states are fp32
    (architecture.md §4.3). numerics: the model's RunOptions.numerics; `release` stores KV and the
    indexer's keys in the release's FP8 / FP4 formats instead (architecture.md §10.3).
    mtp: also allocate the MTP block's cache (default: when the config has an MTP block).
    Works under `jax.eval_shape` (for AOT compilation and sharding)."""
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
    if max_len > cfg.max_seq_len:
        raise ValueError(f"max_len {max_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
    dtype, release = jnp.dtype(dtype), Numerics(numerics) is Numerics.RELEASE
    stages = tuple(tuple(_layer_cache(cfg, kind, batch, max_len, dtype, (repeats,), release) for kind, _ in unit)
                   for unit, repeats in stage_units(cfg))
    mtp = bool(cfg.n_mtp_layers) if mtp is None else mtp
    if mtp and not cfg.n_mtp_layers:
        raise ValueError("an MTP cache was requested but the config has no MTP block (n_mtp_layers = 0)")
    return Cache(jnp.zeros((batch,), jnp.int32), stages,
                 _layer_cache(cfg, AttentionKind.SLIDING, batch, max_len, dtype, (), release) if mtp else None,
                 jnp.zeros((batch,), jnp.int32) if mtp else None, max_len)


def cache_logical_axes(cache: Cache) -> Cache:
    """A Cache-shaped pytree whose leaves are tuples of logical axis names (one per array dimension)."""

    def layer(lc: AttentionState, lead: tuple):
        # every stored part of an array (a release format's codes, scales and RoPE dims) takes its axes
        named = lambda stored, axes: jax.tree.map(lambda _: lead + axes, stored)  # noqa: E731

        def part(state, axes):
            return None if state is None else CompressorState(*map(named, state, axes))

        return AttentionState(named(lc.window, _LAYER_AXES.window), part(lc.compressor, _LAYER_AXES.compressor),
                              part(lc.indexer, _LAYER_AXES.indexer))

    stages = tuple(tuple(layer(lc, ("layers",)) for lc in unit) for unit in cache.stages)
    return Cache(("batch",), stages, None if cache.mtp is None else layer(cache.mtp, ()),
                 None if cache.mtp_lengths is None else ("batch",), cache.max_len)


def cache_shardings(cache: Cache, mesh: jax.sharding.Mesh, rules) -> Cache:
    """NamedShardings for every cache array (concrete or abstract) from a `sharding.rules.AxisRules`.
    A dimension that does not divide its mesh axes (batch 1) stays whole, as for activations."""
    from jax.sharding import NamedSharding

    return jax.tree.map(lambda a, axes: NamedSharding(mesh, rules.spec(axes, a.shape, mesh, what="activation")),
                        cache, cache_logical_axes(cache))


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by the cache's arrays (works on abstract caches too)."""
    return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(cache))


# ----------------------------------------------------------------------------------------------------
# Rows (sequence slots): continuous batching gives a finished row's slot to the next prompt.

def _by_batch_axis(fn, cache: Cache, *others: Cache) -> Cache:
    """Map fn(array, batch_axis, *matching arrays of `others`) over every cache array."""
    axes = cache_logical_axes(cache)
    return jax.tree.map(lambda axes_, a, *o: fn(a, axes_.index("batch"), *o), axes, cache, *others,
                        is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x))


def cache_rows(cache: Cache, start: jax.Array, size: int = 1) -> Cache:
    """Rows [start, start + size) of every cache array (start may be traced): a cache of `size` sequences."""
    return _by_batch_axis(lambda a, ax: jax.lax.dynamic_slice_in_dim(a, start, size, ax), cache)


def put_cache_rows(cache: Cache, rows: Cache, start: jax.Array) -> Cache:
    """`cache` with rows [start, start + rows.batch) replaced by `rows` (start may be traced)."""
    return _by_batch_axis(lambda a, ax, r: jax.lax.dynamic_update_slice_in_dim(a, r.astype(a.dtype), start, ax),
                          cache, rows)


def reset_rows(cache: Cache, rows: jax.Array) -> Cache:
    """Empty the sequences where rows [B] is True: length 0 and no token in the compressor rings (their
    logits -inf). Nothing else needs clearing: every other read is masked by absolute position, and a
    new sequence rewrites the window slots and entries it reaches before it reads them."""

    def clear(state: CompressorState | None, lead: int):
        if state is None:
            return None
        mask = rows.reshape((1,) * lead + (-1,) + (1,) * (state.logits.ndim - lead - 1))
        return state._replace(values=jnp.where(mask, 0.0, state.values), logits=jnp.where(mask, -jnp.inf, state.logits))

    def layer(lc: AttentionState, lead: int) -> AttentionState:
        return lc._replace(compressor=clear(lc.compressor, lead), indexer=clear(lc.indexer, lead))

    zero = lambda n: None if n is None else jnp.where(rows, 0, n)  # noqa: E731
    return cache.replace(lengths=zero(cache.lengths), mtp_lengths=zero(cache.mtp_lengths),
                         stages=tuple(tuple(layer(lc, 1) for lc in unit) for unit in cache.stages),
                         mtp=None if cache.mtp is None else layer(cache.mtp, 0))
