"""What the indexer KL loss (spec §8.6) costs in a training step: XLA's compiled FLOPs and temporary
memory of the whole step train.py runs (`train_loop.make_step`: forward, backward, Muon + AdamW,
bias update; fp32, one CPU device) with indexer_loss_weight = 0 (no traces) and 1 (traces + KL), in
the sparse stage and, for comparison, the dense warm-up stage (model.csa_dense, traces over every
compressed entry). Compile-only: nothing runs, so the numbers do not depend on the machine's load.

Usage (repo root):  JAX_PLATFORMS=cpu python -m benchmarks.indexer_loss_cost [--quick]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax.layers import Buffer
from v4jax.model import Transformer
from v4jax.optim import flat_params
from v4jax.train_loop import hyperparams, load_config, make_setup, make_step


def compiled_cost(batch: int, seq: int, topk: int, weight: float, dense: bool) -> dict:
    tc = load_config(None, ['preset="tiny"', f"seq_len={seq}", f"batch_size={batch}", "steps=1000",
                            "model.vocab_size=264", f"model.max_seq_len={max(seq, 128)}", f"model.index_topk={topk}",
                            f"model.csa_dense={str(dense).lower()}", f"indexer_loss_weight={weight}"])
    cfg = tc.model_config()
    setup = make_setup(tc, cfg)

    def init():
        _, p, b, _ = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, Buffer, ...)
        p = flat_params(p)
        return {"params": p, "buffers": flat_params(b), "opt": setup.tx.init(p), "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.key_data(jax.random.key(0))}

    state = jax.eval_shape(init)
    tokens = jax.ShapeDtypeStruct((batch, 1, seq + 1), jnp.int32)
    t0 = time.time()
    compiled = jax.jit(make_step(tc, setup)).lower(state, tokens, hyperparams(tc, setup.schedule, 100)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    return {"flops": float(cost["flops"]), "temp": int(mem.temp_size_in_bytes), "compile_s": time.time() - t0}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the 8 x 64 shape")
    args = ap.parse_args()
    shapes = [(8, 64, 4, False)] + ([] if args.quick else [(2, 1024, 16, False), (2, 1024, 16, True)])
    print("| stage | batch x seq | top-k / N_c | GFLOP/step off | GFLOP/step with KL | FLOP ratio | "
          "temp MiB off | temp MiB with KL | temp ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for batch, seq, topk, dense in shapes:
        off = compiled_cost(batch, seq, topk, 0.0, dense)
        on = compiled_cost(batch, seq, topk, 1.0, dense)
        print(f"| {'dense warm-up' if dense else 'sparse'} | {batch} x {seq} | {topk} / {seq // 4} | "
              f"{off['flops'] / 1e9:.2f} | {on['flops'] / 1e9:.2f} | {on['flops'] / off['flops']:.3f} | "
              f"{off['temp'] / 2**20:.1f} | {on['temp'] / 2**20:.1f} | {on['temp'] / off['temp']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
