"""The mesh and rules in force while tracing, and the one call model code uses to place activations.

Model code names logical axes only: `constrain(x, ("batch", "seq", "act_embed"))`. Outside
`use_mesh_rules` (one CPU, tests, the parity tool) it is the identity, so the same code runs unsharded
and sharded. Inside, the rules table turns the names into a `NamedSharding` on the active mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import TYPE_CHECKING, Iterator

import jax

if TYPE_CHECKING:
    from sharding.rules import AxisRules

_ACTIVE: contextvars.ContextVar[tuple[jax.sharding.Mesh, "AxisRules"] | None] = contextvars.ContextVar(
    "v4jax_mesh_rules", default=None)


@contextlib.contextmanager
def use_mesh_rules(mesh: jax.sharding.Mesh, rules: "AxisRules") -> Iterator[None]:
    """Trace model code on `mesh` with `rules` (a `sharding.rules.AxisRules`)."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> tuple[jax.sharding.Mesh, "AxisRules"] | None:
    return _ACTIVE.get()


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
    """with_sharding_constraint by logical axis names; identity when no mesh is active."""
    ctx = _ACTIVE.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    spec = rules.spec(logical_axes, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))
