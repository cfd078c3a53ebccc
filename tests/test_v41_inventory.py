"""The v41-flash preset against the released DeepSeek-V4.1-Flash checkpoint's tensor inventory
(tests/fixtures/v41_flash_inventory.json: every tensor's name, shape and dtype as stored, with its public
source; observed entries and config-derived ones marked). Abstract shapes only: the model is built with
`nnx.eval_shape`, nothing is materialised.

* The inventory reproduces the release's published totals exactly (tensor count, bytes, per subsystem,
  declared parameters), so the config-derived entries are pinned by them too.
* Every release tensor that is not a block scale has a parameter of ours (the vision tower's through
  `load_vision_params`, the rest through `official_v41._official`) and every parameter of ours a release
  tensor, with the shapes equal after the layout change: [out, in] -> [in, out], routed experts stacked
  and their MXFP4 bytes two inputs each, `wo_a` grouped, Engram tables padded to `engram_table_rows`.
* Every scale has its role's block: FP8 32 x 32, MXFP4 experts 1 x 32 along the inputs, Engram rows 1 x 32.
* The parameter counts of both sides agree, in total and per role (`benchmarks.v41.param_counts`).
* The release writer (`release_format_v41`) stores every tensor in the release's dtype."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flax import nnx
from jax._src.interpreters import partial_eval as pe

from benchmarks import v41 as v41_bench
from benchmarks.v41_inventory import load_inventory, release_param_counts, stored_bytes, subsystem
from v4jax.config import RunOptions
from v4jax.config_v41 import V41Config
from v4jax.io.official_v41 import (ENGRAM_SCALE_BLOCK, FP4_BLOCK_V41, FP8_BLOCK_V41, _is_consumed_scale, _official,
                                   layer_paths, official_names_v41)
from v4jax.model.v41 import V41Transformer, engram_table_rows, layer_plan
from v4jax.model.vision import load_vision_params

QUANTISED = ("F8_E4M3", "I8")  # stored with a `.scale` beside them


@pytest.fixture(scope="module")
def release():
    return load_inventory()


@pytest.fixture(scope="module")
def flash():
    """(config, abstract model with bf16 parameters, {path: variable})."""
    cfg = V41Config.preset("v41-flash")
    with pytest.MonkeyPatch.context() as mp:
        # Speed only: each rng draw under eval_shape sets nnx's key counter, whose `getattr(value, "sharding",
        # None)` makes the tracer build an error text walking the whole jaxpr so far (quadratic: ~15-40 s
        # for this model, 2 s without). The text is never shown: it is the message of a caught AttributeError.
        mp.setattr(pe.DynamicJaxprTracer, "_origin_msg", lambda self: "", raising=False)
        model = nnx.eval_shape(lambda: V41Transformer(cfg, rngs=nnx.Rngs(0), options=RunOptions(
            dtype="bfloat16", param_dtype="bfloat16")))
    return cfg, model, dict(nnx.to_flat_state(nnx.state(model)))


def test_inventory_reproduces_the_published_totals(release):
    doc, inv = release
    totals = doc["totals"]
    assert len(inv) == totals["tensors"] == 96085
    assert sum(stored_bytes(doc, *v) for v in inv.values()) == totals["tensor_bytes"]
    per = {}
    for name, v in inv.items():
        n, b = per.get(subsystem(name), (0, 0))
        per[subsystem(name)] = (n + 1, b + stored_bytes(doc, *v))
    assert per == {k: tuple(v) for k, v in doc["subsystems"]["counts"].items()}
    assert sum(n.startswith("mtp.") for n in inv) == doc["namespace_counts"]["mtp"]
    params = sum(math.prod(s) * (2 if dt == "I8" else 1) for n, (s, dt) in inv.items() if not n.endswith(".scale"))
    assert params == totals["declared_parameters"]
    for entry in doc["tensors"]:
        assert entry["status"] in ("observed", "observed-shape", "derived") and entry["source"], entry
        assert all(s in doc["sources"] for s in entry["source"]), entry


def test_config_matches_the_release(release):
    doc, _ = release
    cfg = V41Config.preset("v41-flash")
    ours = cfg.to_inference_dict()
    assert {k: ours[k] for k in doc["config"]["values"]} == doc["config"]["values"]
    assert doc["quantization_config"]["weight_block_size"] == [FP8_BLOCK_V41, FP8_BLOCK_V41]


def test_scales_have_their_roles_block(release):
    """Every quantised tensor has a `.scale` of its role's block (the one `dequantize_tensor_v41` asserts),
    every scale is UE8M0, only the Engram tables' scales survive the read (`_is_consumed_scale`)."""
    _, inv = release
    names = set(inv)
    for name, (shape, dtype) in inv.items():
        scale = name[:-len(".weight")] + ".scale" if name.endswith(".weight") else None
        assert (dtype in QUANTISED) == (scale in names), name
        if not name.endswith(".scale"):
            continue
        weight = name[:-len(".scale")] + ".weight"
        (rows, cols), wdtype = inv[weight]
        if name.endswith("engram.embed.scale"):
            want, wd = (rows, -(-cols // ENGRAM_SCALE_BLOCK)), "F8_E4M3"
            assert not _is_consumed_scale(name, names), name
        elif ".ffn.experts." in name:
            want, wd = (rows, 2 * cols // FP4_BLOCK_V41), "I8"  # two E2M1 codes per byte, a scale per 32 inputs
            assert _is_consumed_scale(name, names), name
        else:
            want, wd = (-(-rows // FP8_BLOCK_V41), -(-cols // FP8_BLOCK_V41)), "F8_E4M3"
            assert _is_consumed_scale(name, names), name
        assert (shape, dtype, wdtype) == (want, "F8_E8M0", wd), name


def _our_shape(path: tuple, release_shape: tuple[int, ...], cfg) -> tuple[int, ...]:
    """The shape a parameter of ours has when loaded from a release tensor (the layout rules of
    `official_v41._official`, release shapes as stored)."""
    rest = ".".join(map(str, path[2:])) if path[0] in ("layers", "dspark") else ""
    if rest in ("ffn.experts.w1", "ffn.experts.w2", "ffn.experts.w3"):
        out, packed = release_shape  # I8: two E2M1 inputs per byte
        return (cfg.n_routed_experts if path[0] == "layers" else cfg.dspark_n_routed_experts, 2 * packed, out)
    if rest == "attn.wo_a":
        return (cfg.o_groups, release_shape[1], release_shape[0] // cfg.o_groups)
    if rest == "engram.table":
        return (engram_table_rows(release_shape[0]), release_shape[1])
    if str(path[-1]) == "kernel":
        return tuple(reversed(release_shape))
    return release_shape


def test_the_release_writer_stores_each_tensor_as_the_release_does(release):
    """`release_format_v41` (what `convert --format official` writes) gives every one of the release's 96,085
    tensors its stored dtype; each `.scale` belongs to an FP8 or MXFP4 weight."""
    from v4jax.io.official import Format
    from v4jax.io.official_v41 import release_format_v41

    stored = {Format.FP8: "F8_E4M3", Format.FP4: "I8", Format.BF16: "BF16", Format.FP32: "F32"}
    _, inv = release
    for name, (_, dtype) in inv.items():
        if dtype == "F8_E8M0":
            assert release_format_v41(name[:-len("scale")] + "weight") in (Format.FP8, Format.FP4), name
        else:
            assert stored[release_format_v41(name)] == dtype, name


def test_every_parameter_has_its_release_tensor(release, flash):
    _, inv = release
    cfg, _, flat = flash
    plan, problems = layer_plan(cfg), []
    for stacked_path, var in flat.items():
        if stacked_path[0] in ("vision", "aligner"):
            continue  # load_vision_params: test_vision_tower_loads_the_release_tensors
        paths, lead = layer_paths(stacked_path, plan)  # a stacked parameter: each layer's, stack axes dropped
        for path in paths:
            problems += _release_problems(path, tuple(var.shape)[len(lead):], var.dtype, inv, cfg)
    assert not problems, "\n".join(problems)


def _release_problems(path: tuple, our_shape: tuple[int, ...], our_dtype, inv, cfg) -> list[str]:
    key, _ = _official(path, cfg, inv)
    if key not in inv:
        return [f"{'.'.join(map(str, path))}: no release tensor {key}"]
    shape, dtype = inv[key]
    want, problems = _our_shape(path, shape, cfg), []
    if our_shape != want:
        problems.append(f"{'.'.join(map(str, path))} {our_shape}: release {key} {dtype} {list(shape)} gives {want}")
    if dtype == "F32" and our_dtype != np.float32:  # the release keeps these in fp32: so must we
        problems.append(f"{'.'.join(map(str, path))} is {our_dtype}, release {key} is F32")
    if ".ffn.experts.0." in key:  # the other experts: present, one shape, no extra one
        base, w = key.split(".ffn.experts.0.")
        n = want[0]
        odd = [e for e in range(n) if inv.get(f"{base}.ffn.experts.{e}.{w}") != (shape, dtype)]
        if odd or f"{base}.ffn.experts.{n}.{w}" in inv:
            problems.append(f"{base} experts {w}: {len(odd)} of {n} differ, or an expert past {n - 1}")
    return problems


class _Recording(dict):
    """The tensors `load_vision_params` reads."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = set()

    def __getitem__(self, name):
        self.read.add(name)
        return super().__getitem__(name)


def _vision_reads(model, inv) -> set[str]:
    """Run `load_vision_params` on the abstract tower with stand-ins of the release's shapes (zero-stride
    views, no memory) minus `vision.norm.weight`: it checks every tensor's shape and, one being absent,
    raises before writing anything. Returns the names it read; asserts the absent one is its only complaint."""
    held = "vision.norm.weight"
    stand_ins = _Recording({n: np.broadcast_to(np.zeros((), np.float32), s) for n, (s, _) in inv.items()
                            if n.startswith(("vision.", "aligner.")) and n != held})
    with pytest.raises(ValueError) as e:
        load_vision_params(model.vision, model.aligner, stand_ins)
    want = f"cannot load the vision weights: missing {held} (expected shape {tuple(model.vision.norm.weight.shape)})"
    assert str(e.value) == want
    assert tuple(model.vision.norm.weight.shape) == inv[held][0]
    return stand_ins.read | {held}


def test_vision_tower_loads_the_release_tensors(release, flash):
    _, inv = release
    _, model, _ = flash
    reads = _vision_reads(model, inv)
    assert reads == {n for n in inv if n.startswith(("vision.", "aligner."))}


def test_every_release_tensor_has_a_parameter(release, flash):
    """No release tensor is left over: each is read by a parameter, or is the block scale of one."""
    _, inv = release
    _, model, _ = flash
    used = official_names_v41(model) | _vision_reads(model, inv)
    used |= {n for n in inv if n.endswith(".scale") and n[:-len(".scale")] + ".weight" in used}
    assert sorted(set(inv) - used) == []
    assert sorted(used - set(inv)) == []


def test_parameter_counts_agree(release, flash):
    """`benchmarks.v41.param_counts` over our abstract model (handed in, not built a second time) against
    the release's elements (MXFP4 two per byte, scales not counted), total and per role."""
    _, inv = release
    cfg, model, _ = flash
    ours, rel = v41_bench.param_counts(cfg, model), release_param_counts(inv, cfg)
    assert ours == pytest.approx(rel, rel=0, abs=1e-3)
    assert rel["total"] == 763_205_315_794  # the release's declared parameters (fixture: totals)
    assert int(round(rel["active"])) == 16_792_530_032  # per text token: 8.29e9 always-on + 6 of 384 experts + 48 Engram rows
