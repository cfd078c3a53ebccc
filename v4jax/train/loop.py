"""The training loop behind `train.py`: the run directory, the mesh, signals, resuming, and the loop that
feeds batches to the compiled step (v4jax.train.step), checkpoints (v4jax.train.checkpointer) and logs
(v4jax.train.metrics). `max_bad_steps` non-finite steps in a row stop the run."""

from __future__ import annotations

import contextvars
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from typing import Any, Callable

import jax
import numpy as np

from sharding.context import use_mesh_rules
from sharding.mesh import describe, make_mesh
from sharding.partition import data_sharding, host_local_to_global
from sharding.rules import get_rules, parse_overrides
from v4jax.config_v41 import V41Config
from v4jax.train.data import (DataError, EngramRows, GrainBatches, PackedBatches, engram_pad, engram_token_map,
                              make_tokenizer, pack_tokens, resolve_files)
from v4jax.train.checkpointer import Checkpointer, _sync
from v4jax.train.config import BATCH_AXES, TrainConfig, check_settings, config_dict
from v4jax.train.metrics import Progress, TensorBoardWriter, json_line, last_loss, peak_flops, plot_loss
from v4jax.train.step import StepProgram, batch_layout, hyperparams, make_setup, step_program

# --------------------------------------------------------------------------------------------------
# The run

class TrainingStopped(RuntimeError):
    """Too many consecutive non-finite steps."""


class Interrupted(Exception):
    """SIGTERM / SIGINT before the training loop (data, restore, compile): nothing new to save.
    `compiling`: the step's compile is still running in a worker thread (the caller should leave with
    os._exit rather than wait for it)."""

    def __init__(self, signum: int, compiling: bool = False):
        super().__init__(f"interrupted by {signal.Signals(signum).name} before the first step; nothing new to save")
        self.signum, self.compiling = signum, compiling


def signal_exit_code(signum: int) -> int:
    """SIGTERM (preemption) handled = 0, the run resumes later; SIGINT = 130, the shells' Ctrl-C status."""
    return 0 if signum == signal.SIGTERM else 128 + signum


class StopSignals:
    """SIGTERM and SIGINT handling for one run. Before the loop the first signal raises Interrupted
    (nothing to save). In the loop it only sets `signum`: the loop saves a checkpoint after the current
    step and stops. A second SIGINT aborts at once without saving (exit 130). Installed only from the
    main thread (signal handlers cannot be set elsewhere); `close` puts the old handlers back."""

    def __init__(self):
        self.signum: int | None = None
        self.in_loop = False
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            sys.stderr.write("\nsecond interrupt: aborting without saving\n")
            sys.stderr.flush()
            os._exit(130)
        self.signum = signum
        if not self.in_loop:
            raise Interrupted(signum)

    def close(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def compile_interruptibly(lower: Callable[[], Any]):
    """lower().compile() in a worker thread while the main thread waits in short slices, so that a
    signal during a minutes-long compile is handled at once (Python runs signal handlers only in
    the main thread, between bytecodes; a compile in the main thread would defer them to its end)."""
    box: dict[str, Any] = {}
    ctx = contextvars.copy_context()  # the mesh/rules context (a ContextVar) for the worker thread

    def work():
        try:
            box["compiled"] = ctx.run(lambda: lower().compile())
        except BaseException as e:  # re-raised in the main thread
            box["error"] = e

    t = threading.Thread(target=work, name="compile", daemon=True)
    t.start()
    try:
        while t.is_alive():
            t.join(0.2)
    except Interrupted as e:
        e.compiling = True
        raise
    if "error" in box:
        raise box["error"]
    return box["compiled"]


def prepare_run_dir(tc: TrainConfig) -> None:
    """Refuse a run_dir that cannot be written, or a non-empty one that is not a train.py run (no
    config.json of ours) unless overwrite=true; create it otherwise. Raises ValueError naming it."""
    d = tc.run_dir
    if os.path.exists(d) and not os.path.isdir(d):
        raise ValueError(f"run_dir {d!r} is a file, not a directory")
    if os.path.isdir(d) and os.listdir(d) and not tc.overwrite:
        ours = False
        try:
            with open(os.path.join(d, "config.json")) as f:
                ours = "train" in json.load(f)
        except (OSError, ValueError):
            pass
        if not ours:
            raise ValueError(f"run_dir {d!r} is not empty and is not a train.py run (no config.json of ours); "
                             f"pick another run_dir or pass --overwrite (overwrite=true) to train in it anyway")
    try:
        os.makedirs(d, exist_ok=True)
        probe = os.path.join(d, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"run_dir {d!r} is not writable: {e.strerror or e}") from None


def move_aside(path: str, say: Callable[[str], None]) -> None:
    """Rename path to path.old-N (the first free N) and say so; for fresh=true."""
    if not os.path.exists(path):
        return
    n = 1
    while os.path.exists(f"{path}.old-{n}"):
        n += 1
    os.replace(path, f"{path}.old-{n}")
    say(f"fresh=true: moved {path} aside to {path}.old-{n} (nothing deleted)")


def build_mesh(tc: TrainConfig):
    devices = None
    if tc.num_devices:
        if jax.process_count() > 1 or tc.num_devices > jax.device_count():
            raise ValueError(f"num_devices={tc.num_devices} needs one process with at least that many devices "
                             f"({jax.process_count()} processes, {jax.device_count()} devices)")
        devices = jax.devices()[:tc.num_devices]
    mesh = make_mesh(tc.mesh or "fsdp=-1", tc.dcn or None, devices)
    rules = get_rules(tc.rules, **parse_overrides(tc.rule_overrides))
    return mesh, rules


def train(tc: TrainConfig, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) training. Returns a summary dict. Every input check happens before any compile.
    Raises ValueError (bad settings or data), CheckpointError (none usable), TrainingStopped (too
    many bad steps) or Interrupted (a signal before the first step)."""
    signals = StopSignals()
    try:
        return _train(tc, log, signals)
    finally:
        signals.close()


def _train(tc: TrainConfig, log: Callable[[str], None], signals: StopSignals) -> dict:
    t_begin = time.time()
    primary = jax.process_index() == 0
    say = log if primary else (lambda s: None)

    # ---- checks and data (no compile yet)
    cfg = tc.model_config()
    check_settings(tc, cfg)
    if tc.compile_cache:
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.expanduser(tc.compile_cache)))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    mesh, rules = build_mesh(tc)
    data_sharding(mesh, rules, (tc.batch_size, tc.grad_accum, tc.seq_len + 1), BATCH_AXES)  # the batch must split
    tokenizer = make_tokenizer(tc.tokenizer)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise DataError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but the model's vocab_size is "
                        f"{cfg.vocab_size} (set model.vocab_size)")
    if tc.document_mask and tokenizer.eos_id != cfg.eos_token_id:
        raise DataError(f"document_mask finds documents by the model's eos_token_id {cfg.eos_token_id}, but tokenizer "
                        f"{tokenizer.name} ends documents with {tokenizer.eos_id} (set model.eos_token_id, or "
                        f"document_mask=false)")
    token_map = None
    if isinstance(cfg, V41Config) and cfg.engram_layer_ids:  # the n-gram hash's compressed ids (architecture.md §12.10)
        token_map = engram_token_map(tokenizer, cfg.vocab_size)
        engram_pad(cfg, token_map)
    files = resolve_files(tc.data)
    metrics_path = tc.metrics_file or os.path.join(tc.run_dir, "metrics.jsonl")
    ckpt_dir = os.path.join(tc.run_dir, "checkpoints")
    if primary:
        prepare_run_dir(tc)
        if tc.metrics_file:
            try:
                open(metrics_path, "a").close()
            except OSError as e:
                raise ValueError(f"metrics_file {metrics_path!r} cannot be written: {e.strerror or e}") from None
    t0 = time.time()
    tokens = pack_tokens(files, tokenizer, tc.cache_dir or None)
    # rows of this process: the processes' shares of the batch axis, in process order
    host_count, host_index = jax.process_count(), jax.process_index()
    try:
        batches = PackedBatches(tokens, tc.seq_len, tc.batch_size, tc.grad_accum, tc.data_seed, host_index, host_count)
    except DataError as e:  # too little data: say which
        raise DataError(f"data {tc.data!r}: {e}") from None
    if tc.grain_threads:
        batches = GrainBatches(batches, tc.grain_threads)
    if token_map is not None:
        batches = EngramRows(batches, cfg, token_map)
    setup = make_setup(tc, cfg)

    has_checkpoints = os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir))
    if has_checkpoints and not tc.resume and not tc.fresh:
        raise ValueError(f"{ckpt_dir} already holds checkpoints; pass --resume, or --fresh (fresh=true) to start "
                         f"over (the old ones are moved aside), or use another run_dir")
    effective = config_dict(tc, cfg)
    say("effective config:\n" + json.dumps(effective, indent=1, default=str))
    say(f"data: {len(files)} files, {len(tokens):,} tokens ({time.time() - t0:.1f}s), {batches.n_rows:,} rows of "
        f"{tc.seq_len + 1}, {batches.batches_per_epoch:,} batches/epoch; mesh {describe(mesh)}, rules {tc.rules}")
    if primary:
        if tc.fresh:
            move_aside(ckpt_dir, say)
            if not tc.metrics_file:
                move_aside(metrics_path, say)
        with open(os.path.join(tc.run_dir, "config.json"), "w") as f:
            json.dump(effective, f, indent=1, default=str)
        if tc.tokenizer != "byte":  # the run is self-contained: its tokenizer travels with it
            dest = os.path.join(tc.run_dir, "tokenizer.json")
            if not (os.path.exists(dest) and os.path.samefile(tc.tokenizer, dest)):
                shutil.copyfile(tc.tokenizer, dest)
        if token_map is not None:  # what generation hashes with (generate_v41's token_map)
            np.save(os.path.join(tc.run_dir, "engram_token_map.npy"), token_map)
    _sync("run-dir-prepared")

    # ---- state: shardings, init, restore (the same program the TPU dry run compiles)
    program = step_program(tc, cfg, mesh, rules, setup)
    ckpt = Checkpointer(ckpt_dir, tc.keep_checkpoints, tc.async_checkpoints)
    try:
        return _run(tc, say, signals, ckpt, program, mesh, rules, batches, metrics_path, primary, t_begin)
    finally:
        ckpt.close()


def _run(tc, say, signals, ckpt, program: "StepProgram", mesh, rules, batches, metrics_path, primary, t_begin) -> dict:
    setup, shardings = program.setup, program.shardings
    replicated = shardings["step"]
    restored = ckpt.restore_latest(program.state, say)  # CheckpointError when some exist and none is usable
    if restored is not None:
        state, batches.state = restored
        step = int(jax.device_get(state["step"]))
        if step >= tc.steps:
            rec = last_loss(metrics_path, step)
            loss = f"final loss {rec['loss']:.4f} from {metrics_path}" if rec else f"no loss recorded in {metrics_path}"
            message = f"run already finished at step {step} of steps={tc.steps} ({loss}); nothing to do"
            say(message)
            return {"finished": True, "message": message, "start_step": step, "end_step": step,
                    "metrics_file": metrics_path, "last": rec or {}, "skipped": []}
        say(f"resumed from step {step} (data epoch {batches.state.epoch}, batch {batches.state.batch})")
    else:
        with use_mesh_rules(mesh, rules):
            state = jax.jit(program.init, out_shardings=shardings)()

    # ---- compile
    cache_note = f"compile_cache {tc.compile_cache}" if tc.compile_cache else "no compile_cache"
    say(f"compiling the step ({cache_note}; a cold compile takes minutes on CPU)...")
    t0 = time.time()
    with use_mesh_rules(mesh, rules):
        compiled = compile_interruptibly(program.lower)
    t_compile = time.time() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float((cost or {}).get("flops", 0.0))
    peak = tc.peak_flops or peak_flops(jax.devices()[0])
    say(f"compiled the step in {t_compile:.1f}s; {flops / 1e9:.2f} GFLOP per step per device (XLA cost "
        f"analysis){'' if peak else '; MFU needs peak_flops (unknown device kind)'}")

    # ---- metrics sinks
    tb = TensorBoardWriter(os.path.join(tc.run_dir, "tensorboard")) if (primary and tc.tensorboard) else None
    progress = Progress(tc.steps, tc.progress and primary, tc.log_every)

    tokens_per_step = tc.grad_accum * tc.batch_size * tc.seq_len
    layout = batch_layout(tc, setup.cfg)  # (global shape, logical axes) of the batch's leaves
    step = int(jax.device_get(state["step"]))
    first_step = step
    bad_in_row, skipped, last = 0, [], {}
    t_window, n_window, tps = time.time(), 0, 0.0
    t_start = None
    summary: dict[str, Any] = {"start_step": step}
    signals.in_loop = True  # from here a signal stops the loop after the current step, with a checkpoint
    try:
        with open(metrics_path, "a") if primary else open(os.devnull, "w") as mf:
            while step < tc.steps:
                data_state = batches.state
                local = next(batches)
                batch = jax.tree.map(lambda a, la: host_local_to_global(a, mesh, rules, *la), local, layout)
                hyper = jax.device_put(hyperparams(tc, setup.schedule, step), replicated)
                state, m = compiled(state, batch, hyper)
                m = jax.device_get(m)
                step += 1
                now = time.time()
                if t_start is None:
                    t_start, t_window, n_window = now, now, 0  # the first step's time includes warm-up
                    say(f"first step done {now - t_begin:.1f}s after start (compile {t_compile:.1f}s)")
                else:
                    n_window += 1
                    if now - t_window > 0.5 or n_window >= tc.log_every:
                        tps = n_window * tokens_per_step / (now - t_window)
                        t_window, n_window = now, 0
                step_time = tokens_per_step / tps if tps else float("nan")
                rec = {"step": step, "ok": bool(m["ok"]), "loss": float(m["loss"]),
                       **{k: float(m[k]) for k in ("ce", "mtp", "balance", "indexer") if k in m},
                       "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"]), "mtp_weight": float(m["mtp_weight"]),
                       "imbalance": float(m["imbalance"]), "tokens_per_s": tps, "step_time_s": step_time,
                       "epoch": data_state.epoch}
                if not bool(m["state_ok"]):
                    rec["state_ok"] = False  # only recorded when the post-update check failed
                if peak and tps:
                    rec["mfu"] = flops / step_time / peak
                if step % tc.log_every == 0 or step == tc.steps:
                    load = np.asarray(m["load"])
                    rec["expert_load"] = (load / np.maximum(load.sum(-1, keepdims=True), 1)).round(4).tolist()
                mf.write(json_line(rec) + "\n")
                mf.flush()
                if not rec["ok"]:
                    bad_in_row += 1
                    skipped.append(step)
                    why = (f"non-finite loss ({rec['loss']}) or gradient norm ({rec['grad_norm']})"
                           if not (math.isfinite(rec["loss"]) and math.isfinite(rec["grad_norm"])) else
                           "the update would make parameters or optimizer state non-finite")
                    say(f"\nstep {step}: {why}; step skipped, previous state kept ({bad_in_row} in a row)")
                    if bad_in_row >= tc.max_bad_steps:
                        raise TrainingStopped(f"stopping: {bad_in_row} consecutive steps with a non-finite loss, "
                                              f"gradient or state (last at step {step}); the last checkpoint is in "
                                              f"{ckpt.directory}")
                else:
                    bad_in_row = 0
                    last = rec
                if tb is not None and rec["ok"]:
                    tb.scalars(step, {k: v for k, v in rec.items() if isinstance(v, float) and math.isfinite(v)})
                eta = (tc.steps - step) * step_time if tps else float("nan")
                progress.update(step, rec["loss"], tps, eta if math.isfinite(eta) else 0.0)
                saved = step % tc.ckpt_every == 0 or step == tc.steps
                if saved:
                    ckpt.save(state, batches.state, log=say)
                ckpt.poll()
                if signals.signum is not None:
                    if not saved:
                        ckpt.save(state, batches.state, log=say)
                    ckpt.wait()
                    progress.close()
                    why = "preemption" if signals.signum == signal.SIGTERM else "Ctrl-C"
                    say(f"received {signal.Signals(signals.signum).name} ({why}): saved a checkpoint at step {step} "
                        f"in {ckpt.directory}; exiting (rerun the same command to resume)")
                    summary.update(preempted=True, signum=signals.signum)
                    break
        progress.close()
        ckpt.wait()
    finally:
        if tb is not None:
            tb.close()
    summary.update(end_step=step, last=last, skipped=skipped, flops_per_step=flops, metrics_file=metrics_path,
                   wall_s=(time.time() - t_start) if t_start else 0.0, steps_run=step - first_step)
    if primary and tc.plot and not summary.get("preempted"):
        png = os.path.join(tc.run_dir, "loss.png")
        plot_loss(metrics_path, png)
        summary["plot"] = png
    return summary
