"""Training-step time and tokens/s on CPU for the small presets (the whole step: forward, backward,
Muon + AdamW, selection-bias update), one device, fp32.

For each (preset, batch, seq): compile the step that train.py runs (`v4jax.train.step.make_step`),
run it `--warmup` times, then time `--steps` steps (blocking on the result each step). Reported: compile
time, median and min step time, tokens/s from the median, XLA's FLOPs per step (compiled cost analysis)
and the achieved GFLOP/s. The machine may be shared: each row reports the share of all CPUs that other
processes used while it was timed (/proc/stat minus this process), so busy rows can be read as such.

Rows are packed documents (eos about every 32 tokens); `--document-mask both` times the step with and
without sample-level masking (train.py's `document_mask`) one after the other.

Usage (repo root):  JAX_PLATFORMS=cpu python -m benchmarks.train_step [--quick] [--markdown] [--document-mask both]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from v4jax.model.layers import Buffer
from v4jax.model.transformer import Transformer
from v4jax.train.optim import flat_params
from v4jax.train.config import load_config
from v4jax.train.step import hyperparams, make_setup, make_step


def _cpu_jiffies() -> tuple[int, int]:
    """(all CPUs busy jiffies, this process's jiffies)."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    busy = sum(vals) - vals[3] - vals[4]  # minus idle and iowait
    with open(f"/proc/{os.getpid()}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return busy, int(parts[11]) + int(parts[12])


def bench(preset: str, batch: int, seq: int, steps: int, warmup: int, document_mask: bool = True,
          overrides: tuple[str, ...] = ()) -> dict:
    """`overrides`: train.py KEY=VALUE settings on top (e.g. "model.n_mtp_layers=0")."""
    vocab = {"tiny": 264, "tiny-b": 300}.get(preset)
    tc = load_config(None, [f'preset="{preset}"', f"seq_len={seq}", f"batch_size={batch}", "steps=1000",
                            f"document_mask={str(document_mask).lower()}"]
                     + ([f"model.vocab_size={vocab}"] if vocab else []) + list(overrides))
    cfg = tc.model_config()
    setup = make_setup(tc, cfg)
    _, p, b, _ = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0), options=tc.run_options()), nnx.Param, Buffer, ...)
    params = flat_params(p)
    n_params = sum(int(np.prod(a.shape)) for a in params.values())
    state = {"params": params, "buffers": flat_params(b), "opt": setup.tx.init(params),
             "step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(0))}
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 258, (batch, 1, seq + 1))
    tokens[rng.random(tokens.shape) < 1 / 32] = cfg.eos_token_id  # packed documents of ~32 tokens
    tokens = jnp.asarray(tokens, jnp.int32)
    nan = hyperparams(tc, setup.schedule, 100)  # past warm-up: the full learning rate
    t0 = time.time()
    compiled = jax.jit(make_step(tc, setup), donate_argnums=(0,)).lower(state, tokens, nan).compile()
    compile_s = time.time() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float((cost or {}).get("flops", 0.0))
    for _ in range(warmup):
        state, m = compiled(state, tokens, nan)
    jax.block_until_ready(m)
    times = []
    hz = os.sysconf("SC_CLK_TCK")
    busy0, mine0 = _cpu_jiffies()
    w0 = time.time()
    for _ in range(steps):
        t = time.perf_counter()
        state, m = compiled(state, tokens, nan)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    busy1, mine1 = _cpu_jiffies()
    others = max(0, (busy1 - busy0) - (mine1 - mine0)) / hz / ((time.time() - w0) * os.cpu_count())
    med = statistics.median(times)
    return {"preset": preset, "params_m": n_params / 1e6, "batch": batch, "seq": seq, "mask": document_mask,
            "compile_s": compile_s,
            "step_ms": med * 1e3, "min_ms": min(times) * 1e3, "tok_s": batch * seq / med,
            "gflop": flops / 1e9, "gflops": flops / med / 1e9, "others": others,
            "loss": float(m["loss"])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one shape per preset, fewer steps")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--presets", default="tiny,tiny-b", help="comma-separated presets")
    ap.add_argument("--document-mask", choices=("on", "off", "both"), default="on",
                    help="sample-level masking in the step (train.py's document_mask); both: a row each, side by side")
    args = ap.parse_args(argv)
    shapes = [(8, 64)] if args.quick else [(8, 64), (8, 128)]
    steps = 5 if args.quick else args.steps
    masks = {"on": (True,), "off": (False,), "both": (False, True)}[args.document_mask]
    rows = [bench(preset, b, s, steps, args.warmup, mask) for preset in args.presets.split(",") for b, s in shapes
            for mask in masks]
    head = ["preset", "params (M)", "batch x seq", "document mask", "compile (s)", "step (ms, median)",
            "step (ms, min)", "tokens/s", "XLA GFLOP/step", "GFLOP/s", "other procs' CPU"]
    lines = [[r["preset"], f"{r['params_m']:.2f}", f"{r['batch']} x {r['seq']}", "on" if r["mask"] else "off",
              f"{r['compile_s']:.0f}",
              f"{r['step_ms']:.0f}", f"{r['min_ms']:.0f}", f"{r['tok_s']:,.0f}", f"{r['gflop']:.2f}",
              f"{r['gflops']:.1f}", f"{100 * r['others']:.0f}%"] for r in rows]
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for l in lines:
            print("| " + " | ".join(l) + " |")
    else:
        widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
        print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
        for l in lines:
            print("  ".join(c.rjust(w) for c, w in zip(l, widths)))
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs; full step incl. Muon "
          f"(10 Newton-Schulz steps per matrix) and AdamW")


if __name__ == "__main__":
    main()
