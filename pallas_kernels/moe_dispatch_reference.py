"""The routed experts' grouped SwiGLU FFN (docs/architecture.md §5.3), pure JAX: the reference twins of
the Pallas grouped matmuls in `moe_dispatch.py`.

Rows arrive sorted by expert (`sizes` rows per expert); each row's combine weight is applied before
W2, as DeepSeek's inference code does. `grouped_swiglu` uses `jax.lax.ragged_dot`;
`grouped_swiglu_onehot` computes the same function with one masked dense FFN per expert.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def swiglu(gate: jax.Array, up: jax.Array, limit: float) -> jax.Array:
    """SiLU(min(gate, L)) * clip(up, -L, L) (architecture.md §5.3), fp32."""
    return jax.nn.silu(jnp.minimum(gate, limit)) * jnp.clip(up, -limit, limit)



def grouped_swiglu(xs: jax.Array, sizes: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array,
                   row_weights: jax.Array, limit: float) -> jax.Array:
    """The routed experts on expert-contiguous rows (reference path, `jax.lax.ragged_dot`).

    xs [M, d] sorted by expert, sizes [E] rows per expert (sum <= M; rows past the sum belong to no
    expert and give zeros), w1/w3 [E, d, I], w2 [E, I, d], row_weights [M] fp32 combine weight of each
    row (applied before W2, as the official code does). Returns [M, d] fp32.
    """
    dt = xs.dtype
    gate = jax.lax.ragged_dot(xs, w1.astype(dt), sizes, preferred_element_type=jnp.float32)
    up = jax.lax.ragged_dot(xs, w3.astype(dt), sizes, preferred_element_type=jnp.float32)
    h = swiglu(gate, up, limit) * row_weights[:, None]
    return jax.lax.ragged_dot(h.astype(dt), w2.astype(dt), sizes, preferred_element_type=jnp.float32)


def grouped_swiglu_onehot(xs: jax.Array, sizes: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array,
                          row_weights: jax.Array, limit: float) -> jax.Array:
    """The same function as `grouped_swiglu` by one masked dense FFN per expert (moe_impl=reference):
    E times the FLOPs, no ragged op, easy to read and to trust."""
    dt = xs.dtype
    ends = jnp.cumsum(sizes)
    expert = jnp.searchsorted(ends, jnp.arange(xs.shape[0]), side="right")  # E for rows past the groups
    mask = jax.nn.one_hot(expert, w1.shape[0], dtype=jnp.float32)  # [M, E]
    gate = jnp.einsum("md,edi->emi", xs, w1.astype(dt), preferred_element_type=jnp.float32)
    up = jnp.einsum("md,edi->emi", xs, w3.astype(dt), preferred_element_type=jnp.float32)
    h = swiglu(gate, up, limit) * (mask.T * row_weights[None, :])[..., None]
    return jnp.einsum("emi,eid->md", h.astype(dt), w2.astype(dt), preferred_element_type=jnp.float32)
