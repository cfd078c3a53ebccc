"""Checkpoint conversion throughput and peak RSS on a synthetic official-layout release.

The release is written by `v4jax.io.official.write_release` from random weights with V4-Flash shapes
(per layer: attention `wq_a [1024, 4096]`, `wq_b [32768, 1024]`, `wkv [512, 4096]`, `wo_a [8192, 4096]`,
`wo_b [4096, 8192]` in FP8; `--experts` routed experts `w1/w3 [2048, 4096]`, `w2 [4096, 2048]` in
MXFP4; norms in BF16), `--layers` layers. Each conversion runs in its own process and reports:

* wall and CPU (user + system) time, and throughput in GB of *logical bf16 bytes* (2 bytes per
  weight value, so the rows are comparable whatever each side stores) per wall second and per CPU
  second. On a shared machine the per-CPU-second figure is the stable one; the 1-minute load average
  is printed with the results;
* peak RSS growth over the process's peak after imports (VmHWM), next to the largest tensor (bf16)
  and the Orbax batch size.

Rows: official -> orbax (bf16, the main path: de-quantise + save + verification pass), orbax -> official
(load + re-quantise + write + verify), orbax -> hf (load + write + verify), official -> hf (direct).
Also the (de)quantiser kernels alone (numpy, one thread) in GB of bf16 per CPU second.

Usage: JAX_PLATFORMS=cpu python -m benchmarks.convert [--layers 2] [--experts 16] [--batch-mb 256] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import ml_dtypes
import numpy as np

FLASH_ATTN = {"wq_a": (1024, 4096), "wq_b": (32768, 1024), "wkv": (512, 4096), "wo_a": (8192, 4096),
              "wo_b": (4096, 8192)}
FLASH_EXPERT = {"w1": (2048, 4096), "w2": (4096, 2048), "w3": (2048, 4096)}

_CHILD = textwrap.dedent("""
    import json, os, sys, time
    from v4jax.io import convert
    base = convert.peak_rss_bytes()
    t, c = time.perf_counter(), os.times()
    convert.convert(sys.argv[1], sys.argv[2], fmt=sys.argv[3], batch_bytes=int(sys.argv[4]), progress=False)
    dt, c2 = time.perf_counter() - t, os.times()
    cpu = (c2.user - c.user) + (c2.system - c.system)
    print(json.dumps({"seconds": dt, "cpu_seconds": cpu, "rss_growth": convert.peak_rss_bytes() - base}))
""")


def synthetic_tensors(layers: int, experts: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(layers):
        yield f"layers.{i}.attn_norm.weight", np.ones(4096, np.float32)
        for name, shape in FLASH_ATTN.items():
            yield f"layers.{i}.attn.{name}.weight", (rng.standard_normal(shape, np.float32) * 0.02)
        for e in range(experts):
            for name, shape in FLASH_EXPERT.items():
                yield f"layers.{i}.ffn.experts.{e}.{name}.weight", (rng.standard_normal(shape, np.float32) * 0.02)


def logical_bytes(layers: int, experts: int) -> tuple[int, int]:
    attn = sum(a * b for a, b in FLASH_ATTN.values())
    exp = sum(a * b for a, b in FLASH_EXPERT.values())
    total = layers * (4096 + attn + experts * exp) * 2
    largest = max(max(a * b for a, b in FLASH_ATTN.values()), max(a * b for a, b in FLASH_EXPERT.values())) * 2
    return total, largest


def run_child(src, dst, fmt, batch_bytes) -> dict:
    import json
    r = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(dst), fmt, str(batch_bytes)],
                       capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    if r.returncode:
        raise SystemExit(f"conversion {src} -> {dst} [{fmt}] failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def kernel_rows():
    from v4jax.io import quant
    rng = np.random.default_rng(1)
    rows = []
    w8 = (rng.standard_normal((8192, 4096), np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    w4 = (rng.standard_normal((2048, 4096), np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    q8, s8 = quant.quant_fp8_block(w8)
    q4, s4 = quant.quant_fp4(w4)
    for label, fn, nbytes in [
        ("quant_fp8_block [8192, 4096]", lambda: quant.quant_fp8_block(w8), w8.nbytes),
        ("dequant_fp8_block -> bf16", lambda: quant.dequant_fp8_block(q8, s8), w8.nbytes),
        ("quant_fp4 [2048, 4096]", lambda: quant.quant_fp4(w4), w4.nbytes),
        ("dequant_fp4 -> bf16", lambda: quant.dequant_fp4(q4, s4), w4.nbytes),
        ("fp4_to_fp8 (lossless check incl.)", lambda: quant.fp4_to_fp8(q4, s4), w4.nbytes),
    ]:
        times = []
        for _ in range(3):
            t = time.process_time()
            fn()
            times.append(time.process_time() - t)
        rows.append((label, min(times), nbytes / min(times) / 1e9))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--batch-mb", type=float, default=256)
    p.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    from v4jax.io import official

    work = args.workdir or tempfile.mkdtemp(prefix="v4jax-convert-bench-")
    os.makedirs(work, exist_ok=True)
    total, largest = logical_bytes(args.layers, args.experts)
    batch = int(args.batch_mb * 2**20)
    release = os.path.join(work, "release")
    t = time.perf_counter()
    official.write_release(release, synthetic_tensors(args.layers, args.experts), overwrite=True)
    t_write = time.perf_counter() - t
    disk = sum(os.path.getsize(os.path.join(release, f)) for f in os.listdir(release))
    print(f"# synthetic release: {args.layers} layers x ({len(FLASH_ATTN)} FP8 attention + {args.experts} x 3 FP4 "
          f"experts), {total / 1e9:.2f} GB as bf16, {disk / 1e9:.2f} GB on disk; largest tensor (bf16) "
          f"{largest / 2**20:.0f} MiB; orbax batch {args.batch_mb:.0f} MiB; written (quantised) in {t_write:.1f} s")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    rows = []
    for src, dst, fmt in [(release, "orbax", "orbax"), ("orbax", "official", "official"),
                          ("orbax", "hf", "hf"), (release, "hf_direct", "hf")]:
        src_path = src if os.path.isabs(src) else os.path.join(work, src)
        dst_path = os.path.join(work, dst)
        shutil.rmtree(dst_path, ignore_errors=True)
        r = run_child(src_path, dst_path, fmt, batch)
        label = f"{'official' if src == release else src} -> {fmt}"
        rows.append((label, r["seconds"], r["cpu_seconds"], total / r["seconds"] / 1e9,
                     total / r["cpu_seconds"] / 1e9, r["rss_growth"] / 2**20))
    kernels = kernel_rows()
    print(f"# load average (1 min) after the runs: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if args.markdown:
        print("\n| conversion | wall s | CPU s | GB/s wall | GB per CPU-s | peak RSS growth (MiB) |\n|---|---|---|---|---|---|")
        for label, s, c, gbs, gbc, rss in rows:
            print(f"| {label} | {s:.1f} | {c:.1f} | {gbs:.3f} | {gbc:.3f} | {rss:.0f} |")
        print("\n| kernel (numpy, 1 thread) | CPU s | GB per CPU-s (bf16 bytes) |\n|---|---|---|")
        for label, s, gbs in kernels:
            print(f"| {label} | {s:.3f} | {gbs:.3f} |")
    else:
        print(f"{'conversion':<24}{'wall s':>9}{'CPU s':>9}{'GB/s':>9}{'GB/CPU-s':>10}{'RSS+ MiB':>10}")
        for label, s, c, gbs, gbc, rss in rows:
            print(f"{label:<24}{s:>9.1f}{c:>9.1f}{gbs:>9.3f}{gbc:>10.3f}{rss:>10.0f}")
        print(f"\n{'kernel':<36}{'CPU s':>10}{'GB/CPU-s':>10}")
        for label, s, gbs in kernels:
            print(f"{label:<36}{s:>10.3f}{gbs:>10.3f}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
