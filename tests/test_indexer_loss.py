"""Indexer training (architecture.md §8.2): the model's indexer traces against a dense float64 numpy recomputation
of the main attention's probabilities, the KL loss on them, where its gradient goes (only into the
indexers when their inputs are detached), the LM loss's gradient into the indexers (none), and the
training step lowering the indexer loss.

Model: the tiny preset with layers (CSA, SWA, CSA, SWA), scanned as one unit (CSA, SWA) repeated
twice, so the traces' layer order out of the scan is checked; random sinks; T = 40 (10 compressed
entries, top-4, two query chunks of 32 with padding).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v4jax import V4Config

from v4jax.train import losses
from v4jax.config import AttentionKind, RouterKind, RunOptions
from v4jax.model.layers import rms_normalize
from v4jax.model.transformer import Transformer
from v4jax.model.rope import apply_rope, inv_frequencies

C, S = AttentionKind.CSA, AttentionKind.SLIDING
T = 40


def tiny(**changes) -> V4Config:
    return V4Config.preset("tiny", n_layers=4, layer_types=(C, S, C, S), router_types=(RouterKind.LEARNED,) * 4,
                           **changes)


def make_model(cfg: V4Config, **options) -> Transformer:
    model = Transformer(cfg, rngs=nnx.Rngs(0), options=RunOptions.preset("tiny", **options))
    rng = np.random.default_rng(5)
    for stage in model.stages:
        for block in stage.blocks:  # sinks start at 0; random ones exercise the sink in the normaliser
            block.attn.sinks.value = jnp.asarray(rng.normal(size=block.attn.sinks.value.shape), jnp.float32)
    return model


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, T)), jnp.int32)


def csa_layer_blocks(model: Transformer):
    """(layer index, Block with that layer's slice of the stacked parameters) of every CSA layer."""
    out = []
    for layer, (s, p, r) in enumerate(model.layer_slots()):
        stage = model.stages[s]
        if stage.unit[p][0] is C:
            graphdef, state = nnx.split(stage.blocks[p])
            out.append((layer, nnx.merge(graphdef, jax.tree.map(lambda a: a[r], state))))
    return out


def numpy_traces(attn, x):
    """Dense float64 recomputation for one CSA layer from its input x [B, T, d]: the core attention's
    probability on every compressed entry summed over heads [B, T, N], the indexer's scores of every
    entry [B, T, N], the visibility [T, N] and the top-k ids the layer uses (None when dense)."""
    cfg = attn.cfg
    B, T_, _ = x.shape
    pos = jnp.arange(T_)
    inv_freq = inv_frequencies(cfg, attn.kind)
    cq = attn.q_norm(attn.wq_a(x))
    q = apply_rope(rms_normalize(attn.wq_b(cq).reshape(B, T_, cfg.n_heads, cfg.head_dim), cfg.norm_eps),
                   pos[:, None], inv_freq)
    kv = apply_rope(attn.kv_norm(attn.wkv(x)), pos, inv_freq)
    positions = jnp.broadcast_to(pos, (B, T_))
    comp, _ = attn.compressor(x, positions, inv_freq)
    q_i, w_i, keys_i, _ = attn.indexer.project(x, cq, positions, inv_freq)
    idx = None if attn.options.csa_dense else np.asarray(attn.indexer.select(q_i, w_i, keys_i, positions))
    q, kv, comp, sinks = (np.asarray(a, np.float64) for a in (q, kv, comp, attn.sinks.value))
    N = comp.shape[1]
    t, j, s = np.arange(T_)[:, None], np.arange(T_)[None, :], np.arange(N)[None, :]
    window = (j <= t) & (j > t - cfg.window_size)  # [T, T]
    visible = s < (t + 1) // cfg.csa_ratio  # [T, N]
    if idx is None:
        attended = np.broadcast_to(visible, (B, T_, N))
    else:
        attended = np.zeros((B, T_, N), bool)
        for b in range(B):
            for tt in range(T_):
                attended[b, tt, idx[b, tt][idx[b, tt] >= 0]] = True
    scale = cfg.head_dim ** -0.5
    z_win = np.einsum("bthc,bjc->bhtj", q, kv) * scale
    z_cmp = np.einsum("bthc,bsc->bhts", q, comp) * scale
    e_win = np.where(window[None, None], np.exp(z_win), 0.0)
    e_cmp = np.where(attended[:, None], np.exp(z_cmp), 0.0)
    denom = e_win.sum(-1, keepdims=True) + e_cmp.sum(-1, keepdims=True) + np.exp(sinks)[None, :, None, None]
    mass = (e_cmp / denom).sum(axis=1)  # [B, T, N]
    dots = np.einsum("bthc,bsc->bths", np.asarray(q_i, np.float64), np.asarray(keys_i, np.float64))
    scores = np.einsum("bths,bth->bts", np.maximum(dots, 0.0), np.asarray(w_i, np.float64))
    return mass, scores, visible, idx


def numpy_kl(mass, scores, keep):
    """Mean over queries with a kept entry of KL(normalised mass || softmax(scores)) over kept entries."""
    kls = []
    for b in range(mass.shape[0]):
        for t in range(mass.shape[1]):
            m = keep[b, t]
            if not m.any():
                continue
            p = mass[b, t][m] / mass[b, t][m].sum()
            z = scores[b, t][m]
            logq = z - z.max() - np.log(np.exp(z - z.max()).sum())
            kls.append(np.sum(p * (np.log(p) - logq)))
    return np.mean(kls)


@pytest.mark.parametrize("dense", [pytest.param(False, marks=pytest.mark.slow), True], ids=["sparse", "dense"])
def test_model_traces_and_kl_loss_equal_a_dense_numpy_recomputation(tokens, dense):
    model = make_model(tiny(), csa_dense=dense)
    out = model(tokens, return_indexer_traces=True, return_hidden_states=True)
    traces = out.indexer
    layers = csa_layer_blocks(model)
    assert [layer for layer, _ in layers] == [0, 2]
    K = 10 if dense else 4  # N_c = 40 / 4 entries; top-4 of them
    assert traces.attention_mass.shape == traces.index_scores.shape == traces.valid.shape == (2, 2, T, K)
    want_loss = 0.0
    for n, (layer, block) in enumerate(layers):
        x = block.attn_norm(block.attn_hc.hc_pre(out.hidden_states[layer])[0])  # the layer's attention input
        mass, scores, visible, idx = numpy_traces(block.attn, x)
        valid = np.asarray(traces.valid[n])
        if dense:  # every entry, invisible ones masked
            np.testing.assert_array_equal(valid, np.broadcast_to(visible, valid.shape))
            keep, ref_mass, ref_scores = valid, mass, scores
        else:  # the selected entries, in the layer's top-k order
            np.testing.assert_array_equal(valid, idx >= 0)
            ref_mass = np.take_along_axis(mass, np.maximum(idx, 0), axis=-1)
            ref_scores = np.take_along_axis(scores, np.maximum(idx, 0), axis=-1)
            keep = valid
        got_mass = np.asarray(traces.attention_mass[n])
        np.testing.assert_allclose(np.where(keep, got_mass, 0), np.where(keep, ref_mass, 0), rtol=1e-5, atol=1e-7)
        assert np.all(got_mass[~keep] == 0)  # empty / invisible entries carry no attention
        np.testing.assert_allclose(np.where(keep, np.asarray(traces.index_scores[n]), 0),
                                   np.where(keep, ref_scores, 0), rtol=1e-5, atol=1e-8)
        assert keep[:, 3:].any(-1).all() and not keep[:, :3].any()  # entry 0 is visible from t = 3 on
        want_loss += numpy_kl(ref_mass, ref_scores, keep)
    np.testing.assert_allclose(float(losses.indexer_kl_loss(*traces)), want_loss, rtol=1e-5)
    plain = model(tokens)
    assert plain.indexer is None
    np.testing.assert_array_equal(np.asarray(plain.logits), np.asarray(out.logits))  # traces change nothing


def _loss_grads(model: Transformer, tokens):
    """Compiled p -> ((indexer KL, its gradient), (LM loss = CE + MTP, its gradient)) over every
    parameter, and the model's parameters."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def parts(p):
        out = nnx.merge(graphdef, p, rest)(tokens[:, :-1], return_indexer_traces=True)
        lm = losses.cross_entropy(out.logits, tokens[:, 1:]) + losses.mtp_cross_entropy(out.mtp_logits, tokens[:, 1:])
        return losses.indexer_kl_loss(*out.indexer), lm

    fn = jax.jit(lambda p: (jax.value_and_grad(lambda q: parts(q)[0])(p), jax.value_and_grad(lambda q: parts(q)[1])(p)))
    return fn, params


def flat(state) -> dict:
    return {".".join(map(str, k)): v.value for k, v in nnx.to_flat_state(state)}


@pytest.mark.slow
def test_indexer_loss_trains_only_the_indexers_and_the_lm_loss_never_reaches_them(tokens):
    fn, params = _loss_grads(make_model(tiny()), tokens)
    (kl0, kl_tree), (_, lm_grad) = fn(params)
    kl_grad, lm_grad = flat(kl_tree), flat(lm_grad)
    indexer = [k for k in kl_grad if ".indexer." in k]
    assert len(indexer) == 6  # wq_b, weights_proj, compressor wkv / wgate / ape / norm (stacked over CSA layers)
    for k, g in kl_grad.items():
        if k in indexer:  # every CSA layer's copy of every indexer parameter learns
            assert all(np.abs(g[r]).sum() > 0 for r in range(g.shape[0])), k
        else:
            assert not np.any(g), k  # exactly zero: detached inputs, no-gradient target
    for k in indexer:
        assert not np.any(lm_grad[k]), k  # top-k ids carry no gradient
    assert np.abs(lm_grad["stages.0.blocks.0.attn.wq_a.kernel"]).sum() > 0

    # a few Adam steps on the indexer KL lower it (only the indexers move; the target stays put)
    import optax
    tx = optax.adam(3e-3)
    opt = tx.init(params)
    kls, g = [float(kl0)], kl_tree
    for _ in range(6):  # one compiled call a step: the KL of the new parameters and its gradient
        updates, opt = tx.update(g, opt, params)
        params = optax.apply_updates(params, updates)
        (kl, g), _ = fn(params)
        kls.append(float(kl))
    assert kls[-1] < 0.8 * kls[0] and all(b < a for a, b in zip(kls, kls[1:])), kls


@pytest.mark.slow  # one more compile (~1 min); the control showing the detach is what keeps the KL out
def test_without_detach_the_indexer_loss_reaches_the_shared_query_path(tokens):
    fn, params = _loss_grads(make_model(tiny(), indexer_detach=False), tokens)
    kl_grad = flat(fn(params)[0][1])
    assert np.abs(kl_grad["stages.0.blocks.0.attn.wq_a.kernel"]).sum() > 0  # through cQ
    assert np.abs(kl_grad["embed.embedding"]).sum() > 0


def test_config_switches_are_checked():
    with pytest.raises(ValueError, match="csa_dense must be true or false"):
        RunOptions(csa_dense="yes")
    with pytest.raises(ValueError, match="indexer_detach must be true or false"):
        RunOptions(indexer_detach=1)
