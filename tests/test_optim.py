"""Muon and the optimiser split (architecture.md §8.3, §8.4) against a float64 numpy statement of the algorithm."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from v4jax.config import V4Config
from v4jax.model.layers import Buffer
from v4jax.model.transformer import Transformer
from v4jax.train.optim import (NS_COEFFS, OptimConfig, Schedule, flat_params, hybrid_newton_schulz, logical_axes,
                         make_optimizer, scale_by_muon, split_params)


def numpy_hybrid_ns(m: np.ndarray) -> np.ndarray:
    """architecture.md §8.4 in float64: X0 = M/|M|_F, 8 steps (3.4445, -4.775, 2.0315), 2 steps (2, -1.5, 0.5)."""
    x = m.astype(np.float64)
    transpose = x.shape[0] > x.shape[1]
    if transpose:
        x = x.T
    x = x / (np.linalg.norm(x) + 1e-7)
    for a, b, c in [(3.4445, -4.7750, 2.0315)] * 8 + [(2.0, -1.5, 0.5)] * 2:
        g = x @ x.T
        x = a * x + b * g @ x + c * g @ g @ x
    return x.T if transpose else x


def numpy_muon_steps(w, grads, lr, mu=0.95, gamma=0.18, wd=0.1):
    """Report Algorithm 1 for one matrix, float64."""
    w, m = w.astype(np.float64), np.zeros_like(w, np.float64)
    for g in grads:
        m = mu * m + g
        o = numpy_hybrid_ns(mu * m + g) * np.sqrt(max(w.shape)) * gamma
        w = w * (1 - lr * wd) - lr * o
    return w


def test_coefficients_are_the_spec_hybrid_schedule():
    assert len(NS_COEFFS) == 10
    assert NS_COEFFS[:8] == ((3.4445, -4.7750, 2.0315),) * 8 and NS_COEFFS[8:] == ((2.0, -1.5, 0.5),) * 2


@pytest.mark.parametrize("square_gram", [True, False])
@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (32, 32)])
def test_newton_schulz_matches_float64_numpy_and_orthogonalises(shape, square_gram):
    m = np.random.default_rng(0).normal(size=shape)
    ours = np.asarray(hybrid_newton_schulz(jnp.asarray(m, jnp.float32), square_gram=square_gram))
    ref = numpy_hybrid_ns(m)
    np.testing.assert_allclose(ours, ref, atol=2e-4)
    s = np.linalg.svd(ref, compute_uv=False)  # the hybrid tail pulls singular values close to 1
    assert s.min() > 0.6 and s.max() < 1.2, s


@pytest.mark.parametrize("square_gram", [True, False])
def test_bf16_newton_schulz_multiplies_in_bf16_only_and_still_orthogonalises(square_gram):
    """muon_ns_dtype=bfloat16 (the TPU setting): every product of the ten steps takes and gives bf16 (an
    fp32 product there costs twice the bytes, and its all-reduce too, on a pod); the coefficients
    combine the products' results in fp32."""
    f = lambda m: hybrid_newton_schulz(m, dtype=jnp.bfloat16, square_gram=square_gram)  # noqa: E731
    m = np.random.default_rng(4).normal(size=(64, 160))
    step = jax.make_jaxpr(f)(jnp.asarray(m, jnp.float32)).eqns
    body = next(e for e in step if e.primitive.name == "scan").params["jaxpr"].jaxpr
    dots = [e for e in body.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 3 and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in (*e.invars, *e.outvars))
    ours = np.asarray(f(jnp.asarray(m, jnp.float32)))
    np.testing.assert_allclose(ours, numpy_hybrid_ns(m), atol=1e-2)
    s = np.linalg.svd(ours, compute_uv=False)
    assert s.min() > 0.6 and s.max() < 1.2, s


def test_muon_steps_match_numpy_per_layer_and_per_expert():
    """A [layers=2, experts=3, 8, 12] stack: every (layer, expert) matrix is an independent Muon matrix."""
    rng = np.random.default_rng(1)
    w0 = rng.normal(size=(2, 3, 8, 12)).astype(np.float32) * 0.1
    grads = [rng.normal(size=w0.shape).astype(np.float32) for _ in range(3)]
    groups = split_params({"w": ("layers", "experts", "embed", "expert_mlp")})
    assert groups["w"].batch_dims == (0, 1)
    lr = 0.02
    tx = make_optimizer(groups, lambda step: lr, OptimConfig(clip_norm=0.0))
    params = {"w": jnp.asarray(w0)}
    state = tx.init(params)
    for g in grads:
        upd, state = tx.update({"w": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, upd)
    for l in range(2):
        for e in range(3):
            ref = numpy_muon_steps(w0[l, e], [g[l, e] for g in grads], lr)
            np.testing.assert_allclose(np.asarray(params["w"][l, e]), ref, atol=3e-5, err_msg=f"layer {l} expert {e}")


def test_muon_update_rms_is_gamma():
    g = jnp.asarray(np.random.default_rng(2).normal(size=(64, 256)), jnp.float32)
    tx = scale_by_muon({"w": ()})
    upd, _ = tx.update({"w": g}, tx.init({"w": g}))
    rms = float(jnp.sqrt(jnp.mean(upd["w"] ** 2)))
    assert 0.12 < rms < 0.2, rms  # gamma * sqrt(max(n,m)) * |O'|_F / sqrt(n m) with O' ~ orthogonal


def test_split_follows_spec_8_1_on_the_tiny_model():
    model = nnx.eval_shape(lambda: Transformer(V4Config.preset("tiny"), rngs=nnx.Rngs(0)))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    groups = split_params(logical_axes(params))
    kinds = {n: g.optimizer for n, g in groups.items()}
    assert kinds["embed.embedding"] == kinds["head.kernel"] == "adamw"
    assert kinds["norm.weight"] == kinds["stages.0.blocks.1.attn.q_norm.weight"] == "adamw"
    assert kinds["stages.0.blocks.1.attn_hc.base"] == kinds["stages.0.blocks.1.attn_hc.scale"] == "adamw"
    assert kinds["hc_head.base"] == kinds["stages.0.blocks.1.attn.sinks"] == "adamw"
    assert kinds["stages.0.blocks.1.attn.compressor.ape"] == "adamw"
    for n in ("stages.0.blocks.1.attn.wq_a.kernel", "stages.0.blocks.1.attn.indexer.wq_b.kernel",
              "stages.0.blocks.1.ffn.gate.weight.kernel", "stages.0.blocks.1.attn_hc.fn", "mtp.e_proj.kernel",
              "mtp.h_proj.kernel", "stages.0.blocks.1.attn.compressor.wkv.kernel", "hc_head.fn"):
        assert kinds[n] == "muon", n
    assert groups["stages.0.blocks.1.ffn.experts.w1"].batch_dims == (0, 1)  # layers, experts
    assert groups["stages.0.blocks.1.attn.wo_a"].batch_dims == (0, 1)  # layers, o_groups
    assert groups["mtp.block.ffn.experts.w2"].batch_dims == (0,)  # experts
    assert groups["mtp.e_proj.kernel"].batch_dims == ()
    # Buffers (hash table, selection bias) are not parameters: no optimiser touches them.
    _, buffers, _ = nnx.split(model, Buffer, ...)
    assert not set(flat_params(buffers)) & set(groups)


def test_adamw_matches_the_closed_form_first_step():
    """One AdamW step with eps 1e-20 moves each entry by lr * sign(g) (bias-corrected m/sqrt(v) = sign)."""
    tx = make_optimizer({"v": split_params({"v": ("embed",)})["v"]}, lambda s: 0.01, OptimConfig(clip_norm=0.0))
    p = {"v": jnp.ones((5,))}
    g = {"v": jnp.asarray([1.0, -2.0, 3.0, -0.5, 0.1])}
    upd, _ = tx.update(g, tx.init(p), p)
    np.testing.assert_allclose(np.asarray(upd["v"]), -0.01 * np.sign(np.asarray(g["v"])), rtol=1e-5)


def test_schedule_warms_up_holds_then_decays_and_mtp_weight_drops():
    s = Schedule(peak=1e-3, final=1e-4, warmup_steps=10, total_steps=100, decay_steps=50)
    assert float(s.lr(0)) == pytest.approx(1e-4)
    assert float(s.lr(9)) == pytest.approx(1e-3)
    assert float(s.lr(30)) == pytest.approx(1e-3)
    assert float(s.lr(100)) == pytest.approx(1e-4)
    assert 1e-4 < float(s.lr(75)) < 1e-3
    assert float(s.mtp(49)) == pytest.approx(0.3) and float(s.mtp(50)) == pytest.approx(0.1)


def test_matrix_with_three_free_axes_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="Muon needs a matrix"):
        split_params({"x": ("embed", "heads", "q_lora")})


def test_indexer_gradients_are_clipped_on_their_own():
    """A huge indexer (KL) gradient leaves the model's clipped gradient as it would be alone."""
    import optax

    from v4jax.train.optim import clip_by_group_norm, clip_group

    g = {"stages.0.blocks.1.attn.wq_a.kernel": jnp.full((4, 4), 0.5),
         "embed.embedding": jnp.full((3, 4), 0.25),
         "stages.0.blocks.1.attn.indexer.wq_b.kernel": jnp.full((4, 8), 100.0),
         "stages.0.blocks.1.attn.indexer.compressor.wkv.kernel": jnp.full((4, 2), -3.0)}
    assert [clip_group(n) for n in g] == ["model", "model", "indexer", "indexer"]
    out, _ = clip_by_group_norm(1.0, clip_group).update(g, optax.EmptyState())
    for group in ("model", "indexer"):
        part = {n: v for n, v in g.items() if clip_group(n) == group}
        want, _ = optax.clip_by_global_norm(1.0).update(part, optax.EmptyState())
        for n in part:
            np.testing.assert_allclose(out[n], want[n], rtol=1e-6)
    small = {n: v * 1e-3 for n, v in g.items()}  # under the limit: unchanged
    out, _ = clip_by_group_norm(1.0, clip_group).update(small, optax.EmptyState())
    for n in g:
        np.testing.assert_array_equal(out[n], small[n])


def test_layer_by_layer_orthogonalisation_equals_the_batched_one():
    from v4jax.train.optim import orthogonalize, split_params

    g = jax.random.normal(jax.random.key(0), (3, 4, 8, 6))  # [repeats, experts, d, I]
    want = orthogonalize(g, (0, 1))
    np.testing.assert_allclose(orthogonalize(g, (0, 1), sequential=(0,)), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(orthogonalize(jnp.moveaxis(g, 0, 1), (0, 1), sequential=(1,)),
                               jnp.moveaxis(want, 0, 1), rtol=1e-5, atol=1e-6)
    groups = split_params({"w": ("layers", "experts", "embed", "expert_mlp"), "m": ("experts", "embed", "expert_mlp")})
    assert groups["w"].layer_dims == (0,) and groups["m"].layer_dims == ()


def test_dense_matrices_apply_the_gram_twice_and_experts_square_it():
    """Newton-Schulz's two step forms per matrix (optim.split_params): routed experts (b S + c S S) X,
    every other matrix b S X + c S (S X); the whole optimiser with the per-name forms equals float64 numpy."""
    axes = {"experts.w1": ("layers", "experts", "embed", "expert_mlp"), "wo_b": ("layers", "o_lora", "embed"),
            "wo_a": ("layers", "o_groups", "head_dim", "o_lora"), "router": ("embed", "experts")}
    groups = split_params(axes)
    assert {n: g.square_gram for n, g in groups.items()} == {"experts.w1": True, "wo_b": False, "wo_a": False,
                                                              "router": False}
    rng = np.random.default_rng(3)
    w0 = {"experts.w1": rng.normal(size=(2, 3, 8, 12)), "wo_b": rng.normal(size=(2, 24, 10)),
          "wo_a": rng.normal(size=(2, 2, 6, 9)), "router": rng.normal(size=(10, 4))}
    grads = [{n: rng.normal(size=w.shape) for n, w in w0.items()} for _ in range(2)]
    tx = make_optimizer(groups, lambda step: 0.02, OptimConfig(clip_norm=0.0))
    params = {n: jnp.asarray(w * 0.1, jnp.float32) for n, w in w0.items()}
    state = tx.init(params)
    for g in grads:
        upd, state = tx.update({n: jnp.asarray(v, jnp.float32) for n, v in g.items()}, state, params)
        params = optax.apply_updates(params, upd)
    for n, w in w0.items():
        lead = w.shape[:-2]
        for i in np.ndindex(*lead):
            ref = numpy_muon_steps(w[i] * 0.1, [g[n][i] for g in grads], 0.02)
            np.testing.assert_allclose(np.asarray(params[n][i]), ref, atol=3e-5, err_msg=f"{n} {i}")
