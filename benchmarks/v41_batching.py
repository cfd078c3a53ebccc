"""V4.1 generation of prompts of several lengths, three ways, side by side on this host: one call per
prompt length (what `infer.py` did before the V4.1 cache took right padding), one right-padded batch
(`generate_v41` with the prompts as a list), and continuous batching over slots (`serve_v41`).

`v41-tiny` with random weights (fp32, no DSpark, no vision), `--prompts` prompts of lengths spread over
3..`--longest` tokens, `--new` greedy tokens each (no stop token: every prompt runs to the end), Engram
rows from a token map of the preset's size. Each way runs twice; the second (compiled) run is timed.

Usage: JAX_PLATFORMS=cpu python -m benchmarks.v41_batching [--prompts 8] [--longest 40] [--new 16]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def run(n_prompts: int, longest: int, new: int, slots: int, log=print) -> dict[str, float]:
    from flax import nnx

    from v4jax.config import RunOptions
    from v4jax.config_v41 import V41Config
    from v4jax.inference.generate_v41 import generate_v41, serve_v41
    from v4jax.model.v41 import V41Transformer

    cfg = V41Config.preset("v41-tiny").without_dspark().replace(vision_n_layers=0)
    model = V41Transformer(cfg, rngs=nnx.Rngs(0), options=RunOptions.for_weights("float32"))
    rng = np.random.default_rng(0)
    lengths = np.linspace(3, longest, n_prompts).astype(int)[rng.permutation(n_prompts)]
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in lengths]
    token_map = np.arange(cfg.vocab_size) % cfg.engram_compressed_vocab_size

    def by_length():
        out = {}
        for n in sorted(set(lengths)):
            rows = [i for i, p in enumerate(prompts) if len(p) == n]
            got = generate_v41(model, np.array([prompts[i] for i in rows]), new, token_map)
            out.update({i: got.tokens[j].tolist() for j, i in enumerate(rows)})
        return out

    def padded():
        got = generate_v41(model, prompts, new, token_map)
        return {i: row.tolist() for i, row in enumerate(got.tokens)}

    def served():
        return dict(serve_v41(model, prompts, new, token_map, slots=slots))

    seconds, results = {}, {}
    for name, fn in (("one call per length", by_length), ("one right-padded batch", padded),
                     (f"continuous batching, {slots} slots", served)):
        fn()  # compile
        t0 = time.perf_counter()
        results[name] = fn()
        seconds[name] = time.perf_counter() - t0
        log(f"{name}: {seconds[name]:.2f} s")
    first = next(iter(results.values()))
    if any(r != first for r in results.values()):
        raise AssertionError("the three ways gave different tokens")
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.v41_batching", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--longest", type=int, default=40)
    p.add_argument("--new", type=int, default=16)
    p.add_argument("--slots", type=int, default=8)
    a = p.parse_args(argv)
    seconds = run(a.prompts, a.longest, a.new, a.slots, log=lambda m: print(m, file=sys.stderr))
    base = next(iter(seconds.values()))
    print("| way | seconds (compiled) | new tokens/s | vs one call per length |")
    print("|---|---|---|---|")
    for name, s in seconds.items():
        print(f"| {name} | {s:.2f} | {a.prompts * a.new / s:.1f} | {base / s:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
