"""Query chunking shared by the pure-JAX references (and the model's chunked training terms): run a
function over query chunks in sequence so per-chunk temporaries are never held for all of T."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def map_query_chunks(fn, args, T: int, chunk: int):
    """Apply fn to query chunks of at most `chunk` rows and stitch the results along axis 1.

    args: arrays whose query axis is 1 ([B, T, ...]) except a leading positions array [T] (axis 0).
    Pads T up to a multiple of the chunk; padded rows are computed and dropped. Chunks run in sequence
    (lax.map) so per-chunk temporaries are never held for all of T at once.
    """
    Q = min(chunk, T)
    n = -(-T // Q)
    pad = n * Q - T

    def split(a, axis):
        a = jnp.pad(a, [(0, pad) if i == axis else (0, 0) for i in range(a.ndim)], mode="edge" if axis == 0 else "constant")
        a = a.reshape(*a.shape[:axis], n, Q, *a.shape[axis + 1:])
        return jnp.moveaxis(a, axis, 0)

    *batched, positions = args
    chunks = tuple(split(a, 1) for a in batched) + (split(positions, 0),)
    out = jax.lax.map(fn, chunks) if n > 1 else jax.tree.map(lambda o: o[None], fn(jax.tree.map(lambda c: c[0], chunks)))
    out = jnp.moveaxis(out, 0, 1)  # [B, n, Q, ...]
    return out.reshape(out.shape[0], n * Q, *out.shape[3:])[:, :T]
