"""FP8 / FP4 weight formats of the official DeepSeek-V4 release (architecture.md §9).

Three number formats, all decoded here by table:

* FP8 E4M3 (`float8_e4m3fn`): non-expert linear weights, one UE8M0 scale per 128x128 block
  (`scale` shape `[ceil(out/128), ceil(in/128)]`); `W[o, i] = e4m3(Wq[o, i]) * S[o//128, i//128]`.
* MXFP4 E2M1: routed-expert weights, two values per byte (element `2j` in the low nibble, `2j+1` in
  the high nibble), stored as int8 `[out, in/2]`, one UE8M0 scale per 32 inputs
  (`scale` shape `[out, ceil(in/32)]`); `W[o, i] = E2M1[nibble(o, i)] * S[o, i//32]`.
* UE8M0 (`float8_e8m0fnu`): an exponent byte `b`, value `2**(b - 127)`; `b = 255` is NaN.

Block sizes are arguments: V4.1's release uses 32 x 32 FP8 blocks and, for its Engram tables, FP8 rows
with one scale per 32 columns (`quant_fp8_rows`).

Quantisation follows the official kernels: the block scale is the smallest power of two with
`amax / scale <= FMT_MAX` (448 for E4M3, 6 for E2M1), values are divided by it, clipped to the format's
range and rounded to nearest (ties to even). Consequences:

* `quant(dequant(q, s)) == (q, s)` byte for byte whenever every scale is canonical (each block's
  largest |code| exceeds FMT_MAX / 2: 240..448 for E4M3, 4 or 6 for E2M1, or the block sits at
  the scale floor). Our own quantiser always produces such scales, so official -> bf16/fp32 -> official
  is byte-identical for checkpoints it wrote.
* `dequant(quant(w)) == w` whenever `w` is a block-scaled E4M3 / E2M1 tensor with power-of-two scales.
* One refinement makes that hold for every block: when the block maximum rounds down to FMT_MAX / 2
  (e.g. 3.2 -> 3 in E2M1), the scale is halved so the largest code is FMT_MAX (same values). The
  official kernels keep the larger scale there; such blocks de-quantise to the same values but
  re-quantise to different (equivalent) bytes. `official.requant_mismatches` counts them.
* A block whose |values| are all below `FMT_MAX * 2**-126` (an all-zero block included) gets the scale
  `2**-126` (byte 1), the floor the official FP4 kernel uses, so every scale is a normal fp32 number.

NaN / inf policy: quantisers reject non-finite input with a ValueError (checkpoint weights are
finite; E4M3FN and E2M1 have no infinity). De-quantisers propagate NaN: an E4M3 NaN code (0x7F / 0xFF)
or a NaN scale byte (255) gives NaN outputs; `count_nonfinite_codes` finds them without decoding.

Exactness of the de-quantised values: float32 holds every FP8 / FP4 value times every UE8M0 scale
exactly. bfloat16 (same exponent range as float32, 8 significant bits) holds them exactly as long as
the product is at least 2**-130 (E4M3 codes have 4 significant bits, E2M1 2); smaller products only
arise with scales below ~2**-120, which no trained weight uses.

Arrays may be numpy (the converter's path: processed in row blocks so the float32 temporaries stay a
small multiple of one block row) or, for the de-quantisers, jax arrays (jit-compatible).
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP4_MAX = 6.0  # largest E2M1 value
UE8M0_BIAS = 127
UE8M0_NAN = 255
FP8_BLOCK = 128
FP4_BLOCK = 32

FP8_DTYPE = np.dtype(ml_dtypes.float8_e4m3fn)
UE8M0_DTYPE = np.dtype(ml_dtypes.float8_e8m0fnu)
FP4_PACKED_DTYPE = np.dtype(np.int8)  # how the release stores two E2M1 codes per byte

# E2M1 code -> value (sign bit 3, exponent bits 2..1, mantissa bit 0); code 8 is -0.0.
E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                        -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
# byte -> (value of the low nibble = element 2j, value of the high nibble = element 2j+1)
E2M1_PAIRS = np.stack([E2M1_VALUES[np.arange(256) & 0xF], E2M1_VALUES[np.arange(256) >> 4]], axis=-1)
# E4M3FN byte -> value (0x7F and 0xFF are NaN)
E4M3_VALUES = np.arange(256, dtype=np.uint8).view(FP8_DTYPE).astype(np.float32)


class QuantError(ValueError):
    """Input a (de)quantiser cannot handle: wrong dtype, shape or non-finite values."""


def _is_jax(x) -> bool:
    return type(x).__module__.startswith("jax")


def _bytes(a: np.ndarray, what: str) -> np.ndarray:
    if a.dtype.itemsize != 1:
        raise QuantError(f"{what} must be a 1-byte dtype, got {a.dtype}")
    return a.view(np.uint8)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------------------
# UE8M0 scales

def ue8m0_to_float(scale) -> np.ndarray:
    """Decode UE8M0 scales (float8_e8m0fnu or their raw uint8 bytes) to float32: 2**(b-127), 255 -> NaN.
    (On jax, XLA flushes the one subnormal result, byte 0 = 2**-127, to zero; our quantisers never
    produce byte 0.)"""
    if _is_jax(scale):
        import jax.numpy as jnp
        import jax
        b = scale if scale.dtype == jnp.uint8 else jax.lax.bitcast_convert_type(scale, jnp.uint8)
        v = jnp.ldexp(jnp.ones(b.shape, jnp.float32), b.astype(jnp.int32) - UE8M0_BIAS)
        return jnp.where(b == UE8M0_NAN, jnp.nan, v)
    b = _bytes(np.asarray(scale), "a UE8M0 scale").astype(np.int32)
    nan = b == UE8M0_NAN
    v = np.ldexp(np.float32(1.0), np.where(nan, 0, b - UE8M0_BIAS)).astype(np.float32)
    v[nan] = np.nan
    return v


def _pow2_scale(amax: np.ndarray, fmt_max: float, fmt_dtype) -> np.ndarray:
    """UE8M0 bytes of the canonical block scales for block maxima `amax` (see the module docstring).

    Start from the smallest power of two s with amax / s <= fmt_max (exact: frexp, no log). If the
    block maximum then rounds down to fmt_max / 2 (e.g. 3.2 -> 3 in E2M1, 230 -> 224 in E4M3), use s / 2
    instead: the same values, now with the largest code above fmt_max / 2, which is what makes
    quantising a de-quantised tensor reproduce its bytes."""
    amax = np.maximum(amax.astype(np.float32), np.float32(fmt_max * 2.0**-126))
    mant, exp = np.frexp(amax.astype(np.float64) / fmt_max)  # ratio = mant * 2**exp, mant in [0.5, 1)
    e = np.where(mant == 0.5, exp - 1, exp)  # ceil(log2(ratio))
    top = (np.ldexp(amax, -e).astype(fmt_dtype).astype(np.float32) == fmt_max / 2) & (e > -126)
    e = e - top
    if e.size and e.max() > UE8M0_NAN - 1 - UE8M0_BIAS:
        raise QuantError(f"block maximum {float(amax.max())} needs a scale beyond UE8M0's range")
    return (e + UE8M0_BIAS).astype(np.uint8)


def _check_finite(w: np.ndarray, what: str):
    if not np.isfinite(w).all():
        raise QuantError(f"{what}: cannot quantise non-finite values (NaN or inf)")


def count_nonfinite_codes(q: np.ndarray, scale: np.ndarray, kind: str) -> int:
    """Number of NaN codes (E4M3 0x7F/0xFF; kind 'fp8') plus NaN scale bytes (255) in a stored tensor."""
    n = int(np.count_nonzero(_bytes(np.asarray(scale), "scale") == UE8M0_NAN))
    if kind == "fp8":
        n += int(np.count_nonzero((_bytes(np.asarray(q), "FP8 weight") & 0x7F) == 0x7F))
    return n


# --------------------------------------------------------------------------------------------------
# FP8 E4M3 with 128x128 block scales

def _check_2d(a, what: str):
    if a.ndim != 2:
        raise QuantError(f"{what} must be 2-D [out, in], got shape {tuple(a.shape)}")


def dequant_fp8_block(w_fp8, scale_e8m0, block: int = FP8_BLOCK, out_dtype: Any = ml_dtypes.bfloat16):
    """[out, in] E4M3 codes x [ceil(out/block), ceil(in/block)] UE8M0 scales -> [out, in] out_dtype."""
    _check_2d(w_fp8, "FP8 weight")
    out, fan_in = w_fp8.shape
    want = (_cdiv(out, block), _cdiv(fan_in, block))
    if tuple(scale_e8m0.shape) != want:
        raise QuantError(f"FP8 weight of shape {(out, fan_in)} needs a scale of shape {want} "
                         f"(block {block}), got {tuple(scale_e8m0.shape)}")
    if _is_jax(w_fp8):
        import jax.numpy as jnp
        s = jnp.repeat(jnp.repeat(ue8m0_to_float(scale_e8m0), block, 0), block, 1)[:out, :fan_in]
        return (w_fp8.astype(jnp.float32) * s).astype(out_dtype)
    if np.asarray(w_fp8).dtype != FP8_DTYPE:
        raise QuantError(f"FP8 weight must be float8_e4m3fn, got {np.asarray(w_fp8).dtype}")
    codes = _bytes(np.asarray(w_fp8), "FP8 weight")
    s = ue8m0_to_float(scale_e8m0)
    y = np.empty((out, fan_in), out_dtype)
    for r in range(want[0]):  # one block row at a time bounds the float32 temporaries
        rows = slice(r * block, (r + 1) * block)
        s_row = np.repeat(s[r], block)[:fan_in]
        y[rows] = (E4M3_VALUES[codes[rows]] * s_row).astype(out_dtype)
    return y


def quant_fp8_block(w, block: int = FP8_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """[out, in] floats -> (E4M3 codes [out, in], UE8M0 scales [ceil(out/block), ceil(in/block)])."""
    w = np.asarray(w)
    _check_2d(w, "FP8 input")
    out, fan_in = w.shape
    nb_in = _cdiv(fan_in, block)
    q = np.empty((out, fan_in), FP8_DTYPE)
    scale = np.empty((_cdiv(out, block), nb_in), np.uint8)
    pad = nb_in * block - fan_in
    for r in range(scale.shape[0]):
        rows = slice(r * block, (r + 1) * block)
        x = w[rows].astype(np.float32)
        _check_finite(x, "FP8 input")
        a = np.abs(x)
        if pad:
            a = np.pad(a, ((0, 0), (0, pad)))
        amax = a.reshape(a.shape[0], nb_in, block).max(axis=(0, 2))
        scale[r] = _pow2_scale(amax, FP8_MAX, FP8_DTYPE)
        inv = np.repeat(ue8m0_to_float(np.uint8(254) - scale[r]), block)[:fan_in]  # 1/scale, exact
        q[rows] = np.clip(x * inv, -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)
    return q, scale.view(UE8M0_DTYPE)


def _row_scales(x: np.ndarray, block: int, fmt_max: float, fmt_dtype) -> tuple[np.ndarray, np.ndarray]:
    """x [r, n] float32 -> (the canonical UE8M0 bytes [r, ceil(n/block)] of each row's blocks of `block`
    columns, their inverses as float32: exact powers of two)."""
    nb = _cdiv(x.shape[1], block)
    a = np.abs(x)
    if nb * block != x.shape[1]:
        a = np.pad(a, ((0, 0), (0, nb * block - x.shape[1])))
    s = _pow2_scale(a.reshape(a.shape[0], nb, block).max(axis=2), fmt_max, fmt_dtype)
    return s, ue8m0_to_float(np.uint8(254) - s)


def quant_fp8_rows(w, block: int) -> tuple[np.ndarray, np.ndarray]:
    """[rows, cols] floats -> (E4M3 codes [rows, cols], UE8M0 scales [rows, ceil(cols/block)]): one scale per
    `block` columns of each row (1 x block blocks: the V4.1 release's Engram tables), chosen as for the
    square blocks. Processed a few MiB of rows at a time."""
    w = np.asarray(w)
    _check_2d(w, "FP8 row-block input")
    rows, cols = w.shape
    q = np.empty((rows, cols), FP8_DTYPE)
    scale = np.empty((rows, _cdiv(cols, block)), np.uint8)
    step = max(1, (1 << 22) // max(cols, 1))
    for r0 in range(0, rows, step):
        part = slice(r0, r0 + step)
        x = w[part].astype(np.float32)
        _check_finite(x, "FP8 row-block input")
        scale[part], inv = _row_scales(x, block, FP8_MAX, FP8_DTYPE)
        q[part] = np.clip(_scale_blocks(x, inv, block), -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)
    return q, scale.view(UE8M0_DTYPE)


# --------------------------------------------------------------------------------------------------
# MXFP4 (E2M1, two per byte, per-32 scales along the input dimension)

def _scale_blocks(x: np.ndarray, s: np.ndarray, block: int) -> np.ndarray:
    """x [r, n] times s [r, ceil(n/block)] repeated over each block of `block` columns."""
    r, n = x.shape
    full = n // block * block
    if full == n:
        return (x.reshape(r, n // block, block) * s[:, :, None]).reshape(r, n)
    out = np.empty_like(x)
    out[:, :full] = (x[:, :full].reshape(r, full // block, block) * s[:, : full // block, None]).reshape(r, full)
    out[:, full:] = x[:, full:] * s[:, -1:]
    return out


def dequant_fp4(packed, scale, block: int = FP4_BLOCK, out_dtype: Any = ml_dtypes.bfloat16):
    """[out, in/2] packed E2M1 bytes (int8 or uint8) x [out, ceil(in/block)] UE8M0 -> [out, in]."""
    _check_2d(packed, "FP4 weight")
    out, half = packed.shape
    fan_in = 2 * half
    want = (out, _cdiv(fan_in, block))
    if tuple(scale.shape) != want:
        raise QuantError(f"packed FP4 weight of shape {(out, half)} (logical {(out, fan_in)}) needs a "
                         f"scale of shape {want} (block {block}), got {tuple(scale.shape)}")
    if _is_jax(packed):
        import jax
        import jax.numpy as jnp
        b = packed if packed.dtype == jnp.uint8 else jax.lax.bitcast_convert_type(packed, jnp.uint8)
        v = jnp.asarray(E2M1_PAIRS)[b.astype(jnp.int32)].reshape(out, fan_in)
        s = jnp.repeat(ue8m0_to_float(scale), block, 1)[:, :fan_in]
        return (v * s).astype(out_dtype)
    packed = np.asarray(packed)
    if packed.dtype not in (np.dtype(np.int8), np.dtype(np.uint8)):
        raise QuantError(f"packed FP4 weight must be int8 or uint8, got {packed.dtype}")
    codes = packed.view(np.uint8)
    s = ue8m0_to_float(scale)
    y = np.empty((out, fan_in), out_dtype)
    step = max(1, (1 << 22) // max(fan_in, 1))  # ~16 MiB of float32 temporaries per step
    for r0 in range(0, out, step):
        rows = slice(r0, r0 + step)
        v = E2M1_PAIRS[codes[rows]].reshape(-1, fan_in)
        y[rows] = _scale_blocks(v, s[rows], block).astype(out_dtype)
    return y


def quant_fp4(w, block: int = FP4_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """[out, in] floats (in even) -> (packed int8 [out, in/2], UE8M0 scales [out, ceil(in/block)])."""
    w = np.asarray(w)
    _check_2d(w, "FP4 input")
    out, fan_in = w.shape
    if fan_in % 2:
        raise QuantError(f"FP4 input needs an even number of columns to pack two per byte, got shape {(out, fan_in)}")
    packed = np.empty((out, fan_in // 2), np.uint8)
    scale = np.empty((out, _cdiv(fan_in, block)), np.uint8)
    step = max(1, (1 << 22) // max(fan_in, 1))
    for r0 in range(0, out, step):
        rows = slice(r0, r0 + step)
        x = w[rows].astype(np.float32)
        _check_finite(x, "FP4 input")
        scale[rows], inv = _row_scales(x, block, FP4_MAX, ml_dtypes.float4_e2m1fn)
        c = np.clip(_scale_blocks(x, inv, block), -FP4_MAX, FP4_MAX).astype(ml_dtypes.float4_e2m1fn).view(np.uint8)
        packed[rows] = c[:, 0::2] | (c[:, 1::2] << 4)
    return packed.view(FP4_PACKED_DTYPE), scale.view(UE8M0_DTYPE)


def fp4_to_fp8(packed, scale, fp4_block: int = FP4_BLOCK, fp8_block: int = FP8_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Re-express an MXFP4 weight as 128x128-block FP8 without loss (architecture.md §9: the report states the
    released FP4 weights convert to FP8 exactly). Lossless iff, inside each FP8 block, the scales of
    the 1x32 FP4 blocks holding non-zero values span at most 2**14; raises QuantError otherwise."""
    w = dequant_fp4(packed, scale, fp4_block, np.float32)
    q, s = quant_fp8_block(w, fp8_block)
    back = dequant_fp8_block(q, s, fp8_block, np.float32)
    bad = np.count_nonzero(back != w)
    if bad:
        raise QuantError(f"FP4 -> FP8 is not lossless for this tensor: {bad} values change (the FP4 "
                         f"scales inside one {fp8_block}x{fp8_block} block span more than 2**14)")
    return q, s
