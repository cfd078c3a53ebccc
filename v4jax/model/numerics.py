"""Release numerics (architecture.md §10.3): the run-time roundings of DeepSeek's own inference code.

With `RunOptions.numerics = release` the model computes what the official `inference/model.py` and
`inference/kernel.py` compute, so that a backend running the released FP8/FP4 path can be compared
against it at a tight tolerance. The quantisers here are those kernels' arithmetic:

  scale    s = 2^ceil(log2(max(amax, floor) * fp32(1/max)))  taken from the fp32 bits (`pow2_scale`)
  value    q = round_to_nearest_even(clip(x / s, -max, max)) onto the E4M3 (max 448) or E2M1 (max 6) grid
  result   q * s, back in x's dtype (the "in-place" form: quantise, then de-quantise)

per block of the last axis (128 before an FP8 GEMM, 64 for the KV cache, 32 for FP4). A trailing
partial block (a dimension that is not a multiple of the block, which the official kernels refuse)
is its own block. Every function keeps x's shape and works on any leading axes.
"""

from __future__ import annotations

from typing import NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np

FP8_MAX, FP8_AMAX_FLOOR = 448.0, 1e-4  # kernel.py act_quant: E4M3 range, amax floor
FP4_MAX, FP4_AMAX_FLOOR = 6.0, 6 * 2.0 ** -126  # kernel.py fp4_act_quant: E2M1 range, amax floor
GEMM_BLOCK, KV_BLOCK, FP4_BLOCK = 128, 64, 32  # activations before FP8/FP4 GEMMs; KV nope dims; FP4


def pow2_scale(amax: jax.Array, max_value: float) -> jax.Array:
    """The UE8M0 block scale: 2^ceil(log2(amax * fp32(1/max_value))), ceil read off the fp32 bits
    (biased exponent - 127, plus one when any mantissa bit is set), as `fast_round_scale` does. fp32."""
    t = amax.astype(jnp.float32) * np.float32(1.0 / max_value)
    bits = jax.lax.bitcast_convert_type(t, jnp.uint32)
    exponent = ((bits >> 23) & 0xFF).astype(jnp.int32) - 127 + ((bits & 0x7FFFFF) != 0).astype(jnp.int32)
    return jax.lax.bitcast_convert_type(((exponent + 127) << 23).astype(jnp.uint32), jnp.float32)


def _blocks(x: jax.Array, block: int) -> jax.Array:
    """x [..., n] fp32 -> [..., ceil(n / block), block], a partial last block padded with zeros (amax-neutral)."""
    n = x.shape[-1]
    pad = -n % block
    if pad:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return x.reshape(*x.shape[:-1], -1, block)


def quantize(x: jax.Array, block: int, fmt, max_value: float, amax_floor: float) -> tuple[jax.Array, jax.Array]:
    """x [..., n] -> (codes [..., n] in `fmt` (jnp.float8_e4m3fn or jnp.float4_e2m1fn), scales
    [..., ceil(n / block)] fp32 powers of two); x = codes * scales (blockwise) up to the rounding."""
    n = x.shape[-1]
    xb = _blocks(x.astype(jnp.float32), block)  # [..., nb, block]
    scale = pow2_scale(jnp.maximum(jnp.max(jnp.abs(xb), axis=-1), amax_floor), max_value)  # [..., nb]
    codes = jnp.clip(xb / scale[..., None], -max_value, max_value).astype(fmt)
    return codes.reshape(*x.shape[:-1], -1)[..., :n], scale


def dequantize(codes: jax.Array, scales: jax.Array, block: int, dtype) -> jax.Array:
    """codes [..., n], scales [..., ceil(n / block)] -> codes * scales in `dtype` (exact for bf16 and fp32)."""
    n = codes.shape[-1]
    vals = _blocks(codes.astype(jnp.float32), block) * scales[..., None]
    return vals.reshape(*codes.shape[:-1], -1)[..., :n].astype(dtype)


def fp8_act_quant(x: jax.Array, block: int = GEMM_BLOCK) -> jax.Array:
    """FP8 E4M3 with UE8M0 scales per `block`, quantised and de-quantised, in x's dtype (`act_quant`)."""
    codes, scales = quantize(x, block, jnp.float8_e4m3fn, FP8_MAX, FP8_AMAX_FLOOR)
    return dequantize(codes, scales, block, x.dtype)


def fp4_act_quant(x: jax.Array, block: int = FP4_BLOCK) -> jax.Array:
    """FP4 E2M1 with UE8M0 scales per `block`, quantised and de-quantised, in x's dtype (`fp4_act_quant`)."""
    codes, scales = quantize(x, block, jnp.float4_e2m1fn, FP4_MAX, FP4_AMAX_FLOOR)
    return dequantize(codes, scales, block, x.dtype)


def fp8_nope(kv: jax.Array, rope_dims: int) -> jax.Array:
    """The KV cache rule: FP8 on the leading non-RoPE dims in blocks of 64, the last `rope_dims` dims
    untouched (`act_quant(kv[..., :-rd], 64, inplace=True)` in model.py)."""
    nope = kv.shape[-1] - rope_dims
    return jnp.concatenate([fp8_act_quant(kv[..., :nope], KV_BLOCK), kv[..., nope:]], axis=-1)


def hadamard(x: jax.Array) -> jax.Array:
    """The indexer's rotation (`rotate_activation`): the Walsh-Hadamard transform of the last axis
    (a power of two) times n^-1/2, in fp32 as `fast_hadamard_transform` does, result in x's dtype."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"the Hadamard rotation needs a power-of-two width, got {n}")
    y = x.astype(jnp.float32)
    h = 1
    while h < n:  # butterfly stage: pairs (i, i + h) within blocks of 2h -> (a + b, a - b)
        y = y.reshape(*x.shape[:-1], n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = jnp.stack([a + b, a - b], axis=-2)
        h *= 2
    return (y.reshape(x.shape) * np.float32(n ** -0.5)).astype(x.dtype)


def rotate_fp4(x: jax.Array) -> jax.Array:
    """The indexer's query and key rule: Hadamard rotation, then FP4 in blocks of 32 (model.py's Indexer)."""
    return fp4_act_quant(hadamard(x))


def bf16_head_rms(q: jax.Array, eps: float) -> jax.Array:
    """The per-head query normalisation as model.py computes it on BF16 tensors, each op rounded to
    BF16: `q * rsqrt(mean(q^2) + eps)` (q [..., c] bf16)."""
    sq = (q * q).astype(jnp.bfloat16)
    mean = jnp.mean(sq.astype(jnp.float32), axis=-1, keepdims=True).astype(jnp.bfloat16)
    var = (mean.astype(jnp.float32) + np.float32(eps)).astype(jnp.bfloat16)  # torch adds a python scalar in fp32
    r = jax.lax.rsqrt(var.astype(jnp.float32)).astype(jnp.bfloat16)
    return (q * r).astype(jnp.bfloat16)


# ----------------------------------------------------------------------------------------------
# Cache storage in the release's formats (architecture.md §10.3). Storing a value the release rules already
# rounded is exact: encode(x) decodes to x for every x on the FP8 / FP4 grid of its block.

FP4_VALUES = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float32)  # code -> value


def _scale_bytes(scales: jax.Array) -> jax.Array:
    """Power-of-two fp32 scales -> their UE8M0 bytes (the biased exponent)."""
    return ((jax.lax.bitcast_convert_type(scales, jnp.uint32) >> 23) & 0xFF).astype(jnp.uint8)


def _byte_scales(b: jax.Array) -> jax.Array:
    """UE8M0 bytes -> fp32 2^(byte - 127) (byte 0, never written by `_scale_bytes` here, reads as 0)."""
    return jax.lax.bitcast_convert_type(b.astype(jnp.uint32) << 23, jnp.float32)


class Fp8KV(NamedTuple):
    """KV vectors [..., c] as the release keeps them: FP8 E4M3 non-RoPE dims with one UE8M0 scale per
    64, the last r (RoPE) dims in BF16 (583 bytes for c = 512, r = 64, against 1024 in BF16)."""

    nope: jax.Array  # [..., c - r] float8_e4m3fn
    scale: jax.Array  # [..., ceil((c - r) / 64)] uint8, UE8M0
    rope: jax.Array  # [..., r] bfloat16

    @classmethod
    def encode(cls, kv: jax.Array, rope_dims: int) -> "Fp8KV":
        nope = kv.shape[-1] - rope_dims
        codes, scales = quantize(kv[..., :nope], KV_BLOCK, jnp.float8_e4m3fn, FP8_MAX, FP8_AMAX_FLOOR)
        return cls(codes, _scale_bytes(scales), kv[..., nope:].astype(jnp.bfloat16))

    def decode(self, dtype) -> jax.Array:
        nope = dequantize(self.nope, _byte_scales(self.scale), KV_BLOCK, dtype)
        return jnp.concatenate([nope, self.rope.astype(dtype)], axis=-1)

    @classmethod
    def zeros(cls, lead: tuple[int, ...], width: int, rope_dims: int) -> "Fp8KV":
        nope = width - rope_dims
        return cls(jnp.zeros(lead + (nope,), jnp.float8_e4m3fn), jnp.zeros(lead + (-(-nope // KV_BLOCK),), jnp.uint8),
                   jnp.zeros(lead + (rope_dims,), jnp.bfloat16))

    @staticmethod
    def nbytes(width: int, rope_dims: int) -> int:
        """Bytes of one vector."""
        return width - rope_dims + -(-(width - rope_dims) // KV_BLOCK) + 2 * rope_dims


class Fp4Keys(NamedTuple):
    """The indexer's keys [..., c_I] (after `rotate_fp4`) as MXFP4: two E2M1 codes per byte, element 2j in
    the low nibble (the release's packing of its FP4 weights), one UE8M0 scale per 32 (68 bytes for
    c_I = 128). DeepSeek's inference code keeps these values in BF16; the values are the same."""

    codes: jax.Array  # [..., c_I / 2] uint8
    scale: jax.Array  # [..., c_I / 32] uint8, UE8M0

    @classmethod
    def encode(cls, keys: jax.Array) -> "Fp4Keys":
        codes, scales = quantize(keys, FP4_BLOCK, jnp.float4_e2m1fn, FP4_MAX, FP4_AMAX_FLOOR)
        q = codes.astype(jnp.float32)
        nibble = (jnp.searchsorted(jnp.asarray(FP4_VALUES[:8]), jnp.abs(q)) + 8 * jnp.signbit(q)).astype(jnp.uint8)
        return cls(nibble[..., 0::2] | (nibble[..., 1::2] << 4), _scale_bytes(scales))

    def decode(self, dtype) -> jax.Array:
        nibbles = jnp.stack([self.codes & 0xF, self.codes >> 4], axis=-1).reshape(*self.codes.shape[:-1], -1)
        return dequantize(jnp.asarray(FP4_VALUES)[nibbles], _byte_scales(self.scale), FP4_BLOCK, dtype)

    @classmethod
    def zeros(cls, lead: tuple[int, ...], width: int) -> "Fp4Keys":
        return cls(jnp.zeros(lead + (width // 2,), jnp.uint8), jnp.zeros(lead + (-(-width // FP4_BLOCK),), jnp.uint8))

    @staticmethod
    def nbytes(width: int) -> int:
        return width // 2 + -(-width // FP4_BLOCK)


Stored = Union[jax.Array, Fp8KV, Fp4Keys]  # one cache array: plain (compute dtype) or a release format


def encode_as(like: Stored, x: jax.Array) -> Stored:
    """x in the storage format of `like` (the cache decides how it stores: `init_cache`)."""
    if isinstance(like, Fp8KV):
        return Fp8KV.encode(x, like.rope.shape[-1])
    if isinstance(like, Fp4Keys):
        return Fp4Keys.encode(x)
    return x.astype(like.dtype)


def decode(stored: Stored, dtype) -> jax.Array:
    """A stored cache array as values [..., width] in `dtype`."""
    return stored.astype(dtype) if isinstance(stored, jax.Array) else stored.decode(dtype)
