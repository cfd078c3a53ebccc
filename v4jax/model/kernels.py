"""The one place the model picks the code behind its three kernel-shaped operations: the pure-JAX
reference twin or the Pallas kernel (`pallas_kernels/`, each kernel beside its twin). A Pallas kernel
runs through `sharding.kernels.pallas_kernel`: Mosaic on TPU (also AOT from a CPU host), the
reference on GPU, the interpreter on CPU, per device on the active mesh."""

from __future__ import annotations

from typing import Callable

from pallas_kernels import lightning_indexer_reference, moe_dispatch_reference, sparse_attention_reference
from v4jax.config import AttentionImpl, MoEImpl


def sparse_attention(impl: AttentionImpl) -> Callable:
    """Core attention: (q, kv, sinks, window, compressed, topk_idx, ratio, chunk) -> [B, T, H, c]."""
    if impl is AttentionImpl.PALLAS:
        from pallas_kernels.sparse_attention import sparse_attention as kernel  # imported only when chosen
        from sharding.kernels import pallas_kernel
        return pallas_kernel(kernel)
    return sparse_attention_reference.sparse_attention


def select_topk(impl: AttentionImpl) -> Callable:
    """Lightning-indexer top-k: (q, w, keys, positions [B, T], ratio, topk, chunk) -> [B, T, k] ids."""
    if impl is AttentionImpl.PALLAS:
        from pallas_kernels.lightning_indexer import select_topk as kernel  # imported only when chosen
        from sharding.kernels import pallas_kernel
        return pallas_kernel(kernel)
    return lightning_indexer_reference.select_topk


def grouped_swiglu(impl: MoEImpl) -> Callable:
    """Routed experts on expert-sorted rows: (xs, sizes, w1, w3, w2, row_weights, limit) -> [M, d] in xs.dtype."""
    if impl is MoEImpl.PALLAS:
        from pallas_kernels.moe_dispatch import grouped_swiglu as kernel  # imported only when chosen
        return kernel  # picks Mosaic / XLA / the interpreter itself; expert parallelism is moe.py's shard_map
    if impl is MoEImpl.RAGGED_DOT:
        return moe_dispatch_reference.grouped_swiglu
    return moe_dispatch_reference.grouped_swiglu_onehot
