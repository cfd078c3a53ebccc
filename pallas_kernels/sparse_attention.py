"""DeepSeek-V4 core attention (SWA / CSA / HCA, architecture.md §4) as Pallas TPU kernels, forward and backward.

Same function as `sparse_attention_reference.sparse_attention`: one fp32 softmax per (query, head) over
[window keys | compressed entries | sink], scale c**-0.5, key = value, output in q's dtype.

Layout. Every kernel works on a block of `block_q` queries x `block_h` heads, flattened to
rows = block_q * block_h (row r = query r // block_h, head r % block_h), so the single shared KV
head meets a [rows, c] query matrix in one MXU matmul. Per-row softmax statistics travel between
kernels as row vectors [1, rows] (log-sum-exp L and D = rowsum(dO * O)), stored in HBM as
[B, H / block_h, 1, T * block_h]: O(T * H) floats, no lane padding.

Online softmax with the sink as the starting point: the running max starts at the row's sink
logit and the running denominator at exp(sink - max) = 1, so the max is always finite and rows
with no visible key (or key blocks that are fully masked) need no special case.

Query-major kernels (forward, dq): grid (batch, head group, query block, step). Steps first walk
the key blocks of the window, (t - window, t], then (HCA) the compressed blocks with at least one
entry visible to the block's last query. Blocks outside a query block's range are skipped, and their
index map is clamped so no DMA is issued for them.
CSA (forward) gathers, per query, its k selected compressed rows from HBM with one DMA per row
(indices read from a blocked SMEM copy of topk_idx; -1 slots fetch row 0 and are masked), double
buffered across the queries of a block, and folds them into the same running softmax.

Backward: D = rowsum(dO * O) and dsinks = -sum exp(sink - L) * D are O(T * H) XLA ops.
  dq: query-major kernel as above (window + HCA), plus for CSA the per-query gather kernel.
  dkv (window) and dcompressed (HCA): key-major kernels, grid (batch, key block, head group, query
  step), accumulating over the heads and the query blocks that see the key block.
  dcompressed (CSA): the per-query gather kernel writes one fp32 row per (query, slot); a scan over
  query chunks of `chunk` queries scatter-adds them into [B, N, c], so the extra memory is
  O(B * chunk * k * c + B * N * c), independent of T beyond the output itself.
Nothing of size T x T or T x N is materialised; HCA's compute is O(T * T / ratio) by definition.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.sparse_attention_reference import sparse_attention as _reference_sparse_attention

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b
_NN = (((1,), (0,)), ((), ()))  # a @ b


def _dot(a, b, dims):
    """MXU product with fp32 accumulation; fp32 operands at full precision (bf16 ones are exact)."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def sparse_attention_reference(q, kv, sinks, window, compressed=None, topk_idx=None, ratio=0, chunk=512,
                               key_start=None, entry_start=None):
    """The pure-JAX reference twin (`sparse_attention_reference.sparse_attention`)."""
    return _reference_sparse_attention(q, kv, sinks, window, compressed, topk_idx, ratio, chunk, key_start,
                                       entry_start)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static shapes and block sizes shared by the forward and backward kernels."""
    mode: str  # "swa" | "hca" | "csa"
    B: int
    T: int
    Tp: int  # T padded to the query and key blocks
    H: int
    c: int
    window: int
    ratio: int
    N: int  # compressed entries (0 for SWA)
    Np: int  # N padded to the compressed block
    k: int  # CSA slots per query
    bq: int
    bk: int  # window key block (and HCA compressed block)
    bh: int
    chunk: int  # CSA backward: queries per scatter-add chunk (multiple of bq, divides Tp)
    interpret: bool

    @property
    def G(self):
        return self.H // self.bh

    @property
    def rows(self):
        return self.bq * self.bh

    @property
    def nQ(self):
        return self.Tp // self.bq

    @property
    def nK(self):
        return self.Tp // self.bk

    @property
    def nC(self):
        return self.Np // self.bk

    @property
    def scale(self):
        return self.c ** -0.5

    @property
    def n_window_steps(self):
        return min((self.bq + self.window - 2) // self.bk + 2, self.nK)

    @property
    def n_steps(self):
        return self.n_window_steps + (self.nC if self.mode == "hca" else 0)


# ----------------------------------------------------------------------------------------------
# Block ranges (used both in index maps and in kernels; all int32 scalar arithmetic).

def _div(a, b: int):
    """a // b for a >= 0 (truncating division: Mosaic lowers it directly, floor division it does not)."""
    return jax.lax.div(jnp.asarray(a, jnp.int32), jnp.int32(b))


def _window_block(p: _Plan, i, j):
    """Key block for query block i at window step j, and whether that step holds any window key."""
    first = _div(jnp.maximum(i * p.bq - p.window + 1, 0), p.bk)
    last = _div(i * p.bq + p.bq - 1, p.bk)
    return jnp.minimum(first + j, last), (first + j <= last) & (j < p.n_window_steps)


def _hca_block(p: _Plan, i, j):
    """Compressed block for query block i at step j (HCA part starts after the window steps)."""
    visible = jnp.minimum(_div(i * p.bq + p.bq, p.ratio), p.N)  # entries the block's last query sees
    n_blocks = _div(visible + p.bk - 1, p.bk)
    jc = j - p.n_window_steps
    return jnp.clip(jc, 0, jnp.maximum(n_blocks - 1, 0)), (jc >= 0) & (jc < n_blocks)


def _window_query_block(p: _Plan, kb, j):
    """Query block at step j of the key-major pass over window key block kb."""
    first = _div(kb * p.bk, p.bq)
    last = jnp.minimum(_div(kb * p.bk + p.bk + p.window - 2, p.bq), p.nQ - 1)
    return jnp.minimum(first + j, last), first + j <= last


def _hca_query_block(p: _Plan, cb, j):
    """Query block at step j of the key-major pass over compressed block cb (first viewer onwards)."""
    first = _div((cb * p.bk + 1) * p.ratio - 1, p.bq)  # query (s + 1) * ratio - 1 is the first to see entry s
    return jnp.clip(first + j, 0, p.nQ - 1), first + j <= p.nQ - 1


# ----------------------------------------------------------------------------------------------
# Masks on [rows, keys] logits. row_t: [rows, 1] query positions; key positions are a [1, n] row.
# bounds: ([rows, 1] key_start, [rows, 1] entry_start) of each row's document (packed rows,
# architecture.md §8.5; zeros for one document per row).

def _window_mask(p: _Plan, row_t, kb, bounds):
    key_pos = kb * p.bk + jax.lax.broadcasted_iota(jnp.int32, (1, p.bk), 1)
    return (key_pos <= row_t) & (key_pos > row_t - p.window) & (key_pos >= bounds[0])


def _hca_mask(p: _Plan, row_t, cb, bounds):
    key_start, entry_start = bounds
    entry = cb * p.bk + jax.lax.broadcasted_iota(jnp.int32, (1, p.bk), 1)
    # entry_start <= entry < entry_start + floor((t - key_start + 1) / ratio), without a division
    return ((entry >= entry_start) & ((entry - entry_start) * p.ratio + p.ratio - 1 <= row_t - key_start)
            & (entry < p.N))


def _row_positions(p: _Plan, row_offset_ref, i):
    return i * p.bq + row_offset_ref[...].T  # [rows, 1]


def _row_bounds(bounds_ref):
    """[1, 2, rows] block -> (key_start, entry_start), each [rows, 1]."""
    return bounds_ref[0, pl.ds(0, 1), :].T, bounds_ref[0, pl.ds(1, 1), :].T


def _logits(p: _Plan, q2, keys, mask):
    s = _dot(q2, keys, _NT) * p.scale
    return jnp.where(mask, s, -jnp.inf)


# ----------------------------------------------------------------------------------------------
# CSA gather: one DMA per selected row, HBM -> VMEM.

def _rows_for_dma(comp):
    """[B, N, c] -> [B, N, 1, w] 32-bit words: each entry its own (1, w) tile, so one DMA can fetch any
    single entry (Mosaic only DMAs whole (8, 128) tiles of a [N, c] array). bf16 entries are packed
    two to a uint32 word, column j with column j + c/2, so the gathered block is dense 32-bit data
    (re-tiling packed bf16 rows is slow) and unpacks with two bit operations."""
    B, N, c = comp.shape
    if comp.dtype == jnp.float32:
        return comp.reshape(B, N, 1, c)
    bits = jax.lax.bitcast_convert_type(comp, jnp.uint16).astype(jnp.uint32)
    return (bits[..., : c // 2] | (bits[..., c // 2:] << 16)).reshape(B, N, 1, c // 2)


def _gather_buffer(p: _Plan, dtype):
    width = p.c if dtype == jnp.float32 else p.c // 2
    return pltpu.VMEM((2, p.k, 1, width), jnp.float32 if dtype == jnp.float32 else jnp.uint32)


def _unpack_rows(p: _Plan, words, dtype):
    """[k, 1, w] gathered words -> [k, c] entries in `dtype` (inverse of `_rows_for_dma`)."""
    words = words.reshape(p.k, words.shape[-1])
    if dtype == jnp.float32:
        return words
    low = jax.lax.bitcast_convert_type(words << 16, jnp.float32)  # bf16 -> fp32 is a 16-bit shift
    high = jax.lax.bitcast_convert_type(words & jnp.uint32(0xFFFF0000), jnp.float32)
    return jnp.concatenate([low, high], axis=1).astype(dtype)


def _start_gather(p: _Plan, comp_hbm, idx_smem, b, t, buf, sem, slot):
    def body(u, carry):
        n = jnp.maximum(idx_smem[0, t, u], 0)  # empty slots fetch row 0 (masked later)
        pltpu.make_async_copy(comp_hbm.at[b, pl.ds(n, 1)], buf.at[slot, pl.ds(u, 1)], sem.at[slot]).start()
        return carry
    jax.lax.fori_loop(0, p.k, body, 0)


def _wait_gather(p: _Plan, comp_hbm, buf, sem, slot):
    def body(u, carry):
        pltpu.make_async_copy(comp_hbm.at[0, pl.ds(0, 1)], buf.at[slot, pl.ds(0, 1)], sem.at[slot]).wait()
        return carry
    jax.lax.fori_loop(0, p.k, body, 0)


def _for_each_query_gathered(p: _Plan, comp_hbm, idx_smem, b, buf, sem, dtype, fn, first_started=False):
    """fn(t, rows [k, c]) for each query t of the block, with the next query's rows in flight.
    first_started: query 0's rows were already requested (into slot 0)."""
    if not first_started:
        _start_gather(p, comp_hbm, idx_smem, b, 0, buf, sem, 0)

    def body(t, carry):
        slot = t % 2

        @pl.when(t + 1 < p.bq)
        def _():
            _start_gather(p, comp_hbm, idx_smem, b, t + 1, buf, sem, 1 - slot)

        _wait_gather(p, comp_hbm, buf, sem, slot)
        fn(t, _unpack_rows(p, buf[slot], dtype))
        return carry

    jax.lax.fori_loop(0, p.bq, body, 0)


# ----------------------------------------------------------------------------------------------
# Forward kernel (query-major).

def _online_update(m_ref, l_ref, acc_ref, s, values, rows=slice(None)):
    m_prev = m_ref[rows, :]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    probs = jnp.exp(s - m_new)
    l_ref[rows, :] = alpha * l_ref[rows, :] + jnp.sum(probs, axis=1, keepdims=True)
    acc_ref[rows, :] = alpha * acc_ref[rows, :] + _dot(probs.astype(values.dtype), values, _NN)
    m_ref[rows, :] = m_new


def _forward_kernel(*refs, p: _Plan):
    row_offset_ref, bounds_ref, sink_ref, q_ref, kv_ref = refs[:5]
    rest = refs[5:]
    if p.mode == "hca":
        comp_ref, rest = rest[0], rest[1:]
    if p.mode == "csa":
        idx_ref, idx_smem, comp_hbm, rest = rest[0], rest[1], rest[2], rest[3:]
    o_ref, lse_ref, m_ref, l_ref, acc_ref = rest[:5]
    if p.mode == "csa":
        buf, sem = rest[5:]
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = sink_ref[0].T  # the sink logit starts the running max; exp(sink - max) = 1
        l_ref[...] = jnp.ones_like(l_ref)
        acc_ref[...] = jnp.zeros_like(acc_ref)
        if p.mode == "csa":  # the first query's entries arrive while the window blocks are processed
            _start_gather(p, comp_hbm, idx_smem, b, 0, buf, sem, 0)

    row_t = _row_positions(p, row_offset_ref, i)
    bounds = _row_bounds(bounds_ref)
    q2 = q_ref[0].reshape(p.rows, p.c)
    kb, in_window = _window_block(p, i, j)

    @pl.when(in_window)
    def _window():
        keys = kv_ref[0]
        _online_update(m_ref, l_ref, acc_ref, _logits(p, q2, keys, _window_mask(p, row_t, kb, bounds)), keys)

    if p.mode == "hca":
        cb, in_hca = _hca_block(p, i, j)

        @pl.when(in_hca)
        def _compressed():
            entries = comp_ref[0]
            _online_update(m_ref, l_ref, acc_ref, _logits(p, q2, entries, _hca_mask(p, row_t, cb, bounds)),
                           entries)

    @pl.when(j == p.n_steps - 1)
    def _finish():
        if p.mode == "csa":
            def one_query(t, entries):  # all heads of query t: rows t * H ... t * H + H - 1
                rows = pl.ds(pl.multiple_of(t * p.bh, p.bh), p.bh)
                mask = idx_ref[0, pl.ds(t, 1), :] >= 0  # [1, k]
                s = _logits(p, q_ref[0, t], entries, mask)
                _online_update(m_ref, l_ref, acc_ref, s, entries, rows)
            _for_each_query_gathered(p, comp_hbm, idx_smem, b, buf, sem, q_ref.dtype, one_query,
                                     first_started=True)
        o_ref[0] = (acc_ref[...] / l_ref[...]).reshape(p.bq, p.bh, p.c).astype(o_ref.dtype)
        lse_ref[0, 0] = (m_ref[...] + jnp.log(l_ref[...])).T


# ----------------------------------------------------------------------------------------------
# dq kernel (query-major, window + HCA).

def _dq_update(p: _Plan, dq_ref, q2, do2, lse, delta, keys, mask):
    s = _logits(p, q2, keys, mask)
    probs = jnp.exp(s - lse)
    dp = _dot(do2, keys, _NT)
    ds = probs * (dp - delta)
    dq_ref[...] += _dot(ds.astype(keys.dtype), keys, _NN) * p.scale


def _dq_kernel(*refs, p: _Plan):
    first_block_ref, row_offset_ref, bounds_ref, q_ref, do_ref, lse_ref, delta_ref, kv_ref = refs[:8]
    rest = refs[8:]
    if p.mode == "hca":
        comp_ref, rest = rest[0], rest[1:]
    dq_out, dq_ref = rest
    i, j = pl.program_id(2) + first_block_ref[0], pl.program_id(3)  # i: query block in the whole sequence

    @pl.when(j == 0)
    def _init():
        dq_ref[...] = jnp.zeros_like(dq_ref)

    row_t = _row_positions(p, row_offset_ref, i)
    bounds = _row_bounds(bounds_ref)
    q2 = q_ref[0].reshape(p.rows, p.c)
    do2 = do_ref[0].reshape(p.rows, p.c)
    lse, delta = lse_ref[0, 0].T, delta_ref[0, 0].T
    kb, in_window = _window_block(p, i, j)

    @pl.when(in_window)
    def _window():
        _dq_update(p, dq_ref, q2, do2, lse, delta, kv_ref[0], _window_mask(p, row_t, kb, bounds))

    if p.mode == "hca":
        cb, in_hca = _hca_block(p, i, j)

        @pl.when(in_hca)
        def _compressed():
            _dq_update(p, dq_ref, q2, do2, lse, delta, comp_ref[0], _hca_mask(p, row_t, cb, bounds))

    @pl.when(j == p.n_steps - 1)
    def _finish():
        dq_out[0] = dq_ref[...].reshape(p.bq, p.bh, p.c).astype(dq_out.dtype)


# ----------------------------------------------------------------------------------------------
# dkv (window) / dcompressed (HCA) kernel (key-major).

def _dkey_kernel(row_offset_ref, bounds_ref, q_ref, do_ref, lse_ref, delta_ref, key_ref, dkey_out, dkey_ref, *,
                 p: _Plan, hca: bool):
    kb, g, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    n_steps = pl.num_programs(3)

    @pl.when((g == 0) & (j == 0))
    def _init():
        dkey_ref[...] = jnp.zeros_like(dkey_ref)

    qb, valid = (_hca_query_block if hca else _window_query_block)(p, kb, j)

    @pl.when(valid)
    def _accumulate():
        row_t = _row_positions(p, row_offset_ref, qb)
        q2 = q_ref[0].reshape(p.rows, p.c)
        do2 = do_ref[0].reshape(p.rows, p.c)
        keys = key_ref[0]
        mask = (_hca_mask if hca else _window_mask)(p, row_t, kb, _row_bounds(bounds_ref))
        probs = jnp.exp(_logits(p, q2, keys, mask) - lse_ref[0, 0].T)  # [rows, bk]
        dp = _dot(do2, keys, _NT)
        ds = probs * (dp - delta_ref[0, 0].T)
        dkey_ref[...] += (  # key = value: d(key) from the logits plus d(value) from the weighted sum
            _dot(ds.astype(q2.dtype), q2, _TN) * p.scale
            + _dot(probs.astype(do2.dtype), do2, _TN))

    @pl.when((g == p.G - 1) & (j == n_steps - 1))
    def _finish():
        dkey_out[0] = dkey_ref[...]


# ----------------------------------------------------------------------------------------------
# CSA backward kernel: per query, gather its k entries; dq from them (added to the window part) and one
# d(entry) row per slot (zero for empty slots, whose p and ds are 0).

def _csa_backward_kernel(q_ref, do_ref, lse_ref, delta_ref, dq_window_ref, idx_ref, idx_smem, comp_hbm, dq_out,
                         drows_out, lse_col, delta_col, buf, sem, *, p: _Plan):
    b = pl.program_id(0)
    lse_col[...] = lse_ref[0, 0].T
    delta_col[...] = delta_ref[0, 0].T

    def one_query(t, entries):
        rows = pl.ds(pl.multiple_of(t * p.H, p.H), p.H)
        q_t, do_t = q_ref[0, t], do_ref[0, t]  # [H, c]
        mask = idx_ref[0, pl.ds(t, 1), :] >= 0
        probs = jnp.exp(_logits(p, q_t, entries, mask) - lse_col[rows, :])  # [H, k]
        dp = _dot(do_t, entries, _NT)
        ds = probs * (dp - delta_col[rows, :])
        dq_t = dq_window_ref[0, t] + _dot(ds.astype(entries.dtype), entries, _NN) * p.scale
        dq_out[0, t] = dq_t.astype(dq_out.dtype)
        drows_out[0, t] = (
            _dot(ds.astype(q_t.dtype), q_t, _TN) * p.scale
            + _dot(probs.astype(do_t.dtype), do_t, _TN))

    _for_each_query_gathered(p, comp_hbm, idx_smem, b, buf, sem, q_ref.dtype, one_query)


# ----------------------------------------------------------------------------------------------
# pallas_call wrappers.

def _block_pairs(p: _Plan) -> tuple[int, int]:
    """(query block, key block) pairs the kernels visit, per batch row and head group: window, HCA."""
    i = np.arange(p.nQ)
    first = np.maximum(i * p.bq - p.window + 1, 0) // p.bk
    window = int(np.sum((i * p.bq + p.bq - 1) // p.bk - first + 1))
    hca = 0
    if p.mode == "hca":
        hca = int(np.sum(-(-np.minimum((i * p.bq + p.bq) // p.ratio, p.N) // p.bk)))
    return window, hca


def cost_estimates(p: _Plan, itemsize: int) -> dict[str, pl.CostEstimate]:
    """What each kernel executes (whole blocks, masked entries included), for XLA's cost analysis.
    csa_backward is for the whole sequence (each chunk's call gets its share)."""
    window, hca = _block_pairs(p)
    q_bytes = p.B * p.Tp * p.H * p.c * itemsize
    stats = p.B * p.Tp * p.H * 4
    csa_slots = p.B * p.Tp * p.k if p.mode == "csa" else 0
    gathered = csa_slots * (p.c * itemsize + 8)  # the rows plus the index, read to VMEM and to SMEM
    est = lambda flops, exps, nbytes: pl.CostEstimate(flops=int(flops), transcendentals=int(exps),
                                                      bytes_accessed=int(nbytes))

    def key_major(pairs, n_keys):  # per (key block, query block) pair: q and dO blocks and their stats
        cells = p.B * p.G * pairs * p.rows * p.bk
        return est(8 * p.c * cells, cells,
                   p.B * p.G * pairs * p.rows * (2 * p.c * itemsize + 8) + p.B * n_keys * p.c * (itemsize + 4))

    cells = p.B * p.G * (window + hca) * p.rows * p.bk  # logits computed by a query-major kernel
    key_bytes = p.B * p.G * (window + hca) * p.bk * p.c * itemsize
    return {
        "forward": est(4 * p.c * (cells + csa_slots * p.H), cells + csa_slots * p.H,
                       2 * q_bytes + key_bytes + gathered + stats),
        "dq": est(6 * p.c * cells, cells, 3 * q_bytes + key_bytes + 2 * stats),
        "dkv": key_major(window, p.Tp),
        "dcompressed": key_major(hca, p.Np),
        "csa_backward": est(10 * p.c * csa_slots * p.H, csa_slots * p.H,
                            2 * q_bytes + p.B * p.Tp * p.H * p.c * 4 + gathered + csa_slots * p.c * 4 + 2 * stats),
    }


def _share(cost: pl.CostEstimate, fraction: float) -> pl.CostEstimate:
    return pl.CostEstimate(flops=int(cost.flops * fraction), transcendentals=int(cost.transcendentals * fraction),
                           bytes_accessed=int(cost.bytes_accessed * fraction))


def _compiler_params(p: _Plan, semantics, vmem_bytes: int):
    limit = int(min(max(1.5 * vmem_bytes + (4 << 20), 32 << 20), 100 << 20))
    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=limit)


def _common_inputs(p: _Plan):
    row_offset = jnp.repeat(jnp.arange(p.bq, dtype=jnp.int32), p.bh)[None, :]  # [1, rows]: query of each row
    return row_offset, pl.BlockSpec((1, p.rows), lambda *_: (0, 0))


def _to_rows(p: _Plan, x):
    """[B, Tp, H] -> [B, G, 1, Tp * bh] (row layout of the kernels)."""
    return x.reshape(p.B, p.Tp, p.G, p.bh).transpose(0, 2, 1, 3).reshape(p.B, p.G, 1, p.Tp * p.bh)


def _from_rows(p: _Plan, x):
    return x.reshape(p.B, p.G, p.Tp, p.bh).transpose(0, 2, 1, 3).reshape(p.B, p.Tp, p.H)


def _forward_call(p: _Plan, q, kv, sinks, comp, idx, bounds):
    row_offset, row_offset_spec = _common_inputs(p)
    sink_rows = jnp.tile(sinks.astype(jnp.float32).reshape(p.G, 1, 1, p.bh), (1, 1, p.bq, 1)).reshape(
        p.G, 1, p.rows)
    in_specs = [
        row_offset_spec,
        pl.BlockSpec((1, 2, p.rows), lambda b, g, i, j: (b, 0, i)),
        pl.BlockSpec((1, 1, p.rows), lambda b, g, i, j: (g, 0, 0)),
        pl.BlockSpec((1, p.bq, p.bh, p.c), lambda b, g, i, j: (b, i, g, 0)),
        pl.BlockSpec((1, p.bk, p.c), lambda b, g, i, j: (b, _window_block(p, i, j)[0], 0)),
    ]
    args = [row_offset, bounds, sink_rows, q, kv]
    scratch = [pltpu.VMEM((p.rows, 1), jnp.float32), pltpu.VMEM((p.rows, 1), jnp.float32),
               pltpu.VMEM((p.rows, p.c), jnp.float32)]
    item = q.dtype.itemsize
    vmem = 2 * (2 * p.rows * p.c * item + p.bk * p.c * item) + p.rows * (p.c + 2 * 128) * 4 + 3 * p.rows * p.bk * 4
    if p.mode == "hca":
        in_specs.append(pl.BlockSpec((1, p.bk, p.c), lambda b, g, i, j: (b, _hca_block(p, i, j)[0], 0)))
        args.append(comp)
    if p.mode == "csa":
        idx_block = lambda b, g, i, j: (b, i, 0)
        in_specs += [pl.BlockSpec((1, p.bq, p.k), idx_block),
                     pl.BlockSpec((1, p.bq, p.k), idx_block, memory_space=pltpu.SMEM),
                     pl.BlockSpec(memory_space=pl.ANY)]
        args += [idx, idx, _rows_for_dma(comp)]
        scratch += [_gather_buffer(p, comp.dtype), pltpu.SemaphoreType.DMA((2,))]
        vmem += 2 * p.k * p.c * comp.dtype.itemsize + 3 * p.bh * p.k * 4
    return pl.pallas_call(
        functools.partial(_forward_kernel, p=p),
        cost_estimate=cost_estimates(p, q.dtype.itemsize)["forward"],
        grid=(p.B, p.G, p.nQ, p.n_steps),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((1, p.bq, p.bh, p.c), lambda b, g, i, j: (b, i, g, 0)),
                   pl.BlockSpec((1, 1, 1, p.rows), lambda b, g, i, j: (b, g, 0, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((p.B, p.G, 1, p.Tp * p.bh), jnp.float32)],
        scratch_shapes=scratch,
        compiler_params=_compiler_params(p, ("parallel", "parallel", "parallel", "arbitrary"), vmem),
        interpret=p.interpret,
    )(*args)


def _dq_call(p: _Plan, q, kv, comp, do, lse, delta, bounds, out_dtype, first_block=0):
    """dq of the window (+ HCA) part for the queries in q / do / lse / delta / bounds, which start at
    query block `first_block` (may be traced) of the sequence; kv and comp are whole."""
    row_offset = _common_inputs(p)[0]
    q_spec = pl.BlockSpec((1, p.bq, p.bh, p.c), lambda b, g, i, j, f: (b, i, g, 0))
    rows_spec = pl.BlockSpec((1, 1, 1, p.rows), lambda b, g, i, j, f: (b, g, 0, i))
    in_specs = [pl.BlockSpec((1, p.rows), lambda *_: (0, 0)),
                pl.BlockSpec((1, 2, p.rows), lambda b, g, i, j, f: (b, 0, i)), q_spec, q_spec, rows_spec, rows_spec,
                pl.BlockSpec((1, p.bk, p.c), lambda b, g, i, j, f: (b, _window_block(p, i + f[0], j)[0], 0))]
    args = [row_offset, bounds, q, do, lse, delta, kv]
    if p.mode == "hca":
        in_specs.append(pl.BlockSpec((1, p.bk, p.c), lambda b, g, i, j, f: (b, _hca_block(p, i + f[0], j)[0], 0)))
        args.append(comp)
    item, out_item = q.dtype.itemsize, jnp.dtype(out_dtype).itemsize  # CSA's window dq comes out fp32
    vmem = (2 * (2 * p.rows * p.c * item + p.rows * p.c * out_item + p.bk * p.c * item)
            + p.rows * p.c * 4 + 4 * p.rows * p.bk * 4)
    return pl.pallas_call(
        functools.partial(_dq_kernel, p=p),
        cost_estimate=_share(cost_estimates(p, q.dtype.itemsize)["dq"], q.shape[1] / p.Tp),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(p.B, p.G, q.shape[1] // p.bq, p.n_steps),
            in_specs=in_specs,
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((p.rows, p.c), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q.shape, out_dtype),
        compiler_params=_compiler_params(p, ("parallel", "parallel", "parallel", "arbitrary"), vmem),
        interpret=p.interpret,
    )(jnp.asarray(first_block, jnp.int32).reshape(1), *args)


def _dkey_call(p: _Plan, q, do, lse, delta, bounds, keys, hca: bool):
    """d(window kv) when not hca, else d(compressed) for HCA: [B, keys.shape[1], c] fp32."""
    row_offset, row_offset_spec = _common_inputs(p)
    query_block = _hca_query_block if hca else _window_query_block
    n_steps = p.nQ if hca else min((p.bk + p.window - 2) // p.bq + 2, p.nQ)
    q_spec = pl.BlockSpec((1, p.bq, p.bh, p.c), lambda b, kb, g, j: (b, query_block(p, kb, j)[0], g, 0))
    rows_spec = pl.BlockSpec((1, 1, 1, p.rows), lambda b, kb, g, j: (b, g, 0, query_block(p, kb, j)[0]))
    bounds_spec = pl.BlockSpec((1, 2, p.rows), lambda b, kb, g, j: (b, 0, query_block(p, kb, j)[0]))
    key_spec = pl.BlockSpec((1, p.bk, p.c), lambda b, kb, g, j: (b, kb, 0))
    item = q.dtype.itemsize
    vmem = 2 * (2 * p.rows * p.c * item + p.bk * p.c * item) + 2 * p.bk * p.c * 4 + 4 * p.rows * p.bk * 4
    return pl.pallas_call(
        functools.partial(_dkey_kernel, p=p, hca=hca),
        cost_estimate=cost_estimates(p, q.dtype.itemsize)["dcompressed" if hca else "dkv"],
        grid=(p.B, keys.shape[1] // p.bk, p.G, n_steps),
        in_specs=[row_offset_spec, bounds_spec, q_spec, q_spec, rows_spec, rows_spec, key_spec],
        out_specs=key_spec,
        out_shape=jax.ShapeDtypeStruct(keys.shape, jnp.float32),
        scratch_shapes=[pltpu.VMEM((p.bk, p.c), jnp.float32)],
        compiler_params=_compiler_params(p, ("parallel", "parallel", "arbitrary", "arbitrary"), vmem),
        interpret=p.interpret,
    )(row_offset, bounds, q, do, lse, delta, keys)


def _csa_backward_call(p: _Plan, q, do, lse, delta, dq_window, idx, comp):
    """One chunk of p.chunk queries: (dq [B, chunk, H, c] in q's dtype = dq_window + the entries' part,
    per-slot drows [B, chunk, k, c] fp32)."""
    n = q.shape[1] // p.bq
    q_spec = pl.BlockSpec((1, p.bq, p.H, p.c), lambda b, i: (b, i, 0, 0))
    rows_spec = pl.BlockSpec((1, 1, 1, p.rows), lambda b, i: (b, 0, 0, i))
    idx_spec = pl.BlockSpec((1, p.bq, p.k), lambda b, i: (b, i, 0))
    item = q.dtype.itemsize
    vmem = (2 * (3 * p.rows * p.c * item + p.rows * p.c * 4 + p.bq * p.k * p.c * 4)
            + 2 * p.k * p.c * comp.dtype.itemsize + 4 * p.H * p.k * 4 + 2 * p.rows * 128 * 4)
    return pl.pallas_call(
        functools.partial(_csa_backward_kernel, p=p),
        cost_estimate=_share(cost_estimates(p, q.dtype.itemsize)["csa_backward"], p.chunk / p.Tp),
        grid=(p.B, n),
        in_specs=[q_spec, q_spec, rows_spec, rows_spec, q_spec, idx_spec,
                  pl.BlockSpec((1, p.bq, p.k), lambda b, i: (b, i, 0), memory_space=pltpu.SMEM),
                  pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=[q_spec, pl.BlockSpec((1, p.bq, p.k, p.c), lambda b, i: (b, i, 0, 0))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((p.B, q.shape[1], p.k, p.c), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((p.rows, 1), jnp.float32), pltpu.VMEM((p.rows, 1), jnp.float32),
                        _gather_buffer(p, comp.dtype), pltpu.SemaphoreType.DMA((2,))],
        compiler_params=_compiler_params(p, ("parallel", "parallel"), vmem),
        interpret=p.interpret,
    )(q, do, lse, delta, dq_window, idx, idx, _rows_for_dma(comp))


def _csa_backward(p: _Plan, q, kv, do, lse, delta, bounds, idx, comp):
    """dq [B, Tp, H, c] in q's dtype and dcompressed [B, Np, c] fp32, chunk by chunk: per chunk the
    window dq kernel (fp32), then the gather kernel adds the entries' part and emits per-slot rows."""
    n_chunks = p.Tp // p.chunk
    rows_per_chunk = p.chunk * p.H
    p_window = p
    # per-slot gradient block [bq, k, c] fp32: 8 MiB at k = c = 512 with bq = 8, which needs 16 heads
    # (the statistics block of bq * H rows must be a multiple of 128 lanes, as with heads split over devices)
    bq = _csa_query_block(p.H)
    p = dataclasses.replace(p, bq=bq if p.bq % bq == 0 else 8)

    def body(carry, ci):
        dcomp, dq = carry
        t0 = ci * p.chunk
        sl = lambda x: jax.lax.dynamic_slice_in_dim(x, t0, p.chunk, axis=1)
        rows = lambda x: jax.lax.dynamic_slice_in_dim(x, ci * rows_per_chunk, rows_per_chunk, axis=3)
        idx_c = sl(idx)
        q_c, do_c, lse_c, delta_c = sl(q), sl(do), rows(lse), rows(delta)
        bounds_c = jax.lax.dynamic_slice_in_dim(bounds, ci * rows_per_chunk, rows_per_chunk, axis=2)
        dq_window = _dq_call(p_window, q_c, kv, None, do_c, lse_c, delta_c, bounds_c, jnp.float32,
                             first_block=t0 // p_window.bq)
        dq_c, drows = _csa_backward_call(p, q_c, do_c, lse_c, delta_c, dq_window, idx_c, comp)
        dcomp = jax.vmap(lambda acc, i, r: acc.at[i].add(r))(  # empty slots add zeros to row 0
            dcomp, jnp.maximum(idx_c, 0).reshape(p.B, -1), drows.reshape(p.B, -1, p.c))
        return (dcomp, jax.lax.dynamic_update_slice_in_dim(dq, dq_c, t0, axis=1)), None

    init = (jnp.zeros((p.B, p.Np, p.c), jnp.float32), jnp.zeros(q.shape, q.dtype))  # dq updated in place
    (dcomp, dq), _ = jax.lax.scan(body, init, jnp.arange(n_chunks))
    return dq, dcomp


# ----------------------------------------------------------------------------------------------
# custom_vjp on padded inputs.

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(p: _Plan, q, kv, sinks, comp, idx, bounds):
    return _forward_call(p, q, kv, sinks, comp, idx, bounds)[0]


def _attention_fwd(p: _Plan, q, kv, sinks, comp, idx, bounds):
    out, lse = _forward_call(p, q, kv, sinks, comp, idx, bounds)
    return out, (q, kv, sinks, comp, idx, bounds, out, lse)


def _attention_bwd(p: _Plan, res, do):
    q, kv, sinks, comp, idx, bounds, out, lse = res
    delta_th = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, Tp, H]
    lse_th = _from_rows(p, lse)
    valid = (jnp.arange(p.Tp) < p.T)[None, :, None]
    dsinks = -jnp.sum(jnp.where(valid, jnp.exp(sinks.astype(jnp.float32) - lse_th) * delta_th, 0.0), axis=(0, 1))
    delta = _to_rows(p, delta_th)
    do = do.astype(q.dtype)
    if p.mode == "csa":
        dq, dcomp = _csa_backward(p, q, kv, do, lse, delta, bounds, idx, comp)
    else:
        dq = _dq_call(p, q, kv, comp, do, lse, delta, bounds, q.dtype)
    dkv = _dkey_call(p, q, do, lse, delta, bounds, kv, hca=False).astype(kv.dtype)
    if p.mode == "hca":
        dcomp = _dkey_call(p, q, do, lse, delta, bounds, comp, hca=True)
    dcomp = None if comp is None else dcomp.astype(comp.dtype)
    didx = None if idx is None else np.zeros(idx.shape, jax.dtypes.float0)
    return dq, dkv, dsinks.astype(sinks.dtype), dcomp, didx, np.zeros(bounds.shape, jax.dtypes.float0)


_attention.defvjp(_attention_fwd, _attention_bwd)


# ----------------------------------------------------------------------------------------------
# Public entry point.

def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _csa_query_block(H: int) -> int:
    """The fewest queries (a multiple of 8) whose H heads fill whole 128-lane rows of statistics."""
    return math.lcm(8, 128 // math.gcd(H, 128))


def sparse_attention(q: jax.Array, kv: jax.Array, sinks: jax.Array, window: int,
                     compressed: jax.Array | None = None, topk_idx: jax.Array | None = None,
                     ratio: int = 0, chunk: int = 512, key_start: jax.Array | None = None,
                     entry_start: jax.Array | None = None, *, block_q: int | None = None,
                     block_k: int | None = None, block_h: int | None = None,
                     interpret: bool = False) -> jax.Array:
    """Core attention over window keys U compressed entries with per-head sinks; differentiable.

    Same arguments and result as `sparse_attention_reference.sparse_attention`: q [B,T,H,c], kv [B,T,c],
    sinks [H], compressed [B,N,c] or None, topk_idx [B,T,k] int32 (CSA, -1 = empty) or None,
    ratio (HCA visibility), key_start / entry_start [B,T] or None (packed rows), -> [B,T,H,c] in q's dtype.
    chunk: CSA backward only, queries per scatter-add chunk (rounded to block_q); bounds the
      per-(query, slot) gradient buffer to B * chunk * k * c floats.
    block_q: queries per grid step (multiple of 8; default 128, CSA 16, or 128 / H when fewer than 8
      heads, e.g. heads split over devices, so the statistics rows fill 128 lanes). block_k: window keys and HCA
      entries per step (multiple of 8; default 128). block_h: heads per step (divides H; default
      min(H, 16), CSA: H, since the gathered rows are shared by all heads).
    interpret: run the kernels in the Pallas interpreter (CPU tests).
    """
    if q.ndim != 4 or kv.ndim != 3 or sinks.ndim != 1:
        raise ValueError(f"expected q [B,T,H,c], kv [B,T,c], sinks [H]; got {q.shape}, {kv.shape}, {sinks.shape}")
    B, T, H, c = q.shape
    if kv.shape != (B, T, c) or sinks.shape != (H,):
        raise ValueError(f"inconsistent shapes: q {q.shape}, kv {kv.shape}, sinks {sinks.shape}")
    if kv.dtype != q.dtype or q.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"q and kv must share a dtype, float32 or bfloat16; got {q.dtype} and {kv.dtype}")
    if c % 2:
        raise ValueError(f"head dim c must be even (bf16 entries are gathered in pairs), got {c}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    N = k = 0
    if compressed is not None:
        if compressed.ndim != 3 or compressed.shape[0] != B or compressed.shape[2] != c:
            raise ValueError(f"compressed must be [B={B}, N, c={c}], got {compressed.shape}")
        N = compressed.shape[1]
        compressed = compressed.astype(q.dtype)
    if topk_idx is not None:
        if compressed is None:
            raise ValueError("topk_idx (CSA) needs compressed entries")
        if topk_idx.ndim != 3 or topk_idx.shape[:2] != (B, T):
            raise ValueError(f"topk_idx must be [B={B}, T={T}, k], got {topk_idx.shape}")
        if not jnp.issubdtype(topk_idx.dtype, jnp.integer):
            raise ValueError(f"topk_idx must be integer, got {topk_idx.dtype}")
        k = topk_idx.shape[2]
    elif compressed is not None and ratio < 1:
        raise ValueError(f"HCA (compressed without topk_idx) needs ratio >= 1, got {ratio}")
    mode = "swa" if N == 0 or (topk_idx is not None and k == 0) else ("csa" if topk_idx is not None else "hca")
    if T == 0:
        return jnp.zeros_like(q)

    bq = block_q or (max(16, _csa_query_block(H)) if mode == "csa" else 128)
    bk = block_k or 128
    bh = H if mode == "csa" else (block_h or min(H, 16))
    if bq % 8 or bk % 8 or bq <= 0 or bk <= 0:
        raise ValueError(f"block_q and block_k must be positive multiples of 8, got {bq}, {bk}")
    if H % bh:
        raise ValueError(f"block_h={bh} must divide the head count {H}")
    bq = min(bq, _round_up(T, 8))
    bk = min(bk, _round_up(max(T, N), 8))
    Tp = _round_up(T, math.lcm(bq, bk))
    ck = min(_round_up(max(chunk, bq), bq), Tp)
    while Tp % ck:  # the CSA backward chunk must tile the padded sequence
        ck -= bq
    Np = _round_up(N, bk) if mode != "swa" else 0
    p = _Plan(mode=mode, B=B, T=T, Tp=Tp, H=H, c=c, window=int(window), ratio=int(ratio), N=N, Np=Np, k=k,
              bq=bq, bk=bk, bh=bh, chunk=ck, interpret=interpret)

    qp = jnp.pad(q, ((0, 0), (0, Tp - T), (0, 0), (0, 0)))
    kvp = jnp.pad(kv, ((0, 0), (0, Tp - T), (0, 0)))
    comp = idx = None
    if mode != "swa":
        comp = jnp.pad(compressed, ((0, 0), (0, Np - N), (0, 0)))
    if mode == "csa":
        idx = topk_idx.astype(jnp.int32)
        idx = jnp.where(idx >= 0, jnp.minimum(idx, N - 1), -1)  # ids past N clamp as the reference's gather does
        idx = jnp.pad(idx, ((0, 0), (0, Tp - T), (0, 0)), constant_values=-1)  # (and no DMA leaves the array)
    # Per-row document bounds in the kernels' row layout [B, 2, Tp * bh] (row = query * bh + head)
    bounds = jnp.stack([jnp.zeros((B, T), jnp.int32) if b is None else jnp.asarray(b, jnp.int32).reshape(B, T)
                        for b in (key_start, entry_start)], axis=1)
    bounds = jnp.repeat(jnp.pad(bounds, ((0, 0), (0, 0), (0, Tp - T))), bh, axis=2)
    return _attention(p, qp, kvp, sinks, comp, idx, bounds)[:, :T]
