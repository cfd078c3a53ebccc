"""Device meshes with named axes, single-slice and multi-slice (ICI inside a slice, DCN across).

A mesh is described by axis sizes, e.g. `"fsdp=4,expert=2"` or `{"data": 2, "fsdp": -1}`; axes not
named have size 1, and one axis may be -1 (whatever the devices leave). Every v4jax mesh has the
same five axes in the same order, so the rules table can name any of them on any mesh.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from sharding.rules import ShardingError

MESH_AXES = ("data", "fsdp", "expert", "context", "tensor")


def parse_axes(spec: str | Mapping[str, int] | None) -> dict[str, int]:
    """'fsdp=4,expert=2' or a mapping -> {axis: size} over MESH_AXES (unnamed axes are 1)."""
    if spec is None or spec == "":
        items: dict[str, int] = {}
    elif isinstance(spec, str):
        items = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            if "=" not in part:
                raise ShardingError(f"mesh axis {part!r} is not name=size")
            k, v = part.split("=", 1)
            try:
                items[k.strip()] = int(v)
            except ValueError:
                raise ShardingError(f"mesh axis {k.strip()!r} has a non-integer size {v!r}") from None
    else:
        items = dict(spec)
    for k, v in items.items():
        if k not in MESH_AXES:
            raise ShardingError(f"unknown mesh axis {k!r}; mesh axes are {list(MESH_AXES)}")
        if not (v == -1 or (isinstance(v, int) and v >= 1)):
            raise ShardingError(f"mesh axis {k!r} must have a positive size (or -1), got {v}")
    return {a: items.get(a, 1) for a in MESH_AXES}


def _fill(sizes: dict[str, int], n: int, what: str) -> dict[str, int]:
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ShardingError(f"{what}: only one axis may be -1, got {free}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if n % known:
            raise ShardingError(f"{what}: {n} devices do not divide by the named axes' product {known}")
        sizes = {**sizes, free[0]: n // known}
    if math.prod(sizes.values()) != n:
        raise ShardingError(f"{what}: mesh {sizes} needs {math.prod(sizes.values())} devices, "
                            f"but {n} are available")
    return sizes


def make_mesh(ici: str | Mapping[str, int] | None = None, dcn: str | Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with axes MESH_AXES.

    ici: axis sizes inside one slice (or on a single host/slice). dcn: axis sizes across slices; the
    mesh axis size is then ici * dcn, with slices laid out so DCN-crossing collectives run only on the
    axes named in `dcn` (jax mesh_utils.create_hybrid_device_mesh). Raises ShardingError before any
    compile when the sizes and the devices disagree."""
    devices = list(jax.devices() if devices is None else devices)
    if dcn:
        dcn_sizes = parse_axes(dcn)
        n_slices = len({getattr(d, "slice_index", 0) for d in devices})
        dcn_sizes = _fill(dcn_sizes, n_slices, "dcn mesh")
        per_slice = len(devices) // n_slices
        ici_sizes = _fill(parse_axes(ici), per_slice, "ici mesh (per slice)")
        from jax.experimental import mesh_utils
        arr = mesh_utils.create_hybrid_device_mesh([ici_sizes[a] for a in MESH_AXES],
                                                   [dcn_sizes[a] for a in MESH_AXES], devices)
    else:
        sizes = parse_axes(ici)
        requested = math.prod(s for s in sizes.values() if s != -1)
        if requested > len(devices):
            raise ShardingError(f"mesh {ici!r} asks for {requested} devices, but only {len(devices)} exist")
        sizes = _fill(sizes, len(devices), "mesh")
        shape = [sizes[a] for a in MESH_AXES]
        try:
            from jax.experimental import mesh_utils
            arr = mesh_utils.create_device_mesh(shape, devices)
        except (ValueError, AssertionError, NotImplementedError):
            arr = np.asarray(devices, dtype=object).reshape(shape)  # host CPU devices have no topology
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def describe(mesh: Mesh) -> str:
    return ",".join(f"{a}={s}" for a, s in mesh.shape.items() if s > 1) or "single device"


def compiler_options(mesh: Mesh | None) -> dict[str, str]:
    """XLA options the parallel layers want for a program over `mesh`: on TPU, asynchronous ragged
    all-to-alls, so that the expert-parallel exchange of one pass runs while the experts compute on
    another (`sharding.expert_parallel`, passes pipelined two per iteration); XLA:TPU runs them
    synchronously by default. Nothing elsewhere."""
    if mesh is None or mesh.devices.flat[0].platform != "tpu":
        return {}
    return {"xla_tpu_enable_async_ragged_all_to_all": "true"}
