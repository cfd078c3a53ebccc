"""Component tests against small hand-checkable cases and naive re-implementations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels.sparse_attention_reference import sparse_attention
from v4jax.model.compressor import Compressor
from v4jax.config import AttentionKind, MoEImpl, RouterKind, RunOptions, V4Config
from pallas_kernels.lightning_indexer_reference import select_topk
from v4jax.model.layers import Linear
from v4jax.model.mhc import HyperConnection, _mixes, sinkhorn
from v4jax.model.transformer import Transformer
from pallas_kernels.moe_dispatch_reference import gathered_swiglu, grouped_swiglu, swiglu
from v4jax.model.numerics import fp8_act_quant
from v4jax.model.moe import MoE, Experts, Routing
from v4jax.model.rope import apply_rope, inv_frequencies, yarn_correction_range


# ---------------------------------------------------------------- mHC (architecture.md §3)
def test_sinkhorn_output_is_doubly_stochastic_and_positive():
    logits = jax.random.normal(jax.random.key(0), (64, 4, 4))
    m = np.asarray(sinkhorn(logits, 20, 1e-6))
    assert (m > 0).all()
    np.testing.assert_allclose(m.sum(-2), 1.0, atol=1e-5)  # ends on a column normalisation
    np.testing.assert_allclose(m.sum(-1), 1.0, atol=1e-3)


def test_sinkhorn_matches_the_spec_steps_written_out_in_numpy():
    logits = np.random.default_rng(1).normal(size=(4, 4)).astype(np.float64)
    eps = 1e-6
    m = np.exp(logits - logits.max(-1, keepdims=True))
    m = m / m.sum(-1, keepdims=True) + eps
    m = m / (m.sum(0, keepdims=True) + eps)
    for _ in range(19):
        m = m / (m.sum(1, keepdims=True) + eps)
        m = m / (m.sum(0, keepdims=True) + eps)
    np.testing.assert_allclose(np.asarray(sinkhorn(jnp.asarray(logits, jnp.float32), 20, eps)), m, rtol=1e-5)


def test_mhc_coefficient_ranges_pre_positive_post_in_0_2():
    cfg = V4Config.preset("tiny")
    hc = HyperConnection(cfg, rngs=nnx.Rngs(0))
    hc.scale[...] = jnp.ones(3)
    pre, post, comb = hc.coefficients(jax.random.normal(jax.random.key(1), (2, 5, 4, cfg.dim)))
    assert bool((pre > 0).all()) and bool((post > 0).all()) and bool((post < 2).all())


def test_hc_post_applies_comb_transposed_like_a_hand_written_loop():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(1, 1, 4, 6)).astype(np.float32)
    y = rng.normal(size=(1, 1, 6)).astype(np.float32)
    post = rng.uniform(0, 2, size=(1, 1, 4)).astype(np.float32)
    comb = np.asarray(sinkhorn(jnp.asarray(rng.normal(size=(1, 1, 4, 4)), jnp.float32), 20, 1e-6))
    want = np.zeros_like(X)
    for k in range(4):  # X'_k = post_k y + sum_j comb[j, k] X_j (destination is the second index)
        want[0, 0, k] = post[0, 0, k] * y[0, 0] + sum(comb[0, 0, j, k] * X[0, 0, j] for j in range(4))
    got = HyperConnection.hc_post(jnp.asarray(y), jnp.asarray(X), jnp.asarray(post), jnp.asarray(comb))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(comb, comb.transpose(0, 1, 3, 2))  # the transpose is really exercised


def test_mhc_mixes_are_phi_times_the_rms_normalised_flat_streams_in_float64():
    """mu = rho * (Phi vec(X)) as the code computes it equals Phi (rho vec(X)) (architecture.md §3.2)."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(2, 3, 4, 8)) * 3.0  # [B, T, n_hc, d]
    fn = rng.normal(size=(24, 32))
    flat = X.reshape(2, 3, 32)
    want = np.einsum("btk,mk->btm", flat / np.sqrt((flat ** 2).mean(-1, keepdims=True) + 1e-6), fn)
    got = _mixes(jnp.asarray(X, jnp.float32), jnp.asarray(fn, jnp.float32), 1e-6)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_hc_post_with_identity_comb_is_a_plain_residual_block():
    X = jnp.broadcast_to(jnp.arange(6.0), (1, 1, 4, 6))
    y = jnp.ones((1, 1, 6))
    out = HyperConnection.hc_post(y, X, jnp.ones((1, 1, 4)), jnp.broadcast_to(jnp.eye(4), (1, 1, 4, 4)))
    np.testing.assert_allclose(np.asarray(out), np.asarray(X + 1.0))


# ---------------------------------------------------------------- RoPE / YaRN (architecture.md §7)
def test_yarn_range_of_released_configs_is_15_to_25_and_ramp_divides_high_pairs_by_16():
    cfg = V4Config.preset("v4-flash")
    assert yarn_correction_range(32, 1, 64, 160000.0, 65536) == (15, 25)
    f = inv_frequencies(cfg, AttentionKind.CSA)
    base = 1.0 / 160000.0 ** (np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(f[:16], base[:16], rtol=1e-6)  # pairs 0..15 unchanged
    np.testing.assert_allclose(f[25:], base[25:] / 16, rtol=1e-6)  # pairs 25..31 divided by 16
    assert all(base[i] / 16 < f[i] < base[i] for i in range(16, 25))


def test_sliding_layers_use_plain_rope_at_theta_10000():
    f = inv_frequencies(V4Config.preset("v4-flash"), AttentionKind.SLIDING)
    np.testing.assert_allclose(f, 1.0 / 10000.0 ** (np.arange(0, 64, 2) / 64), rtol=1e-6)


def test_tiny_yarn_ramp_is_exercised_lo0_hi2():
    assert yarn_correction_range(32, 1, 16, 160000.0, 32) == (0, 2)


def test_rope_rotates_interleaved_pairs_of_the_last_channels_and_inverse_undoes_it():
    x = jax.random.normal(jax.random.key(3), (5, 12))
    inv = np.array([0.5, 0.1], np.float32)  # rotates the last 4 channels: pairs (8,9), (10,11)
    pos = jnp.arange(5)
    y = np.asarray(apply_rope(x, pos, inv))
    np.testing.assert_array_equal(y[:, :8], np.asarray(x)[:, :8])
    z = (np.asarray(x)[:, 8::2] + 1j * np.asarray(x)[:, 9::2]) * np.exp(1j * np.arange(5)[:, None] * inv)
    np.testing.assert_allclose(y[:, 8::2], z.real, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y[:, 9::2], z.imag, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(apply_rope(jnp.asarray(y), pos, inv, inverse=True)), np.asarray(x), atol=1e-5)


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rope_gradient_is_the_opposite_rotation_of_the_cotangent(inverse, dtype):
    """apply_rope's custom VJP against the Jacobian written out: per pair the transposed 2x2 rotation
    (numpy, float64), the first channels passed through; the cotangent's dtype kept."""
    x = jax.random.normal(jax.random.key(4), (2, 5, 3, 12)).astype(dtype)  # [B, T, H, c]
    g = jax.random.normal(jax.random.key(5), x.shape).astype(dtype)
    inv = np.array([0.5, 0.1], np.float32)
    pos = jnp.arange(5)[:, None]
    dx = jax.vjp(lambda x: apply_rope(x, pos, inv, inverse=inverse), x)[1](g)[0]
    assert dx.dtype == dtype
    angle = np.arange(5)[:, None, None] * inv.astype(np.float64) * (-1 if inverse else 1)  # [T, 1, r/2]
    g64 = np.asarray(g.astype(jnp.float32), np.float64)
    a, b = g64[..., 8::2], g64[..., 9::2]
    want = g64.copy()
    want[..., 8::2] = a * np.cos(angle) + b * np.sin(angle)  # R^T g: rotation by -angle
    want[..., 9::2] = -a * np.sin(angle) + b * np.cos(angle)
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(dx.astype(jnp.float32)), want, rtol=tol, atol=tol)
    np.testing.assert_array_equal(np.asarray(dx)[..., :8], np.asarray(g)[..., :8])


@pytest.mark.parametrize("act_quant", [False, True])
def test_linear_with_heads_is_the_flat_product_reshaped_exactly(act_quant):
    """Linear(x, heads=H) writes the head layout from the product; the values are the flat product's."""
    lin = Linear(16, 4 * 8, (None, None), param_dtype=jnp.float32, rngs=nnx.Rngs(0), act_quant=act_quant)
    x = jax.random.normal(jax.random.key(6), (2, 5, 16))
    flat = lin(x)
    heads = lin(x, heads=4)
    assert heads.shape == (2, 5, 4, 8)
    np.testing.assert_array_equal(np.asarray(heads), np.asarray(flat).reshape(2, 5, 4, 8))
    # one token per sequence (decode): the flat product split after a barrier, the same values; the
    # per-head product (kernel viewed [in, heads, out / heads]) only for longer inputs
    one = lin(x[:, :1], heads=4)
    assert one.shape == (2, 1, 4, 8)
    np.testing.assert_array_equal(np.asarray(one), np.asarray(lin(x[:, :1])).reshape(2, 1, 4, 8))
    prims = lambda t: {e.primitive.name for e in jax.make_jaxpr(lambda a: lin(a, heads=4))(x[:, :t]).jaxpr.eqns}  # noqa: E731
    assert "optimization_barrier" in prims(1) and "optimization_barrier" not in prims(5)


# ---------------------------------------------------------------- compressor (architecture.md §4.3)
def test_hca_compressor_entry_is_softmax_pooled_window_then_norm():
    comp = Compressor(8, 4, 3, False, 1e-6, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    comp.ape[...] = jax.random.normal(jax.random.key(1), (3, 4))
    x = jax.random.normal(jax.random.key(2), (1, 7, 8))
    out = np.asarray(comp(x, jnp.arange(7)[None], np.zeros(1, np.float32))[0])  # inv_freq 0: RoPE is the identity
    assert out.shape == (1, 2, 4)  # 7 // 3 complete windows; the tail is dropped
    A = np.asarray(x[0] @ comp.wkv.kernel[...])
    Z = np.asarray(x[0] @ comp.wgate.kernel[...])
    for i in range(2):
        logits = Z[3 * i:3 * i + 3] + np.asarray(comp.ape[...])
        w = np.exp(logits - logits.max(0)) / np.exp(logits - logits.max(0)).sum(0)
        c = (w * A[3 * i:3 * i + 3]).sum(0)
        np.testing.assert_allclose(out[0, i], c / np.sqrt((c * c).mean() + 1e-6), rtol=1e-4, atol=1e-5)


def test_csa_compressor_first_entry_pools_only_its_own_window():
    comp = Compressor(8, 4, 2, True, 1e-6, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (1, 6, 8))
    out = np.asarray(comp(x, jnp.arange(6)[None], np.zeros(1, np.float32))[0])
    A = np.asarray(x[0] @ comp.wkv.kernel[...])
    Z = np.asarray(x[0] @ comp.wgate.kernel[...])

    def pool(vals, logits):
        w = np.exp(logits - logits.max(0))
        c = (w / w.sum(0) * vals).sum(0)
        return c / np.sqrt((c * c).mean() + 1e-6)

    np.testing.assert_allclose(out[0, 0], pool(A[0:2, 4:], Z[0:2, 4:]), rtol=1e-4, atol=1e-5)
    both = pool(np.concatenate([A[0:2, :4], A[2:4, 4:]]), np.concatenate([Z[0:2, :4], Z[2:4, 4:]]))
    np.testing.assert_allclose(out[0, 1], both, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- indexer top-k and attention (architecture.md §4.4-4.6)
def test_topk_breaks_exact_ties_towards_the_lowest_index_and_hides_invisible_entries():
    B, T, N = 1, 32, 8
    q = jnp.zeros((B, T, 2, 4))  # all scores exactly 0: every visible entry ties
    idx = np.asarray(select_topk(q, jnp.ones((B, T, 2)), jnp.ones((B, N, 4)), jnp.arange(T), 4, 3, 8))
    for t in range(T):
        visible = (t + 1) // 4
        want = list(range(min(visible, 3))) + [-1] * (3 - min(visible, 3))
        assert list(idx[0, t]) == want, t


def dense_reference(q, kv, sinks, window, compressed=None, idx=None, ratio=0):
    """Naive [T, T + N] masked attention written independently (numpy, float64)."""
    q, kv, sinks = (np.asarray(a, np.float64) for a in (q, kv, sinks))
    B, T, H, c = q.shape
    keys = kv if compressed is None else np.concatenate([kv, np.asarray(compressed, np.float64)], axis=1)
    out = np.zeros_like(q)
    for b in range(B):
        for t in range(T):
            mask = np.zeros(keys.shape[1], bool)
            mask[max(0, t - window + 1):t + 1] = True
            if compressed is not None:
                if idx is None:
                    mask[T:T + (t + 1) // ratio] = True
                else:
                    for s in np.asarray(idx)[b, t]:
                        if s >= 0:
                            mask[T + s] = True
            for h in range(H):
                z = keys[b] @ q[b, t, h] / math.sqrt(c)
                z = np.where(mask, z, -np.inf)
                m = max(z.max(), sinks[h])
                p = np.exp(z - m)
                out[b, t, h] = p @ keys[b] / (p.sum() + np.exp(sinks[h] - m))
    return out


@pytest.mark.parametrize("chunk", [64, 16, 7])  # one chunk; several; T not a multiple of the chunk
def test_sparse_attention_matches_dense_masked_reference_for_swa_hca_csa(chunk):
    rng = np.random.default_rng(0)
    B, T, H, c, W, N = 2, 37, 3, 8, 5, 9
    q = jnp.asarray(rng.normal(size=(B, T, H, c)), jnp.float32)
    kv = jnp.asarray(rng.normal(size=(B, T, c)), jnp.float32)
    comp = jnp.asarray(rng.normal(size=(B, N, c)), jnp.float32)
    sinks = jnp.asarray(rng.normal(size=(H,)), jnp.float32)
    np.testing.assert_allclose(sparse_attention(q, kv, sinks, W, chunk=chunk), dense_reference(q, kv, sinks, W),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sparse_attention(q, kv, sinks, W, comp, None, 4, chunk),
                               dense_reference(q, kv, sinks, W, comp, None, 4), rtol=1e-5, atol=1e-6)
    idx = np.full((B, T, 3), -1, np.int32)  # ragged valid counts, all-empty rows, distinct ids
    for b in range(B):
        for t in range(T):
            visible = (t + 1) // 4
            picks = rng.permutation(visible)[: rng.integers(0, 4)] if visible else []
            idx[b, t, :len(picks)] = picks
    np.testing.assert_allclose(sparse_attention(q, kv, sinks, W, comp, jnp.asarray(idx), 4, chunk),
                               dense_reference(q, kv, sinks, W, comp, idx, 4), rtol=1e-5, atol=1e-6)


def test_csa_with_topk_covering_all_entries_equals_attending_every_visible_entry():
    rng = np.random.default_rng(1)
    B, T, H, c, N = 1, 24, 2, 8, 6
    q, kv = jnp.asarray(rng.normal(size=(B, T, H, c)), jnp.float32), jnp.asarray(rng.normal(size=(B, T, c)), jnp.float32)
    comp, sinks = jnp.asarray(rng.normal(size=(B, N, c)), jnp.float32), jnp.zeros(H)
    idx = select_topk(jnp.asarray(rng.normal(size=(B, T, 2, 4)), jnp.float32), jnp.ones((B, T, 2)),
                      jnp.asarray(rng.normal(size=(B, N, 4)), jnp.float32), jnp.arange(T), 4, N, 8)
    np.testing.assert_allclose(sparse_attention(q, kv, sinks, 4, comp, idx, 4),
                               sparse_attention(q, kv, sinks, 4, comp, None, 4), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- MoE (architecture.md §5)
def test_swiglu_clamp_engages_gate_from_above_and_up_on_both_sides():
    g, u = jnp.array([20.0, 20.0, -3.0]), jnp.array([20.0, -20.0, 0.5])
    want = [10 / (1 + math.exp(-10)) * 10, 10 / (1 + math.exp(-10)) * -10, -3 / (1 + math.exp(3)) * 0.5]
    np.testing.assert_allclose(np.asarray(swiglu(g, u, 10.0)), want, rtol=1e-6)


@pytest.mark.parametrize("impl", list(MoEImpl))
@pytest.mark.parametrize("pattern", ["random", "one_expert", "empty_experts"])
@pytest.mark.parametrize("N", [13, 3])  # 3 tokens x 2 choices <= 8 experts: the gathered (decode) path
def test_dropless_expert_dispatch_matches_a_per_token_loop(pattern, impl, N):
    if impl is MoEImpl.PALLAS:
        pytest.importorskip("pallas_kernels.moe_dispatch")
    cfg = V4Config.preset("tiny")
    experts = Experts(cfg, rngs=nnx.Rngs(0), options=RunOptions(moe_impl=impl))
    rng = np.random.default_rng(0)
    k, E = cfg.n_activated_experts, cfg.n_routed_experts
    x = jnp.asarray(rng.normal(size=(N, cfg.dim)), jnp.float32)
    ids = {"random": rng.integers(0, E, (N, k)), "one_expert": np.tile([3, 5], (N, 1)),
           "empty_experts": np.tile([0, 7], (N, 1))}[pattern]
    w = rng.uniform(size=(N, k)).astype(np.float32)
    got = np.asarray(experts(x[None], Routing(jnp.asarray(w), jnp.asarray(ids, jnp.int32), None)))[0]
    W1, W2, W3 = (np.asarray(v[...]) for v in (experts.w1, experts.w2, experts.w3))
    want = np.zeros((N, cfg.dim))
    for n in range(N):
        for j in range(k):
            e = ids[n, j]
            h = np.asarray(swiglu(jnp.asarray(x[n] @ W1[e]), jnp.asarray(x[n] @ W3[e]), cfg.swiglu_limit))
            want[n] += w[n, j] * (h @ W2[e])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("release", [False, True])
def test_gathered_experts_equal_the_grouped_matmul_forward_and_gradients(release):
    """The decode-shaped path (each row's expert weights gathered) against ragged_dot on sorted rows,
    values and the gradients of x, the combine weights and the expert weights (release: FP8 inputs)."""
    rng = np.random.default_rng(3)
    N, k, E, d, I = 4, 3, 8, 32, 16
    dt = jnp.bfloat16 if release else jnp.float32
    x = jnp.asarray(rng.normal(size=(N, d)), dt)
    ids = jnp.asarray(np.stack([rng.choice(E, k, replace=False) for _ in range(N)]), jnp.int32)
    w = jnp.asarray(rng.uniform(size=(N, k)), jnp.float32)
    W1, W3 = (jnp.asarray(rng.normal(size=(E, d, I)) / 4, jnp.float32) for _ in range(2))
    W2 = jnp.asarray(rng.normal(size=(E, I, d)) / 4, jnp.float32)
    quant = fp8_act_quant if release else None

    def grouped(x, w, W1, W3, W2):
        order = jnp.argsort(ids.reshape(-1), stable=True)
        sizes = jnp.bincount(ids.reshape(-1), length=E).astype(jnp.int32)
        y = grouped_swiglu(x[order // k], sizes, W1, W3, W2, w.reshape(-1)[order], 7.0, quant)
        return jnp.zeros((N, d), jnp.float32).at[order // k].add(y)

    def gathered(x, w, W1, W3, W2):
        return gathered_swiglu(x, ids, w, W1, W3, W2, 7.0, quant)

    tol = dict(rtol=2e-2, atol=2e-2) if release else dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gathered(x, w, W1, W3, W2), grouped(x, w, W1, W3, W2), **tol)
    if not release:
        cot = jnp.asarray(rng.normal(size=(N, d)), jnp.float32)
        g_want = jax.grad(lambda *a: jnp.sum(grouped(*a) * cot), argnums=(0, 1, 2, 3, 4))(x, w, W1, W3, W2)
        g_got = jax.grad(lambda *a: jnp.sum(gathered(*a) * cot), argnums=(0, 1, 2, 3, 4))(x, w, W1, W3, W2)
        for a, b in zip(g_got, g_want):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_hash_layer_routes_by_the_token_table_and_learned_layer_by_biased_topk():
    cfg = V4Config.preset("tiny")
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (12,)))
    x = jnp.asarray(rng.normal(size=(12, cfg.dim)), jnp.float32)
    hashed = MoE(cfg, RouterKind.HASH, rngs=nnx.Rngs(0))
    r = hashed.gate(x, tokens)
    np.testing.assert_array_equal(np.asarray(r.experts), np.asarray(hashed.gate.tid2eid[...])[np.asarray(tokens)])
    # learned layer: a large bias on expert 6 forces its selection; weights stay the unbiased affinities
    gate = MoE(cfg, RouterKind.LEARNED, rngs=nnx.Rngs(1)).gate
    gate.bias[...] = jnp.zeros(cfg.n_routed_experts).at[6].set(100.0)
    r = gate(x, tokens)
    assert bool((r.experts == 6).any(axis=-1).all())
    np.testing.assert_allclose(np.asarray(r.weights.sum(-1)), cfg.route_scale, rtol=1e-5)
    s = np.asarray(r.scores)
    chosen = np.take_along_axis(s, np.asarray(r.experts), -1)
    np.testing.assert_allclose(np.asarray(r.weights), chosen / chosen.sum(-1, keepdims=True) * cfg.route_scale, rtol=1e-5)



# ---------------------------------------------------------------- whole model
@pytest.fixture(scope="module")
def tiny_model():
    cfg = V4Config.preset("tiny")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):  # make constant-initialised params matter
        if var.shape and path[-1] in ("sinks", "ape", "base", "scale"):
            var[...] = 0.5 * jax.random.normal(jax.random.key(hash(path) % 2**31), var.shape)
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    return cfg, model, lambda t: fwd(state, t)


@pytest.mark.parametrize("t", [15, 14, 31, 30, 47])  # m*k-1 (entry k-1 becomes visible) and m*k-2
def test_changing_later_tokens_never_changes_earlier_outputs(tiny_model, t):
    cfg, _, fwd = tiny_model
    rng = np.random.default_rng(t)
    a = rng.integers(0, cfg.vocab_size, (2, 56))
    b = a.copy()
    b[:, t + 1:] = rng.integers(0, cfg.vocab_size, (2, 56 - t - 1))
    oa, ob = fwd(jnp.asarray(a)), fwd(jnp.asarray(b))
    np.testing.assert_allclose(np.asarray(oa.logits[:, :t + 1]), np.asarray(ob.logits[:, :t + 1]), rtol=1e-6, atol=1e-6)
    # MTP output at position p reads token p+1: unchanged for p < t
    np.testing.assert_allclose(np.asarray(oa.mtp_logits[:, :t]), np.asarray(ob.mtp_logits[:, :t]), rtol=1e-6, atol=1e-6)
    assert not np.allclose(np.asarray(oa.logits[:, t + 1:]), np.asarray(ob.logits[:, t + 1:]))


@pytest.mark.slow
def test_gradients_are_finite_and_reach_every_trainable_parameter(tiny_model):
    cfg, model, _ = tiny_model
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 40)))

    def loss(m):
        out = m(tokens)
        lp = jax.nn.log_softmax(out.logits[:, :-1])
        mtp = jax.nn.log_softmax(out.mtp_logits[:, :-1])
        return -(jnp.take_along_axis(lp, tokens[:, 1:, None], -1).mean()
                 + 0.3 * jnp.take_along_axis(mtp, tokens[:, 2:, None], -1).mean())

    grads = nnx.jit(nnx.grad(loss))(model)  # jitted: op-by-op the tiny model's backward takes minutes
    flat = nnx.to_flat_state(grads)
    assert all(bool(jnp.all(jnp.isfinite(g[...]))) for _, g in flat)
    # the indexer is trained by its own loss (architecture.md §8.2); everything else gets a gradient from the LM loss
    zero = [p for p, g in flat if "indexer" not in p and not bool(jnp.any(g[...] != 0))]
    assert zero == [], zero


def test_forward_rejects_sequences_beyond_max_seq_len_and_non_integer_tokens(tiny_model):
    cfg, model, _ = tiny_model
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(jnp.zeros((1, cfg.max_seq_len + 1), jnp.int32))
    with pytest.raises(ValueError, match="integer"):
        model(jnp.zeros((1, 4), jnp.float32))
