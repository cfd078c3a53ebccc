"""Training losses (architecture.md §5.4, §6, architecture.md §8.2) and the aux-loss-free selection-bias update.

All in fp32. Shapes: logits [B, T, V]; targets [B, T]; RoutingStats load / mean_affinity [L, B, E]
(main layers) or [B, E] (MTP block).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from v4jax.model.moe import RoutingStats


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross entropy (fp32), over the positions where mask [B, T] is True (all if None)."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    if mask is None:
        return jnp.mean(lse - picked)
    return jnp.sum(jnp.where(mask, lse - picked, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def mtp_cross_entropy(mtp_logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """MTP loss (architecture.md §6): mtp_logits[:, t] (t < T-1) predicts token t+2 = targets[:, t+1];
    mask [B, T-1] or None as `cross_entropy`."""
    return cross_entropy(mtp_logits, targets[:, 1:], mask)


def packed_targets_mask(input_segments: jax.Array, target_segments: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Packed rows (architecture.md §8.5): which predictions stay inside one document. Segment ids of the
    inputs row[:-1] and the targets row[1:], [B, T] each -> (main [B, T]: target t in input t's
    document; MTP [B, T-1]: inputs t, t+1 and target t+1 in one document). A prediction across a
    boundary has no counterpart when the document is alone, so it is left out of the loss."""
    main = input_segments == target_segments
    mtp = (input_segments[:, :-1] == input_segments[:, 1:]) & main[:, 1:]
    return main, mtp


def balance_loss(stats: RoutingStats, n_activated: int) -> jax.Array:
    """Sequence-wise balance loss (architecture.md §5.4) without alpha: sum over layers of the mean over
    sequences of sum_e f_e P_e, f_e = E/(k T) * load_e, each packed document a sequence of its own
    (`routing_stats`). Only P_e carries a gradient (the load is a count of top-k choices). Works for
    [L, B] and [B] stats."""
    E = stats.load.shape[-1]
    per_layer = jnp.sum(stats.balance, axis=-1) / jnp.maximum(jnp.sum(stats.documents, axis=-1), 1.0)
    return E / n_activated * jnp.sum(per_layer)


def bias_update(bias: jax.Array, load: jax.Array, speed: float) -> jax.Array:
    """Aux-loss-free balancing (architecture.md §5.4): b_e += speed if expert e got fewer tokens than the
    mean, -= speed if more. bias [..., E]; load [..., E] (tokens per expert over the whole batch)."""
    mean = jnp.mean(load, axis=-1, keepdims=True)
    return bias + speed * jnp.sign(mean - load).astype(bias.dtype)


def imbalance(load: jax.Array) -> jax.Array:
    """max_e load_e / mean_e load_e per layer ([..., E] -> [...]); 1 = perfectly balanced."""
    return jnp.max(load, axis=-1) / jnp.maximum(jnp.mean(load, axis=-1), 1e-9)


def indexer_kl_loss(attention_mass: jax.Array, index_scores: jax.Array, valid: jax.Array,
                    selected: jax.Array | None = None) -> jax.Array:
    """Lightning-indexer training loss (architecture.md §8.2, V3.2 recipe adapted to compressed entries).

    Shapes [..., B, T, K] with any leading (layer) axes; K indexes candidate entries: the top-k set of
    each query (sparse stage) or every compressed entry (dense stage), see `indexer.IndexerTraces`.
    attention_mass: the main attention's probability on each entry, summed over heads (window keys
      and the sink excluded); the target, renormalised over the kept entries, never differentiated.
    index_scores: the indexer's scores I_{t,s} (logits of its distribution over the kept entries).
    valid [..., B or 1, T, K] bool: real, causally visible entries.
    selected: an extra bool mask (or None), e.g. a top-k set given as [B, T, N_c] in the dense layout.
    Returns, summed over the leading axes, the mean over queries with at least one kept entry of
    positive mass of KL(p_t || softmax(I_t)).
    """
    keep = valid if selected is None else valid & selected
    p = jnp.where(keep, jax.lax.stop_gradient(attention_mass).astype(jnp.float32), 0.0)
    total = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(total > 0, total, 1.0)
    # a finite floor instead of -inf: rows with nothing kept stay finite (and are dropped below)
    logq = jax.nn.log_softmax(jnp.where(keep, index_scores.astype(jnp.float32), -1e30), axis=-1)
    kl = jnp.sum(jnp.where(p > 0, p * (jnp.log(jnp.where(p > 0, p, 1.0)) - logq), 0.0), axis=-1)  # [..., B, T]
    rows = jnp.broadcast_to(jnp.any(keep, axis=-1) & (total[..., 0] > 0), kl.shape)
    per_layer = jnp.sum(jnp.where(rows, kl, 0.0), axis=(-2, -1)) / jnp.maximum(jnp.sum(rows, axis=(-2, -1)), 1)
    return jnp.sum(per_layer)
