"""v4jax vs MaxText: one CPU training step of the same small DeepSeek-V4 model, timed in one run.

Side A (this process): v4jax's step exactly as `benchmarks.train_step` times it (`train_step.bench`:
preset `tiny` with vocab 264, fp32, Muon + AdamW, indexer KL, MTP, balance loss, bias update), then
(unless `--no-matched`) the same step without the two mechanisms MaxText's side lacks: the MTP module
and YaRN (`MATCHED`). That second row is the like-for-like one.

Side B (a subprocess with a separate interpreter): MaxText's own trainer
(`python -m maxtext.trainers.pre_train.train <maxtext>/configs/base.yml key=value ...`) on MaxText's
DeepSeek-V4 decoder block (`decoder_block=deepseek4`, starting from its `deepseek4-tiny` model file)
with every size of v4jax's `tiny` that MaxText lets us set: dim, layers, heads, head and RoPE widths,
query / output LoRA ranks, output groups, window, per-layer compression ratios, hash-routed layers,
indexer heads / width / top-k, experts, top-k, expert width, route scale, mHC streams, vocab, batch,
seq; fp32, ragged-dot experts, Muon, sparse indexer KL, packed synthetic documents.
Nothing is installed into this project's environment: MaxText lives in its own virtual environment
(docs/maxtext.md has the setup). What still differs between the two sides is in `DIFFERENCES` and
printed under the table.

Timing. v4jax: `--warmup` steps, then `--steps` steps each blocked on its result. MaxText: its trainer
logs "completed step: N, seconds: S" for each step; S is MaxText's own step time, the wall time from
one step's dispatch to the next's. Dispatch is asynchronous and the trainer fetches the previous
step's metrics every step, so in steady state S is one step's compute plus its synthetic-batch fetch
and metric logging, but steps 0 and 1 are dispatched ahead and step 2 absorbs their backlog (it logs
3-5x a normal step). So MaxText runs `max(warmup, 3) + steps` steps and drops the first
`max(warmup, 3)`; v4jax drops its first `--warmup`. Median and min of the rest are reported.
tokens/s = batch * seq / median step. The ratio column is each row's median over MaxText's median
(> 1: that row is slower than MaxText). The rows run one after the other, never at the same time.
The "compile / start-up" column is not like for like: v4jax's is the `jit` lower + compile alone,
MaxText's is launch to step 0 logged (interpreter start, imports, init, compile, step 0), since
MaxText compiles inside its trainer.

If `--maxtext-python` is missing or cannot import MaxText, the script says so in one line and exits 2;
if the MaxText run fails or times out, it prints its error and the log path and exits 3. It never skips
the MaxText side silently.

Usage (repo root; the MaxText venv set up as in docs/maxtext.md):

  JAX_PLATFORMS=cpu python -m benchmarks.maxtext_side_by_side --maxtext-python /tmp/maxtext-venv/bin/python
  JAX_PLATFORMS=cpu python -m benchmarks.maxtext_side_by_side --maxtext-python /tmp/maxtext-venv/bin/python \\
      --steps 10 --warmup 2 --batch 8 --seq 64 --markdown [--no-matched] [--single-thread]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

# What the mapped MaxText model does not share with v4jax's `tiny` (checked against maxtext 0.2.5).
DIFFERENCES = (
    "MTP: v4jax tiny trains its depth-1 MTP module (weight 0.3); MaxText's deepseek4 block refuses "
    "mtp_num_layers > 0, so its step has none (the 'no MTP' v4jax row drops it too)",
    "RoPE: v4jax tiny runs YaRN (factor 4 over 32 original positions); MaxText deepseek4 runs plain RoPE "
    "(rope_type=default, as in its own deepseek4 configs; the 'no YaRN' v4jax row sets rope_factor=1)",
    "remat: v4jax recomputes nothing; MaxText wraps every layer in jax.checkpoint whatever the policy, "
    "here minimal_with_context (saves the q / kv / output projections and expert matmuls, recomputes "
    "norms, compressors, indexer, attention core and mHC in the backward pass)",
    "optimizer: both Muon for matrices (the same 10-step hybrid Newton-Schulz schedule, MaxText picks it "
    "for deepseek4) + AdamW for the rest; which axes count as one matrix, the update scaling and the "
    "hyper-parameters (lr, decay, clipping) are each side's own",
    "losses: v4jax adds its sequence-wise balance loss (alpha 1e-4, learned layers); MaxText adds its "
    "load_balance_loss (weight 1e-4); both update the selection bias (speed 1e-3)",
    "data: v4jax packs documents ending in eos every ~32 tokens; MaxText's synthetic batch has "
    "seq/32 packed segments per row at random boundaries",
    "layers: v4jax scans identical blocks; MaxText is run unscanned (scan_layers=false), because its "
    "scanned deepseek4 blocks hard-code the ratio pair (128, 4) and tiny's HCA ratio is 16",
)

# v4jax `tiny` (v4jax/config.py `_tiny`, vocab 264 as in benchmarks.train_step) in MaxText's keys.
# Start from MaxText's own DeepSeek-V4 model file and override every size.
MAXTEXT_MODEL = {
    "model_name": "deepseek4-tiny",
    "override_model_config": "true",
    "base_emb_dim": 128,               # dim
    "base_num_decoder_layers": 4,      # n_layers
    "base_num_query_heads": 4,         # n_heads
    "base_num_kv_heads": 1,            # V4: one shared KV head
    "head_dim": 64,                    # head_dim
    "qk_rope_head_dim": 16,            # rope_head_dim
    "q_lora_rank": 64,                 # q_lora_rank
    "o_groups": 2,                     # o_groups
    "o_lora_rank": 32,                 # o_lora_rank
    "sliding_window_size": 8,          # window_size
    "compress_ratios": "[0,4,16,4]",   # layer_types (SWA, CSA, HCA, CSA) with csa_ratio 4, hca_ratio 16
    "first_num_hash_layers": 1,        # router_types: one hash layer first
    "indexer_n_heads": 4,              # index_n_heads
    "indexer_head_dim": 32,            # index_head_dim
    "indexer_topk": 4,                 # index_topk
    "num_experts": 8,                  # n_routed_experts
    "num_experts_per_tok": 2,          # n_activated_experts
    "shared_experts": 1,               # n_shared_experts
    "base_moe_mlp_dim": 64,            # moe_inter_dim (routed experts)
    "base_mlp_dim": 64,                # moe_inter_dim (shared expert)
    "routed_scaling_factor": 1.5,      # route_scale
    "norm_topk_prob": "true",          # V4 renormalises the top-k weights
    "routed_score_func": "sqrtsoftplus",
    "mlp_activations_limit": 10,       # swiglu_limit
    "mhc_expansion_rate": 4,           # hc_mult
    "vocab_size": 264,                 # train_step's tiny vocab
    "rope_max_timescale": 10000,       # rope_theta
    "compressed_rope_max_timescale": 160000,  # compress_rope_theta
    "max_position_embeddings": 128,    # max_seq_len
}

# How the step runs: fp32, one CPU device, unscanned layers, ragged-dot experts (jax.lax.ragged_dot, as
# v4jax's default moe_impl), Muon, the sparse indexer-KL stage (indexer input detached, as v4jax's default).
MAXTEXT_RUN = {
    "hardware": "cpu",
    "skip_jax_distributed_system": "true",  # one local process (hardware=cpu alone expects an XPK CPU cluster)
    "dtype": "float32",
    "weight_dtype": "float32",
    "matmul_precision": "highest",
    "attention": "dot_product",
    "scan_layers": "false",
    # MaxText wraps each unscanned layer in jax.checkpoint whatever the policy ("none" = policy None =
    # recompute everything); this, its least recomputing named policy, saves the projections and expert
    # matmuls. v4jax recomputes nothing, so MaxText's backward does some extra forward work.
    "remat_policy": "minimal_with_context",
    "sparse_matmul": "true",
    "megablox": "false",
    "capacity_factor": -1,
    "opt_type": "muon",
    "use_indexer": "true",
    "indexer_loss_scaling_factor": 1.0,
    "indexer_sparse_training": "true",
    "load_balance_loss_weight": 1e-4,
    "routed_bias": "true",
    "routed_bias_update_rate": 1e-3,
    "dataset_type": "synthetic",
    "packing": "true",
    "enable_checkpointing": "false",
    "enable_goodput_recording": "false",
    "monitor_goodput": "false",
    "log_period": 1000000,
    "jax_cache_dir": "",  # no persistent compilation cache (~/jax_cache by default): every run compiles
    "ici_fsdp_parallelism": 1,
}

MAXTEXT_SETTLE = 3  # MaxText steps always dropped: 0 and 1 are dispatched ahead, 2 waits for both
STEP_LINE = re.compile(r"completed step: (\d+), seconds: ([0-9.]+)")
PARAMS_LINE = re.compile(r"number parameters: ([0-9.]+) billion")


def fail(code: int, message: str):
    print(message, file=sys.stderr)
    sys.exit(code)


def maxtext_probe(python: str | None) -> dict:
    """jax / maxtext versions and MaxText's configs directory from the other interpreter; exits 2 if unusable."""
    if not python:
        fail(2, "MaxText side not run: no --maxtext-python given (see docs/maxtext.md for the venv setup)")
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        fail(2, f"MaxText side not run: --maxtext-python {python} is not an executable file")
    code = ("import os, importlib.metadata as m, jax, maxtext; "
            "print(jax.__version__, m.version('maxtext'), os.path.join(os.path.dirname(maxtext.__file__), 'configs'))")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300,
                             env=_maxtext_env())
    except (OSError, subprocess.TimeoutExpired) as e:
        fail(2, f"MaxText side not run: {python} could not be started ({e})")
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        fail(2, f"MaxText side not run: {python} cannot import jax and maxtext: {last}")
    jax_version, maxtext_version, configs = out.stdout.split()
    return {"jax": jax_version, "maxtext": maxtext_version, "configs": configs}


def _maxtext_env() -> dict:
    """This environment minus the project's paths, on CPU, with MaxText's Google Cloud parts stubbed."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(JAX_PLATFORMS="cpu", DECOUPLE_GCLOUD="TRUE")
    # With XLA_FLAGS empty MaxText sets its own, which dump every train-step HLO to /tmp/xla_dump (~120 MB,
    # compile time); a non-empty XLA_FLAGS (here the default value of one flag) keeps it from doing so.
    if not env.get("XLA_FLAGS", "").strip():
        env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=true"
    return env


def maxtext_args(configs: str, batch: int, seq: int, steps: int, out_dir: str, document_mask: bool) -> list[str]:
    values = {**MAXTEXT_MODEL, **MAXTEXT_RUN, "per_device_batch_size": batch, "max_target_length": seq,
              "steps": steps, "base_output_directory": out_dir, "run_name": "side_by_side",
              "packing": str(document_mask).lower(), "max_segments_per_seq": max(1, seq // 32)}
    return [os.path.join(configs, "base.yml")] + [f"{k}={v}" for k, v in values.items()]


def run_maxtext(python: str, probe: dict, batch: int, seq: int, steps: int, warmup: int, timeout: int,
                log_path: str, document_mask: bool) -> dict:
    """MaxText's trainer for max(warmup, 3) + steps steps in a subprocess; its step seconds parsed from its log."""
    work = tempfile.mkdtemp(prefix="maxtext_side_by_side_")
    skip = max(warmup, MAXTEXT_SETTLE)
    cmd = [python, "-m", "maxtext.trainers.pre_train.train",
           *maxtext_args(probe["configs"], batch, seq, skip + steps, os.path.join(work, "out"), document_mask)]
    busy0, children0 = _busy_s(), _children_cpu_s()
    t0 = time.time()
    first_step_s = None  # launch -> step 0 logged: interpreter start, init, compile, one step
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=work,
                                env=_maxtext_env())
        watchdog = threading.Timer(timeout, proc.kill)
        watchdog.start()
        for line in proc.stdout:  # streamed, so the time step 0 appears is known
            log.write(line)
            if first_step_s is None and STEP_LINE.search(line):
                first_step_s = time.time() - t0
        rc = proc.wait()
        timed_out = not watchdog.is_alive()
        watchdog.cancel()
    wall = time.time() - t0
    others = max(0.0, (_busy_s() - busy0) - (_children_cpu_s() - children0)) / (wall * os.cpu_count())
    shutil.rmtree(work, ignore_errors=True)  # MaxText's output directory; the log is kept
    if timed_out:
        fail(3, f"MaxText side failed: no result within {timeout} s; log: {log_path}")
    text = open(log_path).read()
    times = {int(n): float(s) for n, s in STEP_LINE.findall(text)}
    if rc != 0 or len(times) < skip + steps:
        lines = [l.strip() for l in text.splitlines() if l.strip()] or ["(empty log)"]
        at = max((i for i, l in enumerate(lines) if re.search(r"Error|Exception", l)), default=len(lines) - 1)
        last = " | ".join(lines[at:at + 3])  # the exception line and what follows (pydantic puts the field there)
        fail(3, f"MaxText side failed (exit {rc}, {len(times)} steps logged): {last[:400]}; log: {log_path}")
    timed = [times[i] for i in sorted(times)[skip:skip + steps]]
    med = statistics.median(timed)
    params = PARAMS_LINE.search(text)
    return {"side": f"MaxText {probe['maxtext']}", "jax": probe["jax"],
            "params_m": float(params.group(1)) * 1e3 if params else None,  # logged as 0.00x billion: coarse
            "compile_s": first_step_s,
            "step_ms": med * 1e3, "min_ms": min(timed) * 1e3, "tok_s": batch * seq / med, "others": others,
            "loss": _last_loss(text)}


def _busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (/proc/stat minus idle and iowait)."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _last_loss(text: str) -> float | None:
    found = re.findall(r"completed step: \d+,.*?\bloss: ([0-9.]+)", text)
    return float(found[-1]) if found else None


# v4jax settings that remove what MaxText's side cannot have (the "matched" row): no MTP module, no YaRN.
MATCHED = ["model.n_mtp_layers=0", "model.rope_factor=1.0"]


def run_v4jax(batch: int, seq: int, steps: int, warmup: int, document_mask: bool, extra: list[str],
              label: str) -> dict:
    """`train_step.bench` on `tiny` with the `extra` KEY=VALUE train settings."""
    import jax

    from benchmarks import train_step  # imports jax: after any XLA_FLAGS set by --single-thread

    r = train_step.bench("tiny", batch, seq, steps, warmup, document_mask, tuple(extra))
    return {"side": label, "jax": jax.__version__, "params_m": r["params_m"], "compile_s": r["compile_s"],
            "step_ms": r["step_ms"], "min_ms": r["min_ms"], "tok_s": r["tok_s"],
            "others": r["others"], "loss": r["loss"]}


def _params(r: dict) -> str:
    if r["params_m"] is None:
        return "?"
    if r["side"].startswith("v4jax"):
        return f"{r['params_m']:.2f}"
    return f"~{r['params_m']:.0f} (logged as {r['params_m'] / 1e3:.3f} B)"


def table(rows: list[dict], batch: int, seq: int, markdown: bool) -> str:
    head = ["side", "jax", "params (M)", "batch x seq", "compile / start-up (s)", "step (ms, median)",
            "step (ms, min)", "tokens/s", "step time / MaxText's", "other procs' CPU"]
    base = rows[-1]["step_ms"]
    lines = [[r["side"], r["jax"], _params(r), f"{batch} x {seq}",
              "?" if r["compile_s"] is None else f"{r['compile_s']:.0f}",
              f"{r['step_ms']:.0f}", f"{r['min_ms']:.0f}", f"{r['tok_s']:,.0f}",
              f"{r['step_ms'] / base:.2f}", f"{100 * r['others']:.0f}%"] for r in rows]
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(l) + " |" for l in lines])
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(l, widths)) for l in [head] + lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--maxtext-python", help="interpreter of the MaxText venv, e.g. /tmp/maxtext-venv/bin/python")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=2,
                    help="untimed steps after compiling (MaxText: at least 3, see the timing notes)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--document-mask", choices=("on", "off"), default="on",
                    help="packed documents with sample-level masking on both sides (MaxText: packing)")
    ap.add_argument("--single-thread", action="store_true",
                    help="XLA:CPU without its Eigen thread pool on both sides (steadier on a busy machine)")
    ap.add_argument("--maxtext-timeout", type=int, default=3600, help="seconds before the MaxText run is abandoned")
    ap.add_argument("--maxtext-log", default=os.path.join(tempfile.gettempdir(), "maxtext_side_by_side.log"))
    ap.add_argument("--no-matched", action="store_true",
                    help="skip the v4jax row without MTP and YaRN (the two mechanisms MaxText's side lacks)")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    if args.warmup < 1:
        ap.error("--warmup must be at least 1")
    if args.single_thread:
        if "jax" in sys.modules:
            fail(2, "--single-thread must be set before jax is imported")
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1").strip()
    mask = args.document_mask == "on"

    probe = maxtext_probe(args.maxtext_python)  # before v4jax's compile: fail fast
    rows = [run_v4jax(args.batch, args.seq, args.steps, args.warmup, mask, [], "v4jax tiny")]
    if not args.no_matched:
        rows.append(run_v4jax(args.batch, args.seq, args.steps, args.warmup, mask, MATCHED,
                              "v4jax tiny, no MTP, no YaRN"))
    theirs = run_maxtext(args.maxtext_python, probe, args.batch, args.seq, args.steps, args.warmup,
                         args.maxtext_timeout, args.maxtext_log, mask)
    rows.append(theirs)
    ours = rows[0]

    print(table(rows, args.batch, args.seq, args.markdown))
    print(f"{os.cpu_count()} CPUs, fp32, document mask {args.document_mask}"
          f"{', single-threaded XLA' if args.single_thread else ''}; MaxText log: {args.maxtext_log}")
    print("other procs' CPU: share of all CPUs used by other processes, v4jax over its timed steps, MaxText "
          "over its whole run (start-up and compile included)")
    their_loss = "?" if theirs["loss"] is None else f"{theirs['loss']:.3f}"
    print(f"last loss: v4jax {ours['loss']:.3f}, MaxText {their_loss} (different data, init and losses: "
          "not comparable)")
    print("step time / MaxText's: > 1 means that row's step is slower than MaxText's")
    print("compile / start-up: v4jax = jit compile only; MaxText = launch to step 0 logged (imports, init, "
          "compile, one step). MaxText params: its log's 'number parameters', printed to 0.001 billion.")
    print("Differences that remain:")
    for d in DIFFERENCES:
        print(f"  - {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
