"""Routed-expert implementations compared: pallas grouped matmuls vs ragged_dot vs one-hot (architecture.md §5.3).

Part 1 (TPU, compiled on this host for a libtpu topology, no TPU needed): for the V4-Flash and V4-Pro
expert shapes, the FLOPs, bytes accessed and per-device memory that the compiled programs report
(`cost_analysis()`, `memory_analysis()`), forward and forward+backward, bf16. One device holds
E_local = E / ep experts and the rows an all-to-all would send it (tokens * k / ep): ep = 1 for Flash,
ep = 4 for Pro (Pro's 384 experts' weights plus their gradients do not fit one chip). Ratios are to
ragged_dot; "useful" is 2 * M * d * I * 3 per pass (x3 with the backward). "roofline ms" is
max(FLOPs / peak, bytes / HBM bandwidth) with the chip's public peak figures: a model of the
reported costs, not a timing (no TPU was available).

Reading the FLOPs: XLA cannot see inside a Mosaic kernel, so the pallas figures are the kernels' own
`pl.CostEstimate` (the MXU work they issue: every visit multiplies a full row tile, so
(M + E * tm) rows), not a measurement. The one-hot figures are real dense work (E times the useful).

Part 2 (CPU wall clock, jitted, fp32, small dims): ragged_dot vs one-hot, median of repeats. The
pallas kernels run on CPU only in Pallas' interpreter, whose speed says nothing about the TPU
kernel, so they are not timed here.

Usage (from the repo root):
    JAX_PLATFORMS=cpu python -m benchmarks.moe_dispatch [--quick] [--topology v5p:2x2x1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile only; another process may hold libtpu

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.moe_dispatch import default_tiling  # noqa: E402
from pallas_kernels.moe_dispatch import grouped_swiglu as grouped_swiglu_pallas  # noqa: E402
from pallas_kernels.moe_dispatch_reference import grouped_swiglu as grouped_swiglu_ragged_dot  # noqa: E402
from pallas_kernels.moe_dispatch_reference import grouped_swiglu_onehot  # noqa: E402

LIMIT = 10.0
IMPLS = {"pallas": grouped_swiglu_pallas, "ragged_dot": grouped_swiglu_ragged_dot, "one-hot": grouped_swiglu_onehot}
# name: (d, I, E, k, ep)   (architecture.md §1.1)
MODELS = {"v4-flash": (4096, 2048, 256, 6, 1), "v4-pro": (7168, 3072, 384, 6, 4)}
GiB = 2**30
# Public peak figures (bf16 dense TFLOP/s, HBM TB/s) for the roofline column: a model, not a timing.
PEAK = {"TPU v5": (459e12, 2.765e12), "TPU v6 lite": (918e12, 1.64e12), "TPU v5 lite": (197e12, 0.819e12),
        "TPU v4": (275e12, 1.2e12)}


def program(impl: str, backward: bool):
    fn = IMPLS[impl]
    fwd = lambda xs, s, w1, w3, w2, rw: fn(xs, s, w1, w3, w2, rw, LIMIT)  # noqa: E731
    if not backward:
        return fwd
    return jax.grad(lambda *a: jnp.sum(fwd(*a)), argnums=(0, 2, 3, 4, 5))


def compile_stats(topology, impl: str, backward: bool, m: int, d: int, i: int, e: int) -> dict:
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(topology.devices[:1], ("x",)),
                                          jax.sharding.PartitionSpec())
    s = lambda shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)  # noqa: E731
    args = (s((m, d)), s((e,), jnp.int32), s((e, d, i)), s((e, d, i)), s((e, i, d)), s((m,), jnp.float32))
    try:
        compiled = jax.jit(program(impl, backward)).lower(*args).compile()
    except Exception as err:  # noqa: BLE001 - an out-of-memory compile is a result, reported as such
        msg = str(err).splitlines()[0]
        return {"error": "OOM" if "memory" in msg.lower() or "RESOURCE_EXHAUSTED" in msg else msg[:60]}
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    return {"flops": float(cost.get("flops", 0.0)), "bytes": float(cost.get("bytes accessed", 0.0)),
            "temp": mem.temp_size_in_bytes, "total": total}


def _ratio(x, base) -> str:
    return f"{x / base:.2f}" if base else "n/a"


def tpu_table(topology_name: str, quick: bool) -> list[str]:
    from jax.experimental import topologies
    topology = topologies.get_topology_desc(platform="tpu", topology_name=topology_name)
    kind = topology.devices[0].device_kind
    flops_peak, hbm = PEAK.get(kind, (float("nan"), float("nan")))
    lines = [f"TPU cost/memory on {kind} ({topology_name}, one device), bf16, default pallas tiling\n",
             "| model | E_local | tokens | rows M | pass | tiling (tm,tk,tn) | impl | GFLOP | FLOP / useful | "
             "FLOP / ragged | GB accessed | bytes / ragged | temp GiB | total GiB | mem / ragged | roofline ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    models = {"v4-flash": MODELS["v4-flash"]} if quick else MODELS
    for name, (d, i, e, k, ep) in models.items():
        e_local = e // ep
        for tokens in ((512,) if quick else (512 * ep, 4096 * ep)):
            m = tokens * k // ep
            for backward in ((False,) if quick else (False, True)):
                useful = 2 * m * d * i * 3 * (3 if backward else 1)
                stats = {impl: compile_stats(topology, impl, backward, m, d, i, e_local) for impl in IMPLS}
                base = stats["ragged_dot"]
                tiling = default_tiling(m, d, i, e_local, jnp.bfloat16)
                for impl, st in stats.items():
                    head = (f"| {name} | {e_local} | {tokens} | {m} | {'fwd+bwd' if backward else 'fwd'} | "
                            f"{tiling if impl == 'pallas' else ''} | {impl} |")
                    if "error" in st:
                        lines.append(head + f" {st['error']} |" + " |" * 9)
                        continue
                    ok = "error" not in base
                    lines.append(
                        head + f" {st['flops'] / 1e9:,.0f} | {st['flops'] / useful:.2f} | "
                        f"{_ratio(st['flops'], base['flops']) if ok else 'n/a'} | {st['bytes'] / 1e9:,.1f} | "
                        f"{_ratio(st['bytes'], base['bytes']) if ok else 'n/a'} | {st['temp'] / GiB:.2f} | "
                        f"{st['total'] / GiB:.2f} | {_ratio(st['total'], base['total']) if ok else 'n/a'} | "
                        f"{max(st['flops'] / flops_peak, st['bytes'] / hbm) * 1e3:.1f} |")
                print("\n".join(lines[-3:]), flush=True)
    return lines


def cpu_table(quick: bool, repeats: int) -> list[str]:
    d, i, e, k = 256, 128, 32, 6
    lines = [f"CPU wall clock ({os.cpu_count()} cores), fp32, d={d} I={i} E={e} k={k}, jitted, median of {repeats}\n",
             "| tokens | rows M | pass | ragged_dot ms | one-hot ms | one-hot / ragged_dot |",
             "|---|---|---|---|---|---|"]
    rng = np.random.default_rng(0)
    for tokens in ((128,) if quick else (128, 512)):
        m = tokens * k
        sizes = jnp.asarray(np.bincount(rng.integers(0, e, m), minlength=e), jnp.int32)
        args = (jnp.asarray(rng.normal(size=(m, d)), jnp.float32), sizes,
                *(jnp.asarray(rng.normal(size=s) * 0.05, jnp.float32) for s in ((e, d, i), (e, d, i), (e, i, d))),
                jnp.asarray(rng.uniform(size=m), jnp.float32))
        for backward in (False, True):
            ms = {}
            for impl in ("ragged_dot", "one-hot"):
                f = jax.jit(program(impl, backward))
                jax.block_until_ready(f(*args))
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    jax.block_until_ready(f(*args))
                    times.append(time.perf_counter() - t0)
                ms[impl] = statistics.median(times) * 1e3
            lines.append(f"| {tokens} | {m} | {'fwd+bwd' if backward else 'fwd'} | {ms['ragged_dot']:.2f} | "
                         f"{ms['one-hot']:.2f} | {ms['one-hot'] / ms['ragged_dot']:.1f} |")
            print(lines[-1], flush=True)
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="V4-Flash forward at 512 tokens and a small CPU run")
    parser.add_argument("--topology", default="v5p:2x2x1", help="libtpu topology name to compile for")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    from benchmarks.dryrun import NO_LIBTPU, libtpu_available

    tpu = tpu_table(args.topology, args.quick) if libtpu_available() else [f"TPU cost/memory table skipped: {NO_LIBTPU}."]
    out = tpu + [""] + cpu_table(args.quick, args.repeats)
    print("\n" + "\n".join(out))


if __name__ == "__main__":
    main()
