"""The routed experts of one v4-flash MoE layer at training sizes, forward and backward, compiled for
a v5p pod with the expert-parallel all-to-all in one worst-case pass (`moe_capacity_factor=0`) and in
passes of a bounded receive buffer (the default 1.25x the mean load), side by side (issue 19 part 2).

Per configuration: XLA's counted FLOPs per device as rows of one expert FFN paid for (FLOPs over the
forward + backward cost of one row, 3 x 2 x 3 x d x I), next to the real rows (tokens x k per
device); the per-device temporaries; HBM bytes accessed. XLA counts the passes' loop body once: a
routing within the capacity runs exactly that (architecture.md §5.5). Needs libtpu (the `tpu` extra).

Usage:  python -m benchmarks.moe_capacity [--topology v5p:4x4x4] [--tokens 4096] [--chunk 128] [--impl ragged_dot|pallas]
"""

from __future__ import annotations

import argparse
import sys


def expert_layer_grad(cfg, mesh, rules, options, tokens: int):
    """The gradient (parameters, activations) of one routed-expert layer's sum-of-squares loss over
    `mesh`, with abstract arguments sharded by `rules`: one row of `tokens` tokens per device (to
    `lower(*args).compile()` for a TPU topology). -> (fn, args)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding

    from sharding.partition import state_shardings
    from v4jax.model.moe import Experts, Routing

    graphdef, params = nnx.split(nnx.eval_shape(lambda: Experts(cfg, rngs=nnx.Rngs(0), options=options)), nnx.Param)
    params = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), params,
                          state_shardings(params, mesh, rules))
    B, k = mesh.devices.size, cfg.n_activated_experts
    tok = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(  # noqa: E731
        mesh, rules.spec(("batch",) + (None,) * (len(shape) - 1), shape, mesh)))
    x = tok((B, tokens, cfg.dim), jnp.bfloat16)
    ids, w = tok((B * tokens, k), jnp.int32), tok((B * tokens, k), jnp.float32)

    def loss(params, x, w, ids):
        y = nnx.merge(graphdef, params)(x, Routing(w, ids, None))
        return jnp.sum(y * y)

    return jax.grad(loss, argnums=(0, 1)), (params, x, w, ids)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.moe_capacity", description=__doc__.split("\n\n")[0])
    p.add_argument("--topology", default="v5p:4x4x4")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per device")
    p.add_argument("--chunk", type=int, default=128, help="moe_dispatch_chunk (tokens per device per round)")
    p.add_argument("--impl", default="ragged_dot", choices=["ragged_dot", "pallas"])
    p.add_argument("--meshes", default="fsdp=8,expert=8;expert=64")
    a = p.parse_args(argv)
    import jax

    from benchmarks.dryrun import tpu_devices
    from sharding.context import use_mesh_rules
    from sharding.mesh import make_mesh
    from sharding.rules import get_rules
    from v4jax.config import RunOptions, V4Config

    cfg = V4Config.preset("v4-flash")
    devices = tpu_devices(a.topology, 1)
    rules = get_rules("fsdp_ep")
    d, I, k = cfg.dim, cfg.moe_inter_dim, cfg.n_activated_experts
    row_cost = 3 * 2 * 3 * d * I  # forward + backward (input and weight gradients) of one row's SwiGLU
    print(f"v4-flash routed experts, {a.topology}, {a.tokens} tokens per device, rounds of {a.chunk}, {a.impl}\n")
    print("| mesh | receive buffer | real rows / device | counted rows / device | counted / real | temporaries | "
          "HBM bytes accessed |\n|---|---|---|---|---|---|---|")
    for mesh_spec in a.meshes.split(";"):
        mesh = make_mesh(mesh_spec, devices=devices)
        for factor in (0.0, 1.25):
            options = RunOptions(dtype="bfloat16", param_dtype="float32", moe_impl=a.impl, moe_gather_tokens=0,
                                 moe_dispatch_chunk=a.chunk, moe_capacity_factor=factor)
            grad, args = expert_layer_grad(cfg, mesh, rules, options, a.tokens)
            with use_mesh_rules(mesh, rules):
                compiled = jax.jit(grad).lower(*args).compile()
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            mem = compiled.memory_analysis()
            real = a.tokens * k
            rounds = -(-a.tokens // a.chunk)
            counted = cost["flops"] / row_cost * rounds  # XLA counts the rounds' scan body once
            buffer = "worst case (1 pass)" if factor == 0 else f"{factor}x mean load (passes)"
            print(f"| `{mesh_spec}` | {buffer} | {real} | {counted:,.0f} | {counted / real:.2f}x | "
                  f"{mem.temp_size_in_bytes / 2**30:.2f} GiB | {cost['bytes accessed'] / 2**30:.1f} GiB |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
