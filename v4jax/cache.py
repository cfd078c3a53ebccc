"""The V4 inference cache (spec §4.7) and the KV-cache size calculator (spec §4.7, §9).

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
nobody reads again; see `v4jax.generate`). `cache_logical_axes` gives the parallel pytree of logical
axis names for the sharding rules table, `cache_shardings` resolves it on a mesh.

Storage here is the compute dtype (fp32 or bf16), not the release's FP8/FP4 formats;
`cache_size` reports both this layout and the release format.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp

from v4jax.attention import AttentionState
from v4jax.compressor import CompressorState
from v4jax.config import AttentionKind, V4Config, stage_units


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
                 lead: tuple[int, ...]) -> AttentionState:
    """An empty AttentionState; lead: leading stacking dims ([repeats] for a scanned stage)."""

    def compressor(ratio: int, width: int, kappa: int) -> CompressorState:
        ring = lead + (batch, kappa * ratio, kappa * width)
        return CompressorState(jnp.zeros(ring, jnp.float32),  # no token yet: logits -inf, softmax weight 0
                               jnp.full(ring, -jnp.inf, jnp.float32),
                               jnp.zeros(lead + (batch, max_len // ratio, width), dtype))

    m = cfg.compress_ratio(kind)
    return AttentionState(
        jnp.zeros(lead + (batch, cfg.window_size, cfg.head_dim), dtype),
        compressor(m, cfg.head_dim, 2 if kind is AttentionKind.CSA else 1) if m else None,
        compressor(m, cfg.index_head_dim, 2) if kind is AttentionKind.CSA else None)


def init_cache(cfg: V4Config, batch: int, max_len: int, dtype="float32", *, mtp: bool | None = None) -> Cache:
    """An empty cache for `batch` sequences of up to `max_len` tokens (prompt + generated).

    dtype: storage dtype of KV (callers pass the model's RunOptions.dtype); compressor states are fp32
    (spec §4.3).
    mtp: also allocate the MTP block's cache (default: when the config has an MTP block).
    Works under `jax.eval_shape` (for AOT compilation and sharding)."""
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
    if max_len > cfg.max_seq_len:
        raise ValueError(f"max_len {max_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
    dtype = jnp.dtype(dtype)
    stages = tuple(tuple(_layer_cache(cfg, kind, batch, max_len, dtype, (repeats,)) for kind, _ in unit)
                   for unit, repeats in stage_units(cfg))
    mtp = bool(cfg.n_mtp_layers) if mtp is None else mtp
    if mtp and not cfg.n_mtp_layers:
        raise ValueError("an MTP cache was requested but the config has no MTP block (n_mtp_layers = 0)")
    return Cache(jnp.zeros((batch,), jnp.int32), stages,
                 _layer_cache(cfg, AttentionKind.SLIDING, batch, max_len, dtype, ()) if mtp else None,
                 jnp.zeros((batch,), jnp.int32) if mtp else None, max_len)


def cache_logical_axes(cache: Cache) -> Cache:
    """A Cache-shaped pytree whose leaves are tuples of logical axis names (one per array dimension)."""

    def layer(lc: AttentionState, lead: tuple):
        def part(state, axes):
            return None if state is None else CompressorState(*(lead + ax for ax in axes))

        return AttentionState(lead + _LAYER_AXES.window, part(lc.compressor, _LAYER_AXES.compressor),
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


# --------------------------------------------------------------------------------------------------
# Cache-size calculator (spec §4.7 / §9)

# Release storage (spec §4.7, our estimate of the official format): a compressed or window entry is
# 448 FP8 nope dims + 64 BF16 RoPE dims + 7 one-byte block scales; an indexer key 64 B of FP4 + 4 B scales.
RELEASE_ENTRY_BYTES = 448 + 64 * 2 + 7  # 583
RELEASE_INDEX_KEY_BYTES = 64 + 4  # 68
# V3.2 baseline (spec §4.7): 61 MLA layers, per token a 656 B latent (512 FP8 + 64 BF16 RoPE + scales)
# and a 132 B indexer key (128 FP8 + 4 B scale).
V32_LAYERS, V32_LATENT_BYTES, V32_INDEX_KEY_BYTES = 61, 656, 132


class CacheSize(NamedTuple):
    per_token: float  # bytes per token of context, amortised (compressed entries + indexer keys)
    fixed: float  # bytes per sequence independent of length (SWA windows + compressor states)

    def total(self, context: int) -> float:
        return self.per_token * context + self.fixed


def cache_size(cfg: V4Config, fmt: str = "release", dtype: str = "float32") -> CacheSize:
    """Bytes per token and fixed bytes per sequence of a config's KV cache.

    fmt="release": the release storage (FP8 entries with BF16 RoPE dims, FP4 indexer keys; spec §4.7);
    fmt="layout": this implementation's `init_cache` arrays in `dtype` (the run's RunOptions.dtype), fp32
    compressor states. MTP not counted (the spec's figures leave it out)."""
    if fmt == "release":
        entry, key, state_bytes = RELEASE_ENTRY_BYTES, RELEASE_INDEX_KEY_BYTES, 0
    elif fmt == "layout":
        size = jnp.dtype(dtype).itemsize
        entry, key, state_bytes = cfg.head_dim * size, cfg.index_head_dim * size, 4
    else:
        raise ValueError(f"fmt must be 'release' or 'layout', got {fmt!r}")
    per_token = fixed = 0.0
    for kind in cfg.layer_types:
        fixed += cfg.window_size * entry
        m = cfg.compress_ratio(kind)
        if not m:
            continue
        per_token += entry / m
        if kind is AttentionKind.CSA:
            per_token += key / m
            fixed += state_bytes * 2 * (2 * m * 2 * cfg.head_dim + 2 * m * 2 * cfg.index_head_dim)
        else:
            fixed += state_bytes * 2 * m * cfg.head_dim
    return CacheSize(per_token, fixed)


def v32_baseline_size() -> CacheSize:
    """The V3.2-shaped baseline of spec §4.7: every token keeps a latent and an indexer key per layer."""
    return CacheSize(V32_LAYERS * (V32_LATENT_BYTES + V32_INDEX_KEY_BYTES), 0.0)


def gqa_baseline_size(n_layers: int, kv_heads: int = 8, head_dim: int = 128) -> CacheSize:
    """A BF16 GQA baseline (spec §9: GQA-8, head dim 128): keys and values per layer per token."""
    return CacheSize(n_layers * 2 * kv_heads * head_dim * 2, 0.0)


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def size_table(configs: list[str], contexts: list[int], fmt: str = "release") -> str:
    """A markdown table: per-token bytes, totals at each context, and the reduction vs V3.2."""
    base = v32_baseline_size()
    head = ["model", "bytes/token"] + [f"at {c:,}" for c in contexts] + ["fixed (SWA + state)", "vs V3.2", "vs GQA-8"]
    rows = []
    for name in configs:
        cfg = V4Config.from_json_file(name) if os.path.exists(name) else V4Config.preset(name)
        s = cache_size(cfg, fmt)
        gqa = gqa_baseline_size(cfg.n_layers)
        rows.append([name, f"{s.per_token:,.0f}"] + [_fmt_bytes(s.total(c)) for c in contexts]
                    + [_fmt_bytes(s.fixed), f"{base.per_token / s.per_token:.1f}x smaller",
                       f"{100 * s.per_token / gqa.per_token:.1f}%"])
    rows.append(["V3.2 baseline", f"{base.per_token:,.0f}"] + [_fmt_bytes(base.total(c)) for c in contexts]
                + ["-", "1.0x", "-"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m v4jax.cache", description="KV-cache size per token and in total.")
    p.add_argument("--config", action="append", help="preset name or config.json (repeatable; default v4-flash, v4-pro)")
    p.add_argument("--context", type=int, action="append", help="context length (repeatable; default 131072, 1048576)")
    p.add_argument("--format", choices=["release", "layout"], default="release",
                   help="release: FP8/FP4 storage of the release; layout: this implementation's arrays")
    args = p.parse_args(argv)
    contexts = args.context or [131072, 1048576]
    if any(c < 1 for c in contexts):
        print("error: --context must be positive", file=sys.stderr)
        return 2
    configs = args.config or ["v4-flash", "v4-pro"]
    try:
        print(size_table(configs, contexts, args.format))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
