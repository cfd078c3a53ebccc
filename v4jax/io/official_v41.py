"""DeepSeek-V4.1 weights under the official names (DeepSeek's V4.1 `inference/model.py` modules,
architecture.md §12.6) into `V41Transformer`: unquantised tensors (fp32 / bf16) as the golden fixtures
and a converted checkpoint hold them, or the release's quantised ones through `dequantize_release_v41`. Matrices are stored [out, in] there and [in, out] here; routed
experts one module per expert there, stacked here; `wo_a` [g * o_lora, H c / g] there, [g, H c / g,
o_lora] here; the Engram table FP8 rows with one scale per 32 columns there, the product here. The way
back: `official_tensors_v41` (a model's tensors under the official names) and `write_release_v41` (the
release's quantised layout, role by role)."""

from __future__ import annotations

import re
from typing import Callable, Iterable, Iterator, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from v4jax.io.checkpoint import CheckpointError
from v4jax.io.official import Format, ReleaseError, read_stored, read_stored_rows
from v4jax.io.quant import (E4M3_VALUES, FP8_DTYPE, UE8M0_DTYPE, QuantError, dequant_fp4, dequant_fp8_block, quant_fp4,
                            quant_fp8_block, quant_fp8_rows, ue8m0_to_float)
from v4jax.io.sources import Kind, TensorSource
from v4jax.io.tensorfile import TensorFileError, open_directory
from v4jax.config import RunOptions
from v4jax.config_v41 import V41Config
from v4jax.model.v41 import V41Transformer, engram_table_rows, stack_dims
from v4jax.model.vision import load_vision_params, vision_tensors

ENGRAM_SCALE_BLOCK = 32  # columns per Engram table scale (release: 1 x 32 blocks)
FP8_BLOCK_V41 = 32  # V4.1's FP8 weights: one UE8M0 scale per 32 x 32 block (V4: 128 x 128)
FP4_BLOCK_V41 = 32  # MXFP4 experts: one scale per 32 inputs


V41_MODEL_TYPES = ("deepseek_v41", "deepseek_v41_text")
# keys only a V4.1 config has (the inference spelling carries no model_type)
V41_ONLY_KEYS = ("kv_source_layers", "index_source_layers", "candidate_source_layer", "engram_layer_ids")


def is_v41_config(d: object) -> bool:
    """Whether a config.json dict describes a DeepSeek-V4.1 model (either spelling, §12.1)."""
    if not isinstance(d, dict):
        return False
    if d.get("model_type") in V41_MODEL_TYPES:
        return True
    # HF-style: the text model's keys in text_config; a train.py run: in its config.json's model table
    text = next((d[k] for k in ("text_config", "model") if isinstance(d.get(k), dict)), d)
    return any(k in text for k in V41_ONLY_KEYS)


def read_config_dict(checkpoint: str) -> dict | None:
    """CHECKPOINT/config.json as a dict; None when absent, unreadable or not a JSON object (the config
    reader that runs next names the problem)."""
    import json
    import os

    try:
        with open(os.path.join(checkpoint, "config.json")) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def is_v41_checkpoint(checkpoint: str) -> bool:
    """Whether a checkpoint directory holds a DeepSeek-V4.1 model (by its config.json)."""
    return is_v41_config(read_config_dict(checkpoint))


def v41_weights_dtype(d: dict, specs: Mapping[str, tuple] | None = None) -> str:
    """The dtype a V4.1 model loaded from a checkpoint runs in by default: the config's `torch_dtype` /
    `dtype` (at the top or in `text_config`); without one (the inference spelling names none), the
    dtype most of the checkpoint's non-float32-class weights have as read (`specs`: FP8/FP4 read as
    bfloat16, the release's compute dtype), else bfloat16."""
    from collections import Counter

    from v4jax.config import hf_weights_dtype

    text = d.get("text_config") if isinstance(d.get("text_config"), dict) else {}
    named = {k: v for src in (text, d) for k, v in src.items() if k in ("torch_dtype", "dtype")}
    if named:
        return hf_weights_dtype(named)
    found = Counter(np.dtype(dt).name for n, (_, dt) in (specs or {}).items()
                    if not fp32_class(n) and (np.dtype(dt).kind == "f" or np.dtype(dt) == ml_dtypes.bfloat16))
    return found.most_common(1)[0][0] if found else "bfloat16"


def dequantize_tensor_v41(name: str, w: np.ndarray, scale: np.ndarray | None, out_dtype=np.float32) -> np.ndarray:
    """One release tensor (official name) with its `.scale` (or None: stored unquantised) -> the value
    `load_official_v41` reads. The role comes from the name, the block size is asserted from the scale's
    shape: FP8 matrices in 32 x 32 blocks, routed experts MXFP4 (two E2M1 per byte, a scale per 32
    inputs), the Engram tables FP8 rows kept as their E4M3 values (their 1 x 32 scales are the separate
    `engram.embed.scale` tensor, which the loader applies). QuantError naming the tensor otherwise."""
    if scale is None:
        return w
    w = np.asarray(w)
    try:
        if name.endswith("engram.embed.weight"):  # rows x head_dim codes; [rows, head_dim / 32] scales
            if tuple(scale.shape) != (w.shape[0], -(-w.shape[1] // ENGRAM_SCALE_BLOCK)):
                raise QuantError(f"scale {tuple(scale.shape)} is not one per {ENGRAM_SCALE_BLOCK} columns of a row")
            if w.dtype.itemsize != 1 or w.dtype == np.int8:
                return w
            out, codes = np.empty(w.shape, out_dtype), w.view(np.uint8)
            step = max(1, (1 << 24) // max(1, w.shape[1]))
            for r0 in range(0, w.shape[0], step):  # a few rows at a time: no float32 copy of a whole table
                out[r0:r0 + step] = E4M3_VALUES[codes[r0:r0 + step]]
            return out
        if ".ffn.experts." in name:
            return dequant_fp4(w, scale, FP4_BLOCK_V41, out_dtype)
        return dequant_fp8_block(w, scale, FP8_BLOCK_V41, out_dtype)
    except QuantError as e:
        raise QuantError(f"V4.1 release tensor {name!r}: {e}") from None


FP32_ROLES = ("hc_attn_fn", "hc_attn_base", "hc_attn_scale", "hc_ffn_fn", "hc_ffn_base", "hc_ffn_scale",
              "attn.attn_sink", "ffn.gate.bias", "ffn.gate.bias_vl", "engram.embed.scale")


def fp32_class(name: str) -> bool:
    """Tensors kept in float32 whatever dtype a conversion asks for (mHC, sinks, router biases, the Engram
    tables' scales), as for V4 (architecture.md §9)."""
    return name.endswith(FP32_ROLES)


def official_names_v41(model: V41Transformer) -> set[str]:
    """The official tensor names `load_official_v41` reads for `model` (concrete or abstract), the
    vision tower's apart (its loader checks those)."""
    cfg, names = model.cfg, set()
    for path, _ in nnx.to_flat_state(nnx.state(model)):
        if path[0] in ("vision", "aligner"):
            continue
        for key in _sources(path, model, {})[0]:
            if ".ffn.experts.0." in key:
                n = cfg.n_routed_experts if key.startswith("layers.") else cfg.dspark_n_routed_experts
                names |= {key.replace(".experts.0.", f".experts.{e}.") for e in range(n)}
            elif key.endswith("engram.embed.weight"):
                names |= {key, key[:-len("weight")] + "scale"}
            else:
                names.add(key)
    return names


def _scale_of(name: str) -> str | None:
    """The `.scale` tensor that quantises `name` in the release layout (None for non-weights)."""
    return name[:-len(".weight")] + ".scale" if name.endswith(".weight") else None


def engram_scale_values(scale: np.ndarray) -> np.ndarray:
    """An Engram table's scales as float32 (UE8M0 bytes in the release, already floats unquantised)."""
    return np.asarray(ue8m0_to_float(scale) if scale.dtype.itemsize == 1 else scale, np.float32)


def _is_consumed_scale(name: str, names) -> bool:
    """A weight's block scale, folded into the weight on read (the Engram tables' scales stay: §12.6)."""
    return name.endswith(".scale") and not name.endswith("engram.embed.scale") and \
        name[:-len(".scale")] + ".weight" in names


def dequantize_release_v41(tensors: Mapping[str, np.ndarray], out_dtype=np.float32) -> dict[str, np.ndarray]:
    """The release's tensors (official names) -> unquantised ones for `load_official_v41`
    (`dequantize_tensor_v41` each; the weights' `.scale` tensors are consumed, the Engram tables' kept
    as float32)."""
    out: dict[str, np.ndarray] = {}
    for name, w in tensors.items():
        if _is_consumed_scale(name, tensors):
            continue
        if name.endswith("engram.embed.scale") and name[:-len(".scale")] + ".weight" in tensors:
            out[name] = engram_scale_values(w)
            continue
        scale_name = _scale_of(name)
        out[name] = dequantize_tensor_v41(name, w, tensors.get(scale_name) if scale_name else None, out_dtype)
    return out


class V41Source(TensorSource):
    """A V4.1 safetensors directory under the official names (the release, FP8/FP4 with block scales,
    or an unquantised one such as the golden fixtures), one tensor read and de-quantised at a time.
    dtype: what FP8/FP4 weights de-quantise to (default bfloat16, the release's compute dtype); other
    tensors keep their stored dtype unless `dtype` is given for the floating ones."""
    kind = Kind.SAFETENSORS
    batch_bytes = 0

    def __init__(self, directory: str, dtype=None):
        try:
            self.files = open_directory(directory)
        except TensorFileError as e:
            raise CheckpointError(str(e)) from None
        names = set(self.files)
        self.out_dtype = np.dtype(ml_dtypes.bfloat16 if dtype is None else dtype)
        self.keep_dtype = dtype is None
        self.specs, self.quantised = {}, set()
        for name, tf in self.files.items():
            if _is_consumed_scale(name, names):
                continue
            shape, stored = tuple(tf.shape(name)), tf.dtype(name)
            quantised = _scale_of(name) in names and stored.itemsize == 1  # FP8 codes / packed FP4
            if quantised:
                self.quantised.add(name)
            if quantised and ".ffn.experts." in name:
                shape = (shape[0], 2 * shape[1])  # two E2M1 codes per byte
            if name.endswith("engram.embed.scale"):
                dt = np.dtype(np.float32)
            elif quantised or (not self.keep_dtype and np.issubdtype(stored, np.floating) and not fp32_class(name)):
                dt = self.out_dtype
            else:
                dt = stored
            self.specs[name] = (shape, dt)
        self._attach(directory)

    def read_rows(self, name: str, lo: int, hi: int) -> np.ndarray | None:
        """Rows [lo, hi) of a tensor as `read` gives it, reading only those rows, for the tensors whose
        values are row by row (unquantised ones, an Engram table's FP8 rows and their scales); None for
        the block-quantised weights."""
        if name in self.quantised and not name.endswith("engram.embed.weight"):
            return None
        w = read_stored_rows(self.files[name], name, lo, hi)
        if name.endswith("engram.embed.scale"):
            return engram_scale_values(w)
        if name in self.quantised:  # the Engram table's E4M3 codes, kept as their values
            return E4M3_VALUES[w.view(np.uint8)].astype(self.specs[name][1])
        return w.astype(self.specs[name][1], copy=False)

    def read(self, names):
        out = {}
        for name in names:
            w = read_stored(self.files[name], name)
            if name.endswith("engram.embed.scale"):
                out[name] = engram_scale_values(w)
                continue
            scale_name = _scale_of(name)
            scale = read_stored(self.files[scale_name], scale_name) if name in self.quantised else None
            out[name] = np.asarray(dequantize_tensor_v41(name, w, scale, self.out_dtype)).astype(
                self.specs[name][1], copy=False)
        return out


class SourceTensors(Mapping):
    """A TensorSource as a read-on-demand mapping (what `load_official_v41` takes): host memory holds
    the tensors of one model variable at a time."""

    def __init__(self, source: TensorSource):
        self.source = source

    def __getitem__(self, name):
        if name not in self.source.specs:
            raise KeyError(name)
        return self.source.read([name])[name]

    def __contains__(self, name):
        return name in self.source.specs

    def __iter__(self):
        return iter(self.source.specs)

    def __len__(self):
        return len(self.source.specs)

    def rows(self, name: str) -> int | None:
        """The rows of `name` when the source reads a range of them alone (`read_rows`), else None."""
        if not hasattr(self.source, "read_rows") or self.source.read_rows(name, 0, 0) is None:
            return None
        return self.source.specs[name][0][0]

    def read_rows(self, name: str, lo: int, hi: int) -> np.ndarray:
        return self.source.read_rows(name, lo, hi)


def _t(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.T)


def layer_paths(path: tuple, plan) -> tuple[list[tuple], tuple[int, ...]]:
    """A parameter path -> (the per-layer paths its value is built from, its stack axes). A stacked
    backbone parameter (`segments.{s}.runs.{q}...`, architecture.md §12.3) comes from its run's layers
    (`layers.{i}...`) in the run's [repeats, count] order (axes of size 1 dropped); any other path is
    its own, with no stack axes. plan: the model's `layer_plan`."""
    if path[0] != "segments":
        return [path], ()
    run = plan[path[1]][path[3]]  # layer ids [repeats][count]
    return [("layers", i) + tuple(path[4:]) for ids in run for i in ids], stack_dims(run)


def _sources(path: tuple, model: V41Transformer, tensors: Mapping[str, np.ndarray]):
    """Our parameter path -> (the official tensors it comes from, how to build each layer's value, the
    stack axes)."""
    paths, lead = layer_paths(path, model.plan)
    parts = [_official(p, model.cfg, tensors) for p in paths]
    return [k for k, _ in parts], [b for _, b in parts], lead


class Rows(NamedTuple):
    """A value built a block of rows at a time (an Engram table), instead of whole."""

    n: int  # rows of the value
    read: Callable[[int, int], np.ndarray]  # (lo, hi) -> the value's rows [lo, hi)


def _table_rows(tensors: SourceTensors, key: str, stored: int, lo: int, hi: int) -> np.ndarray:
    """Rows [lo, hi) of an Engram table: the stored rows times their scales per 32 columns, the padding
    rows past the `stored` hashed ones zero."""
    cols = tensors.source.specs[key][0][1]
    out = np.zeros((hi - lo, cols), np.float32)
    top = min(hi, stored)
    if lo < top:
        w = tensors.read_rows(key, lo, top).astype(np.float32)
        scale = tensors.read_rows(key[:-len("weight")] + "scale", lo, top)  # [rows, cols / 32]
        out[:top - lo] = (w.reshape(top - lo, -1, ENGRAM_SCALE_BLOCK) * scale[..., None]).reshape(top - lo, cols)
    return out


ROWS_BYTES = 256 << 20  # float32 bytes of one block of rows built at a time


def _placed(builds: list[Callable[[], np.ndarray] | Rows], lead: tuple[int, ...], shape: tuple[int, ...], dtype,
            keys: list[str], name: str, sharding=None) -> jax.Array:
    """A variable [*lead, ...] built one layer at a time (lead = (): one value), so host memory holds one
    layer's tensors beside what the variable keeps: the whole variable (no sharding), or each of this
    process's devices' slice of every layer (a sharding: the slices go straight to their devices)."""
    n = len(lead)
    if sharding is None:
        slots = {None: tuple(slice(0, k) for k in shape)}
    else:
        slots = {d: tuple(i if isinstance(i, slice) else slice(i, i + 1) for i in idx)
                 for d, idx in sharding.addressable_devices_indices_map(shape).items()}
    ranges = {d: [range(*s.indices(k)) for s, k in zip(idx, shape)] for d, idx in slots.items()}
    bufs = {d: np.empty([len(r) for r in rs], dtype) for d, rs in ranges.items()}
    for k, (build, key) in enumerate(zip(builds, keys)):
        at = np.unravel_index(k, lead)  # the layer's place in the stack
        if isinstance(build, Rows):  # a block of rows at a time, each into the devices that hold them
            if (build.n,) + shape[n + 1:] != shape[n:]:
                raise ValueError(f"V4.1 tensor {key!r} gives {build.n} rows for {name}, whose layers are {shape[n:]}")
            step = max(1, ROWS_BYTES // (4 * max(1, int(np.prod(shape[n + 1:], dtype=np.int64)))))
            for lo in range(0, build.n, step):
                hi = min(build.n, lo + step)
                part = build.read(lo, hi)
                for d, rs in ranges.items():
                    rows = rs[n]  # the device's rows of the value (contiguous)
                    a, b = max(lo, rows.start), min(hi, rows.stop)
                    if a < b and all(i in r for i, r in zip(at, rs)):
                        local = tuple(r.index(i) for i, r in zip(at, rs))
                        bufs[d][local + (slice(a - rows.start, b - rows.start),)] = \
                            part[(slice(a - lo, b - lo),) + slots[d][n + 1:]].astype(dtype)
                del part
            continue
        value = build()
        if tuple(value.shape) != shape[n:]:
            raise ValueError(f"V4.1 tensor {key!r} gives shape {tuple(value.shape)} for " +
                             (f"a layer of {name}, whose layers are {shape[n:]}" if n else f"{name}, which is {shape}"))
        for d, rs in ranges.items():
            if all(i in r for i, r in zip(at, rs)):
                local = tuple(r.index(i) for i, r in zip(at, rs))
                bufs[d][local] = np.asarray(value[slots[d][n:]]).astype(dtype)
        del value
    if sharding is None:
        return jnp.asarray(bufs[None])
    return jax.make_array_from_single_device_arrays(shape, sharding, [jax.device_put(b, d) for d, b in bufs.items()])


def _official(path: tuple, cfg, tensors: Mapping[str, np.ndarray]) -> tuple[str, Callable[[], np.ndarray]]:
    """Our parameter path -> (the official tensor name it comes from, how to build our value)."""
    name = ".".join(str(p) for p in path)
    get = tensors.__getitem__
    if name == "embed.embedding":
        return "embed.weight", lambda: get("embed.weight")
    if path[0] in ("layers", "dspark"):  # a backbone block or a DSpark stage (official `mtp.{k}`)
        i, rest = path[1], ".".join(str(p) for p in path[2:])
        base = f"layers.{i}." if path[0] == "layers" else f"mtp.{i}."
        n_experts = cfg.n_routed_experts if path[0] == "layers" else cfg.dspark_n_routed_experts
        if rest.startswith(("attn_hc.", "ffn_hc.")):
            unit, field = rest.split(".")
            key = f"{base}hc_{unit[:-3]}_{field}"
            return key, lambda: get(key)
        if rest == "attn.sinks":
            return base + "attn.attn_sink", lambda: get(base + "attn.attn_sink")
        if rest == "attn.wo_a":
            key, g = base + "attn.wo_a.weight", cfg.o_groups
            return key, lambda: np.ascontiguousarray(get(key).reshape(g, cfg.o_lora_rank, -1).transpose(0, 2, 1))
        if rest in ("ffn.experts.w1", "ffn.experts.w2", "ffn.experts.w3"):
            w = rest.rsplit(".", 1)[1]
            key = f"{base}ffn.experts.0.{w}.weight"
            return key, lambda: np.stack([get(f"{base}ffn.experts.{e}.{w}.weight").T
                                          for e in range(n_experts)])
        if rest == "engram.table":
            key = base + "engram.embed.weight"
            stored = tensors.rows(key) if isinstance(tensors, SourceTensors) else None
            if stored is not None:  # built a block of rows at a time: the released tables are 98 GB each
                return key, Rows(engram_table_rows(stored), lambda lo, hi: _table_rows(tensors, key, stored, lo, hi))

            def table():
                w = get(key).astype(np.float32)
                scale = get(base + "engram.embed.scale").astype(np.float32)  # [rows, cols / 32]
                table = (w.reshape(w.shape[0], -1, ENGRAM_SCALE_BLOCK) * scale[..., None]).reshape(w.shape)
                return np.pad(table, ((0, engram_table_rows(w.shape[0]) - w.shape[0]), (0, 0)))  # never-hashed rows
            return key, table
        if rest == "markov_embed":
            return base + "markov_head.embed.weight", lambda: get(base + "markov_head.embed.weight")
        if rest in ("markov_head.kernel", "confidence.kernel"):
            key = base + ("markov_head.head.weight" if rest == "markov_head.kernel" else "confidence_head.proj.weight")
            return key, lambda: _t(get(key))
        if rest.endswith(".kernel"):
            key = base + rest[:-len(".kernel")] + ("" if rest == "ffn.gate.weight.kernel" else ".weight")
            return key, lambda: _t(get(key))
        return base + rest, lambda: get(base + rest)
    if name.endswith(".kernel"):
        key = name[:-len("kernel")] + "weight"
        return key, lambda: _t(get(key))
    return name, lambda: get(name)


def _to_official(path: tuple, cfg, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The inverse of `_official`: one layer's value of our parameter `path` -> the official tensors it
    is stored as (an unquantised Engram table with unit scales: the release quantises it on writing)."""
    name = ".".join(str(p) for p in path)
    if name == "embed.embedding":
        return [("embed.weight", value)]
    if path[0] in ("layers", "dspark"):
        i, rest = path[1], ".".join(str(p) for p in path[2:])
        base = f"layers.{i}." if path[0] == "layers" else f"mtp.{i}."
        if rest.startswith(("attn_hc.", "ffn_hc.")):
            unit, field = rest.split(".")
            return [(f"{base}hc_{unit[:-3]}_{field}", value)]
        if rest == "attn.sinks":
            return [(base + "attn.attn_sink", value)]
        if rest == "attn.wo_a":  # [g, H c / g, o_lora] -> [g * o_lora, H c / g]
            return [(base + "attn.wo_a.weight",
                     np.ascontiguousarray(value.transpose(0, 2, 1).reshape(-1, value.shape[1])))]
        if rest in ("ffn.experts.w1", "ffn.experts.w2", "ffn.experts.w3"):  # [E, in, out] -> E x [out, in]
            w = rest.rsplit(".", 1)[1]
            return [(f"{base}ffn.experts.{e}.{w}.weight", _t(value[e])) for e in range(value.shape[0])]
        if rest == "engram.table":
            rows = cfg.engram_num_embeddings[cfg.engram_layer_ids.index(i)]  # the hashed rows, no padding
            cols = value.shape[1] // ENGRAM_SCALE_BLOCK
            return [(base + "engram.embed.weight", np.ascontiguousarray(value[:rows])),
                    (base + "engram.embed.scale", np.ones((rows, cols), np.float32))]
        if rest == "markov_embed":
            return [(base + "markov_head.embed.weight", value)]
        if rest in ("markov_head.kernel", "confidence.kernel"):
            key = "markov_head.head.weight" if rest == "markov_head.kernel" else "confidence_head.proj.weight"
            return [(base + key, _t(value))]
        if rest.endswith(".kernel"):
            key = base + rest[:-len(".kernel")] + ("" if rest == "ffn.gate.weight.kernel" else ".weight")
            return [(key, _t(value))]
        return [(base + rest, value)]
    if name.endswith(".kernel"):
        return [(name[:-len("kernel")] + "weight", _t(value))]
    return [(name, value)]


def official_tensors_v41(model: V41Transformer) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor of `model` under the official names, unquantised, in the model's dtypes (host numpy,
    one variable at a time): what `load_official_v41` reads back to the same model. A stacked variable
    is split into its layers; the Engram tables lose their never-hashed padding rows and get unit
    scales; the vision tower's tensors come from `vision_tensors`."""
    state = nnx.state(model)
    for path, var in nnx.to_flat_state(state):
        if path[0] in ("vision", "aligner"):
            continue
        paths, lead = layer_paths(path, model.plan)
        value = np.asarray(jax.device_get(var.get_value()))
        value = value.reshape((-1,) + value.shape[len(lead):]) if lead else value[None]
        for p, v in zip(paths, value):
            yield from _to_official(p, model.cfg, v)
    if model.cfg.vision_n_layers:
        yield from vision_tensors(model.vision, model.aligner).items()


# --------------------------------------------------------------------------------------------------
# The release layout, written (architecture.md §12.6)

_L41 = r"(?:layers|mtp)\.\d+\."
_FORMAT_TABLE_V41: list[tuple[re.Pattern, Format]] = [(re.compile(p), f) for p, f in [
    (_L41 + r"ffn\.experts\.\d+\.w[123]\.weight", Format.FP4),
    (_L41 + r"attn\.(?:wq_a|wq_b|wkv|wo_a|wo_b|indexer\.wq_b)\.weight", Format.FP8),
    (_L41 + r"ffn\.shared_experts\.w[123]\.weight", Format.FP8),
    (_L41 + r"engram\.(?:embed|wkv)\.weight", Format.FP8),
    (r"mtp\.\d+\.main_proj\.weight", Format.FP8),
]]
# config.json's entry for this layout, as the release writes it (architecture.md §12.6)
V41_QUANTIZATION_CONFIG = {"quant_method": "fp8", "activation_scheme": "dynamic",
                           "weight_block_size": [FP8_BLOCK_V41, FP8_BLOCK_V41], "scale_fmt": "ue8m0",
                           "expert_dtype": "fp4"}


def release_format_v41(name: str) -> Format:
    """How the V4.1 release stores a tensor (official name): FP8 (32 x 32 blocks; the Engram tables 1 x 32),
    MXFP4 (routed experts), FP32 (`fp32_class`) or BF16 (everything else: embeddings, head, norms, router
    weights, compressors, the indexer's other projections, Engram's q/k weights, DSpark's heads, the
    vision tower)."""
    if fp32_class(name):
        return Format.FP32
    for pattern, fmt in _FORMAT_TABLE_V41:
        if pattern.fullmatch(name):
            return fmt
    return Format.BF16


def release_tensors_v41(name: str, a: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """One unquantised tensor (official name, not an Engram table) -> its stored tensors in the release."""
    fmt, a = release_format_v41(name), np.asarray(a)
    if not (np.issubdtype(a.dtype, np.floating) or a.dtype == np.dtype(ml_dtypes.bfloat16)):
        raise ReleaseError(f"tensor {name!r} has dtype {a.dtype}, expected a floating-point dtype")
    try:
        if fmt is Format.FP8:
            return list(zip((name, _scale_of(name)), quant_fp8_block(a, FP8_BLOCK_V41)))
        if fmt is Format.FP4:
            return list(zip((name, _scale_of(name)), quant_fp4(a, FP4_BLOCK_V41)))
    except QuantError as e:
        raise ReleaseError(f"tensor {name!r}: {e}") from None
    return [(name, a.astype(np.float32 if fmt is Format.FP32 else ml_dtypes.bfloat16))]


def engram_release_tensors(name: str, weight: np.ndarray, scale: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """An Engram table given as (weight, float scales per 32 columns), the way every V4.1 source holds it
    -> its release storage: the table they multiply to, re-quantised as FP8 rows with UE8M0 scales per 32
    columns (the same bytes again when the scales are canonical, `v4jax.io.quant`)."""
    rows, cols = weight.shape
    if tuple(scale.shape) != (rows, -(-cols // ENGRAM_SCALE_BLOCK)):
        raise ReleaseError(f"tensor {name[:-len('weight')] + 'scale'!r} has shape {tuple(scale.shape)}, expected "
                           f"one scale per {ENGRAM_SCALE_BLOCK} columns of {name!r} {tuple(weight.shape)}")
    out_w = np.empty((rows, cols), FP8_DTYPE)
    out_s = np.empty((rows, scale.shape[1]), UE8M0_DTYPE)
    step = max(1, (1 << 22) // max(cols, 1))
    try:
        for r0 in range(0, rows, step):  # a few MiB of float32 rows at a time
            part = slice(r0, r0 + step)
            table = (weight[part].astype(np.float32).reshape(-1, cols // ENGRAM_SCALE_BLOCK, ENGRAM_SCALE_BLOCK)
                     * engram_scale_values(scale[part])[..., None]).reshape(-1, cols)
            out_w[part], out_s[part] = quant_fp8_rows(table, ENGRAM_SCALE_BLOCK)
    except QuantError as e:
        raise ReleaseError(f"tensor {name!r}: {e}") from None
    return [(name, out_w), (name[:-len("weight")] + "scale", out_s)]


def _release_groups_v41(tensors: Iterable[tuple[str, np.ndarray]]) -> Iterator[tuple[str, list]]:
    """(name, stored tensors) per weight, streaming; an Engram table's weight and scale are held until
    both have arrived (they are quantised together)."""
    held: dict[str, np.ndarray] = {}
    for name, a in tensors:
        if name.endswith(("engram.embed.weight", "engram.embed.scale")):
            stem, part = name.rsplit(".", 1)
            other = f"{stem}.{'scale' if part == 'weight' else 'weight'}"
            if other not in held:
                held[name] = a
                continue
            weight, scale = (a, held.pop(other)) if part == "weight" else (held.pop(other), a)
            yield stem + ".weight", engram_release_tensors(stem + ".weight", weight, scale)
            continue
        yield name, release_tensors_v41(name, a)
    if held:
        name = next(iter(held))
        raise ReleaseError(f"tensor {name!r} came without its Engram partner "
                           f"{name.rsplit('.', 1)[0] + ('.scale' if name.endswith('weight') else '.weight')!r}")


def write_release_v41(directory: str, tensors: Iterable[tuple[str, np.ndarray]], *, max_shard_bytes: int = 5 << 30,
                      config: dict | None = None, overwrite: bool = False):
    """Quantise and write unquantised official-name tensors in the V4.1 release layout (`release_format_v41`;
    a weight and its scales share a shard), streaming. `config`: a config.json dict to write alongside,
    with the layout's `quantization_config`."""
    from v4jax.io.official import _write

    return _write(directory, _release_groups_v41(tensors), max_shard_bytes,
                  None if config is None else {**config, "quantization_config": V41_QUANTIZATION_CONFIG}, overwrite)


def load_official_v41(model: V41Transformer, tensors: Mapping[str, np.ndarray], shardings: dict | None = None) -> None:
    """Set every parameter and buffer of `model` (concrete, or abstract from `nnx.eval_shape`) from
    `tensors` (official names, unquantised; a read-on-demand mapping such as `SourceTensors` is read one
    variable, and for a stacked one one layer, at a time). shardings {path: NamedSharding}: each variable
    goes straight into its layout (`assemble_v41`), else onto the default device. ValueError naming the
    tensor when one is missing or has the wrong shape."""
    cfg = model.cfg
    if cfg.vision_n_layers:  # the vision tower's own loader (its fused wqkv / w1 split over modules)
        load_vision_params(model.vision, model.aligner,
                           {k: tensors[k] for k in tensors if k.startswith(("vision.", "aligner."))})
    state = nnx.state(model)
    for path, var in nnx.to_flat_state(state):
        name = ".".join(map(str, path))
        if path[0] in ("vision", "aligner"):  # loaded above: placed as they are
            value = np.asarray(var.get_value())
            keys, builds, lead = [name], [lambda value=value: value], ()
        else:
            keys, builds, lead = _sources(path, model, tensors)
            missing = [key for key in keys if key not in tensors]
            if missing:
                raise ValueError(f"V4.1 checkpoint lacks {missing[0]!r} (for {name})")
        var.set_value(_placed(builds, lead, tuple(var.shape), var.dtype, keys, name,
                              None if shardings is None else shardings[path].get_value()))
    nnx.update(model, state)


def assemble_v41(cfg: V41Config, source: TensorSource, *, mesh=None, rules=None,
                 options: RunOptions = RunOptions()) -> V41Transformer:
    """A V41Transformer for `cfg` built from `source` one variable at a time, never initialised at
    random: with a mesh and an AxisRules table each variable goes straight into the layout the table
    gives (every host reads the variable's tensors, then keeps its devices' slices)."""
    from sharding.partition import state_shardings

    model = nnx.eval_shape(lambda: V41Transformer(cfg, rngs=nnx.Rngs(0), options=options))
    shardings = None
    if mesh is not None:
        if rules is None:
            raise ValueError("assemble_v41: a mesh needs an AxisRules table (sharding.rules.get_rules)")
        shardings = dict(nnx.to_flat_state(state_shardings(nnx.state(model), mesh, rules)))

    load_official_v41(model, SourceTensors(source), shardings)
    return model
