"""The Engram n-gram hash of V4.1 (issue 20, architecture.md §12): the layout against the fixtures'
meta.json and the released values, the prefill row ids against the golden `engram_hash_ids.npy`, the
latch rule at the sequence start and at dead (image) positions, and decode with a history against one
call over the whole sequence."""

import json
import os

import numpy as np
import pytest

from v4jax.config import ConfigError
from v4jax.config_v41 import V41Config
from v4jax.model.engram_hash import (
    HashHistory,
    advance_history,
    compressed_ids,
    empty_history,
    engram_layout,
    is_prime,
    ngram_hash_ids,
    pad_compressed_id,
)

from v41_fixtures import FIXTURES, needs_fixtures  # noqa: E402  (tests/v41_fixtures.py)


def _load(name):
    return np.load(os.path.join(FIXTURES, name))


def _meta_engram():
    with open(os.path.join(FIXTURES, "meta.json")) as f:
        return json.load(f)["engram"]


TINY = V41Config.preset("v41-tiny")
TINY_LAYOUT = engram_layout(TINY)


def reference_hash(window, layout, engram_index):
    """One position, Python ints: window[k] is the id used for look-back k (already padded)."""
    mult = [int(m) for m in layout.multipliers[engram_index]]
    primes, offsets = layout.primes[engram_index], layout.offsets[engram_index]
    rolling, out = window[0] * mult[0], []
    for k in range(1, len(mult)):
        rolling ^= window[k] * mult[k]
        out += [rolling % int(p) for p in primes[k - 1]]
    return [h + int(o) for h, o in zip(out, offsets)]


def reference_windows(ids, dead, pad, k_max):
    """Per position, the look-back ids with the latch, one position at a time: [T][K]."""
    windows = []
    for t in range(len(ids)):
        window, blocked = [], False
        for k in range(k_max):
            blocked = blocked or t - k < 0 or bool(dead[t - k])
            window.append(pad if blocked else int(ids[t - k]))
        windows.append(window)
    return windows


def test_is_prime_against_a_sieve():
    n = 5000
    sieve = np.ones(n, bool)
    sieve[:2] = False
    for p in range(2, int(n ** 0.5) + 1):
        if sieve[p]:
            sieve[p * p::p] = False
    assert [i for i in range(n) if is_prime(i)] == [i for i in range(n) if sieve[i]]
    assert is_prime(16000057) and not is_prime(16000057 * 16000079) and is_prime(2**61 - 1)


@needs_fixtures
def test_tiny_layout_is_the_one_the_official_code_derived():
    meta = _meta_engram()
    assert TINY_LAYOUT.layer_ids == tuple(meta["layer_ids"]) == TINY.engram_layer_ids
    assert TINY_LAYOUT.primes.dtype == TINY_LAYOUT.offsets.dtype == TINY_LAYOUT.multipliers.dtype == np.int64
    np.testing.assert_array_equal(TINY_LAYOUT.primes, np.array(meta["primes"]))
    np.testing.assert_array_equal(TINY_LAYOUT.offsets, np.array(meta["offsets"]))
    np.testing.assert_array_equal(TINY_LAYOUT.multipliers, np.array([[int(m) for m in row] for row in meta["multipliers"]]))
    assert pad_compressed_id(TINY, _load("engram_token_map.npy")) == meta["pad_compressed_id"] == 0


def test_released_layout():
    cfg = V41Config.preset("v41-flash")
    layout = engram_layout(cfg)
    assert layout.primes.shape == (2, 3, 8) and layout.offsets.shape == (2, 24) and layout.multipliers.shape == (2, 4)
    assert layout.primes[0, 0, :3].tolist() == [16000057, 16000079, 16000081]
    assert layout.offsets[-1, -1] + layout.primes[-1, -1, -1] == 384016682 == cfg.engram_num_embeddings[-1]
    assert layout.primes.reshape(2, -1).sum(axis=1).tolist() == list(cfg.engram_num_embeddings)
    assert len(set(layout.primes.ravel().tolist())) == 48  # never reused across layers or orders
    assert layout.multipliers[0].tolist() == [76632096046245, 4839876093313, 35959672319349, 73987337458391]
    assert layout.multipliers[1].tolist() == [67716810739261, 51510806800915, 30921347202721, 82619226485591]


def test_a_table_size_that_is_not_the_sum_of_the_primes_is_refused():
    with pytest.raises(ConfigError, match=r"engram_num_embeddings\[1\] \(Engram layer 4\) is 553.*sum to 552"):
        engram_layout(TINY.replace(engram_num_embeddings=(384, 553)))


@needs_fixtures
def test_prefill_row_ids_equal_the_golden_ones():
    token_map = _load("engram_token_map.npy")
    ids = compressed_ids(_load("input_ids.npy"), token_map)
    golden = _load("engram_hash_ids.npy")  # [b, s, engram layer, (order, head)]
    for i in range(len(TINY.engram_layer_ids)):
        got = ngram_hash_ids(ids, None, TINY_LAYOUT, i, pad_compressed_id(TINY, token_map))
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, golden[:, :, i])
        assert got.min() >= 0 and (got < TINY.engram_num_embeddings[i]).all()


def test_the_look_back_latches_at_the_sequence_start_and_at_a_dead_position():
    pad = 0
    ids = np.array([[11, 12, 13, 14, 15, 16, 17, 18]])
    dead = np.zeros_like(ids, bool)
    dead[0, 3] = True
    got = ngram_hash_ids(ids, dead, TINY_LAYOUT, 1, pad)[0]

    def h(*window):
        return reference_hash(list(window), TINY_LAYOUT, 1)

    assert got[0].tolist() == h(11, pad, pad, pad)  # sequence start
    assert got[1].tolist() == h(12, 11, pad, pad)
    assert got[2].tolist() == h(13, 12, 11, pad)
    assert got[3].tolist() == h(pad, pad, pad, pad)  # the dead position itself is blocked at look-back 0
    assert got[4].tolist() == h(15, pad, pad, pad)
    # look-back 2 reaches the dead position 3; look-back 3 reaches live position 2 but stays pad (latch)
    assert got[5].tolist() == h(16, 15, pad, pad)
    assert got[5].tolist() != h(16, 15, pad, 12)
    assert got[6].tolist() == h(17, 16, 15, pad)
    assert got[7].tolist() == h(18, 17, 16, 15)  # past the dead position's reach


def test_vectorised_hash_equals_the_position_by_position_reference():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, TINY.engram_compressed_vocab_size, size=(3, 17))
    dead = rng.random((3, 17)) < 0.2
    for i in range(2):
        got = ngram_hash_ids(ids, dead, TINY_LAYOUT, i, pad_id=5)
        for b in range(3):
            want = [reference_hash(w, TINY_LAYOUT, i) for w in reference_windows(ids[b], dead[b], 5, 4)]
            assert got[b].tolist() == want


def _hash_in_chunks(ids, dead, sizes, engram_index, pad):
    history, out, start = empty_history(ids.shape[0], TINY_LAYOUT), [], 0
    for n in sizes:
        chunk, chunk_dead = ids[:, start:start + n], dead[:, start:start + n]
        out.append(ngram_hash_ids(chunk, chunk_dead, TINY_LAYOUT, engram_index, pad, history))
        history = advance_history(history, chunk, chunk_dead)
        start += n
    assert history.length.tolist() == [start] * ids.shape[0]
    return np.concatenate(out, axis=1)


def test_decode_with_a_history_equals_one_call():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, TINY.engram_compressed_vocab_size, size=(2, 12))
    dead = np.zeros(ids.shape, bool)
    dead[0, 4:6] = True  # an image span in the prefill of row 0, one at its start in row 1
    dead[1, 0] = True
    for i in range(2):
        whole = ngram_hash_ids(ids, dead, TINY_LAYOUT, i, 3)
        np.testing.assert_array_equal(_hash_in_chunks(ids, dead, [1] * 12, i, 3), whole)  # token by token
        np.testing.assert_array_equal(_hash_in_chunks(ids, dead, [7] + [1] * 5, i, 3), whole)  # prefill, decode
        np.testing.assert_array_equal(_hash_in_chunks(ids, dead, [2, 3, 0, 4, 3], i, 3), whole)  # chunks


def test_rows_of_a_batch_may_have_histories_of_different_lengths():
    ids = np.array([[21, 22, 23, 24, 25], [31, 32, 33, 34, 35]])
    # row 0 has hashed 3 tokens, row 1 only 1: its older history columns are before the sequence start
    history = HashHistory(ids=np.array([[21, 22, 23], [99, 99, 31]]), dead=np.zeros((2, 3), bool),
                          length=np.array([3, 1]))
    got = ngram_hash_ids(np.array([[24], [32]]), None, TINY_LAYOUT, 0, 0, history)
    np.testing.assert_array_equal(got[0, 0], ngram_hash_ids(ids[:1, :4], None, TINY_LAYOUT, 0, 0)[0, 3])
    np.testing.assert_array_equal(got[1, 0], ngram_hash_ids(ids[1:, :2], None, TINY_LAYOUT, 0, 0)[0, 1])


@needs_fixtures
def test_image_spans_are_dead_in_the_history():
    """No golden ids exist for the VL prompt: this checks the fixture's image rows against the
    reference rule (every position with token type >= 0, delimiters included, is dead)."""
    token_map = _load("engram_token_map.npy")
    pad = pad_compressed_id(TINY, token_map)
    ids = compressed_ids(_load("image_input_ids.npy"), token_map)
    dead = _load("image_token_types.npy") >= 0
    all_pad = np.array(reference_hash([pad] * 4, TINY_LAYOUT, 0))
    got = ngram_hash_ids(ids, dead, TINY_LAYOUT, 0, pad)
    for b in range(2):
        want = [reference_hash(w, TINY_LAYOUT, 0) for w in reference_windows(ids[b], dead[b], pad, 4)]
        assert got[b].tolist() == want
        span = np.flatnonzero(dead[b])
        assert (got[b, span] == all_pad).all()
        after = span[-1] + 1  # the first text token after the span hashes as at a sequence start
        assert got[b, after].tolist() == reference_hash([int(ids[b, after]), pad, pad, pad], TINY_LAYOUT, 0)
    # before the span the dead flags change nothing: the same ids hash as plain text
    np.testing.assert_array_equal(got[0, :5], ngram_hash_ids(ids[:1, :5], None, TINY_LAYOUT, 0, pad)[0])


def test_bad_inputs_are_refused():
    token_map = np.array([0, 0, 1, 2])
    with pytest.raises(ValueError, match="token ids"):
        compressed_ids(np.array([[0, 4]]), token_map)
    with pytest.raises(ValueError, match="token ids"):
        compressed_ids(np.array([[-1]]), token_map)
    with pytest.raises(ConfigError, match="engram_compressed_vocab_size"):
        pad_compressed_id(TINY, token_map)
    with pytest.raises(ValueError, match="compressed ids"):
        ngram_hash_ids(np.array([[-1]]), None, TINY_LAYOUT, 0, 0)
    with pytest.raises(ValueError, match="history"):
        ngram_hash_ids(np.array([[1]]), None, TINY_LAYOUT, 0, 0, empty_history(2, TINY_LAYOUT))


class _StandInTokenizer:
    """The fixtures' stand-in (README there): id i with i % 7 == 6 decodes to text holding U+FFFD and is
    keyed by its raw form; every other id decodes to one of three spellings of the word x{i // 3}."""

    def get_vocab_size(self, with_added_tokens=True):
        return 256

    def decode(self, ids, skip_special_tokens=False):
        (i,) = ids
        if i % 7 == 6:
            return "\ufffd"
        return (f"x{i // 3}", f" X{i // 3}", f"X{i // 3}\n")[i % 3]

    def id_to_token(self, i):
        return f"<0x{i:02X}>"


@needs_fixtures
def test_the_token_map_is_rebuilt_from_a_tokenizer():
    from v4jax.model.engram_hash import token_map_from_tokenizer

    got = token_map_from_tokenizer(_StandInTokenizer())
    np.testing.assert_array_equal(got, np.load(os.path.join(FIXTURES, "engram_token_map.npy")))
    assert got.max() + 1 == V41Config.preset("v41-tiny").engram_compressed_vocab_size


def test_the_normaliser_folds_case_accents_and_spaces_but_keeps_a_lone_space():
    from v4jax.model.engram_hash import token_map_from_tokenizer

    class Words:
        texts = ["Café", " cafe", "CAFE\n", " ", "  ", "\t", "", "x"]

        def get_vocab_size(self, with_added_tokens=True):
            return len(self.texts)

        def decode(self, ids, skip_special_tokens=False):
            return self.texts[ids[0]]

        def id_to_token(self, i):
            return str(i)

    assert token_map_from_tokenizer(Words()).tolist() == [0, 0, 0, 1, 1, 1, 2, 3]
