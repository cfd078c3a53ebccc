"""The official DeepSeek-V4 release layout: which tensor is FP8 / FP4 / BF16 / FP32 (architecture.md §9),
a streaming reader that yields de-quantised tensors, and a streaming writer of that layout.

Names. The release stores every tensor under its official name, which is our canonical name
(`layers.3.attn.wq_a.weight`, `layers.3.attn.kv_norm.weight`, `layers.3.ffn.experts.7.w1.weight`,
`mtp.0.e_proj.weight`); an FP8 or FP4 weight `X.weight` comes with its UE8M0 scales `X.scale`
(`X.weight_scale_inv` in the layout DeepSeek's convert.py reads is taken too). The other spellings
(save_pretrained, transformers module names with fused experts) are read through the one name table
of `v4jax.io.checkpoint` (`canonical_name` / `transformers_name`, re-exported here as `official_name` /
`hf_name`; `open_checkpoint_files` splits fused experts).

Storage formats (release, architecture.md §9):

| format | tensors | on disk |
|---|---|---|
| FP8 | attention `wq_a wq_b wkv wo_a wo_b`, indexer `wq_b`, shared experts `w1 w2 w3`, MTP `e_proj h_proj` | F8_E4M3 `[out, in]` + F8_E8M0 `.scale [ceil(out/128), ceil(in/128)]` |
| FP4 | routed experts `ffn.experts.{e}.w1/w2/w3` | I8 `[out, in/2]` (low nibble first) + F8_E8M0 `.scale [out, ceil(in/32)]` |
| BF16 | embed, head, every norm weight, compressor `wkv wgate`, indexer `weights_proj`, `ffn.gate.weight` | BF16 |
| FP32 | `attn.attn_sink`, compressor `ape`, every `hc_*`, `ffn.gate.bias` | F32 |
| INT | `ffn.gate.tid2eid` | an integer dtype (kept as found) |

The reader also takes unquantised checkpoints (a float tensor without `.scale` where the release has
FP8/FP4, e.g. a transformers BF16 save) and FP8-stored routed experts (see `quant.fp4_to_fp8`).
Memory: one tensor at a time (files are memory-mapped; de-quantisation runs in row blocks); the writer
streams each tensor to a temporary data file, so it never holds more than one tensor either.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
import struct
import weakref
import zlib
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

from v4jax.io import quant
from v4jax.io.checkpoint import canonical_name as official_name
from v4jax.io.checkpoint import open_checkpoint_files
from v4jax.io.checkpoint import transformers_name as hf_name
from v4jax.io.tensorfile import DTYPES, TensorFile, TensorFileError

__all__ = ["Format", "ReleaseError", "ReleaseTensor", "release_format", "scale_name", "official_name",
           "hf_name", "scan_release", "read_tensor", "read_release", "requant_mismatches",
           "read_stored", "ShardedWriter", "write_release", "write_hf", "checksum", "RELEASE_QUANTIZATION_CONFIG"]


class ReleaseError(ValueError):
    """A release directory that cannot be read: missing / orphan scale, wrong dtype or shape, unknown name."""


class Format(enum.Enum):
    FP8 = "fp8"
    FP4 = "fp4"
    BF16 = "bf16"
    FP32 = "fp32"
    INT = "int"


_L = r"(?:layers|mtp)\.\d+\."
_FORMAT_TABLE: list[tuple[re.Pattern, Format]] = [(re.compile(p), f) for p, f in [
    (_L + r"ffn\.experts\.\d+\.w[123]\.weight", Format.FP4),
    (_L + r"attn\.(?:wq_a|wq_b|wkv|wo_a|wo_b)\.weight", Format.FP8),
    (_L + r"attn\.indexer\.wq_b\.weight", Format.FP8),
    (_L + r"ffn\.shared_experts\.w[123]\.weight", Format.FP8),
    (r"mtp\.\d+\.(?:e_proj|h_proj)\.weight", Format.FP8),
    (r"(?:embed|head|norm)\.weight", Format.BF16),
    (_L + r"(?:attn_norm|ffn_norm|enorm|hnorm|norm)\.weight", Format.BF16),
    (_L + r"attn\.(?:q_norm|norm|kv_norm)\.weight", Format.BF16),
    (_L + r"attn\.(?:indexer\.)?compressor\.(?:wkv|wgate|norm)\.weight", Format.BF16),
    (_L + r"attn\.indexer\.weights_proj\.weight", Format.BF16),
    (_L + r"ffn\.gate\.weight", Format.BF16),
    (_L + r"attn\.attn_sink", Format.FP32),
    (_L + r"attn\.(?:indexer\.)?compressor\.ape", Format.FP32),
    (r"(?:mtp\.\d+\.)?hc_head_(?:fn|base|scale)", Format.FP32),
    (_L + r"hc_(?:attn|ffn)_(?:fn|base|scale)", Format.FP32),
    (_L + r"ffn\.gate\.bias", Format.FP32),
    (_L + r"ffn\.gate\.tid2eid", Format.INT),
]]

# config.json entries of the release describing this layout (architecture.md §1.1)
RELEASE_QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                               "scale_fmt": "ue8m0", "weight_block_size": [quant.FP8_BLOCK, quant.FP8_BLOCK]}


def release_format(name: str) -> Format:
    """Storage format of a canonical tensor name in the official release (ReleaseError if unknown)."""
    for pattern, fmt in _FORMAT_TABLE:
        if pattern.fullmatch(name):
            return fmt
    raise ReleaseError(f"tensor {name!r} is not part of the DeepSeek-V4 release layout")


def scale_name(weight_name: str) -> str:
    """`layers.3.attn.wq_a.weight` -> `layers.3.attn.wq_a.scale` (the release's scale tensor name)."""
    if not weight_name.endswith(".weight"):
        raise ReleaseError(f"tensor {weight_name!r} is not a weight; only `.weight` tensors have scales")
    return weight_name[: -len(".weight")] + ".scale"


def checksum(a: np.ndarray) -> int:
    """CRC-32 of an array's bytes (C order) - the converter's per-tensor integrity check."""
    return zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)


# --------------------------------------------------------------------------------------------------
# Reader

@dataclasses.dataclass(frozen=True)
class ReleaseTensor:
    """One logical tensor of a release directory (a weight and, when quantised, its scales)."""

    name: str  # canonical name
    key: str  # on-disk key
    file: TensorFile
    format: Format  # the release's format for this name
    stored: Format  # what the directory holds: FP8 / FP4 (with scales) or the dtype's class
    shape: tuple[int, ...]  # logical (de-quantised) shape
    stored_dtype: np.dtype
    scale_key: str | None = None
    scale_file: TensorFile | None = None

    @property
    def nbytes_stored(self) -> int:
        n = int(np.prod(self.file.shape(self.key), dtype=np.int64)) * self.stored_dtype.itemsize
        if self.scale_key is not None:
            n += int(np.prod(self.scale_file.shape(self.scale_key), dtype=np.int64))
        return n


def _dtype_class(dt: np.dtype) -> Format | None:
    if dt == quant.FP8_DTYPE:
        return Format.FP8
    if dt in (np.dtype(np.int8), np.dtype(np.uint8)):
        return Format.FP4  # only meaningful with a scale; checked by the caller
    if np.issubdtype(dt, np.integer):
        return Format.INT
    if dt in (np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)):
        return Format.BF16
    if dt in (np.dtype(np.float32), np.dtype(np.float64)):
        return Format.FP32
    return None


def scan_release(directory: str | os.PathLike) -> list[ReleaseTensor]:
    """Index and validate a release-layout directory (official or transformers spelling) without
    reading tensor data: every name known, every quantised weight paired with a scale of the right
    dtype and shape, no orphan scale, integer tensors integer. Returns tensors in file order."""
    directory = os.fspath(directory)
    try:
        found = open_checkpoint_files(directory)
    except (TensorFileError, OSError) as e:
        raise ReleaseError(f"{directory}: {e}") from None
    by_name: dict[str, tuple[str, TensorFile]] = {}
    scales: dict[str, tuple[str, TensorFile]] = {}
    for key, tf in found.items():
        name = official_name(key)  # canonical first: module names have `.scale`s that are not scales
        if name.endswith((".scale", ".weight_scale_inv")):  # the latter: the Hub layout convert.py reads
            name = official_name(key.removesuffix(".weight_scale_inv").removesuffix(".scale") + ".weight")
            table = scales
        else:
            table = by_name
        if name in table:
            raise ReleaseError(f"{directory}: tensor {key!r} is stored twice (also as {table[name][0]!r})")
        table[name] = (key, tf)
    for name, (key, _) in scales.items():
        if name not in by_name:
            raise ReleaseError(f"{directory}: scale tensor {key!r} has no weight {name!r}")
    order = {p: i for i, p in enumerate(sorted({tf.path for tf in found.values()}))}
    entries = []
    for name, (key, tf) in by_name.items():
        try:
            fmt = release_format(name)
        except ReleaseError:
            raise ReleaseError(f"{directory}: unexpected tensor {key!r}: not part of the DeepSeek-V4 release "
                               "layout (does config.json match the checkpoint?)") from None
        dt, shape = tf.dtype(key), tuple(tf.shape(key))
        cls = _dtype_class(dt)
        sk, sf = scales.get(name, (None, None))
        where = f"{directory}: tensor {key!r}"
        if fmt is Format.INT:
            if cls is not Format.INT or sk is not None:
                raise ReleaseError(f"{where} has dtype {dt}, expected an integer dtype (expert ids)")
            stored = Format.INT
        elif sk is None:
            if cls in (Format.FP8, Format.FP4):
                raise ReleaseError(f"{where} is quantised ({dt}) but its scale tensor "
                                   f"{scale_name(key)!r} is missing")
            if cls not in (Format.BF16, Format.FP32):
                raise ReleaseError(f"{where} has dtype {dt}, expected a floating-point dtype")
            stored = cls
        else:
            if cls not in (Format.FP8, Format.FP4):
                raise ReleaseError(f"{where} has dtype {dt} but comes with scales {sk!r}; expected "
                                   f"float8_e4m3fn (FP8) or int8 (packed FP4)")
            if fmt not in (Format.FP8, Format.FP4) or (cls is Format.FP4 and fmt is not Format.FP4):
                raise ReleaseError(f"{where} is stored as {cls.value.upper()} ({dt}) but the release stores "
                                   f"{name!r} as {fmt.value.upper()}")
            sdt = sf.dtype(sk)
            if sdt not in (quant.UE8M0_DTYPE, np.dtype(np.uint8)):
                raise ReleaseError(f"{directory}: scale tensor {sk!r} has dtype {sdt}, expected F8_E8M0 (UE8M0)")
            if len(shape) != 2:
                raise ReleaseError(f"{where} is quantised but has shape {shape}, expected 2-D")
            if cls is Format.FP4:
                shape = (shape[0], 2 * shape[1])
                want = (shape[0], -(-shape[1] // quant.FP4_BLOCK))
            else:
                want = tuple(-(-n // quant.FP8_BLOCK) for n in shape)
            if tuple(sf.shape(sk)) != want:
                raise ReleaseError(f"{directory}: scale tensor {sk!r} has shape {tuple(sf.shape(sk))}, "
                                   f"expected {want} for {cls.value.upper()} weight {key!r} of logical shape {shape}")
            stored = cls
        entries.append(ReleaseTensor(name, key, tf, fmt, stored, shape, dt, sk, sf))
    pos = {(tf.path, k): i for tf in {id(t): t for t in found.values()}.values() for i, k in enumerate(tf.keys())}
    entries.sort(key=lambda e: (order[e.file.path], pos[(e.file.path, e.key)]))
    return entries


def output_dtype(entry_format: Format, stored_dtype: np.dtype, dtype) -> np.dtype:
    """dtype a tensor is de-quantised to: `dtype` for FP8 / FP4 / BF16-class tensors, float32 for the
    FP32 class (never narrowed: the release keeps them in FP32), integers unchanged."""
    dtype = np.dtype(dtype)
    if entry_format is Format.INT:
        return stored_dtype
    if entry_format is Format.FP32:
        return np.dtype(np.float32)
    return dtype


_DATA_START: "weakref.WeakKeyDictionary[TensorFile, tuple[int, dict]]" = weakref.WeakKeyDictionary()


def read_stored_rows(tf: TensorFile, key: str, lo: int, hi: int) -> np.ndarray:
    """Rows [lo, hi) of a stored tensor (along its first axis), read alone with a plain file read (as
    `read_stored`): a tensor too large to hold whole (V4.1's Engram tables: 384e6 rows) read in pieces."""
    if tf not in _DATA_START:
        with open(tf.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            _DATA_START[tf] = (8 + n, json.loads(f.read(n)))
    start, header = _DATA_START[tf]
    shape, dt = tf.shape(key), tf.dtype(key)
    row = int(np.prod(shape[1:], dtype=np.int64)) * dt.itemsize
    lo, hi = max(0, lo), min(hi, shape[0])
    count = max(0, hi - lo) * row
    a = np.fromfile(tf.path, dtype=np.uint8, count=count, offset=start + header[key]["data_offsets"][0] + lo * row)
    if a.size != count:
        raise ReleaseError(f"{tf.path}: tensor {key!r} is truncated")
    return a.view(dt).reshape((max(0, hi - lo),) + tuple(shape[1:]))


def read_stored(tf: TensorFile, key: str) -> np.ndarray:
    """One tensor read into fresh memory with a plain file read. Reading through the TensorFile's
    memory map would leave every touched page of the file resident (and counted in RSS) for as long
    as the file stays open; a copy is freed with the tensor, which keeps the reader's memory at one
    tensor however large the checkpoint."""
    if hasattr(tf, "read_copy"):  # a part of a fused expert tensor (checkpoint.FusedExperts)
        return tf.read_copy(key)
    if tf not in _DATA_START:  # the header was validated by TensorFile; only offsets needed here
        with open(tf.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            _DATA_START[tf] = (8 + n, json.loads(f.read(n)))
    start, header = _DATA_START[tf]
    begin, end = header[key]["data_offsets"]
    dt = tf.dtype(key)
    a = np.fromfile(tf.path, dtype=np.uint8, count=end - begin, offset=start + begin)
    if a.size != end - begin:
        raise ReleaseError(f"{tf.path}: tensor {key!r} is truncated")
    return a.view(dt).reshape(tf.shape(key))


def read_tensor(entry: ReleaseTensor, dtype=ml_dtypes.bfloat16) -> np.ndarray:
    """The de-quantised tensor of one entry (see `output_dtype`)."""
    out = output_dtype(entry.format, entry.stored_dtype, dtype)
    w = read_stored(entry.file, entry.key)
    if entry.stored in (Format.FP8, Format.FP4):
        s = read_stored(entry.scale_file, entry.scale_key)
        kind = "fp8" if entry.stored is Format.FP8 else "fp4"
        bad = quant.count_nonfinite_codes(w, s, kind)
        if bad:
            raise ReleaseError(f"{entry.file.path}: tensor {entry.key!r} holds {bad} NaN codes or NaN scales")
        if entry.stored is Format.FP8:
            return quant.dequant_fp8_block(w, s, quant.FP8_BLOCK, out)
        return quant.dequant_fp4(w, s, quant.FP4_BLOCK, out)
    return w.astype(out, copy=False)


def read_release(directory: str | os.PathLike, dtype=ml_dtypes.bfloat16,
                 entries: list[ReleaseTensor] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (canonical name, de-quantised array) one tensor at a time, in file order."""
    for e in entries if entries is not None else scan_release(directory):
        yield e.name, read_tensor(e, dtype)


def requant_mismatches(entry: ReleaseTensor) -> int:
    """Bytes that differ when this FP8/FP4 tensor is de-quantised and quantised again by
    `v4jax.io.quant` (0: the official -> bf16 -> official round trip reproduces it exactly)."""
    if entry.stored not in (Format.FP8, Format.FP4):
        return 0
    w, s = entry.file[entry.key], entry.scale_file[entry.scale_key]
    d = read_tensor(entry, np.float32)
    q2, s2 = quant.quant_fp8_block(d) if entry.stored is Format.FP8 else quant.quant_fp4(d)
    return (int(np.count_nonzero(q2.view(np.uint8) != w.view(np.uint8)))
            + int(np.count_nonzero(s2.view(np.uint8) != s.view(np.uint8))))


# --------------------------------------------------------------------------------------------------
# Writer

_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class ShardedWriter:
    """Streams tensors into `model-0000i-of-0000n.safetensors` shards (at most `max_shard_bytes`
    each, a single larger group alone in its shard) plus `model.safetensors.index.json`.

    Each tensor's bytes go straight to a temporary data file; a shard's header is written when the
    shard closes (header then data copied in 64 MiB pieces), so memory stays at one tensor. Header
    entries keep arrival order, so the same tensors in the same order give byte-identical files.
    `written` records (dtype name, shape, crc32) per key for a later verification pass."""

    def __init__(self, directory: str | os.PathLike, max_shard_bytes: int, metadata: dict | None = None):
        self.directory = os.fspath(directory)
        self.max_shard_bytes = int(max_shard_bytes)
        self.metadata = {"format": "pt"} if metadata is None else dict(metadata)
        self.written: dict[str, tuple[str, list[int], int]] = {}
        self._shards: list[str] = []  # temporary shard paths
        self._weight_map: dict[str, int] = {}
        self._data = None
        self._header: dict = {}
        self._size = 0
        self._total = 0

    def add_group(self, tensors: list[tuple[str, np.ndarray]]):
        """Add tensors that must share a shard (a weight and its scales)."""
        n = sum(a.nbytes for _, a in tensors)
        if self._data is not None and self._header and self._size + n > self.max_shard_bytes:
            self._close_shard()
        if self._data is None:
            self._data = open(os.path.join(self.directory, f".shard-{len(self._shards) + 1:05d}.data.tmp"), "wb")
        for key, a in tensors:
            if key in self.written:
                raise ReleaseError(f"tensor {key!r} is written twice")
            a = np.ascontiguousarray(a)
            if a.dtype not in _DTYPE_NAMES:
                raise ReleaseError(f"tensor {key!r}: dtype {a.dtype} cannot be written to safetensors")
            flat = a.reshape(-1).view(np.uint8)
            self._data.write(flat.data)
            self._header[key] = {"dtype": _DTYPE_NAMES[a.dtype], "shape": list(a.shape),
                                 "data_offsets": [self._size, self._size + a.nbytes]}
            self.written[key] = (_DTYPE_NAMES[a.dtype], list(a.shape), zlib.crc32(flat.data))
            self._weight_map[key] = len(self._shards)
            self._size += a.nbytes
            self._total += a.nbytes

    def add(self, key: str, a: np.ndarray):
        self.add_group([(key, a)])

    def _close_shard(self):
        data_path = self._data.name
        self._data.close()
        header = {"__metadata__": self.metadata, **self._header} if self.metadata else dict(self._header)
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        path = os.path.join(self.directory, f".shard-{len(self._shards) + 1:05d}.safetensors.tmp")
        with open(path, "wb") as out, open(data_path, "rb") as src:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            while chunk := src.read(64 << 20):
                out.write(chunk)
        os.remove(data_path)
        self._shards.append(path)
        self._data, self._header, self._size = None, {}, 0

    def close(self) -> list[str]:
        """Finish the last shard, name the shards `-of-N`, write the index; returns file names."""
        if self._data is not None:
            self._close_shard()
        n = len(self._shards)
        names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for tmp, name in zip(self._shards, names):
            os.replace(tmp, os.path.join(self.directory, name))
        index = {"metadata": {"total_size": self._total},
                 "weight_map": {k: names[i] for k, i in self._weight_map.items()}}
        tmp = os.path.join(self.directory, "model.safetensors.index.json.tmp")
        with open(tmp, "w") as f:
            json.dump(index, f, indent=2)
        os.replace(tmp, os.path.join(self.directory, "model.safetensors.index.json"))
        return names + ["model.safetensors.index.json"]

    def abort(self):
        """Remove temporary files after a failure (finished shards of an aborted write included)."""
        if self._data is not None:
            self._data.close()
            os.remove(self._data.name)
            self._data = None
        for p in self._shards:
            if os.path.exists(p):
                os.remove(p)


def _prepare_dir(directory: str, overwrite: bool):
    if os.path.isdir(directory) and os.listdir(directory) and not overwrite:
        raise ReleaseError(f"{directory} is not empty; pass overwrite=True to replace its checkpoint")
    os.makedirs(directory, exist_ok=True)
    for f in os.listdir(directory):
        if f.endswith((".safetensors", ".safetensors.tmp", ".data.tmp")) or f == "model.safetensors.index.json":
            os.remove(os.path.join(directory, f))


def release_tensors(name: str, a: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The on-disk tensors of one canonical tensor in the release layout (quantised where the
    release quantises it)."""
    fmt = release_format(name)
    a = np.asarray(a)
    try:
        if fmt is Format.FP8:
            q, s = quant.quant_fp8_block(a)
            return [(name, q), (scale_name(name), s)]
        if fmt is Format.FP4:
            q, s = quant.quant_fp4(a)
            return [(name, q), (scale_name(name), s)]
    except quant.QuantError as e:
        raise ReleaseError(f"tensor {name!r}: {e}") from None
    if fmt is Format.INT:
        if not np.issubdtype(a.dtype, np.integer):
            raise ReleaseError(f"tensor {name!r} has dtype {a.dtype}, expected integer expert ids")
        return [(name, a)]
    if not np.issubdtype(a.dtype, np.floating) and a.dtype != np.dtype(ml_dtypes.bfloat16):
        raise ReleaseError(f"tensor {name!r} has dtype {a.dtype}, expected a floating-point dtype")
    return [(name, a.astype(ml_dtypes.bfloat16 if fmt is Format.BF16 else np.float32))]


def write_release(directory: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]], *,
                  max_shard_bytes: int = 5 << 30, config: dict | None = None,
                  overwrite: bool = False) -> ShardedWriter:
    """Quantise and write canonical-name tensors in the official layout (FP8 / FP4 + `.scale`,
    BF16, FP32 as in the release; a weight and its scales share a shard), streaming one tensor at
    a time. `config`: a config.json dict to write alongside, with the release's quantisation entries."""
    return _write(os.fspath(directory), ((n, release_tensors(n, a)) for n, a in tensors), max_shard_bytes,
                  None if config is None else {**config, "quantization_config": RELEASE_QUANTIZATION_CONFIG,
                                               "expert_dtype": "fp4"}, overwrite)


def write_hf(directory: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]], *,
             max_shard_bytes: int = 5 << 30, config: dict | None = None, overwrite: bool = False) -> ShardedWriter:
    """Write canonical-name tensors unquantised, in their dtypes, under transformers' spelling."""
    def groups():
        for n, a in tensors:
            release_format(n)  # reject names outside the layout
            yield n, [(hf_name(n), np.asarray(a))]
    if config is not None:
        config = {k: v for k, v in config.items() if k not in ("quantization_config", "expert_dtype")}
    return _write(os.fspath(directory), groups(), max_shard_bytes, config, overwrite)


def _write(directory, groups, max_shard_bytes, config, overwrite) -> ShardedWriter:
    _prepare_dir(directory, overwrite)
    writer = ShardedWriter(directory, max_shard_bytes)
    try:
        for _, group in groups:
            writer.add_group(group)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    if config is not None:
        tmp = os.path.join(directory, "config.json.tmp")
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2)
        os.replace(tmp, os.path.join(directory, "config.json"))
    return writer
