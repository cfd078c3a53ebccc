"""The checkpoint forms v4jax reads, told apart in one place (`detect`), and the tensor sources that
stream their tensors by canonical name (architecture.md §9). `load_model` (v4jax.io.restore) and
`python -m v4jax.io.convert` both open checkpoints through here.

  SAFETENSORS  config.json + *.safetensors: an HF-format directory (transformers' save or the Hub
               spelling) or the official release layout with FP8/FP4 block-scaled weights, de-quantised
               on read (`v4jax.io.official.scan_release` indexes both spellings).
  CONVERTED    `python -m v4jax.io.convert` output: manifest.json + tensors/ (Orbax, canonical names).
  TRAIN_RUN    a `train.py` run directory (config.json + checkpoints/<step>/), or one step directory
               inside it. Its source (`v4jax.io.restore.TrainRunSource`) is built on `load_model`.
"""

from __future__ import annotations

import enum
import os
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

from v4jax.io import official
from v4jax.io.checkpoint import CheckpointError, canonical_name, transformers_name
from v4jax.io.official import Format, ReleaseError
from v4jax.io.orbax_store import MANIFEST, ConvertError, complete_manifest, load_numpy, read_json

CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
TENSORS = "tensors"  # a converted checkpoint's Orbax tree


class Kind(enum.Enum):
    SAFETENSORS = "safetensors"
    CONVERTED = "converted"
    TRAIN_RUN = "train_run"


def detect(path: str | os.PathLike) -> Kind:
    """Which checkpoint form `path` holds; a one-line error naming it when it is none of them."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is not a directory")
    names = set(os.listdir(path))
    if MANIFEST in names and TENSORS in names:
        return Kind.CONVERTED
    if "checkpoints" in names or "_CHECKPOINT_METADATA" in names or {"state", "meta"} <= names:
        return Kind.TRAIN_RUN
    if any(n.endswith(".safetensors") for n in names):
        return Kind.SAFETENSORS
    raise CheckpointError(f"{path} is not a checkpoint v4jax reads: expected config.json + *.safetensors "
                          "(HF or official release), a `python -m v4jax.io.convert` output (manifest.json), or a "
                          "train.py run directory (checkpoints/)")


def nbytes(shape, dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def batches(specs: Iterable[tuple[str, tuple[int, ...], np.dtype]], batch_bytes: int) -> Iterator[list]:
    """Consecutive runs of (name, shape, dtype) of at most `batch_bytes` (a larger tensor alone; 0: one
    tensor a batch), cut from the sizes alone, before anything is read."""
    batch, size = [], 0
    for spec in specs:
        b = nbytes(spec[1], spec[2])
        if batch and size + b > batch_bytes:
            yield batch
            batch, size = [], 0
        batch.append(spec)
        size += b
    if batch:
        yield batch


class TensorSource:
    """A checkpoint's tensors by canonical name: `specs` ({name: (shape, dtype)}, in storage order),
    `read(names)` for a batch of them as host numpy arrays, `tensors()` to stream them all, and what
    travels with the weights (config.json, tokenizer.json) when the directory has them."""
    kind: Kind
    specs: dict[str, tuple[tuple[int, ...], np.dtype]]
    batch_bytes: int = 256 << 20  # how much `tensors()` asks `read` for at a time
    config_path: str | None = None  # a config.json the tensors must match (None: consistent by construction)
    config: dict | None = None
    tokenizer: str | None = None

    def _attach(self, directory: str) -> None:
        self.directory = directory
        cfg = os.path.join(directory, CONFIG)
        self.config_path = cfg if os.path.isfile(cfg) else None
        self.config = read_json(cfg) if self.config_path else None
        tok = os.path.join(directory, TOKENIZER)
        self.tokenizer = tok if os.path.isfile(tok) else None

    def read(self, names: list[str]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def shown(self, name: str) -> str:
        """How an error names a tensor: as the checkpoint spells it."""
        return name

    def tensors(self, names: list[str] | None = None, skip=frozenset(),
                batch_bytes: int | None = None) -> Iterator[tuple[str, np.ndarray]]:
        """(name, array) for `names` (default: all, in storage order) minus `skip`, in that order, reading
        up to `batch_bytes` (default: the source's) per call of `read`."""
        limit = self.batch_bytes if batch_bytes is None else batch_bytes
        wanted = [(n, *self.specs[n]) for n in (self.specs if names is None else names) if n not in skip]
        for batch in batches(wanted, limit):
            got = self.read([n for n, _, _ in batch])
            yield from ((n, got.pop(n)) for n, _, _ in batch)


def _entry_dtype(e: official.ReleaseTensor, dtype) -> np.dtype:
    """The de-quantisation dtype of one entry: `dtype` when given; else its stored dtype, with FP8/FP4
    weights (no wider dtype to keep) as bfloat16, the release's compute dtype."""
    if dtype is not None:
        return np.dtype(dtype)
    if e.stored in (Format.FP8, Format.FP4):
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(e.stored_dtype)  # integers: output_dtype keeps them whatever this says


class SafetensorsSource(TensorSource):
    """An HF or official-release directory, one tensor read (and de-quantised) at a time. dtype: what the
    BF16/FP8/FP4-class tensors are read as (default: as stored, FP8/FP4 as bfloat16)."""
    kind = Kind.SAFETENSORS
    batch_bytes = 0  # `tensors()` reads one tensor at a time: the converter holds no read-ahead

    def __init__(self, directory: str, dtype=None):
        try:
            self.entries = {e.name: e for e in official.scan_release(directory)}
        except ReleaseError as e:
            raise CheckpointError(str(e)) from None
        self.dtypes = {n: _entry_dtype(e, dtype) for n, e in self.entries.items()}
        self.specs = {n: (tuple(e.shape), official.output_dtype(e.format, e.stored_dtype, self.dtypes[n]))
                      for n, e in self.entries.items()}
        self._attach(directory)

    def read(self, names):
        return {n: official.read_tensor(self.entries[n], self.dtypes[n]) for n in names}

    def shown(self, name):
        if name in self.entries:
            return self.entries[name].key
        # a missing tensor, in the spelling the rest of the directory uses
        return transformers_name(name) if any(e.key.startswith("model.") for e in self.entries.values()) else name

    def stored_dtypes(self) -> dict[str, np.dtype]:
        """Each tensor's dtype on disk; FP8/FP4 weights (quantised, with scales) as bfloat16."""
        return {n: np.dtype(ml_dtypes.bfloat16) if e.stored in (Format.FP8, Format.FP4) else np.dtype(e.stored_dtype)
                for n, e in self.entries.items()}


class ConvertedSource(TensorSource):
    """A `python -m v4jax.io.convert` Orbax checkpoint (complete manifest required), read in batches."""
    kind = Kind.CONVERTED

    def __init__(self, directory: str, batch_bytes: int = 256 << 20):
        try:
            self.manifest = complete_manifest(directory)
        except ConvertError as e:
            raise CheckpointError(str(e)) from None
        self.path = os.path.join(directory, TENSORS)
        self.batch_bytes = batch_bytes
        # stored name per canonical name: conversions before v4jax named the KV norm `attn.norm.weight`
        self.stored = {canonical_name(t["name"]): t["name"] for t in self.manifest["tensors"]}
        self.specs = {canonical_name(t["name"]): (tuple(t["shape"]), np.dtype(t["dtype"]))
                      for t in self.manifest["tensors"]}
        self._attach(directory)

    def read(self, names):
        got = load_numpy(self.path, [(self.stored[n], *self.specs[n]) for n in names])
        return {n: got.pop(self.stored[n]) for n in names}
