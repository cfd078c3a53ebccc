"""Cached inference (v4jax.inference.generate): decode = stateless forward = transformers' cached generation,
chunked prefill, mixed-length batches, sampling, stop tokens, streaming, MTP speculative decoding with
exact rollback, and clear errors on bad input.

Compiles dominate the time on CPU (~20 s per distinct step shape), so the tests share a few jitted
functions of fixed shape: batch 2, prefill chunks of 21 tokens, one-token and two-token steps.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v4jax import peer

from v4jax.io import restore

from v4jax.inference import generate as G
from v4jax.model.cache import init_cache
from v4jax.config import V4Config
from v4jax.model.transformer import Transformer

TOL = 1e-5
CHUNK = 21  # prefill chunk of the shared compiled steps
ML = 96  # cache length of the shared compiled steps
GREEDY = G.Sampling().as_arrays()


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --------------------------------------------------------------------------------------------------
# Against transformers' cached generation (same weights through an HF checkpoint)

PEER_CASES = {"tiny": (lambda: V4Config.preset("tiny"), 0),
              "tiny-b": (lambda: V4Config.preset("tiny-b", swiglu_limit=0.5), 0)}


def hf_cached_logits(torch_model, ids: np.ndarray, prefill: int) -> np.ndarray:
    """transformers: prefill `prefill` tokens with use_cache, then one token at a time with the cache.
    Returns [B, S - prefill + 1, V]: entry j = logits at position prefill - 1 + j."""
    import torch

    with torch.no_grad(), peer.stable_topk():
        t_ids = torch.as_tensor(ids, dtype=torch.long)
        out = torch_model(t_ids[:, :prefill], use_cache=True)
        cache, steps = out.past_key_values, [out.logits[:, -1]]
        for t in range(prefill, ids.shape[1]):
            out = torch_model(t_ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[:, -1])
    return torch.stack(steps, 1).float().numpy()


@functools.lru_cache(maxsize=None)
def peer_setup(case: str, directory: str):
    """The transformers peer with random weights, saved as an HF checkpoint and loaded into v4jax, plus a
    random MTP block (transformers has none) so the same compiled steps also serve speculation."""
    make, seed = PEER_CASES[case]
    cfg = make()
    torch_model = peer.build_peer(cfg, seed)
    peer.save_peer(torch_model, directory)
    loaded, info = restore.load_hf(directory)
    model = Transformer(info.config.replace(n_mtp_layers=1), rngs=nnx.Rngs(1))
    nnx.update(model, nnx.state(loaded))  # every main-model parameter from the checkpoint
    return model.cfg, torch_model, model, G.Generator(model)


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("generate"))


def tiny_mtp(tmp_root):
    cfg, _, model, gen = peer_setup("tiny", tmp_root + "/tiny")
    return cfg, model, gen


def _cached_forward(gen, cache, tokens):
    """(logits [B, T, V] of every position, cache): the Generator's prefill keeps only the last ones."""
    if not hasattr(gen, "_full_prefill"):
        gen._full_prefill = jax.jit(lambda state, c, t: (lambda o: (o.logits, o.cache))(
            nnx.merge(gen.graphdef, state)(t, cache=c)))
    return gen._full_prefill(gen.state, cache, tokens)


def teacher_forced(gen, ids, S):
    """Our cache: prefill S tokens in chunks of CHUNK, then one token per step. Returns the prefill
    logits [B, S, V] and the decode logits [B, T - S + 1, V] (entry j at position S - 1 + j)."""
    B, total = ids.shape
    cache = init_cache(gen.cfg, B, ML)
    full = []
    for s in range(0, S, CHUNK):  # the model's cached call itself: every position's logits
        logits, cache = _cached_forward(gen, cache, jnp.asarray(ids[:, s:s + CHUNK]))
        full.append(np.asarray(logits))
    ours = [full[-1][:, -1]]
    for t in range(S, total):
        _, logits, cache = gen._step(gen.state, cache, jnp.asarray(ids[:, t]), jnp.zeros(B, jnp.int32), 0, GREEDY)
        ours.append(np.asarray(logits))
    assert np.asarray(cache.lengths).tolist() == [total] * B
    return np.concatenate(full, 1), np.stack(ours, 1)


@pytest.mark.parametrize("case", [pytest.param("tiny"), pytest.param("tiny-b", marks=pytest.mark.slow)])
def test_chunked_prefill_then_decode_matches_transformers_cached_generation(case, tmp_root):
    cfg, torch_model, model, gen = peer_setup(case, f"{tmp_root}/{case}")
    S, total = 2 * CHUNK, 64  # prefill crosses compressor windows (m = 4/16, 2/8) and the SWA window
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, total)).astype(np.int32)
    ref = hf_cached_logits(torch_model, ids, S)
    prefill_logits, ours = teacher_forced(gen, ids, S)
    assert ours.shape == ref.shape
    for j in range(ours.shape[1]):
        assert rel(ours[:, j], ref[:, j]) <= TOL, f"position {S - 1 + j}"
    # the chunked prefill's logits equal the full-sequence forward at every prompt position
    with torch_no_grad_topk():
        import torch
        full_ref = torch_model(torch.as_tensor(ids[:, :S], dtype=torch.long), use_cache=False).logits.float().numpy()
    assert rel(prefill_logits, full_ref) <= TOL


def torch_no_grad_topk():
    import contextlib

    import torch

    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    stack.enter_context(peer.stable_topk())
    return stack


# --------------------------------------------------------------------------------------------------
# The tiny peer model with a random MTP block, shared by the remaining tests


def prefill_rows(gen, rows, pad_values, max_len=None):
    """Prefill right-padded prompts (pad positions filled from pad_values) in chunks of CHUNK."""
    B = len(rows)
    lengths = np.array([len(r) for r in rows])
    T = -(-lengths.max() // CHUNK) * CHUNK
    padded = np.resize(np.asarray(pad_values), B * T).reshape(B, T).astype(np.int32)
    for b, r in enumerate(rows):
        padded[b, :len(r)] = r
    cache = init_cache(gen.cfg, B, max_len or ML)
    last = np.zeros((B, gen.cfg.vocab_size), np.float32)
    for s in range(0, T, CHUNK):
        n = np.clip(lengths - s, 0, CHUNK).astype(np.int32)
        logits, _, cache = gen._prefill(gen.state, cache, jnp.asarray(padded[:, s:s + CHUNK]), jnp.asarray(n))
        for b in range(B):
            if s < lengths[b] <= s + CHUNK:
                last[b] = np.asarray(logits)[b]  # the row's last token of this chunk
    return last, cache


def greedy_logits(gen, cache, first, steps):
    """Greedy decode `steps` tokens after `first`; returns (tokens [B, steps], logits [B, steps, V])."""
    pending, toks, logits = jnp.asarray(first, jnp.int32), [], []
    for _ in range(steps):
        pending, lg, cache = gen._step(gen.state, cache, pending, jnp.zeros(pending.shape[0], jnp.int32), 0,
                                       GREEDY)
        toks.append(np.asarray(pending))
        logits.append(np.asarray(lg))
    return np.stack(toks, 1), np.stack(logits, 1), cache


def test_mixed_length_batch_equals_each_prompt_alone_whatever_the_padding(tmp_root):
    cfg, model, gen = tiny_mtp(tmp_root)
    rng = np.random.default_rng(0)
    short, long_ = list(rng.integers(0, cfg.vocab_size, 6)), list(rng.integers(0, cfg.vocab_size, 38))
    garbage = rng.integers(0, cfg.vocab_size, 4 * CHUNK)  # padding tokens differ between the runs
    last, cache = prefill_rows(gen, [short, long_], garbage)
    assert np.asarray(cache.lengths).tolist() == [6, 38]
    toks, logits, _ = greedy_logits(gen, cache, last.argmax(-1), 12)
    for b, prompt in enumerate([short, long_]):
        # "alone": the prompt in both rows of the batch, padded with zeros
        last_1, cache_1 = prefill_rows(gen, [prompt, prompt], np.zeros(4 * CHUNK, np.int64))
        toks_1, logits_1, _ = greedy_logits(gen, cache_1, last_1.argmax(-1), 12)
        assert rel(last[b], last_1[0]) <= TOL
        assert rel(logits[b], logits_1[0]) <= TOL
        assert toks[b].tolist() == toks_1[0].tolist()


def test_generator_mixed_lengths_stop_tokens_max_new_tokens_and_streaming(tmp_root):
    cfg, model, gen = tiny_mtp(tmp_root)
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(0, cfg.vocab_size, n)) for n in (9, 30)]
    out = gen.generate(prompts, max_new_tokens=10, prefill_chunk=CHUNK, max_len=ML)
    assert [len(t) for t in out.tokens] == [10, 10]
    assert out.stats.generated_tokens == 20 and out.stats.prompt_tokens == 39
    # the same greedy tokens as the explicit prefill + decode path
    last, cache = prefill_rows(gen, prompts, np.zeros(4 * CHUNK, np.int64))
    toks, _, _ = greedy_logits(gen, cache, last.argmax(-1), 9)
    assert [t[0] for t in out.tokens] == last.argmax(-1).tolist()
    assert [t[1:] for t in out.tokens] == toks.tolist()
    # a stop token ends its row (and is the row's last token); the other row runs on
    stop = out.tokens[0][3]
    stopped = gen.generate(prompts, max_new_tokens=10, prefill_chunk=CHUNK, max_len=ML, stop_tokens=[stop])
    for full, cut in zip(out.tokens, stopped.tokens):
        n = full.index(stop) + 1 if stop in full else len(full)
        assert cut == full[:n]
    # streaming yields the same tokens step by step, never more than a row's budget
    seen = [[], []]
    for update in gen.stream(prompts, max_new_tokens=10, prefill_chunk=CHUNK, max_len=ML):
        for b, t in update.items():
            assert len(t) <= 1
            seen[b] += t
    assert seen == out.tokens


def test_sampling_is_seeded_per_row_and_top_k_1_is_greedy(tmp_root):
    cfg, model, gen = tiny_mtp(tmp_root)
    rng = np.random.default_rng(2)
    prompts = [list(rng.integers(0, cfg.vocab_size, n)) for n in (7, 12)]
    kw = dict(max_new_tokens=8, prefill_chunk=CHUNK, max_len=ML)
    greedy = gen.generate(prompts, **kw).tokens
    hot = G.Sampling(temperature=1.5)
    a = gen.generate(prompts, sampling=hot, seed=5, **kw).tokens
    assert a == gen.generate(prompts, sampling=hot, seed=5, **kw).tokens  # reproducible
    assert a != gen.generate(prompts, sampling=hot, seed=6, **kw).tokens
    assert a != greedy
    # a row's draws do not depend on its batch mate
    assert gen.generate([prompts[0], prompts[0]], sampling=hot, seed=5, **kw).tokens[0] == a[0]
    assert gen.generate(prompts, sampling=G.Sampling(temperature=2.0, top_k=1), seed=5, **kw).tokens == greedy
    assert gen.generate(prompts, sampling=G.Sampling(temperature=2.0, top_p=1e-6), seed=5, **kw).tokens == greedy


def test_sampling_masks_keep_exactly_top_k_and_the_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    lp = np.exp(np.asarray(G.sampling_logprobs(logits, G.Sampling(1.0, top_k=2))))
    np.testing.assert_allclose(lp, [[0.5 / 0.7, 0.2 / 0.7, 0, 0, 0]], rtol=1e-6)
    lp = np.exp(np.asarray(G.sampling_logprobs(logits, G.Sampling(1.0, top_p=0.8))))  # 0.5+0.2 < 0.8 -> 3 kept
    np.testing.assert_allclose(lp, [[0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0]], rtol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_speculative_sampling_emits_each_token_with_the_sampling_distribution(temperature):
    # Drafts d1, d2 against fixed logits over 5 tokens (top_k 4: each row's least likely never drawn), 40,000 rows with
    # their own keys: d1 stands at the rate p0(d1); the token emitted at each position, among the rows
    # whose drafts before it stood, has the frequencies of p at that position, whatever the drafts
    # (a likely one, an unlikely one). Temperature 0 (static or traced): the argmax, drafts stand where
    # they equal it.
    B = 40_000
    logits = jnp.log(jnp.asarray([[0.4, 0.3, 0.15, 0.1, 0.05], [0.1, 0.2, 0.3, 0.25, 0.15],
                                  [0.04, 0.06, 0.1, 0.3, 0.5]]))
    params = G.Sampling(jnp.float32(temperature), jnp.int32(4), jnp.float32(1.0))
    p = np.exp(np.asarray(G.sampling_logprobs(logits, params)))  # [3, 5]
    assert (p[np.arange(3), np.argmin(logits, -1)] == 0).all()
    candidate = jnp.broadcast_to(jnp.asarray([7, 1, 2], jnp.int32), (B, 3))  # last token 7, drafts 1 then 2
    stands, emitted = jax.jit(G.speculative_tokens)(jnp.broadcast_to(logits, (B, 3, 5)), candidate,
                                                    jnp.arange(B, dtype=jnp.int32) % 97 + 10, 3, params)
    stands, emitted = np.asarray(stands), np.asarray(emitted)
    assert abs(stands[:, 0].mean() - p[0, 1]) < 4 * np.sqrt(p[0, 1] * (1 - p[0, 1]) / B)
    reached = np.ones(B, bool)
    for i in range(3):
        freq = np.bincount(emitted[reached, i], minlength=5) / reached.sum()
        assert np.all(np.abs(freq - p[i]) < 4 * np.sqrt(p[i] * (1 - p[i]) / reached.sum()) + 1e-9), (i, freq, p[i])
        if i < 2:
            reached &= stands[:, i]
    greedy = np.asarray(jnp.argmax(logits, -1))  # [0, 2, 4]
    for t in (0.0, jnp.float32(0.0)):
        s0, e0 = G.speculative_tokens(logits[None], jnp.asarray([[7, 0, 1]]), jnp.asarray([10]), 3,
                                      G.Sampling(t, 0, 1.0))
        np.testing.assert_array_equal(e0[0], greedy)
        np.testing.assert_array_equal(s0[0], [True, False])


def test_speculative_greedy_equals_plain_greedy(tmp_root):
    cfg, model, gen = tiny_mtp(tmp_root)
    rng = np.random.default_rng(4)
    prompts = [list(rng.integers(0, cfg.vocab_size, n)) for n in (11, 21)]
    plain = gen.generate(prompts, max_new_tokens=16, prefill_chunk=CHUNK, max_len=ML)
    spec = gen.generate(prompts, max_new_tokens=16, prefill_chunk=CHUNK, max_len=ML, speculative=True)
    assert spec.tokens == plain.tokens
    assert spec.stats.drafted > 0 and 0 <= spec.stats.accepted <= spec.stats.drafted
    # sampled speculation (speculative_tokens): top_k = 1 is the argmax, so greedy speculation's tokens and
    # acceptances; hot, seeded
    top1 = gen.generate(prompts, max_new_tokens=16, prefill_chunk=CHUNK, max_len=ML, speculative=True, seed=2,
                        sampling=G.Sampling(temperature=1.0, top_k=1))
    assert top1.tokens == plain.tokens and top1.stats.accepted == spec.stats.accepted
    hot = [gen.generate(prompts, max_new_tokens=16, prefill_chunk=CHUNK, max_len=ML, speculative=True, seed=2,
                        sampling=G.Sampling(temperature=1.5)) for _ in range(2)]
    assert hot[0].tokens == hot[1].tokens != plain.tokens and all(len(t) == 16 for t in hot[0].tokens)


@pytest.mark.slow
def test_mtp_drafts_equal_the_stateless_mtp_head(tmp_root):
    """The cached MTP block at position t (streams_t, token t+1) = the stateless forward's mtp_logits."""
    cfg, model, gen = tiny_mtp(tmp_root)
    ids = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, CHUNK)).astype(np.int32)
    cache = init_cache(cfg, 2, ML)
    _, streams, cache = gen._prefill(gen.state, cache, jnp.asarray(ids), jnp.asarray([CHUNK, CHUNK - 4], np.int32))
    nxt = np.concatenate([ids[:, 1:], ids[:, :1]], 1)
    draft, cache = gen._mtp_prefill(gen.state, cache, streams, jnp.asarray(nxt),
                                    jnp.asarray([CHUNK - 1, CHUNK - 5], np.int32))
    ref = model(jnp.asarray(ids)).mtp_logits  # [B, T-1, V]: position t predicts token t+2
    assert np.asarray(draft).tolist() == [int(ref[0, CHUNK - 2].argmax()), int(ref[1, CHUNK - 6].argmax())]
    assert np.asarray(cache.mtp_lengths).tolist() == [CHUNK - 1, CHUNK - 5]


def test_rejected_draft_at_a_compressor_window_boundary_rolls_back_exactly(tmp_root):
    """Row 0's draft is right (accepted), row 1's wrong (rejected) where the draft token completes a CSA
    window (m=4) and an HCA window (m'=16); afterwards both rows decode exactly as plain decoding does."""
    cfg, model, gen = tiny_mtp(tmp_root)
    rng = np.random.default_rng(6)
    p = 46  # prompt of 46 tokens: pending token at position 46, draft at 47 = 3*16 - 1, which completes
    # CSA entry 11 (positions 44..47) and HCA entry 2 (positions 32..47)
    prompt = list(rng.integers(0, cfg.vocab_size, p))
    last, cache0 = prefill_rows(gen, [prompt, prompt], np.zeros(4 * CHUNK, np.int64))
    first = last.argmax(-1)
    toks, logits, _ = greedy_logits(gen, cache0, first, 6)  # plain: tokens at positions 47.., logits at 46..

    last, cache = prefill_rows(gen, [prompt, prompt], np.zeros(4 * CHUNK, np.int64))
    draft = np.array([toks[0, 0], (toks[1, 0] + 1) % cfg.vocab_size], np.int32)  # right, wrong
    target, accept, _, spec_logits, cache = gen._spec_step(gen.state, cache, jnp.asarray(first, jnp.int32),
                                                           jnp.asarray(draft), 0, GREEDY)
    assert np.asarray(accept).tolist() == [True, False]
    assert np.asarray(cache.lengths).tolist() == [p + 2, p + 1]
    assert rel(np.asarray(spec_logits)[:, 0], logits[:, 0]) <= TOL
    assert rel(np.asarray(spec_logits)[0, 1], logits[0, 1]) <= TOL
    # continue both rows plainly from where each stands and compare with the plain run
    pending = jnp.asarray([toks[0, 1], toks[1, 0]], jnp.int32)
    after = []
    for _ in range(4):
        pending, lg, cache = gen._step(gen.state, cache, pending, jnp.zeros(2, jnp.int32), 0, GREEDY)
        after.append(np.asarray(lg))
    after = np.stack(after, 1)
    assert rel(after[0], logits[0, 2:6]) <= TOL  # row 0 is one position ahead (draft accepted)
    assert rel(after[1], logits[1, 1:5]) <= TOL


# --------------------------------------------------------------------------------------------------
# Abstract tracing, errors


def test_decode_step_traces_with_abstract_inputs_for_v4_flash():
    cfg = V4Config.preset("v4-flash")
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    cache = jax.eval_shape(lambda: init_cache(cfg, 4, 8192))
    tokens = jax.ShapeDtypeStruct((4, 1), jnp.int32)
    logits, new = jax.eval_shape(lambda s, c, t: G.decode_step(nnx.merge(graphdef, s), c, t), state, cache, tokens)
    assert logits.shape == (4, 1, cfg.vocab_size) and logits.dtype == jnp.float32
    assert jax.tree.structure(new) == jax.tree.structure(cache)
    assert all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(cache)))


def test_bad_inputs_give_clear_errors(tmp_root):
    cfg, model, gen = tiny_mtp(tmp_root)
    with pytest.raises(ValueError, match="max_len"):
        gen.generate([[1] * 100], max_new_tokens=20, max_len=96)  # 120 positions > max_len 96
    with pytest.raises(ValueError, match="max_seq_len"):
        gen.generate([[1] * 100], max_new_tokens=40)  # beyond the model's 128
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        gen.generate([[1, 2, 512]], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        gen.generate([[1, -1]], max_new_tokens=2)
    with pytest.raises(ValueError, match="at least one token"):
        gen.generate([[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        gen.generate([[1]], max_new_tokens=2, sampling=G.Sampling(1.0, top_p=0.0))
    cache = init_cache(cfg, 1, 16)
    with pytest.raises(ValueError, match="holds at most 16"):
        G.prefill(model, jnp.zeros((1, 17), jnp.int32), None, cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        init_cache(cfg, 1, 129)


@pytest.mark.slow
def test_one_shot_prefill_equals_chunked_prefill_and_true_batch_of_one(tmp_root):
    cfg, model, gen = tiny_mtp(tmp_root)
    rng = np.random.default_rng(8)
    prompts = [list(rng.integers(0, cfg.vocab_size, n)) for n in (13, 40)]
    chunked = gen.generate(prompts, max_new_tokens=12, prefill_chunk=7)
    one_shot = gen.generate(prompts, max_new_tokens=12)
    alone = [gen.generate([p], max_new_tokens=12).tokens[0] for p in prompts]
    assert chunked.tokens == one_shot.tokens == alone
    ids = jnp.asarray([prompts[1]], jnp.int32)
    logits, _ = G.prefill(model, ids, None, init_cache(cfg, 1, 64))
    logits7 = []
    cache = init_cache(cfg, 1, 64)
    for s in range(0, 40, 7):
        lg, cache = G.prefill(model, ids[:, s:s + 7], None, cache)
        logits7.append(lg)
    assert rel(jnp.concatenate(logits7, 1), logits) <= TOL
    assert rel(logits, model(ids, with_mtp=False).logits) <= TOL


# --------------------------------------------------------------------------------------------------
# infer.py


def word_tokenizer(path, n_words: int):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(n_words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return str(path)


def test_infer_explains_and_rejects_bad_inputs(tmp_root, tmp_path, capsys):
    import infer

    assert infer.main([]) == 2
    assert "HF-format directory" in capsys.readouterr().err
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    assert infer.main(["--checkpoint", str(tmp_path / "llama"), "--prompt-ids", __file__]) == 2
    assert "'llama' checkpoint" in capsys.readouterr().err
    (tmp_path / "orbax" / "checkpoints").mkdir(parents=True)
    assert infer.main(["--checkpoint", str(tmp_path / "orbax"), "--prompt-ids", __file__]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err  # a train.py run without a finished save
    from flax import nnx

    from v4jax.io.checkpoint import save_hf

    ckpt = str(tmp_path / "ckpt")  # a random tiny model without MTP weights
    save_hf(Transformer(V4Config.preset("tiny", n_mtp_layers=0), rngs=nnx.Rngs(0)), ckpt)
    big = word_tokenizer(tmp_path / "big.json", 600)  # the model has 512 ids
    assert infer.main(["--checkpoint", ckpt, "--prompt", "w1 w2", "--tokenizer", big]) == 2
    assert "600 tokens but the model's vocabulary has 512" in capsys.readouterr().err
    ids = tmp_path / "ids.txt"
    ids.write_text("1 2 3\n4, 600\n")
    assert infer.main(["--checkpoint", ckpt, "--prompt-ids", str(ids)]) == 2
    assert "[0, 512)" in capsys.readouterr().err
    ids.write_text("1 2 x\n")
    assert infer.main(["--checkpoint", ckpt, "--prompt-ids", str(ids)]) == 2
    assert "must be integers" in capsys.readouterr().err
    ids.write_text("1 2 3\n")
    assert infer.main(["--checkpoint", ckpt, "--prompt-ids", str(ids), "--max-new-tokens", "200"]) == 2
    assert "max_len" in capsys.readouterr().err
    assert infer.main(["--checkpoint", ckpt, "--prompt-ids", str(ids), "--speculative"]) == 2
    assert "no mtp" in capsys.readouterr().err


@pytest.mark.slow
def test_infer_generates_from_a_written_random_checkpoint(tmp_path, capsys):
    import infer

    ckpt = str(tmp_path / "ckpt")
    assert infer.main(["--write-random-checkpoint", ckpt, "--preset", "tiny"]) == 0
    tok = word_tokenizer(tmp_path / "tok.json", 512)
    capsys.readouterr()
    assert infer.main(["--checkpoint", ckpt, "--prompt", "w5 w6 w7", "--tokenizer", tok, "--max-new-tokens", "6",
                       "--stop"]) == 0
    io = capsys.readouterr()
    assert len(io.out.split()) == 6 and all(w.startswith("w") for w in io.out.split())
    assert "B/token" in io.err and "allocated" in io.err
    assert infer.main(["--checkpoint", ckpt, "--prompt", "w5 w6 w7", "--tokenizer", tok, "--max-new-tokens", "6",
                       "--stop", "--speculative"]) == 0
    io2 = capsys.readouterr()
    assert io2.out == io.out and "acceptance" in io2.err
