"""The logical-axis rules table: every placement decision of v4jax in one place.

Parameters and activations carry logical axis names where they are declared (`logical_axes` on each
parameter, `constrain(x, names)` on key activations). A preset maps each logical name to an ordered
tuple of mesh axes. Resolving a tensor's names walks its dimensions in order; a mesh axis already
used by an earlier dimension of the same tensor is skipped (so `("experts", "embed", ...)` puts
`expert` on the experts dimension and only `fsdp` on embed). Matrix parameters must divide evenly (an
error names the parameter); vectors (norm weights, sinks, biases: kilobytes) and activations whose
dimension does not divide (batch 1 at decode) stay whole on that axis instead.

Mesh axes (sharding.mesh.MESH_AXES): data (pure data parallel, usually across slices), fsdp
(parameters and batch), expert (routed experts; batch too, tokens meet their experts by all-to-all),
context (sequence, for long prefill/training), tensor (heads, MLP columns, vocabulary).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import jax
from jax.sharding import PartitionSpec

Axes = tuple[str, ...]


class ShardingError(ValueError):
    """A mesh, rules table or tensor that cannot be placed as asked."""


# Logical names used by the model. Parameters:
PARAM_AXES = ("layers", "vocab", "embed", "embed_out", "q_lora", "heads", "head_dim", "o_groups", "o_lora",
              "index_heads", "compress_width", "experts", "expert_mlp", "mlp", "hc", "hc_mix", "hc_embed",
              "engram_cols")
# Activations:
ACTIVATION_AXES = ("batch", "seq", "act_embed", "act_hc", "act_heads", "act_index_heads", "act_vocab")
LOGICAL_AXES = PARAM_AXES + ACTIVATION_AXES

_DATA = ("data", "fsdp", "expert")  # the batch is split over every axis that does not split a layer

# The table. Each preset lists every logical name; () = replicated.
PRESETS: dict[str, dict[str, Axes]] = {
    # Pure FSDP (ZeRO-3): every large parameter split over fsdp on its first dividing dimension;
    # experts replicated; batch over data x fsdp.
    "fsdp": {
        "layers": (), "vocab": ("fsdp",), "embed": ("fsdp",), "embed_out": ("fsdp",), "q_lora": ("fsdp",),
        "heads": ("fsdp",), "head_dim": (), "o_groups": (), "o_lora": ("fsdp",), "index_heads": (),
        "compress_width": ("fsdp",), "experts": (), "expert_mlp": ("fsdp",), "mlp": ("fsdp",), "hc": (),
        "hc_mix": (), "hc_embed": ("fsdp",), "engram_cols": ("fsdp",),
        "batch": ("data", "fsdp"), "seq": (), "act_embed": (), "act_hc": (), "act_heads": (), "act_index_heads": (),
        "act_vocab": (),
    },
    # FSDP + expert parallelism: routed experts split over `expert` (tokens exchanged by all-to-all),
    # dense parameters split over fsdp x expert, batch over data x fsdp x expert.
    "fsdp_ep": {
        "layers": (), "vocab": ("fsdp", "expert"), "embed": ("fsdp", "expert"), "embed_out": ("fsdp", "expert"),
        "q_lora": ("fsdp", "expert"), "heads": ("fsdp", "expert"), "head_dim": (), "o_groups": (),
        "o_lora": ("fsdp", "expert"), "index_heads": (), "compress_width": ("fsdp", "expert"),
        "experts": ("expert",), "expert_mlp": ("fsdp",), "mlp": ("fsdp", "expert"), "hc": (), "hc_mix": (),
        "hc_embed": ("fsdp", "expert"), "engram_cols": ("fsdp", "expert"),
        "batch": _DATA, "seq": (), "act_embed": (), "act_hc": (), "act_heads": (), "act_index_heads": (),
        "act_vocab": (),
    },
    # FSDP + tensor parallelism (heads, MLP columns, vocabulary over `tensor`) + expert parallelism.
    "fsdp_tp_ep": {
        "layers": (), "vocab": ("tensor", "fsdp"), "embed": ("fsdp", "expert"), "embed_out": ("tensor",),
        "q_lora": ("fsdp", "expert"), "heads": ("tensor",), "head_dim": (), "o_groups": ("tensor",),
        "o_lora": ("fsdp", "expert"), "index_heads": ("tensor",), "compress_width": ("fsdp", "expert"),
        "experts": ("expert",), "expert_mlp": ("tensor",), "mlp": ("tensor",), "hc": (), "hc_mix": (),
        "hc_embed": ("fsdp", "expert"), "engram_cols": ("fsdp", "expert"),
        "batch": _DATA, "seq": (), "act_embed": (), "act_hc": (), "act_heads": ("tensor",),
        "act_index_heads": (), "act_vocab": ("tensor",),
    },
    # Serving at small batches (decode): every matrix split over `tensor` on its first dividing
    # dimension, the model width for most, and the residual streams' width with them (so each matmul
    # sums partial products over `tensor`, a few KB per token, where XLA would otherwise gather the
    # weights of a 16-token step); nothing replicated; routed experts whole over `expert` when the
    # mesh has one, else on every device with their width split (the gathered decode path then reads
    # only the chosen experts' columns, architecture.md §5.5); the indexer's queries split by head too,
    # so each device scores the compressed entries for its heads (a 1M cache: 262,144 entries per CSA
    # layer per token) and one sum over `tensor` gives the scores. Batch over data x fsdp x expert.
    "serve_tp": {
        "layers": (), "vocab": ("tensor",), "embed": ("tensor",), "embed_out": ("tensor",), "q_lora": ("tensor",),
        "heads": ("tensor",), "head_dim": (), "o_groups": ("tensor",), "o_lora": ("tensor",),
        "index_heads": ("tensor",), "compress_width": ("tensor",), "experts": ("expert",),
        "expert_mlp": ("tensor",), "mlp": ("tensor",), "hc": (), "hc_mix": (), "hc_embed": ("tensor",),
        "engram_cols": ("tensor",),
        "batch": _DATA, "seq": (), "act_embed": ("tensor",), "act_hc": (), "act_heads": ("tensor",),
        "act_index_heads": ("tensor",), "act_vocab": ("tensor",),
    },
    # Long context: the sequence split over `context` (activations); parameters FSDP over
    # fsdp x context x expert so the extra axis also holds parameter shards; experts over `expert`.
    "long_context": {
        "layers": (), "vocab": ("fsdp", "context"), "embed": ("fsdp", "context", "expert"),
        "embed_out": ("fsdp", "context"), "q_lora": ("fsdp", "context", "expert"),
        "heads": ("fsdp", "context", "expert"), "head_dim": (), "o_groups": (),
        "o_lora": ("fsdp", "context", "expert"), "index_heads": (), "compress_width": ("fsdp", "context"),
        "experts": ("expert",), "expert_mlp": ("fsdp", "context"), "mlp": ("fsdp", "context", "expert"),
        "hc": (), "hc_mix": (), "hc_embed": ("fsdp", "context", "expert"),
        "engram_cols": ("fsdp", "context", "expert"),
        "batch": _DATA, "seq": ("context",), "act_embed": (), "act_hc": (), "act_heads": (), "act_index_heads": (),
        "act_vocab": (),
    },
}


@dataclasses.dataclass(frozen=True)
class AxisRules:
    """One rules table: logical axis name -> ordered mesh axes."""

    name: str
    table: tuple[tuple[str, Axes], ...]

    def __post_init__(self):
        missing = [a for a in LOGICAL_AXES if a not in dict(self.table)]
        if missing:
            raise ShardingError(f"rules {self.name!r} do not map the logical axes {missing}")

    def mesh_axes(self, logical: str) -> Axes:
        try:
            return dict(self.table)[logical]
        except KeyError:
            raise ShardingError(f"unknown logical axis {logical!r}; the rules table knows {list(LOGICAL_AXES)}") from None

    def spec(self, logical_axes: Iterable[str | None], shape: tuple[int, ...], mesh: jax.sharding.Mesh, *,
             what: str = "activation", strict: bool = False) -> PartitionSpec:
        """PartitionSpec for a tensor of `shape` named `logical_axes` on `mesh`.

        Dimensions take their mesh axes in order, skipping an axis already used by an earlier
        dimension or one that does not divide the dimension (a later dimension may take it instead:
        the embedding's vocabulary 129280 splits over fsdp=8 and its width over expert=64).
        strict=True (matrix parameters): every mesh axis the rules ask for must land on some
        dimension, else ShardingError naming `what`: a matrix silently replicated over an axis meant
        to split it is the memory blow-up the table exists to prevent."""
        logical_axes = tuple(logical_axes)
        if len(logical_axes) != len(shape):
            raise ShardingError(f"{what}: {len(logical_axes)} logical axes {logical_axes} for shape {shape}")
        used: set[str] = set()
        requested: list[str] = []
        out = []
        for name, size in zip(logical_axes, shape):
            if name is None:
                out.append(None)
                continue
            axes = []
            for ax in self.mesh_axes(name):
                if ax not in mesh.shape:
                    raise ShardingError(f"rules {self.name!r} map {name!r} to mesh axis {ax!r}, which the mesh "
                                        f"{dict(mesh.shape)} does not have")
                if mesh.shape[ax] == 1:
                    continue
                requested.append(ax)
                if ax in used or size % (math.prod(mesh.shape[a] for a in axes) * mesh.shape[ax]):
                    continue
                axes.append(ax)
            used.update(axes)
            out.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
        missing = [a for a in dict.fromkeys(requested) if a not in used]
        if strict and missing:
            dims = ", ".join(f"{n}={s}" for n, s in zip(logical_axes, shape))
            raise ShardingError(f"{what}: mesh axes {tuple(missing)} of sizes {tuple(mesh.shape[a] for a in missing)} "
                                f"divide none of its dimensions ({dims}) that the rules {self.name!r} allow")
        return PartitionSpec(*out)


def get_rules(name: str, **overrides: Axes | str | None) -> AxisRules:
    """A preset by name, with optional per-logical-axis overrides (`experts=("expert", "fsdp")`)."""
    if name not in PRESETS:
        raise ShardingError(f"unknown rules preset {name!r}; choose one of {sorted(PRESETS)}")
    table = dict(PRESETS[name])
    for logical, axes in overrides.items():
        if logical not in table:
            raise ShardingError(f"unknown logical axis {logical!r} in override; known: {list(LOGICAL_AXES)}")
        table[logical] = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    return AxisRules(name, tuple(table.items()))


def parse_overrides(text: str) -> dict[str, Axes]:
    """'experts=expert+fsdp,vocab=' -> {"experts": ("expert", "fsdp"), "vocab": ()} (command lines)."""
    out: dict[str, Axes] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise ShardingError(f"rule override {item!r} is not logical=axis[+axis...]")
        k, v = item.split("=", 1)
        out[k.strip()] = tuple(a for a in v.strip().split("+") if a)
    return out
