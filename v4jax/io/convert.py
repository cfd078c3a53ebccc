"""Stream a DeepSeek-V4 checkpoint between the official release layout, transformers' safetensors and
an Orbax (TensorStore) checkpoint keyed by canonical tensor name.

    python -m v4jax.io.convert --from SRC --to OUT [--dtype bf16|fp32] [--format orbax|hf|official] [--overwrite]

Sources: a safetensors directory (official FP8/FP4 release, or an unquantised transformers save), an
Orbax checkpoint written by this tool, or a `train.py` run directory (its newest checkpoint that
loads and matches its fingerprint; the whole model is held in memory). Without `--dtype` every
tensor keeps its source dtype (FP8/FP4 weights de-quantise to bfloat16, the release's compute
dtype); with it, FP8/FP4/BF16-class tensors are cast to it. When the source has a config.json, every
tensor's name and shape is checked against the model it describes before anything is written.

OUT must be absent or empty, or `--overwrite` given: an existing checkpoint is never replaced by
accident. Everything is written into the sibling `OUT.partial` and renamed onto OUT only once
complete and verified (`v4jax.io.safe_io`). Targets:

* `orbax`: `OUT/tensors` is one Orbax checkpoint whose tree is `{canonical name: array}` (flat, so
  it does not depend on the model's in-memory layout); FP8/FP4/BF16-class tensors are stored
  de-quantised at `--dtype`, FP32-class ones (sinks, `ape`, `hc_*`, gate bias) in float32, `tid2eid`
  as found. Written with Orbax's partial save, a batch of tensors (`--batch-mb`) at a time.
  `manifest.json` records every tensor's shape, dtype and CRC-32 and which are saved, so an
  interrupted conversion resumes (from `OUT.partial`) where it stopped; it is marked complete only after a final pass
  re-reads every tensor and checks count, names, shapes, dtypes and checksums.
* `hf`: unquantised safetensors under transformers' spelling (shards + index); V4 only (transformers
  has no V4.1 model).
* `official`: the release layout, re-quantised (byte-identical to the source release when that
  release's scales are canonical, see `v4jax.io.quant`); for V4.1 its own layout (32 x 32 FP8 blocks,
  MXFP4 experts, Engram tables as FP8 rows with a scale per 32 columns: `official_v41.write_release_v41`).
  Safetensors targets are verified the same way (every written tensor re-read and checksummed) and
  marked complete in `OUT/conversion.json`; an interrupted one restarts from scratch.

Re-running a finished conversion with the same source and dtype is a no-op.

Memory: one tensor (plus one Orbax batch when writing Orbax; a V4.1 Engram table beside its scales when
writing the release layout); the peak RSS is printed at the end.
`load_converted` restores the Orbax checkpoint, optionally straight into per-tensor shardings.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

from v4jax.io import official
from v4jax.io.checkpoint import CheckpointError
from v4jax.io.official import Format, ReleaseError, checksum
from v4jax.io.orbax_store import (MANIFEST, ConvertError, complete_manifest, load_numpy, orbax_v1,  # noqa: F401
                                    read_json)
from v4jax.io.sources import CONFIG, TENSORS, TOKENIZER, Kind, TensorSource, batches, nbytes
from v4jax.io.safe_io import check_target, commit, is_staging, open_staging, staging_path
from v4jax.io.tensorfile import DTYPES

DONE_MARKER = "conversion.json"
_FORMAT_VERSION = 1
DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32"}
SOURCE_DTYPE = "source"  # the manifest's dtype entry when the BF16/FP8/FP4-class tensors keep several dtypes


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


def _open_source(src: str, dtype, batch_bytes: int) -> TensorSource:
    """The one detection and source family `load_model` uses (v4jax.io.sources), errors as ConvertError."""
    from v4jax.io.restore import open_source

    if not os.path.isdir(src):
        raise ConvertError(f"source {src} is not a directory")
    try:
        return open_source(src, dtype, batch_bytes)
    except CheckpointError as e:
        raise ConvertError(str(e)) from None


def _copy_tokenizer(source: TensorSource, work: str) -> None:
    """infer.py looks for CHECKPOINT/tokenizer.json, so the converted checkpoint keeps the source's."""
    if source.tokenizer is not None:
        shutil.copyfile(source.tokenizer, os.path.join(work, TOKENIZER))


def _effective_dtype(source: TensorSource) -> str:
    """The one dtype of the BF16/FP8/FP4-class tensors (what --dtype sets), or 'source' when they keep
    several. Recorded in the manifest, so `--dtype bf16` and the default resume each other exactly
    when they produce the same tensors."""
    names = set()
    if isinstance(source.config, dict) and _is_v41(source.config):
        from v4jax.io.official_v41 import release_format_v41 as release_format
    else:
        release_format = official.release_format
    for n, (_, dt) in source.specs.items():
        try:
            if release_format(n) not in (Format.FP32, Format.INT):
                names.add(np.dtype(dt).name)
        except ReleaseError:
            names.add(SOURCE_DTYPE)
    return names.pop() if len(names) == 1 else SOURCE_DTYPE


def _is_v41(config: dict | None) -> bool:
    from v4jax.io.official_v41 import is_v41_config
    return is_v41_config(config)


def _check_against_config(source: TensorSource) -> None:
    """Refuse a source whose tensors do not fit the model its config.json describes (a missing,
    unexpected or mis-shaped tensor) before anything is written."""
    if source.config is None or source.config_path is None:
        return
    if _is_v41(source.config):
        return _check_against_config_v41(source)
    from flax import nnx

    from v4jax.io.checkpoint import CheckpointError, check_names, check_tensor, hf_rules
    from v4jax.config import ConfigError, V4Config
    from v4jax.model.transformer import Transformer

    try:
        cfg = V4Config.from_json_file(source.config_path)
    except ConfigError as e:
        raise ConvertError(str(e)) from None
    specs = source.specs
    if not any(n.startswith("mtp.") for n in specs):  # transformers saves drop the MTP block
        cfg = cfg.replace(n_mtp_layers=0)
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    variables = dict(nnx.to_flat_state(nnx.state(abstract)))
    rules = hf_rules(abstract)
    where = os.path.dirname(source.config_path)
    try:
        check_names({r.name for r in rules}, set(specs), where)
        for r in rules:
            check_tensor(r, variables[r.ours], *specs[r.name], where)
    except CheckpointError as e:
        raise ConvertError(f"{e} (per {source.config_path})") from None


def _check_against_config_v41(source: TensorSource) -> None:
    """The V4.1 form of `_check_against_config`: every tensor the model its config.json describes reads
    is there and nothing else (the vision tower's `vision.*` / `aligner.*` when it has one); shapes are
    checked when the checkpoint loads (`load_official_v41`, naming the tensor)."""
    from flax import nnx

    from v4jax.config import ConfigError
    from v4jax.config_v41 import V41Config
    from v4jax.io.official_v41 import official_names_v41
    from v4jax.model.v41 import V41Transformer

    try:
        cfg = V41Config.from_json_file(source.config_path)
    except ConfigError as e:
        raise ConvertError(str(e)) from None
    have = set(source.specs)
    if not any(n.startswith("mtp.") for n in have):
        cfg = cfg.without_dspark()
    expected = official_names_v41(nnx.eval_shape(lambda: V41Transformer(cfg, rngs=nnx.Rngs(0))))
    vision = {n for n in have if n.startswith(("vision.", "aligner."))}
    where = f"{os.path.dirname(source.config_path)} (per {source.config_path})"
    missing, extra = sorted(expected - have), sorted(have - expected - (vision if cfg.vision_n_layers else set()))
    if missing:
        raise ConvertError(f"{where}: missing tensor {missing[0]!r}" + (f" and {len(missing) - 1} more" if missing[1:] else ""))
    if cfg.vision_n_layers and not vision:
        raise ConvertError(f"{where}: the config has a vision tower but there are no vision.* tensors")
    if extra:
        raise ConvertError(f"{where}: unexpected tensor {extra[0]!r}" + (f" and {len(extra) - 1} more" if extra[1:] else ""))


# --------------------------------------------------------------------------------------------------
# Orbax target (resumable)

def _to_orbax(source: TensorSource, dst: str, *, dtype_name: str, batch_bytes: int, progress: bool,
              after_batch: Callable[[int], None] | None, compress: bool, overwrite: bool) -> dict:
    """Pick where the conversion is written, then write it (`_orbax_write`): a finished conversion of
    the same source is returned as is; an interrupted one is resumed where it lies (OUT.partial, or
    OUT itself when an older v4jax wrote in place); anything else in OUT is refused unless overwrite."""
    specs = [{"name": n, "shape": list(s), "dtype": _dtype_name(d)} for n, (s, d) in source.specs.items()]

    def same(m):
        return m.get("source") == _source_id(source) and m.get("dtype") == dtype_name and \
            [{k: t[k] for k in ("name", "shape", "dtype")} for t in m.get("tensors", [])] == specs

    own = os.path.join(dst, MANIFEST)
    if os.path.isfile(own) and not overwrite:
        m = read_json(own)
        if not same(m):
            raise ConvertError(f"{dst} holds a{'' if m.get('complete') else 'n interrupted'} conversion of a "
                               f"different source or dtype; pass --overwrite to replace it or choose another target")
        if m.get("complete"):
            return m
        return _orbax_write(source, dst, m, batch_bytes=batch_bytes, progress=progress, after_batch=after_batch,
                            compress=compress)
    check_target(dst, overwrite=overwrite, error=ConvertError)
    work, partial = staging_path(dst), os.path.join(staging_path(dst), MANIFEST)
    resume = is_staging(work) and os.path.isfile(partial)
    if resume and not same(read_json(partial)):
        if not overwrite:
            raise ConvertError(f"{work} holds an interrupted conversion of a different source or dtype; rerun with "
                               f"the same --from and --dtype to finish it, or pass --overwrite to start over")
        resume = False
    work = open_staging(dst, resume=resume, error=ConvertError)
    if resume:
        m = read_json(partial)
    else:
        m = {"format": "v4jax-orbax", "version": _FORMAT_VERSION, "source": _source_id(source),
             "dtype": dtype_name, "compressed": compress, "batch_bytes": batch_bytes,
             "complete": False, "finalized": False,
             "tensors": [dict(t, crc32=None) for t in specs]}
        if source.config is not None:
            _atomic_json(os.path.join(work, CONFIG), source.config)
        _copy_tokenizer(source, work)
        _atomic_json(partial, m)
    m = _orbax_write(source, work, m, batch_bytes=batch_bytes, progress=progress, after_batch=after_batch,
                     compress=compress)
    commit(work, dst, error=ConvertError)
    return m


def _orbax_write(source: TensorSource, dst: str, m: dict, *, batch_bytes: int, progress: bool,
                 after_batch: Callable[[int], None] | None, compress: bool) -> dict:
    """Save the tensors the manifest `m` of directory `dst` lacks, finalize, verify, mark complete."""
    ocp = orbax_v1()
    mpath, tpath = os.path.join(dst, MANIFEST), os.path.abspath(os.path.join(dst, TENSORS))
    by_name = {t["name"]: t for t in m["tensors"]}
    done = {t["name"] for t in m["tensors"] if t["crc32"] is not None}
    total = sum(nbytes(t["shape"], t["dtype"]) for t in m["tensors"])
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
        for n_batch, specs_b in enumerate(batches(todo, batch_bytes), 1):
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
    for batch in batches([(t["name"], tuple(t["shape"]), np.dtype(t["dtype"])) for t in m["tensors"]], batch_bytes):
        arrays = load_numpy(tpath, batch)
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


def _source_id(source: TensorSource) -> str:
    kind = "orbax" if source.kind is Kind.CONVERTED else source.kind.value  # as written before v4jax.io.sources
    return f"{kind}:{len(source.specs)}"


def _bar(total: int, enabled: bool, initial: int = 0, desc: str = "convert"):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit="tensor", disable=not enabled, file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# Safetensors targets (official / hf)

def _to_safetensors(source: TensorSource, dst: str, *, fmt: str, max_shard_bytes: int, progress: bool,
                    after_batch: Callable[[int], None] | None, overwrite: bool) -> dict:
    from v4jax.io.tensorfile import TensorFile

    marker = os.path.join(dst, DONE_MARKER)
    if os.path.isfile(marker) and not overwrite:
        done = read_json(marker)
        if done.get("complete") and done.get("format") == fmt and done.get("source") == _source_id(source):
            return done
    check_target(dst, overwrite=overwrite, error=ConvertError)
    final, dst = dst, open_staging(dst, error=ConvertError)  # a safetensors write restarts from scratch
    bar = _bar(len(source.specs), progress)
    count = [0]

    def stream():
        for name, a in source.tensors():
            yield name, a
            bar.update(1)
            count[0] += 1
            if after_batch is not None:
                after_batch(count[0])

    if _is_v41(source.config):  # convert() refuses hf for V4.1: only the release layout has its names
        from v4jax.io.official_v41 import write_release_v41 as write
    else:
        write = official.write_release if fmt == "official" else official.write_hf
    try:
        writer = write(dst, stream(), max_shard_bytes=max_shard_bytes, config=source.config, overwrite=True)
    except ReleaseError as e:
        raise ConvertError(str(e)) from None
    finally:
        bar.close()
    # verification pass: every written tensor re-read from disk and checksummed
    index = read_json(os.path.join(dst, "model.safetensors.index.json"))["weight_map"]
    if set(index) != set(writer.written):
        raise ConvertError(f"{dst}: verification failed: index lists {len(index)} tensors, wrote {len(writer.written)}")
    files = {}
    for key, (dt, shape, crc) in writer.written.items():
        tf = files.setdefault(index[key], TensorFile(os.path.join(dst, index[key])))
        a = official.read_stored(tf, key)
        if list(a.shape) != shape or checksum(a) != crc:
            raise ConvertError(f"{dst}: verification failed for tensor {key!r}")
    files.clear()
    _copy_tokenizer(source, dst)
    done = {"format": fmt, "complete": True, "source": _source_id(source), "tensors": len(writer.written),
            "total_bytes": sum(int(np.prod(s, dtype=np.int64)) * np.dtype(DTYPES[d]).itemsize
                               for d, s, _ in writer.written.values())}
    _atomic_json(os.path.join(dst, DONE_MARKER), done)
    commit(dst, final, error=ConvertError)
    return done


# --------------------------------------------------------------------------------------------------

def convert(src: str | os.PathLike, dst: str | os.PathLike, *, fmt: str = "orbax", dtype: str | None = None,
            max_shard_bytes: int = 5 << 30, batch_bytes: int = 1 << 30, progress: bool = True,
            after_batch: Callable[[int], None] | None = None, compress: bool = False,
            overwrite: bool = False) -> dict:
    """Convert `src` to `dst` in format `fmt` ('orbax' | 'hf' | 'official'), streaming. Returns the
    manifest / completion record. dtype: None keeps each tensor's source dtype (see the module
    docstring), 'bf16' / 'fp32' cast the BF16/FP8/FP4 classes. `after_batch(n)` runs after each saved
    Orbax batch (or each written safetensors tensor); raising there simulates an interruption.
    compress: zstd in the Orbax checkpoint (bf16 weights shrink to ~60%, at several times the CPU
    cost). overwrite: replace whatever `dst` holds (only once the new output is complete)."""
    src, dst = os.fspath(src), os.fspath(dst)
    if fmt not in ("orbax", "hf", "official"):
        raise ConvertError(f"unknown target format {fmt!r}; choose orbax, hf or official")
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ConvertError(f"unknown dtype {dtype!r}; choose bf16 or fp32 (or none: keep the source's)")
    for flag, v in (("max_shard_bytes (--max-shard-gb)", max_shard_bytes), ("batch_bytes (--batch-mb)", batch_bytes)):
        if not v > 0:
            raise ConvertError(f"{flag} must be positive, got {v}")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ConvertError("source and target are the same directory")
    if os.path.abspath(dst).startswith(os.path.join(os.path.abspath(src), "")):
        raise ConvertError(f"target {dst} lies inside the source {src}")
    _bound_heap()
    np_dtype = None if dtype is None else np.dtype(getattr(ml_dtypes, DTYPE_NAMES[dtype], None) or DTYPE_NAMES[dtype])
    source = _open_source(src, np_dtype, batch_bytes)
    dtype_name = _effective_dtype(source)
    if fmt == "orbax" and source.kind is Kind.CONVERTED:
        raise ConvertError(f"{src} is already an Orbax checkpoint")
    _check_against_config(source)
    if fmt == "hf" and _is_v41(source.config):
        raise ConvertError(f"{src} is a DeepSeek-V4.1 checkpoint, which has no transformers spelling: convert it "
                           f"to --format official (the release layout) or orbax")
    if fmt == "orbax":
        return _to_orbax(source, dst, dtype_name=dtype_name, batch_bytes=batch_bytes, progress=progress,
                         after_batch=after_batch, compress=compress, overwrite=overwrite)
    return _to_safetensors(source, dst, fmt=fmt, max_shard_bytes=max_shard_bytes, progress=progress,
                           after_batch=after_batch, overwrite=overwrite)


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
    m = complete_manifest(path)
    specs = [(t["name"], tuple(t["shape"]), np.dtype(t["dtype"])) for t in m["tensors"]]
    if cfg is not None:
        specs = _check_names(specs, cfg, path)
    if shardings is None and mesh is not None:
        from jax.sharding import NamedSharding, PartitionSpec
        replicated = NamedSharding(mesh, PartitionSpec())
        shardings = lambda *_: replicated  # noqa: E731
    if shardings is None:
        return load_numpy(os.path.join(path, TENSORS), specs)
    import jax

    def sharding_of(name, shape, dt):
        s = shardings(name, shape, dt) if callable(shardings) else shardings.get(name)
        if s is None:
            raise ConvertError(f"no sharding given for tensor {name!r}")
        return s

    abstract = {n: jax.ShapeDtypeStruct(s, d, sharding=sharding_of(n, s, d)) for n, s, d in specs}
    ocp = orbax_v1()
    ctx = ocp.Context()
    ctx.pytree.loading.partial_load = True
    with ctx:
        return dict(ocp.load(os.path.join(path, TENSORS), abstract))


def _check_names(specs, cfg, path):
    from flax import nnx

    from v4jax.io.checkpoint import check_names, hf_rules
    from v4jax.model.transformer import Transformer

    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    expected = {r.name for r in hf_rules(abstract)}
    have = {n for n, _, _ in specs}
    if not cfg.n_mtp_layers:
        specs = [s for s in specs if not s[0].startswith("mtp.")]
        have = {n for n, _, _ in specs}
    check_names(expected, have, str(path), error=ConvertError)
    return specs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m v4jax.io.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="src", required=True, help="source directory (safetensors or v4jax Orbax)")
    p.add_argument("--to", dest="dst", required=True, help="target directory")
    p.add_argument("--format", default="orbax", choices=["orbax", "hf", "official"])
    p.add_argument("--dtype", default=None, choices=sorted(DTYPE_NAMES),
                   help="dtype of de-quantised FP8/FP4/BF16-class tensors (FP32-class stay float32); "
                        "default: keep each tensor's source dtype (FP8/FP4 -> bfloat16)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size")
    p.add_argument("--batch-mb", type=float, default=1024.0, help="tensors per Orbax save / load call")
    p.add_argument("--compress", action="store_true", help="zstd-compress the Orbax checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --to (once the new output is complete)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    # checked here too so the message names the flag the user typed; the smallest shard is 1 MiB
    # (a few hundred tensors of a tiny model already at 0.001 GB)
    for flag, v, least in (("--max-shard-gb", args.max_shard_gb, 2**-10), ("--batch-mb", args.batch_mb, 2**-10)):
        if not v >= least:  # also NaN
            print(f"error: {flag} must be at least {least:g}, got {v:g}", file=sys.stderr)
            return 2
    t0 = time.perf_counter()
    try:
        rec = convert(args.src, args.dst, fmt=args.format, dtype=args.dtype,
                      max_shard_bytes=int(args.max_shard_gb * 2**30), batch_bytes=int(args.batch_mb * 2**20),
                      progress=not args.no_progress, compress=args.compress, overwrite=args.overwrite)
    except (ValueError, OSError) as e:  # ConvertError, ReleaseError, CheckpointError, ConfigError; disk errors
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
