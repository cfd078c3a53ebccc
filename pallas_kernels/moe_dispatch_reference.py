"""The routed experts' grouped SwiGLU FFN (docs/architecture.md §5.3), pure JAX: the reference twins of
the Pallas grouped matmuls in `moe_dispatch.py`.

Rows arrive sorted by expert (`sizes` rows per expert); each row's combine weight is applied before
W2. Each of the three GEMMs accumulates in fp32 and its result is rounded to the compute dtype, as
DeepSeek's inference code has them (`Expert.forward`: `w1(x).float()`, `w3(x).float()`, and `w2(...)`
returned in the input's dtype; the caller sums a token's rows in fp32): `expert_gemm`.
`grouped_swiglu` uses `jax.lax.ragged_dot`; `grouped_swiglu_onehot` computes the same function with
one masked dense FFN per expert.
`gathered_swiglu` computes it for a few unsorted rows with each row's expert weights gathered (decode);
`dense_swiglu` runs every expert on every token (a device's local experts at decode).
`permute` / `unpermute_combine` sort the (token, choice) rows by expert and sum them back per token.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def swiglu(gate: jax.Array, up: jax.Array, limit: float) -> jax.Array:
    """SiLU(min(gate, L)) * clip(up, -L, L) (architecture.md §5.3), fp32."""
    return jax.nn.silu(jnp.minimum(gate, limit)) * jnp.clip(up, -limit, limit)



def grouped_swiglu(xs: jax.Array, sizes: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array,
                   row_weights: jax.Array, limit: float, act_quant: Callable | None = None,
                   expected_rows: int | None = None) -> jax.Array:
    """The routed experts on expert-contiguous rows (reference path, `jax.lax.ragged_dot`).

    xs [M, d] sorted by expert, sizes [E] rows per expert (sum <= M; rows past the sum belong to no
    expert and give zeros), w1/w3 [E, d, I], w2 [E, I, d], row_weights [M] fp32 combine weight of each
    row (applied before W2, as the official code does). Returns [M, d] in xs.dtype. Each GEMM's result
    is rounded to xs.dtype (`expert_gemm`); act_quant (release numerics) is applied to its input.
    expected_rows: the Pallas twin's cost-estimate hint; unused here (XLA costs its own ops).
    """
    dt = xs.dtype
    mm = expert_gemm(lambda a, w: jax.lax.ragged_dot(a, w.astype(dt), sizes, preferred_element_type=jnp.float32),
                     act_quant)
    h = swiglu(mm(xs, w1), mm(xs, w3), limit) * row_weights[:, None]  # [M, I] fp32
    return mm(h.astype(dt), w2).astype(dt)  # [M, d]


def expert_gemm(gemm: Callable, act_quant: Callable | None) -> Callable:
    """An expert GEMM as DeepSeek's inference code computes it (architecture.md §5.3): gemm(a, w) (fp32
    accumulation) with its result rounded to a's dtype, as the official BF16 and FP8/FP4 GEMMs return
    it, and handed on in fp32 (for the SwiGLU, the row weight, the sum). act_quant (release numerics,
    architecture.md §10.3): applied to a first. In fp32 runs the rounding is the identity."""
    quant = act_quant or (lambda a: a)
    return lambda a, w: gemm(quant(a), w).astype(a.dtype).astype(jnp.float32)


def grouped_swiglu_onehot(xs: jax.Array, sizes: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array,
                          row_weights: jax.Array, limit: float, act_quant: Callable | None = None,
                          expected_rows: int | None = None) -> jax.Array:
    """The same function as `grouped_swiglu` by one masked dense FFN per expert (moe_impl=reference):
    E times the FLOPs, no ragged op, easy to read and to trust. expected_rows: unused, as there."""
    dt = xs.dtype
    ends = jnp.cumsum(sizes)
    expert = jnp.searchsorted(ends, jnp.arange(xs.shape[0]), side="right")  # E for rows past the groups
    mask = jax.nn.one_hot(expert, w1.shape[0], dtype=jnp.float32)  # [M, E]
    up_proj = expert_gemm(lambda a, w: jnp.einsum("md,edi->emi", a, w.astype(dt), preferred_element_type=jnp.float32),
                          act_quant)
    h = swiglu(up_proj(xs, w1), up_proj(xs, w3), limit) * (mask.T * row_weights[None, :])[..., None]
    # one expert per row (the others' h is zero), so rounding the summed result rounds that expert's
    down = expert_gemm(lambda a, w: jnp.einsum("emi,eid->md", a, w.astype(dt), preferred_element_type=jnp.float32),
                       act_quant)
    return down(h.astype(dt), w2).astype(dt)  # [M, d]


def dense_swiglu(x: jax.Array, combine: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array, limit: float,
                 act_quant: Callable | None = None) -> jax.Array:
    """sum_e combine[:, e] FFN_e(x): every expert on every token, one dense FFN per expert (a device's
    few local experts on an expert group's few tokens: decode under expert parallelism).

    x [N, d]; combine [N, E] fp32, each token's combine weight for each expert (0 where it did not
    choose it); w1/w3 [E, d, I], w2 [E, I, d]. Returns [N, d] fp32: each (token, expert) result as
    `grouped_swiglu` computes its row (each GEMM's result rounded to x.dtype, the combine weight applied
    before W2), summed over the experts in fp32. E times the FLOPs of the chosen rows and each expert's
    weights read once, by plain dots: inside the scan over layers XLA reads the layer's slice of the
    stacked weights in place, where a grouped matmul's custom call, or a loop over row windows, gets
    the slice copied out of the stack first (architecture.md §5.5)."""
    dt = x.dtype
    up = expert_gemm(lambda a, w: jnp.einsum("nd,edi->eni", a, w.astype(dt), preferred_element_type=jnp.float32),
                     act_quant)
    h = swiglu(up(x, w1), up(x, w3), limit) * combine.T[..., None]  # [E, N, I] fp32
    down = expert_gemm(lambda a, w: jnp.einsum("eni,eid->end", a, w.astype(dt), preferred_element_type=jnp.float32),
                       act_quant)
    return jnp.sum(down(h.astype(dt), w2), axis=0)  # [N, d]


def gathered_swiglu(x: jax.Array, experts: jax.Array, row_weights: jax.Array, w1: jax.Array, w3: jax.Array,
                    w2: jax.Array, limit: float, act_quant: Callable | None = None) -> jax.Array:
    """sum_j row_weights[:, j] FFN_{experts[:, j]}(x) for a few tokens, no sorting: each (token, choice)
    row multiplies its own expert's weights, so the FLOPs are exactly the rows' and the weight bytes
    read are the chosen experts' (a decode step reads 6 of 256 experts, where a grouped matmul is
    costed, and on some backends run, over every expert). With `expert_mlp` or the model width split
    over the mesh each device does its slice of every row, locally.

    Each row's weights are one dynamic slice, multiplied right there (the rows are unrolled: meant for
    tens of rows): XLA fuses the slice, and inside the scan over layers the scan's own slice of the
    stacked weights, into the row's matmul, which then reads only that expert's bytes. A gather
    (`w1[experts]`) would first copy the whole layer's experts out of the stack, and stacking the
    rows' slices into one [N, k, d, I] operand writes them out and reads them again (v4-flash decode
    on 8 v5p chips: 8.8 GiB of HBM traffic per device that way, 4.7 GiB this way, by
    `benchmarks.hlo_costs`).

    x [N, d]; experts [N, k] int; row_weights [N, k] fp32; w1/w3 [E, d, I], w2 [E, I, d]. Returns
    [N, d] fp32: each row's FFN as `grouped_swiglu` computes it (each GEMM's result rounded to x.dtype;
    release numerics: act_quant on each GEMM's input), the k rows summed in fp32."""
    dt = x.dtype
    N, k = experts.shape
    gemm = expert_gemm(lambda a, w: jnp.dot(a, w.astype(dt), preferred_element_type=jnp.float32), act_quant)

    def row(n: int, j: int) -> jax.Array:  # [1, d]: token n's choice j with its expert's weights
        take = lambda w: jax.lax.dynamic_index_in_dim(w, experts[n, j], keepdims=False)  # noqa: E731
        a = x[n][None]  # [1, d]
        h = swiglu(gemm(a, take(w1)), gemm(a, take(w3)), limit) * row_weights[n, j]  # [1, I]
        return gemm(h.astype(dt), take(w2))

    return jnp.concatenate([sum(row(n, j) for j in range(k)) for n in range(N)])  # [N, d] fp32


# ----------------------------------------------------------------------------------------------
# Permutation (plain JAX: a gather and a scatter-add that XLA already does at HBM speed), shared by the
# model's sorted dispatch and the kernel's callers


def permute(x: jax.Array, experts: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sort the (token, choice) pairs by expert, stably (rows of one expert keep token order).

    x [N, d], experts [N, k] int32 in [0, num_experts) -> (xs [N*k, d] rows grouped by expert,
    sizes [E] int32 rows per expert, order [N*k] the flat pair index n*k + j of each row).
    """
    k = experts.shape[1]
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return x[order // k], sizes, order


def unpermute_combine(y: jax.Array, order: jax.Array, num_tokens: int, k: int) -> jax.Array:
    """Inverse of permute plus the sum over a token's k choices: y [N*k, d] -> [N, d] fp32.

    The combine weights were already applied per row (`row_weights` of grouped_swiglu).
    """
    return jnp.zeros((num_tokens, y.shape[1]), jnp.float32).at[order // k].add(y.astype(jnp.float32))
