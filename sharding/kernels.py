"""Pallas kernels as the model calls them: by platform, and per device on the active mesh.

A Mosaic kernel is a custom call XLA cannot partition: under a sharded jit it would gather every
operand onto each device and run the whole problem there. The kernels the model uses are independent
per sequence (and the attention core per head: key = value is one shared head, sinks are per head),
so `run_kernel` runs them inside `jax.shard_map` over the mesh axes the rules table gives the batch
(and `act_heads`), on each device's own sequences and heads, and without any collective. The
sequence stays whole inside a call (sliding windows and compressed entries reach across any split of
it), so under rules that split `seq` the kernel's operands are gathered over those axes.

Which code runs where (`by_platform`):
  TPU   the Mosaic kernel (also when compiling for a TPU topology from a CPU host);
  GPU   the kernel's pure-JAX reference (the same function by construction; these kernels are
        written for TPU and Pallas' interpreter on a GPU would be absurdly slow);
  other Pallas' interpreter (CPU tests).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
from jax.sharding import PartitionSpec as P

from sharding.context import active

Names = tuple[str | None, ...]


@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """Logical axis names of a kernel's positional arguments (None: not an array: a size, a ratio;
    an array argument may also be passed as None) and of its result."""

    args: tuple[Names | None, ...]
    out: Names


# q [B,T,H,c], kv [B,T,c], sinks [H], window, compressed [B,N,c], topk_idx [B,T,k], ratio, chunk,
# key_start [B,T], entry_start [B,T]
SPARSE_ATTENTION = KernelLayout(
    args=(("batch", None, "act_heads", None), ("batch", None, None), ("act_heads",), None,
          ("batch", None, None), ("batch", None, None), None, None, ("batch", None), ("batch", None)),
    out=("batch", None, "act_heads", None))
# q [B,T,n_I,c_I], w [B,T,n_I], keys [B,N,c_I], positions [B,T], ratio, topk, chunk, entry_start [B,T].
# The index heads stay whole: the score sums over them before the top-k.
LIGHTNING_INDEXER = KernelLayout(
    args=(("batch", None, None, None), ("batch", None, None), ("batch", None, None), ("batch", None), None, None,
          None, ("batch", None)),
    out=("batch", None, None))


@functools.cache
def _registry() -> dict[Callable, tuple[KernelLayout, Callable]]:
    from pallas_kernels import lightning_indexer, sparse_attention  # imported only when a kernel is chosen
    return {
        sparse_attention.sparse_attention: (SPARSE_ATTENTION, sparse_attention.sparse_attention_reference),
        lightning_indexer.select_topk: (LIGHTNING_INDEXER, lightning_indexer.select_topk_reference),
    }


def pallas_kernel(kernel: Callable) -> Callable:
    """The model's entry to a registered Pallas kernel (`kernel(*args, interpret=...)`): a function of
    the kernel's positional arguments that picks the code for the platform and runs per device on the
    active mesh. ValueError for a kernel without a declared layout."""
    entry = _registry().get(kernel)
    if entry is None:
        raise ValueError(f"no layout declared for kernel {kernel.__module__}.{kernel.__qualname__} in sharding/kernels.py")
    layout, reference = entry
    return lambda *args: run_kernel(layout, lambda *a, platform=None: by_platform(kernel, reference, a, platform),
                                    *args)


def by_platform(kernel: Callable, reference: Callable, args: tuple, platform: str | None = None):
    """kernel(*args) on TPU, reference(*args) on GPU, the interpreted kernel elsewhere. platform None:
    decided when lowering (`lax.platform_dependent`), so an AOT compile for a TPU topology on a CPU
    host gets the Mosaic kernel."""
    if platform is None:
        return jax.lax.platform_dependent(tpu=lambda: kernel(*args, interpret=False),
                                          cuda=lambda: reference(*args), rocm=lambda: reference(*args),
                                          default=lambda: kernel(*args, interpret=True))
    if platform == "tpu":
        return kernel(*args, interpret=False)
    if platform in ("gpu", "cuda", "rocm"):
        return reference(*args)
    return kernel(*args, interpret=True)


def run_kernel(layout: KernelLayout, fn: Callable, *args):
    """fn(*args), per device inside shard_map on the active mesh (`sharding.context`), else directly.

    fn takes the positional arguments and a keyword `platform` (the mesh's device platform, None
    outside a mesh). Each logical name of `layout` resolves once over the whole call (so q's heads
    and the sinks split alike), by the rules table in the order the names first appear."""
    if len(args) > len(layout.args):
        raise ValueError(f"kernel layout names {len(layout.args)} arguments, got {len(args)}")
    args = args + (None,) * (len(layout.args) - len(args))  # trailing optional arrays left out
    ctx = active()
    if ctx is None:
        return fn(*args, platform=None)
    mesh, rules = ctx
    sizes: dict[str, int] = {}
    arrays = []
    for i, (names, a) in enumerate(zip(layout.args, args)):
        if names is None or a is None:
            continue
        if len(names) != a.ndim:
            raise ValueError(f"kernel argument {i}: {len(names)} logical axes {names} for shape {a.shape}")
        for name, size in zip(names, a.shape):
            if name is not None and sizes.setdefault(name, size) != size:
                raise ValueError(f"kernel argument {i}: logical axis {name!r} has size {size}, "
                                 f"another argument gives it {sizes[name]}")
        arrays.append(i)
    resolved = dict(zip(sizes, rules.spec(tuple(sizes), tuple(sizes.values()), mesh)))

    def spec(names: Names) -> P:
        return P(*(None if n is None else resolved.get(n) for n in names))

    def body(*local):
        full = list(args)
        for i, a in zip(arrays, local):
            full[i] = a
        return fn(*full, platform=mesh.devices.flat[0].platform)

    # check_vma=False: Pallas calls do not type their outputs' varying mesh axes (and the generic
    # interpreter cannot slice a varying operand); every operand is split or whole as the specs say,
    # so shard_map's own transpose (psum of the cotangents over the axes an input is whole on) is right.
    fn_sharded = jax.shard_map(body, mesh=mesh, in_specs=tuple(spec(layout.args[i]) for i in arrays),
                               out_specs=spec(layout.out), check_vma=False)
    return fn_sharded(*(args[i] for i in arrays))
