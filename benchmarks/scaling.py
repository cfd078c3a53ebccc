"""How attention cost and KV cache grow with context: V4's sparse layers vs dense attention, and the
report's headline ratios against a V3.2-shaped baseline (architecture.md §4.7).

1. Per-token cost of one attention layer of V4-Flash shape (H=64, c=512, d=4096, window 128, CSA k=512 /
   ratio 4, HCA ratio 128, indexer 64 x 128), compiled ahead of time from ShapeDtypeStructs only (nothing
   runs) for one TPU chip described by libtpu (`--topology`, default v5p:2x2x1; `--backend cpu` compiles
   for XLA:CPU instead). The per-token unit is one decode step: one new token at position S-1 against a
   cache holding S-1 tokens, i.e. the work a token costs once the context is S (the report's
   "single-token inference FLOPs"). The V4 layers run `Attention` with its cache (projections,
   compressor and indexer updates, top-k, core attention, output projection) on the `init_cache`
   layout. "dense" is the same layer with its projections and head shape but plain causal attention
   over all S cached keys (written here for comparison; its cache is a [S, c] array). Reported from the
   compiled executable: FLOPs and bytes accessed (`cost_analysis()`; no loops at one token, so nothing
   is under-counted), temp memory, and the cache bytes held for the sequence (arguments).
   Ratios: V4-Flash's whole attention stack (2 SWA + 21 CSA + 20 HCA layers, compiled per-layer numbers
   times the layer counts) over a dense stack of 43 layers.
2. KV cache bytes per token and in total at 128K and 1M for V4-Flash, V4-Pro and the V3.2-shaped
   baseline (`v4jax.inference.cache_size.cache_size`, release storage: FP8 entries with BF16 RoPE dims, FP4 indexer keys),
   against the report's 7% (Flash) and 10% (Pro) of V3.2 at 1M.
3. Per-token FLOPs of the whole model at 1M context vs V3.2, against the report's 10% (Flash) / 27% (Pro).
   Computed analytically, not compiled: 2 x active parameters (from the abstract model, as the dry run
   counts them) + core attention (QK and PV over the keys each query sees) + indexer scores; V3.2: 2 x 37e9
   + 61 layers x (indexer 2 x 64 x 128 x S + MLA over the top 2048 tokens with absorbed projections:
   2 x 128 x (576 + 512) per key). Shown twice: every FLOP counted alike, and with V4's FP4 indexer FLOPs
   counted at half (the report quotes "equivalent FP8 FLOPs" without defining the conversion).

A PNG plot of tables 1 and 2 is written to benchmarks/results/scaling.png (matplotlib, Agg).

Usage:  JAX_PLATFORMS=cpu python -m benchmarks.scaling [--quick] [--backend tpu|cpu] [--no-plot]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile only; another process may hold libtpu

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from v4jax.config import AttentionKind, RunOptions, V4Config  # noqa: E402

CONTEXTS = (4096, 16384, 65536, 262144, 1048576)
QUICK_CONTEXTS = (4096, 32768)
KINDS = {"SWA": AttentionKind.SLIDING, "CSA": AttentionKind.CSA, "HCA": AttentionKind.HCA}
PLOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "scaling.png")
# Report figures (architecture.md §4.7): share of V3.2 at 1M context.
REPORT_FLOPS = {"v4-flash": 0.10, "v4-pro": 0.27}
REPORT_CACHE = {"v4-flash": 0.07, "v4-pro": 0.10}
# V3.2 shape (DeepSeek-V3.2-Exp: V3 backbone + DSA): 61 layers, 37B active, MLA 128 heads with a 512-d
# latent + 64-d RoPE key, indexer 64 heads x 128, top-2048 tokens.
V32 = dict(layers=61, active=37e9, heads=128, latent=512, rope=64, index_heads=64, index_dim=128, topk=2048)


def _flash(S: int) -> V4Config:
    cfg = V4Config.preset("v4-flash")
    return cfg.replace(max_seq_len=max(cfg.max_seq_len, S))


BF16 = RunOptions(dtype="bfloat16", param_dtype="bfloat16")  # how the decode layer runs (the release's weights)


def dense_decode(attn, x, keys, pos):
    """A dense attention layer with V4's projections and head shape, one token: x [B,1,d] at position
    pos [B] against keys [B,S,c] (this token's KV is written at pos). Plain causal softmax over all S keys
    plus the sinks, output de-rotation and the grouped output projection as in the V4 layer."""
    from v4jax.model.layers import rms_normalize
    from v4jax.model.rope import apply_rope, inv_frequencies

    cfg = attn.cfg
    B = x.shape[0]
    inv_freq = inv_frequencies(cfg, attn.kind)
    p = pos[:, None]  # [B, 1]
    cq = attn.q_norm(attn.wq_a(x))
    q = attn.wq_b(cq).reshape(B, 1, cfg.n_heads, cfg.head_dim)
    q = apply_rope(rms_normalize(q, cfg.norm_eps), p[..., None], inv_freq)
    kv = apply_rope(attn.kv_norm(attn.wkv(x)), p, inv_freq)  # [B, 1, c]
    keys = jax.vmap(lambda k, v, t: jax.lax.dynamic_update_slice_in_dim(k, v, t, 0))(keys, kv, pos)
    logits = jnp.einsum("bqhc,bkc->bhqk", q, keys, preferred_element_type=jnp.float32) * cfg.head_dim ** -0.5
    visible = jnp.arange(keys.shape[1])[None, None, None, :] <= pos[:, None, None, None]
    logits = jnp.where(visible, logits, -jnp.inf)
    sink = jnp.broadcast_to(attn.sinks[...][None, :, None, None], (*logits.shape[:3], 1))
    probs = jax.nn.softmax(jnp.concatenate([logits, sink], -1), -1)[..., :-1]
    o = jnp.einsum("bhqk,bkc->bqhc", probs.astype(keys.dtype), keys, preferred_element_type=jnp.float32)
    o = apply_rope(o.astype(x.dtype), p[..., None], inv_freq, inverse=True)
    g = cfg.o_groups
    o = jnp.moveaxis(o.reshape(B, g, -1), 1, 0)
    u = jnp.einsum("gni,gio->gno", o, attn.wo_a[...].astype(o.dtype), preferred_element_type=jnp.float32)
    return attn.wo_b(jnp.moveaxis(u, 0, 1).astype(x.dtype).reshape(B, 1, -1)), keys


def _devices(backend: str, topology: str):
    """(one device to compile for, a description). backend "tpu" falls back to CPU when libtpu cannot
    describe the topology (no libtpu installed)."""
    if backend == "tpu":
        try:
            from jax.experimental import topologies

            dev = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices[0]
            return dev, f"one {dev.device_kind} chip ({topology}, libtpu AOT)"
        except Exception as e:  # noqa: BLE001 - libtpu missing: compile for the host instead
            print(f"# libtpu topology {topology} unavailable ({str(e).splitlines()[0][:80]}); compiling for CPU")
    return jax.devices("cpu")[0], "XLA:CPU (host)"


def layer_cost(variant: str, S: int, device) -> dict:
    """Compiled cost of one decode token at context S for variant SWA | CSA | HCA | dense."""
    from jax.sharding import NamedSharding, PartitionSpec

    from v4jax.model.attention import Attention
    from v4jax.model.cache import _layer_cache

    cfg = _flash(S)
    kind = KINDS.get(variant, AttentionKind.SLIDING)
    sharding = NamedSharding(jax.sharding.Mesh([device], ("x",)), PartitionSpec())
    spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)  # noqa: E731
    attn = nnx.eval_shape(lambda: Attention(cfg, kind, rngs=nnx.Rngs(0), options=BF16))
    graphdef, state = nnx.split(attn)
    state = jax.tree.map(spec, state)
    x = spec(jax.ShapeDtypeStruct((1, 1, cfg.dim), jnp.bfloat16))
    start = spec(jax.ShapeDtypeStruct((1,), jnp.int32))
    if variant == "dense":
        cache = spec(jax.ShapeDtypeStruct((1, S, cfg.head_dim), jnp.bfloat16))

        def step(state, x, cache, start):
            return dense_decode(nnx.merge(graphdef, state), x, cache, start)
    else:
        cache = jax.tree.map(spec, jax.eval_shape(lambda: _layer_cache(cfg, kind, 1, S, jnp.bfloat16, ())))

        def step(state, x, cache, start):
            out, cache, _ = nnx.merge(graphdef, state)(x, start[:, None], cache, jnp.ones((1,), jnp.int32))
            return out, cache

    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=2).lower(state, x, cache, start).compile()
    seconds = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    cache_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))
    return dict(variant=variant, S=S, flops=float(cost.get("flops", 0.0)), bytes=float(cost.get("bytes accessed", 0.0)),
                temp=float(mem.temp_size_in_bytes), cache=float(cache_bytes), compile_s=seconds)


VARIANTS = ("SWA", "CSA", "HCA", "dense")


def layer_table(contexts=CONTEXTS, backend: str = "tpu", topology: str = "v5p:2x2x1", log=print,
                variants=VARIANTS):
    """Rows for table 1 (and the stack ratios): variants x contexts; `variants` may also be a function
    of the context returning the variants to compile there."""
    device, where = _devices(backend, topology)
    rows = []
    for S in contexts:
        for variant in (variants(S) if callable(variants) else variants):
            rows.append(layer_cost(variant, S, device))
            r = rows[-1]
            log(f"[scaling] {variant} S={S}: {r['flops'] / 1e9:.3f} GFLOP, {r['bytes'] / 1e6:.1f} MB accessed, "
                f"temp {r['temp'] / 2**20:.1f} MiB (compiled in {r['compile_s']:.1f} s)")
    return rows, where


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def format_layer_table(rows, where: str) -> str:
    cfg = V4Config.preset("v4-flash")
    counts = {v: sum(1 for k in cfg.layer_types if k is kind) for v, kind in KINDS.items()}
    by = {(r["variant"], r["S"]): r for r in rows}
    out = [f"Per token (one decode step at context S), one layer of V4-Flash shape, bf16, compiled for {where}:",
           "",
           "| S | variant | GFLOP / token | MB accessed / token | temp MiB | cache held (MB) | compile s |",
           "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['S']:,} | {r['variant']} | {r['flops'] / 1e9:.3f} | {r['bytes'] / 1e6:.1f} | "
                   f"{r['temp'] / 2**20:.1f} | {r['cache'] / 1e6:.1f} | {r['compile_s']:.1f} |")
    out += ["", f"Whole attention stack of V4-Flash ({counts['SWA']} SWA + {counts['CSA']} CSA + {counts['HCA']} HCA "
            f"layers) vs {cfg.n_layers} dense layers, per token, from the compiled per-layer numbers above:", "",
            "| S | V4-Flash GFLOP | dense GFLOP | FLOPs V4 / dense | V4 MB accessed | dense MB accessed | "
            "bytes V4 / dense | V4 cache held | dense cache held |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for S in sorted({r["S"] for r in rows}):
        if any((v, S) not in by for v in (*KINDS, "dense")):
            continue
        v4 = {k: sum(counts[v] * by[(v, S)][k] for v in KINDS) for k in ("flops", "bytes", "cache")}
        dn = {k: cfg.n_layers * by[("dense", S)][k] for k in ("flops", "bytes", "cache")}
        out.append(f"| {S:,} | {v4['flops'] / 1e9:,.1f} | {dn['flops'] / 1e9:,.1f} | {100 * v4['flops'] / dn['flops']:.1f}% | "
                   f"{v4['bytes'] / 1e6:,.0f} | {dn['bytes'] / 1e6:,.0f} | {100 * v4['bytes'] / dn['bytes']:.1f}% | "
                   f"{_fmt_bytes(v4['cache'])} | {_fmt_bytes(dn['cache'])} |")
    return "\n".join(out)


def cache_table(contexts=(131072, 1048576)) -> tuple[str, dict]:
    """Table 2: release-format KV cache vs the V3.2 baseline, with the report's ratios."""
    from v4jax.inference.cache_size import cache_size, v32_baseline_size

    base = v32_baseline_size()
    head = (["model", "bytes / token"] + [f"total at {c:,}" for c in contexts]
            + ["fixed (SWA + state)", "share of V3.2 at 1M", "report", "reduction"])
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    shares = {}
    for name in ("v4-flash", "v4-pro"):
        s = cache_size(V4Config.preset(name), "release")
        share = s.total(1048576) / base.total(1048576)
        shares[name] = share
        lines.append("| " + " | ".join([name, f"{s.per_token:,.0f}"] + [_fmt_bytes(s.total(c)) for c in contexts]
                                       + [_fmt_bytes(s.fixed), f"{100 * share:.1f}%",
                                          f"{100 * REPORT_CACHE[name]:.0f}%", f"{1 / share:.1f}x"]) + " |")
    lines.append("| " + " | ".join(["V3.2 baseline (61 MLA layers)", f"{base.per_token:,.0f}"]
                                   + [_fmt_bytes(base.total(c)) for c in contexts] + ["-", "100%", "-", "1.0x"]) + " |")
    return "\n".join(lines), shares


def active_params(name: str) -> int:
    from benchmarks.dryrun import active_params as count
    from v4jax.model.transformer import Transformer

    cfg = V4Config.preset(name)
    abstract = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    return count(cfg, abstract)[1]


def v4_flops_per_token(name: str, S: int, n_active: int, fp4_weight: float = 1.0) -> dict:
    cfg = V4Config.preset(name)
    per_key = 4 * cfg.n_heads * cfg.head_dim  # QK and PV, 2 FLOPs per multiply-add
    attn = index = 0.0
    for kind in cfg.layer_types:
        keys = min(cfg.window_size, S)
        if kind is AttentionKind.CSA:
            keys += min(cfg.index_topk, S // cfg.csa_ratio)
            index += 2 * cfg.index_n_heads * cfg.index_head_dim * (S // cfg.csa_ratio)
        elif kind is AttentionKind.HCA:
            keys += S // cfg.hca_ratio
        attn += per_key * keys
    return dict(params=2.0 * n_active, attention=attn, indexer=fp4_weight * index,
                total=2.0 * n_active + attn + fp4_weight * index)


def v32_flops_per_token(S: int) -> dict:
    v = V32
    per_key = 2 * v["heads"] * (v["latent"] + v["rope"]) + 2 * v["heads"] * v["latent"]
    attn = v["layers"] * per_key * min(v["topk"], S)
    index = v["layers"] * 2 * v["index_heads"] * v["index_dim"] * S
    return dict(params=2.0 * v["active"], attention=attn, indexer=index, total=2.0 * v["active"] + attn + index)


def flops_table(S: int = 1048576, actives: dict | None = None) -> tuple[str, dict]:
    """Table 3: whole-model FLOPs per token at context S vs V3.2 (analytic)."""
    actives = actives or {name: active_params(name) for name in REPORT_FLOPS}
    base = v32_flops_per_token(S)
    lines = ["| model | active params | 2 x active (GFLOP) | core attention (GFLOP) | indexer (GFLOP) | total (GFLOP) | "
             "share of V3.2 | with FP4 indexer at 1/2 | report |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    shares = {}
    for name in REPORT_FLOPS:
        f = v4_flops_per_token(name, S, actives[name])
        half = v4_flops_per_token(name, S, actives[name], fp4_weight=0.5)
        shares[name] = (f["total"] / base["total"], half["total"] / base["total"])
        lines.append(f"| {name} | {actives[name] / 1e9:.1f}B | {f['params'] / 1e9:.1f} | {f['attention'] / 1e9:.1f} | "
                     f"{f['indexer'] / 1e9:.1f} | {f['total'] / 1e9:.1f} | {100 * shares[name][0]:.1f}% | "
                     f"{100 * shares[name][1]:.1f}% | {100 * REPORT_FLOPS[name]:.0f}% |")
    lines.append(f"| V3.2 baseline | {V32['active'] / 1e9:.0f}B | {base['params'] / 1e9:.1f} | "
                 f"{base['attention'] / 1e9:.1f} | {base['indexer'] / 1e9:.1f} | {base['total'] / 1e9:.1f} | 100% | - | - |")
    return "\n".join(lines), shares


def plot(rows, path: str = PLOT) -> str:
    """Three panels: GFLOP / token and MB accessed / token per layer (table 1), KV cache vs context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from v4jax.inference.cache_size import cache_size, v32_baseline_size

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for variant, style in (("SWA", "o-"), ("CSA", "s-"), ("HCA", "^-"), ("dense", "k--")):
        pts = sorted((r["S"], r["flops"], r["bytes"]) for r in rows if r["variant"] == variant)
        if not pts:
            continue
        S = [p[0] for p in pts]
        axes[0].plot(S, [p[1] / 1e9 for p in pts], style, label=variant)
        axes[1].plot(S, [p[2] / 1e6 for p in pts], style, label=variant)
    axes[0].set(title="one V4-Flash attention layer: GFLOP / token", xlabel="context S (tokens)", ylabel="GFLOP")
    axes[1].set(title="MB accessed / token (compiled)", xlabel="context S (tokens)", ylabel="MB")
    contexts = [2**k for k in range(12, 21)]
    for label, size, style in (("V4-Flash", cache_size(V4Config.preset("v4-flash")), "o-"),
                               ("V4-Pro", cache_size(V4Config.preset("v4-pro")), "s-"),
                               ("V3.2 baseline", v32_baseline_size(), "k--")):
        axes[2].plot(contexts, [size.total(c) / 1e9 for c in contexts], style, label=label)
    axes[2].set(title="KV cache per sequence (release format)", xlabel="context (tokens)", ylabel="GB")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(quick: bool = False, backend: str = "tpu", topology: str = "v5p:2x2x1", plot_path: str | None = PLOT,
        log=print) -> dict:
    """All three tables as Markdown (keys layers, cache, flops), the raw rows, and the plot path."""
    rows, where = layer_table(QUICK_CONTEXTS if quick else CONTEXTS, backend, topology, log)
    cache_md, cache_shares = cache_table()
    flops_md, flops_shares = flops_table()
    path = plot(rows, plot_path) if plot_path else None
    return dict(layers=format_layer_table(rows, where), cache=cache_md, flops=flops_md, rows=rows, plot=path,
                cache_shares=cache_shares, flops_shares=flops_shares, where=where)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"contexts {QUICK_CONTEXTS} only")
    p.add_argument("--backend", choices=["tpu", "cpu"], default="tpu")
    p.add_argument("--topology", default="v5p:2x2x1")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    out = run(args.quick, args.backend, args.topology, None if args.no_plot else PLOT)
    print(out["layers"], out["cache"], out["flops"], sep="\n\n")
    if out["plot"]:
        print(f"\nplot: {out['plot']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
