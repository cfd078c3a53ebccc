"""The benchmark suite: run every benchmark and write generated sections of BENCHMARKS.md.

    python -m benchmarks [--quick] [--only NAME[,NAME]] [--out BENCHMARKS.md] [--no-write] [--dryrun]

Sections (in order; `--only` picks some):
  peer        v4jax vs the transformers peer, same weights and inputs, CPU: forward, prefill, decode
              (batch 1 and 8), training step; ratios (benchmarks/peer_compare.py)
  scaling     per-token attention cost vs context, sparse vs dense, from compiled cost analysis; KV cache
              and FLOPs vs the V3.2 baseline against the report's figures; PNG plot (benchmarks/scaling.py)
  dryrun      scale on paper: the recorded dry-run JSONs in benchmarks/results/dryrun/ (written by
              `python -m benchmarks.dryrun --json`, or by `--dryrun` here) and the MaxText DeepSeek-V3 reference
  gpu         kernel times and roofline fractions on a GPU, when the machine has one
  components  the per-component benchmarks (forward_throughput, decode, train_step, sparse_attention,
              lightning_indexer, moe_dispatch, convert), each run in-process with its own CLI arguments
              (their quick settings under --quick) and its printed output kept

Each generated section sits between `<!-- suite:NAME begin -->` and `<!-- suite:NAME end -->` in the
output file; only those spans are replaced (or appended when missing), everything else is kept as
written. Every section states the machine, the versions, the code version and the exact command.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import glob
import io
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
DRYRUN_DIR = os.path.join(RESULTS, "dryrun")
PLOT = os.path.join(RESULTS, "scaling.png")  # the scaling section's plot, referenced from the section
MARK = "<!-- suite:{name} {edge} -->"


@dataclasses.dataclass
class Section:
    title: str
    body: str  # Markdown, without the title, machine and command lines
    numbers: list[float]  # every measured number, for the smoke test (all must be finite)
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------------
# Machine, versions, code version


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> str:
    from benchmarks.forward_throughput import _cpu_model

    try:
        with open("/proc/meminfo") as f:
            ram = f"{int(f.readline().split()[1]) / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        ram = "RAM unknown"
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{_cpu_model()}, {os.cpu_count()} cores ({usable} usable), {ram}, {platform.system()} "
            f"{platform.release()}; load average at start {load}")


def versions() -> str:
    import jax

    names = ["jax", "jaxlib", "flax", "torch", "transformers", "libtpu", "numpy"]
    return f"python {platform.python_version()}, " + ", ".join(f"{n} {_version(n)}" for n in names) + (
        f"; JAX backend {jax.default_backend()}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '(unset)')}")


def code_version() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "v4jax", "pallas_kernels", "sharding", "benchmarks")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"`{head}`" + (" plus uncommitted changes under v4jax/ pallas_kernels/ sharding/ benchmarks/" if dirty
                          else " (clean)")


def _numbers(text: str) -> list[float]:
    """Every number in a Markdown text (for the finiteness check); 'nan'/'inf' count as non-finite."""
    out = [float(x.replace(",", "")) for x in re.findall(r"(?<![\w.])-?\d[\d,]*\.?\d*(?:e[+-]?\d+)?", text)]
    out += [math.nan for _ in re.findall(r"\b(?:nan|NaN|inf)\b", text)]
    return out


# --------------------------------------------------------------------------------------------------
# Sections


def section_peer(quick: bool, log) -> Section:
    from benchmarks import peer_compare

    s = peer_compare.settings(quick)
    rows = peer_compare.run(quick, log)
    bad = [r for r in rows if not r["check"].startswith("ok")]
    body = [
        f"Presets {', '.join(s['presets'])}; prompt T = {s['seq']}, {s['steps']} greedy decode steps, "
        f"{s['repeats']} repeats after {s['warmup']} warm-up; both sides single-threaded (torch 1 thread, "
        "XLA:CPU without Eigen threads) on a shared machine. Same weights (the peer saved HF-style and loaded "
        "with `restore.load_hf`) and the same token ids on both sides; each row is checked before it is "
        "timed (forward / prefill: logits within 1e-4 relative; decode: identical greedy tokens and first-step "
        "logits; train: loss and global gradient norm within 1e-4 relative).",
        "",
        peer_compare.table(rows),
        "",
        "ratio = peer median time / v4jax median time (>1: v4jax faster); tok/s = tokens per call / median "
        "(decode: B tokens per step). v4jax: `jax.jit` (cache donated for prefill/decode; train = "
        "`jax.value_and_grad` of the CE loss). Peer: transformers `DeepseekV4ForCausalLM`, eager, under "
        "`peer.stable_topk()`; train = `loss.backward()`. Compile time is excluded from the timings. "
        "`other load`: share of all CPUs used by other processes while the row was timed; rows with high "
        "other load are noisy (both sides run alternately, so the ratio is less affected than the times).",
    ]
    if bad:
        body.append(f"\n**{len(bad)} row(s) failed their check**: their timings compare different computations.")
    numbers = [x for r in rows for x in (*r["ours"], *r["peer"], r["err"])]
    return Section("v4jax vs the transformers peer (CPU, fp32)", "\n".join(body), numbers)


def _flops_reading(name: str, shares: tuple[float, float], report: float) -> str:
    full, half = shares
    if half <= report <= full:
        where = "between the two conventions"
    elif abs(report - full) <= abs(report - half):
        where = f"{100 * abs(report - full):.1f} points from the all-FLOPs-equal count"
    else:
        where = f"{100 * abs(report - half):.1f} points from the FP4-at-half count"
    return (f"{name} {100 * full:.1f}% of V3.2 ({100 * half:.1f}% with the FP4 indexer at half), report "
            f"{100 * report:.0f}%: {where}")


def section_scaling(quick: bool, log, contexts=None) -> Section:
    from benchmarks import scaling

    if contexts is not None:
        rows, where = scaling.layer_table(contexts, log=log)
        out = dict(layers=scaling.format_layer_table(rows, where), rows=rows, plot=None)
        out["cache"], out["cache_shares"] = scaling.cache_table()
        out["flops"], out["flops_shares"] = scaling.flops_table()
    else:
        out = scaling.run(quick, log=log, plot_path=PLOT)
    flash_c, pro_c = out["cache_shares"]["v4-flash"], out["cache_shares"]["v4-pro"]
    flash_f, pro_f = out["flops_shares"]["v4-flash"], out["flops_shares"]["v4-pro"]
    plot = os.path.relpath(out["plot"], ROOT) if out["plot"] else None  # relative to the repository root
    body = [
        "**1. Attention cost per token vs context** (`benchmarks/scaling.py`). One new token at position S-1 "
        "against the cache (one decode step), one attention layer of V4-Flash shape (H=64, c=512, d=4096), bf16, "
        "compiled from ShapeDtypeStructs only (nothing runs). SWA/CSA/HCA run the `Attention` layer with its cache "
        "(projections, compressor and indexer updates, top-k, core attention, output projection); dense is the "
        "same layer with plain causal attention over all S cached keys. FLOPs and bytes from `cost_analysis()` "
        "(one token: no loops, nothing under-counted); temp from `memory_analysis()`; cache held = the cache "
        "arrays for this sequence (bf16 layout of `init_cache`). Bytes accessed include the layer's weights "
        "(~200 MB at batch 1), which is why they are flat in S for SWA/HCA.",
        "",
        out["layers"],
        "",
        "**2. KV cache per sequence** (`v4jax.inference.cache_size.cache_size`, release storage: FP8 entries with BF16 RoPE dims, "
        "FP4 indexer keys; architecture.md §4.7) vs the V3.2-shaped baseline (61 MLA layers, 656 B latent + 132 B indexer key "
        "per layer per token). Report (architecture.md §4.7): at 1M, Flash 7% and Pro 10% of V3.2.",
        "",
        out["cache"],
        "",
        "**3. Whole-model FLOPs per token at 1M context vs V3.2** (analytic, not compiled): 2 x active parameters "
        "(counted from the abstract model as the dry run counts them; embedding excluded) + core attention "
        "(QK and PV: 4 H c FLOPs per key seen: window + CSA top-k or HCA entries) + indexer scores "
        "(2 n_I c_I per visible compressed entry). V3.2: 2 x 37e9 + 61 x (indexer 2 x 64 x 128 x S + MLA over "
        "the top 2048 tokens with absorbed projections, 2 x 128 x (576 + 512) per key). Report (architecture.md §4.7): Flash "
        "10%, Pro 27% in \"equivalent FP8 FLOPs\", a conversion it does not define; the last-but-one column "
        "counts V4's FP4 indexer FLOPs at half as one reading of it.",
        "",
        out["flops"],
        "",
        f"**Reading.** KV cache: Flash {100 * flash_c:.1f}% and Pro {100 * pro_c:.1f}% of V3.2 at 1M (report 7% / "
        f"10%). FLOPs: {_flops_reading('Flash', flash_f, 0.10)}; {_flops_reading('Pro', pro_f, 0.27)}. Per layer, "
        "CSA's per-token cost at long context is dominated by the indexer scan over the S/4 compressed index keys "
        "(128-d scores only: 1/32 of dense attention's FLOPs per context token), HCA's by its S/128 entries; "
        "dense attention grows with S at full width (QK and PV over 512-d keys).",
    ]
    if plot:
        body += ["", f"![attention cost and KV cache vs context]({plot})"]
    numbers = [x for r in out["rows"] for x in (r["flops"], r["bytes"], r["temp"], r["cache"])]
    numbers += [flash_c, pro_c, *flash_f, *pro_f]
    return Section("Scaling with context: sparse vs dense attention, KV cache and FLOPs vs V3.2", "\n".join(body),
                   numbers)


# MaxText's published DeepSeek-V3 training run on v5p (AI-Hypercomputer/tpu-recipes,
# training/v5p/DeepSeek3-671B-MaxText/README.md, config `deepseek3_671b_v5p_1024` of MaxText
# benchmarks/maxtext_v5p_model_configs.py @ 3eb77db3c): its example log line reads
# "completed step: 11, seconds: 90.668, TFLOP/s/device: 152.415, Tokens/s/device: 542.108,
# total_weights: 25165824"; v5p-1024 is 512 chips; 152.4 / 459 TFLOP/s peak = 33.2% MFU.
MAXTEXT_V3 = dict(run="DeepSeek-V3 671B train (MaxText, measured on hardware)", topology="v5p-1024 (512 chips)",
                  tflops_per_device=152.415, peak=459e12, step_s=90.668, tokens=25165824, tokens_per_device=542.108,
                  source="AI-Hypercomputer/tpu-recipes training/v5p/DeepSeek3-671B-MaxText/README.md "
                         "(MaxText config `deepseek3_671b_v5p_1024`)")


def load_dryruns(directory: str = DRYRUN_DIR) -> tuple[list[dict], list[str]]:
    """Every dry-run report JSON in the directory (benchmarks.dryrun.Report as a dict, plus its file name),
    and 'file: reason' for each file skipped (unreadable, being written, or not a dry-run report)."""
    runs, skipped = [], []
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        name = os.path.basename(path)
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            skipped.append(f"{name}: unreadable ({str(e).splitlines()[0]})")
            continue
        if not isinstance(d, dict) or "topology" not in d or "config" not in d:
            skipped.append(f"{name}: not a benchmarks.dryrun report (needs at least config and topology)")
            continue
        d["_file"] = name
        runs.append(d)
    return runs, skipped


def _verdict(fits: bool | None, why: str) -> str:
    """The fits column: yes; no with the compiler's temporaries or the needed GiB when the refusal names
    them; ? with the reason when the compile ended without a verdict (e.g. a compiler abort)."""
    if fits is None:
        return "?" + (f" ({why[:130]})" if why else "")
    if fits:
        return "yes"
    if m := re.search(r"temporaries \(([\d.]+G)\)", why):
        return f"no ({m.group(1)} of temporaries)"
    if m := re.search(r"([\d.]+ GiB per device needed)", why):
        return f"no ({m.group(1)})"
    return "no" + (f": {why[:80]}" if why else "")


def _model_name(d: dict) -> str:
    """The model a dry-run report compiled: a depth-reduced one (V4.1's --layers) names its layers."""
    layers = d.get("layers")
    return d["config"] + (f" (layers {','.join(map(str, layers))} only)" if isinstance(layers, list) else "")


def dryrun_tables(runs: list[dict]) -> str:
    g = 2**30
    # two readings of one program (docs/sharding.md, Dry runs): XLA's cost analysis scaled by one analytic
    # factor (its step, bound and MFU), and the loop-by-loop reading (`hlo_costs`: every loop body times its
    # trip count; reports from before it carry none)
    lines = ["| run | topology (devices) | mesh | batch x seq | per-device HBM GiB (of) | fits | compiled FLOPs / "
             "device | model FLOPs / device | roofline step | bound | MFU | MFU loop by loop | file |",
             "|---|---|---|---|---:|---|---:|---:|---:|---|---:|---:|---|"]

    def num(d, key, fmt):
        v = d.get(key)
        return "-" if v is None else fmt(v)

    for d in runs:
        devices = d.get("devices") or 0
        why = d.get("error") or d.get("reason") or ""
        fits_s = _verdict(d.get("fits"), why)
        if not d.get("mesh") and "with mesh " in why:
            d = {**d, "mesh": why.split("with mesh ")[1].split(":")[0]}
        st = d.get("settings") or {}
        knobs = ", ".join(f"{k} {st[k]}" for k in ("optimizer", "moe_dispatch_chunk", "moe_impl") if k in st)
        if d.get("mode") == "train" and "step" not in st:  # before issue 16 the dry run compiled its own loss
            knobs += (", " if knobs else "") + "own loss, not make_step"
        if "TPU_LIBRARY_PATH" in st.get("libtpu", ""):  # compiled by another libtpu than the installed one
            knobs += f", libtpu {st['libtpu'].split()[0]}"
        model_per_device = "-" if not devices or d.get("model_flops") is None else f"{d['model_flops'] / devices:.2e}"
        peak, hbm = num(d, "peak_bytes", lambda v: f"{v / g:.1f}"), num(d, "hbm_bytes", lambda v: f"{v / g:.0f}")
        # a report whose HLO could not be read back (another libtpu) has no collectives term
        no_ici = " (ICI not counted: HLO unreadable)" if d.get("fits") and d.get("collective_bytes_per_device", 0) is None else ""
        lines.append(
            f"| {_model_name(d)} {d.get('mode', '?')}{f' ({knobs})' if knobs else ''} | {d['topology']} "
            f"({devices or '-'}) | {d.get('mesh') or '-'} | "
            f"{d.get('batch') or '-'} x {d.get('seq', '-')} | {peak} ({hbm}) | {fits_s} | "
            f"{num(d, 'flops_per_device', lambda v: f'{v:.2e}')} | {model_per_device} | "
            f"{num(d, 'step_time_s', lambda v: f'{v:.2f} s')} | {d.get('bound', '-')}{no_ici} | "
            f"{num(d, 'mfu', lambda v: f'{100 * v:.1f}%')} | {num(d, 'loop_mfu', lambda v: f'{100 * v:.1f}%')} | "
            f"{d['_file']} |")
    m = MAXTEXT_V3
    model_per_device = m["tflops_per_device"] * 1e12 * m["step_s"]
    lines.append(f"| {m['run']} | {m['topology']} | fsdp + expert (see source) | {m['tokens']:,} tokens "
                 f"| - | yes | - | {model_per_device:.2e} | {m['step_s']:.1f} s (measured) | - | "
                 f"{100 * m['tflops_per_device'] * 1e12 / m['peak']:.1f}% | (measured) | [source](https://github.com/"
                 f"AI-Hypercomputer/tpu-recipes/blob/main/training/v5p/DeepSeek3-671B-MaxText/README.md) |")
    # smallest fitting topology per (config, mode, TPU generation)
    best: dict[tuple, dict] = {}
    tried: dict[tuple, list[str]] = {}
    unknown: set[tuple] = set()  # some run of the key ended without a verdict (a compiler abort)
    for d in runs:
        key = (_model_name(d), d.get("mode", "?"), d.get("seq", 0), d["topology"].split(":")[0])
        tried.setdefault(key, []).append(d["topology"])
        if d.get("fits") is None:
            unknown.add(key)
        if d.get("fits") and (key not in best or (d.get("devices") or 0) < (best[key].get("devices") or 0)):
            best[key] = d
    out = ["\n".join(lines), "", "Smallest recorded topology that fits, per model, mode, sequence length and TPU "
           "generation (only the topologies tried are known: a smaller untried one may fit too):", "",
           "| model | mode | seq | generation | smallest fitting topology | devices | per-device GiB | roofline MFU | "
           "MFU loop by loop | topologies tried |", "|---|---|---:|---|---|---:|---:|---:|---:|---|"]
    for key in sorted(tried):
        d = best.get(key)
        peak = "-" if not d or d.get("peak_bytes") is None else f"{d['peak_bytes'] / g:.1f}"
        mfu, loop = ("-" if not d or d.get(k) is None else f"{100 * d[k]:.1f}%" for k in ("mfu", "loop_mfu"))
        none = "none recorded fits" + (" (a compile ended without a verdict)" if key in unknown else "")
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {d['topology'] if d else none} | "
                   f"{d.get('devices', '-') if d else '-'} | {peak} | {mfu} | {loop} | "
                   f"{', '.join(sorted(set(tried[key])))} |")
    return "\n".join(out)


# The dry runs behind the scale-on-paper table, as `python -m benchmarks.dryrun` arguments keyed by the JSON
# file each writes to benchmarks/results/dryrun/ (a refusal is written too). `--dryrun` compiles those
# whose file is missing (delete a file to redo it): 3-30 min each on a 2-core host, hours in all.
_TRAIN = "--mode train --seq 4096 --set moe_dispatch_chunk=256"
DRYRUN_PLAN = {
    # v4-flash training: v5p smallest first, tpu7x, one v6e slice, 32K tokens
    "v4-flash_train_v5p-4x4x4_4k_chunk256_muon": f"--config v4-flash --topology v5p:4x4x4 {_TRAIN}",
    "v4-flash_train_v5p-4x4x4_4k_chunk128_muon": "--config v4-flash --topology v5p:4x4x4 --mode train --seq 4096 "
                                                 "--set moe_dispatch_chunk=128",
    "v4-flash_train_v5p-8x8x4_4k_chunk256_muon": f"--config v4-flash --topology v5p:8x8x4 {_TRAIN}",
    "v4-flash_train_tpu7x-4x4x8_4k_chunk256_muon": f"--config v4-flash --topology tpu7x:4x4x8 {_TRAIN}",
    "v4-flash_train_v6e-16x16_4k_long_context": "--config v4-flash --topology v6e:16x16 --rules long_context "
                                                f"--mesh context=4,expert=64 {_TRAIN}",
    "v4-flash_train_v6e-16x16_4k_long_context_chunk128": "--config v4-flash --topology v6e:16x16 --rules long_context "
                                                         "--mesh context=4,expert=64 --mode train --seq 4096 "
                                                         "--set moe_dispatch_chunk=128",
    "v4-flash_train_v5p-8x8x4_32k_long_context": "--config v4-flash --topology v5p:8x8x4 --rules long_context "
                                                 "--mesh context=8,expert=32 --mode train --seq 32768 "
                                                 "--set moe_dispatch_chunk=256",
    # v4-pro training: fsdp_ep refused (q_lora 1536 caps fsdp x expert at 512), fsdp_tp_ep fits; 32K tokens
    "v4-pro_train_v5p-8x8x16_4k_chunk256": f"--config v4-pro --topology v5p:8x8x16 {_TRAIN}",
    "v4-pro_train_v5p-8x8x8_4k_chunk256_tp": f"--config v4-pro --topology v5p:8x8x8 --rules fsdp_tp_ep {_TRAIN}",
    "v4-pro_train_v5p-8x8x16_4k_chunk256_tp": f"--config v4-pro --topology v5p:8x8x16 --rules fsdp_tp_ep {_TRAIN}",
    "v4-pro_train_tpu7x-4x8x8_4k_chunk256_tp": f"--config v4-pro --topology tpu7x:4x8x8 --rules fsdp_tp_ep {_TRAIN}",
    "v4-pro_train_v5p-8x8x16_32k_long_context": "--config v4-pro --topology v5p:8x8x16 --rules long_context "
                                                "--mesh context=16,expert=64 --rule q_lora=expert --mode train "
                                                "--seq 32768 --set moe_dispatch_chunk=256",
    # decode, 8K context unless named (128K / 1M for v4-flash on v5p)
    "v4-flash_decode_v5p-4x4x4_8k": "--config v4-flash --topology v5p:4x4x4 --mode decode --seq 8192",
    "v4-flash_decode_v5p-4x4x4_128k": "--config v4-flash --topology v5p:4x4x4 --mode decode --seq 131072",
    "v4-flash_decode_v5p-4x4x4_1m": "--config v4-flash --topology v5p:4x4x4 --mode decode --seq 1048576",
    "v4-flash_decode_v6e-8x8_8k": "--config v4-flash --topology v6e:8x8 --mode decode --seq 8192",
    "v4-flash_decode_tpu7x-4x4x4_8k": "--config v4-flash --topology tpu7x:4x4x4 --mode decode --seq 8192",
    "v4-pro_decode_v5p-4x4x4_8k": "--config v4-pro --topology v5p:4x4x4 --mode decode --seq 8192",
    "v4-pro_decode_v6e-16x16_8k": "--config v4-pro --topology v6e:16x16 --mode decode --seq 8192",
    "v4-pro_decode_tpu7x-4x4x4_8k": "--config v4-pro --topology tpu7x:4x4x4 --mode decode --seq 8192",
}


def run_dryruns(log, directory: str = DRYRUN_DIR) -> None:
    from benchmarks import dryrun

    os.makedirs(directory, exist_ok=True)
    for name, args in DRYRUN_PLAN.items():
        path = os.path.join(directory, f"{name}.json")
        if os.path.exists(path):
            continue
        log(f"[dryrun] {name}: python -m benchmarks.dryrun {args}")
        dryrun.main(args.split() + ["--json", path])  # writes the report, or the refusal, to path


def section_dryrun(quick: bool, log, directory: str = DRYRUN_DIR, run: bool = False) -> Section:
    del quick
    if run:
        run_dryruns(log, directory)
    runs, skipped = load_dryruns(directory)
    rel = os.path.relpath(directory, ROOT)
    body = [
        f"Rendered from the dry-run reports in `{rel}/` ({len(runs)} file(s)); each is the `--json` output of "
        "`python -m benchmarks.dryrun` (compile-only for the TPU topology on a CPU host; method and caveats in "
        "docs/sharding.md). Memory is the compiled per-device peak (arguments + outputs + temporaries - aliased) "
        "against the chip's HBM; the step time is a roofline (slowest of compute, HBM traffic, ICI traffic) "
        "and MFU = model FLOPs / (devices x peak x that step): a model of the compiled program, not a "
        "measurement. The suite does not compile these by default (about 30 min each on a 2-core host); "
        "`python -m benchmarks --only dryrun --dryrun` runs the plan in `benchmarks/suite.py` (DRYRUN_PLAN).",
        "",
    ]
    if skipped:
        body += ["Skipped: " + "; ".join(skipped) + ".", ""]
    if runs:
        body.append(dryrun_tables(runs))
    else:
        body += ["No dry-run results are recorded yet; only the reference row:", "", dryrun_tables([])]
    m = MAXTEXT_V3
    body += ["", f"Reference: MaxText's DeepSeek-V3 671B training recipe on v5p ({m['source']}) logs "
             f"{m['tflops_per_device']:.1f} TFLOP/s per device, {m['tokens_per_device']:.0f} tokens/s per device, "
             f"{m['step_s']:.1f} s per step of {m['tokens']:,} tokens on v5p-1024 (512 chips, 8192-token sequences); "
             f"against v5p's 459 TFLOP/s bf16 peak that is "
             f"{100 * m['tflops_per_device'] * 1e12 / m['peak']:.1f}% MFU, measured on hardware, which is what a "
             "roofline MFU above would have to be discounted towards."]
    numbers = [float(d[k]) for d in runs for k in ("peak_bytes", "flops_per_device", "step_time_s", "mfu")
               if d.get(k) is not None]
    return Section("Scale on paper: TPU dry runs vs the MaxText DeepSeek-V3 reference", "\n".join(body), numbers)


def section_gpu(quick: bool, log) -> Section:
    del quick, log
    import jax

    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    if not gpus:
        kinds = sorted({d.platform for d in jax.devices()})
        body = (f"No GPU was lent to this run (JAX sees only: {', '.join(kinds)}), so there are no GPU kernel "
                "times or roofline fractions here. This section is filled when the suite runs on a machine with "
                "an H100 or H200.")
        return Section("GPU (H100 / H200)", body, [])
    body = (f"GPU present ({gpus[0].device_kind}), but the GPU kernel timing of this suite has not been written "
            "yet; no numbers are given.")
    return Section("GPU (H100 / H200)", body, [])


# Component benchmarks: (module, arguments under --quick, arguments otherwise, whether all of it compiles for
# a TPU topology: without libtpu, as after the README's `.[test]` install, it is skipped with the reason;
# moe_dispatch skips its TPU half itself). The compile-heavy ones keep
# their quick settings in the full suite too (the whole suite stays within ~15 min on a 2-core host); their
# full tables are in docs/*.md with the commands that produced them.
COMPONENTS = [
    ("forward_throughput", ["--quick", "--markdown"], ["--markdown"], False),
    ("decode", ["--quick"], [], False),
    ("train_step", ["--quick", "--markdown", "--presets", "tiny"], ["--quick", "--markdown"], False),
    ("sparse_attention", ["--quick", "--kinds", "swa", "--lengths", "4096"], ["--quick"], True),
    ("lightning_indexer", ["--quick"], ["--quick"], True),
    ("moe_dispatch", ["--quick"], ["--quick"], False),
    ("numerics", ["--quick"], [], False),
    ("convert", ["--layers", "1", "--experts", "4", "--markdown"], ["--layers", "1", "--experts", "4", "--markdown"],
     False),
]


def _as_markdown(text: str) -> str:
    """A component's printed output as Markdown: table lines kept, other lines as escaped text lines."""
    out, in_table = [], False
    for line in text.strip().splitlines():
        is_row = line.startswith("|")
        if is_row and not in_table and out and out[-1] != "":
            out.append("")
        if not is_row and in_table:
            out.append("")
        in_table = is_row
        out.append(line if is_row else (re.sub(r"^([#>*+-])", r"\\\1", line) + "  " if line.strip() else ""))
    return "\n".join(out)


def section_components(quick: bool, log, names=None) -> Section:
    import importlib

    from benchmarks.dryrun import NO_LIBTPU, libtpu_available

    parts, numbers = [], []
    for module, quick_args, full_args, tpu_only in COMPONENTS:
        if names and module not in names:
            continue
        args = quick_args if quick else full_args
        if tpu_only and not libtpu_available():
            log(f"[components] {module} skipped: {NO_LIBTPU}")
            parts += [f"### `{module}`", "", f"Skipped: {NO_LIBTPU}.", ""]
            continue
        mod = importlib.import_module(f"benchmarks.{module}")
        buf = io.StringIO()
        log(f"[components] {module} {' '.join(args)}")
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(buf):
            status = mod.main(args)
        seconds = time.perf_counter() - t0
        text = buf.getvalue()
        cli = "".join(f" {a}" for a in args)
        parts += [f"### `{module}`", "", f"`JAX_PLATFORMS=cpu python -m benchmarks.{module}{cli}`"
                  f" ({seconds:.0f} s{'' if not status else f', exit status {status}'})", "", _as_markdown(text), ""]
        numbers += [x for line in text.splitlines() if line.startswith("|") for x in _numbers(line)]
    body = ("Each component benchmark's own output (its docstring explains the columns; docs/*.md read "
            "them), run in-process by the suite" + (" with its quick settings" if quick else "") + ".\n\n"
            + "\n".join(parts))
    return Section("Component benchmarks", body, numbers)


SECTIONS: dict[str, Callable] = {
    "peer": section_peer,
    "scaling": section_scaling,
    "dryrun": section_dryrun,
    "gpu": section_gpu,
    "components": section_components,
}


# --------------------------------------------------------------------------------------------------
# Writing


def render(name: str, section: Section, command: str, header: dict) -> str:
    return "\n".join([
        MARK.format(name=name, edge="begin"),
        f"## {section.title}",
        "",
        f"Generated by the suite on {header['date']} (section `{name}`, {section.seconds:.0f} s). Command: "
        f"`{command}`",
        "",
        f"- Machine: {header['machine']}",
        f"- Versions: {header['versions']}",
        f"- Code: {header['code']}",
        "",
        section.body,
        MARK.format(name=name, edge="end"),
    ])


def update_file(path: str, blocks: dict[str, str]) -> None:
    """Replace each section's marked span in the file, or append it when the file has none."""
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    for name, block in blocks.items():
        begin, end = MARK.format(name=name, edge="begin"), MARK.format(name=name, edge="end")
        i, j = text.find(begin), text.find(end)
        if (i < 0) != (j < 0) or (i >= 0 and j < i):
            raise ValueError(f"{path}: unbalanced markers for section {name!r} ({begin} / {end})")
        if i >= 0:
            text = text[:i] + block + text[j + len(end):]
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")


def run_suite(names, quick: bool, log, dryrun: bool = False, failed: list | None = None) -> dict[str, Section]:
    """The sections that ran; the names of those that raised are appended to `failed`."""
    results = {}
    failed = [] if failed is None else failed
    for name in names:
        t0 = time.perf_counter()
        log(f"== {name} ==")
        fn = SECTIONS[name]
        try:
            section = fn(quick, log, run=dryrun) if name == "dryrun" else fn(quick, log)
        except Exception as e:  # noqa: BLE001 - one failing section must not lose the others' results
            log(f"[{name}] FAILED: {type(e).__name__}: {e}; its section is not written")
            failed.append(name)
            continue
        section.seconds = time.perf_counter() - t0
        bad = [x for x in section.numbers if not math.isfinite(x)]
        if bad:
            log(f"[{name}] {len(bad)} non-finite number(s) in the results")
        results[name] = section
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smallest settings of every benchmark (a smoke test)")
    p.add_argument("--only", default=None, help=f"comma-separated sections of: {', '.join(SECTIONS)}")
    p.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"), help="Markdown file to update")
    p.add_argument("--no-write", action="store_true", help="print the sections instead of writing them")
    p.add_argument("--dryrun", action="store_true", help="also compile the dry runs of DRYRUN_PLAN (hours)")
    args = p.parse_args(argv)
    names = list(SECTIONS) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    warnings.filterwarnings("ignore")
    from benchmarks import quiet_transformers

    quiet_transformers()
    from benchmarks.peer_compare import single_threaded

    single_threaded()  # before jax starts: XLA:CPU and torch on one thread each (see peer_compare)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    command = "JAX_PLATFORMS=cpu python -m benchmarks" + "".join(f" {shlex.quote(a)}" for a in (argv if argv is not None
                                                                               else sys.argv[1:]))
    header = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  machine=machine(), versions=versions(), code=code_version())
    t0 = time.perf_counter()
    failed: list[str] = []
    if args.no_write:  # nothing tracked is touched: the plot goes to a temporary directory
        global PLOT
        PLOT = os.path.join(tempfile.mkdtemp(prefix="v4jax-bench-"), "scaling.png")
    results = run_suite(names, args.quick, log, args.dryrun, failed)
    blocks = {name: render(name, s, command, header) for name, s in results.items()}
    if args.no_write:
        print("\n\n".join(blocks.values()))
    else:
        update_file(args.out, blocks)
        log(f"wrote {len(blocks)} section(s) to {args.out}")
    log(f"suite wall time {time.perf_counter() - t0:.0f} s")
    bad = sum(1 for s in results.values() for x in s.numbers if not math.isfinite(x))
    if failed:
        log(f"failed section(s): {', '.join(failed)}")
    return 1 if bad or failed else 0
