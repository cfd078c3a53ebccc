"""Logical annotations -> NamedShardings for parameters, optimizer state and activations.

Every nnx Variable of the model carries `logical_axes` metadata (declared with the parameter); these
helpers resolve them through an `AxisRules` table on a mesh. Optimizer state built with
`nnx.Optimizer` copies its parameters' metadata, so the same helper places it.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from sharding.context import use_mesh_rules
from sharding.rules import AxisRules, ShardingError


def _path_name(path) -> str:
    return ".".join(str(p) for p in path)


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh, rules: AxisRules) -> nnx.State:
    """An nnx.State of NamedShardings with the structure of `state` (concrete or abstract).

    Variables without `logical_axes` (scalars such as an optimizer step count) are replicated."""
    def one(path, var):
        axes = var.get_metadata().get("logical_axes") if isinstance(var, nnx.Variable) else None
        shape = tuple(getattr(var, "shape", ()))
        if axes is None:
            if len(shape) > 1:
                raise ShardingError(f"{_path_name(path)}: a {len(shape)}-d variable without logical_axes")
            spec = PartitionSpec()
        else:
            matrix = sum(a != "layers" for a in axes) > 1
            spec = rules.spec(axes, shape, mesh, what=_path_name(path), strict=isinstance(var, nnx.Param) and matrix)
        sharding = NamedSharding(mesh, spec)
        return var.replace(sharding) if isinstance(var, nnx.Variable) else sharding

    return nnx.map_state(one, state)


def spec_table(state: nnx.State, mesh: jax.sharding.Mesh, rules: AxisRules) -> dict[str, PartitionSpec]:
    """{dotted variable path: PartitionSpec}: the layout the rules give, for tests and reports."""
    shardings = state_shardings(state, mesh, rules)
    return {_path_name(p): v.get_value().spec for p, v in nnx.to_flat_state(shardings)}


def create_sharded(make: Callable[[], Any], mesh: jax.sharding.Mesh, rules: AxisRules):
    """Build an nnx module with every variable created directly in its sharded layout (no host copy
    of the whole model): the constructor runs under jit with the rules' out_shardings."""
    abstract = nnx.eval_shape(make)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)

    @jax.jit
    def init():
        with use_mesh_rules(mesh, rules):
            return nnx.split(make())[1]

    with use_mesh_rules(mesh, rules):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def shard_module(module, mesh: jax.sharding.Mesh, rules: AxisRules):
    """Place an existing module's variables as the rules say (device_put per variable)."""
    graphdef, state = nnx.split(module)
    shardings = state_shardings(state, mesh, rules)
    state = jax.tree.map(lambda a, s: jax.device_put(a, s), state, shardings)
    return nnx.merge(graphdef, state)


def data_sharding(mesh: jax.sharding.Mesh, rules: AxisRules, shape: tuple[int, ...],
                  logical_axes: tuple[str | None, ...] = ("batch", "seq")) -> NamedSharding:
    """Sharding of an input batch (token ids [B, T]); errors when B or T does not divide."""
    spec = rules.spec(logical_axes, shape, mesh, what="input batch")
    if spec[0] is None and any(mesh.shape[a] > 1 for a in rules.mesh_axes(logical_axes[0]) if a in mesh.shape):
        raise ShardingError(f"input batch of {shape[0]} sequences does not split over the batch axes "
                            f"{rules.mesh_axes(logical_axes[0])} of mesh {dict(mesh.shape)}")
    return NamedSharding(mesh, spec)


def host_local_to_global(local: Any, mesh: jax.sharding.Mesh, rules: AxisRules, global_shape: tuple[int, ...],
                         logical_axes: tuple[str | None, ...] = ("batch", "seq")) -> jax.Array:
    """Assemble a global array from this process's rows (multi-host input pipelines: each host
    reads only its shard of the batch). `local` holds the rows of the global batch that this
    process's devices own, in order."""
    sharding = data_sharding(mesh, rules, global_shape, logical_axes)
    return jax.make_array_from_process_local_data(sharding, local, global_shape)
