"""Pallas lightning indexer (pallas_kernels/lightning_indexer.py) against v4jax.model.indexer.select_topk.

Numerical tests run the kernel with interpret=True on CPU. Most inputs are dyadic (small multiples of
powers of two) so every score is exact in fp32 whatever the summation order: the kernel and the
reference then see bit-identical scores and must return identical indices, ties included. TPU tests
compile the kernel with the real Mosaic compiler for TPU topologies described by libtpu.
"""

import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several test processes may load libtpu at once

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lightning_indexer import select_topk, select_topk_reference
from pallas_kernels.lightning_indexer_reference import index_scores
from conftest import tpu_devices_or_skip


def dyadic_inputs(seed, B, T, H, C, ratio, q_levels=8, w_levels=16, N=None, dtype=jnp.float32):
    """q, keys in multiples of 1/q_levels within [-1, 1], w in multiples of 1/w_levels: exact scores."""
    rng = np.random.default_rng(seed)
    N = T // ratio if N is None else N
    q = rng.integers(-q_levels, q_levels + 1, (B, T, H, C)) / q_levels
    keys = rng.integers(-q_levels, q_levels + 1, (B, N, C)) / q_levels
    w = rng.integers(-w_levels, w_levels + 1, (B, T, H)) / w_levels
    return (jnp.asarray(q, dtype), jnp.asarray(w, jnp.float32), jnp.asarray(keys, dtype),
            jnp.arange(T, dtype=jnp.int32))


def both(q, w, keys, positions, ratio, k, **kw):
    ours = select_topk(q, w, keys, positions, ratio, k, interpret=True, **kw)
    ref = select_topk_reference(q, w, keys, positions, ratio, k, 64)
    return np.asarray(ours), np.asarray(ref)


@pytest.mark.parametrize("block_q", [128, 256])
def test_identical_indices_on_random_dyadic_inputs_with_batch_and_ragged_T(block_q):
    q, w, keys, pos = dyadic_inputs(0, B=2, T=300, H=4, C=16, ratio=4)  # T not a multiple of block_q
    ours, ref = both(q, w, keys, pos, 4, 8, block_q=block_q)
    assert ours.shape == ref.shape == (2, 300, 8) and ours.dtype == np.int32
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("k, block_k", [(40, 64), (64, 256), (64, None)])
def test_identical_indices_when_k_spans_many_chunks_and_several_key_blocks(k, block_k):
    # next_pow2(k) = 64 entries per list: long-distance network stages; block_k < 8 * 64 merges a
    # shorter sorted block into the running list.
    q, w, keys, pos = dyadic_inputs(1, B=1, T=700, H=4, C=16, ratio=4)
    ours, ref = both(q, w, keys, pos, 4, k, block_k=block_k)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.slow
@pytest.mark.parametrize("k, T", [(512, 2304), (1024, 4352)])
def test_identical_indices_at_the_real_top_k_sizes(k, T):
    # k_I of V4-Flash / V4-Pro with N a little above k (tiny heads keep interpret mode affordable)
    q, w, keys, pos = dyadic_inputs(7, B=1, T=T, H=4, C=16, ratio=4)
    ours, ref = both(q, w, keys, pos, 4, k)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.slow
def test_identical_indices_at_the_real_head_sizes_in_bfloat16():
    q, w, keys, pos = dyadic_inputs(8, B=1, T=2304, H=64, C=128, ratio=4, q_levels=4, dtype=jnp.bfloat16)
    ours, ref = both(q, w, keys, pos, 4, 512)
    np.testing.assert_array_equal(ours, ref)


def test_identical_indices_with_several_head_groups():
    # n_I = 48: q is read 16 heads at a time (the real n_I = 64 uses 4 such groups)
    q, w, keys, pos = dyadic_inputs(6, B=1, T=200, H=48, C=16, ratio=4)
    ours, ref = both(q, w, keys, pos, 4, 8)
    np.testing.assert_array_equal(ours, ref)


def test_ties_break_towards_lowest_entry_index_like_lax_top_k():
    # Coarse values: most scores collide (many exact zeros from the ReLU, equal small sums).
    q, w, keys, pos = dyadic_inputs(2, B=1, T=256, H=4, C=16, ratio=4, q_levels=1, w_levels=2)
    ours, ref = both(q, w, keys, pos, 4, 8)
    scores = np.asarray(index_scores(q, w, keys))[0]
    top = np.sort(scores[-1, :64])[::-1]
    assert (top[:9][1:] == top[:9][:-1]).any(), "inputs must contain ties at the top"
    np.testing.assert_array_equal(ours, ref)
    # all-equal scores: the first visible entries, in index order
    ours, ref = both(q, w, jnp.zeros_like(keys), pos, 4, 8)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(ours[0, 255], np.arange(8))


def test_fewer_entries_than_k_and_first_queries_see_nothing():
    q, w, keys, pos = dyadic_inputs(3, B=1, T=21, H=4, C=16, ratio=4)  # N = 5 < k = 8
    ours, ref = both(q, w, keys, pos, 4, 8)
    assert ours.shape == (1, 21, 5)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(ours[0, :3], -1)  # t < 3: floor((t+1)/4) = 0 entries visible
    assert set(ours[0, 3]) == {0, -1} and (ours[0, 20] >= 0).all()


def test_positions_past_the_entries_and_bfloat16_inputs():
    # positions offset by 40 (a later chunk of a sequence): every query sees all N entries (clamped)
    q, w, keys, _ = dyadic_inputs(4, B=1, T=130, H=4, C=16, ratio=4, N=24, dtype=jnp.bfloat16)
    pos = jnp.arange(130, dtype=jnp.int32) + 40
    ours, ref = both(q, w, keys, pos, 4, 8)
    np.testing.assert_array_equal(ours, ref)


def test_gaussian_inputs_select_the_same_scores():
    # Non-dyadic fp32: the summation order may move scores by an ulp, so compare what was selected.
    rng = np.random.default_rng(5)
    B, T, H, C, k = 1, 200, 4, 16, 8
    q = jnp.asarray(rng.standard_normal((B, T, H, C)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((B, T, H)), jnp.float32)
    keys = jnp.asarray(rng.standard_normal((B, T // 4, C)), jnp.float32)
    pos = jnp.arange(T)
    ours, ref = both(q, w, keys, pos, 4, k)
    scores = np.asarray(index_scores(q, w, keys))[0]

    def picked(idx):
        return np.where(idx >= 0, np.take_along_axis(scores, np.maximum(idx, 0), axis=-1), -np.inf)

    np.testing.assert_array_equal(ours < 0, ref < 0)
    np.testing.assert_allclose(np.sort(picked(ours[0]), -1), np.sort(picked(ref[0]), -1), rtol=1e-6)
    assert (ours == ref).mean() > 0.99


def test_same_selection_as_the_tiny_models_indexer():
    from flax import nnx

    from v4jax import V4Config
    from v4jax.config import AttentionKind
    from v4jax.model.indexer import Indexer
    from v4jax.model.rope import apply_rope, inv_frequencies

    cfg = V4Config.preset("tiny")
    indexer = Indexer(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    B, T = 2, 160
    x = jnp.asarray(rng.standard_normal((B, T, cfg.dim)), jnp.float32)
    cq = jnp.asarray(rng.standard_normal((B, T, cfg.q_lora_rank)), jnp.float32)
    pos, inv_freq = jnp.arange(T), inv_frequencies(cfg, AttentionKind.CSA)
    keys, _ = indexer.compressor(x, jnp.broadcast_to(pos, (B, T)), inv_freq)  # the q, w, keys Indexer.project builds
    q = apply_rope(indexer.wq_b(cq).reshape(B, T, indexer.n_heads, indexer.head_dim), pos[:, None], inv_freq)
    w = indexer.weights_proj(x, jnp.float32) * (indexer.head_dim * indexer.n_heads) ** -0.5
    ref = np.asarray(indexer.select(*indexer.project(x, cq, jnp.broadcast_to(pos, (B, T)), inv_freq)[:3],
                                    jnp.broadcast_to(pos, (B, T))))
    ours = np.asarray(select_topk(q, w, keys, pos, indexer.ratio, indexer.topk, indexer.chunk, interpret=True))
    scores = np.asarray(index_scores(q, w, keys))

    def picked(idx):
        return np.where(idx >= 0, np.take_along_axis(scores, np.maximum(idx, 0), axis=-1), -np.inf)

    np.testing.assert_array_equal(ours < 0, ref < 0)
    np.testing.assert_allclose(np.sort(picked(ours), -1), np.sort(picked(ref), -1), rtol=1e-6)
    assert (ours == ref).mean() > 0.99  # fp32 summation order may only flip near-ties


def test_bad_inputs_raise_value_error():
    q, w, keys, pos = dyadic_inputs(0, B=1, T=16, H=4, C=16, ratio=4)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        select_topk(q, w[:, :8], keys, pos, 4, 8)
    with pytest.raises(ValueError, match="block_q"):
        select_topk(q, w, keys, pos, 4, 8, block_q=100)
    with pytest.raises(ValueError, match="block_k"):
        select_topk(q, w, keys, pos, 4, 8, block_k=48)
    with pytest.raises(ValueError, match="expected q"):
        select_topk(q[0], w, keys, pos, 4, 8)
    assert select_topk(q, w, keys[:, :0], pos, 4, 8).shape == (1, 16, 0)


# ------------------------------------------------------------------------------------------------
# Real Mosaic compilation for TPU topologies (no TPU needed).

REAL = dict(H=64, C=128, ratio=4)  # n_I, c_I, m of V4-Flash/Pro


def compile_for_tpu(topology, T, k, dtype=jnp.bfloat16, fn=None):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    sharding = NamedSharding(Mesh(tpu_devices_or_skip(topology)[:1], ("x",)), PartitionSpec())
    H, C, ratio = REAL["H"], REAL["C"], REAL["ratio"]
    args = (jax.ShapeDtypeStruct((1, T, H, C), dtype, sharding=sharding),
            jax.ShapeDtypeStruct((1, T, H), jnp.float32, sharding=sharding),
            jax.ShapeDtypeStruct((1, T // ratio, C), dtype, sharding=sharding),
            jax.ShapeDtypeStruct((T,), jnp.int32, sharding=sharding))
    fn = fn or (lambda q, w, keys, pos: select_topk(q, w, keys, pos, ratio, k))
    return jax.jit(fn).lower(*args).compile()


@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v6e:2x2"])
@pytest.mark.parametrize("k", [512, 1024])
def test_mosaic_compiles_for_tpu_at_the_real_head_sizes(topology, k):
    compiled = compile_for_tpu(topology, 4096, k)
    out = compiled.memory_analysis().output_size_in_bytes
    assert out == 4096 * k * 4  # int32 [1, T, k]


def test_mosaic_compiles_fp32_inputs():
    compile_for_tpu("v5p:2x2x1", 2048, 512, dtype=jnp.float32)


def test_mosaic_compiles_with_256_query_lanes_for_the_256_wide_mxu_of_v6e():
    compile_for_tpu("v6e:2x2", 4096, 512, fn=lambda q, w, keys, pos: select_topk(
        q, w, keys, pos, REAL["ratio"], 512, block_q=256))


def test_compiled_memory_grows_linearly_in_T_not_T_times_N():
    # Ragged lengths (not multiples of block_q = 128): the wrapper pads q, a linear-size temp.
    small, large = 16384 + 64, 65536 + 64  # N = T / 4 entries
    mem = {T: compile_for_tpu("v5p:2x2x1", T, 512).memory_analysis() for T in (small, large)}
    live = {T: m.temp_size_in_bytes + m.output_size_in_bytes for T, m in mem.items()}
    assert live[large] <= 4.5 * live[small]  # T grew 4x; a T x N buffer would grow 16x
    # What temp may hold: the padded copy of q and the padded [T, k] result, both O(T) (the fp32 [T, N]
    # scores would be 3.5x that at 64K)
    padded = large * REAL["H"] * REAL["C"] * 2 + large * 512 * 4
    assert mem[large].temp_size_in_bytes <= 1.05 * padded + (8 << 20)


@pytest.mark.slow
def test_reference_needs_more_temp_memory_than_the_kernel_at_64k():
    T, k = 65536, 512
    ours = compile_for_tpu("v5p:2x2x1", T, k).memory_analysis().temp_size_in_bytes
    ref = compile_for_tpu("v5p:2x2x1", T, k, fn=lambda q, w, keys, pos: select_topk_reference(
        q, w, keys, pos, 4, k, 512)).memory_analysis().temp_size_in_bytes
    assert ours < ref
