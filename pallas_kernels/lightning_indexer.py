"""Lightning indexer as a Pallas TPU kernel: fused scoring + blockwise top-k (architecture.md §4.4, §4.6).

Same function as `lightning_indexer_reference.select_topk`: `I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . K[s])` in fp32,
entry s visible to query t iff `s < floor((t + 1) / ratio)`, top-k per query under the order
"higher score first, then lower entry index" (what `jax.lax.top_k` does), invisible picks -> -1.

How the [T, N] score matrix is avoided. The grid is (batch, query block, key block); the key-block
axis is a reduction. For one query block (queries on the 128 lanes) the kernel scores one key block
at a time in VMEM and merges it into a running top-k kept in VMEM scratch, so memory is
O(block_q * k) per core, independent of N. Key blocks past the last entry any query of the block can
see are skipped (their DMA too, through a scalar-prefetched block count), which about halves the work
of a long causal prefill (the granularity is block_k entries). q is read in its own [T, n_I, c_I]
layout and copied head-major into VMEM once per query block, so XLA adds no relayout copy of q.

The running top-k is 8 independent sorted lists, one per sublane: key row r of a block goes to
sublane r % 8. Every sorting step is then a compare-exchange between whole vregs along the leading
axis (a reshape plus static slices: no lane or sublane shuffles in the hot loop). Per key block:
  1. bitonic-sort each sublane's m = block_k / 8 new scores ascending,
  2. pair them with the tail of the descending buffer and keep the better of each pair (this is the
     top-m of tail U new, as a bitonic sequence), 3. bitonic-merge back into a descending list of kp.
Once per query block the 8 lists are merged across sublanes (3 butterfly rounds with rolls) and the
first k written out. Sorting networks need powers of two: the buffer holds kp = next_pow2(k) entries.

The order used everywhere is total (score, then entry index), so the result is exactly top_k's,
ties included. Sentinel entries (-inf, int32 max) fill the buffer before real entries arrive; real
invisible entries are (-inf, s), so they are preferred to sentinels but all become -1 in the output.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.lightning_indexer_reference import select_topk as _reference_select_topk

SUBLANES = 8  # fp32/int32 vreg sublanes: the number of independent running lists per query
_SENTINEL = jnp.iinfo(jnp.int32).max
_HEAD_GROUP = 16  # heads per q load: one bf16 (16, 128) tile row group, no relayout of q in HBM
_MAX_BLOCK_K = 4096  # entries merged per grid step (k = 512: the cheapest sort work per entry)
_SCORE_ROWS = 512  # entries scored per inner step: the fp32 accumulator [512, 128] is 64 vregs


def select_topk_reference(q, w, keys, positions, ratio: int, topk: int, chunk: int = 512,
                          entry_start=None) -> jax.Array:
    """The pure-JAX reference twin (`lightning_indexer_reference.select_topk`)."""
    return _reference_select_topk(q, w, keys, positions, ratio, topk, chunk, entry_start)


# ----------------------------------------------------------------------------------------------
# Sorting networks over the leading axis of [L * 8, lanes] VMEM arrays (row = l * 8 + sublane).
# A network is a list of stages (dist, block, descending): element l meets l ^ dist; blocks of
# `block` entries alternate direction, the first one `descending` (block >= length: one direction).
# Stages run as loops over chunks of `_CHUNK` entries so the kernel's code size does not grow with k;
# the short-distance stages (dist < _CHUNK) of a run are fused into one pass over the data.

_CHUNK = 8  # entries per loop step: 8 vregs per [CHUNK * 8, 128] array


def _beats(v1, i1, v2, i2):
    """True where (v1, i1) ranks before (v2, i2): higher score, ties to the lower entry index."""
    return (v1 > v2) | ((v1 == v2) & (i1 < i2))


def _exchange(va, ia, vb, ib, descending: bool, flip=None):
    """Compare-exchange: the first output gets the winner if descending, the loser otherwise; `flip`
    (a bool mask or None) reverses that where True."""
    win = _beats(va, ia, vb, ib)
    if flip is not None:
        win = win != flip
    winner = (jnp.where(win, va, vb), jnp.where(win, ia, ib))
    loser = (jnp.where(win, vb, va), jnp.where(win, ib, ia))
    return (*winner, *loser) if descending else (*loser, *winner)


def _flip_mask(shape, dynamic, sub_flip):
    """Direction reversals: a traced scalar (block parity; None: absent) XOR a per-sublane [8, lanes]
    mask (None: absent) -> bool mask of `shape`, or None."""
    mask = None
    if dynamic is not None:
        mask = jnp.full(shape, dynamic, jnp.int32) != 0
    if sub_flip is not None:
        sub = jnp.broadcast_to(sub_flip, (*shape[:-2], shape[-2] // SUBLANES, *sub_flip.shape)).reshape(shape)
        mask = sub if mask is None else mask != sub
    return mask


def _chunk_stage(v, i, length: int, dist: int, block: int, descending: bool, dynamic, sub_flip):
    """One stage on a value of `length` entries (all pairs inside it); block >= length: one direction."""
    lanes = v.shape[-1]
    rows = SUBLANES * dist
    if block >= length:
        shape = (length // (2 * dist), 2, rows, lanes)
        vv, ii = v.reshape(shape), i.reshape(shape)
        flip = _flip_mask(vv[:, 0].shape, dynamic, sub_flip)
        va, ia, vb, ib = _exchange(vv[:, 0], ii[:, 0], vv[:, 1], ii[:, 1], descending, flip)
        v, i = jnp.stack([va, vb], axis=1), jnp.stack([ia, ib], axis=1)
    else:
        shape = (length // (2 * block), 2, block // (2 * dist), 2, rows, lanes)
        vv, ii = v.reshape(shape), i.reshape(shape)
        halves_v, halves_i = [], []
        for d in (0, 1):
            flip = _flip_mask(vv[:, d, :, 0].shape, dynamic, sub_flip)
            va, ia, vb, ib = _exchange(vv[:, d, :, 0], ii[:, d, :, 0], vv[:, d, :, 1], ii[:, d, :, 1],
                                       descending if d == 0 else not descending, flip)
            halves_v.append(jnp.stack([va, vb], axis=2))
            halves_i.append(jnp.stack([ia, ib], axis=2))
        v, i = jnp.stack(halves_v, axis=1), jnp.stack(halves_i, axis=1)
    return v.reshape(length * SUBLANES, lanes), i.reshape(length * SUBLANES, lanes)


def _rows(entry, count: int):
    return pl.ds(pl.multiple_of(entry * SUBLANES, SUBLANES), count * SUBLANES)


def _far_stage(v_ref, i_ref, base: int, length: int, dist: int, block: int, descending: bool, sub_flip):
    """A stage with dist >= _CHUNK: loop over chunk pairs (l, l + dist)."""
    per_group = dist // _CHUNK

    def body(u, carry):
        # entry offset of the first chunk; shifts and masks, not // and % (Mosaic lowers those via sign)
        start = (u >> (per_group.bit_length() - 1)) * (2 * dist) + (u & (per_group - 1)) * _CHUNK
        a, b = _rows(base + start, _CHUNK), _rows(base + start + dist, _CHUNK)
        dynamic = (start & block) if block < length else None
        flip = _flip_mask((_CHUNK * SUBLANES, v_ref.shape[-1]), dynamic, sub_flip)
        out = _exchange(v_ref[a], i_ref[a], v_ref[b], i_ref[b], descending, flip)
        v_ref[a], i_ref[a], v_ref[b], i_ref[b] = out
        return carry

    jax.lax.fori_loop(0, length // (2 * _CHUNK), body, 0)


def _near_stages(v_ref, i_ref, base: int, length: int, stages, sub_flip):
    """Consecutive stages with dist < _CHUNK, fused: each chunk is loaded once and stored once."""
    chunk = min(_CHUNK, length)

    def body(c, carry):
        rows = _rows(base + c * chunk, chunk)
        v, i = v_ref[rows], i_ref[rows]
        for dist, block, descending in stages:
            if block < chunk:
                v, i = _chunk_stage(v, i, chunk, dist, block, descending, None, sub_flip)
            else:  # one direction inside the chunk, set by the chunk's block parity
                dynamic = ((c * chunk) & block) if block < length else None
                v, i = _chunk_stage(v, i, chunk, dist, chunk, descending, dynamic, sub_flip)
        v_ref[rows], i_ref[rows] = v, i
        return carry

    jax.lax.fori_loop(0, length // chunk, body, 0)


def _run_network(v_ref, i_ref, stages, length: int, base: int = 0, sub_flip=None):
    near = []
    for stage in stages:
        if stage[0] < _CHUNK:
            near.append(stage)
            continue
        if near:
            _near_stages(v_ref, i_ref, base, length, near, sub_flip)
            near = []
        _far_stage(v_ref, i_ref, base, length, *stage, sub_flip)
    if near:
        _near_stages(v_ref, i_ref, base, length, near, sub_flip)


def _sort_stages(length: int, descending: bool):
    return [(dist, block, descending) for block in _powers(2, length) for dist in reversed(_powers(1, block // 2))]


def _merge_stages(length: int, descending: bool):
    """Sorts a bitonic sequence."""
    return [(dist, length, descending) for dist in reversed(_powers(1, length // 2))]


def _powers(lo: int, hi: int):
    out = []
    while lo <= hi:
        out.append(lo)
        lo *= 2
    return out


def _elementwise(n_entries: int, fn):
    """Run fn(rows) over row chunks of `n_entries` entries."""
    chunk = min(_CHUNK, n_entries)

    def body(c, carry):
        fn(_rows(c * chunk, chunk), chunk)
        return carry

    jax.lax.fori_loop(0, n_entries // chunk, body, 0)


def _merge_block(buf_v, buf_i, new_v, new_i, kp: int, m: int):
    """Running top-kp (descending per sublane) U m new entries in new_v/new_i -> running top-kp."""
    _run_network(new_v, new_i, _sort_stages(m, descending=False), m)
    split = kp - m

    def keep_winners(rows, chunk):  # tail descending, new ascending: pairwise winners = top-m, bitonic
        tail = pl.ds(pl.multiple_of(split * SUBLANES + rows.start, SUBLANES), chunk * SUBLANES)
        tv, ti, nv, ni = buf_v[tail], buf_i[tail], new_v[rows], new_i[rows]
        win = _beats(tv, ti, nv, ni)
        buf_v[tail], buf_i[tail] = jnp.where(win, tv, nv), jnp.where(win, ti, ni)

    _elementwise(m, keep_winners)
    if m < kp:  # make the tail ascending so that head (descending) ++ tail is bitonic
        _run_network(buf_v, buf_i, _merge_stages(m, descending=False), m, base=split)
    _run_network(buf_v, buf_i, _merge_stages(kp, descending=True), kp)


def _merge_sublanes(buf_v, buf_i, kp: int):
    """Merge the 8 per-sublane descending lists; every sublane ends with the full top-kp, descending."""
    lanes = buf_v.shape[-1]
    sub = jax.lax.broadcasted_iota(jnp.int32, (SUBLANES, lanes), 0)
    merge = _merge_stages(kp, descending=True)
    _run_network(buf_v, buf_i, merge, kp, sub_flip=(sub & 1) == 1)  # odd sublanes ascending
    for r, bit in enumerate((1, 2, 4)):
        low = (sub & bit) == 0  # partner is sublane ^ bit, holding the opposite direction

        def pair_up(rows, chunk):
            v = buf_v[rows].reshape(chunk, SUBLANES, lanes)
            i = buf_i[rows].reshape(chunk, SUBLANES, lanes)
            pv = jnp.where(low, pltpu.roll(v, SUBLANES - bit, 1), pltpu.roll(v, bit, 1))
            pi = jnp.where(low, pltpu.roll(i, SUBLANES - bit, 1), pltpu.roll(i, bit, 1))
            win = _beats(v, i, pv, pi)  # winners of a descending and an ascending list: bitonic
            buf_v[rows] = jnp.where(win, v, pv).reshape(chunk * SUBLANES, lanes)
            buf_i[rows] = jnp.where(win, i, pi).reshape(chunk * SUBLANES, lanes)

        _elementwise(kp, pair_up)
        _run_network(buf_v, buf_i, merge, kp, sub_flip=(sub & (2 * bit)) != 0 if r < 2 else None)


# ----------------------------------------------------------------------------------------------
# Kernel


def _indexer_kernel(nblocks_ref, vis_ref, q_ref, w_ref, k_ref, out_ref, buf_v, buf_i, new_v, new_i, q_heads, slab, *,
                    n_heads: int, head_dim: int, block_k: int, kp: int, precision):
    b, qb, kb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    lanes = buf_v.shape[-1]

    @pl.when(kb == 0)
    def _init():
        buf_v[...] = jnp.full(buf_v.shape, -jnp.inf, jnp.float32)
        buf_i[...] = jnp.full(buf_i.shape, _SENTINEL, jnp.int32)
        # q arrives [block_q, n_I, c_I] (heads on sublanes); put it head-major once per query block so
        # that every key block reads q_h as one aligned [block_q, c_I] tile.
        group = _HEAD_GROUP if n_heads % _HEAD_GROUP == 0 else n_heads

        def relayout(g, carry):
            first = pl.multiple_of(g * group, group)
            q_g = q_ref[0, :, pl.ds(first, group), :]  # [block_q, group, c_I]
            for h in range(group):
                q_heads[first + h] = q_g[:, h, :]
            return carry

        jax.lax.fori_loop(0, n_heads // group, relayout, 0)

    @pl.when(kb < nblocks_ref[b * pl.num_programs(1) + qb])
    def _score_and_merge():
        sub = min(block_k, _SCORE_ROWS)

        def score_rows(r, carry):
            rows = pl.ds(pl.multiple_of(r * sub, sub), sub)
            keys = k_ref[0, rows, :]  # [sub, c_I]

            def head(h, acc):
                dots = jax.lax.dot_general(keys, q_heads[h], (((1,), (1,)), ((), ())), precision=precision,
                                           preferred_element_type=jnp.float32)  # [sub, block_q]
                return acc + w_ref[0, pl.ds(h, 1), :] * jnp.maximum(dots, 0.0)

            scores = jax.lax.fori_loop(0, n_heads, head, jnp.zeros((sub, lanes), jnp.float32))
            entry = kb * block_k + r * sub + jax.lax.broadcasted_iota(jnp.int32, (sub, lanes), 0)
            visible = (entry >= vis_ref[0, pl.ds(0, 1), :]) & (entry < vis_ref[0, pl.ds(1, 1), :])  # §4.6, §8.5
            new_v[rows] = jnp.where(visible, scores, -jnp.inf)
            new_i[rows] = entry
            return carry

        jax.lax.fori_loop(0, block_k // sub, score_rows, 0)
        _merge_block(buf_v, buf_i, new_v, new_i, kp, block_k // SUBLANES)

    @pl.when(kb == pl.num_programs(2) - 1)
    def _finish():
        _merge_sublanes(buf_v, buf_i, kp)
        for c in range(lanes // 128):  # strided loads need a 128-lane base memref
            cols = slice(c * 128, (c + 1) * 128)
            slab[...] = buf_i[:, cols]
            top = slab[pl.ds(0, kp, stride=SUBLANES), :]  # sublane 0 of every entry: [kp, 128]
            top = jnp.where((top >= vis_ref[0, pl.ds(0, 1), cols]) & (top < vis_ref[0, pl.ds(1, 1), cols]), top, -1)
            out_ref[0, cols, :] = jnp.transpose(top)  # [128 queries, kp]


def _default_block_k(kp: int, n_entries: int) -> int:
    return SUBLANES * min(kp, _MAX_BLOCK_K // SUBLANES, _pow2(-(-n_entries // SUBLANES)))


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def select_topk(q, w, keys, positions, ratio: int, topk: int, chunk: int = 512, entry_start=None, *,
                block_q: int = 128, block_k: int | None = None, interpret: bool = False) -> jax.Array:
    """Fused lightning-indexer scoring + top-k; same result as `lightning_indexer_reference.select_topk`.

    q [B,T,n_I,c_I], w [B,T,n_I], keys [B,N,c_I], positions [B, T] (or [T]: the same for every row)
    -> int32 [B, T, min(topk, N)], -1 = empty. entry_start [B, T] or None: packed rows, as the reference.
    `chunk` is accepted for signature compatibility and unused (block_q plays its role).
    block_q: queries per grid step (multiple of 128). block_k: entries scored per step (8 * a power
    of two, at most 8 * next_pow2(k); default: that bound, at most 4096, and no more than N needs).
    """
    del chunk
    if q.ndim != 4 or w.ndim != 3 or keys.ndim != 3 or positions.ndim not in (1, 2):
        raise ValueError(f"expected q [B,T,n_I,c_I], w [B,T,n_I], keys [B,N,c_I], positions [B,T] or [T]; got "
                         f"{q.shape}, {w.shape}, {keys.shape}, {positions.shape}")
    B, T, H, C = q.shape
    N = keys.shape[1]
    if w.shape != (B, T, H) or keys.shape[0] != B or keys.shape[2] != C or positions.shape[-1] != T or (
            positions.ndim == 2 and positions.shape[0] != B):
        raise ValueError(f"inconsistent shapes: q {q.shape}, w {w.shape}, keys {keys.shape}, "
                         f"positions {positions.shape}")
    if ratio < 1 or topk < 0:
        raise ValueError(f"ratio must be >= 1 and topk >= 0, got ratio={ratio}, topk={topk}")
    if block_q <= 0 or block_q % 128:
        raise ValueError(f"block_q must be a positive multiple of 128, got {block_q}")
    k = min(topk, N)
    if k == 0 or T == 0:
        return jnp.zeros((B, T, k), jnp.int32)
    kp = _pow2(k)
    if block_k is None:
        block_k = _default_block_k(kp, N)
    m = block_k // SUBLANES
    if block_k % SUBLANES or m & (m - 1) or m > kp:
        raise ValueError(f"block_k must be 8 * a power of two <= 8 * next_pow2(k) = {SUBLANES * kp}, got {block_k}")

    n_q = pl.cdiv(T, block_q)
    n_k = pl.cdiv(N, block_k)
    t_pad, n_pad = n_q * block_q, n_k * block_k
    # Entries a query can see, clamped to N (the reference's `idx < (pos + 1) // ratio` with idx < N).
    # Per row: a cached call's queries sit at each sequence's own positions.
    # Packed rows (entry_start): the entries [entry_start, entry_start + that) of the query's document.
    lo = jnp.zeros((B, T), jnp.int32) if entry_start is None else jnp.asarray(entry_start, jnp.int32)
    vis = jnp.minimum(lo + (jnp.broadcast_to(positions, (B, T)).astype(jnp.int32) + 1) // ratio, N)
    vis = jnp.pad(vis, ((0, 0), (0, t_pad - T)))  # padded queries see nothing
    lo = jnp.pad(lo, ((0, 0), (0, t_pad - T)))
    nblocks = (vis.reshape(B, n_q, block_q).max(axis=2) + block_k - 1) // block_k  # key blocks worth scoring

    q4 = jnp.pad(q, ((0, 0), (0, t_pad - T), (0, 0), (0, 0)))
    wt = jnp.pad(jnp.swapaxes(w.astype(jnp.float32), 1, 2), ((0, 0), (0, 0), (0, t_pad - T)))  # [B, n_I, T]
    kk = jnp.pad(keys.astype(q.dtype), ((0, 0), (0, n_pad - N), (0, 0)))
    fp32 = jnp.dtype(q.dtype) == jnp.float32
    precision = jax.lax.Precision.HIGHEST if fp32 else None

    def key_block(b, i, j, nblocks):
        return b, jnp.minimum(j, jnp.maximum(nblocks[b * n_q + i] - 1, 0)), 0  # skipped blocks: no new DMA

    cost = cost_estimate(B, T, N, H, C, ratio, topk, block_q=block_q, block_k=block_k,
                         itemsize=jnp.dtype(q.dtype).itemsize)
    kernel = functools.partial(_indexer_kernel, n_heads=H, head_dim=C, block_k=block_k, kp=kp,
                               precision=precision)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(B, n_q, n_k),
        in_specs=[
            pl.BlockSpec((1, 2, block_q), lambda b, i, j, nb: (b, 0, i)),  # [B, 2, T]: Mosaic tiles the last two dims
            pl.BlockSpec((1, block_q, H, C), lambda b, i, j, nb: (b, i, 0, 0)),
            pl.BlockSpec((1, H, block_q), lambda b, i, j, nb: (b, 0, i)),
            pl.BlockSpec((1, block_k, C), key_block),
        ],
        out_specs=pl.BlockSpec((1, block_q, kp), lambda b, i, j, nb: (b, i, 0)),
        scratch_shapes=[pltpu.VMEM((SUBLANES * kp, block_q), jnp.float32),  # running top-kp per sublane
                        pltpu.VMEM((SUBLANES * kp, block_q), jnp.int32),
                        pltpu.VMEM((block_k, block_q), jnp.float32),  # the key block being merged
                        pltpu.VMEM((block_k, block_q), jnp.int32),
                        pltpu.VMEM((H, block_q, C), q.dtype),  # q of the query block, head-major
                        pltpu.VMEM((SUBLANES * kp, 128), jnp.int32)],  # final result, 128 queries at a time
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((B, t_pad, kp), jnp.int32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"),
                                             vmem_limit_bytes=_vmem_limit(kp, block_q, block_k, H, C, q.dtype)),
        cost_estimate=pl.CostEstimate(flops=cost['flops'], transcendentals=0,
                                      bytes_accessed=cost['bytes']),
        interpret=interpret,
    )(nblocks.reshape(-1).astype(jnp.int32), jnp.stack([lo, vis], axis=1), q4, wt, kk)
    return out[:, :T, :k]  # [B, T, k], best first


def _vmem_limit(kp: int, block_q: int, block_k: int, n_heads: int, head_dim: int, dtype) -> int:
    """Scoped VMEM request: double-buffered blocks, scratch and the scoring temporaries, with headroom
    (k=512, block_k=4096 measures 18.3 MiB on v5p), within the 64 MiB a v7x core has."""
    item = jnp.dtype(dtype).itemsize
    blocks = 2 * (block_q * n_heads * head_dim * item + block_k * head_dim * item + n_heads * block_q * 4
                  + block_q * 4 + kp * block_q * 4)
    scratch = (2 * SUBLANES * kp * block_q * 4 + 2 * block_k * block_q * 4 + n_heads * block_q * head_dim * item
               + SUBLANES * kp * 128 * 4)
    temps = 3 * min(block_k, _SCORE_ROWS) * block_q * 4 + block_q * _HEAD_GROUP * head_dim * item
    return int(min(max(1.25 * (blocks + scratch + temps) + (2 << 20), 16 << 20), 64 << 20))


def _network_pairs(length: int, stages) -> int:
    return len(stages) * length // 2


def cost_estimate(B: int, T: int, N: int, n_heads: int, head_dim: int, ratio: int, topk: int, *,
                  block_q: int = 128, block_k: int | None = None, itemsize: int = 2) -> dict:
    """Work of one call with positions 0..T-1 (causal block skipping included), counted from the grid.

    flops: the score math (q.K products, ReLU, weight, head sum), what XLA counts for the reference;
    sort_ops: vector ops of the sorting networks, counted as 10 per compare-exchange (3 compares,
    2 logic ops, 4 selects, some a direction flip), which have no counterpart in XLA's count of
    lax.top_k.
    """
    k = min(topk, N)
    kp = _pow2(k)
    block_k = block_k or _default_block_k(kp, N)
    m = block_k // SUBLANES
    n_q = -(-T // block_q)
    steps = sum(-(-min((min((i + 1) * block_q, T)) // ratio, N) // block_k) for i in range(n_q))
    pairs_step = SUBLANES * (_network_pairs(m, _sort_stages(m, False)) + m // 2
                             + (_network_pairs(m, _merge_stages(m, False)) if m < kp else 0)
                             + _network_pairs(kp, _merge_stages(kp, True)))
    pairs_final = SUBLANES * (4 * _network_pairs(kp, _merge_stages(kp, True)) + 3 * kp // 2)
    scored = B * steps * block_k * block_q  # (query, entry) pairs scored
    flops = scored * n_heads * (2 * head_dim + 3)
    sort_ops = 10 * block_q * (B * steps * pairs_step + B * n_q * pairs_final)
    t_pad = n_q * block_q
    bytes_ = (B * t_pad * n_heads * (head_dim * itemsize + 4) + B * steps * block_k * head_dim * itemsize
              + B * kp * t_pad * 4)
    return dict(flops=flops, sort_ops=sort_ops, bytes=bytes_, steps=steps, kp=kp, block_k=block_k)
