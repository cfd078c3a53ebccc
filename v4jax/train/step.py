"""One training step (architecture.md §8): the loss of one micro-batch, `make_step` (every loss term, the
accumulation scan, clipping, the optimiser, the selection-bias update, the non-finite guard), and
`step_program`, that step jitted with the state's shardings: what `train` runs and the TPU dry run
compiles.

One step: for each of grad_accum micro-batches, forward in options.dtype (bf16 on TPU)
-> loss = CE + w_mtp(step) * CE_mtp + alpha * balance + w_I * indexer KL (CSA layers)
   (V4.1, architecture.md §12.10: the same without MTP, the KL at its index sources; its batch also
   carries the host-computed Engram rows, `batch_layout`)
-> grads summed in fp32 -> clip -> Muon/AdamW -> selection-bias update from the step's expert load
(outside the gradient, architecture.md §5.4). A non-finite loss, gradient norm or new state keeps the old state
(the step is skipped and reported).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from sharding.context import use_mesh_rules
from sharding.mesh import compiler_options
from sharding.partition import data_sharding, state_shardings
from v4jax.train import losses
from v4jax.config import AttentionKind, RouterKind, V4Config, stage_units
from v4jax.config_v41 import V41Config
from v4jax.model.documents import eos_segments
from v4jax.model.indexer import IndexerTraces
from v4jax.model.layers import Buffer
from v4jax.model.moe import RoutingStats
from v4jax.model.transformer import Transformer
from v4jax.model.v41 import V41Transformer, layer_plan, stack_dims
from v4jax.train.config import BATCH_AXES, TrainConfig
from v4jax.train.optim import Schedule, flat_params, logical_axes, make_optimizer, split_params, unflat_params

# --------------------------------------------------------------------------------------------------
# The step

def build_model(cfg: V4Config | V41Config, seed: int, options):
    """The model a config describes: V4's Transformer or V4.1's text backbone (architecture.md §12.10)."""
    family = V41Transformer if isinstance(cfg, V41Config) else Transformer
    return family(cfg, rngs=nnx.Rngs(seed), options=options)


@dataclasses.dataclass
class Setup:
    cfg: V4Config | V41Config
    graphdef: Any
    param_template: nnx.State
    buffer_template: nnx.State
    rest: nnx.State
    tx: optax.GradientTransformation
    schedule: Schedule


def make_setup(tc: TrainConfig, cfg: V4Config | V41Config) -> Setup:
    abstract = nnx.eval_shape(lambda: build_model(cfg, tc.seed, tc.run_options()))
    graphdef, params, buffers, rest = nnx.split(abstract, nnx.Param, Buffer, ...)
    groups = split_params(logical_axes(params))
    schedule = tc.schedule()
    # The learning rate is applied by the step from a runtime input (see `hyperparams`), so the
    # schedule's numbers never enter the compiled program: runs differing only in them share it.
    return Setup(cfg, graphdef, params, buffers, rest, make_optimizer(groups, None, tc.optim()), schedule)


def _learned_mask(cfg: V4Config | V41Config, include_hash: bool) -> np.ndarray:
    if isinstance(cfg, V41Config):  # no hash layers
        return np.ones(cfg.n_layers, np.float32)
    return np.asarray([include_hash or r is RouterKind.LEARNED for r in cfg.router_types], np.float32)


def gate_biases(cfg: V4Config | V41Config) -> dict[str, np.ndarray]:
    """{the buffer name of every learned router's selection bias: the main layer of each of its rows}, an
    int array shaped like the bias's leading (stacked) axes: V4's stages [repeats], V4.1's runs
    `stack_dims` (`layer_plan`)."""
    out = {}
    if isinstance(cfg, V41Config):
        for s, ids in enumerate(layer_plan(cfg)):
            for q, run in enumerate(ids):
                layers = np.asarray(run)  # [repeats, count]
                out[f"segments.{s}.runs.{q}.ffn.gate.bias"] = layers.reshape(stack_dims(run))
        return out
    offset = 0
    for s, (unit, repeats) in enumerate(stage_units(cfg)):
        for p, (_, router) in enumerate(unit):
            if router is RouterKind.LEARNED:
                out[f"stages.{s}.blocks.{p}.ffn.gate.bias"] = offset + np.arange(repeats) * len(unit) + p
        offset += repeats * len(unit)
    return out


def _bias_updates(buffers: dict, load: jax.Array, mtp_load: jax.Array | None, speed: float,
                  biases: dict[str, np.ndarray]) -> dict:
    """Apply the aux-loss-free update to every Gate.bias. load [L, E] in main-layer order; biases:
    `gate_biases`."""
    out = dict(buffers)
    for name, layers in biases.items():
        out[name] = losses.bias_update(buffers[name], load[layers], speed)  # [*stack, E]
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


class Predictions(NamedTuple):
    """What the loss reads from one micro-batch's forward, for either model family."""

    logits: jax.Array  # [B, T, V] fp32
    targets: jax.Array  # [B, T]
    mask: jax.Array | None  # [B, T] bool: predictions inside one document (None: all)
    routing: RoutingStats  # [L, B, E] per main layer
    mtp_logits: jax.Array | None = None  # [B, T-1, V] (V4 with MTP)
    mtp_mask: jax.Array | None = None  # [B, T-1]
    mtp_routing: RoutingStats | None = None  # [B, E]
    indexer: tuple[IndexerTraces, ...] | None = None  # (indexer_loss_weight > 0) V4: one, its CSA layers stacked;
    # V4.1: one per index source (their top-k widths differ)


def _predict_v4(tc: TrainConfig, cfg: V4Config, model: Transformer, micro: jax.Array) -> Predictions:
    """micro [B, T+1] token ids."""
    inputs, targets = micro[:, :-1], micro[:, 1:]
    segments = main_mask = mtp_mask = None
    if tc.document_mask:  # sample-level masking (architecture.md §8.5): eos closes each packed document
        row_segments = eos_segments(micro, cfg.eos_token_id)  # [B, T+1]
        segments = row_segments[:, :-1]
        main_mask, mtp_mask = losses.packed_targets_mask(segments, row_segments[:, 1:])
    out = model(inputs, segment_ids=segments, return_indexer_traces=tc.indexer_loss_weight > 0)
    return Predictions(out.logits, targets, main_mask, out.routing, out.mtp_logits, mtp_mask, out.mtp_routing,
                       None if out.indexer is None else (out.indexer,))


def _predict_v41(tc: TrainConfig, model: V41Transformer, micro: dict) -> Predictions:
    """micro {"tokens": [B, T+1], "engram": [B, T, n_engram_layers, cols] (Engram models)}."""
    tokens = micro["tokens"]
    out = model(tokens[:, :-1], micro.get("engram"), return_hidden_states=False,
                return_indexer_traces=tc.indexer_loss_weight > 0)
    return Predictions(out.logits, tokens[:, 1:], None, out.routing, indexer=out.indexer)


def batch_layout(tc: TrainConfig, cfg: V4Config | V41Config):
    """The step's batch as (global shape, logical axes) leaves: V4 one [B, grad_accum, T+1] token array;
    V4.1 {"tokens": that, "engram": [B, grad_accum, T, n_engram_layers, cols] rows} (the n-gram hash is
    host-side, `v4jax.train.data.EngramRows`)."""
    tokens = ((tc.batch_size, tc.grad_accum, tc.seq_len + 1), BATCH_AXES)
    if not isinstance(cfg, V41Config):
        return tokens
    out = {"tokens": tokens}
    if cfg.engram_layer_ids:
        cols = (cfg.engram_max_ngram_size - 1) * cfg.engram_n_heads
        out["engram"] = ((tc.batch_size, tc.grad_accum, tc.seq_len, len(cfg.engram_layer_ids), cols),
                         ("batch", None, "seq", None, None))
    return out


def _is_layout(x) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)


def make_loss(tc: TrainConfig, setup: Setup) -> Callable:
    """loss_fn(params, buffers, micro, hyper) -> (total, (parts, load [L, E], mtp_load [E])); micro: one
    micro-batch of `batch_layout` (without the grad_accum axis)."""
    cfg = setup.cfg
    mask = jnp.asarray(_learned_mask(cfg, tc.balance_hash_layers))

    def loss_fn(params, buffers, micro, hyper):
        model = nnx.merge(setup.graphdef, unflat_params(setup.param_template, params),
                          unflat_params(setup.buffer_template, buffers), setup.rest)
        out = _predict_v41(tc, model, micro) if isinstance(cfg, V41Config) else _predict_v4(tc, cfg, model, micro)
        parts = {"ce": losses.cross_entropy(out.logits, out.targets, out.mask)}
        total = parts["ce"]
        if out.mtp_logits is not None:
            parts["mtp"] = losses.mtp_cross_entropy(out.mtp_logits, out.targets, out.mtp_mask)
            total = total + hyper["mtp_weight"] * parts["mtp"]
        stats = out.routing
        bal = losses.balance_loss(stats._replace(balance=stats.balance * mask[:, None]), cfg.n_activated_experts)
        if out.mtp_routing is not None:
            bal = bal + losses.balance_loss(out.mtp_routing, cfg.n_activated_experts)
        parts["balance"] = bal
        total = total + tc.balance_alpha * bal
        if out.indexer:  # the indexers' KL (architecture.md §8.2); trains only the indexers (indexer_detach)
            parts["indexer"] = sum(losses.indexer_kl_loss(*t) for t in out.indexer)
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
    biases = gate_biases(cfg)
    grad_fn = jax.value_and_grad(make_loss(tc, setup), has_aux=True)

    def step_fn(state, batch, hyper):
        params, buffers, step = state["params"], state["buffers"], state["step"]
        batch = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), batch)  # [A, B, ...]: one micro-batch per scan step
        A = jax.tree.leaves(batch)[0].shape[0]

        def micro_step(carry, micro):
            return jax.tree.map(jnp.add, carry, grad_fn(params, buffers, micro, hyper)), None

        first = jax.tree.map(lambda x: x[0], batch)
        if A == 1:
            (loss, aux), grads = grad_fn(params, buffers, first, hyper)
        else:  # sum over micro-batches in fp32 (one traced copy of the model), then the mean
            shapes = jax.eval_shape(grad_fn, params, buffers, first, hyper)
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
               "buffers": _bias_updates(buffers, load, mtp_load, tc.bias_update_speed, biases)}
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



# --------------------------------------------------------------------------------------------------
# The compiled program (shared by `train` and the TPU dry run, so both compile the same step)

@dataclasses.dataclass(frozen=True)
class StepProgram:
    """`make_step` jitted with the state's shardings, and the abstract arguments to lower it with."""

    tc: TrainConfig
    setup: Setup
    shardings: dict  # {"params", "buffers", "opt", "step", "rng"} -> NamedShardings
    state: dict  # abstract state (ShapeDtypeStructs with shardings)
    batch: Any  # `batch_layout` as ShapeDtypeStructs (int32): [B, grad_accum, T+1] tokens (V4.1: and Engram rows)
    hyper: dict  # abstract `hyperparams`
    jitted: Callable  # (state, batch, hyper) -> (state, metrics), state donated
    init: Callable  # () -> a fresh state (jit it with out_shardings=shardings)

    def lower(self):
        return self.jitted.lower(self.state, self.batch, self.hyper)

    def loss_terms(self) -> list[str]:
        """The loss terms the compiled step adds up (CE always)."""
        cfg, tc = self.setup.cfg, self.tc
        indexer = tc.indexer_loss_weight > 0 and (bool(cfg.index_source_layers) if isinstance(cfg, V41Config)
                                                  else AttentionKind.CSA in cfg.layer_types)
        return ["ce"] + (["mtp"] if cfg.n_mtp_layers else []) + ["balance"] + (["indexer"] if indexer else [])


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
        model = build_model(cfg, tc.seed, tc.run_options())
        _, p, b, _ = nnx.split(model, nnx.Param, Buffer, ...)
        p, b = flat_params(p), flat_params(b)
        return {"params": p, "buffers": b, "opt": setup.tx.init(p), "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.key_data(jax.random.key(tc.seed))}

    spec = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # noqa: E731
    state = jax.tree.map(spec, jax.eval_shape(init), shardings)
    layout = batch_layout(tc, cfg)
    batch_sharding = jax.tree.map(lambda la: data_sharding(mesh, rules, *la), layout, is_leaf=_is_layout)
    batch = jax.tree.map(lambda la, sh: jax.ShapeDtypeStruct(la[0], jnp.int32, sharding=sh), layout, batch_sharding,
                         is_leaf=_is_layout)
    hyper = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                         hyperparams(tc, setup.schedule, 0))
    step_fn = make_step(tc, setup)

    def step(state, batch, hyper):
        with use_mesh_rules(mesh, rules):  # traced under the rules: activations constrained, kernels per device
            return step_fn(state, batch, hyper)

    # metrics (scalars and [L, E] loads) replicated: every process can read them
    jitted = jax.jit(step, in_shardings=(shardings, batch_sharding, replicated), out_shardings=(shardings, replicated),
                     donate_argnums=(0,), compiler_options=compiler_options(mesh))
    return StepProgram(tc, setup, shardings, state, batch, hyper, jitted, init)
