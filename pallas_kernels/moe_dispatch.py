"""Routed experts as Pallas TPU grouped matmuls, forward and backward (architecture.md §5.3, `moe_impl = "pallas"`).

Same function as `moe_dispatch_reference.grouped_swiglu` (the `jax.lax.ragged_dot` path) and
`moe_dispatch_reference.grouped_swiglu_onehot` (one masked dense FFN per expert): rows of `xs` are sorted by expert,
`sizes[e]` rows belong to expert e, rows past `sum(sizes)` belong to no expert and give zeros.

Three kernels:
  gmm   out[r] = lhs[r] @ rhs[group(r)]                 [M, K] x [E, K, N] -> [M, N]
  gmm with transpose_rhs: out[r] = lhs[r] @ rhs[g]^T    [M, N] x [E, K, N] -> [M, K]   (dlhs)
  tgmm  out[e] = sum_{r in group e} lhs[r]^T dout[r]    [M, K] x [M, N]    -> [E, K, N] (drhs)
`gmm` carries a `jax.custom_vjp` whose backward is the other two, so `grouped_swiglu` differentiates
through Pallas only (the SwiGLU and the row weights between the matmuls are plain JAX).

How groups meet row tiles. Rows are cut into tiles of `tm`. A *visit* is one (group, row tile) pair
where the group has rows in the tile; the kernels' grid runs over visits in order (groups ascending,
then tiles ascending), so a tile shared by two groups is visited twice in a row and each visit keeps
only the rows of its group (a row mask on the store for gmm, on the operands for tgmm). The number
of visits depends on the sizes, so the grid has the static bound T + E (T row tiles, E groups: every
group boundary adds at most one visit); the visits past the real count do nothing and fetch nothing
(their block indices repeat the previous step's, which the TPU pipeline does not re-fetch).

  * gmm adds a pseudo-group for the rows past `sum(sizes)` (and the padding up to a tile multiple):
    its visits skip the matmul and the weight fetch and store zeros, so the output is defined
    everywhere. Tiles entirely past the groups cost one empty grid step per (k, n) block.
  * tgmm visits each empty expert once (no matmul, no fetch) to store its zero gradient.

Grid orders. gmm: (output column tiles, visits, contraction tiles); the output tile stays in VMEM
while the visits of one row tile follow each other. With the whole contraction in one block (the
default when it fits), consecutive visits of one group reuse the weight block without a new DMA, so
each expert's weights are read once per output column tile. tgmm: (K tiles, N tiles, visits) with
the visits as the reduction; the fp32 accumulator is reset at a group's first visit and stored at
its last.

FLOPs: every visit runs a full tm-row matmul, so the MXU work is (M + ~E * tm) * K * N * 2 instead
of M * K * N * 2; the default row tile shrinks when experts get few rows (`default_tiling`).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.moe_dispatch_reference import grouped_swiglu as grouped_swiglu_ragged_dot  # noqa: F401
from pallas_kernels.moe_dispatch_reference import grouped_swiglu_onehot  # noqa: F401 (re-exported reference)
from pallas_kernels.moe_dispatch_reference import permute, unpermute_combine  # noqa: F401 (callers' one import)
from pallas_kernels.moe_dispatch_reference import expert_gemm, swiglu

Tiling = tuple[int, int, int]  # (tm rows, tk contraction, tn output columns)

_ROW_ALIGN = 16  # row tiles are multiples of 16: the bf16 sublane tiling (fp32 needs 8)
_LANE = 128
_VMEM_BUDGET = 40 * 2**20  # blocks + scratch the default tiling may use (v7x has 64 MiB of VMEM per core)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


# ----------------------------------------------------------------------------------------------
# Tiling


def default_tiling(m: int, k: int, n: int, groups: int, dtype, *, transposed_out: bool = False) -> Tiling:
    """Block sizes from a traffic model, not from timings (untuned: no TPU was available).

    tm: at most the largest of 512/256/128 whose boundary waste groups * tm stays under half the rows
    (every expert boundary costs up to one extra tm-row matmul). gmm: the whole contraction in one
    block whenever the double-buffered [tk, tn] weight and [tm, tk] row blocks fit the budget, so each
    expert's weights are fetched once per column tile (a split contraction re-fetches them at every
    visit: once per row tile); among those, the (tm, tn) that reads the rows the fewest times (once per
    column tile) without padding the columns, then the larger tm: for a wide contraction a smaller row
    tile buys a wider column tile (v4-pro's d = 7168 against 768 columns per device: tm 256, tn 256,
    rows read 3 times, where tm 512 would read them 6 times). Failing all, tk = 2048, tn = 512.
    tgmm (`transposed_out`): tk = tn = 1024, an fp32 accumulator of 4 MiB.
    """
    item = jnp.dtype(dtype).itemsize
    tm_max = 128
    for cand in (512, 256):
        if groups * cand <= m // 2:
            tm_max = cand
            break
    if transposed_out:
        return tm_max, 1024, 1024
    tk = _round_up(k, _LANE)
    best = None
    for tm in (t for t in (512, 256, 128) if t <= tm_max):
        for tn in (1024, 512, 256, 128):
            block, padded = _fit(n, tn, _LANE)
            if 2 * (tk * block + tm * tk) * item > _VMEM_BUDGET // 2:
                continue
            # padded columns copy the weights and multiply zeros: only when nothing else fits
            key = (padded != n, padded // block, -tm, -block)  # then rows re-read once per column tile
            if best is None or key < best[0]:
                best = (key, (tm, tk, tn))
    return best[1] if best else (tm_max, 2048, 512)


def _fit(dim: int, tile: int, align: int) -> tuple[int, int]:
    """(block, padded dim): the whole dim as one block when it fits in a tile, else tile-multiple padding."""
    if dim <= tile:
        return dim, dim
    return tile, _round_up(dim, tile) if tile % align == 0 else dim


def _check_tiling(tiling) -> Tiling:
    if len(tiling) != 3 or any(int(t) <= 0 for t in tiling):
        raise ValueError(f"tiling must be three positive ints (tm, tk, tn), got {tiling}")
    tm, tk, tn = (int(t) for t in tiling)
    if tm % _ROW_ALIGN or tk % _LANE or tn % _LANE:
        raise ValueError(f"tiling {tiling}: tm must be a multiple of {_ROW_ALIGN}, tk and tn of {_LANE}")
    return tm, tk, tn


def _row_tile(m: int, tm: int) -> tuple[int, int]:
    tm = min(tm, _round_up(m, _ROW_ALIGN))
    return tm, _round_up(m, tm)


def _out_struct(shape, dtype, *operands) -> jax.ShapeDtypeStruct:
    """A kernel output's type. Inside a shard_map that tracks varying axes (check_vma, the default) a
    Pallas output must say which mesh axes it varies over: every axis any operand varies over.
    (`manual_axis_type` in jax 0.10, `vma` before; outside shard_map both are empty.)"""
    avals = [jax.typeof(x) for x in operands]
    mats = [getattr(a, "manual_axis_type", None) for a in avals]
    if mats[0] is not None:
        varying = frozenset().union(*(m.varying for m in mats))
        return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mats[0].update(varying=varying))
    vma = frozenset().union(*(getattr(a, "vma", frozenset()) for a in avals))
    return jax.ShapeDtypeStruct(shape, dtype, vma=vma) if vma else jax.ShapeDtypeStruct(shape, dtype)


def _vmem_limit(block_bytes: int) -> int:
    # Double-buffered blocks + scratch, with headroom for Mosaic's own temporaries.
    return int(min(max(2 * block_bytes + (8 << 20), 32 << 20), 100 << 20))


# ----------------------------------------------------------------------------------------------
# Visit metadata (plain JAX on [E]-sized arrays; scalar-prefetched into SMEM)


class Visits(NamedTuple):
    offsets: jax.Array  # [G + 1] int32: group g owns rows [offsets[g], offsets[g + 1])
    group: jax.Array  # [V] int32 group of each visit (E = the rows past the groups)
    tile: jax.Array  # [V] int32 row tile of each visit
    fetch_tile: jax.Array  # [V] int32 row tile to fetch (the last real visit's for visits without work)
    fetch_group: jax.Array  # [V] int32 expert whose weights to fetch (likewise; always < E)
    work: jax.Array  # [V] int32 1 where the visit multiplies (a real visit of a non-empty expert)
    count: jax.Array  # [1] int32 number of real visits (<= V)


def make_visits(group_sizes: jax.Array, m: int, m_pad: int, tm: int, *, tail: bool, visit_empty: bool) -> Visits:
    """The (group, row tile) visits of `group_sizes` over m rows padded to m_pad (a multiple of tm).

    tail: add the pseudo-group of rows [sum(sizes), m_pad) (gmm stores zeros there).
    visit_empty: one visit for each empty expert (tgmm stores its zero gradient).
    Sizes are clipped so that the groups end by row m (ragged_dot leaves sum(sizes) > M undefined).
    """
    E = group_sizes.shape[0]
    tiles = m_pad // tm
    ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes.astype(jnp.int32), 0)), m)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    if tail:
        starts = jnp.concatenate([starts, ends[-1:]])
        ends = jnp.concatenate([ends, jnp.full((1,), m_pad, jnp.int32)])
    size = ends - starts
    first = jnp.minimum(starts // tm, tiles - 1)
    last = jnp.maximum(ends - 1, 0) // tm
    count = jnp.where(size > 0, last - first + 1, 1 if visit_empty else 0)
    cum = jnp.cumsum(count)
    total = cum[-1]
    n_visits = tiles + starts.shape[0] - 1  # each group boundary inside a tile adds one visit
    v = jnp.minimum(jnp.arange(n_visits, dtype=jnp.int32), total - 1)  # past the real visits: repeat the last
    group = jnp.searchsorted(cum, v, side="right").astype(jnp.int32)
    tile = first[group] + v - (cum[group] - count[group])
    work = (jnp.arange(n_visits) < total) & (size[group] > 0) & (group < E)
    src = jnp.maximum(jax.lax.cummax(jnp.where(work, jnp.arange(n_visits), -1)), 0)
    return Visits(jnp.concatenate([starts, ends[-1:]]), group, tile, tile[src], jnp.minimum(group[src], E - 1),
                  work.astype(jnp.int32), total[None])


# ----------------------------------------------------------------------------------------------
# gmm


def _gmm_kernel(offsets, group, tile, fetch_tile, fetch_group, work, count, lhs_ref, rhs_ref, out_ref, acc_ref, *,
                tm: int, nk: int, transpose_rhs: bool, precision):
    del fetch_tile, fetch_group  # used by the index maps only
    v, k = pl.program_id(1), pl.program_id(2)

    @pl.when(k == 0)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(work[v] == 1)
    def _multiply():
        dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
        acc_ref[...] += jax.lax.dot_general(lhs_ref[...], rhs_ref[0], dims, precision=precision,
                                            preferred_element_type=jnp.float32)

    @pl.when((k == nk - 1) & (v < count[0]))
    def _store():  # only this visit's rows; the tile's other rows belong to the neighbouring visits
        g = group[v]
        rows = tile[v] * tm + jax.lax.broadcasted_iota(jnp.int32, acc_ref.shape, 0)
        mine = (rows >= offsets[g]) & (rows < offsets[g + 1])
        out_ref[...] = jnp.where(mine, acc_ref[...].astype(out_ref.dtype), out_ref[...])


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _cost_rows(m_pad: int, tm: int, bounds: int, expected_rows: int | None) -> tuple[int, int]:
    """(rows, boundary visits) a kernel's cost estimate counts: the row tiles of the rows it expects to
    be real (all m_pad when not told), and `bounds` more tile visits (one per group boundary inside a
    tile) unless it expects none. At run time a kernel visits only the tiles real rows fill, which a
    static estimate cannot know; `expected_rows` is the caller's expectation (the expert-parallel
    exchange: what a routing at the mean load puts in this buffer)."""
    rows = m_pad if expected_rows is None else min(m_pad, _round_up(expected_rows, tm))
    return rows, bounds if rows else 0


def _gmm_call(lhs, rhs, group_sizes, interpret, *, out_dtype, tiling, transpose_rhs: bool,
              expected_rows: int | None = None):
    """lhs [M, C] x rhs [E, C, O] (or [E, O, C] with transpose_rhs) -> [M, O] out_dtype. The cost
    estimate counts `expected_rows` rows (`_cost_rows`)."""
    M, C = lhs.shape
    E = rhs.shape[0]
    O = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    if tiling is None:
        tiling = default_tiling(M, C, O, E, lhs.dtype)
    tm, tk, tn = tiling
    tm, m_pad = _row_tile(M, tm)
    tk, c_pad = _fit(C, tk, _LANE)
    tn, o_pad = _fit(O, tn, _LANE)
    # Padding the weights copies them: only when a dim is larger than its tile and not a multiple of it.
    lhs = jnp.pad(lhs, ((0, m_pad - M), (0, c_pad - C)))
    if transpose_rhs:
        rhs = jnp.pad(rhs, ((0, 0), (0, o_pad - O), (0, c_pad - C)))
    else:
        rhs = jnp.pad(rhs, ((0, 0), (0, c_pad - C), (0, o_pad - O)))
    nk, nn = c_pad // tk, o_pad // tn
    visits = make_visits(group_sizes, M, m_pad, tm, tail=True, visit_empty=False)
    n_visits = visits.group.shape[0]

    def lhs_map(n, v, k, offsets, group, tile, fetch_tile, fetch_group, work, count):
        return fetch_tile[v], jnp.where(work[v] == 1, k, nk - 1)

    def rhs_map(n, v, k, offsets, group, tile, fetch_tile, fetch_group, work, count):
        kk = jnp.where(work[v] == 1, k, nk - 1)
        return (fetch_group[v], n, kk) if transpose_rhs else (fetch_group[v], kk, n)

    def out_map(n, v, k, offsets, group, tile, fetch_tile, fetch_group, work, count):
        return tile[v], n

    rhs_block = (1, tn, tk) if transpose_rhs else (1, tk, tn)
    item, out_item = lhs.dtype.itemsize, jnp.dtype(out_dtype).itemsize
    block_bytes = tm * tk * item + tk * tn * item + tm * tn * out_item
    rows, bounds = _cost_rows(m_pad, tm, min(E, n_visits), expected_rows)
    # whole-contraction blocks are reused across a group's visits
    weight_reads = E if nk == 1 else min(n_visits, rows // tm + bounds)
    cost = pl.CostEstimate(
        flops=2 * (rows + bounds * tm) * c_pad * o_pad,
        transcendentals=0,
        bytes_accessed=rows * c_pad * item * nn + weight_reads * c_pad * o_pad * item + rows * o_pad * out_item)
    out = pl.pallas_call(
        functools.partial(_gmm_kernel, tm=tm, nk=nk, transpose_rhs=transpose_rhs, precision=_precision(lhs.dtype)),
        out_shape=_out_struct((m_pad, o_pad), out_dtype, lhs, rhs, *visits),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(visits),
            grid=(nn, n_visits, nk),
            in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
            out_specs=pl.BlockSpec((tm, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)]),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary"),
                                             vmem_limit_bytes=_vmem_limit(block_bytes + tm * tn * 4)),
        cost_estimate=cost,
        interpret=interpret,
        name="moe_gmm_t" if transpose_rhs else "moe_gmm",
    )(*visits, lhs, rhs)
    return out[:M, :O]


# ----------------------------------------------------------------------------------------------
# tgmm


def _tgmm_kernel(offsets, group, tile, fetch_tile, fetch_group, work, count, lhs_ref, dout_ref, out_ref, acc_ref, *,
                 tm: int, precision):
    del fetch_tile, fetch_group
    v, last_v = pl.program_id(2), pl.num_programs(2) - 1
    g = group[v]
    first = (v == 0) | (group[jnp.maximum(v - 1, 0)] != g)
    last = (v == count[0] - 1) | (group[jnp.minimum(v + 1, last_v)] != g)
    real = v < count[0]

    @pl.when(real & first)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(work[v] == 1)
    def _accumulate():  # rows of other groups are zeroed in both operands (0 * inf would be NaN)
        def mine(x):
            rows = tile[v] * tm + jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
            return jnp.where((rows >= offsets[g]) & (rows < offsets[g + 1]), x, jnp.zeros_like(x))
        acc_ref[...] += jax.lax.dot_general(mine(lhs_ref[...]), mine(dout_ref[...]), (((0,), (0,)), ((), ())),
                                            precision=precision, preferred_element_type=jnp.float32)

    @pl.when(real & last)
    def _store():
        out_ref[0] = acc_ref[...].astype(out_ref.dtype)


def _tgmm_call(lhs, dout, group_sizes, interpret, *, out_dtype, tiling, expected_rows: int | None = None):
    """sum over the rows of each group of lhs[r]^T dout[r]: [M, K] x [M, N] -> [E, K, N] out_dtype. The
    cost estimate counts `expected_rows` rows (`_cost_rows`)."""
    M, K = lhs.shape
    N = dout.shape[1]
    E = group_sizes.shape[0]
    if tiling is None:
        tiling = default_tiling(M, K, N, E, lhs.dtype, transposed_out=True)
    tm, tk, tn = tiling
    tm, m_pad = _row_tile(M, tm)
    tk, k_pad = _fit(K, tk, _LANE)
    tn, n_pad = _fit(N, tn, _LANE)
    lhs = jnp.pad(lhs, ((0, m_pad - M), (0, k_pad - K)))
    dout = jnp.pad(dout, ((0, m_pad - M), (0, n_pad - N)))
    nk, nn = k_pad // tk, n_pad // tn
    visits = make_visits(group_sizes, M, m_pad, tm, tail=False, visit_empty=True)
    n_visits = visits.group.shape[0]

    def lhs_map(kk, n, v, offsets, group, tile, fetch_tile, fetch_group, work, count):
        return fetch_tile[v], kk

    def dout_map(kk, n, v, offsets, group, tile, fetch_tile, fetch_group, work, count):
        return fetch_tile[v], n

    def out_map(kk, n, v, offsets, group, tile, fetch_tile, fetch_group, work, count):
        return group[v], kk, n

    item, out_item = lhs.dtype.itemsize, jnp.dtype(out_dtype).itemsize
    block_bytes = tm * tk * item + tm * tn * dout.dtype.itemsize + tk * tn * out_item
    rows, bounds = _cost_rows(m_pad, tm, min(E, n_visits), expected_rows)
    cost = pl.CostEstimate(
        flops=2 * (rows + bounds * tm) * k_pad * n_pad,
        transcendentals=0,
        bytes_accessed=(rows * k_pad * item * nn + rows * n_pad * dout.dtype.itemsize * nk
                        + E * k_pad * n_pad * out_item))
    out = pl.pallas_call(
        functools.partial(_tgmm_kernel, tm=tm, precision=_precision(lhs.dtype)),
        out_shape=_out_struct((E, k_pad, n_pad), out_dtype, lhs, dout, *visits),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(visits),
            grid=(nk, nn, n_visits),
            in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((tm, tn), dout_map)],
            out_specs=pl.BlockSpec((1, tk, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)]),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"),
                                             vmem_limit_bytes=_vmem_limit(block_bytes + tk * tn * 4)),
        cost_estimate=cost,
        interpret=interpret,
        name="moe_tgmm",
    )(*visits, lhs, dout)
    return out[:, :K, :N]


# ----------------------------------------------------------------------------------------------
# Public entry points


def _run(call, xla, interpret, *args):
    """call(*args, interpret): the Mosaic kernel (interpret=False), Pallas' interpreter (True), or with
    interpret=None the kernel when lowered for TPU, `xla(*args)` (the same function by XLA's ragged
    dot) on GPU, where these TPU kernels would only run in the interpreter, and the interpreter
    elsewhere. Outside shard_map that is decided at lowering (`platform_dependent`), so AOT
    compilation for a TPU topology on a CPU host still gets the kernel; inside a shard_map that
    tracks varying axes the mesh's devices say which."""
    varying = _varying(args)
    if interpret is None:
        platform = getattr(getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None), "platform", None)
        if varying and platform is not None:
            if platform in ("gpu", "cuda", "rocm"):
                return xla(*args)
            return call(*args, False if platform == "tpu" else pltpu.InterpretParams())
        return jax.lax.platform_dependent(*args, tpu=lambda *a: call(*a, False), cuda=xla, rocm=xla,
                                          default=lambda *a: call(*a, True))
    if interpret is True and varying:
        interpret = pltpu.InterpretParams()
    return call(*args, interpret)


def _xla_gmm(lhs, rhs, group_sizes, *, out_dtype, transpose_rhs: bool):
    """gmm by `jax.lax.ragged_dot` (GPU)."""
    rhs = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, precision=_precision(lhs.dtype),
                              preferred_element_type=out_dtype)


def _xla_tgmm(lhs, dout, group_sizes, *, out_dtype):
    """tgmm by `jax.lax.ragged_dot_general` with the rows (the contraction) ragged (GPU)."""
    dims = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(((0,), (0,)), ((), ())),
                                             lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    return jax.lax.ragged_dot_general(lhs, dout, group_sizes, dims, precision=_precision(lhs.dtype),
                                      preferred_element_type=out_dtype)


def _varying(operands) -> bool:
    """Whether any operand varies over a manual mesh axis (inside a shard_map with check_vma). The
    generic interpreter's block-index slicing trips the varying-axes check there (jax 0.10.2), so the
    TPU interpreter (slower, but it also poisons uninitialised VMEM with NaNs) runs instead."""
    return any(getattr(getattr(jax.typeof(x), "manual_axis_type", None), "varying", None)
               or getattr(jax.typeof(x), "vma", None) for x in operands)


def _varying_axes(x) -> frozenset:
    t = jax.typeof(x)
    mat = getattr(t, "manual_axis_type", None)
    return frozenset(mat.varying) if mat is not None else frozenset(getattr(t, "vma", ()))


def _vary_together(*operands):
    """Inside a shard_map that types varying axes: the operands cast to vary over every axis any of
    them varies over. The custom VJP's cotangents vary like its output, so its inputs must already
    (a rule's cotangent cannot change type), and the cast's transpose, a psum, is then where AD sums
    a weight's gradient over the token axes the weight is replicated on. Outside: unchanged."""
    axes = frozenset().union(*(_varying_axes(x) for x in operands))
    return tuple(jax.lax.pcast(x, tuple(sorted(axes - _varying_axes(x))), to="varying")
                 if axes - _varying_axes(x) else x for x in operands)


def _check_expected(expected_rows):
    if expected_rows is not None and (not isinstance(expected_rows, (int, np.integer)) or expected_rows < 0):
        raise ValueError(f"expected_rows must be a non-negative Python int or None, got {expected_rows!r}")
    return None if expected_rows is None else int(expected_rows)


def _check_sizes(group_sizes, E: int):
    if group_sizes.ndim != 1 or group_sizes.shape[0] != E:
        raise ValueError(f"group_sizes must have shape [{E}] (one size per group), got {group_sizes.shape}")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be integers, got {group_sizes.dtype}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _gmm(lhs, rhs, group_sizes, out_dtype, tiling, interpret, expected_rows):
    return _run(functools.partial(_gmm_call, out_dtype=out_dtype, tiling=tiling, transpose_rhs=False,
                                  expected_rows=expected_rows),
                functools.partial(_xla_gmm, out_dtype=out_dtype, transpose_rhs=False), interpret, lhs, rhs, group_sizes)


def _gmm_fwd(lhs, rhs, group_sizes, out_dtype, tiling, interpret, expected_rows):
    return _gmm(lhs, rhs, group_sizes, out_dtype, tiling, interpret, expected_rows), (lhs, rhs, group_sizes)


def _gmm_bwd(out_dtype, tiling, interpret, expected_rows, residuals, dout):
    # Cotangents come in out_dtype; the matmuls run in the operands' dtype with fp32 accumulation.
    lhs, rhs, group_sizes = residuals
    dout = dout.astype(lhs.dtype)
    dlhs = _run(functools.partial(_gmm_call, out_dtype=lhs.dtype, tiling=tiling, transpose_rhs=True,
                                  expected_rows=expected_rows),
                functools.partial(_xla_gmm, out_dtype=lhs.dtype, transpose_rhs=True), interpret, dout, rhs, group_sizes)
    drhs = _run(functools.partial(_tgmm_call, out_dtype=rhs.dtype, tiling=tiling, expected_rows=expected_rows),
                functools.partial(_xla_tgmm, out_dtype=rhs.dtype), interpret, lhs, dout, group_sizes)
    return dlhs, drhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, preferred_element_type=None,
        tiling: Tiling | None = None, interpret: bool | None = None, expected_rows: int | None = None) -> jax.Array:
    """Grouped matmul: lhs [M, K] rows sorted by group, rhs [E, K, N], group_sizes [E] -> [M, N].

    Row r of group e (the rows [sum(sizes[:e]), sum(sizes[:e+1]))) gets lhs[r] @ rhs[e]; rows past
    sum(group_sizes) get zeros. Same function as `jax.lax.ragged_dot`, differentiable (custom VJP:
    dlhs by gmm with the transposed weights, drhs by `tgmm`). Accumulates in fp32 and returns
    preferred_element_type (default lhs.dtype). tiling (tm, tk, tn): rows, contraction and output
    column block sizes (None: `default_tiling`). interpret: None runs the Mosaic kernel when lowered
    for TPU, `jax.lax.ragged_dot` on GPU and Pallas' interpreter elsewhere (CPU tests); True/False
    force the interpreter / the kernel. expected_rows: how many of the M rows the caller expects to be
    real, for the kernel's cost estimate only (XLA's cost analysis; the kernel visits only the real
    rows' tiles whatever it says); None: all M, the most the kernel can do.
    """
    if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"gmm needs lhs [M, K] and rhs [E, K, N], got {lhs.shape} and {rhs.shape}")
    if lhs.dtype != rhs.dtype:
        raise ValueError(f"gmm needs lhs and rhs of one dtype, got {lhs.dtype} and {rhs.dtype}")
    _check_sizes(group_sizes, rhs.shape[0])
    out_dtype = np.dtype(preferred_element_type or lhs.dtype)
    lhs, rhs = _vary_together(lhs, rhs, group_sizes)[:2]
    return _gmm(lhs, rhs, group_sizes, out_dtype, None if tiling is None else _check_tiling(tiling), interpret,
                _check_expected(expected_rows))


def tgmm(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array, *, preferred_element_type=jnp.float32,
         tiling: Tiling | None = None, interpret: bool | None = None, expected_rows: int | None = None) -> jax.Array:
    """Grouped outer product: out[e] = sum over the rows r of group e of lhs[r]^T dout[r].

    lhs [M, K], dout [M, N] rows sorted by group, group_sizes [E] -> [E, K, N] (empty groups: zeros;
    rows past sum(group_sizes) ignored). The weight gradient of `gmm`. expected_rows as for `gmm`.
    """
    if lhs.ndim != 2 or dout.ndim != 2 or lhs.shape[0] != dout.shape[0]:
        raise ValueError(f"tgmm needs lhs [M, K] and dout [M, N] with the same M, got {lhs.shape} and {dout.shape}")
    if lhs.dtype != dout.dtype:
        raise ValueError(f"tgmm needs lhs and dout of one dtype, got {lhs.dtype} and {dout.dtype}")
    _check_sizes(group_sizes, group_sizes.shape[0] if group_sizes.ndim == 1 else -1)
    out_dtype = np.dtype(preferred_element_type or lhs.dtype)
    tiling = None if tiling is None else _check_tiling(tiling)
    return _run(functools.partial(_tgmm_call, out_dtype=out_dtype, tiling=tiling,
                                  expected_rows=_check_expected(expected_rows)),
                functools.partial(_xla_tgmm, out_dtype=out_dtype), interpret, lhs, dout, group_sizes)


def grouped_swiglu(xs: jax.Array, sizes: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array,
                   row_weights: jax.Array, limit: float, act_quant: Callable | None = None, *,
                   interpret: bool | None = None, tiling: Tiling | None = None,
                   expected_rows: int | None = None) -> jax.Array:
    """The routed experts on expert-contiguous rows, on the Pallas grouped matmuls (moe_impl=pallas).

    Same signature and function as `moe_dispatch_reference.grouped_swiglu`: xs [M, d] sorted by expert, sizes [E]
    (sum <= M; rows past the sum give zeros), w1/w3 [E, d, I], w2 [E, I, d], row_weights [M] fp32
    (applied before W2). Returns [M, d] in xs.dtype. The weights are cast to xs.dtype; each kernel
    accumulates in fp32 and stores xs.dtype (`expert_gemm`'s rounding); the SwiGLU clamp runs in fp32
    between the kernels. act_quant: release numerics, as the twin. interpret, tiling and expected_rows
    (the kernels' cost estimates) as for `gmm`
    (interpret=None: the TPU kernel on TPU, XLA's ragged dot on GPU, the interpreter elsewhere, so
    moe_impl=pallas runs anywhere).
    """
    d = xs.shape[-1] if xs.ndim else -1
    if xs.ndim != 2 or w1.shape != w3.shape or w1.shape[:2] != (w2.shape[0], d) or w2.shape[1:] != (w1.shape[2], d):
        raise ValueError(f"grouped_swiglu needs xs [M, d], w1/w3 [E, d, I], w2 [E, I, d]; got xs {xs.shape}, "
                         f"w1 {w1.shape}, w3 {w3.shape}, w2 {w2.shape}")
    if row_weights.shape != xs.shape[:1]:
        raise ValueError(f"row_weights must have shape [{xs.shape[0]}], got {row_weights.shape}")
    dt = xs.dtype
    # each kernel stores its fp32 accumulator in xs.dtype, the rounding `expert_gemm` asks for
    mm = expert_gemm(lambda a, w: gmm(a, w.astype(dt), sizes, preferred_element_type=dt, tiling=tiling,
                                      interpret=interpret, expected_rows=expected_rows), act_quant)
    h = swiglu(mm(xs, w1), mm(xs, w3), limit) * row_weights[:, None]  # [M, I] fp32
    return mm(h.astype(dt), w2).astype(dt)  # [M, d]
