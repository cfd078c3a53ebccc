"""Minimal safetensors reader/writer on numpy memory maps (no framework dependency).

Reads tensor by tensor without loading a whole file (mmap), knows the dtypes the V4 checkpoints use
(BF16 and the FP8 formats through ml_dtypes), validates the header against the file size so a
truncated file is reported with the tensor's name, and writes atomically (temp file + rename).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np


class TensorFileError(ValueError):
    """A malformed, truncated or unsupported safetensors file."""


DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}
_NAMES = {v: k for k, v in DTYPES.items()}


class TensorFile:
    """One .safetensors file opened read-only; `file[name]` returns a numpy view (memory-mapped)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise TensorFileError(f"{self.path}: truncated (no safetensors header)")
                (n,) = struct.unpack("<Q", raw)
                if n > size - 8:
                    raise TensorFileError(f"{self.path}: truncated or not safetensors (header of {n} bytes, file of {size})")
                header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TensorFileError(f"{self.path}: unreadable safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise TensorFileError(f"{self.path}: safetensors header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        self._entries = header
        data_size = size - self._start
        for name, e in header.items():
            offsets = e.get("data_offsets") if isinstance(e, dict) else None
            if (not isinstance(e, dict) or not isinstance(e.get("shape"), list) or not isinstance(offsets, list)
                    or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]):
                raise TensorFileError(f"{self.path}: tensor {name!r} has a malformed header entry")
            if e.get("dtype") not in DTYPES:
                raise TensorFileError(f"{self.path}: tensor {name!r} has unsupported dtype {e.get('dtype')!r}")
            begin, end = e["data_offsets"]
            want = int(np.prod(e["shape"], dtype=np.int64)) * DTYPES[e["dtype"]].itemsize
            if end - begin != want:
                raise TensorFileError(f"{self.path}: tensor {name!r} has {end - begin} bytes, its shape "
                                      f"{e['shape']} and dtype {e['dtype']} need {want}")
            if end > data_size:
                raise TensorFileError(f"{self.path}: truncated: tensor {name!r} ends at byte {end} of a "
                                      f"{data_size}-byte data section")
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r") if size > 0 else None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self._entries[name]["dtype"]]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def offset(self, name: str) -> int:
        """Where the tensor's bytes begin in the file."""
        return self._start + self._entries[name]["data_offsets"][0]

    def __getitem__(self, name: str) -> np.ndarray:
        e = self._entries[name]
        begin, end = e["data_offsets"]
        buf = self._mmap[self._start + begin:self._start + end]
        return buf.view(DTYPES[e["dtype"]]).reshape(e["shape"])


def write_tensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: dict[str, str] | None = None):
    """Write tensors (name -> numpy array) to one safetensors file, atomically."""
    path = os.fspath(path)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in _NAMES:
            raise TensorFileError(f"tensor {name!r}: dtype {a.dtype} cannot be written to safetensors")
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())
    os.replace(tmp, path)


def write_sharded(directory: str | os.PathLike, tensors: Mapping[str, np.ndarray], max_shard_bytes: int,
                  prefix: str = "model") -> list[str]:
    """Write tensors into `prefix-0000i-of-0000n.safetensors` files of at most max_shard_bytes each
    (a single larger tensor gets its own file) plus `prefix.safetensors.index.json`; or one
    `prefix.safetensors` when everything fits. Returns the file names written."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(tensors):
        n = tensors[name].nbytes
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    if len(shards) == 1:
        fname = f"{prefix}.safetensors"
        write_tensors(os.path.join(directory, fname), tensors, {"format": "pt"})
        return [fname]
    names, weight_map = [], {}
    for i, keys in enumerate(shards):
        fname = f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_tensors(os.path.join(directory, fname), {k: tensors[k] for k in keys}, {"format": "pt"})
        names.append(fname)
        weight_map.update({k: fname for k in keys})
    total = sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    tmp = os.path.join(directory, f"{prefix}.safetensors.index.json.tmp")
    with open(tmp, "w") as f:
        json.dump(index, f, indent=2)
    os.replace(tmp, os.path.join(directory, f"{prefix}.safetensors.index.json"))
    return names + [f"{prefix}.safetensors.index.json"]


def open_directory(directory: str | os.PathLike) -> dict[str, TensorFile]:
    """Map every tensor name in an HF-style directory to the file holding it. Uses the index file when
    present (and checks every file it names exists), else every *.safetensors in the directory."""
    directory = os.fspath(directory)
    index_path = os.path.join(directory, "model.safetensors.index.json")
    files: dict[str, TensorFile] = {}
    where: dict[str, TensorFile] = {}
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise TensorFileError(f"{index_path}: malformed index ({e})") from None
        for name, fname in weight_map.items():
            if fname not in files:
                p = os.path.join(directory, fname)
                if not os.path.exists(p):
                    raise TensorFileError(f"{index_path}: tensor {name!r} is in {fname}, which does not exist")
                files[fname] = TensorFile(p)
            if name not in files[fname]:
                raise TensorFileError(f"{index_path}: tensor {name!r} is listed in {fname} but not stored there")
            where[name] = files[fname]
        return where
    paths = sorted(p for p in os.listdir(directory) if p.endswith(".safetensors"))
    if not paths:
        raise TensorFileError(f"{directory}: no *.safetensors files and no model.safetensors.index.json")
    for p in paths:
        tf = TensorFile(os.path.join(directory, p))
        for name in tf.keys():
            if name in where:
                raise TensorFileError(f"{directory}: tensor {name!r} is stored twice ({where[name].path}, {tf.path})")
            where[name] = tf
    return where


def names_of(files: Iterable[TensorFile]) -> set[str]:
    return {k for f in files for k in f.keys()}
