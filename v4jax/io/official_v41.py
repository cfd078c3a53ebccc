"""DeepSeek-V4.1 weights under the official names (DeepSeek's V4.1 `inference/model.py` modules,
architecture.md §12.6) into `V41Transformer`: unquantised tensors (fp32 / bf16) as the golden fixtures
and a converted checkpoint hold them, or the release's quantised ones through `dequantize_release_v41`. Matrices are stored [out, in] there and [in, out] here; routed
experts one module per expert there, stacked here; `wo_a` [g * o_lora, H c / g] there, [g, H c / g,
o_lora] here; the Engram table FP8 rows with one scale per 32 columns there, the product here."""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
from flax import nnx

from v4jax.io.quant import E4M3_VALUES, QuantError, dequant_fp4, dequant_fp8_block, ue8m0_to_float
from v4jax.model.v41 import V41Transformer, engram_table_rows
from v4jax.model.vision import load_vision_params

ENGRAM_SCALE_BLOCK = 32  # columns per Engram table scale (release: 1 x 32 blocks)
FP8_BLOCK_V41 = 32  # V4.1's FP8 weights: one UE8M0 scale per 32 x 32 block (V4: 128 x 128)
FP4_BLOCK_V41 = 32  # MXFP4 experts: one scale per 32 inputs


def dequantize_release_v41(tensors: Mapping[str, np.ndarray], out_dtype=np.float32) -> dict[str, np.ndarray]:
    """The release's tensors (official names) -> unquantised ones for `load_official_v41`. Each role's block
    size is asserted from the scale's shape, never taken from `quantization_config` alone: FP8 matrices
    (`X.weight` float8_e4m3fn + `X.scale` UE8M0) in 32 x 32 blocks; routed experts MXFP4 (two E2M1 per
    byte, scales per 32 inputs); the Engram tables FP8 rows with a scale per 32 columns, kept as stored
    (the loader applies their scales). Other tensors pass unchanged; the `.scale` tensors are consumed.
    QuantError naming the tensor on a scale whose shape is not its role's."""
    out: dict[str, np.ndarray] = {}
    for name, w in tensors.items():
        if name.endswith(".scale") and name[:-len(".scale")] + ".weight" in tensors:
            if name.endswith("engram.embed.scale"):
                out[name] = np.asarray(ue8m0_to_float(w) if w.dtype.itemsize == 1 else w, np.float32)
            continue
        scale = tensors.get(name[:-len(".weight")] + ".scale") if name.endswith(".weight") else None
        if scale is None:
            out[name] = w
            continue
        w = np.asarray(w)
        try:
            if name.endswith("engram.embed.weight"):  # rows x head_dim codes; [rows, head_dim / 32] scales
                if tuple(scale.shape) != (w.shape[0], -(-w.shape[1] // ENGRAM_SCALE_BLOCK)):
                    raise QuantError(f"scale {tuple(scale.shape)} is not one per {ENGRAM_SCALE_BLOCK} columns of a row")
                out[name] = E4M3_VALUES[w.view(np.uint8)] if w.dtype.itemsize == 1 and w.dtype != np.int8 else w
            elif ".ffn.experts." in name:
                out[name] = dequant_fp4(w, scale, FP4_BLOCK_V41, out_dtype)
            else:
                out[name] = dequant_fp8_block(w, scale, FP8_BLOCK_V41, out_dtype)
        except QuantError as e:
            raise QuantError(f"V4.1 release tensor {name!r}: {e}") from None
    return out


def _t(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.T)


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


def load_official_v41(model: V41Transformer, tensors: Mapping[str, np.ndarray]) -> None:
    """Set every parameter and buffer of `model` from `tensors` (official names, unquantised; extra
    tensors such as the vision tower's or DSpark's are left for their own modules). ValueError naming
    the tensor when one is missing or has the wrong shape."""
    cfg = model.cfg
    state = nnx.state(model)
    for path, var in nnx.to_flat_state(state):
        if path[0] in ("vision", "aligner"):
            continue  # the vision tower's own loader, below
        key, build = _official(path, cfg, tensors)
        if key not in tensors:
            raise ValueError(f"V4.1 checkpoint lacks {key!r} (for {'.'.join(map(str, path))})")
        value = build()
        if tuple(value.shape) != tuple(var.value.shape):
            raise ValueError(f"V4.1 tensor {key!r} gives shape {tuple(value.shape)} for "
                             f"{'.'.join(map(str, path))}, which is {tuple(var.value.shape)}")
        var.value = np.asarray(value).astype(var.value.dtype)
    nnx.update(model, state)
    if cfg.vision_n_layers:
        load_vision_params(model.vision, model.aligner, dict(tensors))
