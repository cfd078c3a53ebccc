"""Packed rows: several documents in one row, each seen as if it were alone (architecture.md §8.5).

A training row packs documents back to back; `segment_ids [B, T]` (equal ids on one document's tokens,
documents contiguous) says where each starts. Everything that would cross a boundary follows from
two per-token facts, computed once at the top of the forward:

* the token's position inside its document (RoPE, the compressors' windows and position bias restart
  at every document, so a document's compressed entries are the ones it gets alone);
* the row index of its document's first token (the sliding window stops there).

Compressed entries of ratio m are laid out per row in document order: document 1's entries, then
document 2's, ... (`entry_layout`); a query sees the entries [entry_start, entry_start + (p+1) // m)
of its own document, p its position in the document. Without documents every bound is the plain
causal one (entry_start 0, p = t), and the entry layout is the usual one entry per m tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Documents(NamedTuple):
    """Per token of a packed row [B, T]."""

    positions: jax.Array  # [B, T] int32: position inside its document (0 at each document's first token)
    key_start: jax.Array  # [B, T] int32: row index of its document's first token (the window's lower bound)
    counted: jax.Array | None = None  # [B, T] bool: positions the per-document routing statistics count
    # (None: all; the MTP block leaves out each document's last position, whose input straddles a boundary)


def documents(segment_ids: jax.Array) -> Documents:
    """segment_ids [B, T] (any integers; a new document starts wherever the id changes) -> Documents."""
    B, T = segment_ids.shape
    t = jnp.arange(T, dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    key_start = jax.lax.cummax(jnp.where(starts, t, 0), axis=1)  # [B, T]
    return Documents(t - key_start, key_start)


def eos_segments(tokens: jax.Array, eos_id: int) -> jax.Array:
    """Segment ids of a packed row whose documents each end with eos (the data pipeline's packing,
    architecture.md §8.5): the eos token closes its document, the next token opens the next one."""
    ends = (tokens == eos_id).astype(jnp.int32)
    return jnp.cumsum(ends, axis=1) - ends  # [B, T]: eos counted from the token after it


class EntryLayout(NamedTuple):
    """Where the compressed entries of ratio m of a packed row come from, and who sees them."""

    first_token: jax.Array  # [B, N] int32: row index of entry n's first token (N = T // m; unused slots 0)
    local_index: jax.Array  # [B, N] int32: entry n's index inside its document (RoPE at m * local_index)
    entry_start: jax.Array  # [B, T] int32: id of the first entry of the token's document


def entry_layout(docs: Documents, m: int) -> EntryLayout:
    """Entries of ratio m in document order: a document of length L contributes L // m entries (its
    trailing partial window pools nothing, as for a document alone), so N = T // m always suffices."""
    B, T = docs.positions.shape
    N = T // m
    t = jnp.arange(T, dtype=jnp.int32)
    ends = (docs.positions + 1) % m == 0  # [B, T]: token t completes an entry of its document
    count = jnp.cumsum(ends.astype(jnp.int32), axis=1)  # entries completed up to and including t
    slot = jnp.where(ends, count - 1, N)  # N: out of range, dropped
    put = jax.vmap(lambda s, v: jnp.zeros((N,), jnp.int32).at[s].set(v, mode="drop"))
    first_token = put(slot, jnp.broadcast_to(t - m + 1, (B, T)))
    local_index = put(slot, (docs.positions + 1) // m - 1)
    before = count - ends  # entries completed strictly before t
    entry_start = jnp.take_along_axis(before, docs.key_start, axis=1)  # entries of the earlier documents
    return EntryLayout(first_token, local_index, entry_start)
