"""DeepSeek-V4.1 checkpoints through `load_model` and `python -m v4jax.io.convert` (issue 20, architecture.md
§12.6): the golden fixture directory as it is (official names, fp32; either config.json spelling), the same
weights in the release's storage (FP8 32 x 32, MXFP4 experts, Engram FP8 rows; written as safetensors
files), its Orbax conversion, and a sharded load on an 8-device mesh all give the official code's logits
(or, for the rounded release, exactly the logits of the same rounded values)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v41_fixtures import (FIXTURES, INVENTORY, engram_ids, load, needs_fixtures, quantised_release, release_dtype,
                          release_dtypes)

pytestmark = needs_fixtures


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def _logits(model):
    tokens = load("input_ids.npy")
    out = nnx.jit(lambda m, t, e: m(t, e))(model, jnp.asarray(tokens, jnp.int32), engram_ids(model.cfg, tokens))
    return np.asarray(out.logits)


def _directory(tmp_path, name, tensors=None, config="config.json"):
    """A checkpoint directory: the fixture's weights (or `tensors`) + one of its config spellings."""
    d = tmp_path / name
    d.mkdir()
    shutil.copyfile(os.path.join(FIXTURES, config), d / "config.json")
    if tensors is None:
        os.symlink(os.path.join(FIXTURES, "model.safetensors"), d / "model.safetensors")
    else:
        from safetensors.numpy import save_file
        half = sorted(tensors)[: len(tensors) // 2]  # two shards + an index, as the release is laid out
        shards = {"model-00001-of-00002.safetensors": {k: tensors[k] for k in half},
                  "model-00002-of-00002.safetensors": {k: v for k, v in tensors.items() if k not in half}}
        for fname, part in shards.items():
            save_file(part, str(d / fname))
        index = {"metadata": {}, "weight_map": {k: f for f, part in shards.items() for k in part}}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return str(d)


@pytest.mark.parametrize("config", ["config.json", "config_hf.json"])
def test_the_fixture_directory_loads_with_either_config_spelling(tmp_path, config):
    from v4jax.config_v41 import V41Config
    from v4jax.io.restore import load_model

    loaded = load_model(_directory(tmp_path, "ck", config=config), dtype="float32")
    assert isinstance(loaded.cfg, V41Config) and loaded.cfg.n_mtp_layers == 2  # the DSpark stages kept
    assert _rel(_logits(loaded.model), load("logits.npy")) <= 1e-5
    assert load_model(_directory(tmp_path, "no_dspark", config=config), mtp=False).cfg.n_mtp_layers == 0


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The fixture's weights in the release's quantised storage, on disk, and the values it rounds to."""
    from safetensors.numpy import load_file

    from v4jax.io.official_v41 import dequantize_release_v41

    q = quantised_release(load_file(os.path.join(FIXTURES, "model.safetensors")))
    return _directory(tmp_path_factory.mktemp("release"), "release", q), dequantize_release_v41(q)


def test_the_release_storage_loads_through_load_model(tmp_path, release):
    from v4jax.config_v41 import V41Config
    from v4jax.io.official_v41 import load_official_v41
    from v4jax.io.restore import load_model
    from v4jax.model.v41 import V41Transformer
    from v4jax.config import RunOptions

    path, rounded = release
    got = _logits(load_model(path, dtype="float32", param_dtype="float32").model)
    cfg = V41Config.from_json_file(os.path.join(path, "config.json"))
    want = V41Transformer(cfg, rngs=nnx.Rngs(0), options=RunOptions(dtype="float32", param_dtype="float32"))
    load_official_v41(want, rounded)
    np.testing.assert_array_equal(got, _logits(want))
    assert _rel(got, load("logits.npy")) > 1e-3  # the rounding is really there


@pytest.mark.slow
def test_the_release_converts_to_orbax_and_loads_back(tmp_path, release):
    from v4jax.io.convert import convert
    from v4jax.io.restore import load_model

    path, _ = release
    out = str(tmp_path / "orbax")
    m = convert(path, out, dtype="fp32", progress=False)
    assert m["complete"]
    stored = {t["name"]: t for t in m["tensors"]}
    assert not any(n.endswith(".scale") and "engram" not in n for n in stored)  # block scales folded in
    assert stored["layers.1.ffn.experts.0.w1.weight"]["shape"][1] == 64  # FP4: two codes per byte unpacked
    again = load_model(out, dtype="float32", param_dtype="float32")
    direct = load_model(path, dtype="float32", param_dtype="float32")
    np.testing.assert_array_equal(_logits(again.model), _logits(direct.model))


def test_a_release_missing_a_tensor_is_refused_naming_it(tmp_path, release):
    from safetensors.numpy import load_file

    from v4jax.io.checkpoint import CheckpointError
    from v4jax.io.convert import ConvertError, convert
    from v4jax.io.restore import load_model

    tensors = load_file(os.path.join(FIXTURES, "model.safetensors"))
    del tensors["layers.3.attn.wo_b.weight"]
    bad = _directory(tmp_path, "bad", tensors)
    with pytest.raises(ConvertError, match="layers.3.attn.wo_b.weight"):
        convert(bad, str(tmp_path / "out"), progress=False)
    assert not os.path.exists(tmp_path / "out")
    with pytest.raises(CheckpointError, match="layers.3.attn.wo_b.weight"):
        load_model(bad)
    with pytest.raises(ConvertError, match="no transformers spelling"):
        convert(release[0], str(tmp_path / "hf"), fmt="hf", progress=False)
    assert not os.path.exists(tmp_path / "hf")


def _stored(directory):
    """{name: array as stored} of a safetensors directory."""
    from v4jax.io.official import read_stored
    from v4jax.io.tensorfile import open_directory

    files = open_directory(directory)
    return {k: read_stored(f, k) for k, f in files.items()}


def _engram_table(tensors, name):
    """An Engram table's values: its FP8 (or float) rows times their scales per 32 columns."""
    from v4jax.io.official_v41 import engram_scale_values

    w, s = tensors[name], tensors[name[:-len("weight")] + "scale"]
    return np.asarray(w, np.float32) * np.repeat(engram_scale_values(s), 32, axis=1)


def test_the_unquantised_fixture_exports_to_the_release_layout_role_by_role(tmp_path, release):
    """`convert --format official` of the fixture's unquantised directory writes every tensor in the dtype
    the released checkpoint's inventory stores its role in, the same bytes the test's own quantisation gives
    (the Engram tables: the same values, their scales canonical), the release's quantization_config; it
    loads to exactly the logits of that rounding and converts again to the same bytes, directly or
    through Orbax."""
    from v4jax.io.convert import convert
    from v4jax.io.restore import load_model

    out = str(tmp_path / "release")
    convert(_directory(tmp_path, "plain"), out, fmt="official", progress=False)
    got, want, table = _stored(out), _stored(release[0]), release_dtypes()
    assert set(got) == set(want)
    names = {"float8_e4m3fn": "F8_E4M3", "float8_e8m0fnu": "F8_E8M0", "int8": "I8", "bfloat16": "BF16",
             "float32": "F32"}
    for name, a in got.items():
        assert names[a.dtype.name] == release_dtype(name, table), name
        assert a.shape == want[name].shape, name
        if "engram.embed" in name:
            continue
        assert a.tobytes() == want[name].tobytes(), name
    for name in (n for n in got if n.endswith("engram.embed.weight")):
        np.testing.assert_array_equal(_engram_table(got, name), _engram_table(want, name))
    with open(INVENTORY) as f:
        quantization = {k: v for k, v in json.load(f)["quantization_config"].items() if k != "source"}
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["quantization_config"] == quantization
    kw = dict(dtype="float32", param_dtype="float32")
    np.testing.assert_array_equal(_logits(load_model(out, **kw).model), _logits(load_model(release[0], **kw).model))
    convert(out, str(tmp_path / "again"), fmt="official", progress=False)
    convert(out, str(tmp_path / "orbax"), progress=False)
    convert(str(tmp_path / "orbax"), str(tmp_path / "via_orbax"), fmt="official", progress=False)
    for other in ("again", "via_orbax"):
        again = _stored(str(tmp_path / other))
        assert set(again) == set(got) and all(again[k].tobytes() == got[k].tobytes() for k in got), other


def test_the_model_gives_back_the_official_tensors_it_was_loaded_from():
    """`official_tensors_v41` inverts the loader: the fixture's model (DSpark stages, vision tower, stacked
    runs, padded Engram tables) gives the fixture's tensors back, every name and value."""
    from safetensors.numpy import load_file

    from v4jax.io.official_v41 import official_tensors_v41
    from v4jax.io.restore import load_model

    want = load_file(os.path.join(FIXTURES, "model.safetensors"))
    got = dict(official_tensors_v41(load_model(FIXTURES, dtype="float32", param_dtype="float32").model))
    assert set(got) == set(want)
    for name, a in want.items():
        assert got[name].shape == a.shape and np.array_equal(np.asarray(got[name], np.float32), a), name


def test_a_v41_train_run_exports_to_orbax_and_to_the_release_layout(tmp_path):
    """A train.py run of the V4.1 text backbone (the fixture's weights, trained layout: no DSpark, no vision)
    through `convert`: to Orbax it loads back to the run's exact logits, to the release layout to exactly
    the logits of its tensors rounded by the test's own release quantisation; the HF-style config.json
    written alongside describes the run's model."""
    import dataclasses

    from safetensors.numpy import save_file
    from test_safe_writes import write_train_run
    from v4jax.config import RunOptions
    from v4jax.config_v41 import V41Config
    from v4jax.io.convert import convert
    from v4jax.io.official_v41 import V41Source, assemble_v41, official_tensors_v41
    from v4jax.io.restore import load_model

    cfg = V41Config.from_json_file(os.path.join(FIXTURES, "config.json")).without_dspark().replace(vision_n_layers=0)
    model = assemble_v41(cfg, V41Source(FIXTURES, np.float32), options=RunOptions.for_weights("float32"))
    run = write_train_run(str(tmp_path / "run"), model, step=3, tokenizer=None)
    want = _logits(model)
    assert _rel(want, load("logits.npy")) <= 1e-5  # text-only input: the backbone alone gives the official logits

    convert(run, str(tmp_path / "orbax"), progress=False)
    back = load_model(str(tmp_path / "orbax"))
    shape = [f.name for f in dataclasses.fields(cfg) if not f.name.startswith("vision_")]
    assert back.options.param_dtype == "float32" and all(getattr(back.cfg, f) == getattr(cfg, f) for f in shape)
    np.testing.assert_array_equal(_logits(back.model), want)

    convert(run, str(tmp_path / "release"), fmt="official", progress=False)
    got = load_model(str(tmp_path / "release"), dtype="float32", param_dtype="float32")
    rounded = tmp_path / "rounded"
    rounded.mkdir()
    save_file(quantised_release({k: np.asarray(v, np.float32) for k, v in official_tensors_v41(model)}),
              str(rounded / "model.safetensors"))
    shutil.copyfile(tmp_path / "release" / "config.json", rounded / "config.json")
    np.testing.assert_array_equal(_logits(got.model), _logits(load_model(str(rounded), dtype="float32",
                                                                             param_dtype="float32").model))
    assert not any(n.startswith(("mtp.", "vision.")) for n in _stored(str(tmp_path / "release")))


@pytest.mark.parametrize("devices", [1, 8])
def test_an_engram_table_is_read_a_few_rows_at_a_time(tmp_path, monkeypatch, release, devices):
    """`load_model` never reads an Engram table whole (each released one is 98 GB in FP8): its rows come a
    block at a time (here 3 rows) from the file and go straight into the slices of the devices that hold
    them. The table equals the whole-tensor path's (the release's E4M3 rows times their scales, the
    padding rows zero), on one device and over 8 (fsdp x expert)."""
    from sharding.mesh import make_mesh
    from sharding.rules import get_rules
    from v4jax.io import official_v41
    from v4jax.io.restore import load_model

    if jax.device_count() < devices:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    path, rounded = release
    whole = official_v41.V41Source.read

    def read(self, names):
        assert not any("engram.embed" in n for n in names), "an Engram table read whole"
        return whole(self, names)

    monkeypatch.setattr(official_v41.V41Source, "read", read)
    cols = load_model(path, dtype="float32", param_dtype="float32").cfg.engram_head_dim
    monkeypatch.setattr(official_v41, "ROWS_BYTES", 3 * 4 * cols)
    mesh = make_mesh("fsdp=2,expert=4") if devices == 8 else None
    got = load_model(path, dtype="float32", param_dtype="float32", mesh=mesh,
                     rules=get_rules("fsdp_ep") if mesh is not None else None).model
    for layer in got.cfg.engram_layer_ids:
        table = got.block(layer).engram.table[...]
        if mesh is not None:
            assert len(table.sharding.device_set) == 8
        key = f"layers.{layer}.engram.embed."
        want = rounded[key + "weight"] * np.repeat(rounded[key + "scale"], 32, axis=1)
        np.testing.assert_array_equal(np.asarray(table)[:len(want)], want)
        assert not np.asarray(table)[len(want):].any() and table.shape[0] > len(want)  # the padding rows


def test_a_sharded_load_puts_each_variable_in_its_layout(tmp_path):
    """8 CPU devices (conftest): fsdp x expert; the logits equal the single-device load's."""
    from sharding.context import use_mesh_rules
    from sharding.mesh import make_mesh
    from sharding.rules import get_rules
    from v4jax.io.restore import load_model

    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    path = _directory(tmp_path, "ck")
    mesh, rules = make_mesh("fsdp=2,expert=4"), get_rules("fsdp_ep")
    loaded = load_model(path, mesh=mesh, rules=rules, dtype="float32")
    w1 = loaded.model.block(1).ffn.experts.w1[...]
    assert len(w1.sharding.device_set) == 8 and w1.addressable_shards[0].data.shape[0] == w1.shape[0] // 4
    with use_mesh_rules(mesh, rules):
        got = _logits(loaded.model)
    assert _rel(got, load("logits.npy")) <= 1e-5


@pytest.mark.parametrize("axes,preset", [("data=2,fsdp=2,expert=2", "fsdp_ep"),
                                         pytest.param("data=2,tensor=4", "serve_tp", marks=pytest.mark.slow)])
def test_sharded_generation_gives_the_official_tokens(tmp_path, monkeypatch, axes, preset):
    """The model loaded over data=2 x fsdp=2 x expert=2 (or every matrix over tensor=4, the experts whole:
    the decode-shaped expert path), the cache's two sequences split over the batch axes: plain and
    DSpark greedy decoding give the official code's tokens (the DSpark stages' 6 experts over expert=2).
    Every step is compiled with the mesh's XLA options (on TPU: the asynchronous expert exchange)."""
    from sharding.mesh import make_mesh
    from sharding.rules import get_rules
    from v4jax.inference import generate_v41 as module
    from v4jax.inference.generate_v41 import generate_v41
    from v4jax.io.restore import load_model

    asked = []
    monkeypatch.setattr(module, "compiler_options", lambda mesh: asked.append(mesh) or {})
    monkeypatch.setattr(module, "_JITTED", type(module._JITTED)())  # nothing compiled by an earlier test

    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    mesh, rules = make_mesh(axes), get_rules(preset)
    model = load_model(_directory(tmp_path, "ck"), mesh=mesh, rules=rules, dtype="float32").model
    want, token_map = load("generated_ids.npy"), load("engram_token_map.npy")
    for draft in (False, True):
        got = generate_v41(model, load("input_ids.npy"), want.shape[1], token_map, draft=draft, mesh=mesh, rules=rules)
        np.testing.assert_array_equal(got.tokens, want)
    assert len(asked) == 2 and all(m is mesh for m in asked)  # forward and drafter, jitted once for both calls


@pytest.mark.slow
def test_continuous_batching_over_a_mesh_gives_each_prompt_its_tokens(tmp_path):
    """`serve_v41` with the model and the slots' cache over data=2 x fsdp=2 x expert=2: three prompts of
    several lengths over two slots (one reused) get the tokens the unsharded model gives them."""
    from sharding.mesh import make_mesh
    from sharding.rules import get_rules
    from v4jax.inference.generate_v41 import serve_v41
    from v4jax.io.restore import load_model

    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    path, ids, token_map = _directory(tmp_path, "ck"), load("input_ids.npy"), load("engram_token_map.npy")
    prompts = [ids[0].tolist(), ids[1, :-5].tolist(), ids[0, :4].tolist()]
    want = dict(serve_v41(load_model(path, dtype="float32").model, prompts, 5, token_map, slots=2))
    mesh, rules = make_mesh("data=2,fsdp=2,expert=2"), get_rules("fsdp_ep")
    model = load_model(path, mesh=mesh, rules=rules, dtype="float32").model
    got = dict(serve_v41(model, prompts, 5, token_map, slots=2, mesh=mesh, rules=rules))
    assert got == want and sorted(got) == [0, 1, 2]
