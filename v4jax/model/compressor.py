"""Token-level KV compressor (architecture.md §4.3).

Every `m` tokens become one compressed entry: a per-channel softmax over the window's gate logits
(plus a learned position bias `ape`) weighting the window's values. CSA's compressor overlaps: entry
i pools its own window (channels [c, 2c)) and the previous window (channels [0, c)), 2m candidates.
HCA's does not. All compressor arithmetic is fp32; the entry is RMS-normalised, cast to the compute
dtype and rotated (RoPE at position m*i, the layer's table).

One computation serves every call (architecture.md §4.7): the tokens of the windows still open in the state
(none without a state) followed by the new tokens form whole windows; each window completed by a
new token is pooled. Without a state the call covers positions 0..T-1 and returns its T // m entries;
with one, the completed entries are written into the state's entry buffer (the entry completed by
token t is visible to t) and the new tokens' values and logits into its rings.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from v4jax.model.documents import EntryLayout
from v4jax.model.layers import Linear, RMSNorm, param
from v4jax.model.numerics import Stored, decode, encode_as, fp8_nope, rotate_fp4
from v4jax.model.rope import apply_rope


class CompressorState(NamedTuple):
    """A compressor's cache for B sequences (architecture.md §4.7). kappa = 2 (CSA, overlapping) or 1 (HCA)."""

    values: jax.Array  # [B, kappa m, kappa c] fp32 ring: per-token values, slot = position mod kappa m
    logits: jax.Array  # [B, kappa m, kappa c] fp32 ring: gate logits + ape, -inf where no token
    entries: Stored  # [B, N, c] compressed entries by index (N = max_len // m), stored as `init_cache` chose


class Compressor(nnx.Module):
    """[B, T, d] -> compressed entries. ratio m; width c (head_dim for attention, index_head_dim for
    the indexer); overlap=True for CSA. Only complete windows produce entries (a trailing partial
    window waits in the state, or is dropped without one, architecture.md §4.3)."""

    def __init__(self, dim: int, width: int, ratio: int, overlap: bool, norm_eps: float, *, param_dtype,
                 rngs: nnx.Rngs, release: bool = False, rotate: bool = False):
        kappa = 2 if overlap else 1
        self.wkv = Linear(dim, kappa * width, ("embed", "compress_width"), param_dtype=param_dtype, rngs=rngs)
        self.wgate = Linear(dim, kappa * width, ("embed", "compress_width"), param_dtype=param_dtype, rngs=rngs)
        self.ape = param(rngs, (ratio, kappa * width), (None, None), jnp.float32, init="zeros")  # small: replicated
        self.norm = RMSNorm(width, norm_eps, "head_dim", rngs=rngs)
        self.width, self.ratio, self.overlap = width, ratio, overlap
        # release numerics (architecture.md §10.3): the entry is rounded as DeepSeek's code stores it, FP8 on
        # the non-RoPE dims (attention) or rotated + FP4 (rotate: the indexer's keys)
        self.release, self.rotate = release, rotate

    def __call__(self, x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, state: CompressorState | None = None,
                 n_valid: jax.Array | None = None, layout: EntryLayout | None = None
                 ) -> tuple[jax.Array, CompressorState | None]:
        """x [B, T, d] at positions [B, T] (consecutive per row; 0..T-1 without a state); n_valid [B]:
        real tokens per row (the rest is right padding that never enters a window or the state).
        layout (stateless packed rows, architecture.md §8.5): where each document's windows lie; positions
        are then positions inside the document. Returns (entries, state): [B, T // m, c] and None
        without a state, else the updated entry buffer [B, N, c] and state."""
        B, T, _ = x.shape
        m, c = self.ratio, self.width
        kappa = 2 if self.overlap else 1
        x32 = x.astype(jnp.float32)
        new_v = self.wkv(x32, jnp.float32)  # [B, T, kappa c]
        new_l = self.wgate(x32, jnp.float32) + self.ape[...].astype(jnp.float32)[positions % m]  # ape by place

        if state is None:  # windows 0..T//m - 1 of this call alone
            n_win = T // m
            if n_win == 0:
                return jnp.zeros((B, 0, c), x.dtype), None
            if layout is None:
                seq_v, seq_l = new_v[:, :n_win * m], new_l[:, :n_win * m]
            else:  # each entry's m tokens gathered from its document: [B, n_win * m, kappa c]
                rows = (layout.first_token[:, :, None] + jnp.arange(m)).reshape(B, -1, 1)
                seq_v, seq_l = (jnp.take_along_axis(a, rows, axis=1) for a in (new_v, new_l))
            first = jnp.zeros((B,), jnp.int32)  # entry id of the first window
        else:  # the state's open windows (from `base`), then the new tokens
            start = positions[:, 0]
            base = (start // m - (kappa - 1)) * m  # first token of the oldest window still needed
            offset = start - base  # where the new tokens go: (kappa-1) m + (start mod m)
            seq_v, seq_l = open_windows(state.values, state.logits, new_v, new_l, base, offset, m)
            n_win = seq_v.shape[1] // m
            first = base // m

        values = seq_v.reshape(B, n_win, m, -1)  # [B, n_win, m, kappa c]
        logits = seq_l.reshape(B, n_win, m, -1)
        opens = None if layout is None else layout.local_index == 0  # [B, n_win]: a document's first entry
        if self.overlap:
            values, logits = _overlap_candidates(values, logits, c, opens)  # [B, n_win, 2m, c]
        weights = jax.nn.softmax(logits, axis=2)  # per channel over the window's candidates
        pooled = jnp.sum(weights * values, axis=2)  # [B, n_win, c] fp32
        index = first[:, None] + jnp.arange(n_win) if layout is None else layout.local_index  # window id
        dtype = x.dtype
        if self.release:  # model.py casts the pooled entry to BF16 before its norm
            pooled = pooled.astype(jnp.bfloat16)
        entries = apply_rope(self.norm(pooled).astype(dtype), m * index, inv_freq)  # RoPE at the window's 1st token
        if self.release:
            entries = rotate_fp4(entries) if self.rotate else fp8_nope(entries, 2 * len(inv_freq))
        if state is None:
            return entries, None

        n_valid = jnp.full((B,), T, jnp.int32) if n_valid is None else n_valid
        k = jnp.arange(n_win)[None, :]
        done = (k >= kappa - 1) & ((k + 1) * m <= (offset + n_valid)[:, None])  # whole, not emitted before
        index = jnp.where(done, index, jax.tree.leaves(state.entries)[0].shape[1])  # N: out of range, dropped
        buffer = jax.tree.map(lambda e, v: jax.vmap(lambda e, i, v: e.at[i].set(v, mode="drop"))(e, index, v),
                              state.entries, encode_as(state.entries, entries))
        start = positions[:, 0]
        return decode(buffer, dtype), CompressorState(ring_write(state.values, new_v, start, n_valid),
                                                      ring_write(state.logits, new_l, start, n_valid), buffer)


def _overlap_candidates(values: jax.Array, logits: jax.Array, c: int, opens: jax.Array | None = None):
    """CSA's two series: entry i = own window's channels [c, 2c) and window i-1's channels [0, c).
    The first window has no predecessor here: value 0, logit -inf (softmax weight 0); nor has the
    first window of each document of a packed row (opens [B, n_win])."""
    own_v, own_l = values[..., c:], logits[..., c:]
    prev_v = jnp.pad(values[:, :-1, :, :c], ((0, 0), (1, 0), (0, 0), (0, 0)))
    prev_l = jnp.pad(logits[:, :-1, :, :c], ((0, 0), (1, 0), (0, 0), (0, 0)), constant_values=-jnp.inf)
    if opens is not None:
        prev_v = jnp.where(opens[:, :, None, None], 0.0, prev_v)
        prev_l = jnp.where(opens[:, :, None, None], -jnp.inf, prev_l)
    return jnp.concatenate([prev_v, own_v], axis=2), jnp.concatenate([prev_l, own_l], axis=2)


def open_windows(values: jax.Array, logits: jax.Array, new_v: jax.Array, new_l: jax.Array, base: jax.Array,
                 offset: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
    """The tokens of the windows still open in a compressor's rings (values, logits [B, S, w], slot =
    position mod S; positions base .. base + S - 1) with the new tokens new_v, new_l [B, T, w] written
    from `offset` = their start - base, padded to whole windows of m: [B, n m, w] each (logits -inf
    where no token). Shared by V4's compressors and V4.1's ratio-2 one."""
    S, T = values.shape[1], new_v.shape[1]
    n = -(-(S + T) // m)
    pad = ((0, 0), (0, n * m - S), (0, 0))
    seq_v = jnp.pad(ring_read(values, base + S), pad)
    seq_l = jnp.pad(ring_read(logits, base + S), pad, constant_values=-jnp.inf)
    put = jax.vmap(lambda buf, v, o: jax.lax.dynamic_update_slice_in_dim(buf, v, o, axis=0))
    return put(seq_v, new_v, offset), put(seq_l, new_l, offset)


def ring_read(ring: jax.Array, start: jax.Array) -> jax.Array:
    """ring [B, S, ...] (slot = position mod S) -> [B, S, ...] in position order from start - S."""
    S = ring.shape[1]
    idx = (start[:, None] + jnp.arange(S)) % S  # slot of position start - S + i
    return jnp.take_along_axis(ring, idx.reshape(*idx.shape, *([1] * (ring.ndim - 2))), axis=1)


def ring_write(ring: Stored, new: jax.Array, start: jax.Array, n_valid: jax.Array) -> Stored:
    """Write the last min(n_valid, S) valid rows of new [B, T, ...] (positions start + j) into their
    slots (position mod S) of ring [B, S, ...] (a plain array or a release storage format)."""
    S, T = jax.tree.leaves(ring)[0].shape[1], new.shape[1]
    j = jnp.arange(T)[None, :]
    keep = (j < n_valid[:, None]) & (j >= n_valid[:, None] - S)  # no two kept rows share a slot
    slot = jnp.where(keep, (start[:, None] + j) % S, S)  # S = out of range: dropped
    write = jax.vmap(lambda r, s, v: r.at[s].set(v, mode="drop"))
    return jax.tree.map(lambda r, v: write(r, slot, v), ring, encode_as(ring, new))  # per stored part
