"""The optimiser of architecture.md §8: Muon for matrices, AdamW for the rest, one learning-rate schedule.

Parameters travel through training as a flat dict `{dotted path: array}` (see `flat_params`), so the
split, the optimiser state and the checkpoints are all keyed by the same names.

Split (architecture.md §8.3):
  AdamW (beta 0.9/0.95, eps 1e-20, weight decay 0.1): the embedding, the LM head, every RMSNorm weight,
    the mHC static biases and gates (`*.base`, `*.scale`), and (spec leaves these open, architecture.md §11.6) the
    attention sinks and the compressor position tables `ape` (a positional bias, not a projection).
    Weight decay applies to the 2-D tables (embedding, head, ape) only: decaying norm gains and mHC
    gates towards zero is not what the report's "weight decay 0.1" is about (a choice; see docs).
    V4.1's Engram (architecture.md §12.4; its recipe is not published, choices): the tables on AdamW
    without weight decay (a step touches few of their rows; a decay would shrink every row every step),
    the per-stream gains `q_weight`, `k_weight` on AdamW without decay like the other gains.
  Muon: every other parameter. The matrix is a parameter's last two axes; the axes before them must
    be "layers" (scanned stacks), "experts" (each expert's w1/w2/w3 on its own) or "o_groups" (the
    grouped output projection as g separate blocks): one Newton–Schulz orthogonalisation per matrix.
    The router [d, E] is one matrix; `hc_*_fn` is one [24, n_hc*d] matrix (architecture.md §11.6 leaves both open).

Muon (architecture.md §8.4, report Algorithm 1), per matrix W [n, m] with gradient G:
  M <- mu M + G;  O' = HybridNS(mu M + G);  O = O' sqrt(max(n, m)) gamma;  W <- W (1 - lr wd) - lr O.
HybridNS: X0 = M / (|M|_F + eps), ten steps X <- a X + b (X X^T) X + c (X X^T)^2 X, (a, b, c) =
(3.4445, -4.7750, 2.0315) for steps 1-8 and (2, -1.5, 0.5) for steps 9-10; wide side kept as columns
so X X^T is the small Gram matrix.

`optax.contrib.muon` was checked against this and not used: its default update scale is
sqrt(max(1, n/m)) rather than gamma sqrt(max(n, m)), and it runs one coefficient triple for all steps;
the spec's algorithm is short enough to state here and test against numpy (tests/test_optim.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

NS_COEFFS = ((3.4445, -4.7750, 2.0315),) * 8 + ((2.0, -1.5, 0.5),) * 2  # architecture.md §8.4, ten steps
BATCH_AXES = ("layers", "experts", "o_groups")  # logical axes Muon treats as independent matrices
ADAMW_NAMES = ("embed.embedding", "head.kernel")  # top-level tables always on AdamW (architecture.md §8.3)
ENGRAM_ADAMW = ("table", "q_weight", "k_weight")  # V4.1 Engram: tables and gains on AdamW, no decay


# --------------------------------------------------------------------------------------------------
# Flat parameter dicts

def path_name(path) -> str:
    return ".".join(str(p) for p in path)


def flat_params(state: nnx.State) -> dict[str, Any]:
    """nnx.State -> {dotted path: value} (arrays, or ShapeDtypeStructs for an abstract state)."""
    return {path_name(p): v.get_value() for p, v in nnx.to_flat_state(state)}


def logical_axes(state: nnx.State) -> dict[str, tuple]:
    return {path_name(p): tuple(v.get_metadata().get("logical_axes") or ()) for p, v in nnx.to_flat_state(state)}


def unflat_params(template: nnx.State, flat: dict[str, Any]) -> nnx.State:
    """Put the arrays of `flat` back into the structure (and metadata) of `template`."""
    return nnx.from_flat_state([(p, v.replace(flat[path_name(p)])) for p, v in nnx.to_flat_state(template)])


# --------------------------------------------------------------------------------------------------
# The split

@dataclasses.dataclass(frozen=True)
class ParamGroup:
    optimizer: str  # "muon" | "adamw"
    batch_dims: tuple[int, ...] = ()  # Muon: dims that index independent matrices
    layer_dims: tuple[int, ...] = ()  # Muon: those of batch_dims that are stacked layers (never mesh-split)
    square_gram: bool = True  # Muon: Newton-Schulz's step form (`hybrid_newton_schulz`)
    decay: bool = True  # AdamW: whether weight decay applies


def split_params(axes: dict[str, tuple]) -> dict[str, ParamGroup]:
    """{name: ParamGroup} from each parameter's logical axes and name (architecture.md §8.3, see module doc)."""
    groups = {}
    for name, ax in axes.items():
        leaf = name.rsplit(".", 1)[-1]
        # The matrix is the last two axes (a router [d, E] is one matrix although E is "experts");
        # every axis before them must be a batch axis.
        lead = ax[:-2] if len(ax) >= 2 else ()
        vector = len(ax) < 2 or all(a in BATCH_AXES for a in ax[:-1]) and ax[-2] == "layers"
        if name in ADAMW_NAMES or leaf == "ape":
            groups[name] = ParamGroup("adamw", decay=True)
        elif ".engram." in f".{name}" and leaf in ENGRAM_ADAMW:
            groups[name] = ParamGroup("adamw", decay=False)
        elif vector:  # norms, sinks, mHC base/scale: vectors (possibly stacked over layers)
            groups[name] = ParamGroup("adamw", decay=False)
        elif all(a in BATCH_AXES for a in lead):
            # Routed experts are split over the mesh whole (the expert axis) and along both sides, so
            # their Gram square S S is split too; every other matrix is one per layer, split only along
            # its sides by the rules and computed alike on the devices of the other axes (the expert
            # axis among them), where a whole n x n S S on each device is the largest term (v4-pro's
            # wo_b: n = 7168)
            groups[name] = ParamGroup("muon", batch_dims=tuple(range(len(lead))),
                                      layer_dims=tuple(i for i, a in enumerate(lead) if a == "layers"),
                                      square_gram="experts" in lead)
        else:
            raise ValueError(f"{name}: axes {ax} are not a (batch of) matrix; Muon needs a matrix (add the "
                             f"extra axis to optim.BATCH_AXES or the name to the AdamW names)")
    return groups


# --------------------------------------------------------------------------------------------------
# Muon

def hybrid_newton_schulz(m: jax.Array, coeffs=NS_COEFFS, eps: float = 1e-7, dtype=jnp.float32,
                         square_gram: bool = True) -> jax.Array:
    """Approximately orthogonalise one matrix [n, m] (architecture.md §8.4); matmuls in `dtype` (fp32 or bf16).

    square_gram: each step as (b G + c G G) X (4 n^2 m + 2 n^3 FLOPs, n the short side), or, False, as
    b G X + c G (G X) (6 n^2 m): the same polynomial with no n x n x n product, for matrices split over
    the mesh only along their long side, whose Gram G is whole on every device (see `split_params`)."""
    wide = m.shape[0] <= m.shape[1]
    x = (m if wide else m.T).astype(jnp.float32)
    x = (x / (jnp.linalg.norm(x) + eps)).astype(dtype)

    def ns_step(x, abc):  # every product in `dtype`; the fp32 coefficients combine its results in fp32
        a, b, c = abc[0], abc[1], abc[2]
        gram = x @ x.T  # [n, n], n = min side
        if square_gram:
            poly = (b * gram + c * (gram @ gram)).astype(dtype)  # [n, n]
            return (a * x + poly @ x).astype(dtype), None
        gx = gram @ x  # [n, m]
        return (a * x + b * gx + c * (gram @ gx)).astype(dtype), None

    x, _ = jax.lax.scan(ns_step, x, jnp.asarray(coeffs, jnp.float32))  # one loop body: small programs
    x = x.astype(jnp.float32)
    return x if wide else x.T


def orthogonalize(g: jax.Array, batch_dims: tuple[int, ...], dtype=jnp.float32,
                  sequential: tuple[int, ...] = (), square_gram: bool = True) -> jax.Array:
    """HybridNS of every matrix of `g`: the dims in batch_dims index independent matrices.

    Dims in `sequential` (a subset of batch_dims: the layer repeats of a scanned stage, never split
    over the mesh) are mapped one slice at a time with lax.map; the others (experts, split over the
    mesh) are vmapped; no reshape merges them. So experts stay split and Newton-Schulz's working set
    is one layer's matrices, not the whole stack (with one vmap over a merged [repeats x experts]
    dim, the Muon train dry runs needed 140-210 GiB of temporaries per device; AdamW's needed 37)."""
    order = [d for d in batch_dims if d in sequential] + [d for d in batch_dims if d not in sequential]
    n_seq = len(order) - len([d for d in batch_dims if d not in sequential])
    f = lambda x: hybrid_newton_schulz(x, dtype=dtype, square_gram=square_gram)  # noqa: E731
    for _ in order[n_seq:]:
        f = jax.vmap(f)
    for _ in order[:n_seq]:
        f = functools.partial(jax.lax.map, f)
    front = list(range(len(order)))
    return jnp.moveaxis(f(jnp.moveaxis(g, order, front)), front, order)


class MuonState(NamedTuple):
    momentum: Any  # fp32, like the params


def scale_by_muon(batch_dims: dict[str, tuple[int, ...]], momentum: float = 0.95, update_rms: float = 0.18,
                  ns_dtype=jnp.float32, layer_dims: dict[str, tuple[int, ...]] | None = None,
                  square_gram: dict[str, bool] | None = None) -> optax.GradientTransformation:
    """Muon's direction O (before the learning rate and weight decay) for a flat dict of matrices.

    batch_dims: {name: dims indexing independent matrices}; layer_dims: {name: those that are stacked
    layers}, orthogonalised one layer at a time (see `orthogonalize`); square_gram: {name: the step form}
    (default True, see `hybrid_newton_schulz`). Leaves may be optax.MaskedNode
    (inside multi_transform) and are then skipped."""

    def init(params):
        return MuonState(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))

    def update(grads, state, params=None):
        del params
        mom = jax.tree.map(lambda m, g: momentum * m + g.astype(jnp.float32), state.momentum, grads)

        def one(path, m, g):
            name = path[0].key
            dims = batch_dims[name]
            n, k = (g.shape[i] for i in range(g.ndim) if i not in dims)
            o = orthogonalize(momentum * m + g.astype(jnp.float32), dims, ns_dtype,  # Nesterov form
                              (layer_dims or {}).get(name, ()), (square_gram or {}).get(name, True))
            return o * (math.sqrt(max(n, k)) * update_rms)

        return jax.tree_util.tree_map_with_path(one, mom, grads), MuonState(mom)

    return optax.GradientTransformation(init, update)


# --------------------------------------------------------------------------------------------------
# Schedules

@dataclasses.dataclass(frozen=True)
class Schedule:
    """Linear warm-up to `peak`, constant, then cosine decay to `final` over the last `decay_steps`
    (architecture.md §8.5 shape). The MTP loss weight drops from 0.3 to 0.1 when the decay starts (architecture.md §6)."""

    peak: float
    final: float
    warmup_steps: int
    total_steps: int
    decay_steps: int
    mtp_weight: float = 0.3
    mtp_weight_decay_phase: float = 0.1

    @property
    def decay_start(self) -> int:
        return max(self.warmup_steps, self.total_steps - self.decay_steps)

    def lr(self, step) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warm = self.peak * jnp.minimum(1.0, (step + 1) / max(1, self.warmup_steps))
        frac = jnp.clip((step - self.decay_start) / max(1, self.total_steps - self.decay_start), 0.0, 1.0)
        decayed = self.final + 0.5 * (self.peak - self.final) * (1 + jnp.cos(jnp.pi * frac))
        return jnp.where(step < self.decay_start, warm, decayed)

    def mtp(self, step) -> jax.Array:
        return jnp.where(jnp.asarray(step) < self.decay_start, self.mtp_weight, self.mtp_weight_decay_phase)


# --------------------------------------------------------------------------------------------------
# The whole optimiser

@dataclasses.dataclass(frozen=True)
class OptimConfig:
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    adam_eps: float = 1e-20
    weight_decay: float = 0.1
    muon_momentum: float = 0.95
    muon_update_rms: float = 0.18
    muon_ns_dtype: str = "float32"  # "bfloat16" on TPU (spec: bf16 matmuls are stable enough)
    clip_norm: float = 1.0  # global gradient-norm clip (0 = off)


def make_optimizer(groups: dict[str, ParamGroup], lr: Callable | float | None, oc: OptimConfig = OptimConfig()
                   ) -> optax.GradientTransformation:
    """clip (per `clip_group`) -> {Muon | AdamW} per group -> decoupled weight decay -> -lr.

    lr: a constant, a schedule of the optimiser's own update count, or None: then the updates are
    -(direction + wd * W) and the caller multiplies them by the learning rate (v4jax.train.step does, so
    the schedule is a runtime input of the compiled step)."""
    labels = {n: (g.optimizer if g.optimizer == "muon" else ("adamw" if g.decay else "adamw_nodecay"))
              for n, g in groups.items()}
    muon_dims = {n: g.batch_dims for n, g in groups.items() if g.optimizer == "muon"}
    layer_dims = {n: g.layer_dims for n, g in groups.items() if g.optimizer == "muon"}
    square_gram = {n: g.square_gram for n, g in groups.items() if g.optimizer == "muon"}
    wd = oc.weight_decay

    def tail(decay: float):
        scale = optax.scale(-1.0) if lr is None else optax.scale_by_learning_rate(lr)
        return ([optax.add_decayed_weights(decay)] if decay else []) + [scale]

    muon = optax.chain(scale_by_muon(muon_dims, oc.muon_momentum, oc.muon_update_rms, jnp.dtype(oc.muon_ns_dtype),
                                     layer_dims, square_gram),
                       *tail(wd))
    adam = lambda decay: optax.chain(optax.scale_by_adam(oc.adam_b1, oc.adam_b2, oc.adam_eps, mu_dtype=jnp.float32),
                                     *tail(decay))
    tx = optax.multi_transform({"muon": muon, "adamw": adam(wd), "adamw_nodecay": adam(0.0)}, labels)
    return optax.chain(clip_by_group_norm(oc.clip_norm, clip_group), tx) if oc.clip_norm else tx


def clip_group(name: str) -> str:
    """Which gradients are clipped together. The lightning indexers learn only from their KL loss
    and everything else only from the LM losses (architecture.md §8.2, with indexer_detach), so each side has
    its own global norm: a large KL gradient must not shrink the step's LM update, or vice versa."""
    return "indexer" if ".indexer." in f".{name}." else "model"


def clip_by_group_norm(max_norm: float, group_of: Callable[[str], str]) -> optax.GradientTransformation:
    """optax.clip_by_global_norm applied separately to each group of a flat {name: gradient} dict."""
    def update(updates, state, params=None):
        del params
        groups: dict[str, list[str]] = {}
        for name in updates:
            groups.setdefault(group_of(name), []).append(name)
        out = {}
        for names in groups.values():
            norm = optax.global_norm([updates[n] for n in names])
            scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
            out.update({n: (updates[n] * scale).astype(updates[n].dtype) for n in names})
        return out, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
