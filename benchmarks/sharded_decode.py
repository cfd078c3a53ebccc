"""Generation on one device vs over a mesh of CPU devices, same work, one process (issue 18).

A random tiny model (fp32); the same prompts are generated greedily by `Generator(model)` and by
`Generator(model, mesh=..., rules=...)` for each mesh, each run timed after a warm-up run that
compiles it; the tokens are checked equal. Also continuous batching (`Generator.serve`) of the same
prompts. CPU "devices" are XLA host devices sharing this machine's cores, so the mesh rows measure the
cost of the sharded program (collectives, layout changes), not a speed-up.

Usage:  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python -m benchmarks.sharded_decode
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sharded_decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new", type=int, default=32, help="new tokens per prompt")
    p.add_argument("--meshes", default="fsdp=8:fsdp;data=2,tensor=2,expert=2:fsdp_tp_ep;fsdp=4,expert=2:fsdp_ep")
    args = p.parse_args(argv)
    from flax import nnx

    from sharding.mesh import make_mesh
    from sharding.rules import get_rules
    from v4jax import Transformer, V4Config
    from v4jax.config import RunOptions
    from v4jax.inference.generate import Generator

    cfg = V4Config.preset("tiny", n_mtp_layers=0)
    model = Transformer(cfg, rngs=nnx.Rngs(0), options=RunOptions.preset("tiny"))
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(2, cfg.vocab_size, n))) for n in rng.integers(8, 40, args.prompts)]

    def timed(gen):
        gen.generate(prompts, max_new_tokens=args.new)  # compile
        t0 = time.perf_counter()
        out = gen.generate(prompts, max_new_tokens=args.new)
        return out.tokens, time.perf_counter() - t0

    rows = []
    base_tokens, base_s = timed(Generator(model))
    n = sum(map(len, base_tokens))
    rows.append(("1 device", "-", n / base_s, 1.0))
    for item in filter(None, args.meshes.split(";")):
        axes, rules = item.split(":")
        gen = Generator(model, mesh=make_mesh(axes), rules=get_rules(rules))
        tokens, s = timed(gen)
        if tokens != base_tokens:
            print(f"error: {axes} ({rules}) generated other tokens than one device", file=sys.stderr)
            return 1
        rows.append((axes, rules, n / s, base_s / s))
    gen = Generator(model)
    served = lambda: dict(gen.serve(prompts, slots=4, max_new_tokens=args.new, max_len=80))  # noqa: E731
    served()
    t0 = time.perf_counter()
    out = served()
    s = time.perf_counter() - t0
    if [out[i] for i in range(len(prompts))] != base_tokens:
        print("error: continuous batching generated other tokens", file=sys.stderr)
        return 1
    rows.append(("1 device, continuous batching (4 slots)", "-", n / s, base_s / s))
    print(f"{args.prompts} prompts of 8-40 tokens, {args.new} new tokens each, greedy, tiny preset, fp32")
    print("| devices | rules | new tokens/s | vs one device |")
    print("|---|---|---|---|")
    for axes, rules, tps, ratio in rows:
        print(f"| {axes} | {rules} | {tps:.1f} | {ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
