"""Compiled per-device cost of the attention kernel on a TPU mesh: per device inside shard_map
(`sharding.kernels`, what `attention_impl=pallas` does) vs the whole problem on every device (the
operands gathered, the only way to call the kernel without shard_map: XLA refuses to partition a
Mosaic call whose operands are sharded, "Mosaic kernels cannot be automatically partitioned", which is
what the model did before on a multi-device mesh).

    python -m benchmarks.kernel_sharding [--topology v5p:2x2x1] [--mesh fsdp=2,tensor=2] [--seq 4096]

AOT compile with libtpu on a CPU host (no TPU needed); prints a markdown table. FLOPs and bytes are
the kernels' declared cost estimates as XLA sums them per device; temp is the compiled temporary
memory per device; gathers counts the all-gather ops in the compiled program.
"""

from __future__ import annotations

import argparse
import os
import re

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from pallas_kernels.sparse_attention import sparse_attention, sparse_attention_reference
from sharding.context import use_mesh_rules
from sharding.kernels import SPARSE_ATTENTION, by_platform, pallas_kernel
from sharding.mesh import make_mesh
from sharding.rules import get_rules


def _args(mode: str, B: int, T: int, H: int, c: int, k: int, mesh, rules):
    ratio = {"swa": 0, "csa": 4, "hca": 128}[mode]
    shapes = [(B, T, H, c), (B, T, c), (H,), (B, T // ratio, c) if ratio else None,
              (B, T, k) if mode == "csa" else None]
    dtypes = [jnp.bfloat16, jnp.bfloat16, jnp.float32, jnp.bfloat16, jnp.int32]
    out = []
    for shape, dtype, names in zip(shapes, dtypes, (SPARSE_ATTENTION.args[i] for i in (0, 1, 2, 4, 5))):
        if shape is None:
            out.append(None)
            continue
        spec = rules.spec(names, shape, mesh)
        out.append(jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec)))
    return out, ratio


def compile_one(mode: str, wrapped: bool, mesh, rules, *, B: int, T: int, H: int, c: int, k: int, window: int = 128,
                bare: bool = False):
    args, ratio = _args(mode, B, T, H, c, k, mesh, rules)

    def whole(q, kv, sinks, window, compressed, topk_idx, ratio, chunk):  # operands gathered, all work on every device
        def run(q, kv, sinks, compressed, topk_idx):
            return by_platform(sparse_attention, sparse_attention_reference,
                               (q, kv, sinks, window, compressed, topk_idx, ratio, chunk), "tpu")

        everything = jax.sharding.PartitionSpec()
        return jax.shard_map(run, mesh=mesh, in_specs=everything, out_specs=everything,
                             check_vma=False)(q, kv, sinks, compressed, topk_idx)

    core = pallas_kernel(sparse_attention) if wrapped else whole
    if bare:
        core = lambda *a: by_platform(sparse_attention, sparse_attention_reference, a, "tpu")  # noqa: E731

    def step(q, kv, sinks, compressed, topk_idx):
        f = lambda q, kv, sinks: core(q, kv, sinks, window, compressed, topk_idx, ratio, 512)  # noqa: E731
        out, vjp = jax.vjp(f, q, kv, sinks)
        return vjp(out)

    with use_mesh_rules(mesh, rules):
        compiled = jax.jit(step).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    hlo = compiled.as_text()
    return dict(flops=cost.get("flops", 0.0), bytes=cost.get("bytes accessed", 0.0), temp=mem.temp_size_in_bytes,
                args=mem.argument_size_in_bytes, gathers=len(re.findall(r"= [^ ]+ all-gather(-start)?\(", hlo)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--topology", default="v5p:2x2x1")
    ap.add_argument("--mesh", default="fsdp=2,tensor=2")
    ap.add_argument("--rules", default="fsdp_tp_ep")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--modes", default="swa,csa,hca")
    a = ap.parse_args(argv)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    devices = topologies.get_topology_desc(platform="tpu", topology_name=a.topology).devices
    mesh, rules = make_mesh(a.mesh, devices=devices), get_rules(a.rules)
    try:
        compile_one("swa", False, mesh, rules, B=a.batch, T=a.seq, H=a.heads, c=512, k=512, bare=True)
        print("bare kernel call on sharded operands: compiled")
    except NotImplementedError as e:
        print(f"bare kernel call on sharded operands: refused ({str(e).splitlines()[0]})")
    print(f"{a.topology}, mesh {a.mesh} ({a.rules}), B={a.batch}, T={a.seq}, H={a.heads}, c=512, k=512, bf16, "
          "forward + backward, per device\n")
    print("| kind | call | GFLOP / device | GB accessed / device | temp MiB / device | all-gathers |")
    print("|---|---|---|---|---|---|")
    for mode in a.modes.split(","):
        for wrapped in (False, True):
            r = compile_one(mode, wrapped, mesh, rules, B=a.batch, T=a.seq, H=a.heads, c=512, k=512)
            print(f"| {mode} | {'per device (shard_map)' if wrapped else 'whole on every device'} | {r['flops'] / 1e9:,.1f} "
                  f"| {r['bytes'] / 1e9:,.2f} | {r['temp'] / 2**20:,.1f} | {r['gathers']} |", flush=True)


if __name__ == "__main__":
    main()
