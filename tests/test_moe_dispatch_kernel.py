"""Pallas MoE grouped matmuls (pallas_kernels/moe_dispatch.py) against the references.

Numerics run the kernels in Pallas' interpreter on CPU; the last tests compile them with the real
Mosaic compiler for TPU topologies described by libtpu (no TPU needed).
Errors are relative to the reference's largest magnitude: fp32 <= 1e-5, bf16 <= 2e-2.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.moe_dispatch import (_xla_gmm, _xla_tgmm, default_tiling, gmm, grouped_swiglu, make_visits,
                                         permute, tgmm, unpermute_combine)
from pallas_kernels.moe_dispatch_reference import grouped_swiglu as grouped_swiglu_ragged_dot
from pallas_kernels.moe_dispatch_reference import grouped_swiglu_onehot
from conftest import tpu_devices_or_skip

P = jax.sharding.PartitionSpec
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
HI = jax.lax.Precision.HIGHEST

# M = 70 rows (not a tile multiple), E = 5 experts. With the test tiling (16, 128, 128) and d = 160 the
# contraction over d takes two blocks plus padding; I = 96 fits one block (whole-dim block).
M, D, I, E = 70, 160, 96, 5
TILING = (16, 128, 128)
SIZES = {
    "random": [12, 0, 25, 3, 30],
    "one_expert": [0, 0, 70, 0, 0],
    "empty_experts_and_unrouted_tail": [0, 20, 0, 17, 0],  # sum 37 < M: rows 37.. belong to no expert
    "tile_aligned_boundaries": [16, 16, 0, 32, 6],
    "no_rows_routed": [0, 0, 0, 0, 0],
}


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def operands(dtype, seed=0):
    rng = np.random.default_rng(seed)
    a = lambda *s, scale=1.0: jnp.asarray(rng.normal(size=s) * scale, dtype)  # noqa: E731
    xs, w1, w3, w2 = a(M, D), a(E, D, I, scale=D ** -0.5), a(E, D, I, scale=D ** -0.5), a(E, I, D, scale=I ** -0.5)
    row_weights = jnp.asarray(rng.uniform(0.1, 1.0, M), jnp.float32)
    return xs, w1, w3, w2, row_weights


def ragged_dot(lhs, rhs, sizes):
    return jax.lax.ragged_dot(lhs, rhs, sizes, precision=HI, preferred_element_type=jnp.float32)


# ------------------------------------------------------------------------------------------------
# Visit metadata


_visits = jax.jit(functools.partial(make_visits, m=101, m_pad=112, tm=16, tail=True, visit_empty=False))


@pytest.mark.parametrize("seed", range(8))
def test_visits_cover_every_row_exactly_once_within_the_static_bound(seed):
    rng = np.random.default_rng(seed)
    E_, tm, m, m_pad = 7, 16, 101, 112
    sizes = rng.multinomial(int(rng.integers(0, m + 1)), rng.dirichlet(np.ones(E_) * 0.3)).astype(np.int32)
    v = jax.tree.map(np.asarray, _visits(jnp.asarray(sizes)))
    count = int(v.count[0])
    assert count <= len(v.group) == m_pad // tm + E_  # the grid's static bound holds
    owner = np.full(m_pad, -1)
    for g, t in zip(v.group[:count], v.tile[:count]):
        rows = np.arange(t * tm, (t + 1) * tm)
        mine = rows[(rows >= v.offsets[g]) & (rows < v.offsets[g + 1])]
        assert mine.size and (owner[mine] == -1).all()
        owner[mine] = g
    want = np.concatenate([np.repeat(np.arange(E_), sizes), np.full(m_pad - sizes.sum(), E_)])
    np.testing.assert_array_equal(owner, want)  # every row stored once, by its own group (E = unrouted)
    assert (np.diff(v.group[:count]) >= 0).all() and (v.fetch_group < E_).all()


def test_default_tiling_shrinks_the_row_tile_when_experts_get_few_rows():
    assert default_tiling(49152, 4096, 2048, 256, jnp.bfloat16) == (128, 4096, 1024)  # ~192 rows per expert
    assert default_tiling(49152, 7168, 3072, 384, jnp.bfloat16) == (128, 7168, 512)  # whole d = 7168 still fits
    assert default_tiling(49152, 32768, 2048, 8, jnp.bfloat16) == (512, 2048, 512)  # too wide: split the contraction
    assert default_tiling(1 << 20, 2048, 4096, 256, jnp.bfloat16)[0] == 512  # many rows, a narrow contraction
    # a wide contraction: a smaller row tile buys a wider column tile (the rows are read once per column tile;
    # weights stay read once): v4-flash's w1 on 4 local experts, v4-pro's on 6 with the width split 4 ways
    assert default_tiling(1 << 20, 4096, 2048, 256, jnp.bfloat16) == (256, 4096, 1024)
    assert default_tiling(27033, 7168, 768, 6, jnp.bfloat16) == (256, 7168, 256)  # not (512, 2048, 512)
    assert default_tiling(49152, 4096, 2048, 256, jnp.bfloat16, transposed_out=True) == (128, 1024, 1024)


# ------------------------------------------------------------------------------------------------
# gmm / tgmm against ragged_dot and per-group products


_gmm_f32 = jax.jit(lambda a, b, s: gmm(a, b, s, preferred_element_type=jnp.float32, tiling=TILING))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", sorted(SIZES))
def test_gmm_matches_ragged_dot_and_zeroes_unrouted_rows(case, dtype):
    xs, w1, *_ = operands(dtype)
    sizes = jnp.asarray(SIZES[case], jnp.int32)
    got = _gmm_f32(xs, w1, sizes)
    want = ragged_dot(xs, w1, sizes)
    assert got.shape == (M, I) and got.dtype == jnp.float32
    assert rel_err(got, want) <= TOL[dtype] or not np.any(np.asarray(want))
    np.testing.assert_array_equal(np.asarray(got[int(sum(SIZES[case])):]), 0.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tgmm_is_the_per_group_sum_of_outer_products(dtype):
    xs, *_ = operands(dtype)
    dout = jnp.asarray(np.random.default_rng(1).normal(size=(M, I)), dtype)
    sizes = SIZES["empty_experts_and_unrouted_tail"]
    got = jax.jit(lambda a, b, s: tgmm(a, b, s, tiling=TILING))(xs, dout, jnp.asarray(sizes, jnp.int32))
    ends = np.cumsum(sizes)
    x64, d64 = np.asarray(xs, np.float64), np.asarray(dout, np.float64)
    want = np.stack([x64[e - s:e].T @ d64[e - s:e] for s, e in zip(sizes, ends)])
    assert got.shape == (E, D, I)
    assert rel_err(got, want) <= TOL[dtype]
    np.testing.assert_array_equal(np.asarray(got)[[0, 2, 4]], 0.0)  # experts without rows


def test_gpu_path_by_xla_ragged_dot_equals_the_kernels():
    # On GPU interpret=None runs these instead of the TPU kernels; checked here on CPU, fp32.
    xs, w1, *_ = operands(jnp.float32)
    dout = jnp.asarray(np.random.default_rng(1).normal(size=(M, I)), jnp.float32)
    sizes = jnp.asarray(SIZES["empty_experts_and_unrouted_tail"], jnp.int32)
    want = _gmm_f32(xs, w1, sizes)
    got = _xla_gmm(xs, w1, sizes, out_dtype=jnp.float32, transpose_rhs=False)
    assert rel_err(got, want) <= 1e-5
    np.testing.assert_array_equal(np.asarray(got[37:]), 0.0)  # rows past the groups
    got_t = _xla_gmm(dout, w1, sizes, out_dtype=jnp.float32, transpose_rhs=True)
    want_t = gmm(dout, jnp.swapaxes(w1, 1, 2), sizes, preferred_element_type=jnp.float32, tiling=TILING,
                 interpret=True)
    assert rel_err(got_t, want_t) <= 1e-5
    got_w = _xla_tgmm(xs, dout, sizes, out_dtype=jnp.float32)
    want_w = tgmm(xs, dout, sizes, tiling=TILING, interpret=True)
    assert got_w.shape == (E, D, I) and rel_err(got_w, want_w) <= 1e-5
    np.testing.assert_array_equal(np.asarray(got_w)[[0, 2, 4]], 0.0)  # experts without rows


@pytest.mark.parametrize("dtype", [jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)])
def test_gmm_gradients_match_ragged_dot(dtype):
    xs, w1, *_ = operands(dtype)
    sizes = jnp.asarray(SIZES["random"], jnp.int32)
    ct = jnp.asarray(np.random.default_rng(2).normal(size=(M, I)), jnp.float32)
    loss = lambda mm: lambda a, b: jnp.sum(mm(a, b) * ct)  # noqa: E731
    got = jax.jit(jax.grad(loss(lambda a, b: gmm(a, b, sizes, preferred_element_type=jnp.float32, tiling=TILING)),
                           argnums=(0, 1)))(xs, w1)
    want = jax.grad(loss(lambda a, b: ragged_dot(a.astype(jnp.float32), b.astype(jnp.float32), sizes)),
                    argnums=(0, 1))(xs, w1)
    for g, w in zip(got, want):
        assert g.dtype == dtype and rel_err(g, w) <= TOL[dtype]


def test_gmm_rejects_bad_input_with_a_clear_error():
    xs, w1, *_ = operands(jnp.float32)
    sizes = jnp.asarray(SIZES["random"], jnp.int32)
    with pytest.raises(ValueError, match="lhs \\[M, K\\] and rhs"):
        gmm(xs, w1[:, :10], sizes)
    with pytest.raises(ValueError, match="group_sizes must have shape"):
        gmm(xs, w1, sizes[:3])
    with pytest.raises(ValueError, match="tiling"):
        gmm(xs, w1, sizes, tiling=(10, 128, 128))
    with pytest.raises(ValueError, match="one dtype"):
        gmm(xs, w1.astype(jnp.bfloat16), sizes)
    with pytest.raises(ValueError, match="row_weights"):
        grouped_swiglu(xs, sizes, w1, w1, jnp.swapaxes(w1, 1, 2), jnp.ones((3,)), 10.0)


# ------------------------------------------------------------------------------------------------
# grouped_swiglu: reference (one-hot) vs ragged_dot vs pallas


LIMIT = 1.0  # low enough that the SwiGLU clamp engages on some rows (zero gradient there)


def _fn(impl):
    if impl == "pallas":
        return lambda *a: grouped_swiglu(*a, LIMIT, tiling=TILING)
    return lambda *a: {"reference": grouped_swiglu_onehot, "ragged_dot": grouped_swiglu_ragged_dot}[impl](*a, LIMIT)


@functools.cache
def _compiled(impl, mode):
    """One jitted function per implementation; the sizes are an argument, so the cases share it."""
    fn = _fn(impl)
    if mode == "forward":
        return jax.jit(fn)
    loss = lambda x, s, a, b, c, r, ct: jnp.sum(fn(x, s, a, b, c, r) * ct)  # noqa: E731
    return jax.jit(jax.grad(loss, argnums=(0, 2, 3, 4, 5)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", sorted(SIZES))
def test_grouped_swiglu_forward_agrees_three_ways(case, dtype):
    xs, w1, w3, w2, rw = operands(dtype)
    args = (xs, jnp.asarray(SIZES[case], jnp.int32), w1, w3, w2, rw)
    with jax.default_matmul_precision("highest"):
        ref = _compiled("reference", "forward")(*args)
        ragged = _compiled("ragged_dot", "forward")(*args)
    got = _compiled("pallas", "forward")(*args)
    # W2's result in the compute dtype, as DeepSeek's `Expert.forward` returns it (architecture.md §10.2)
    assert got.shape == (M, D) and got.dtype == ref.dtype == ragged.dtype == dtype
    routed = int(sum(SIZES[case]))
    np.testing.assert_array_equal(np.asarray(got[routed:]), 0.0)
    if routed:
        assert rel_err(got, ref) <= TOL[dtype] and rel_err(ragged, ref) <= TOL[dtype]


def test_bf16_experts_round_each_gemm_result_like_the_official_expert():
    """DeepSeek's `Expert.forward` in BF16: gate = w1(x).float(), up = w3(x).float() (BF16 GEMM results),
    SwiGLU and row weight in fp32, w2(h.to(bf16)) returned in BF16. Written out row by row in float64
    from the bf16 values, the three twins give the same bf16 values (a few may land one ulp apart where
    fp32 accumulation order decides a rounding); without the roundings of the GEMM results, many differ."""
    xs, w1, w3, w2, rw = operands(jnp.bfloat16, seed=7)
    sizes = SIZES["random"]
    f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)  # noqa: E731
    bf = lambda a: f64(jnp.asarray(np.asarray(a, np.float32), jnp.bfloat16))  # noqa: E731  round to bf16
    expert = np.repeat(np.arange(E), sizes)
    x, W1, W3, W2, r = f64(xs), f64(w1), f64(w3), f64(w2), np.asarray(rw, np.float64)

    def official(rounded):
        out = np.zeros((M, D))
        for n, e in enumerate(expert):
            g, u = x[n] @ W1[e], x[n] @ W3[e]
            g, u = (bf(g), bf(u)) if rounded else (g, u)
            g, u = np.minimum(g, LIMIT), np.clip(u, -LIMIT, LIMIT)
            h = bf(g / (1 + np.exp(-g)) * u * r[n])
            out[n] = bf(h @ W2[e]) if rounded else h @ W2[e]
        return out

    want, unrounded = official(True), bf(official(False))
    args = (xs, jnp.asarray(sizes, jnp.int32), w1, w3, w2, rw)
    ulp = np.max(np.abs(want)) * 2.0 ** -8
    for impl in ("reference", "ragged_dot", "pallas"):
        got = f64(_compiled(impl, "forward")(*args))
        assert np.mean(got != want) <= 0.01 and np.max(np.abs(got - want)) <= ulp, impl
    assert np.mean(unrounded != want) > 0.1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", ["random", "one_expert", "empty_experts_and_unrouted_tail", "tile_aligned_boundaries"])
def test_grouped_swiglu_gradients_match_the_references(case, dtype):
    xs, w1, w3, w2, rw = operands(dtype, seed=3)
    ct = jnp.asarray(np.random.default_rng(4).normal(size=(M, D)), jnp.float32)
    args = (xs, jnp.asarray(SIZES[case], jnp.int32), w1, w3, w2, rw, ct)
    with jax.default_matmul_precision("highest"):
        ref, ragged = _compiled("reference", "grad")(*args), _compiled("ragged_dot", "grad")(*args)
    got = _compiled("pallas", "grad")(*args)
    for name, g, r, rd in zip(("dxs", "dw1", "dw3", "dw2", "drow_weights"), got, ref, ragged):
        assert g.dtype == r.dtype and g.shape == r.shape, name
        assert rel_err(g, r) <= TOL[dtype], (name, rel_err(g, r))
        assert rel_err(rd, r) <= TOL[dtype], (name, "ragged_dot", rel_err(rd, r))
    routed = int(sum(SIZES[case]))
    np.testing.assert_array_equal(np.asarray(got[0][routed:]), 0.0)  # unrouted rows get no gradient


def test_unrouted_rows_holding_nan_do_not_leak_into_outputs_or_gradients():
    xs, w1, w3, w2, rw = operands(jnp.float32)
    sizes = jnp.asarray(SIZES["empty_experts_and_unrouted_tail"], jnp.int32)
    xs = xs.at[40:].set(jnp.nan)  # rows past sum(sizes) = 37, some inside the tile shared with expert 3
    out = _compiled("pallas", "forward")(xs, sizes, w1, w3, w2, rw)
    grads = _compiled("pallas", "grad")(xs, sizes, w1, w3, w2, rw, jnp.ones((M, D), jnp.float32))
    assert np.isfinite(np.asarray(out)).all() and not np.any(np.asarray(out[37:]))
    assert all(np.isfinite(np.asarray(g)).all() for g in grads[1:])
    assert np.isfinite(np.asarray(grads[0][:37])).all() and not np.any(np.asarray(grads[0][37:]))


def test_default_tiling_path_and_the_permutation_helpers_reproduce_the_dropless_layer():
    rng = np.random.default_rng(5)
    N, k = 23, 2
    x = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
    experts = jnp.asarray(rng.integers(0, E, (N, k)), jnp.int32)
    w = jnp.asarray(rng.uniform(size=(N, k)), jnp.float32)
    _, w1, w3, w2, _ = operands(jnp.float32)

    @jax.jit
    def layer(x, experts, w, w1, w3, w2):
        xs, sizes, order = permute(x, experts, E)
        return unpermute_combine(grouped_swiglu(xs, sizes, w1, w3, w2, w.reshape(-1)[order], 7.0), order, N, k)

    y = layer(x, experts, w, w1, w3, w2)
    x64, ids, w64 = np.asarray(x, np.float64), np.asarray(experts), np.asarray(w, np.float64)
    W1, W3, W2 = (np.asarray(a, np.float64) for a in (w1, w3, w2))
    want = np.zeros((N, D))
    for n in range(N):
        for j in range(k):
            e = ids[n, j]
            gate, up = np.minimum(x64[n] @ W1[e], 7.0), np.clip(x64[n] @ W3[e], -7.0, 7.0)
            want[n] += w64[n, j] * ((gate / (1 + np.exp(-gate)) * up) @ W2[e])
    assert rel_err(y, want) <= 1e-5


def test_runs_per_device_on_local_experts_inside_shard_map():
    devices = jax.devices()[:2]
    if len(devices) < 2:
        pytest.skip("needs 2 devices")
    mesh = jax.sharding.Mesh(np.array(devices), ("expert",))
    P = jax.sharding.PartitionSpec
    rng = np.random.default_rng(6)
    E2, Mloc, d, i = 4, 32, 128, 128  # 2 local experts and 32 (partly unrouted) rows per device
    xs = jnp.asarray(rng.normal(size=(2 * Mloc, d)), jnp.float32)
    sizes = jnp.asarray([10, 15, 0, 20], jnp.int32)
    w1, w3 = (jnp.asarray(rng.normal(size=(E2, d, i)) * d ** -0.5, jnp.float32) for _ in range(2))
    w2 = jnp.asarray(rng.normal(size=(E2, i, d)) * i ** -0.5, jnp.float32)
    rw = jnp.ones((2 * Mloc,), jnp.float32)
    specs = (P("expert"), P("expert"), P("expert"), P("expert"), P("expert"), P("expert"))
    got = jax.jit(jax.shard_map(lambda *a: grouped_swiglu(*a, 7.0, tiling=TILING), mesh=mesh, in_specs=specs,
                                out_specs=P("expert")))(xs, sizes, w1, w3, w2, rw)
    for dev in range(2):
        sl, el = slice(dev * Mloc, (dev + 1) * Mloc), slice(2 * dev, 2 * dev + 2)
        with jax.default_matmul_precision("highest"):
            want = grouped_swiglu_onehot(xs[sl], sizes[el], w1[el], w3[el], w2[el], rw[sl], 7.0)
        assert rel_err(got[sl], want) <= 1e-5


def test_typed_shard_map_sums_the_weight_gradient_over_the_axes_the_weight_is_replicated_on():
    # Expert parallelism's layout: rows split over (fsdp, expert), the weights over expert only, so a
    # weight's gradient is the sum of the fsdp devices' contributions (check_vma=True, TPU interpreter).
    devices = jax.devices()[:4]
    if len(devices) < 4:
        pytest.skip("needs 4 devices")
    mesh = jax.sharding.Mesh(np.array(devices).reshape(2, 2), ("fsdp", "expert"))
    rows, experts = P(("fsdp", "expert")), P("expert")
    rng = np.random.default_rng(7)
    Mloc, d, n = 32, 128, 128
    lhs = jnp.asarray(rng.normal(size=(4 * Mloc, d)), jnp.float32)
    sizes = jnp.asarray([10, 15, 0, 20, 32, 0, 7, 7], jnp.int32)  # 2 local experts per device
    rhs = jnp.asarray(rng.normal(size=(4, d, n)) * d ** -0.5, jnp.float32)
    ct = jnp.asarray(rng.normal(size=(4 * Mloc, n)), jnp.float32)

    def grads(mm):
        local = jax.shard_map(lambda a, b, s, c: jnp.sum(mm(a, b, s) * c)[None], mesh=mesh,
                              in_specs=(rows, experts, rows, rows), out_specs=rows)
        return jax.jit(jax.grad(lambda a, b: jnp.sum(local(a, b, sizes, ct)), argnums=(0, 1)))(lhs, rhs)

    got = grads(lambda a, b, s: gmm(a, b, s, preferred_element_type=jnp.float32, tiling=TILING))
    want = grads(ragged_dot)
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-5


# ------------------------------------------------------------------------------------------------
# Real Mosaic compilation for TPU topologies (no TPU needed).

def compile_for_tpu(topology, fn, shapes):
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(tpu_devices_or_skip(topology)[:1], ("x",)),
                                          jax.sharding.PartitionSpec())
    args = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes]
    return jax.jit(fn).lower(*args).compile()


def _swiglu_shapes(m, d, i, e, dtype):
    return [((m, d), dtype), ((e,), jnp.int32), ((e, d, i), dtype), ((e, d, i), dtype), ((e, i, d), dtype),
            ((m,), jnp.float32)]


@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v6e:2x2"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, pytest.param(jnp.float32, marks=pytest.mark.slow)])
def test_mosaic_compiles_forward_and_backward_for_tpu(topology, dtype):
    # The gradient program holds the forward kernels too: gmm (x3), transposed gmm (x3), tgmm (x3).
    fwd = lambda *a: grouped_swiglu(*a, 10.0)  # noqa: E731 - default tiling, whole-contraction blocks
    bwd = jax.grad(lambda *a: jnp.sum(fwd(*a)), argnums=(0, 2, 3, 4, 5))
    compiled = compile_for_tpu(topology, bwd, _swiglu_shapes(1024, 512, 256, 8, dtype))
    hlo = compiled.as_text()
    assert "tpu_custom_call" in hlo  # the Mosaic kernels, not the interpreter
    assert all(name in hlo for name in ("moe_gmm", "moe_gmm_t", "moe_tgmm"))
    assert compiled.cost_analysis()["flops"] > 0


def test_the_cost_estimate_counts_the_rows_the_caller_expects():
    # XLA's cost analysis reads each kernel's static estimate; the kernels visit only the real rows'
    # tiles, so a caller that knows the expected load (the expert-parallel exchange) says how many of
    # the buffer's rows to count: a quarter of 4,096 rows (two groups) costs about a quarter, forward
    # and backward (gmm, transposed gmm, tgmm); no hint counts the whole buffer, as before.
    m, d, i, e = 4096, 512, 256, 2

    def flops(expected):
        fwd = lambda *a: grouped_swiglu(*a, 10.0, expected_rows=expected)  # noqa: E731
        bwd = jax.grad(lambda *a: jnp.sum(fwd(*a)), argnums=(0, 2, 3, 4, 5))
        return compile_for_tpu("v5p:2x2x1", bwd, _swiglu_shapes(m, d, i, e, jnp.bfloat16)).cost_analysis()["flops"]

    full, hinted, zero = flops(None), flops(m // 4), flops(0)
    # eight kernels at m rows: W1's and W3's forward (W2's result the sum's gradient does not need) and
    # each GEMM's two backward kernels
    kernels = 8 * 2 * m * d * i
    assert abs((full - hinted) / (0.75 * kernels) - 1) < 0.01  # three quarters of the kernels' rows gone
    assert full - zero > hinted - zero > 0
    with pytest.raises(ValueError, match="expected_rows"):
        gmm(jnp.ones((8, 128)), jnp.ones((1, 128, 128)), jnp.array([8], jnp.int32), expected_rows=-1)


@pytest.mark.parametrize("topology", ["v5p:2x2x1", pytest.param("v6e:2x2", marks=pytest.mark.slow)])
def test_mosaic_compiles_small_unaligned_dims_and_padded_tiles(topology):
    fwd = lambda *a: grouped_swiglu(*a, 10.0, tiling=(16, 128, 128))  # noqa: E731
    bwd = jax.grad(lambda *a: jnp.sum(fwd(*a)), argnums=(0, 2, 3, 4, 5))
    assert "tpu_custom_call" in compile_for_tpu(topology, bwd, _swiglu_shapes(M, D, I, E, jnp.bfloat16)).as_text()


def test_mosaic_compiles_inside_an_expert_parallel_shard_map():
    # How moe_impl=pallas runs under expert parallelism: each device's local experts inside shard_map.
    mesh = jax.sharding.Mesh(np.array(tpu_devices_or_skip("v5p:2x2x1")), ("expert",))
    spec = jax.sharding.PartitionSpec("expert")
    fwd = jax.shard_map(lambda *a: grouped_swiglu(*a, 10.0), mesh=mesh, in_specs=(spec,) * 6, out_specs=spec)
    bwd = jax.grad(lambda *a: jnp.sum(fwd(*a)), argnums=(0, 2, 3, 4, 5))
    sharding = jax.sharding.NamedSharding(mesh, spec)
    args = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in _swiglu_shapes(1024, 256, 256, 16, jnp.bfloat16)]
    hlo = jax.jit(bwd).lower(*args).compile().as_text()
    assert "tpu_custom_call" in hlo and "moe_tgmm" in hlo


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v6e:2x2", "v5e:2x2"])
@pytest.mark.parametrize("shape", [(8192, 4096, 2048, 32), (8192, 7168, 3072, 32), (27040, 7168, 768, 6)],
                         ids=["flash", "pro", "pro_tensor4"])
def test_mosaic_compiles_at_the_released_expert_shapes(topology, shape):
    # The released d and I; 32 local experts (as under expert parallelism) so weights and their
    # gradients fit a 16 GiB v5e chip; and v4-pro's round under fsdp_tp_ep (6 local experts, I split 4
    # ways, 4,096 tokens x 6 choices x capacity 1.1: the default tiling's whole-d, 256-column blocks).
    fwd = lambda *a: grouped_swiglu(*a, 10.0)  # noqa: E731
    bwd = jax.grad(lambda *a: jnp.sum(fwd(*a)), argnums=(0, 2, 3, 4, 5))
    compiled = compile_for_tpu(topology, bwd, _swiglu_shapes(*shape, jnp.bfloat16))
    assert "moe_tgmm" in compiled.as_text()
