"""What the indexer KL loss (architecture.md §8.2) costs in a training step: XLA's compiled FLOPs and temporary
memory of the whole step train.py runs (`v4jax.train.step.make_step`: forward, backward, Muon + AdamW,
bias update; fp32, one CPU device) with indexer_loss_weight = 0 (no traces) and 1 (traces + KL), in
the sparse stage and, for comparison, the dense warm-up stage (model.csa_dense, traces over every
compressed entry). Compile-only: nothing runs, so the numbers do not depend on the machine's load.

`--traces-at-scale`: the traces alone at v4-flash sizes (H 64, c 512, window 128, m 4, top-512,
n_I 64, c_I 128, chunk 512, bf16 activations, B = 1) for growing T, compiled ahead of time for one
TPU device (libtpu, `--topology`): XLA's temporary memory of the attention mass, of the selected
scores' forward + backward, and of the reference core attention's forward + backward for scale.
(XLA:CPU is not used here: it upcasts whole bf16 operands to fp32 outside the chunk loop.)

Usage (repo root):  JAX_PLATFORMS=cpu python -m benchmarks.indexer_loss_cost [--quick]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.sparse_attention_reference import entry_attention_mass
from v4jax.model.indexer import entry_scores
from v4jax.model.layers import Buffer
from v4jax.model.transformer import Transformer
from v4jax.train.optim import flat_params
from v4jax.train.config import load_config
from v4jax.train.step import hyperparams, make_setup, make_step


def compiled_cost(batch: int, seq: int, topk: int, weight: float, dense: bool) -> dict:
    tc = load_config(None, ['preset="tiny"', f"seq_len={seq}", f"batch_size={batch}", "steps=1000",
                            "model.vocab_size=264", f"model.max_seq_len={max(seq, 128)}", f"model.index_topk={topk}",
                            f"model.csa_dense={str(dense).lower()}", f"indexer_loss_weight={weight}"])
    cfg = tc.model_config()
    setup = make_setup(tc, cfg)

    def init():
        _, p, b, _ = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0), options=tc.run_options()), nnx.Param, Buffer, ...)
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


def traces_at_scale(T: int, topology: str) -> list[float]:
    """Temporary MiB, compiled for one device of a TPU topology (AOT from this host), of: the attention
    mass, the selected entries' scores forward + backward, and, for scale, the reference core attention
    forward + backward on the same top-k."""
    import numpy as np
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from pallas_kernels.sparse_attention_reference import sparse_attention

    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    one = NamedSharding(Mesh(np.asarray(devices[:1]), ("x",)), PartitionSpec())
    H, c, W, m, k, n_i, c_i, chunk = 64, 512, 128, 4, 512, 64, 128, 512
    N = T // m
    bf16, f32 = jnp.bfloat16, jnp.float32
    shapes = dict(q=((1, T, H, c), bf16), kv=((1, T, c), bf16), sinks=((H,), f32), comp=((1, N, c), bf16),
                  idx=((1, T, k), jnp.int32), q_i=((1, T, n_i, c_i), bf16), w_i=((1, T, n_i), f32),
                  keys_i=((1, N, c_i), bf16), g=((1, T, k), f32), g_out=((1, T, H, c), bf16))
    a = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=one) for name, (shape, dtype) in shapes.items()}

    def mass(a):
        return entry_attention_mass(a["q"], a["kv"], a["sinks"], W, a["comp"], a["idx"], m, chunk)

    def scores(a):
        out, pull = jax.vjp(lambda q, w, keys: entry_scores(q, w, keys, a["idx"], chunk), a["q_i"], a["w_i"],
                            a["keys_i"])
        return out, pull(a["g"])

    def core(a):
        _, pull = jax.vjp(lambda q, kv, comp: sparse_attention(q, kv, a["sinks"], W, comp, a["idx"], m, chunk),
                          a["q"], a["kv"], a["comp"])
        return pull(a["g_out"])

    return [jax.jit(f).lower(a).compile().memory_analysis().temp_size_in_bytes / 2**20 for f in (mass, scores, core)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the 8 x 64 shape")
    ap.add_argument("--traces-at-scale", action="store_true", help="the traces alone at v4-flash sizes (TPU AOT)")
    ap.add_argument("--topology", default="v5p:2x2x1", help="TPU topology for --traces-at-scale")
    args = ap.parse_args()
    if args.traces_at_scale:
        print("| T | N_c | attention mass: temp MiB | selected scores fwd+bwd: temp MiB | "
              "core attention fwd+bwd (reference, for scale): temp MiB |")
        print("|---|---|---|---|---|")
        for T in (4096, 16384, 65536):
            r = traces_at_scale(T, args.topology)
            print(f"| {T} | {T // 4} | {r[0]:.1f} | {r[1]:.1f} | {r[2]:.1f} |", flush=True)
        return
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
