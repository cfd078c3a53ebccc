"""The training loop behind `train.py`: configuration, the jitted step, checkpoints, metrics.

State (one pytree, checkpointed whole): params and buffers as flat `{dotted path: array}` dicts
(fp32 master weights, spec §8.5), the optimiser state (fp32), the step and an RNG key; the data
iterator's (epoch, batch) and a per-parameter fingerprint travel beside it as JSON.

One step (`make_step`): for each of grad_accum micro-batches, forward in options.dtype (bf16 on TPU)
-> loss = CE + w_mtp(step) * CE_mtp + alpha * balance + w_I * indexer KL (CSA layers)
-> grads summed in fp32 -> clip -> Muon/AdamW -> selection-bias update from the step's expert load
(outside the gradient, spec §5.4). A non-finite loss or gradient norm keeps the old state (the step
is skipped and reported); `max_bad_steps` in a row stop the run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
import tomllib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from sharding.context import use_mesh_rules
from sharding.mesh import describe, make_mesh
from sharding.partition import data_sharding, host_local_to_global, state_shardings
from sharding.rules import get_rules, parse_overrides
from v4jax import losses
from v4jax.config import OPTION_FIELDS, AttentionKind, RouterKind, RunOptions, V4Config, split_options
from v4jax.data import (DataError, GrainBatches, IteratorState, PackedBatches, make_tokenizer, pack_tokens,
                        resolve_files)
from v4jax.layers import Buffer
from v4jax.model import Transformer
from v4jax.optim import (OptimConfig, Schedule, flat_params, logical_axes, make_optimizer, split_params,
                         unflat_params)

BATCH_AXES = ("batch", None, "seq")  # [batch, grad_accum, seq_len + 1] (data_sharding wants batch first)


# --------------------------------------------------------------------------------------------------
# Configuration

@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every training setting. A TOML file sets them (top-level keys or any table except [model],
    whose keys override V4Config or RunOptions); `key=value` / `model.key=value` arguments override the file."""

    preset: str = "tiny"  # V4Config preset
    model: dict = dataclasses.field(default_factory=dict)  # V4Config and RunOptions overrides (vocab_size, dtype)
    mesh: str = ""  # ici mesh, "fsdp=4,expert=2"; "" = every device on fsdp
    dcn: str = ""  # mesh across slices
    num_devices: int = 0  # use only the first n devices (single process; 0 = all)
    rules: str = "fsdp"  # sharding.rules preset
    rule_overrides: str = ""  # "experts=expert+fsdp,vocab="
    data: str = "stdlib"  # "stdlib" | comma-separated files / directories / globs (.txt .md .py .jsonl .array_record)
    tokenizer: str = "byte"  # "byte" | path to tokenizer.json
    cache_dir: str = ""  # packed-token cache (memory-mapped on later runs)
    grain_threads: int = 0  # > 0: batches read ahead by grain with this many threads (data.GrainBatches)
    seq_len: int = 64
    batch_size: int = 8  # global rows per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    data_seed: int = 0
    steps: int = 200
    lr: float = 3e-3  # peak learning rate (spec: 2.7e-4 at scale)
    final_lr: float = 3e-4
    warmup_steps: int = 20
    decay_steps: int = 60  # cosine decay over the last decay_steps (MTP weight drops then, spec §6)
    # optimiser settings (spec §8); the defaults are OptimConfig's, one source for both
    adam_b1: float = OptimConfig.adam_b1
    adam_b2: float = OptimConfig.adam_b2
    adam_eps: float = OptimConfig.adam_eps
    weight_decay: float = OptimConfig.weight_decay
    muon_momentum: float = OptimConfig.muon_momentum
    muon_update_rms: float = OptimConfig.muon_update_rms
    muon_ns_dtype: str = OptimConfig.muon_ns_dtype
    clip_norm: float = OptimConfig.clip_norm
    mtp_weight: float = 0.3
    mtp_weight_decay_phase: float = 0.1
    balance_alpha: float = 1e-4  # sequence-wise balance loss weight (spec §5.4)
    balance_hash_layers: bool = False  # whether hash-routed layers join the balance loss (spec §12.6)
    bias_update_speed: float = 1e-3  # aux-loss-free bias speed gamma (spec §5.4)
    indexer_loss_weight: float = 1.0  # lightning-indexer KL (spec §8.6); 0 = indexers untrained, no traces
    # (model.csa_dense=true: dense CSA attention, the KL over all visible entries = the warm-up stage)
    seed: int = 0  # parameter init and RNG
    run_dir: str = "runs/tiny"
    ckpt_every: int = 50
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    resume: bool = True  # continue from run_dir's latest good checkpoint when there is one
    max_bad_steps: int = 5  # consecutive non-finite steps before stopping
    log_every: int = 10
    metrics_file: str = ""  # JSONL path ("" = run_dir/metrics.jsonl)
    tensorboard: bool = True
    plot: bool = True  # PNG loss curve at the end
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU (0 = from the device kind when known)
    nan_steps: tuple = ()  # testing hook: these steps (1-based, as logged) get a NaN loss and gradient
    # (a runtime input, so it never changes the compiled program)
    compile_cache: str = ""  # persistent XLA compilation cache directory ("" = off)
    progress: bool = True

    def model_config(self) -> V4Config:
        """The architecture: the preset with the `model` table's V4Config keys."""
        arch, _ = split_options(self.model)  # one table on the command line, two objects in the code
        self.run_options()  # a bad option value is refused here too, before anything is built
        known = [f.name for f in dataclasses.fields(V4Config)]
        unknown = sorted(set(arch) - set(known))
        if unknown:
            raise ValueError(f"unknown model setting {unknown[0]!r}; known: {sorted(known + list(OPTION_FIELDS))}")
        return V4Config.preset(self.preset, **arch)

    def run_options(self) -> RunOptions:
        """How the model runs: the preset's options with the `model` table's RunOptions keys."""
        _, options = split_options(self.model)
        options = RunOptions.preset(self.preset, **{"param_dtype": "float32", **options})
        if options.param_dtype != "float32":
            raise ValueError(f"model.param_dtype must be float32 for training (fp32 master weights, spec §8.5), "
                             f"got {options.param_dtype!r}")
        return options

    def schedule(self) -> Schedule:
        return Schedule(self.lr, self.final_lr, self.warmup_steps, self.steps, self.decay_steps,
                        self.mtp_weight, self.mtp_weight_decay_phase)

    def optim(self) -> OptimConfig:
        names = [f.name for f in dataclasses.fields(OptimConfig)]
        return OptimConfig(**{n: getattr(self, n) for n in names})


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string


def load_config(path: str | None = None, overrides: list[str] = ()) -> TrainConfig:
    """TOML file (optional) + `key=value` overrides -> TrainConfig; unknown keys raise ValueError."""
    values: dict[str, Any] = {}
    model: dict[str, Any] = {}
    if path:
        if not os.path.isfile(path):
            raise ValueError(f"config file {path!r} does not exist")
        with open(path, "rb") as f:
            try:
                doc = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"config file {path!r} is not valid TOML: {e}") from None
        for k, v in doc.items():
            if k == "model":
                model.update(v)
            elif isinstance(v, dict):
                values.update(v)  # [data], [optim], [run] tables are for readability only
            else:
                values[k] = v
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        k, v = item.split("=", 1)
        k = k.strip()
        if k.startswith("model."):
            model[k[len("model."):]] = _parse_value(v)
        else:
            values[k] = _parse_value(v)
    unknown = sorted(set(values) - set(_FIELDS) - {"model"})
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; known: {sorted(_FIELDS)}")
    for k, v in values.items():
        want = _FIELDS[k].type
        if want == "float" and isinstance(v, int) and not isinstance(v, bool):
            values[k] = float(v)
        elif want == "tuple" and isinstance(v, list):
            values[k] = tuple(v)
        elif want in ("int", "float", "bool", "str") and type(v).__name__ != want:
            raise ValueError(f"setting {k} must be {want}, got {v!r}")
    if "model" in values:
        model.update(values.pop("model"))
    return TrainConfig(**values, model=model)


def config_dict(tc: TrainConfig, cfg: V4Config) -> dict:
    """The effective configuration (printed and saved as run_dir/config.json)."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v.value if hasattr(v, "value") else v
    return {"train": {k: plain(v) for k, v in dataclasses.asdict(tc).items()},
            "model": {k: plain(v) for k, v in {**dataclasses.asdict(cfg), **dataclasses.asdict(tc.run_options())}.items()}}


# --------------------------------------------------------------------------------------------------
# The step

@dataclasses.dataclass
class Setup:
    cfg: V4Config
    graphdef: Any
    param_template: nnx.State
    buffer_template: nnx.State
    rest: nnx.State
    tx: optax.GradientTransformation
    schedule: Schedule


def make_setup(tc: TrainConfig, cfg: V4Config) -> Setup:
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(tc.seed), options=tc.run_options()))
    graphdef, params, buffers, rest = nnx.split(abstract, nnx.Param, Buffer, ...)
    groups = split_params(logical_axes(params))
    schedule = tc.schedule()
    # The learning rate is applied by the step from a runtime input (see `hyperparams`), so the
    # schedule's numbers never enter the compiled program: runs differing only in them share it.
    return Setup(cfg, graphdef, params, buffers, rest, make_optimizer(groups, None, tc.optim()), schedule)


def _learned_mask(cfg: V4Config, include_hash: bool) -> np.ndarray:
    return np.asarray([include_hash or r is RouterKind.LEARNED for r in cfg.router_types], np.float32)


def _bias_updates(cfg: V4Config, buffers: dict, load: jax.Array, mtp_load: jax.Array | None, speed: float,
                  model_stages) -> dict:
    """Apply the aux-loss-free update to every Gate.bias. load [L, E] in main-layer order."""
    out = dict(buffers)
    offset = 0
    for s, (unit, repeats) in enumerate(model_stages):
        P = len(unit)
        stage_load = load[offset:offset + repeats * P].reshape(repeats, P, -1)
        for p, (_, router) in enumerate(unit):
            name = f"stages.{s}.blocks.{p}.ffn.gate.bias"
            if router is RouterKind.LEARNED:
                out[name] = losses.bias_update(buffers[name], stage_load[:, p], speed)
        offset += repeats * P
    if mtp_load is not None and "mtp.block.ffn.gate.bias" in buffers:
        out["mtp.block.ffn.gate.bias"] = losses.bias_update(buffers["mtp.block.ffn.gate.bias"], mtp_load, speed)
    return out


def hyperparams(tc: TrainConfig, schedule: Schedule, step: int) -> dict:
    """Runtime inputs of the step taking the state from `step` to step + 1 (0-based): learning rate,
    MTP weight and the NaN-injection flag (testing hook `nan_steps`, 1-based as logged)."""
    return {"lr": np.float32(schedule.lr(step)), "mtp_weight": np.float32(schedule.mtp(step)),
            "nan": np.bool_(step + 1 in tc.nan_steps)}


def make_loss(tc: TrainConfig, setup: Setup) -> Callable:
    """loss_fn(params, buffers, micro [B, T+1], hyper) -> (total, (parts, load [L, E], mtp_load [E]))."""
    cfg = setup.cfg
    mask = jnp.asarray(_learned_mask(cfg, tc.balance_hash_layers))

    def loss_fn(params, buffers, micro, hyper):
        model = nnx.merge(setup.graphdef, unflat_params(setup.param_template, params),
                          unflat_params(setup.buffer_template, buffers), setup.rest)
        inputs, targets = micro[:, :-1], micro[:, 1:]
        out = model(inputs, return_indexer_traces=tc.indexer_loss_weight > 0)
        T = inputs.shape[1]
        parts = {"ce": losses.cross_entropy(out.logits, targets)}
        total = parts["ce"]
        if out.mtp_logits is not None:
            parts["mtp"] = losses.mtp_cross_entropy(out.mtp_logits, targets)
            total = total + hyper["mtp_weight"] * parts["mtp"]
        stats = out.routing
        masked = stats._replace(mean_affinity=stats.mean_affinity * mask[:, None, None])
        bal = losses.balance_loss(masked, cfg.n_activated_experts, T)
        if out.mtp_routing is not None:
            bal = bal + losses.balance_loss(out.mtp_routing, cfg.n_activated_experts, T - 1)
        parts["balance"] = bal
        total = total + tc.balance_alpha * bal
        if out.indexer is not None:  # CSA layers' KL (spec §8.6); trains only the indexers (indexer_detach)
            parts["indexer"] = losses.indexer_kl_loss(*out.indexer)
            total = total + tc.indexer_loss_weight * parts["indexer"]
        total = total * jnp.where(hyper["nan"], jnp.nan, 1.0)  # testing hook (nan_steps): loss and grads NaN
        mtp_load = None if out.mtp_routing is None else jnp.sum(out.mtp_routing.load, axis=0)
        return total, (parts, jnp.sum(stats.load, axis=1), mtp_load)

    return loss_fn


def make_step(tc: TrainConfig, setup: Setup, return_grads: bool = False) -> Callable:
    """(state, batch [B, A, T+1], hyper) -> (state, metrics). Pure; jit it with shardings.
    hyper: `hyperparams(...)` of this step (scalars, so the schedule does not change the program).
    return_grads: also put the (accumulated, unclipped) gradients in metrics["grads"] (tests)."""
    cfg = setup.cfg
    mask = jnp.asarray(_learned_mask(cfg, tc.balance_hash_layers))
    stages = [(st[0], st[1]) for st in _stage_units(cfg)]
    grad_fn = jax.value_and_grad(make_loss(tc, setup), has_aux=True)

    def step_fn(state, batch, hyper):
        params, buffers, step = state["params"], state["buffers"], state["step"]
        batch = jnp.swapaxes(batch, 0, 1)  # [A, B, T+1]: one micro-batch per scan step
        A = batch.shape[0]

        def micro_step(carry, micro):
            return jax.tree.map(jnp.add, carry, grad_fn(params, buffers, micro, hyper)), None

        if A == 1:
            (loss, aux), grads = grad_fn(params, buffers, batch[0], hyper)
        else:  # sum over micro-batches in fp32 (one traced copy of the model), then the mean
            shapes = jax.eval_shape(grad_fn, params, buffers, batch[0], hyper)
            zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), shapes)
            summed, _ = jax.lax.scan(micro_step, zeros, batch)
            (loss, aux), grads = jax.tree.map(lambda x: x / A, summed)
        parts, load, mtp_load = aux
        grad_norm = optax.global_norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt = setup.tx.update(grads, state["opt"], params)  # -(direction + weight decay)
        updates = jax.tree.map(lambda u: hyper["lr"] * u, updates)
        new = {"params": optax.apply_updates(params, updates), "opt": opt,
               "buffers": _bias_updates(cfg, buffers, load, mtp_load, tc.bias_update_speed, stages)}
        kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new,
                            {"params": params, "opt": state["opt"], "buffers": buffers})
        metrics = {"loss": loss, **parts, "grad_norm": grad_norm, "ok": ok, "lr": hyper["lr"],
                   "mtp_weight": hyper["mtp_weight"], "load": load,
                   "imbalance": jnp.sum(losses.imbalance(load) * mask) / jnp.maximum(jnp.sum(mask), 1)}
        if return_grads:
            metrics["grads"] = grads
        return {**kept, "step": step + 1, "rng": state["rng"]}, metrics

    return step_fn


def _stage_units(cfg: V4Config):
    from v4jax.model import layer_schedule
    return layer_schedule(tuple(zip(cfg.layer_types, cfg.router_types)))


# --------------------------------------------------------------------------------------------------
# Checkpoints (Orbax): async, keep-last-N, atomic (Orbax writes a temporary directory and renames
# it when complete); a per-parameter fingerprint detects silent corruption on restore.

class CheckpointError(RuntimeError):
    """No readable checkpoint although some exist."""


def _fingerprint(params: dict) -> dict:
    return {k: jnp.sum(jnp.abs(v.astype(jnp.float32))) for k, v in params.items()}


def _flatten_opt(state: dict) -> dict:
    leaves = jax.tree.leaves(state["opt"])
    return {**state, "opt": {f"{i:05d}": x for i, x in enumerate(leaves)}}


def _unflatten_opt(flat: dict, like: dict) -> dict:
    treedef = jax.tree.structure(like["opt"])
    return {**flat, "opt": jax.tree.unflatten(treedef, [flat["opt"][f"{i:05d}"] for i in range(treedef.num_leaves)])}


class Checkpointer:
    def __init__(self, directory: str, keep: int, use_async: bool):
        import orbax.checkpoint as ocp
        self.ocp = ocp
        self.directory = os.path.abspath(directory)
        self.keep, self.use_async = keep, use_async
        self._open()
        self._fp = jax.jit(_fingerprint)

    def _open(self):
        ocp = self.ocp
        self.mngr = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=self.keep, enable_async_checkpointing=self.use_async, create=True,
            cleanup_tmp_directories=True))

    def steps(self) -> list[int]:
        return sorted(self.mngr.all_steps())

    def save(self, state: dict, iterator: IteratorState, wait: bool = False):
        step = int(jax.device_get(state["step"]))
        fp = {k: float(v) for k, v in jax.device_get(self._fp(state["params"])).items()}
        ocp = self.ocp
        self.mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_flatten_opt(state)),
            data=ocp.args.JsonSave(iterator.to_dict()),
            meta=ocp.args.JsonSave({"step": step, "fingerprint": fp})), force=True)
        if wait:
            self.mngr.wait_until_finished()

    def restore_latest(self, abstract_state: dict, log: Callable[[str], None]) -> tuple[dict, IteratorState] | None:
        """The newest checkpoint that reads back and matches its fingerprint; corrupt ones are reported,
        moved aside (`<dir>/corrupt-<step>`) and the previous one is tried."""
        ocp = self.ocp
        steps = self.steps()
        if not steps:
            return None
        target = _flatten_opt(abstract_state)
        for step in reversed(steps):
            try:
                got = self.mngr.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore()))
                fp = jax.device_get(self._fp(got["state"]["params"]))
                want = got["meta"]["fingerprint"]
                bad = [k for k, v in fp.items() if not math.isclose(float(v), want.get(k, math.nan), rel_tol=1e-5,
                                                                     abs_tol=1e-6)]
                if bad:
                    raise CheckpointError(f"fingerprint mismatch in {len(bad)} parameter(s), e.g. {bad[0]}")
                return _unflatten_opt(got["state"], abstract_state), IteratorState.from_dict(got["data"])
            except Exception as e:  # any read error (truncated file, bad JSON, shape mismatch) = corrupt
                reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
                log(f"checkpoint step {step} in {self.directory} is corrupt or unreadable ({type(e).__name__}: "
                    f"{reason}); falling back to the previous one")
                if jax.process_index() == 0:
                    aside = os.path.join(self.directory, f"corrupt-{step}")
                    shutil.rmtree(aside, ignore_errors=True)
                    os.replace(os.path.join(self.directory, str(step)), aside)
                _sync("corrupt-checkpoint-moved")
                self._open()
        raise CheckpointError(f"no readable checkpoint in {self.directory} (tried steps {steps})")

    def wait(self):
        self.mngr.wait_until_finished()

    def close(self):
        self.mngr.close()


def _sync(name: str):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


# --------------------------------------------------------------------------------------------------
# Metrics: JSONL, TensorBoard event files, progress bar, PNG curve

class TensorBoardWriter:
    """Scalars to a TensorBoard event file (tensorboard's own writer; no TensorFlow needed)."""

    def __init__(self, logdir: str):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
        self._w = EventFileWriter(logdir)

    def scalars(self, step: int, values: dict[str, float]):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                                             for k, v in values.items()])
        self._w.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def close(self):
        self._w.close()


def _fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    def __init__(self, total: int, enabled: bool, every: int):
        self.total, self.enabled, self.every = total, enabled, every
        self.tty = sys.stderr.isatty()

    def update(self, step: int, loss: float, tps: float, eta: float, note: str = ""):
        if not self.enabled or (not self.tty and step % self.every and step != self.total):
            return
        width = 24
        done = int(width * step / max(1, self.total))
        bar = "=" * done + (">" if done < width else "") + " " * max(0, width - done - 1)
        line = (f"step {step:>{len(str(self.total))}}/{self.total} [{bar}] loss {loss:7.4f} | "
                f"{tps / 1e3:7.2f}k tok/s | ETA {_fmt_time(eta)}{note}")
        sys.stderr.write(("\r" + line) if self.tty else (line + "\n"))
        sys.stderr.flush()

    def close(self):
        if self.enabled and self.tty:
            sys.stderr.write("\n")


def read_metrics(path: str) -> dict[int, dict]:
    """{step: last record} of a metrics JSONL (a resumed run repeats steps after its checkpoint)."""
    out = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    out[r["step"]] = r
    return out


def plot_loss(metrics_path: str, png: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = sorted(read_metrics(metrics_path).items())
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "ce", "mtp"):
        pts = [(s, r[key]) for s, r in recs if r.get("ok", True) and key in r]  # skipped steps left out
        if pts:
            ax.plot(*zip(*pts), label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
              "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12}


def peak_flops(device) -> float:
    kind = getattr(device, "device_kind", "")
    for k in sorted(PEAK_FLOPS, key=len, reverse=True):
        if kind.startswith(k):
            return PEAK_FLOPS[k]
    return 0.0


# --------------------------------------------------------------------------------------------------
# The run

def _opt_shardings(opt_shapes, params: dict, param_sh: dict, replicated):
    """Optimiser-state leaves keyed by a parameter name (momenta, moments) take that parameter's
    sharding; the rest (counts) are replicated."""
    def one(path, leaf):
        for k in reversed(path):
            name = getattr(k, "key", None)
            if name in params and tuple(params[name].shape) == tuple(leaf.shape):
                return param_sh[name]
        return replicated
    return jax.tree_util.tree_map_with_path(one, opt_shapes)


class TrainingStopped(RuntimeError):
    """Too many consecutive non-finite steps."""


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
    """Run (or resume) training. Returns a summary dict. Every input check happens before any compile."""
    primary = jax.process_index() == 0
    say = log if primary else (lambda s: None)

    # ---- checks and data (no compile yet)
    cfg = tc.model_config()
    if tc.compile_cache:
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(tc.compile_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    if tc.seq_len < 2 or tc.seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len {tc.seq_len} must be in [2, max_seq_len={cfg.max_seq_len}] of the model config")
    for name in ("steps", "batch_size", "grad_accum", "ckpt_every", "keep_checkpoints", "max_bad_steps", "log_every"):
        if getattr(tc, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(tc, name)}")
    mesh, rules = build_mesh(tc)
    batch_sharding = data_sharding(mesh, rules, (tc.batch_size, tc.grad_accum, tc.seq_len + 1), BATCH_AXES)
    tokenizer = make_tokenizer(tc.tokenizer)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise DataError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but the model's vocab_size is "
                        f"{cfg.vocab_size} (set model.vocab_size)")
    files = resolve_files(tc.data)
    t0 = time.time()
    tokens = pack_tokens(files, tokenizer, tc.cache_dir or None)
    # rows of this process: the processes' shares of the batch axis, in process order
    host_count, host_index = jax.process_count(), jax.process_index()
    batches = PackedBatches(tokens, tc.seq_len, tc.batch_size, tc.grad_accum, tc.data_seed, host_index, host_count)
    if tc.grain_threads:
        batches = GrainBatches(batches, tc.grain_threads)
    setup = make_setup(tc, cfg)

    effective = config_dict(tc, cfg)
    say("effective config:\n" + json.dumps(effective, indent=1, default=str))
    say(f"data: {len(files)} files, {len(tokens):,} tokens ({time.time() - t0:.1f}s), {batches.n_rows:,} rows of "
        f"{tc.seq_len + 1}, {batches.batches_per_epoch:,} batches/epoch; mesh {describe(mesh)}, rules {tc.rules}")
    if primary:
        os.makedirs(tc.run_dir, exist_ok=True)
        with open(os.path.join(tc.run_dir, "config.json"), "w") as f:
            json.dump(effective, f, indent=1, default=str)

    # ---- state: shardings, init, restore
    param_sh = flat_params(state_shardings(setup.param_template, mesh, rules))
    buffer_sh = flat_params(state_shardings(setup.buffer_template, mesh, rules))
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_params = flat_params(setup.param_template)
    opt_shapes = jax.eval_shape(setup.tx.init, abstract_params)
    opt_sh = _opt_shardings(opt_shapes, abstract_params, param_sh, replicated)
    shardings = {"params": param_sh, "buffers": buffer_sh, "opt": opt_sh, "step": replicated, "rng": replicated}

    def init():
        model = Transformer(cfg, rngs=nnx.Rngs(tc.seed), options=tc.run_options())
        _, p, b, _ = nnx.split(model, nnx.Param, Buffer, ...)
        p, b = flat_params(p), flat_params(b)
        return {"params": p, "buffers": b, "opt": setup.tx.init(p), "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.key_data(jax.random.key(tc.seed))}

    abstract = jax.eval_shape(init)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    ckpt = Checkpointer(os.path.join(tc.run_dir, "checkpoints"), tc.keep_checkpoints, tc.async_checkpoints)
    restored = ckpt.restore_latest(abstract, say) if tc.resume else None
    if restored is not None:
        state, batches.state = restored
        say(f"resumed from step {int(state['step'])} (data epoch {batches.state.epoch}, batch {batches.state.batch})")
    else:
        if ckpt.steps() and not tc.resume:
            raise ValueError(f"{ckpt.directory} already holds checkpoints {ckpt.steps()}; pass resume=true or use a "
                             f"fresh run_dir")
        with use_mesh_rules(mesh, rules):
            state = jax.jit(init, out_shardings=shardings)()

    # ---- compile
    step_fn = make_step(tc, setup)
    metric_sh = replicated  # scalars and [L, E] loads: every process can read them
    jitted = jax.jit(step_fn, in_shardings=(shardings, batch_sharding, replicated), out_shardings=(shardings, metric_sh),
                     donate_argnums=(0,))
    t0 = time.time()
    with use_mesh_rules(mesh, rules):
        compiled = jitted.lower(abstract, jax.ShapeDtypeStruct((tc.batch_size, tc.grad_accum, tc.seq_len + 1),
                                                               jnp.int32, sharding=batch_sharding),
                                jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                                             hyperparams(tc, setup.schedule, 0))).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float((cost or {}).get("flops", 0.0))
    peak = tc.peak_flops or peak_flops(jax.devices()[0])
    say(f"compiled the step in {time.time() - t0:.1f}s; {flops / 1e9:.2f} GFLOP per step per device (XLA cost "
        f"analysis){'' if peak else '; MFU needs peak_flops (unknown device kind)'}")

    # ---- metrics sinks
    metrics_path = tc.metrics_file or os.path.join(tc.run_dir, "metrics.jsonl")
    tb = TensorBoardWriter(os.path.join(tc.run_dir, "tensorboard")) if (primary and tc.tensorboard) else None
    progress = Progress(tc.steps, tc.progress and primary, tc.log_every)

    stop = {"signal": None}
    old_handler = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, lambda signum, frame: stop.__setitem__("signal", signum))
    except ValueError:
        old_handler = None  # not the main thread: no preemption handling

    tokens_per_step = tc.grad_accum * tc.batch_size * tc.seq_len
    step = int(jax.device_get(state["step"]))
    first_step = step
    bad_in_row, skipped, last = 0, [], {}
    t_window, n_window, tps = time.time(), 0, 0.0
    t_start = None
    summary: dict[str, Any] = {"start_step": step}
    try:
        with open(metrics_path, "a") if primary else open(os.devnull, "w") as mf:
            while step < tc.steps:
                data_state = batches.state
                local = next(batches)
                batch = host_local_to_global(local, mesh, rules, (tc.batch_size, tc.grad_accum, tc.seq_len + 1),
                                             BATCH_AXES)
                hyper = jax.device_put(hyperparams(tc, setup.schedule, step), replicated)
                state, m = compiled(state, batch, hyper)
                m = jax.device_get(m)
                step += 1
                now = time.time()
                if t_start is None:
                    t_start, t_window, n_window = now, now, 0  # the first step's time includes warm-up
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
                if peak and tps:
                    rec["mfu"] = flops / step_time / peak
                if step % tc.log_every == 0 or step == tc.steps:
                    load = np.asarray(m["load"])
                    rec["expert_load"] = (load / np.maximum(load.sum(-1, keepdims=True), 1)).round(4).tolist()
                mf.write(json.dumps(rec) + "\n")
                mf.flush()
                if not rec["ok"]:
                    bad_in_row += 1
                    skipped.append(step)
                    say(f"\nstep {step}: non-finite loss ({rec['loss']}) or gradient norm ({rec['grad_norm']}); "
                        f"step skipped ({bad_in_row} in a row)")
                    if bad_in_row >= tc.max_bad_steps:
                        raise TrainingStopped(f"stopping: {bad_in_row} consecutive steps with a non-finite loss or "
                                              f"gradient (last at step {step}); the last checkpoint is in "
                                              f"{ckpt.directory}")
                else:
                    bad_in_row = 0
                    last = rec
                if tb is not None and rec["ok"]:
                    tb.scalars(step, {k: v for k, v in rec.items() if isinstance(v, float) and math.isfinite(v)})
                eta = (tc.steps - step) * step_time if tps else float("nan")
                progress.update(step, rec["loss"], tps, eta if math.isfinite(eta) else 0.0)
                if step % tc.ckpt_every == 0 or step == tc.steps:
                    ckpt.save(state, batches.state)
                if stop["signal"] is not None:
                    if step % tc.ckpt_every and step != tc.steps:
                        ckpt.save(state, batches.state)
                    ckpt.wait()
                    progress.close()
                    say(f"received signal {stop['signal']} (preemption): saved a checkpoint at step {step} in "
                        f"{ckpt.directory}; exiting")
                    summary.update(preempted=True)
                    break
        progress.close()
        ckpt.wait()
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
        if tb is not None:
            tb.close()
        ckpt.close()
    summary.update(end_step=step, last=last, skipped=skipped, flops_per_step=flops, metrics_file=metrics_path,
                   wall_s=(time.time() - t_start) if t_start else 0.0, steps_run=step - first_step)
    if primary and tc.plot and not summary.get("preempted"):
        png = os.path.join(tc.run_dir, "loss.png")
        plot_loss(metrics_path, png)
        summary["plot"] = png
    return summary


# --------------------------------------------------------------------------------------------------
# The compiled program (shared by `train` and the TPU dry run, so both compile the same step)

@dataclasses.dataclass(frozen=True)
class StepProgram:
    """`make_step` jitted with the state's shardings, and the abstract arguments to lower it with."""

    tc: TrainConfig
    setup: Setup
    shardings: dict  # {"params", "buffers", "opt", "step", "rng"} -> NamedShardings
    state: dict  # abstract state (ShapeDtypeStructs with shardings)
    batch: jax.ShapeDtypeStruct  # [B, grad_accum, T+1] int32
    hyper: dict  # abstract `hyperparams`
    jitted: Callable  # (state, batch, hyper) -> (state, metrics), state donated
    init: Callable  # () -> a fresh state (jit it with out_shardings=shardings)

    def lower(self):
        return self.jitted.lower(self.state, self.batch, self.hyper)

    def loss_terms(self) -> list[str]:
        """The loss terms the compiled step adds up (CE always)."""
        cfg, tc = self.setup.cfg, self.tc
        return (["ce"] + (["mtp"] if cfg.n_mtp_layers else []) + ["balance"]
                + (["indexer"] if tc.indexer_loss_weight > 0 and AttentionKind.CSA in cfg.layer_types else []))


def step_program(tc: TrainConfig, cfg: V4Config, mesh, rules) -> StepProgram:
    """The training step `train` runs, with its state shardings on `mesh` under `rules`."""
    setup = make_setup(tc, cfg)
    param_sh = flat_params(state_shardings(setup.param_template, mesh, rules))
    buffer_sh = flat_params(state_shardings(setup.buffer_template, mesh, rules))
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_params = flat_params(setup.param_template)
    opt_sh = _opt_shardings(jax.eval_shape(setup.tx.init, abstract_params), abstract_params, param_sh, replicated)
    shardings = {"params": param_sh, "buffers": buffer_sh, "opt": opt_sh, "step": replicated, "rng": replicated}

    def init():
        model = Transformer(cfg, rngs=nnx.Rngs(tc.seed), options=tc.run_options())
        _, p, b, _ = nnx.split(model, nnx.Param, Buffer, ...)
        p, b = flat_params(p), flat_params(b)
        return {"params": p, "buffers": b, "opt": setup.tx.init(p), "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.key_data(jax.random.key(tc.seed))}

    spec = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # noqa: E731
    state = jax.tree.map(spec, jax.eval_shape(init), shardings)
    batch_sharding = data_sharding(mesh, rules, (tc.batch_size, tc.grad_accum, tc.seq_len + 1), BATCH_AXES)
    batch = jax.ShapeDtypeStruct((tc.batch_size, tc.grad_accum, tc.seq_len + 1), jnp.int32, sharding=batch_sharding)
    hyper = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                         hyperparams(tc, setup.schedule, 0))
    step_fn = make_step(tc, setup)

    def step(state, batch, hyper):
        with use_mesh_rules(mesh, rules):  # traced under the rules: activations constrained, kernels per device
            return step_fn(state, batch, hyper)

    # metrics (scalars and [L, E] loads) replicated: every process can read them
    jitted = jax.jit(step, in_shardings=(shardings, batch_sharding, replicated), out_shardings=(shardings, replicated),
                     donate_argnums=(0,))
    return StepProgram(tc, setup, shardings, state, batch, hyper, jitted, init)
