"""Compiled cost and memory of the sparse attention core: Pallas kernels vs the pure-JAX reference vs
plain dense attention, for one TPU chip described by libtpu (AOT, no TPU needed).

For each attention kind (SWA, CSA, HCA) and sequence length S, three implementations of the same
call `attn(q [1,S,H,c], kv [1,S,c], sinks, window, compressed, topk_idx, ratio)` are compiled for one
chip of the topology (bf16, V4-Flash sizes: H=64, c=512, window 128, CSA k=512 with ratio 4, HCA
ratio 128):
  pallas     pallas_kernels.sparse_attention.sparse_attention
  reference  v4jax.model.attention.sparse_attention (chunked gather, chunk 512)
  dense      plain causal attention over all S keys with the sinks: an [H, S, S] score matrix
             (written here for comparison only; it is what the sparse kinds avoid)
Reported from the compiled executable: FLOPs and bytes accessed per token (`cost_analysis()`; the
Pallas kernels report what they execute through their CostEstimate, masked block entries included),
and temp memory (`memory_analysis().temp_size_in_bytes`: everything the program allocates beyond its
arguments and outputs). `--backward` compiles the vjp w.r.t. every input instead, with the output
cotangent as an argument (as in training, where the layers above produce it).

Caveat: XLA's cost analysis counts a while loop's body once, and the reference runs its query chunks
in a `lax.map` loop; its FLOPs/bytes are therefore scaled by the number of chunks here (marked "x n").

Usage (from the repo root):
    JAX_PLATFORMS=cpu python -m benchmarks.sparse_attention [--quick] [--backward] [--topology v5p:2x2x1]
"""

from __future__ import annotations

import argparse
import os
import re
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import jax.numpy as jnp

from pallas_kernels.sparse_attention import sparse_attention, sparse_attention_reference

HEADS, HEAD_DIM, WINDOW, TOPK = 64, 512, 128, 512
RATIO = {"swa": 0, "csa": 4, "hca": 128}
REF_CHUNK = 512


def dense_attention(q, kv, sinks, window, compressed=None, topk_idx=None, ratio=0):
    """Plain causal softmax attention over all S keys (+ sinks), materialising [B, H, S, S]."""
    del window, compressed, topk_idx, ratio
    S, c = q.shape[1], q.shape[-1]
    logits = jnp.einsum("bqhc,bkc->bhqk", q, kv, preferred_element_type=jnp.float32) * c ** -0.5
    logits = jnp.where(jnp.tril(jnp.ones((S, S), bool)), logits, -jnp.inf)
    sink = jnp.broadcast_to(sinks.astype(jnp.float32)[None, :, None, None], (*logits.shape[:3], 1))
    probs = jax.nn.softmax(jnp.concatenate([logits, sink], axis=-1), axis=-1)[..., :-1]
    return jnp.einsum("bhqk,bkc->bqhc", probs, kv.astype(jnp.float32)).astype(q.dtype)


IMPLS = {
    "pallas": sparse_attention,
    "reference": lambda *a: sparse_attention_reference(*a, REF_CHUNK),
    "dense": dense_attention,
}


def compile_stats(topology_devices, impl: str, kind: str, S: int, backward: bool) -> dict:
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    sharding = NamedSharding(Mesh(topology_devices[:1], ("x",)), PartitionSpec())
    spec = lambda shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
    ratio = RATIO[kind]
    args = (spec((1, S, HEADS, HEAD_DIM)), spec((1, S, HEAD_DIM)), spec((HEADS,), jnp.float32),
            spec((1, S // ratio, HEAD_DIM)) if ratio else None,
            spec((1, S, TOPK), jnp.int32) if kind == "csa" else None)
    fn = IMPLS[impl]

    def forward(q, kv, sinks, compressed, topk_idx):
        return fn(q, kv, sinks, WINDOW, compressed, topk_idx, ratio)

    def gradients(q, kv, sinks, compressed, topk_idx, d_out):  # d_out: the cotangent from the layers above
        _, vjp = jax.vjp(lambda q, kv, sinks, compressed: forward(q, kv, sinks, compressed, topk_idx),
                         q, kv, sinks, compressed)
        return vjp(d_out)

    t0 = time.perf_counter()
    try:
        compiled = (jax.jit(gradients).lower(*args, spec((1, S, HEADS, HEAD_DIM))) if backward
                    else jax.jit(forward).lower(*args)).compile()
    except Exception as e:  # noqa: BLE001 - XLA refuses programs that do not fit the chip's HBM
        need = re.search(r"HLO temporaries \(([0-9.]+[KMGT])\)", str(e))
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return dict(oom=f"OOM ({need.group(1) if need else '?'})", compile_s=time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    loops = -(-S // REF_CHUNK) if impl == "reference" and S > REF_CHUNK else 1  # lax.map body counted once
    return dict(flops=cost.get("flops", 0.0) * loops, bytes=cost.get("bytes accessed", 0.0) * loops,
                temp=compiled.memory_analysis().temp_size_in_bytes, compile_s=seconds, loops=loops)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="S = 4K, 8K; reference and dense at 4K only")
    parser.add_argument("--backward", action="store_true", help="compile gradients instead of the forward")
    parser.add_argument("--topology", default="v5p:2x2x1")
    parser.add_argument("--kinds", default="swa,csa,hca")
    parser.add_argument("--lengths", default=None, help="comma-separated S (default 4K..128K)")
    args = parser.parse_args(argv)
    from jax.experimental import topologies

    from benchmarks.dryrun import NO_LIBTPU, libtpu_available

    if not libtpu_available():
        raise SystemExit(f"benchmarks.sparse_attention {NO_LIBTPU}")
    devices = topologies.get_topology_desc(platform="tpu", topology_name=args.topology).devices
    lengths = ([int(s) for s in args.lengths.split(",")] if args.lengths else
               [4096, 8192] if args.quick else [4096, 8192, 16384, 32768, 65536, 131072])
    dense_max = 4096 if args.quick else 16384  # beyond 16K the [H, S, S] scores are far past any HBM
    reference_max = 4096 if args.quick else max(lengths)
    what = "forward + backward" if args.backward else "forward"
    print(f"# sparse attention, {what}, one {args.topology} chip, bf16, H={HEADS} c={HEAD_DIM} window={WINDOW} "
          f"k={TOPK}")
    print("# per token: GFLOP and MB accessed (compiled cost analysis); temp = compiled temp memory (MiB);")
    print("# ratios: reference / pallas and dense / pallas of the same quantity (dense: causal over all S keys)")
    header = ("kind", "S", "pallas GF/tok", "pallas MB/tok", "pallas temp", "ref GF/tok", "ref temp",
              "dense GF/tok", "dense temp", "ref/pal flops", "ref/pal temp", "dense/pal flops", "dense/pal temp")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    compile_times = []
    for kind in args.kinds.split(","):
        for S in lengths:
            limits = {"pallas": S, "reference": reference_max, "dense": dense_max}
            stats = {impl: compile_stats(devices, impl, kind, S, args.backward) for impl in IMPLS if S <= limits[impl]}
            pal, ref, den = stats["pallas"], stats.get("reference"), stats.get("dense")
            gf = lambda s: "-" if not s or "oom" in s else f"{s['flops'] / S / 1e9:.3f}"
            mib = lambda s: "-" if not s else s.get("oom") or f"{s['temp'] / 2**20:.1f}"
            ratio = lambda a, b, key: ("-" if not a or "oom" in a or "oom" in b
                                       else f"{a[key] / max(b[key], 1):.2f}")
            row = (kind, S, gf(pal), f"{pal['bytes'] / S / 1e6:.3f}", mib(pal), gf(ref) + " (x n)" * bool(ref),
                   mib(ref),
                   gf(den), mib(den), ratio(ref, pal, "flops"), ratio(ref, pal, "temp"),
                   ratio(den, pal, "flops"), ratio(den, pal, "temp"))
            print("| " + " | ".join(str(x) for x in row) + " |", flush=True)
            compile_times.append(f"{kind}/{S}: " + ", ".join(f"{impl} {st['compile_s']:.0f}s"
                                                             for impl, st in stats.items()))
    print("# compile times: " + "; ".join(compile_times))


if __name__ == "__main__":
    main()
