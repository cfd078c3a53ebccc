"""Training data: documents -> token ids -> one packed token stream -> fixed-length rows -> batches.

Documents come from the embedded default corpus (this machine's Python standard library `.py`
sources: no download), from text / JSONL files (JSONL: one JSON object per line, its "text" field)
or from ArrayRecord shards (`.array_record`; each record UTF-8 text or a JSON object with a "text"
field), read through grain (`grain.sources.ArrayRecordDataSource` in a `grain.MapDataset`).
Tokenisers: `ByteTokenizer` (UTF-8 bytes, ids 2..257 after the model's bos=0/eos=1) or a `tokenizers`
`tokenizer.json`. Every document is followed by eos and all are concatenated (architecture.md §8.5 packing; the
training step finds the documents again by their eos and masks between them) and cut into rows of seq_len + 1
tokens (inputs = row[:-1], targets = row[1:]); consecutive rows share one boundary token.

Order: row order is a permutation drawn from (seed, epoch), so it is deterministic and the iterator
state is two integers (epoch, batch in the epoch): saved in every checkpoint, resumed exactly
mid-epoch. Multi-host: every host sees the same permutation and reads only its own rows of each
global batch (with `cache_dir` the packed stream is a memory-mapped file, so a host touches only
the rows it reads). `GrainBatches` serves the same batches, in the same order and with the same
(epoch, batch) state, from a `grain.MapDataset` of this host's batches read ahead by grain threads.

V4.1 models with Engram layers (architecture.md §12.10) also take each row's Engram table rows:
`EngramRows` hashes the rows' inputs on the host (`v4jax.model.engram_hash`, like tokenisation) with the
tokenizer's compressed token map (`engram_token_map`).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sysconfig
import threading
from typing import Iterable, Iterator

import numpy as np

N_SPECIAL = 2  # ByteTokenizer: 0 = bos, 1 = eos, bytes are 2..257


class DataError(ValueError):
    """Unusable data settings: a missing path, an unreadable tokenizer, too little data."""


# --------------------------------------------------------------------------------------------------
# Tokenisers

class ByteTokenizer:
    """UTF-8 bytes shifted past the specials; vocabulary 258."""

    name = "byte"
    bos_id, eos_id = 0, 1
    vocab_size = 256 + N_SPECIAL

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="replace"), np.uint8).astype(np.int32) + N_SPECIAL

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) - N_SPECIAL for i in ids if int(i) >= N_SPECIAL).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers` tokenizer.json; eos is the first of its known end-of-text tokens present."""

    EOS_NAMES = ("<｜end▁of▁sentence｜>", "</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>")

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
            self._tok = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises its own exception type for bad JSON
            raise DataError(f"cannot read tokenizer {path!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        self.name = f"tokenizers:{os.path.abspath(path)}"
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        ids = [self._tok.token_to_id(t) for t in self.EOS_NAMES]
        self.eos_id = next((i for i in ids if i is not None), None)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


class _ByteBackend:
    """ByteTokenizer seen as a `tokenizers` backend (what `engram_hash.token_map_from_tokenizer` reads):
    a byte decodes to its character when it is one alone (ASCII), else to U+FFFD (then keyed by its
    token name, as the release keys its partial UTF-8 tokens); bos / eos to their names."""

    SPECIALS = ("<bos>", "<eos>")

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return ByteTokenizer.vocab_size

    def id_to_token(self, i: int) -> str:
        return self.SPECIALS[i] if i < N_SPECIAL else f"<0x{i - N_SPECIAL:02X}>"

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(self.id_to_token(i) if i < N_SPECIAL else ByteTokenizer().decode([i]) for i in ids)


def engram_token_map(tokenizer, vocab_size: int) -> np.ndarray:
    """The Engram compressed token map [vocab_size] of a training tokenizer (architecture.md §12.4: the
    release's normaliser over each id decoded alone); ids past the tokenizer's get ids of their own."""
    from v4jax.model.engram_hash import token_map_from_tokenizer

    backend = _ByteBackend() if isinstance(tokenizer, ByteTokenizer) else tokenizer._tok
    known = token_map_from_tokenizer(backend, tokenizer.vocab_size)
    extra = np.arange(vocab_size - len(known), dtype=np.int64) + (int(known.max()) + 1 if len(known) else 0)
    return np.concatenate([known, extra])


def engram_pad(cfg, token_map: np.ndarray) -> int:
    """The compressed pad id; a DataError naming model.engram_compressed_vocab_size when the map does not
    fit the config (its multipliers derive from that size)."""
    from v4jax.model.engram_hash import pad_compressed_id

    try:
        return pad_compressed_id(cfg, token_map)
    except ValueError as e:
        n = np.unique(token_map).size
        raise DataError(f"model.engram_compressed_vocab_size={cfg.engram_compressed_vocab_size} does not fit the "
                        f"tokenizer's Engram token map ({n} compressed ids; set model.engram_compressed_vocab_size={n}): "
                        f"{e}") from None


def make_tokenizer(spec: str):
    if spec == "byte":
        return ByteTokenizer()
    if not os.path.isfile(spec):
        raise DataError(f"tokenizer file {spec!r} does not exist (use 'byte' or a tokenizer.json path)")
    return HFTokenizer(spec)


# --------------------------------------------------------------------------------------------------
# Documents

def stdlib_files() -> list[str]:
    """The embedded default corpus: this Python's standard library sources, sorted."""
    root = sysconfig.get_paths()["stdlib"]
    files = glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
    return sorted(f for f in files if "site-packages" not in f and "dist-packages" not in f)


def resolve_files(data: str) -> list[str]:
    """'stdlib' or a comma-separated list of files, directories (all .txt/.md/.py/.jsonl/.array_record in
    them) and globs."""
    if data == "stdlib":
        return stdlib_files()
    files: list[str] = []
    for item in filter(None, (s.strip() for s in data.split(","))):
        if os.path.isdir(item):
            found = [f for ext in ("txt", "md", "py", "jsonl", "json", "array_record")
                     for f in glob.glob(os.path.join(item, "**", f"*.{ext}"), recursive=True)]
        elif any(c in item for c in "*?["):
            found = glob.glob(item, recursive=True)
        elif os.path.isfile(item):
            found = [item]
        else:
            raise DataError(f"data path {item!r} does not exist")
        if not found:
            raise DataError(f"data path {item!r} matches no files")
        files += sorted(found)
    return files


def documents(files: list[str]) -> Iterator[str]:
    for path in files:
        if path.endswith(".array_record"):
            yield from array_record_documents(path)
        elif path.endswith((".jsonl", ".json")):
            yield from jsonl_documents(path)
        else:
            yield text_document(path)


def jsonl_documents(path: str) -> Iterator[str]:
    """The "text" field of every non-blank line; DataError naming path:line for anything else."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{n}: not UTF-8 text (binary data in a JSONL file?)") from None
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg}); each line must be an object with a "
                                f"'text' field") from None
            if not isinstance(doc, dict) or "text" not in doc:
                raise DataError(f"{path}:{n}: not a JSON object with a 'text' field")
            if not isinstance(doc["text"], str):
                raise DataError(f"{path}:{n}: 'text' is {type(doc['text']).__name__}, not a string")
            yield doc["text"]


# Binary data given as text (an image, an archive, a model file) is recognised by control bytes that
# text never holds: NUL, or more than this share of C0 controls other than \t \n \v \f \r and ESC. (Not
# by invalid UTF-8: a legitimate KOI8-R or Latin-1 text file is full of it, the stdlib corpus has one.)
MAX_CONTROL_BYTES = 0.01
_CONTROL = bytes([*range(0, 9), *range(14, 27), *range(28, 32)])


def text_document(path: str) -> str:
    with open(path, "rb") as f:
        raw = f.read()
    controls = len(raw) - len(raw.translate(None, _CONTROL))
    if b"\0" in raw or controls > MAX_CONTROL_BYTES * len(raw):
        raise DataError(f"{path}: binary data, not text ({controls} of {len(raw)} bytes are control characters); "
                        f"remove it from data")
    return raw.decode("utf-8", errors="replace")


def array_record_documents(path: str) -> Iterator[str]:
    """The records of one ArrayRecord file, in order, read through grain: each is a JSON object with
    a "text" field (a JSON line) or else UTF-8 text."""
    import grain
    try:
        source = grain.sources.ArrayRecordDataSource([path])
    except Exception as e:  # array_record raises its own errors for a file it cannot open
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"cannot read ArrayRecord file {path!r}: {reason}") from None
    dataset = grain.MapDataset.source(source).map(record_text)
    for i in range(len(dataset)):
        try:
            yield dataset[i]
        except UnicodeDecodeError:
            raise DataError(f"{path}: record {i} is neither UTF-8 text nor a JSON object with a 'text' field") from None


def record_text(record: bytes) -> str:
    """One record's document: the "text" field of a JSON object, or the record as UTF-8 text."""
    text = record.decode("utf-8")
    if text.lstrip().startswith("{"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            return text
        if isinstance(doc, dict) and isinstance(doc.get("text"), str):
            return doc["text"]
    return text


def write_array_record(path: str, records: Iterable[str | bytes], group_size: int = 1) -> None:
    """Write records (str as UTF-8) to an ArrayRecord file (tests, corpus conversion)."""
    from array_record.python.array_record_module import ArrayRecordWriter
    writer = ArrayRecordWriter(path, f"group_size:{group_size}")
    try:
        for r in records:
            writer.write(r.encode("utf-8") if isinstance(r, str) else r)
    finally:
        writer.close()


def pack_tokens(files: list[str], tokenizer, cache_dir: str | None = None) -> np.ndarray:
    """All documents tokenised, each followed by eos, concatenated: a 1-D uint16/uint32 array.

    With cache_dir the stream is written once to `cache_dir/tokens-<hash>.npy` (hash of the file
    list, sizes, mtimes and tokenizer) and memory-mapped afterwards."""
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    path = None
    if cache_dir:
        h = hashlib.sha256(tokenizer.name.encode())
        for f in files:
            st = os.stat(f)
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        path = os.path.join(cache_dir, f"tokens-{h.hexdigest()[:16]}.npy")
        if os.path.exists(path):
            return np.load(path, mmap_mode="r")
    eos = tokenizer.eos_id
    parts = []
    for doc in documents(files):
        ids = tokenizer.encode(doc)
        parts.append(ids.astype(dtype))
        if eos is not None:
            parts.append(np.asarray([eos], dtype))
    tokens = np.concatenate(parts) if parts else np.zeros((0,), dtype)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp.npy"
        np.save(tmp, tokens)
        os.replace(tmp, path)  # atomic: concurrent hosts never see half a file
    return tokens


# --------------------------------------------------------------------------------------------------
# Batches

@dataclasses.dataclass
class IteratorState:
    epoch: int = 0
    batch: int = 0  # next batch within the epoch

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "IteratorState":
        return cls(int(d["epoch"]), int(d["batch"]))


class PackedBatches:
    """Batches of packed rows [micro_batch / host_count, grad_accum, seq_len + 1] for this host.

    Global batch g of an epoch holds rows perm[g*A*B : (g+1)*A*B] (A = grad_accum, B = micro_batch),
    micro-step a the next B of them, and host h the h-th 1/host_count slice of each micro-batch."""

    def __init__(self, tokens: np.ndarray, seq_len: int, micro_batch: int, grad_accum: int = 1, seed: int = 0,
                 host_index: int = 0, host_count: int = 1, state: IteratorState | None = None):
        if micro_batch % host_count:
            raise DataError(f"batch_size {micro_batch} does not divide over {host_count} hosts")
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.host_index, self.host_count = host_index, host_count
        self.n_rows = (len(tokens) - 1) // seq_len
        per_batch = micro_batch * grad_accum
        self.batches_per_epoch = self.n_rows // per_batch
        if self.batches_per_epoch < 1:
            raise DataError(f"the data holds {len(tokens)} tokens = {self.n_rows} rows of {seq_len + 1}, fewer than "
                            f"one global batch of {per_batch} rows")
        self.state = state or IteratorState()
        self._perms: dict[int, np.ndarray] = {}  # the last two epochs' permutations
        self._lock = threading.Lock()  # grain's reader threads share this object

    def _permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            if epoch not in self._perms:
                if len(self._perms) >= 2:
                    del self._perms[min(self._perms)]
                self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)
            return self._perms[epoch]

    def rows(self, epoch: int, batch: int) -> np.ndarray:
        """Row ids [A, B_local] of this host for global batch `batch` of `epoch`."""
        A, B = self.grad_accum, self.micro_batch
        ids = self._permutation(epoch)[batch * A * B:(batch + 1) * A * B].reshape(A, B)
        local = B // self.host_count
        return ids[:, self.host_index * local:(self.host_index + 1) * local]

    def __iter__(self):
        return self

    def batch(self, epoch: int, batch: int) -> np.ndarray:
        """This host's rows of global batch `batch` of `epoch`: [B_local, A, T+1] int32 (batch first, as sharded)."""
        starts = self.rows(epoch, batch).astype(np.int64) * self.seq_len
        out = np.stack([np.stack([np.asarray(self.tokens[s:s + self.seq_len + 1]) for s in row]) for row in starts])
        return np.swapaxes(out, 0, 1).astype(np.int32)

    def __next__(self) -> np.ndarray:
        out = self.batch(self.state.epoch, self.state.batch)
        self.state = (IteratorState(self.state.epoch, self.state.batch + 1)
                      if self.state.batch + 1 < self.batches_per_epoch else IteratorState(self.state.epoch + 1, 0))
        return out


class GrainBatches:
    """`PackedBatches` served through grain: a `grain.MapDataset` whose item g is this host's part of
    global batch g (epoch g // batches_per_epoch), iterated with `num_threads` grain threads reading
    up to `prefetch` batches ahead. Same rows, order, host slices and (epoch, batch) state as
    `PackedBatches`; setting `state` (resume) restarts the read-ahead there."""

    def __init__(self, batches: PackedBatches, num_threads: int = 2, prefetch: int = 4):
        import grain
        if num_threads < 1 or prefetch < 1:
            raise DataError(f"grain needs num_threads >= 1 and prefetch >= 1, got {num_threads}, {prefetch}")
        self.batches = batches
        self.n_rows, self.batches_per_epoch = batches.n_rows, batches.batches_per_epoch
        per_epoch = batches.batches_per_epoch
        self.dataset = grain.MapDataset.range(2 ** 62).map(lambda g: batches.batch(g // per_epoch, g % per_epoch))
        self._options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
        self._start(batches.state)

    def _start(self, state: IteratorState):
        self._iter = iter(self.dataset.to_iter_dataset(self._options))
        self._iter.set_state({"next_index": state.epoch * self.batches_per_epoch + state.batch})
        self._state = state

    @property
    def state(self) -> IteratorState:
        return self._state

    @state.setter
    def state(self, state: IteratorState):
        self._start(state)

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        out = next(self._iter)
        e, b = self._state.epoch, self._state.batch
        self._state = IteratorState(e, b + 1) if b + 1 < self.batches_per_epoch else IteratorState(e + 1, 0)
        return out


class EngramRows:
    """Batches (`PackedBatches` or `GrainBatches`) with the Engram table rows of their inputs:
    {"tokens": [B, A, T+1], "engram": [B, A, T, n_engram_layers, cols]} (int32), each row hashed as a
    sequence from its first token (the model sees each row from position 0; no image spans). Same
    order and (epoch, batch) state as the batches it wraps."""

    def __init__(self, batches, cfg, token_map: np.ndarray):
        from v4jax.model.engram_hash import engram_layout

        self.batches, self.token_map = batches, np.asarray(token_map, np.int64)
        self.layout, self.pad = engram_layout(cfg), engram_pad(cfg, self.token_map)
        self.n_rows, self.batches_per_epoch = batches.n_rows, batches.batches_per_epoch

    @property
    def state(self) -> IteratorState:
        return self.batches.state

    @state.setter
    def state(self, state: IteratorState):
        self.batches.state = state

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        from v4jax.model.engram_hash import compressed_ids, ngram_hash_ids

        tokens = next(self.batches)  # [B, A, T+1]
        B, A, T1 = tokens.shape
        ids = compressed_ids(tokens[..., :-1].reshape(B * A, T1 - 1), self.token_map)  # [B*A, T]
        rows = np.stack([ngram_hash_ids(ids, None, self.layout, i, self.pad)
                         for i in range(len(self.layout.layer_ids))], axis=2)  # [B*A, T, n_layers, cols]
        return {"tokens": tokens, "engram": rows.reshape(B, A, T1 - 1, *rows.shape[2:]).astype(np.int32)}
