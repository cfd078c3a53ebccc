"""The routed experts of one v4-flash MoE layer at decode sizes, compiled for 64 v5p chips
(`expert=64`, fsdp_ep), both expert-parallel dispatches side by side (issue 18 part 2).

For batch 1 / 16 / 64 / 128 (one new token per sequence) the layer is AOT-compiled with the
all-to-all dispatch (`moe_gather_tokens=0`) and with the gather dispatch (the default at these
sizes); XLA's cost analysis of each is expressed as the rows of one expert FFN it pays for per device
(FLOPs / (2 x 3 x d x I)), next to the real mean load (batch x k / 64). Then how XLA's cost analysis
counts a bf16 matmul of few rows (decode's per-device shape). Needs libtpu (the `tpu` extra).

Usage:  python -m benchmarks.decode_moe [--impl ragged_dot|pallas]
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode_moe", description=__doc__.split("\n\n")[0])
    p.add_argument("--impl", default="ragged_dot", choices=["ragged_dot", "pallas"])
    p.add_argument("--topology", default="v5p:4x4x4")
    a = p.parse_args(argv)
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding

    from benchmarks.dryrun import tpu_devices
    from sharding.context import use_mesh_rules
    from sharding.mesh import make_mesh
    from sharding.partition import state_shardings
    from sharding.rules import get_rules
    from v4jax.config import RunOptions, V4Config
    from v4jax.model.moe import Experts, Routing

    cfg = V4Config.preset("v4-flash")
    devices = tpu_devices(a.topology, 1)
    mesh, rules = make_mesh(f"expert={min(64, len(devices))}", devices=devices), get_rules("fsdp_ep")
    ep = mesh.shape["expert"]
    d, I, k = cfg.dim, cfg.moe_inter_dim, cfg.n_activated_experts
    print("| batch | real rows / device (mean) | all-to-all: counted rows | gather: counted rows | "
          "all-to-all: bytes | gather: bytes |\n|---|---|---|---|---|---|")
    for batch in (1, 16, 64, 128):
        counted = {}
        for gather_tokens in (0, 1024):
            options = RunOptions(dtype="bfloat16", param_dtype="bfloat16", moe_gather_tokens=gather_tokens,
                                 moe_impl=a.impl)
            graphdef, params = nnx.split(nnx.eval_shape(lambda: Experts(cfg, rngs=nnx.Rngs(0), options=options)),
                                         nnx.Param)
            params = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), params,
                                  state_shardings(params, mesh, rules))
            x = jax.ShapeDtypeStruct((batch, 1, d), jnp.bfloat16, sharding=NamedSharding(
                mesh, rules.spec(("batch", None, None), (batch, 1, d), mesh)))
            ids, w = jax.ShapeDtypeStruct((batch, k), jnp.int32), jax.ShapeDtypeStruct((batch, k), jnp.float32)

            def layer(params, x, w, ids):
                return nnx.merge(graphdef, params)(x, Routing(w, ids, None))

            with use_mesh_rules(mesh, rules):
                cost = jax.jit(layer).lower(params, x, w, ids).compile().cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            counted[gather_tokens] = (cost["flops"] / (2 * 3 * d * I), cost["bytes accessed"])
        (r0, b0), (r1, b1) = counted[0], counted[1024]
        print(f"| {batch} | {batch * k / ep:.2f} | {r0:.1f} | {r1:.1f} | {b0 / 2**20:.0f} MiB | {b1 / 2**20:.0f} MiB |",
              flush=True)
    # How XLA:TPU counts the matmuls of a decode step: M rows x [4096, 129280] (the logits) in bf16
    print("\n| rows M of a bf16 [M, 4096] x [4096, 129280] matmul | counted FLOPs / (2 M K N) |\n|---|---|")
    dev = jax.sharding.SingleDeviceSharding(devices[0])
    for m in (1, 2, 16, 64):
        lhs = jax.ShapeDtypeStruct((m, 4096), jnp.bfloat16, sharding=dev)
        rhs = jax.ShapeDtypeStruct((4096, 129280), jnp.bfloat16, sharding=dev)
        cost = jax.jit(jnp.dot).lower(lhs, rhs).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        print(f"| {m} | {cost['flops'] / (2 * m * 4096 * 129280):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
