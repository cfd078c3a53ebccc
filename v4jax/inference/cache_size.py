"""KV-cache size calculator (architecture.md §4.7): bytes per token and per sequence of a config's cache, in
the release's storage format or in this implementation's `init_cache` layout, against the V3.2 and
GQA baselines.

    python -m v4jax.inference.cache_size --config v4-flash --config v4-pro --context 131072 --context 1048576
    python -m v4jax.inference.cache_size --format layout --numerics release   # what init_cache allocates
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NamedTuple

import jax.numpy as jnp

from v4jax.config import AttentionKind, Numerics, V4Config
from v4jax.model.numerics import Fp4Keys, Fp8KV

# V3.2 baseline (architecture.md §4.7): 61 MLA layers, per token a 656 B latent (512 FP8 + 64 BF16 RoPE + scales)
# and a 132 B indexer key (128 FP8 + 4 B scale).
V32_LAYERS, V32_LATENT_BYTES, V32_INDEX_KEY_BYTES = 61, 656, 132


class CacheSize(NamedTuple):
    per_token: float  # bytes per token of context, amortised (compressed entries + indexer keys)
    fixed: float  # bytes per sequence independent of length (SWA windows + compressor states)

    def total(self, context: int) -> float:
        return self.per_token * context + self.fixed


def cache_size(cfg: V4Config, fmt: str = "release", dtype: str = "float32",
               numerics: Numerics | str = Numerics.EXACT) -> CacheSize:
    """Bytes per token and fixed bytes per sequence of a config's KV cache.

    fmt="release": the release storage (FP8 entries with BF16 RoPE dims and UE8M0 scales per 64, MXFP4
    indexer keys; architecture.md §4.7, §10.3: 583 B and 68 B for V4), no decoder state;
    fmt="layout": this implementation's `init_cache` arrays for a run's RunOptions.dtype and .numerics
    (release numerics store the release formats), fp32 compressor states. MTP not counted (the
    spec's figures leave it out)."""
    release = (Fp8KV.nbytes(cfg.head_dim, cfg.rope_head_dim), Fp4Keys.nbytes(cfg.index_head_dim))
    if fmt == "release":
        (entry, key), state_bytes = release, 0
    elif fmt == "layout":
        size = jnp.dtype(dtype).itemsize
        plain = (cfg.head_dim * size, cfg.index_head_dim * size)
        (entry, key), state_bytes = release if Numerics(numerics) is Numerics.RELEASE else plain, 4
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
    """The V3.2-shaped baseline of architecture.md §4.7: every token keeps a latent and an indexer key per layer."""
    return CacheSize(V32_LAYERS * (V32_LATENT_BYTES + V32_INDEX_KEY_BYTES), 0.0)


def gqa_baseline_size(n_layers: int, kv_heads: int = 8, head_dim: int = 128) -> CacheSize:
    """A BF16 GQA baseline (architecture.md §4.7: GQA-8, head dim 128): keys and values per layer per token."""
    return CacheSize(n_layers * 2 * kv_heads * head_dim * 2, 0.0)


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def size_table(configs: list[str], contexts: list[int], fmt: str = "release", dtype: str = "bfloat16",
               numerics: str = "exact") -> str:
    """A markdown table: per-token bytes, totals at each context, and the reduction vs V3.2."""
    base = v32_baseline_size()
    head = ["model", "bytes/token"] + [f"at {c:,}" for c in contexts] + ["fixed (SWA + state)", "vs V3.2", "vs GQA-8"]
    rows = []
    for name in configs:
        cfg = V4Config.from_json_file(name) if os.path.exists(name) else V4Config.preset(name)
        s = cache_size(cfg, fmt, dtype, numerics)
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
    p = argparse.ArgumentParser(prog="python -m v4jax.inference.cache_size", description="KV-cache size per token and in total.")
    p.add_argument("--config", action="append", help="preset name or config.json (repeatable; default v4-flash, v4-pro)")
    p.add_argument("--context", type=int, action="append", help="context length (repeatable; default 131072, 1048576)")
    p.add_argument("--format", choices=["release", "layout"], default="release",
                   help="release: FP8/FP4 storage of the release; layout: the arrays init_cache allocates")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16", help="layout: the compute dtype")
    p.add_argument("--numerics", choices=[n.value for n in Numerics], default="exact",
                   help="layout: the run's numerics (release stores the release formats)")
    args = p.parse_args(argv)
    contexts = args.context or [131072, 1048576]
    if any(c < 1 for c in contexts):
        print("error: --context must be positive", file=sys.stderr)
        return 2
    configs = args.config or ["v4-flash", "v4-pro"]
    try:
        print(size_table(configs, contexts, args.format, args.dtype, args.numerics))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
