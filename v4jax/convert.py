"""Stream a DeepSeek-V4 checkpoint between the official release layout, transformers' safetensors and
an Orbax (TensorStore) checkpoint keyed by canonical tensor name.

    python -m v4jax.convert --from RELEASE_DIR --to OUT [--dtype bf16|fp32] [--format orbax|hf|official]

Sources: a safetensors directory (official FP8/FP4 release, or an unquantised transformers save) or an
Orbax checkpoint written by this tool. Targets:

* `orbax`: `OUT/tensors` is one Orbax checkpoint whose tree is `{canonical name: array}` (flat, so
  it does not depend on the model's in-memory layout); FP8/FP4/BF16-class tensors are stored
  de-quantised at `--dtype`, FP32-class ones (sinks, `ape`, `hc_*`, gate bias) in float32, `tid2eid`
  as found. Written with Orbax's partial save, a batch of tensors (`--batch-mb`) at a time.
  `OUT/manifest.json` records every tensor's shape, dtype and CRC-32 and which are saved, so an
  interrupted conversion resumes where it stopped; it is marked complete only after a final pass
  re-reads every tensor and checks count, names, shapes, dtypes and checksums.
* `hf`: unquantised safetensors under transformers' spelling (shards + index).
* `official`: the release layout, re-quantised (byte-identical to the source release when that
  release's scales are canonical, see `v4jax.quant`).
  Safetensors targets are verified the same way (every written tensor re-read and checksummed) and
  marked complete in `OUT/conversion.json`; an interrupted one restarts from scratch.

Memory: one tensor (plus one Orbax batch when writing Orbax); the peak RSS is printed at the end.
`load_converted` restores the Orbax checkpoint, optionally straight into per-tensor shardings.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from typing import Any, Callable, Iterator, Mapping

import ml_dtypes
import numpy as np

from v4jax import official
from v4jax.official import ReleaseError, checksum
from v4jax.tensorfile import DTYPES

MANIFEST = "manifest.json"
TENSORS = "tensors"
DONE_MARKER = "conversion.json"
CONFIG = "config.json"
_FORMAT_VERSION = 1
DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32"}


class ConvertError(ValueError):
    """A conversion that cannot proceed: unusable source or target, or a failed verification."""


def _ocp():
    try:
        from orbax.checkpoint import v1 as ocp
        ocp.partial  # noqa: B018  (the partial-save API; older Orbax lacks it)
    except (ImportError, AttributeError):
        from orbax.checkpoint.experimental import v1 as ocp
    return ocp


def _bound_heap():
    """Serve every allocation of 1 MiB or more by mmap, so a freed tensor's memory goes back to the OS.
    glibc otherwise raises its mmap threshold after the first large free and serves later tensors
    from the heap, which then keeps the high-water mark of all of them (measured: peak RSS growth of
    a 700 MiB conversion 264 -> 139 MiB). No-op where mallopt is unavailable."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that across fork + exec,
    so a child started by a large parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _dtype_name(dt: np.dtype) -> str:
    return np.dtype(dt).name


def _atomic_json(path: str, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: unreadable ({e})") from None


# --------------------------------------------------------------------------------------------------
# Sources: a list of (name, shape, dtype) known before any data is read, and a tensor iterator

class _Source:
    kind: str
    specs: list[tuple[str, tuple[int, ...], np.dtype]]
    config: dict | None

    def tensors(self, skip: set[str] = frozenset()) -> Iterator[tuple[str, np.ndarray]]:
        raise NotImplementedError


class _SafetensorsSource(_Source):
    kind = "safetensors"

    def __init__(self, directory: str, dtype):
        self.entries = official.scan_release(directory)
        self.dtype = np.dtype(dtype)
        self.specs = [(e.name, e.shape, official.output_dtype(e.format, e.stored_dtype, self.dtype))
                      for e in self.entries]
        p = os.path.join(directory, CONFIG)
        self.config = _read_json(p) if os.path.exists(p) else None

    def tensors(self, skip=frozenset()):
        for e in self.entries:
            if e.name not in skip:
                yield e.name, official.read_tensor(e, self.dtype)


class _OrbaxSource(_Source):
    kind = "orbax"

    def __init__(self, directory: str, batch_bytes: int):
        self.manifest = _complete_manifest(directory)
        self.path = os.path.join(directory, TENSORS)
        self.batch_bytes = batch_bytes
        self.specs = [(t["name"], tuple(t["shape"]), np.dtype(t["dtype"])) for t in self.manifest["tensors"]]
        p = os.path.join(directory, CONFIG)
        self.config = _read_json(p) if os.path.exists(p) else None

    def tensors(self, skip=frozenset()):
        specs = [s for s in self.specs if s[0] not in skip]
        for batch in _batches(specs, self.batch_bytes):
            arrays = _load_numpy(self.path, batch)
            for name, _, _ in batch:
                yield name, arrays.pop(name)


def _complete_manifest(directory: str) -> dict:
    p = os.path.join(directory, MANIFEST)
    if not os.path.exists(p):
        raise ConvertError(f"{directory}: no {MANIFEST}; not a checkpoint written by v4jax.convert")
    m = _read_json(p)
    if m.get("format") != "v4jax-orbax":
        raise ConvertError(f"{p}: not a v4jax Orbax manifest")
    if not m.get("complete"):
        raise ConvertError(f"{directory}: conversion is not complete (interrupted or failed verification); "
                           f"run `python -m v4jax.convert` again to resume it")
    return m


def _open_source(src: str, dtype, batch_bytes: int) -> _Source:
    if not os.path.isdir(src):
        raise ConvertError(f"source {src} is not a directory")
    if os.path.exists(os.path.join(src, MANIFEST)):
        return _OrbaxSource(src, batch_bytes)
    try:
        return _SafetensorsSource(src, dtype)
    except ReleaseError as e:
        raise ConvertError(str(e)) from None


def _nbytes(shape, dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _batches(specs, batch_bytes: int):
    batch, size = [], 0
    for s in specs:
        n = _nbytes(s[1], s[2])
        if batch and size + n > batch_bytes:
            yield batch
            batch, size = [], 0
        batch.append(s)
        size += n
    if batch:
        yield batch


def _load_numpy(path: str, specs) -> dict[str, np.ndarray]:
    """Restore a subset of the Orbax tree as host numpy arrays."""
    ocp = _ocp()
    ctx = ocp.Context()
    ctx.pytree.loading.partial_load = True
    with ctx:
        return dict(ocp.load(path, {n: np.empty(shape, dt) for n, shape, dt in specs}))


# --------------------------------------------------------------------------------------------------
# Orbax target (resumable)

def _to_orbax(source: _Source, dst: str, *, dtype_name: str, batch_bytes: int, progress: bool,
              after_batch: Callable[[int], None] | None, compress: bool) -> dict:
    ocp = _ocp()
    os.makedirs(dst, exist_ok=True)
    mpath, tpath = os.path.join(dst, MANIFEST), os.path.join(dst, TENSORS)
    specs = [{"name": n, "shape": list(s), "dtype": _dtype_name(d)} for n, s, d in source.specs]
    if os.path.exists(mpath):
        m = _read_json(mpath)
        if m.get("source") != _source_id(source) or m.get("dtype") != dtype_name or \
                [{k: t[k] for k in ("name", "shape", "dtype")} for t in m["tensors"]] != specs:
            raise ConvertError(f"{dst} holds a{'' if m.get('complete') else 'n interrupted'} conversion of a "
                               f"different source or dtype; delete it or choose another target")
        if m.get("complete"):
            return m
    else:
        if os.path.exists(tpath) or os.path.exists(tpath + ".partial_save"):
            raise ConvertError(f"{dst} already holds an Orbax checkpoint without a {MANIFEST}; refusing to touch it")
        m = {"format": "v4jax-orbax", "version": _FORMAT_VERSION, "source": _source_id(source),
             "dtype": dtype_name, "compressed": compress, "batch_bytes": batch_bytes,
             "complete": False, "finalized": False,
             "tensors": [dict(t, crc32=None) for t in specs]}
        if source.config is not None:
            _atomic_json(os.path.join(dst, CONFIG), source.config)
        _atomic_json(mpath, m)
    by_name = {t["name"]: t for t in m["tensors"]}
    done = {t["name"] for t in m["tensors"] if t["crc32"] is not None}
    total = sum(_nbytes(t["shape"], t["dtype"]) for t in m["tensors"])
    bar = _bar(len(by_name), progress, initial=len(done))
    if not m["finalized"]:
        # batches are cut from the known sizes before reading, so a batch is never held next to the
        # tensor that would overflow it; a resumed run keeps the first run's batch size, so a batch
        # saved just before a crash (not yet in the manifest) is re-cut identically and recognised
        todo = [(t["name"], tuple(t["shape"]), np.dtype(t["dtype"])) for t in m["tensors"] if t["name"] not in done]
        batch_bytes = m.get("batch_bytes", batch_bytes)
        stream = source.tensors(skip=done)
        ctx = ocp.Context()
        ctx.array.saving.use_compression = compress
        for n_batch, specs_b in enumerate(_batches(todo, batch_bytes), 1):
            batch = {}
            for name, shape, dt in specs_b:
                got, a = next(stream)
                if got != name or a.shape != shape or a.dtype != dt:
                    raise ConvertError(f"tensor {got!r}: read {a.dtype}{list(a.shape)}, "
                                       f"expected {name!r} {dt}{list(shape)}")
                batch[name] = a
            try:
                with ctx:
                    ocp.partial.save(tpath, batch)
            except Exception as e:  # a crash between a save and the manifest update: already saved
                if type(e).__name__ != "PartialSaveReplacementError":
                    raise
            for k, a in batch.items():
                by_name[k]["crc32"] = checksum(a)
            _atomic_json(mpath, m)
            bar.update(len(batch))
            del batch
            if after_batch is not None:
                after_batch(n_batch)
        if not (os.path.isdir(tpath) and ocp.is_orbax_checkpoint(tpath)):  # else finalized before a crash
            ocp.partial.finalize(tpath)
        m["finalized"] = True
        _atomic_json(mpath, m)
    bar.close()
    # verification pass: the finalized checkpoint must hold exactly the manifest's tensors
    ocp_meta = ocp.metadata(tpath).metadata
    if set(ocp_meta) != set(by_name):
        missing = sorted(set(by_name) - set(ocp_meta))
        extra = sorted(set(ocp_meta) - set(by_name))
        raise ConvertError(f"{tpath}: verification failed: holds {len(ocp_meta)} tensors, expected "
                           f"{len(by_name)}" + (f"; missing {missing[0]!r}" if missing else "")
                           + (f"; unexpected {extra[0]!r}" if extra else ""))
    vbar = _bar(len(by_name), progress, desc="verify")
    for batch in _batches([(t["name"], tuple(t["shape"]), np.dtype(t["dtype"])) for t in m["tensors"]], batch_bytes):
        arrays = _load_numpy(tpath, batch)
        for name, shape, dt in batch:
            a, t = arrays.pop(name), by_name[name]
            if tuple(a.shape) != shape or a.dtype != dt or checksum(a) != t["crc32"]:
                raise ConvertError(f"{tpath}: verification failed for tensor {name!r} (stored {a.dtype}"
                                   f"{list(a.shape)}, expected {t['dtype']}{t['shape']} with crc32 {t['crc32']})")
        vbar.update(len(batch))
    vbar.close()
    m["complete"] = True
    m["total_bytes"] = total
    _atomic_json(mpath, m)
    return m


def _source_id(source: _Source) -> str:
    return f"{source.kind}:{len(source.specs)}"


def _bar(total: int, enabled: bool, initial: int = 0, desc: str = "convert"):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit="tensor", disable=not enabled, file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# Safetensors targets (official / hf)

def _to_safetensors(source: _Source, dst: str, *, fmt: str, max_shard_bytes: int, progress: bool,
                    after_batch: Callable[[int], None] | None) -> dict:
    from v4jax.tensorfile import TensorFile

    marker = os.path.join(dst, DONE_MARKER)
    if os.path.exists(marker) and _read_json(marker).get("complete"):
        return _read_json(marker)
    if os.path.exists(marker):
        os.remove(marker)
    bar = _bar(len(source.specs), progress)
    count = [0]

    def stream():
        for name, a in source.tensors():
            yield name, a
            bar.update(1)
            count[0] += 1
            if after_batch is not None:
                after_batch(count[0])

    write = official.write_release if fmt == "official" else official.write_hf
    try:
        writer = write(dst, stream(), max_shard_bytes=max_shard_bytes, config=source.config, overwrite=True)
    except ReleaseError as e:
        raise ConvertError(str(e)) from None
    finally:
        bar.close()
    # verification pass: every written tensor re-read from disk and checksummed
    index = _read_json(os.path.join(dst, "model.safetensors.index.json"))["weight_map"]
    if set(index) != set(writer.written):
        raise ConvertError(f"{dst}: verification failed: index lists {len(index)} tensors, wrote {len(writer.written)}")
    files = {}
    for key, (dt, shape, crc) in writer.written.items():
        tf = files.setdefault(index[key], TensorFile(os.path.join(dst, index[key])))
        a = official.read_stored(tf, key)
        if list(a.shape) != shape or checksum(a) != crc:
            raise ConvertError(f"{dst}: verification failed for tensor {key!r}")
    files.clear()
    done = {"format": fmt, "complete": True, "tensors": len(writer.written),
            "total_bytes": sum(int(np.prod(s, dtype=np.int64)) * np.dtype(DTYPES[d]).itemsize
                               for d, s, _ in writer.written.values())}
    _atomic_json(marker, done)
    return done


# --------------------------------------------------------------------------------------------------

def convert(src: str | os.PathLike, dst: str | os.PathLike, *, fmt: str = "orbax", dtype: str = "bf16",
            max_shard_bytes: int = 5 << 30, batch_bytes: int = 1 << 30, progress: bool = True,
            after_batch: Callable[[int], None] | None = None, compress: bool = False) -> dict:
    """Convert `src` to `dst` in format `fmt` ('orbax' | 'hf' | 'official'), streaming. Returns the
    manifest / completion record. `after_batch(n)` runs after each saved Orbax batch (or each written
    safetensors tensor); raising there simulates an interruption. compress: zstd in the Orbax
    checkpoint (bf16 weights shrink to ~60%, at several times the CPU cost)."""
    src, dst = os.fspath(src), os.fspath(dst)
    if fmt not in ("orbax", "hf", "official"):
        raise ConvertError(f"unknown target format {fmt!r}; choose orbax, hf or official")
    if dtype not in DTYPE_NAMES:
        raise ConvertError(f"unknown dtype {dtype!r}; choose bf16 or fp32")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ConvertError("source and target are the same directory")
    dtype_name = DTYPE_NAMES[dtype]
    _bound_heap()
    source = _open_source(src, np.dtype(getattr(ml_dtypes, dtype_name, None) or dtype_name), batch_bytes)
    if fmt == "orbax":
        if source.kind == "orbax":
            raise ConvertError(f"{src} is already an Orbax checkpoint")
        return _to_orbax(source, dst, dtype_name=dtype_name, batch_bytes=batch_bytes, progress=progress,
                         after_batch=after_batch, compress=compress)
    return _to_safetensors(source, dst, fmt=fmt, max_shard_bytes=max_shard_bytes, progress=progress,
                           after_batch=after_batch)


def load_converted(path: str | os.PathLike, cfg=None, mesh=None,
                   shardings: Mapping[str, Any] | Callable[[str, tuple, np.dtype], Any] | None = None
                   ) -> dict[str, Any]:
    """Restore a converted Orbax checkpoint as {canonical name: array}.

    cfg (a V4Config): check the names against the model it describes (missing / unexpected tensors
    raise; `mtp.*` tensors are dropped when cfg has no MTP layer). shardings: a mapping or a function
    (name, shape, dtype) -> jax Sharding; each tensor is then restored by Orbax straight into that
    sharding (each host reads only its shards). mesh without shardings: replicated on the mesh.
    Neither: host numpy arrays."""
    path = os.fspath(path)
    m = _complete_manifest(path)
    specs = [(t["name"], tuple(t["shape"]), np.dtype(t["dtype"])) for t in m["tensors"]]
    if cfg is not None:
        specs = _check_names(specs, cfg, path)
    if shardings is None and mesh is not None:
        from jax.sharding import NamedSharding, PartitionSpec
        replicated = NamedSharding(mesh, PartitionSpec())
        shardings = lambda *_: replicated  # noqa: E731
    if shardings is None:
        return _load_numpy(os.path.join(path, TENSORS), specs)
    import jax

    def sharding_of(name, shape, dt):
        s = shardings(name, shape, dt) if callable(shardings) else shardings.get(name)
        if s is None:
            raise ConvertError(f"no sharding given for tensor {name!r}")
        return s

    abstract = {n: jax.ShapeDtypeStruct(s, d, sharding=sharding_of(n, s, d)) for n, s, d in specs}
    ocp = _ocp()
    ctx = ocp.Context()
    ctx.pytree.loading.partial_load = True
    with ctx:
        return dict(ocp.load(os.path.join(path, TENSORS), abstract))


def _check_names(specs, cfg, path):
    from flax import nnx

    from v4jax.checkpoint import check_names, hf_rules
    from v4jax.model import Transformer

    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    expected = {r.name for r in hf_rules(abstract)}
    have = {n for n, _, _ in specs}
    if not cfg.n_mtp_layers:
        specs = [s for s in specs if not s[0].startswith("mtp.")]
        have = {n for n, _, _ in specs}
    check_names(expected, have, str(path), error=ConvertError)
    return specs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m v4jax.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="src", required=True, help="source directory (safetensors or v4jax Orbax)")
    p.add_argument("--to", dest="dst", required=True, help="target directory")
    p.add_argument("--format", default="orbax", choices=["orbax", "hf", "official"])
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_NAMES),
                   help="dtype of de-quantised FP8/FP4/BF16-class tensors (FP32-class stay float32)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size")
    p.add_argument("--batch-mb", type=float, default=1024.0, help="tensors per Orbax save / load call")
    p.add_argument("--compress", action="store_true", help="zstd-compress the Orbax checkpoint")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        rec = convert(args.src, args.dst, fmt=args.format, dtype=args.dtype,
                      max_shard_bytes=int(args.max_shard_gb * 2**30), batch_bytes=int(args.batch_mb * 2**20),
                      progress=not args.no_progress, compress=args.compress)
    except (ConvertError, ReleaseError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    dt = time.perf_counter() - t0
    n = len(rec["tensors"]) if isinstance(rec["tensors"], list) else rec["tensors"]
    gb = rec.get("total_bytes", 0) / 1e9
    print(f"converted {n} tensors ({gb:.3f} GB written) to {args.dst} [{args.format}] in {dt:.1f} s "
          f"({gb / max(dt, 1e-9):.3f} GB/s); peak RSS {peak_rss_bytes() / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
