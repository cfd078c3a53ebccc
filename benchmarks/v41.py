"""DeepSeek-V4.1 on paper and on this CPU (issue 20): the KV cache per token against V4-Flash, the
parameter count of v41-flash, and the v41-tiny forward / decode throughput.

KV bytes per token of context (the compressed entries and index keys; windows and compressor states are
a fixed amount per sequence):
* V4.1 as this code allocates it (`init_v41_cache`, bf16): only the KV sources keep entries, one per m
  tokens, c values each, plus an index key of c_I values;
* V4.1 in the release's storage (spec §10.2.2, §10.3.1 (c)): entries FP4 in groups of 16 with an E4M3
  scale per group (c/2 + c/16 bytes), index keys FP4 in groups of 32 with a UE8M0 scale (c_I/2 + c_I/32);
* V4-Flash from `v4jax.inference.cache_size` (every CSA / HCA layer keeps its own entries).

Usage:  JAX_PLATFORMS=cpu python -m benchmarks.v41 [--steps N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from v4jax.config import RunOptions, V4Config
from v4jax.config_v41 import V41Config
from v4jax.inference.cache_size import cache_size
from v4jax.model.v41 import V41Transformer, init_v41_cache


def v41_kv_bytes_per_token(cfg: V41Config, fmt: str) -> float:
    """Compressed bytes per token of context: 'layout' (bf16 `init_v41_cache`) or 'release' (FP4)."""
    if fmt == "layout":
        entry, key = 2 * cfg.head_dim, 2 * cfg.index_head_dim
    else:
        entry, key = cfg.head_dim // 2 + cfg.head_dim // 16, cfg.index_head_dim // 2 + cfg.index_head_dim // 32
    return sum((entry + key) / cfg.ratio(i) for i in cfg.kv_source_layers)


def layout_check(cfg: V41Config) -> float:
    """The per-token slope of what `init_v41_cache` really allocates (two lengths, eval_shape only), bf16."""
    def nbytes(n):
        c = jax.eval_shape(lambda: init_v41_cache(cfg, 1, n, jnp.bfloat16))
        return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(c))
    return (nbytes(2 * 4096) - nbytes(4096)) / 4096


def param_counts(cfg: V41Config, abstract: V41Transformer | None = None) -> dict[str, float]:
    """Parameters of `cfg`'s model (or of `abstract`, an already built one), total and per role."""
    if abstract is None:
        abstract = nnx.eval_shape(lambda: V41Transformer(cfg, rngs=nnx.Rngs(0), options=RunOptions(
            dtype="bfloat16", param_dtype="bfloat16")))
    sizes = {".".join(map(str, p)): int(np.prod(v.get_value().shape)) for p, v in nnx.to_flat_state(nnx.state(abstract))}
    counts = role_counts(sizes, cfg, engram_suffix="engram.table", dspark_prefix="dspark.")
    engram_rows = sum(cfg.engram_num_embeddings) * cfg.engram_head_dim  # without the row padding
    return dict(counts, total=counts["total"] - counts["engram"] + engram_rows, engram=engram_rows)


def role_counts(sizes: dict[str, int], cfg: V41Config, *, engram_suffix: str, dspark_prefix: str) -> dict[str, float]:
    """{tensor name: parameters} -> the total and the roles: routed experts (backbone), Engram tables,
    vision, DSpark, the rest; active per text token = the rest + k of E experts + the Engram rows a
    token looks up (one per n-gram order and head in each Engram layer)."""
    part = lambda f: sum(n for k, n in sizes.items() if f(k))  # noqa: E731
    experts = part(lambda k: k.startswith(("layers.", "segments.")) and ".ffn.experts." in k)  # official | ours
    engram = part(lambda k: k.endswith(engram_suffix))
    vision = part(lambda k: k.startswith(("vision.", "aligner.")))
    dspark = part(lambda k: k.startswith(dspark_prefix))
    total = sum(sizes.values())
    rest = total - experts - engram - vision - dspark
    active = rest + experts * cfg.n_activated_experts / cfg.n_routed_experts + len(cfg.engram_layer_ids) * (
        (cfg.engram_max_ngram_size - 1) * cfg.engram_n_heads * cfg.engram_head_dim)
    return dict(total=total, experts=experts, engram=engram, vision=vision, dspark=dspark, rest=rest, active=active)


def cpu_throughput(steps: int) -> dict[str, float]:
    """v41-tiny (random weights, no vision in the prompt): prefill of 2 x 64 tokens and single-token
    decode steps, jitted, fp32, after one warm-up call each."""
    cfg = V41Config.preset("v41-tiny")
    model = V41Transformer(cfg, rngs=nnx.Rngs(0), options=RunOptions(dtype="float32", param_dtype="float32",
                                                                     attention_chunk=64))
    B, T = 2, 64
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T + steps + 1)), jnp.int32)
    cols = (cfg.engram_max_ngram_size - 1) * cfg.engram_n_heads
    rows = jnp.asarray(rng.integers(0, min(cfg.engram_num_embeddings), (B, T + steps + 1, 2, cols)), jnp.int32)
    step = nnx.jit(lambda m, t, e, c: m(t, e, cache=c, return_hidden_states=False))
    cache0 = init_v41_cache(cfg, B, 128)
    jax.block_until_ready(step(model, tokens[:, :T], rows[:, :T], cache0).logits)  # compile
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        out = step(model, tokens[:, :T], rows[:, :T], cache0)
        jax.block_until_ready(out.logits)
        times.append(time.perf_counter() - t0)
    prefill = statistics.median(times)
    cache = out.cache
    jax.block_until_ready(step(model, tokens[:, T:T + 1], rows[:, T:T + 1], cache).logits)  # compile
    times = []
    for j in range(steps):
        t0 = time.perf_counter()
        out = step(model, tokens[:, T + j:T + j + 1], rows[:, T + j:T + j + 1], cache)
        jax.block_until_ready(out.logits)
        cache = out.cache
        times.append(time.perf_counter() - t0)
    decode = statistics.median(times)
    return dict(prefill_tok_s=B * T / prefill, prefill_ms=prefill * 1e3, decode_tok_s=B / decode, decode_ms=decode * 1e3)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed")
    args = ap.parse_args(argv)
    v41, flash = V41Config.preset("v41-flash"), V4Config.preset("v4-flash")
    ctx = 1 << 20
    print("| model | KV bytes / token, this code's bf16 cache | at 1M tokens | release storage | at 1M tokens |")
    print("|---|---|---|---|---|")
    for name, layout, release in (
            ("v41-flash", v41_kv_bytes_per_token(v41, "layout"), v41_kv_bytes_per_token(v41, "release")),
            ("v4-flash", cache_size(flash, "layout", "bfloat16").per_token, cache_size(flash, "release").per_token)):
        print(f"| {name} | {layout:,.0f} B | {layout * ctx / 2**30:.2f} GiB | {release:,.0f} B | "
              f"{release * ctx / 2**30:.2f} GiB |")
    print(f"\n`init_v41_cache` allocates {layout_check(v41):,.0f} B per token of context (bf16, v41-flash)")
    p = param_counts(v41)
    print(f"\nv41-flash parameters: {p['total'] / 1e9:.1f}e9 (routed experts {p['experts'] / 1e9:.1f}e9, Engram tables "
          f"{p['engram'] / 1e9:.1f}e9, DSpark {p['dspark'] / 1e9:.1f}e9, vision {p['vision'] / 1e9:.2f}e9, the rest "
          f"{p['rest'] / 1e9:.1f}e9); active per text token {p['active'] / 1e9:.1f}e9")
    t = cpu_throughput(args.steps)
    print(f"\nv41-tiny on CPU ({jax.devices()[0].device_kind}, fp32, batch 2): prefill of 64 tokens "
          f"{t['prefill_ms']:.1f} ms ({t['prefill_tok_s']:,.0f} tokens/s); decode step {t['decode_ms']:.2f} ms "
          f"({t['decode_tok_s']:,.0f} tokens/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
