"""Decode-shaped routed experts on the local accelerator: `gathered_swiglu` (each (token, choice) row
multiplies its expert's slice where it takes it) against the same function with the rows' slices first
stacked into one operand (the previous form) and against the grouped matmul over every expert, at
v4-flash's expert sizes; timed side by side in one run (architecture.md §5.5).

Usage: python -m benchmarks.gathered_experts [--tokens 1 4 8] [--experts 256] [--repeats 50]
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp

from pallas_kernels.moe_dispatch_reference import (expert_gemm, gathered_swiglu, grouped_swiglu, permute, swiglu,
                                                   unpermute_combine)


def stacked_swiglu(x, experts, row_weights, w1, w3, w2, limit):
    """The previous form: every row's slices stacked into [N, k, ...] operands, then one einsum each
    (each GEMM's result rounded as `expert_gemm` rounds it, so the forms compute one function)."""
    dt, (N, k) = x.dtype, experts.shape
    take = lambda w: jnp.stack([jnp.stack([jax.lax.dynamic_index_in_dim(w, experts[n, j], keepdims=False)  # noqa: E731
                                           for j in range(k)]) for n in range(N)])
    up = expert_gemm(lambda a, w: jnp.einsum("nd,nkdi->nki", a, w.astype(dt), preferred_element_type=jnp.float32),
                     None)
    down = expert_gemm(lambda a, w: jnp.einsum("nki,nkid->nkd", a, w, preferred_element_type=jnp.float32), None)
    h = swiglu(up(x, take(w1)), up(x, take(w3)), limit) * row_weights[..., None]
    return down(h.astype(dt), take(w2)).sum(1)


def grouped(x, experts, row_weights, w1, w3, w2, limit):
    """The sorted path: rows grouped by expert, one grouped matmul over every expert, combined back."""
    xs, sizes, order = permute(x, experts, w1.shape[0])
    y = grouped_swiglu(xs, sizes, w1, w3, w2, row_weights.reshape(-1)[order], limit=limit)
    return unpermute_combine(y, order, x.shape[0], experts.shape[1])


def _time(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / repeats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gathered_experts", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--inter", type=int, default=2048)
    p.add_argument("--k", type=int, default=6)
    p.add_argument("--repeats", type=int, default=50)
    a = p.parse_args(argv)
    for flag, values in (("--tokens", a.tokens), ("--experts", [a.experts]), ("--dim", [a.dim]),
                         ("--inter", [a.inter]), ("--k", [a.k]), ("--repeats", [a.repeats])):
        if min(values) < 1:
            p.error(f"{flag} must be positive, got {min(values)}")
    dev = jax.devices()[0]
    keys = jax.random.split(jax.random.key(0), 5)
    E, d, inter = a.experts, a.dim, a.inter
    w1 = jax.random.normal(keys[0], (E, d, inter), jnp.bfloat16) * 0.02
    w3 = jax.random.normal(keys[1], (E, d, inter), jnp.bfloat16) * 0.02
    w2 = jax.random.normal(keys[2], (E, inter, d), jnp.bfloat16) * 0.02
    weight_bytes = 3 * d * inter * 2
    print(f"device: {dev.device_kind} ({dev.platform}); E={E}, d={d}, I={inter}, k={a.k}, bf16 weights; "
          f"jax {jax.__version__}")
    print("| tokens | rows | per-row slices (us) | stacked slices (us) | grouped, every expert (us) | "
          "stacked / per-row | per-row: GB/s of the chosen experts' weights | max abs diff vs grouped |")
    print("|---|---|---|---|---|---|---|---|")
    for n in a.tokens:
        x = jax.random.normal(keys[3], (n, d), jnp.bfloat16)
        experts = jax.random.randint(keys[4], (n, a.k), 0, E, jnp.int32)
        rw = jnp.full((n, a.k), 1.0 / a.k, jnp.float32)
        args = (x, experts, rw, w1, w3, w2)
        fns = [jax.jit(lambda *t: gathered_swiglu(*t, 7.0)), jax.jit(lambda *t: stacked_swiglu(*t, 7.0)),
               jax.jit(lambda *t: grouped(*t, 7.0))]
        outs = [f(*args) for f in fns]
        diff = max(float(jnp.max(jnp.abs(o - outs[2]))) for o in outs[:2])
        t = [_time(f, args, a.repeats) for f in fns]
        chosen = len({int(e) for e in experts.reshape(-1)})
        print(f"| {n} | {n * a.k} | {t[0] * 1e6:.1f} | {t[1] * 1e6:.1f} | {t[2] * 1e6:.1f} | {t[1] / t[0]:.2f}x | "
              f"{chosen * weight_bytes / t[0] / 1e9:.0f} | {diff:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
