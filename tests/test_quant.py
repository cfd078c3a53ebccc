"""FP8 E4M3 / MXFP4 E2M1 / UE8M0 decoding tables and (de)quantisers (architecture.md §9)."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from v4jax.io import quant
from v4jax.io.quant import (QuantError, count_nonfinite_codes, dequant_fp4, dequant_fp8_block, fp4_to_fp8,
                         quant_fp4, quant_fp8_block, quant_fp8_rows, ue8m0_to_float)


def _bytes(a):
    return np.asarray(a).view(np.uint8)


def _e8m0(*b):
    return np.array(b, np.uint8).view(ml_dtypes.float8_e8m0fnu)


# ---------------------------------------------------------------------------- decoding tables

def test_e2m1_table_matches_spec_lut():
    assert quant.E2M1_VALUES.tolist() == [0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6]
    assert np.signbit(quant.E2M1_VALUES[8]) and not np.signbit(quant.E2M1_VALUES[0])
    # the table is the E2M1 format itself (sign, 2 exponent bits, 1 mantissa bit)
    np.testing.assert_array_equal(np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32),
                                  quant.E2M1_VALUES)


def test_fp4_nibble_order_low_nibble_is_even_element():
    packed = np.array([[0x71, 0x8F]], np.uint8).view(np.int8)  # 0x71: low 1 (0.5), high 7 (6.0)
    out = dequant_fp4(packed, _e8m0(127).reshape(1, 1), out_dtype=np.float32)
    assert out.tolist() == [[0.5, 6.0, -6.0, -0.0]]
    assert np.signbit(out[0, 3])
    q, s = quant_fp4(np.array([[0.5, 6.0, -6.0, -0.0]], np.float32))
    assert _bytes(q).tolist() == [[0x71, 0x8F]] and _bytes(s).tolist() == [[127]]


def test_e4m3_hand_checked_codes():
    codes = np.array([0x00, 0x38, 0x3C, 0xB8, 0x7E, 0x01, 0x08, 0x80, 0x7F, 0xFF], np.uint8)
    want = [0.0, 1.0, 1.5, -1.0, 448.0, 2.0**-9, 2.0**-6, -0.0]
    got = quant.E4M3_VALUES[codes]
    assert got[:8].tolist() == want and np.signbit(got[7])
    assert np.isnan(got[8]) and np.isnan(got[9])  # E4M3FN has NaN (S.1111.111) and no infinity


def test_ue8m0_hand_checked_values_and_nan():
    v = ue8m0_to_float(_e8m0(0, 1, 120, 127, 128, 254, 255))
    assert v[:6].tolist() == [2.0**-127, 2.0**-126, 2.0**-7, 1.0, 2.0, 2.0**127] and np.isnan(v[6])
    np.testing.assert_array_equal(np.asarray(ue8m0_to_float(jnp.asarray(_e8m0(1, 127, 254)))), v[[1, 3, 5]])


def test_dequant_fp8_known_values_with_partial_blocks():
    w = np.array([[1.0, 2.0, -0.5], [448.0, 0.0, 1.5]], np.float32).astype(ml_dtypes.float8_e4m3fn)
    s = _e8m0(128, 125).reshape(1, 2)  # block 2: columns {0,1} x2, column {2} x0.25
    out = dequant_fp8_block(w, s, block=2, out_dtype=np.float32)
    assert out.tolist() == [[2.0, 4.0, -0.125], [896.0, 0.0, 0.375]]


def test_dequant_fp4_known_values():
    packed = np.array([[0x71, 0x2A]], np.uint8)  # [0.5, 6, -1, 1] ; block 2 -> scales per pair
    out = dequant_fp4(packed, _e8m0(126, 129).reshape(1, 2), block=2, out_dtype=np.float32)
    assert out.tolist() == [[0.25, 3.0, -4.0, 4.0]]


# ---------------------------------------------------------------------------- round trips

SHAPES = [(1, 2), (128, 128), (129, 130), (300, 200), (257, 64)]


@pytest.mark.parametrize("shape", SHAPES)
def test_fp8_quant_is_idempotent_and_scale_shape_uses_ceil(shape):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 0.02
    q, s = quant_fp8_block(w)
    assert q.dtype == ml_dtypes.float8_e4m3fn and s.dtype == ml_dtypes.float8_e8m0fnu
    assert s.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    d = dequant_fp8_block(q, s)  # bf16 holds these exactly
    assert np.abs(d.astype(np.float32) - w).max() <= np.abs(w).max() / 16 + 1e-12
    q2, s2 = quant_fp8_block(d)
    np.testing.assert_array_equal(_bytes(q2), _bytes(q))
    np.testing.assert_array_equal(_bytes(s2), _bytes(s))


@pytest.mark.parametrize("shape", SHAPES + [(5, 40)])
def test_fp4_quant_is_idempotent_and_scale_shape_uses_ceil(shape):
    w = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    q, s = quant_fp4(w)
    assert q.dtype == np.int8 and q.shape == (shape[0], shape[1] // 2)
    assert s.shape == (shape[0], -(-shape[1] // 32))
    d = dequant_fp4(q, s)
    q2, s2 = quant_fp4(d)
    np.testing.assert_array_equal(_bytes(q2), _bytes(q))
    np.testing.assert_array_equal(_bytes(s2), _bytes(s))


def test_row_block_fp8_has_a_scale_per_32_columns_of_each_row_and_is_idempotent():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((7, 70)).astype(np.float32) * np.exp2(rng.integers(-8, 8, (7, 1)))  # rows of own range
    q, s = quant_fp8_rows(w, 32)
    assert q.dtype == ml_dtypes.float8_e4m3fn and s.dtype == ml_dtypes.float8_e8m0fnu and s.shape == (7, 3)
    d = q.astype(np.float32) * np.repeat(ue8m0_to_float(s), 32, axis=1)[:, :70]  # by hand: code x its row block's scale
    assert np.abs(d - w).max(axis=1).max() > 0 and (np.abs(d - w) <= np.abs(w).max(axis=1, keepdims=True) / 16).all()
    # each row block is the square quantiser's block of one row: same scale, same codes
    for r in range(7):
        q1, s1 = quant_fp8_block(w[r:r + 1], 32)
        np.testing.assert_array_equal(_bytes(q1)[0], _bytes(q)[r])
        np.testing.assert_array_equal(_bytes(s1)[0], _bytes(s)[r])
    q2, s2 = quant_fp8_rows(d, 32)
    np.testing.assert_array_equal(_bytes(q2), _bytes(q))
    np.testing.assert_array_equal(_bytes(s2), _bytes(s))


def test_dequant_of_quant_is_exact_on_representable_values():
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 256, (200, 300), dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x38  # no NaN codes
    scales = rng.integers(100, 140, (2, 3), dtype=np.uint8)
    exact = dequant_fp8_block(codes.view(ml_dtypes.float8_e4m3fn), scales.view(ml_dtypes.float8_e8m0fnu),
                              out_dtype=np.float32)
    np.testing.assert_array_equal(dequant_fp8_block(*quant_fp8_block(exact), out_dtype=np.float32), exact)
    packed = rng.integers(0, 256, (64, 48), dtype=np.uint8)
    exact4 = dequant_fp4(packed, rng.integers(110, 130, (64, 3), dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu),
                         out_dtype=np.float32)
    np.testing.assert_array_equal(dequant_fp4(*quant_fp4(exact4), out_dtype=np.float32), exact4)


def test_block_maximum_rounding_down_to_half_range_gets_the_smaller_scale():
    # 3.2 / 1 rounds to 3 = 6 / 2: the canonical scale is 0.5 (codes 6 and 2), same values
    q, s = quant_fp4(np.array([[3.2, 1.0]], np.float32))
    assert _bytes(s).tolist() == [[126]] and dequant_fp4(q, s, out_dtype=np.float32).tolist() == [[3.0, 1.0]]
    q8, s8 = quant_fp8_block(np.array([[230.0, 1.0]], np.float32))  # 230 -> 224 = 448 / 2
    assert _bytes(s8).tolist() == [[126]]
    assert dequant_fp8_block(q8, s8, out_dtype=np.float32).tolist() == [[224.0, 1.0]]


def test_zero_block_gets_the_floor_scale():
    q, s = quant_fp8_block(np.zeros((3, 130), np.float32))
    assert _bytes(s).tolist() == [[1, 1]] and not _bytes(q).any()
    q4, s4 = quant_fp4(np.zeros((2, 34), np.float32))
    assert (_bytes(s4) == 1).all() and not _bytes(q4).any()


def test_fp4_to_fp8_is_lossless_on_trained_like_weights():
    w = np.random.default_rng(3).standard_normal((256, 384)).astype(np.float32) * 0.01
    packed, s = quant_fp4(w)
    q8, s8 = fp4_to_fp8(packed, s)
    assert s8.shape == (2, 3)
    np.testing.assert_array_equal(dequant_fp8_block(q8, s8, out_dtype=np.float32),
                                  dequant_fp4(packed, s, out_dtype=np.float32))


def test_fp4_to_fp8_refuses_a_lossy_conversion():
    packed = np.full((1, 64), 0x11, np.uint8)  # every value 0.5 x scale
    s = _e8m0(140, 110, 127, 127).reshape(1, 4)  # 2**13 vs 2**-17 inside one 128x128 block
    with pytest.raises(QuantError, match="not lossless"):
        fp4_to_fp8(packed, s)


def test_jax_dequantisers_match_numpy():
    w = np.random.default_rng(4).standard_normal((130, 96)).astype(np.float32)
    q, s = quant_fp8_block(w)
    np.testing.assert_array_equal(np.asarray(dequant_fp8_block(jnp.asarray(q), jnp.asarray(s), out_dtype=jnp.float32)),
                                  dequant_fp8_block(q, s, out_dtype=np.float32))
    p, s4 = quant_fp4(w)
    np.testing.assert_array_equal(np.asarray(dequant_fp4(jnp.asarray(p), jnp.asarray(s4), out_dtype=jnp.float32)),
                                  dequant_fp4(p, s4, out_dtype=np.float32))


# ---------------------------------------------------------------------------- NaN / inf and bad input

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_quantisers_reject_non_finite_values(bad):
    w = np.ones((4, 64), np.float32)
    w[2, 7] = bad
    with pytest.raises(QuantError, match="non-finite"):
        quant_fp8_block(w)
    with pytest.raises(QuantError, match="non-finite"):
        quant_fp4(w)


def test_dequantisers_propagate_nan_codes_and_nan_scales():
    w = np.array([[0x38, 0x7F]], np.uint8).view(ml_dtypes.float8_e4m3fn)
    out = dequant_fp8_block(w, _e8m0(127).reshape(1, 1), out_dtype=np.float32)
    assert out[0, 0] == 1.0 and np.isnan(out[0, 1])
    assert np.isnan(dequant_fp8_block(w[:, :1], _e8m0(255).reshape(1, 1), out_dtype=np.float32)).all()
    assert count_nonfinite_codes(w, _e8m0(255).reshape(1, 1), "fp8") == 2
    assert count_nonfinite_codes(np.zeros((1, 1), np.int8), _e8m0(127).reshape(1, 1), "fp4") == 0


def test_bad_shapes_and_dtypes_are_named():
    q, s = quant_fp8_block(np.ones((130, 10), np.float32))
    with pytest.raises(QuantError, match=r"needs a scale of shape \(2, 1\)"):
        dequant_fp8_block(q, s[:1])
    with pytest.raises(QuantError, match="float8_e4m3fn"):
        dequant_fp8_block(np.ones((130, 10), np.float32), s)
    with pytest.raises(QuantError, match="even number of columns"):
        quant_fp4(np.ones((2, 33), np.float32))
    with pytest.raises(QuantError, match="2-D"):
        quant_fp8_block(np.ones((2, 3, 4), np.float32))
    with pytest.raises(QuantError, match="int8 or uint8"):
        dequant_fp4(np.ones((2, 16), np.float32), _e8m0(127, 127).reshape(2, 1))
