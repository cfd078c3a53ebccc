"""Whether the expert-parallel exchange's all-to-alls overlap the experts' grouped matmuls: one v4-flash
routed-expert layer, forward and backward, compiled for a TPU topology (no TPU needed) four ways: one or
two passes per loop iteration (`sharding.expert_parallel.PIPELINED_PASSES`), without and with the mesh's
compiler options (`sharding.mesh.compiler_options`: XLA:TPU's asynchronous ragged all-to-all). Counts
the ragged all-to-alls of the compiled program, how many are asynchronous, and how many have a matmul or
Pallas kernel scheduled between their start and their done (`benchmarks.hlo_costs.async_overlaps`).

Usage:  python -m benchmarks.exchange_overlap [--topology v5p:2x2x1] [--mesh expert=4] [--tokens 4096]
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.exchange_overlap", description=__doc__.split("\n\n")[0])
    p.add_argument("--topology", default="v5p:2x2x1")
    p.add_argument("--mesh", default="expert=4")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per device (one all-to-all round)")
    p.add_argument("--capacity-factor", type=float, default=1.1)
    a = p.parse_args(argv)

    import jax

    from benchmarks.dryrun import tpu_devices
    from benchmarks.hlo_costs import async_overlaps
    from benchmarks.moe_capacity import expert_layer_grad
    from sharding import expert_parallel
    from sharding.context import use_mesh_rules
    from sharding.mesh import compiler_options, make_mesh
    from sharding.rules import get_rules
    from v4jax.config import RunOptions, V4Config

    cfg = V4Config.preset("v4-flash")
    rules = get_rules("fsdp_ep")
    mesh = make_mesh(a.mesh, devices=tpu_devices(a.topology, 1))
    options = RunOptions(dtype="bfloat16", param_dtype="float32", moe_impl="pallas", moe_gather_tokens=0,
                         moe_dispatch_chunk=a.tokens, moe_capacity_factor=a.capacity_factor)

    print(f"v4-flash routed experts, forward + backward, {a.topology}, mesh {a.mesh}, {a.tokens} tokens per device, "
          f"Pallas gmm, capacity factor {a.capacity_factor}\n")
    print("| passes per iteration | compiler options | ragged all-to-alls | asynchronous | overlapping a matmul or kernel |\n"
          "|---|---|---|---|---|")
    default = expert_parallel.PIPELINED_PASSES
    try:
        for pipelined in sorted({1, default}):
            expert_parallel.PIPELINED_PASSES = pipelined
            for opts in ({}, compiler_options(mesh)):
                grad, args = expert_layer_grad(cfg, mesh, rules, options, a.tokens)  # a fresh function: traced anew
                with use_mesh_rules(mesh, rules):
                    hlo = jax.jit(grad, compiler_options=opts).lower(*args).compile().as_text()
                found = async_overlaps(hlo)
                print(f"| {pipelined} | {', '.join(f'{k}={v}' for k, v in opts.items()) or 'none'} | {len(found)} | "
                      f"{sum(o.compute is not None for o in found)} | {sum(bool(o.compute) for o in found)} |", flush=True)
    finally:
        expert_parallel.PIPELINED_PASSES = default
    return 0


if __name__ == "__main__":
    sys.exit(main())
