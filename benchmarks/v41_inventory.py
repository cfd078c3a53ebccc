"""The released DeepSeek-V4.1-Flash checkpoint's tensor inventory (tests/fixtures/v41_flash_inventory.json:
names, shapes and dtypes as stored, each with its public source) against the v41-flash preset: the
parameter counts of both sides, in total and per role.

Release side: elements of every stored tensor, an I8 (packed MXFP4) byte counted as two parameters, the
`.scale` tensors (UE8M0 block scales) left out. Our side: `benchmarks.v41.param_counts` over the abstract
model (Engram tables without their row padding). Roles and the active count (per text token: everything
but the routed experts, the Engram tables, DSpark and the vision tower, plus k of E routed experts and the
Engram rows one token looks up) follow `param_counts`.

Usage:  JAX_PLATFORMS=cpu python -m benchmarks.v41_inventory
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures",
                       "v41_flash_inventory.json")
PLACEHOLDERS = ("L", "K", "E", "B")  # backbone layer, DSpark stage (official mtp.{K}), routed expert, vision block


def load_inventory(path: str = FIXTURE) -> tuple[dict, dict[str, tuple[tuple[int, ...], str]]]:
    """(the fixture document, every release tensor name -> (shape, dtype)), the placeholder names
    expanded over their sets."""
    with open(path) as f:
        doc = json.load(f)
    sets = doc["sets"]

    def values(var: str, key: str) -> list[int]:
        v = sets[var][key]
        return list(range(v)) if isinstance(v, int) else list(v)

    inv: dict[str, tuple[tuple[int, ...], str]] = {}
    for entry in doc["tensors"]:
        names = [entry["name"]]
        for var in PLACEHOLDERS:
            if var in entry:
                names = [n.replace("{%s}" % var, str(i)) for n in names for i in values(var, entry[var])]
        for name in names:
            if name in inv:
                raise ValueError(f"{name} is listed twice in {path}")
            inv[name] = (tuple(entry["shape"]), entry["dtype"])
    return doc, inv


def stored_bytes(doc: dict, shape: tuple[int, ...], dtype: str) -> int:
    return math.prod(shape) * doc["dtype_bytes"][dtype]


def subsystem(name: str) -> str:
    """The subsystem the storage summary (fixture source S2) files a tensor under (its category names)."""
    if name.startswith(("vision.", "aligner.")):
        return "vision"
    if name in ("embed.weight", "image_start", "image_end", "image_newline"):
        return "embedding"
    if name == "head.weight":
        return "lm-head"
    if name == "norm.weight" or (name.startswith("layers.")
                                 and name.endswith(("attn_norm.weight", "ffn_norm.weight"))):
        return "norm"
    if ".hc_" in name:
        return "unknown"
    if name.startswith("mtp."):
        for part, role in ((".ffn.experts.", "mtp-expert"), (".ffn.gate.", "mtp-router"),
                           (".ffn.shared_experts.", "mtp-shared")):
            if part in name:
                return role
        return "mtp"
    for part, role in ((".engram.", "engram"), (".attn.compressor.", "kv-index"), (".attn.indexer.", "kv-index"),
                       (".ffn.experts.", "routed-expert"), (".ffn.gate.", "router"),
                       (".ffn.shared_experts.", "shared-expert"), (".attn.", "attention")):
        if part in name:
            return role
    raise KeyError(f"no subsystem for {name}")


def parameters(shape: tuple[int, ...], dtype: str) -> int:
    """Parameters a stored tensor holds: an I8 byte is two E2M1 codes (the routed experts' MXFP4)."""
    return math.prod(shape) * (2 if dtype == "I8" else 1)


def release_param_counts(inv: Mapping[str, tuple[tuple[int, ...], str]], cfg) -> dict[str, int | float]:
    """The release's parameters in `benchmarks.v41.param_counts`'s roles (scales not counted)."""
    from benchmarks.v41 import role_counts

    sizes = {n: parameters(*v) for n, v in inv.items() if not n.endswith(".scale")}
    return role_counts(sizes, cfg, engram_suffix="engram.embed.weight", dspark_prefix="mtp.")


def main() -> int:
    from benchmarks.v41 import param_counts
    from v4jax.config_v41 import V41Config

    cfg = V41Config.preset("v41-flash")
    doc, inv = load_inventory()
    n_bytes = sum(stored_bytes(doc, *v) for v in inv.values())
    print(f"release {doc['release']['repo']} @ {doc['release']['revision'][:8]}: {len(inv):,} tensors, "
          f"{n_bytes:,} bytes (index total_size {doc['totals']['tensor_bytes']:,})")
    rel, ours = release_param_counts(inv, cfg), param_counts(cfg)
    print("\n| role | release | v41-flash | difference |\n|---|---:|---:|---:|")
    for role in ("total", "experts", "engram", "dspark", "vision", "rest", "active"):
        print(f"| {role} | {rel[role]:,.0f} | {ours[role]:,.0f} | {ours[role] - rel[role]:+,.0f} |")
    print(f"\n(release total {rel['total'] / 1e9:.2f}e9, active per text token {rel['active'] / 1e9:.2f}e9; "
          f"declared by the release's metadata: {doc['totals']['declared_parameters']:,})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
