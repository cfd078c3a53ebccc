"""Lightning indexer as a Pallas TPU kernel: fused scoring + blockwise top-k (spec §4.4, §4.6).

Same function as `v4jax.indexer.select_topk`: `I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . K[s])` in fp32,
entry s visible to query t iff `s < floor((t + 1) / ratio)`, top-k per query under the order
"higher score first, then lower entry index" (what `jax.lax.top_k` does), invisible picks -> -1.

How the [T, N] score matrix is avoided. The grid is (batch, query block, key block); the key-block
axis is a reduction. For one query block (queries on the 128 lanes) the kernel scores one key block
at a time in VMEM and merges it into a running top-k kept in VMEM scratch, so memory is
O(block_q * k) per core, independent of N. Key blocks past the last entry any query of the block can
see are skipped (their DMA too, through a scalar-prefetched block count), which halves the work for
causal prefill.

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

from v4jax.indexer import select_topk as _reference_select_topk

SUBLANES = 8  # fp32/int32 vreg sublanes: the number of independent running lists per query
_SENTINEL = jnp.iinfo(jnp.int32).max


def select_topk_reference(q, w, keys, positions, ratio: int, topk: int, chunk: int = 512) -> jax.Array:
    """The pure-JAX reference (`v4jax.indexer.select_topk`)."""
    return _reference_select_topk(q, w, keys, positions, ratio, topk, chunk)


# ----------------------------------------------------------------------------------------------
# Sorting networks over the leading axis of [L * 8, lanes] arrays (row = l * 8 + sublane).


def _beats(v1, i1, v2, i2):
    """True where (v1, i1) ranks before (v2, i2): higher score, ties to the lower entry index."""
    return (v1 > v2) | ((v1 == v2) & (i1 < i2))


def _exchange(a, b, descending):
    """Compare-exchange two (values, indices) pairs; the first output gets the winner if descending."""
    (va, ia), (vb, ib) = a, b
    win = _beats(va, ia, vb, ib)
    if not descending:
        win = ~win
    return ((jnp.where(win, va, vb), jnp.where(win, ia, ib)),
            (jnp.where(win, vb, va), jnp.where(win, ib, ia)))


def _stage(v, i, length: int, dist: int, block: int, descending: bool):
    """One bitonic stage: element l meets l ^ dist; blocks of `block` alternate direction (the first
    block in `descending`), unless block >= length (one direction)."""
    lanes = v.shape[-1]
    rows = SUBLANES * dist
    if block >= length:
        shape = (length // (2 * dist), 2, rows, lanes)
        vv, ii = v.reshape(shape), i.reshape(shape)
        first, second = _exchange((vv[:, 0], ii[:, 0]), (vv[:, 1], ii[:, 1]), descending)
        v = jnp.stack([first[0], second[0]], axis=1)
        i = jnp.stack([first[1], second[1]], axis=1)
    else:
        shape = (length // (2 * block), 2, block // (2 * dist), 2, rows, lanes)
        vv, ii = v.reshape(shape), i.reshape(shape)
        halves_v, halves_i = [], []
        for d in (0, 1):
            first, second = _exchange((vv[:, d, :, 0], ii[:, d, :, 0]), (vv[:, d, :, 1], ii[:, d, :, 1]),
                                      descending if d == 0 else not descending)
            halves_v.append(jnp.stack([first[0], second[0]], axis=2))
            halves_i.append(jnp.stack([first[1], second[1]], axis=2))
        v, i = jnp.stack(halves_v, axis=1), jnp.stack(halves_i, axis=1)
    return v.reshape(length * SUBLANES, lanes), i.reshape(length * SUBLANES, lanes)


def _bitonic_sort(v, i, length: int, descending: bool):
    block = 2
    while block <= length:
        dist = block // 2
        while dist >= 1:
            v, i = _stage(v, i, length, dist, block, descending)
            dist //= 2
        block *= 2
    return v, i


def _bitonic_merge(v, i, length: int, descending: bool):
    """Sort a bitonic sequence (per sublane) of `length` entries."""
    dist = length // 2
    while dist >= 1:
        v, i = _stage(v, i, length, dist, length, descending)
        dist //= 2
    return v, i


def _merge_block(buf_v, buf_i, new_v, new_i, kp: int, m: int):
    """Running top-kp (descending, per sublane) U m new entries -> new running top-kp."""
    new_v, new_i = _bitonic_sort(new_v, new_i, m, descending=False)
    split = (kp - m) * SUBLANES
    tail_v, tail_i = buf_v[split:], buf_i[split:]
    win = _beats(tail_v, tail_i, new_v, new_i)  # tail descending, new ascending: winners = top-m, bitonic
    top_v, top_i = jnp.where(win, tail_v, new_v), jnp.where(win, tail_i, new_i)
    if m == kp:
        return _bitonic_merge(top_v, top_i, kp, descending=True)
    top_v, top_i = _bitonic_merge(top_v, top_i, m, descending=False)
    v = jnp.concatenate([buf_v[:split], top_v], axis=0)  # descending ++ ascending: bitonic
    i = jnp.concatenate([buf_i[:split], top_i], axis=0)
    return _bitonic_merge(v, i, kp, descending=True)


def _masked_stage(v, i, length: int, dist: int, flip):
    """Bitonic-merge stage whose direction is per sublane: descending where `flip` ([8, lanes]) is False."""
    lanes = v.shape[-1]
    shape = (length // (2 * dist), 2, dist, SUBLANES, lanes)
    vv, ii = v.reshape(shape), i.reshape(shape)
    win = _beats(vv[:, 0], ii[:, 0], vv[:, 1], ii[:, 1]) != flip
    first = (jnp.where(win, vv[:, 0], vv[:, 1]), jnp.where(win, ii[:, 0], ii[:, 1]))
    second = (jnp.where(win, vv[:, 1], vv[:, 0]), jnp.where(win, ii[:, 1], ii[:, 0]))
    v = jnp.stack([first[0], second[0]], axis=1).reshape(length * SUBLANES, lanes)
    i = jnp.stack([first[1], second[1]], axis=1).reshape(length * SUBLANES, lanes)
    return v, i


def _merge_sublanes(v, i, kp: int):
    """Merge the 8 per-sublane descending lists into one; every sublane ends with the full top-kp."""
    lanes = v.shape[-1]
    sub = jax.lax.broadcasted_iota(jnp.int32, (SUBLANES, lanes), 0)

    def merge(v, i, flip):
        dist = kp // 2
        while dist >= 1:
            v, i = _masked_stage(v, i, kp, dist, flip)
            dist //= 2
        return v, i

    v, i = merge(v, i, (sub & 1) == 1)  # odd sublanes ascending: neighbours now pair up as bitonic halves
    for r, bit in enumerate((1, 2, 4)):
        v3, i3 = v.reshape(kp, SUBLANES, lanes), i.reshape(kp, SUBLANES, lanes)
        low = (sub & bit) == 0  # partner is sublane ^ bit
        pv = jnp.where(low, pltpu.roll(v3, SUBLANES - bit, 1), pltpu.roll(v3, bit, 1))
        pi = jnp.where(low, pltpu.roll(i3, SUBLANES - bit, 1), pltpu.roll(i3, bit, 1))
        win = _beats(v3, i3, pv, pi)
        v = jnp.where(win, v3, pv).reshape(kp * SUBLANES, lanes)
        i = jnp.where(win, i3, pi).reshape(kp * SUBLANES, lanes)
        flip = (sub & (2 * bit)) != 0 if r < 2 else jnp.zeros((SUBLANES, lanes), jnp.bool_)
        v, i = merge(v, i, flip)
    return v, i


# ----------------------------------------------------------------------------------------------
# Kernel


def _indexer_kernel(nblocks_ref, vis_ref, q_ref, w_ref, k_ref, out_ref, buf_v, buf_i, final_i, *,
                    n_heads: int, head_dim: int, block_k: int, kp: int, precision):
    qb, kb = pl.program_id(1), pl.program_id(2)
    lanes = buf_v.shape[-1]

    @pl.when(kb == 0)
    def _init():
        buf_v[...] = jnp.full(buf_v.shape, -jnp.inf, jnp.float32)
        buf_i[...] = jnp.full(buf_i.shape, _SENTINEL, jnp.int32)

    @pl.when(kb < nblocks_ref[qb])
    def _score_and_merge():
        keys = k_ref[0]  # [block_k, c_I]

        def head(h, acc):
            q_h = q_ref[0, :, pl.ds(pl.multiple_of(h * head_dim, head_dim), head_dim)]  # [block_q, c_I]
            dots = jax.lax.dot_general(keys, q_h, (((1,), (1,)), ((), ())), precision=precision,
                                       preferred_element_type=jnp.float32)  # [block_k, block_q]
            return acc + w_ref[0, pl.ds(h, 1), :] * jnp.maximum(dots, 0.0)

        scores = jax.lax.fori_loop(0, n_heads, head, jnp.zeros((block_k, lanes), jnp.float32))
        entry = kb * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_k, lanes), 0)
        scores = jnp.where(entry < vis_ref[...], scores, -jnp.inf)  # spec §4.6 visibility
        v, i = _merge_block(buf_v[...], buf_i[...], scores, entry, kp, block_k // SUBLANES)
        buf_v[...] = v
        buf_i[...] = i

    @pl.when(kb == pl.num_programs(2) - 1)
    def _finish():
        _, i = _merge_sublanes(buf_v[...], buf_i[...], kp)
        final_i[...] = i
        top = final_i[pl.ds(0, kp, stride=SUBLANES), :]  # sublane 0 of every row group: [kp, block_q]
        out_ref[0] = jnp.where(top < vis_ref[...], top, -1)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def select_topk(q, w, keys, positions, ratio: int, topk: int, chunk: int = 512, *, block_q: int = 128,
                block_k: int | None = None, interpret: bool = False) -> jax.Array:
    """Fused lightning-indexer scoring + top-k; same result as `v4jax.indexer.select_topk`.

    q [B,T,n_I,c_I], w [B,T,n_I], keys [B,N,c_I], positions [T] -> int32 [B, T, min(topk, N)], -1 = empty.
    `chunk` is accepted for signature compatibility and unused (block_q plays its role).
    block_q: queries per grid step (multiple of 128). block_k: entries scored per step (8 * a power
    of two, at most 8 * next_pow2(k); default min(8 * next_pow2(k), 4096)).
    """
    del chunk
    if q.ndim != 4 or w.ndim != 3 or keys.ndim != 3 or positions.ndim != 1:
        raise ValueError(f"expected q [B,T,n_I,c_I], w [B,T,n_I], keys [B,N,c_I], positions [T]; got "
                         f"{q.shape}, {w.shape}, {keys.shape}, {positions.shape}")
    B, T, H, C = q.shape
    N = keys.shape[1]
    if w.shape != (B, T, H) or keys.shape[0] != B or keys.shape[2] != C or positions.shape[0] != T:
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
        block_k = min(SUBLANES * kp, 4096)
    m = block_k // SUBLANES
    if block_k % SUBLANES or m & (m - 1) or m > kp:
        raise ValueError(f"block_k must be 8 * a power of two <= 8 * next_pow2(k) = {SUBLANES * kp}, got {block_k}")

    n_q = pl.cdiv(T, block_q)
    n_k = pl.cdiv(N, block_k)
    t_pad, n_pad = n_q * block_q, n_k * block_k
    # Entries a query can see, clamped to N (the reference's `idx < (pos + 1) // ratio` with idx < N).
    vis = jnp.minimum((positions.astype(jnp.int32) + 1) // ratio, N)
    vis = jnp.pad(vis, (0, t_pad - T))  # padded queries see nothing
    nblocks = (vis.reshape(n_q, block_q).max(axis=1) + block_k - 1) // block_k  # key blocks worth scoring

    q2 = jnp.pad(q.reshape(B, T, H * C), ((0, 0), (0, t_pad - T), (0, 0)))
    wt = jnp.pad(jnp.swapaxes(w.astype(jnp.float32), 1, 2), ((0, 0), (0, 0), (0, t_pad - T)))  # [B, n_I, T]
    kk = jnp.pad(keys.astype(q.dtype), ((0, 0), (0, n_pad - N), (0, 0)))
    fp32 = jnp.dtype(q.dtype) == jnp.float32
    precision = jax.lax.Precision.HIGHEST if fp32 else None

    def key_block(b, i, j, nblocks):
        return b, jnp.minimum(j, jnp.maximum(nblocks[i] - 1, 0)), 0  # skipped blocks: no new DMA

    kernel = functools.partial(_indexer_kernel, n_heads=H, head_dim=C, block_k=block_k, kp=kp,
                               precision=precision)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(B, n_q, n_k),
        in_specs=[
            pl.BlockSpec((1, block_q), lambda b, i, j, nb: (0, i)),
            pl.BlockSpec((1, block_q, H * C), lambda b, i, j, nb: (b, i, 0)),
            pl.BlockSpec((1, H, block_q), lambda b, i, j, nb: (b, 0, i)),
            pl.BlockSpec((1, block_k, C), key_block),
        ],
        out_specs=pl.BlockSpec((1, kp, block_q), lambda b, i, j, nb: (b, 0, i)),
        scratch_shapes=[pltpu.VMEM((SUBLANES * kp, block_q), jnp.float32),
                        pltpu.VMEM((SUBLANES * kp, block_q), jnp.int32),
                        pltpu.VMEM((SUBLANES * kp, block_q), jnp.int32)],
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((B, kp, t_pad), jnp.int32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"),
                                             vmem_limit_bytes=_vmem_limit(kp, block_q, block_k, H * C, q.dtype)),
        interpret=interpret,
    )(nblocks.astype(jnp.int32), vis[None, :], q2, wt, kk)
    return jnp.swapaxes(out[:, :k, :T], 1, 2)  # [B, T, k], best first


def _vmem_limit(kp: int, block_q: int, block_k: int, qw: int, dtype) -> int:
    """Scoped VMEM request: buffers, double-buffered inputs and the sort temporaries, with headroom."""
    lanes = block_q
    running = 3 * SUBLANES * kp * lanes * 4
    inputs = 2 * (block_q * qw * jnp.dtype(dtype).itemsize + block_k * 128 * 4 + 64 * lanes * 4)
    temps = 12 * block_k * lanes * 4 + 8 * SUBLANES * kp * lanes * 4
    return int(min(max(running + inputs + temps, 32 << 20), 100 << 20))
