"""Cached inference throughput of v4jax vs the transformers peer with its own cache, same weights, CPU fp32.

For each preset (tiny, tiny-b): build a random-weight transformers `DeepseekV4ForCausalLM`
(`peer.build_peer`), save it HF-style and load it with `restore.load_hf`, so both sides hold the
same fp32 weights (plus a random MTP block on our side: transformers has none). For batch 1 and 8:
  * prefill: one forward over the prompt that fills the cache (ours: `Generator._prefill`, jitted; peer:
    `model(ids, use_cache=True)`), tokens/s = batch * prompt / time;
  * decode: greedy one-token steps with the cache (ours: `Generator._step`, jitted, cache donated;
    peer: `model(next, past_key_values=...)`), tokens/s = batch * steps / time;
  * both sides are first checked to produce the same greedy tokens (teacher forcing would hide a
    divergence; the first mismatch is reported);
  * speculative: our MTP self-speculative greedy decode vs our plain greedy decode over the same steps:
    acceptance rate and the speed-up (random weights: the MTP block was never trained, so acceptance is
    near zero and the number shows the cost of a rejected draft; a trained MTP head accepts ~80-90%).
Both sides run single-threaded (torch.set_num_threads(1), XLA without Eigen threads): the machine
these were measured on is a shared 2-core VM. JAX compile time is excluded (each jitted step runs once before timing) and reported separately.
Background CPU load by other processes is reported per row (`benchmarks.forward_throughput.BackgroundMeter`).

Usage:  JAX_PLATFORMS=cpu python -m benchmarks.decode [--quick] [--prompt 64] [--steps 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np


def _peer_and_ours(preset: str, directory: str):
    from flax import nnx

    from v4jax import peer

    from v4jax.io import restore

    from v4jax.inference import generate
    from v4jax.config import V4Config
    from v4jax.model.transformer import Transformer

    cfg = V4Config.preset(preset)
    torch_model = peer.build_peer(cfg, 0)
    peer.save_peer(torch_model, directory)
    loaded, info = restore.load_hf(directory)
    model = Transformer(info.config.replace(n_mtp_layers=1), rngs=nnx.Rngs(1), options=info.options)
    nnx.update(model, nnx.state(loaded))
    return model.cfg, torch_model, generate.Generator(model)


def _peer_decode(torch_model, ids: np.ndarray, steps: int):
    import torch

    from v4jax import peer

    with torch.no_grad(), peer.stable_topk():
        t0 = time.perf_counter()
        out = torch_model(torch.as_tensor(ids, dtype=torch.long), use_cache=True)
        t1 = time.perf_counter()
        cache, nxt, toks = out.past_key_values, out.logits[:, -1].argmax(-1), []
        toks.append(nxt.numpy())
        for _ in range(steps - 1):  # the first token came from the prefill
            out = torch_model(nxt[:, None], past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1)
            toks.append(nxt.numpy())
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1, np.stack(toks, 1)


def _ours_decode(gen, ids: np.ndarray, steps: int, max_len: int, speculative: bool = False):
    """(prefill s, decode s, tokens [B, steps], accepted, drafted) through `Generator.generate` (jitted
    steps, cache donated; the per-step host round trip is included, as on the peer side)."""
    out = gen.generate([list(r) for r in ids], max_new_tokens=steps, max_len=max_len, speculative=speculative)
    s = out.stats
    return s.prefill_s, s.decode_s, np.array(out.tokens), s.accepted, s.drafted


def run(presets, batches, prompt: int, steps: int, repeats: int):
    import torch

    from benchmarks.forward_throughput import BackgroundMeter

    torch.set_num_threads(1)  # one thread each side (XLA: see main): fair on a loaded 2-core machine

    rows = []
    for preset in presets:
        with tempfile.TemporaryDirectory() as d:
            cfg, torch_model, gen = _peer_and_ours(preset, d)
            for B in batches:
                ids = np.random.default_rng(B).integers(0, cfg.vocab_size, (B, prompt)).astype(np.int32)
                max_len = prompt + steps + 2
                t = time.perf_counter()
                _ours_decode(gen, ids, steps, max_len)  # compile
                _ours_decode(gen, ids, steps, max_len, speculative=True)
                compile_s = time.perf_counter() - t
                meter = BackgroundMeter()
                best = {}
                for _ in range(repeats):
                    for name, fn in (("ours", lambda: _ours_decode(gen, ids, steps, max_len)),
                                     ("peer", lambda: _peer_decode(torch_model, ids, steps)),
                                     ("spec", lambda: _ours_decode(gen, ids, steps, max_len, speculative=True))):
                        r = fn()
                        prev = best.get(name)
                        best[name] = r if prev is None else (min(prev[0], r[0]), min(prev[1], r[1]), *r[2:])
                ours, peer_, spec = best["ours"], best["peer"], best["spec"]
                same = np.array_equal(ours[2], peer_[2])
                mismatch = "-" if same else str(int(np.argmax((ours[2] != peer_[2]).any(0))))
                rows.append(dict(
                    preset=preset, batch=B, prompt=prompt, steps=steps,
                    ours_prefill=B * prompt / ours[0], peer_prefill=B * prompt / peer_[0],
                    ours_decode=B * (steps - 1) / ours[1], peer_decode=B * (steps - 1) / peer_[1],
                    spec_decode=B * (steps - 1) / spec[1], accept=spec[3] / max(spec[4], 1),
                    spec_same=bool(np.array_equal(spec[2], ours[2])), same=same, first_mismatch=mismatch,
                    compile_s=compile_s, busy=meter.stop()))
                r = rows[-1]
                print(f"{preset} B={B}: prefill {r['ours_prefill']:.0f} vs {r['peer_prefill']:.0f} tok/s, decode "
                      f"{r['ours_decode']:.0f} vs {r['peer_decode']:.0f} tok/s, spec {r['spec_decode']:.0f} tok/s "
                      f"(accept {r['accept']:.0%}), same tokens {same}", flush=True)
    return rows


def table(rows) -> str:
    head = ["preset", "batch", "prompt", "prefill tok/s v4jax", "prefill tok/s peer", "ratio",
            "decode tok/s v4jax", "decode tok/s peer", "ratio", "same greedy tokens", "speculative tok/s",
            "MTP acceptance", "spec / plain", "spec = plain tokens", "compile s", "background CPU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["preset"], str(r["batch"]), str(r["prompt"]), f"{r['ours_prefill']:.0f}", f"{r['peer_prefill']:.0f}",
            f"{r['ours_prefill'] / r['peer_prefill']:.2f}x", f"{r['ours_decode']:.0f}", f"{r['peer_decode']:.0f}",
            f"{r['ours_decode'] / r['peer_decode']:.2f}x",
            "yes" if r["same"] else f"no (from step {r['first_mismatch']})", f"{r['spec_decode']:.0f}",
            f"{r['accept']:.0%}", f"{r['spec_decode'] / r['ours_decode']:.2f}x", "yes" if r["spec_same"] else "no",
            f"{r['compile_s']:.0f}", f"{r['busy']:.0%}"]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny only, batch 1 and 8, one repeat")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    import os

    if "jax" not in sys.modules:  # single-threaded XLA:CPU, like torch above (set before jax starts)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1").strip()
    presets = ["tiny"] if args.quick else ["tiny", "tiny-b"]
    rows = run(presets, [1, 8], args.prompt, args.steps, 1 if args.quick else args.repeats)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
