"""Data pipeline: tokenisers, packing, deterministic order, exact mid-epoch resume, host shards;
ArrayRecord shards and batches served through grain."""

import json

import numpy as np
import pytest

from v4jax.train.data import (ByteTokenizer, DataError, GrainBatches, IteratorState, PackedBatches, make_tokenizer,
                        pack_tokens, resolve_files, stdlib_files, write_array_record)


def test_byte_tokenizer_round_trips_and_keeps_specials_apart():
    tok = ByteTokenizer()
    ids = tok.encode("héllo\n")
    assert ids.min() >= 2 and ids.max() < 258 and tok.vocab_size == 258
    assert tok.decode(ids) == "héllo\n"


def test_packing_appends_eos_after_each_document_and_reads_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("ab")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "c"}) + "\n\n" + json.dumps({"text": "de"}) + "\n")
    files = resolve_files(f"{tmp_path / 'a.txt'},{tmp_path / 'b.jsonl'}")
    toks = pack_tokens(files, ByteTokenizer())
    e = ByteTokenizer.eos_id
    assert toks.tolist() == [ord("a") + 2, ord("b") + 2, e, ord("c") + 2, e, ord("d") + 2, ord("e") + 2, e]


def test_bad_jsonl_and_missing_paths_raise_clear_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: not a JSON object with a 'text' field"):
        pack_tokens(resolve_files(str(tmp_path / "bad.jsonl")), ByteTokenizer())
    with pytest.raises(DataError, match="does not exist"):
        resolve_files(str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="matches no files"):
        resolve_files(str(tmp_path / "*.parquet"))
    with pytest.raises(DataError, match="fewer than one global batch"):
        PackedBatches(np.arange(50), seq_len=16, micro_batch=4)


def test_hf_tokenizer_json_is_used_and_a_corrupt_one_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    t.save(str(path))
    tok = make_tokenizer(str(path))
    assert tok.vocab_size == 4 and tok.eos_id == 1
    assert tok.encode("hello world hello").tolist() == [2, 3, 2]
    path.write_text(path.read_text()[:40])
    with pytest.raises(DataError, match="cannot read tokenizer"):
        make_tokenizer(str(path))


def test_order_is_deterministic_and_resumes_exactly_mid_epoch():
    tokens = np.arange(10_000) % 251
    a = PackedBatches(tokens, seq_len=16, micro_batch=4, grad_accum=2, seed=7)
    straight = [next(a) for _ in range(200)]  # crosses epochs: 624 rows / 8 = 78 batches per epoch
    assert a.batches_per_epoch == 78 and a.state.epoch == 2
    b = PackedBatches(tokens, seq_len=16, micro_batch=4, grad_accum=2, seed=7)
    for _ in range(90):
        next(b)
    saved = IteratorState.from_dict(json.loads(json.dumps(b.state.to_dict())))
    c = PackedBatches(tokens, seq_len=16, micro_batch=4, grad_accum=2, seed=7, state=saved)
    resumed = [next(c) for _ in range(110)]
    for x, y in zip(straight[90:], resumed):
        np.testing.assert_array_equal(x, y)
    assert straight[0].shape == (4, 2, 17)
    # rows are windows of the stream, targets shifted by one
    row = straight[0][0, 0]
    assert np.all(np.diff(row.astype(np.int64)) % 251 == 1)  # 17 consecutive tokens of the stream
    other = PackedBatches(tokens, seq_len=16, micro_batch=4, grad_accum=2, seed=8)
    assert not np.array_equal(next(other), straight[0])


def test_each_host_reads_its_own_slice_of_every_global_batch():
    tokens = np.arange(5_000)
    whole = PackedBatches(tokens, seq_len=8, micro_batch=6, grad_accum=1, seed=0)
    hosts = [PackedBatches(tokens, seq_len=8, micro_batch=6, grad_accum=1, seed=0, host_index=h, host_count=3)
             for h in range(3)]
    for _ in range(5):
        full = next(whole)
        parts = [next(h) for h in hosts]
        np.testing.assert_array_equal(np.concatenate(parts, axis=0), full)
    with pytest.raises(DataError, match="does not divide over 4 hosts"):
        PackedBatches(tokens, seq_len=8, micro_batch=6, host_count=4)


def test_cache_dir_memory_maps_the_packed_stream(tmp_path):
    (tmp_path / "a.txt").write_text("some text " * 100)
    files = resolve_files(str(tmp_path / "a.txt"))
    first = pack_tokens(files, ByteTokenizer(), str(tmp_path / "cache"))
    again = pack_tokens(files, ByteTokenizer(), str(tmp_path / "cache"))
    assert isinstance(again, np.memmap) and np.array_equal(first, again)


def test_default_corpus_is_the_standard_library():
    files = stdlib_files()
    assert len(files) > 100 and all(f.endswith(".py") for f in files) and files == sorted(files)


# --------------------------------------------------------------------------------------------------
# ArrayRecord shards and grain

DOCS = [f"document {i}: " + "abc" * (i % 7) for i in range(300)]


@pytest.fixture
def shards(tmp_path):
    """Two ArrayRecord shards in a directory: JSON records with a text field and plain UTF-8 records."""
    d = tmp_path / "shards"
    d.mkdir()
    write_array_record(str(d / "part-00000.array_record"), [json.dumps({"text": t, "id": i}) for i, t in
                                                            enumerate(DOCS[:150])])
    write_array_record(str(d / "part-00001.array_record"), DOCS[150:], group_size=16)
    return d


def test_array_record_shards_pack_like_the_same_documents_as_jsonl(tmp_path, shards):
    (tmp_path / "same.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    files = resolve_files(str(shards))
    assert [f.rsplit("/", 1)[1] for f in files] == ["part-00000.array_record", "part-00001.array_record"]
    got = pack_tokens(files, ByteTokenizer())
    want = pack_tokens(resolve_files(str(tmp_path / "same.jsonl")), ByteTokenizer())
    np.testing.assert_array_equal(got, want)
    assert ByteTokenizer().decode(got[:12]) == "document 0: "


def test_grain_batches_equal_the_plain_path_resume_mid_epoch_and_split_over_hosts(shards):
    tokens = pack_tokens(resolve_files(str(shards)), ByteTokenizer())
    kw = dict(seq_len=16, micro_batch=4, grad_accum=2, seed=3)
    plain = PackedBatches(tokens, **kw)
    grained = GrainBatches(PackedBatches(tokens, **kw), num_threads=3, prefetch=5)
    n = 2 * plain.batches_per_epoch + 7  # crosses two epoch boundaries
    straight = [next(grained) for _ in range(n)]
    for got in straight:
        np.testing.assert_array_equal(got, next(plain))  # same rows, same order as PackedBatches
    assert grained.state == plain.state == IteratorState(2, 7)

    # resume mid-epoch from the JSON state: the rest equals the uninterrupted run
    first = GrainBatches(PackedBatches(tokens, **kw))
    for _ in range(plain.batches_per_epoch + 3):
        next(first)
    saved = IteratorState.from_dict(json.loads(json.dumps(first.state.to_dict())))
    resumed = GrainBatches(PackedBatches(tokens, **kw, state=saved))
    for want in straight[plain.batches_per_epoch + 3:]:
        np.testing.assert_array_equal(next(resumed), want)
    later = GrainBatches(PackedBatches(tokens, **kw))  # resume by setting the state (as train() does)
    later.state = saved
    np.testing.assert_array_equal(next(later), straight[plain.batches_per_epoch + 3])

    # two hosts: disjoint rows whose union, in host order, is the global batch
    hosts = [GrainBatches(PackedBatches(tokens, **kw, host_index=h, host_count=2)) for h in range(2)]
    for want in straight[:5]:
        parts = [next(h) for h in hosts]
        assert parts[0].shape == (2, 2, 17)
        np.testing.assert_array_equal(np.concatenate(parts, axis=0), want)
    rows = [set(map(int, h.batches.rows(0, 1).ravel())) for h in hosts]
    assert rows[0] and rows[1] and not rows[0] & rows[1]


def test_bad_array_record_input_raises_clear_errors(tmp_path):
    write_array_record(str(tmp_path / "bad.array_record"), [b"fine", b"\xff\xfe not utf-8"])
    with pytest.raises(DataError, match=r"bad.array_record: record 1 is neither UTF-8 text nor a JSON object"):
        pack_tokens(resolve_files(str(tmp_path / "bad.array_record")), ByteTokenizer())
    (tmp_path / "junk.array_record").write_bytes(b"not an array record file")
    with pytest.raises(DataError, match="cannot read ArrayRecord file"):
        pack_tokens(resolve_files(str(tmp_path / "junk.array_record")), ByteTokenizer())
    with pytest.raises(DataError, match="num_threads >= 1"):
        GrainBatches(PackedBatches(np.arange(1000), seq_len=8, micro_batch=2), num_threads=0)
