"""Greedy generation for V4.1 (issue 20): plain decoding gives the official code's greedy tokens, and
DSpark speculation gives exactly the same tokens (architecture.md §12.8)."""

import os

import numpy as np
import pytest
from flax import nnx

from v4jax.config import RunOptions
from v4jax.config_v41 import V41Config
from v4jax.inference.generate_v41 import generate_v41, serve_v41
from v4jax.model.v41 import V41Transformer

from v41_fixtures import FIXTURES, needs_fixtures  # noqa: E402  (tests/v41_fixtures.py)

pytestmark = needs_fixtures


@pytest.fixture(scope="module")
def model():
    from safetensors.numpy import load_file

    from v4jax.io.official_v41 import load_official_v41

    cfg = V41Config.from_json_file(os.path.join(FIXTURES, "config.json"), max_seq_len=128)
    m = V41Transformer(cfg, rngs=nnx.Rngs(0), options=RunOptions(dtype="float32", param_dtype="float32",
                                                                  attention_chunk=64))
    load_official_v41(m, load_file(os.path.join(FIXTURES, "model.safetensors")))
    return m


def test_plain_and_speculative_greedy_give_the_official_tokens(model):
    prompt = np.load(os.path.join(FIXTURES, "input_ids.npy"))
    token_map = np.load(os.path.join(FIXTURES, "engram_token_map.npy"))
    plain = generate_v41(model, prompt, 12, token_map)
    np.testing.assert_array_equal(plain.tokens[:, :7], np.load(os.path.join(FIXTURES, "generated_ids.npy")))
    assert plain.steps == 11 and plain.accepted == 0
    spec = generate_v41(model, prompt, 12, token_map, draft=True)
    np.testing.assert_array_equal(spec.tokens, plain.tokens)
    assert spec.steps + spec.accepted == 11  # each main-model step yields its token and the accepted drafts
    # a prompt prefilled in chunks through the cache (the Engram history and the DSpark features carried
    # across the chunks) gives the same tokens
    for chunk, draft in ((3, False), (5, True)):
        got = generate_v41(model, prompt, 12, token_map, draft=draft, prefill_chunk=chunk)
        np.testing.assert_array_equal(got.tokens, plain.tokens)


def test_generation_ends_once_every_row_has_emitted_a_stop_token(model):
    prompt = np.load(os.path.join(FIXTURES, "input_ids.npy"))
    token_map = np.load(os.path.join(FIXTURES, "engram_token_map.npy"))
    plain = generate_v41(model, prompt, 12, token_map).tokens
    stop = {int(plain[0, 3]), int(plain[-1, 5])}
    first = [next(k for k, t in enumerate(row) if t in stop) for row in plain]  # each row's first stop token
    n = max(first) + 1
    assert n < 12
    got = generate_v41(model, prompt, 12, token_map, stop_tokens=sorted(stop))
    np.testing.assert_array_equal(got.tokens, plain[:, :n])  # rows that stopped earlier kept decoding
    assert got.steps == n - 1
    spec = generate_v41(model, prompt, 12, token_map, draft=True, stop_tokens=sorted(stop))
    assert n <= spec.tokens.shape[1] <= 12  # a step may end past it by its accepted drafts
    np.testing.assert_array_equal(spec.tokens, plain[:, :spec.tokens.shape[1]])


def test_prompts_of_several_lengths_decode_together_each_as_alone(model):
    """Rows of several lengths, right-padded into one batch (the padding kept out of every cache, the
    Engram history and the DSpark rings), give each row the tokens it gets alone: plain, speculative,
    and prefilled in chunks that end inside some rows' padding; and served over two slots (continuous
    batching, a slot reused once its prompt stops), each prompt its tokens alone up to its stop."""
    prompt = np.load(os.path.join(FIXTURES, "input_ids.npy"))
    token_map = np.load(os.path.join(FIXTURES, "engram_token_map.npy"))
    prompts = [prompt[0].tolist(), prompt[1, :-5].tolist(), prompt[0, :4].tolist()]
    alone = [generate_v41(model, np.array([p]), 6, token_map).tokens[0] for p in prompts]
    for draft, chunk in ((False, None), (True, 5)):
        got = generate_v41(model, prompts, 6, token_map, draft=draft, prefill_chunk=chunk)
        for row, want in zip(got.tokens, alone):
            np.testing.assert_array_equal(row, want)
    # continuous batching: two slots, the prompt that stops first frees its slot for the next one
    stop = int(alone[1][2])
    want = {i: a[:next((k + 1 for k, t in enumerate(a) if t == stop), len(a))].tolist() for i, a in enumerate(alone)}
    assert len(want[1]) == 3 and len(want[0]) > 3  # the second prompt stops early: the third takes its slot
    got = dict(serve_v41(model, prompts, 6, token_map, slots=2, stop_tokens=[stop]))
    assert got == want


def test_bad_requests_are_refused(model):
    prompt = np.zeros((1, 4), np.int64)
    with pytest.raises(ValueError, match="pass token_map"):
        generate_v41(model, prompt, 2)
    with pytest.raises(ValueError, match="max_seq_len is 128"):
        generate_v41(model, prompt, 200, np.zeros(256, np.int64))
    with pytest.raises(ValueError, match="prefill_chunk must be a positive number of tokens, got 0"):
        generate_v41(model, prompt, 2, np.zeros(256, np.int64), prefill_chunk=0)


@pytest.mark.slow
def test_an_image_prompt_generates_the_official_tokens(model):
    """The VL case: two images (ViT grids 5 x 7 and 4 x 3) in a batch of two prompts; the prefill embeds them,
    then plain and DSpark greedy decoding give the official code's tokens."""
    from v4jax.inference.generate_v41 import image_prompt
    from v4jax.model.v41 import Image

    prompt = np.load(os.path.join(FIXTURES, "image_input_ids.npy"))
    token_map = np.load(os.path.join(FIXTURES, "engram_token_map.npy"))
    p0 = np.load(os.path.join(FIXTURES, "image0_patches.npy")).reshape(35, -1)
    p1 = np.load(os.path.join(FIXTURES, "image1_patches.npy")).reshape(12, -1)
    images = (Image(0, 5, p0, (5, 7)), Image(1, 17, p1, (4, 3)))
    want = np.load(os.path.join(FIXTURES, "image_generated_ids.npy"))
    for draft, chunk in ((False, None), (True, None), (False, 4), (True, 7)):  # chunks cut through the spans
        got = generate_v41(model, prompt, want.shape[1], token_map, draft=draft, images=images, prefill_chunk=chunk)
        np.testing.assert_array_equal(got.tokens, want)
    # image_prompt lays a span out as the fixture's prompt does (START, 3 x (2 IMAGE + NEWLINE), END at 0)
    ids, starts = image_prompt(model.cfg, [7, 8], [(5, 7)])
    assert starts == [0] and len(ids) == 2 + 2 * 4 + 2 and ids[:-2] == [model.cfg.image_token_id] * 10
    assert (prompt[0, 5:15] == model.cfg.image_token_id).all()


@pytest.mark.slow
def test_sampling_is_seeded_and_top_k_1_is_greedy(model):
    from v4jax.inference.generate import Sampling

    prompt = np.load(os.path.join(FIXTURES, "input_ids.npy"))
    token_map = np.load(os.path.join(FIXTURES, "engram_token_map.npy"))
    greedy = np.load(os.path.join(FIXTURES, "generated_ids.npy"))[:, :5]
    assert (generate_v41(model, prompt, 5, token_map, sampling=Sampling(1.0, 1, 1.0)).tokens == greedy).all()
    hot = Sampling(1.5, 0, 1.0)
    a, b = (generate_v41(model, prompt, 5, token_map, sampling=hot, seed=s).tokens for s in (3, 3))
    np.testing.assert_array_equal(a, b)
    assert (a != generate_v41(model, prompt, 5, token_map, sampling=hot, seed=4).tokens).any()
    assert (a != greedy).any()


@pytest.mark.slow
def test_sampled_dspark_speculation_is_seeded_and_top_k_1_is_greedy(model):
    # Sampled speculation (speculative_tokens): with top_k = 1 the sampling distribution is the argmax,
    # so the drafts stand exactly where greedy speculation keeps them and the tokens are greedy decoding's;
    # hot, the same seed gives the same tokens and each main-model call yields its token and the drafts kept
    from v4jax.inference.generate import Sampling

    prompt = np.load(os.path.join(FIXTURES, "input_ids.npy"))
    token_map = np.load(os.path.join(FIXTURES, "engram_token_map.npy"))
    greedy = generate_v41(model, prompt, 8, token_map, draft=True)
    top1 = generate_v41(model, prompt, 8, token_map, draft=True, sampling=Sampling(1.0, 1, 1.0), seed=9)
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)
    assert (top1.steps, top1.accepted) == (greedy.steps, greedy.accepted)
    hot = Sampling(1.5, 0, 1.0)
    a, b = (generate_v41(model, prompt, 8, token_map, draft=True, sampling=hot, seed=3) for _ in range(2))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert a.steps + a.accepted == 7 and ((0 <= a.tokens) & (a.tokens < model.cfg.vocab_size)).all()
    assert (a.tokens != greedy.tokens).any()
