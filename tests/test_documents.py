"""Sample-level masking (issue 19, architecture.md §8.5): documents packed in one row are each seen as
if alone: logits, MTP logits, the balance loss and gradients equal those of the document run by itself (fp32, 1e-5),
with the reference core and with the Pallas kernels (interpreted), through every mechanism of the
tiny preset (SWA, CSA with its indexer, HCA, hash and learned routing, the MTP block)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels import lightning_indexer, sparse_attention_reference
from pallas_kernels.sparse_attention import sparse_attention as pallas_sparse_attention
from v4jax import Transformer, V4Config
from v4jax.config import RunOptions
from v4jax.model.documents import documents, entry_layout, eos_segments
from v4jax.train import losses
from v4jax.train.losses import packed_targets_mask

CFG = V4Config.preset("tiny")  # window 8, CSA ratio 4 (top-4), HCA ratio 16, MTP
OPTIONS = RunOptions.preset("tiny")
LENGTHS = ((37, 19, 34),)  # one row of three documents, none a multiple of 4 or 16 (kernel tests: two rows)
T = 90


def _rows(seed=0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(2, CFG.vocab_size, (len(LENGTHS), T)), jnp.int32)
    seg = jnp.asarray([np.repeat(np.arange(len(ls)), ls) for ls in LENGTHS], jnp.int32)
    return tokens, seg


def _spans():
    for b, ls in enumerate(LENGTHS):
        start = 0
        for n in ls:
            yield b, start, start + n
            start += n


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_documents_and_entry_layout_by_hand():
    seg = jnp.asarray([[7, 7, 7, 7, 7, 3, 3, 3, 3, 3, 3, 3, 3, 9, 9, 9]], jnp.int32)  # lengths 5, 8, 3
    d = documents(seg)
    assert d.positions.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2]]
    assert d.key_start.tolist() == [[0] * 5 + [5] * 8 + [13] * 3]
    lay = entry_layout(d, 4)  # entries: doc 1 one (tokens 0-3), doc 2 two (5-8, 9-12), doc 3 none
    assert lay.first_token.tolist() == [[0, 5, 9, 0]]
    assert lay.local_index.tolist() == [[0, 0, 1, 0]]
    assert lay.entry_start.tolist() == [[0] * 5 + [1] * 8 + [3] * 3]
    # eos closes a document; the token after it opens the next
    assert eos_segments(jnp.asarray([[5, 1, 6, 6, 1, 1, 7]]), 1).tolist() == [[0, 0, 1, 1, 1, 2, 3]]


def test_packed_loss_mask_leaves_out_cross_document_targets():
    seg = jnp.asarray([[0, 0, 0, 1, 1, 2]], jnp.int32)  # inputs row[:-1]'s segments; targets row[1:]
    main, mtp = packed_targets_mask(seg, jnp.asarray([[0, 0, 1, 1, 2, 2]], jnp.int32))
    assert main.tolist() == [[True, True, False, True, False, True]]
    assert mtp.tolist() == [[True, False, False, False, False]]  # t and t+1 and t+2 in one document


def _outputs(model, tokens, seg):
    out = model(tokens, segment_ids=seg)
    k = CFG.n_activated_experts  # the sequence-wise balance loss, each packed document a sequence
    return out.logits, out.mtp_logits, losses.balance_loss(out.routing, k) + losses.balance_loss(out.mtp_routing, k)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_packed_documents_give_each_document_its_own_logits_and_gradients(impl):
    model = Transformer(CFG, rngs=nnx.Rngs(0), options=OPTIONS.replace(attention_impl=impl))
    tokens, seg = _rows()
    rng = np.random.default_rng(1)
    g = jnp.asarray(rng.normal(size=(len(LENGTHS), T, CFG.vocab_size)), jnp.float32)  # cotangent of the logits
    g_mtp = jnp.asarray(rng.normal(size=(len(LENGTHS), T - 1, CFG.vocab_size)), jnp.float32)

    def packed_loss(m):
        logits, mtp, balance = _outputs(m, tokens, seg)
        mask = jnp.zeros((len(LENGTHS), T - 1), bool)
        for b, s, e in _spans():  # MTP position t of a document needs t + 1 in the document too
            mask = mask.at[b, s:e - 1].set(True)
        return jnp.sum(logits * g) + jnp.sum(jnp.where(mask[..., None], mtp * g_mtp, 0.0)) + balance, (logits, mtp,
                                                                                                        balance)

    def alone_loss(m):  # the balance loss: the mean over the documents of each one's own
        total, outs = 0.0, []
        for b, s, e in _spans():
            logits, mtp, balance = _outputs(m, tokens[b:b + 1, s:e], None)
            total += jnp.sum(logits * g[b:b + 1, s:e]) + jnp.sum(mtp * g_mtp[b:b + 1, s:e - 1])
            total += balance / len(list(_spans()))
            outs.append((logits, mtp, balance))
        return total, outs

    (_, (logits, mtp, balance)), grads = nnx.jit(nnx.value_and_grad(packed_loss, has_aux=True))(model)
    (_, alone), grads_alone = nnx.jit(nnx.value_and_grad(alone_loss, has_aux=True))(model)
    for (b, s, e), (logits_a, mtp_a, _) in zip(_spans(), alone):
        assert _rel(logits[b:b + 1, s:e], logits_a) <= 1e-5, (b, s, e)
        assert _rel(mtp[b:b + 1, s:e - 1], mtp_a) <= 1e-5, (b, s, e)
    # MoE balance per document; the MTP block leaves out each document's last position (its input
    # straddles the boundary; the document alone has no such position)
    want = sum(a[2] for a in alone) / len(alone)
    assert abs(float(balance) - float(want)) <= 1e-6 * float(want)
    assert abs(float(_outputs(model, tokens, None)[2]) - float(want)) > 1e-3 * float(want)  # not the row's
    flat = dict(nnx.to_flat_state(nnx.state(grads)))
    flat_a = dict(nnx.to_flat_state(nnx.state(grads_alone)))
    total = float(jnp.sqrt(sum(jnp.sum(v[...] ** 2) for v in flat_a.values())))
    assert _rel(jnp.concatenate([flat[k][...].ravel() for k in flat_a]),
                jnp.concatenate([v[...].ravel() for v in flat_a.values()])) <= 1e-5
    # each parameter within 1e-5 of its own gradient; the final hc head's gradients are ~1e-7 of the
    # whole (the final RMSNorm makes the model blind to the head's weight scale: cancellation noise)
    for k, v in flat_a.items():
        err, ref = float(jnp.linalg.norm(flat[k][...] - v[...])), float(jnp.linalg.norm(v[...]))
        assert err <= 1e-5 * ref + 1e-9 * total, (k, err, ref)


def test_one_document_per_row_is_the_unpacked_forward():
    model = Transformer(CFG, rngs=nnx.Rngs(0), options=OPTIONS)
    tokens, _ = _rows()
    plain = model(tokens)
    packed = model(tokens, segment_ids=jnp.zeros_like(tokens))
    np.testing.assert_array_equal(packed.logits, plain.logits)
    np.testing.assert_array_equal(packed.mtp_logits, plain.mtp_logits)


def test_segment_ids_with_a_cache_or_a_wrong_shape_are_refused():
    model = Transformer(CFG, rngs=nnx.Rngs(0), options=OPTIONS)
    tokens, seg = _rows()
    with pytest.raises(ValueError, match="segment_ids must be"):
        model(tokens, segment_ids=seg[:, :10])


def _bounds(lengths_per_row, ratio):
    seg = jnp.asarray([np.repeat(np.arange(len(ls)), ls) for ls in lengths_per_row], jnp.int32)
    d = documents(seg)
    return d, entry_layout(d, ratio)


@pytest.mark.parametrize("mode", ["swa", "hca", "csa"])
def test_attention_kernel_masks_documents_like_the_reference(mode):
    """The Pallas core (forward and backward, interpreted) against the reference with document bounds;
    queries never see another document's window keys or entries (a key change there changes nothing)."""
    B, Tq, H, c, W, ratio = 2, 48, 4, 16, 8, 4
    d, lay = _bounds(((13, 20, 15), (6, 42)), ratio)
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(B, Tq, H, c)), jnp.float32)
    kv = jnp.asarray(rng.normal(size=(B, Tq, c)), jnp.float32)
    sinks = jnp.asarray(rng.normal(size=(H,)), jnp.float32)
    comp = idx = None
    if mode != "swa":
        comp = jnp.asarray(rng.normal(size=(B, Tq // ratio, c)), jnp.float32)
    if mode == "csa":
        w = jnp.ones((B, Tq, 2), jnp.float32)
        idx = lightning_indexer.select_topk(jnp.asarray(rng.normal(size=(B, Tq, 2, 8)), jnp.float32), w,
                                            jnp.asarray(rng.normal(size=(B, Tq // ratio, 8)), jnp.float32),
                                            d.positions, ratio, 3, 16, lay.entry_start, interpret=True)
    r = 0 if mode == "swa" else ratio
    es = None if mode == "swa" else lay.entry_start
    ref = lambda q, kv, comp: sparse_attention_reference.sparse_attention(  # noqa: E731
        q, kv, sinks, W, comp, idx, r, 16, d.key_start, es)
    ker = lambda q, kv, comp: pallas_sparse_attention(  # noqa: E731
        q, kv, sinks, W, comp, idx, r, 16, d.key_start, es, block_q=8, block_k=8, block_h=4 if mode == "csa" else 2,
        interpret=True)
    np.testing.assert_allclose(ker(q, kv, comp), ref(q, kv, comp), rtol=1e-5, atol=1e-5)
    do = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    args = (q, kv) if comp is None else (q, kv, comp)
    grad = lambda f: jax.grad(lambda *a: jnp.sum(f(*a[:2], a[2] if len(a) > 2 else None) * do),  # noqa: E731
                              argnums=tuple(range(len(args))))(*args)
    for a, b in zip(grad(ker), grad(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # row 1's second document (tokens 6..47) is blind to the first: change its keys and entries
    kv2 = kv.at[1, :6].set(100.0)
    comp2 = None if comp is None else comp.at[1, :lay.entry_start[1, 6]].set(100.0)
    np.testing.assert_allclose(ker(q, kv2, comp2)[1, 6:], ker(q, kv, comp)[1, 6:], rtol=1e-6, atol=1e-6)


def test_indexer_kernel_picks_only_the_documents_entries_like_the_reference():
    B, Tq, n_h, c, ratio, k = 2, 160, 2, 8, 4, 5
    d, lay = _bounds(((45, 70, 45), (13, 147)), ratio)
    rng = np.random.default_rng(4)
    q = jnp.asarray(rng.normal(size=(B, Tq, n_h, c)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(B, Tq, n_h)), jnp.float32)
    keys = jnp.asarray(rng.normal(size=(B, Tq // ratio, c)), jnp.float32)
    ours = lightning_indexer.select_topk(q, w, keys, d.positions, ratio, k, 32, lay.entry_start, interpret=True)
    ref = lightning_indexer.select_topk_reference(q, w, keys, d.positions, ratio, k, 32, lay.entry_start)
    np.testing.assert_array_equal(ours, ref)
    lo = np.asarray(lay.entry_start)[..., None]
    hi = lo + (np.asarray(d.positions)[..., None] + 1) // ratio
    picked = np.asarray(ours)
    assert np.all((picked == -1) | ((picked >= lo) & (picked < hi)))
    assert np.all(np.sum(picked >= 0, axis=-1) == np.minimum(hi - lo, k)[..., 0])


def test_a_document_is_blind_to_its_neighbours_and_causal_inside():
    """Causality extended to document boundaries: changing document 2 changes nothing in documents 1
    and 3; changing its token at position p changes nothing of its own before p."""
    model = Transformer(CFG, rngs=nnx.Rngs(0), options=OPTIONS)
    tokens, seg = _rows()
    forward = nnx.jit(lambda m, t: m(t, segment_ids=seg).logits)
    base = forward(model, tokens)
    s, e = 37, 56  # document 2
    other = tokens.at[0, s:e].set((tokens[0, s:e] + 7) % CFG.vocab_size)
    got = forward(model, other)
    np.testing.assert_allclose(got[0, :s], base[0, :s], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[0, e:], base[0, e:], rtol=1e-6, atol=1e-6)
    assert float(jnp.max(jnp.abs(got[0, s:e] - base[0, s:e]))) > 1e-3
    p = s + 11
    later = forward(model, tokens.at[0, p].set((tokens[0, p] + 7) % CFG.vocab_size))
    np.testing.assert_allclose(later[0, :p], base[0, :p], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(later[0, e:], base[0, e:], rtol=1e-6, atol=1e-6)
