"""Exact vs release numerics (docs/numerics.md) on the same released weights, CPU.

For each preset: a random-weight model written in the release layout (`official.write_release`: FP8
128x128 and MXFP4 weights with UE8M0 scales), loaded three ways: exact fp32, exact bf16 and release
(bf16 with DeepSeek's run-time roundings and the FP8/FP4 cache). Over a batch of prompts:
  * logits: relative L2 difference ||a - b|| / ||b|| and top-1 agreement of each pair;
  * decode: greedy cached decode tokens/s per mode (jitted step, compile excluded, best of 3 rounds)
    and the bytes the cache allocates per token, in one process, so the modes are measured side by side.
Random weights: the differences measure the roundings, not the quality of a trained model.

Usage:  JAX_PLATFORMS=cpu python -m benchmarks.numerics [--quick] [--presets tiny,tiny-b] [--steps 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np


def _release_checkpoint(preset: str, directory: str) -> None:
    from flax import nnx

    from v4jax.config import V4Config
    from v4jax.io import official
    from v4jax.io.checkpoint import canonical_name, hf_tensors
    from v4jax.model.transformer import Transformer

    cfg = V4Config.preset(preset)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tensors = ((canonical_name(k), np.asarray(v)) for k, v in hf_tensors(model).items())
    official.write_release(directory, tensors, config=cfg.to_hf_dict("bfloat16"))


def _decode_speed(model, ids: np.ndarray, steps: int, rounds: int = 3) -> tuple[float, float]:
    """(tokens/s of `steps` greedy decode steps after a prefill of ids, best of `rounds`; cache bytes per
    token)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from v4jax.inference.generate import decode_step, prefill
    from v4jax.model.cache import cache_nbytes, init_cache

    B, S = ids.shape
    graphdef, state = nnx.split(model)
    first = jax.jit(lambda st, c, t: prefill(nnx.merge(graphdef, st), t, None, c))
    step = jax.jit(lambda st, c, t: decode_step(nnx.merge(graphdef, st), c, t))
    opts = model.options

    def fresh():
        return init_cache(model.cfg, B, S + steps + 1, opts.dtype, mtp=False, numerics=opts.numerics)

    per_token = cache_nbytes(fresh()) / (B * (S + steps + 1))
    logits, cache = first(state, fresh(), jnp.asarray(ids))
    nxt = jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32)
    logits, cache = step(state, cache, nxt)  # compile
    jax.block_until_ready(logits)
    best = float("inf")
    for _ in range(rounds):  # each round decodes `steps` tokens from the same prefilled cache
        c, out = jax.tree.map(jnp.copy, cache), logits
        t0 = time.perf_counter()
        for _ in range(steps):
            out, c = step(state, c, jnp.argmax(out, axis=-1).astype(jnp.int32))
        jax.block_until_ready(out)
        best = min(best, time.perf_counter() - t0)
    return B * steps / best, per_token


def run(preset: str, batch: int, prompt: int, steps: int) -> list[str]:
    import jax.numpy as jnp

    from v4jax.io.restore import load_model

    modes = {"exact fp32": dict(dtype="float32", numerics="exact"),
             "exact bf16": dict(dtype="bfloat16", numerics="exact"),
             "release": dict(dtype="bfloat16", numerics="release")}
    with tempfile.TemporaryDirectory() as d:
        _release_checkpoint(preset, d + "/ckpt")
        models = {m: load_model(d + "/ckpt", param_dtype=o["dtype"], mtp=False, **o).model for m, o in modes.items()}
    cfg = models["release"].cfg
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt)).astype(np.int32)
    logits = {m: np.asarray(model(jnp.asarray(ids)).logits, np.float64) for m, model in models.items()}
    rows = []
    for a, b in (("exact bf16", "exact fp32"), ("release", "exact fp32"), ("release", "exact bf16")):
        rel = np.linalg.norm(logits[a] - logits[b]) / np.linalg.norm(logits[b])
        top1 = np.mean(logits[a].argmax(-1) == logits[b].argmax(-1))
        rows.append(f"| {preset} | {a} vs {b} | {rel:.2e} | {100 * top1:.1f}% |")
    speed = {m: _decode_speed(model, ids, steps) for m, model in models.items()}
    table = ["| preset | pair | relative logit difference | top-1 agreement |", "|---|---|---|---|", *rows, "",
             "| preset | mode | decode tokens/s | vs exact bf16 | cache bytes/token |", "|---|---|---|---|---|"]
    base = speed["exact bf16"][0]
    for m, (tps, per_token) in speed.items():
        table.append(f"| {preset} | {m} | {tps:.1f} | {tps / base:.2f}x | {per_token:,.0f} |")
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.numerics", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny only, 8 decode steps")
    p.add_argument("--presets", default="tiny,tiny-b")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=48)
    p.add_argument("--steps", type=int, default=64)
    args = p.parse_args(argv)
    presets = ["tiny"] if args.quick else args.presets.split(",")
    steps = 8 if args.quick else args.steps
    for preset in presets:
        for line in run(preset, args.batch, args.prompt, steps):
            print(line)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
