"""The training loop behind `train.py`: configuration, the jitted step, checkpoints, metrics.

State (one pytree, checkpointed whole): params and buffers as flat `{dotted path: array}` dicts
(fp32 master weights, architecture.md §8.6), the optimiser state (fp32), the step and an RNG key; the data
iterator's (epoch, batch) and a per-parameter fingerprint travel beside it as JSON, and a sha256
manifest of every file, written last, lets restore detect any corruption.

One step (`make_step`): for each of grad_accum micro-batches, forward in options.dtype (bf16 on TPU)
-> loss = CE + w_mtp(step) * CE_mtp + alpha * balance + w_I * indexer KL (CSA layers)
-> grads summed in fp32 -> clip -> Muon/AdamW -> selection-bias update from the step's expert load
(outside the gradient, architecture.md §5.4). A non-finite loss, gradient norm or new state keeps the old state
(the step is skipped and reported); `max_bad_steps` in a row stop the run.
"""

from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import threading
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
from v4jax.train import losses
from v4jax.config import OPTION_FIELDS, AttentionKind, RouterKind, RunOptions, V4Config, split_options, stage_units
from v4jax.train.data import (DataError, GrainBatches, IteratorState, PackedBatches, make_tokenizer, pack_tokens,
                        resolve_files)
from v4jax.model.layers import Buffer
from v4jax.model.transformer import Transformer
from v4jax.train.optim import (OptimConfig, Schedule, flat_params, logical_axes, make_optimizer, split_params,
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
    decay_steps: int = 60  # cosine decay over the last decay_steps (MTP weight drops then, architecture.md §6)
    # optimiser settings (architecture.md §8); the defaults are OptimConfig's, one source for both
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
    balance_alpha: float = 1e-4  # sequence-wise balance loss weight (architecture.md §5.4)
    balance_hash_layers: bool = False  # whether hash-routed layers join the balance loss (architecture.md §11.5)
    bias_update_speed: float = 1e-3  # aux-loss-free bias speed gamma (architecture.md §5.4)
    indexer_loss_weight: float = 1.0  # lightning-indexer KL (architecture.md §8.2); 0 = indexers untrained, no traces
    # (model.csa_dense=true: dense CSA attention, the KL over all visible entries = the warm-up stage)
    seed: int = 0  # parameter init and RNG
    run_dir: str = "runs/tiny"
    overwrite: bool = False  # train in a non-empty run_dir that is not a train.py run (nothing is deleted)
    fresh: bool = False  # start from step 0 although run_dir has checkpoints (they are moved aside, not deleted)
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
    nan_update_steps: tuple = ()  # testing hook: at these steps one parameter's update is NaN while the
    # loss and gradient stay finite (the post-update state check must catch it)
    compile_cache: str = "~/.cache/v4jax/jax"  # persistent XLA compilation cache directory ("" = off)
    progress: bool = True

    def model_config(self) -> V4Config:
        """The architecture: the preset with the `model` table's V4Config keys."""
        arch, _ = split_options(self.model)  # one table on the command line, two objects in the code
        self.run_options()  # a bad option value is refused here too, before anything is built
        known = [f.name for f in dataclasses.fields(V4Config)]
        unknown = sorted(set(arch) - set(known))
        if unknown:
            raise ValueError(f"unknown model setting(s) {['model.' + k for k in unknown]}; known: "
                             f"{sorted(known + list(OPTION_FIELDS))}")
        try:
            return V4Config.preset(self.preset, **arch)
        except (TypeError, AttributeError) as e:  # a wrong type caught by V4Config's own checks
            raise ValueError(f"model settings {self.model}: {e}") from None

    def run_options(self) -> RunOptions:
        """How the model runs: the preset's options with the `model` table's RunOptions keys."""
        _, options = split_options(self.model)
        try:
            options = RunOptions.preset(self.preset, **{"param_dtype": "float32", **options})
        except (TypeError, AttributeError) as e:
            raise ValueError(f"model settings {self.model}: {e}") from None
        if options.param_dtype != "float32":
            raise ValueError(f"model.param_dtype must be float32 for training (fp32 master weights, architecture.md §8.6), "
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
                if not isinstance(v, dict):
                    raise ValueError(f"config file {path!r}: model must be a table of V4Config settings, got {v!r}")
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
        elif want == "tuple":
            if not isinstance(v, list):
                raise ValueError(f"setting {k} must be a list, got {v!r}")
            values[k] = tuple(v)
        elif want in ("int", "float", "bool", "str") and type(v).__name__ != want:
            raise ValueError(f"setting {k} must be {want}, got {v!r}")
    if "model" in values:
        if not isinstance(values["model"], dict):
            raise ValueError(f"setting model must be a table of V4Config settings, got {values['model']!r}")
        model.update(values.pop("model"))
    return TrainConfig(**values, model=model)


# Range checks of TrainConfig, run by `train` before anything is read or compiled. (load_config checks types.)
_POSITIVE = ("steps", "batch_size", "grad_accum", "ckpt_every", "keep_checkpoints", "max_bad_steps", "log_every")
_NON_NEGATIVE = ("warmup_steps", "decay_steps", "num_devices", "grain_threads", "data_seed", "seed", "lr", "final_lr",
                 "weight_decay", "clip_norm", "adam_eps", "mtp_weight", "mtp_weight_decay_phase", "balance_alpha",
                 "bias_update_speed", "indexer_loss_weight", "peak_flops")
_UNIT_INTERVAL = ("adam_b1", "adam_b2", "muon_momentum")  # [0, 1)


def check_settings(tc: TrainConfig, cfg: V4Config) -> None:
    """Raise ValueError naming the first out-of-range setting."""
    for k, f in _FIELDS.items():
        v = getattr(tc, k)
        if f.type == "float" and not math.isfinite(v):
            raise ValueError(f"setting {k} must be a finite number, got {v}")
    for k in _POSITIVE:
        if getattr(tc, k) < 1:
            raise ValueError(f"setting {k} must be >= 1, got {getattr(tc, k)}")
    for k in _NON_NEGATIVE:
        if getattr(tc, k) < 0:
            raise ValueError(f"setting {k} must be >= 0, got {getattr(tc, k)}")
    for k in _UNIT_INTERVAL:
        if not 0 <= getattr(tc, k) < 1:
            raise ValueError(f"setting {k} must be in [0, 1), got {getattr(tc, k)}")
    if tc.seq_len < 2 or tc.seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len {tc.seq_len} must be in [2, max_seq_len={cfg.max_seq_len}] of the model config")
    for k in ("nan_steps", "nan_update_steps"):
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in getattr(tc, k)):
            raise ValueError(f"setting {k} must be a list of step numbers, got {list(getattr(tc, k))}")


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
    MTP weight and the NaN-injection flags (testing hooks `nan_steps`, `nan_update_steps`, 1-based as logged)."""
    return {"lr": np.float32(schedule.lr(step)), "mtp_weight": np.float32(schedule.mtp(step)),
            "nan": np.bool_(step + 1 in tc.nan_steps), "nan_update": np.bool_(step + 1 in tc.nan_update_steps)}


def all_finite(tree) -> jax.Array:
    """One boolean: every floating-point leaf of `tree` is free of NaN and Inf (one fused reduction
    under jit; integer leaves such as step counts are left out)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)


def nan_update_target(params: dict) -> str:
    """The parameter the `nan_update_steps` hook poisons: the MTP block's expert w1 when there is one
    (where the corruption of issue 15 surfaced), else the last parameter."""
    return next((k for k in params if k.startswith("mtp.") and k.endswith("experts.w1")), sorted(params)[-1])


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
        if out.indexer is not None:  # CSA layers' KL (architecture.md §8.2); trains only the indexers (indexer_detach)
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
    stages = stage_units(cfg)
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
        updates, opt = setup.tx.update(grads, state["opt"], params)  # -(direction + weight decay)
        updates = jax.tree.map(lambda u: hyper["lr"] * u, updates)
        poisoned = nan_update_target(updates)  # testing hook (nan_update_steps)
        updates = {**updates, poisoned: updates[poisoned] * jnp.where(hyper["nan_update"], jnp.nan, 1.0)}
        new = {"params": optax.apply_updates(params, updates), "opt": opt,
               "buffers": _bias_updates(cfg, buffers, load, mtp_load, tc.bias_update_speed, stages)}
        # A finite loss and gradient can still produce a non-finite state (an overflowing moment, a
        # corrupt restored tensor): check the new state itself, so a bad step is never kept or saved.
        state_ok = all_finite(new)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & state_ok
        kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new,
                            {"params": params, "opt": state["opt"], "buffers": buffers})
        metrics = {"loss": loss, **parts, "grad_norm": grad_norm, "ok": ok, "state_ok": state_ok, "lr": hyper["lr"],
                   "mtp_weight": hyper["mtp_weight"], "load": load,
                   "imbalance": jnp.sum(losses.imbalance(load) * mask) / jnp.maximum(jnp.sum(mask), 1)}
        if return_grads:
            metrics["grads"] = grads
        return {**kept, "step": step + 1, "rng": state["rng"]}, metrics

    return step_fn


# --------------------------------------------------------------------------------------------------
# Checkpoints (Orbax): async, keep-last-N, atomic (Orbax writes a temporary directory and renames it
# into place when complete). Integrity: once Orbax has finished a step directory, process 0 writes
# MANIFEST into it, last: the size and sha256 of every file. Restore verifies the manifest, reads the
# state back and checks it is finite; a checkpoint failing any of these is reported and the previous
# one tried. Nothing is moved or deleted without a message.

MANIFEST = "v4jax_manifest.json"


class CheckpointError(RuntimeError):
    """No usable checkpoint although some exist."""


def _fingerprint(params: dict) -> dict:
    """Per-parameter sum of |w|, saved in `meta` (restore.py checks it when loading a run for inference)."""
    return {k: jnp.sum(jnp.abs(v.astype(jnp.float32))) for k, v in params.items()}


def _flatten_opt(state: dict) -> dict:
    leaves = jax.tree.leaves(state["opt"])
    return {**state, "opt": {f"{i:05d}": x for i, x in enumerate(leaves)}}


def _unflatten_opt(flat: dict, like: dict) -> dict:
    treedef = jax.tree.structure(like["opt"])
    return {**flat, "opt": jax.tree.unflatten(treedef, [flat["opt"][f"{i:05d}"] for i in range(treedef.num_leaves)])}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _step_files(step_dir: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(r, f), step_dir) for r, _, fs in os.walk(step_dir) for f in fs
                  if f != MANIFEST)


def write_manifest(step_dir: str) -> None:
    """{relative path: {size, sha256}} of every file of a finished step directory, written last
    (temporary name, then an atomic rename)."""
    files = {rel: {"size": os.path.getsize(os.path.join(step_dir, rel)), "sha256": _sha256(os.path.join(step_dir, rel))}
             for rel in _step_files(step_dir)}
    tmp = os.path.join(step_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": 1, "files": files}, f, indent=0)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, MANIFEST))


def verify_manifest(step_dir: str) -> str | None:
    """None when every file listed in the step's manifest has its recorded size and sha256, else the
    first discrepancy in words. A step without a manifest was finished by Orbax but not yet checksummed
    (killed in between, or written before manifests existed): it is reported by the caller and trusted
    only as far as Orbax's own atomic rename and the finiteness check go."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.exists(path):
        return "no manifest"
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable manifest ({type(e).__name__})"
    for rel, want in sorted(files.items()):
        full = os.path.join(step_dir, rel)
        if not os.path.exists(full):
            return f"{rel} is missing"
        if os.path.getsize(full) != want["size"]:
            return f"{rel} has {os.path.getsize(full)} bytes, the manifest says {want['size']}"
        if _sha256(full) != want["sha256"]:
            return f"{rel} does not match its sha256 checksum"
    return None


class Checkpointer:
    def __init__(self, directory: str, keep: int, use_async: bool):
        import orbax.checkpoint as ocp
        self.ocp = ocp
        self.directory = os.path.abspath(directory)
        self.keep, self.use_async = keep, use_async
        self._pending: list[int] = []  # steps saved whose manifest is not written yet
        self._open()
        self._finite = jax.jit(all_finite)
        self._fp = jax.jit(_fingerprint)

    def _open(self):
        ocp = self.ocp
        self.mngr = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=self.keep, enable_async_checkpointing=self.use_async, create=True,
            cleanup_tmp_directories=True))

    def steps(self) -> list[int]:
        return sorted(self.mngr.all_steps())

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, state: dict, iterator: IteratorState, wait: bool = False,
             log: Callable[[str], None] = print) -> bool:
        """Save (async unless configured otherwise or `wait`); False, with a message, when the state is
        not finite: such a state is never written."""
        step = int(jax.device_get(state["step"]))
        if not bool(jax.device_get(self._finite(state))):
            log(f"not saving a checkpoint at step {step}: the state holds non-finite values")
            return False
        fp = {k: float(v) for k, v in jax.device_get(self._fp(state["params"])).items()}
        # Orbax finishes the previous async save before starting this one anyway; waiting here first
        # lets its manifest be written even when saves follow each other too closely for `poll` to
        # ever see Orbax idle.
        self.wait()
        ocp = self.ocp
        self.mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_flatten_opt(state)),
            data=ocp.args.JsonSave(iterator.to_dict()),
            meta=ocp.args.JsonSave({"step": step, "fingerprint": fp})), force=True)
        self._pending.append(step)
        if wait or not self.use_async:
            self.wait()
        return True

    def poll(self):
        """Write the manifests of saves Orbax has finished (cheap when none; called every step)."""
        if self._pending and not self.mngr.is_saving_in_progress():
            self._write_manifests()

    def _write_manifests(self):
        if jax.process_index() == 0:
            for step in self._pending:
                if os.path.isdir(self.step_dir(step)):  # not already dropped by keep_checkpoints
                    write_manifest(self.step_dir(step))
        self._pending = []  # (no cross-host sync: each host polls on its own schedule; only process 0 writes)

    def restore_latest(self, abstract_state: dict, log: Callable[[str], None]) -> tuple[dict, IteratorState] | None:
        """The newest checkpoint that passes its manifest, reads back and holds a finite state. Newer
        ones that fail are reported and then moved aside (`<dir>/corrupt-<step>`, said so) so that new
        saves can take their step numbers; when none is usable nothing is moved and CheckpointError says so."""
        ocp = self.ocp
        steps = self.steps()
        if not steps:
            return None
        target = _flatten_opt(abstract_state)
        bad = []
        for step in reversed(steps):
            problem = verify_manifest(self.step_dir(step))
            if problem == "no manifest":
                log(f"checkpoint step {step} has no manifest (interrupted before its checksums were written); "
                    f"using it unverified")
                problem = None
            got = None
            if problem is None:
                try:
                    got = self.mngr.restore(step, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
                        meta=ocp.args.JsonRestore()))
                    iterator = IteratorState.from_dict(got["data"])
                    if not bool(jax.device_get(self._finite(got["state"]))):
                        problem = "the restored state holds non-finite values"
                except Exception as e:  # any read error (truncated file, bad JSON, shape mismatch) = unusable
                    reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                    problem = f"{type(e).__name__}: {reason}" if reason else type(e).__name__
            if problem is not None:
                log(f"checkpoint step {step} in {self.directory} is corrupt or unreadable ({problem}); "
                    f"falling back to the previous one")
                bad.append(step)
                continue
            if bad and jax.process_index() == 0:
                for b in bad:
                    aside = self._aside(b)
                    os.replace(self.step_dir(b), aside)
                    log(f"moved the unusable checkpoint step {b} aside to {aside} (kept for inspection)")
            if bad:
                _sync("corrupt-checkpoints-moved")
                self.mngr.close()
                self._open()
            return _unflatten_opt(got["state"], abstract_state), iterator
        raise CheckpointError(f"no usable checkpoint in {self.directory} (steps {steps} all failed, see above); "
                              f"nothing was moved or deleted. Pass --fresh (fresh=true) to start from step 0; "
                              f"the old checkpoints are then moved aside, not deleted")

    def _aside(self, step: int) -> str:
        n, aside = 1, os.path.join(self.directory, f"corrupt-{step}")
        while os.path.exists(aside):  # never overwrite an earlier one
            n += 1
            aside = os.path.join(self.directory, f"corrupt-{step}.{n}")
        return aside

    def wait(self):
        self.mngr.wait_until_finished()
        self._write_manifests()

    def close(self):
        self.wait()
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
        pts = [(s, r[key]) for s, r in recs if r.get("ok", True) and r.get(key) is not None]  # skipped steps left out
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


def json_line(rec: dict) -> str:
    """One strict-JSON metrics line: non-finite floats become null (bare NaN/Infinity are not JSON)."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(rec), allow_nan=False)


def last_loss(metrics_path: str, upto: int) -> dict | None:
    """The last step <= upto whose update was kept (ok), from a metrics file; None when there is none."""
    recs = read_metrics(metrics_path)
    good = [s for s, r in recs.items() if s <= upto and r.get("ok", True) and r.get("loss") is not None]
    return recs[max(good)] if good else None


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
                batch = host_local_to_global(local, mesh, rules, (tc.batch_size, tc.grad_accum, tc.seq_len + 1),
                                             BATCH_AXES)
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


def step_program(tc: TrainConfig, cfg: V4Config, mesh, rules, setup: Setup | None = None) -> StepProgram:
    """The training step `train` runs, with its state shardings on `mesh` under `rules`."""
    setup = setup or make_setup(tc, cfg)
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
