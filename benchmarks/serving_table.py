"""Decode on TPU pods, on paper: the Generator's own decode step compiled for v5p, v6e and tpu7x, for
v4-flash and v4-pro, at 8K / 128K / 1M context and batch 1 / 16 / 128 (issue 18).

Each cell is one `python -m benchmarks.dryrun --mode decode` (the step `Generator` runs: cache donated,
sampling on device) ahead-of-time compiled for the topology on this host. A cell is compiled with the
`serve_tp` rules on the mesh `tensor=devices` at batch 1 (every matrix split over every device, the
experts whole with the decode-shaped gathered path), the `fsdp_ep` rules (batch and experts over the
expert axis) when the batch splits over every device, else `long_context` on the mesh
`expert=batch, context=devices/batch` (one sequence per expert-axis position, the cache's compressed
entries over `context`); if the first does not fit, `fsdp_ep` or `long_context`. A refusal is kept
beside the cell (`..._b16_refused-fsdp_ep.json`). Batch 1 is also compiled the expert-parallel way
(`..._b1_fsdp_ep.json`: `fsdp_ep`, or `long_context` where that does not fit) and the table shows the
layout with the shorter roofline step, naming the other's: `serve_tp` splits each matrix into slivers
that some chips' compiles handle badly (v4-flash on 128 TPU7x devices: 32 columns each).

Usage:
  python -m benchmarks.serving_table            # the table from benchmarks/results/generator/
  python -m benchmarks.serving_table --run      # first compile the cells whose JSON is missing
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

from sharding.chips import chip_for

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "generator")
TOPOLOGIES = {  # the decode topology per (model, generation): the smallest slice that holds the bf16 weights
    ("v4-flash", "v5p"): "v5p:4x4x4", ("v4-pro", "v5p"): "v5p:4x4x4",
    ("v4-flash", "v6e"): "v6e:8x8", ("v4-pro", "v6e"): "v6e:16x16",
    ("v4-flash", "tpu7x"): "tpu7x:4x4x4", ("v4-pro", "tpu7x"): "tpu7x:4x4x4",
}
CONTEXTS = {"8k": 8192, "128k": 131072, "1m": 1048576}
BATCHES = (1, 16, 128)
RULES = ("serve_tp", "fsdp_ep", "long_context")


def cell_path(model: str, topology: str, ctx: str, batch: int, suffix: str = "") -> str:
    return os.path.join(RESULTS, f"{model}_decode_{topology.replace(':', '-')}_{ctx}_b{batch}{suffix}.json")


def plan() -> list[tuple[str, str, str, int]]:
    return [(m, TOPOLOGIES[m, g], ctx, b) for g in ("v5p", "v6e", "tpu7x") for m in ("v4-flash", "v4-pro")
            for ctx in CONTEXTS for b in BATCHES]


def _compile(model: str, topology: str, ctx: str, batch: int, rules: str, out: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.dryrun", "--config", model, "--topology", topology, "--mode", "decode",
           "--seq", str(CONTEXTS[ctx]), "--batch", str(batch), "--rules", rules, "--json", out]
    if rules == "long_context" and 1 < batch < _devices(topology):
        cmd += ["--mesh", f"expert={batch},context={_devices(topology) // batch}"]
    if rules == "serve_tp":
        cmd += ["--mesh", f"tensor={_devices(topology)}"]
    subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    with open(out) as f:
        return json.load(f)


def rules_for(topology: str, batch: int) -> tuple[str, str]:
    """(rules to try first, rules if they do not fit). fsdp_ep splits the batch over all devices (the
    expert axis): a smaller batch (> 1) leaves the non-expert work and the cache replicated, so it goes
    to long_context on a mesh `expert=batch, context=devices/batch`: one sequence per expert-axis
    position, its cache's compressed entries split over `context`. Batch 1 goes to serve_tp over all
    devices: one token cannot split, so the model's matrices do (architecture.md §5.5)."""
    if batch == 1:
        return ("serve_tp", "fsdp_ep")
    return ("long_context", "fsdp_ep") if 1 < batch < _devices(topology) else ("fsdp_ep", "long_context")


def _chips(topology: str) -> int:
    return math.prod(int(n) for n in topology.split(":")[1].split("x"))


def _devices(topology: str) -> int:
    return _chips(topology) * chip_for(topology).devices_per_chip


def run_order() -> list[tuple[str, str, str, int]]:
    """The plan with every generation and model first at batch 16 / 8K, then the other cells (so an
    interrupted run still covers every pod)."""
    rank = {(c, b): i for i, (c, b) in enumerate((c, b) for b in (16, 128, 1) for c in ("8k", "1m", "128k"))}
    return sorted(plan(), key=lambda cell: rank[cell[2], cell[3]])


ALTERNATE = "_fsdp_ep"  # batch 1's second layout: expert parallel, as before serve_tp existed


def layouts(topology: str, batch: int) -> list[tuple[str, tuple[str, str]]]:
    """(file suffix, (rules to try first, rules if they do not fit)) of each layout a cell compiles."""
    return [("", rules_for(topology, batch))] + ([(ALTERNATE, ("fsdp_ep", "long_context"))] if batch == 1 else [])


def run_missing(log=print) -> None:
    for model, topology, ctx, batch in run_order():
        for suffix, (first, second) in layouts(topology, batch):
            path = cell_path(model, topology, ctx, batch, suffix)
            if os.path.exists(path):
                continue
            log(f"compiling {model} {topology} {ctx} batch {batch} ({first})")
            try:
                r = _compile(model, topology, ctx, batch, first, path)
                if r.get("fits") is False:
                    os.replace(path, cell_path(model, topology, ctx, batch, f"{suffix}_refused-{first}"))
                    _compile(model, topology, ctx, batch, second, path)
            except (OSError, json.JSONDecodeError, subprocess.TimeoutExpired) as e:
                log(f"  no result: {e}")


def _fits(r: dict) -> bool:
    return r.get("fits", True) and "peak_bytes" in r


def load() -> dict[tuple[str, str, str, int], dict]:
    """The recorded cells: of a cell's layouts that fit, the one with the shortest roofline step (the
    others' steps under `"other_layouts"`); a refusal where none fits."""
    cells = {}
    for model, topology, ctx, batch in plan():
        found = []
        for suffix, _ in layouts(topology, batch):
            path = cell_path(model, topology, ctx, batch, suffix)
            if os.path.exists(path):
                with open(path) as f:
                    found.append(json.load(f))
        if found:
            fit = sorted((r for r in found if _fits(r)), key=lambda r: r["step_time_s"])
            best = fit[0] if fit else found[0]
            cells[model, topology, ctx, batch] = {**best, "other_layouts": [
                (r["rules"], r["mesh"], r["step_time_s"]) for r in fit[1:]]}
    return cells


def row(key, r: dict) -> str:
    model, topology, ctx, batch = key
    if not _fits(r):
        why = r.get("reason", "").split("reports ")[-1].split(" Biggest")[0]
        tried = [f for f in RULES if os.path.exists(cell_path(*key, f"_refused-{f}"))] + [r.get("rules")]
        return f"| {model} | {topology} | {ctx} | {batch} | {' then '.join(tried)} | does not fit: {why} | | | | |"
    chips = _chips(topology)
    per_dev_model = r["model_flops"] / r["devices"]
    per_token_bytes = r["hbm_traffic_per_device"] * r["devices"] / r["tokens"]
    tok_s_chip = r["tokens"] / r["step_time_s"] / chips
    # the loop-by-loop reading (benchmarks.hlo_costs, matmul + vector FLOPs), where the cell has it
    loops = ("" if r.get("loop_vector_flops_per_device") is None else
             f"; by loops {(r['loop_flops_per_device'] + r['loop_vector_flops_per_device']) / per_dev_model:.2f}x")
    others = "".join(f" (vs {rules} `{mesh}`: {step * 1e3:.1f} ms)" for rules, mesh, step in r.get("other_layouts", ()))
    return (f"| {model} | {topology} | {ctx} | {batch} | {r['rules']} `{r['mesh']}`{others} | "
            f"{r['peak_bytes'] / 2**30:.1f} GiB | {r['flops_per_device']:.2e} / {per_dev_model:.2e} "
            f"({r['flops_per_device'] / per_dev_model:.1f}x{loops}) | {per_token_bytes / 2**30:.1f} GiB | "
            f"{r['step_time_s'] * 1e3:.1f} ms ({r['bound']}) | {tok_s_chip:.2f} |")


def table(cells: dict) -> str:
    head = ("| model | topology | context | batch | rules, mesh | per-device memory | compiled / analytic FLOPs per device "
            "| HBM bytes per token | roofline step | tokens/s per chip |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [row(key, cells[key]) if key in cells else
             f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | not compiled | | | | | |" for key in plan()]
    return "\n".join([head, *lines])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serving_table", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="store_true", help="compile the cells whose JSON is missing first")
    a = p.parse_args(argv)
    if a.run:
        run_missing(lambda m: print(m, file=sys.stderr, flush=True))
    print(table(load()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
