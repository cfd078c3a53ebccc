"""Compiled cost of the Pallas lightning indexer vs the pure-JAX reference, for a TPU target, on CPU.

Both functions are compiled ahead of time for a TPU topology described by libtpu (no TPU needed):
the kernel through the real Mosaic compiler, the reference (`v4jax.model.indexer.select_topk`, query
chunks of 512 under lax.map) through XLA:TPU. Reported per sequence length T (N = T / 4 entries,
n_I = 64 heads, c_I = 128, bf16 q and keys, fp32 weights, positions 0..T-1):

  flops    score math. Reference: XLA's cost_analysis counts a while-loop body once, so its number
           is multiplied by the number of query chunks (checked against 2 T N n_I c_I). Kernel: the
           pallas_call's declared cost (pallas_kernels.lightning_indexer.cost_estimate, counted from the
           grid, causal key-block skipping included) plus the wrapper's XLA ops.
  bytes    HBM bytes accessed, same conventions (the reference's per-chunk bytes x chunks).
  temp     memory_analysis().temp_size_in_bytes of the compiled program: the peak scratch HBM.
  sort     the kernel's sorting-network vector ops (no counterpart in XLA's count of lax.top_k).

No wall-clock time: that needs a TPU. Usage:
    JAX_PLATFORMS=cpu python -m benchmarks.lightning_indexer [--quick] [--topology v5p:2x2x1] [--k 512]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pallas_kernels.lightning_indexer import cost_estimate, select_topk, select_topk_reference  # noqa: E402

H, C, RATIO, CHUNK = 64, 128, 4, 512


def compile_one(fn, topology, T: int, dtype=jnp.bfloat16):
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    sharding = NamedSharding(Mesh(topo.devices[:1], ("x",)), PartitionSpec())
    args = (jax.ShapeDtypeStruct((1, T, H, C), dtype, sharding=sharding),
            jax.ShapeDtypeStruct((1, T, H), jnp.float32, sharding=sharding),
            jax.ShapeDtypeStruct((1, T // RATIO, C), dtype, sharding=sharding),
            jax.ShapeDtypeStruct((T,), jnp.int32, sharding=sharding))
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return dict(flops=float(cost.get("flops", 0.0)), bytes=float(cost.get("bytes accessed", 0.0)),
                temp=compiled.memory_analysis().temp_size_in_bytes, seconds=seconds)


def measure(topology: str, T: int, k: int) -> dict:
    kern = compile_one(lambda q, w, keys, pos: select_topk(q, w, keys, pos, RATIO, k), topology, T)
    ref = compile_one(lambda q, w, keys, pos: select_topk_reference(q, w, keys, pos, RATIO, k, CHUNK),
                      topology, T)
    chunks = -(-T // CHUNK)
    ref["flops"] *= chunks
    ref["bytes"] *= chunks
    dense = 2 * T * (T // RATIO) * H * C
    if not 0.9 < ref["flops"] / dense < 1.2:
        raise RuntimeError(f"reference flops {ref['flops']:.3g} do not match 2 T N n_I c_I = {dense:.3g}")
    est = cost_estimate(1, T, T // RATIO, H, C, RATIO, k)
    return dict(T=T, kern=kern, ref=ref, sort=est["sort_ops"], steps=est["steps"])


def fmt(x: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.2f}{suffix}{unit}"
    return f"{x:.0f}{unit}"


def table(rows, topology: str, k: int) -> str:
    head = (f"Lightning indexer, compiled for {topology} (AOT on CPU): n_I={H}, c_I={C}, k={k}, ratio={RATIO}, "
            f"bf16 q/keys, B=1\n\n"
            "| T | N | flops kernel | flops ref | ratio | bytes kernel | bytes ref | ratio "
            "| temp kernel | temp ref | ratio | sort ops kernel | sort / flops |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        kern, ref = r["kern"], r["ref"]
        lines.append(
            f"| {r['T']} | {r['T'] // RATIO} | {fmt(kern['flops'])} | {fmt(ref['flops'])} | "
            f"{kern['flops'] / ref['flops']:.2f} | {fmt(kern['bytes'], 'B')} | {fmt(ref['bytes'], 'B')} | "
            f"{kern['bytes'] / ref['bytes']:.2f} | {fmt(kern['temp'], 'B')} | {fmt(ref['temp'], 'B')} | "
            f"{kern['temp'] / max(ref['temp'], 1):.2f} | {fmt(r['sort'])} | {r['sort'] / kern['flops']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="T = 4K and 16K only")
    parser.add_argument("--topology", default="v5p:2x2x1")
    parser.add_argument("--k", type=int, default=512, help="index_topk (512 flash, 1024 pro)")
    args = parser.parse_args(argv)
    from benchmarks.dryrun import NO_LIBTPU, libtpu_available

    if not libtpu_available():
        raise SystemExit(f"benchmarks.lightning_indexer {NO_LIBTPU}")
    lengths = [4096, 16384] if args.quick else [4096, 8192, 16384, 32768, 65536, 131072]
    rows = []
    for T in lengths:
        rows.append(measure(args.topology, T, args.k))
        r = rows[-1]
        print(f"T={T}: compiled kernel in {r['kern']['seconds']:.1f}s, reference in {r['ref']['seconds']:.1f}s",
              flush=True)
    print()
    print(table(rows, args.topology, args.k))


if __name__ == "__main__":
    main()
