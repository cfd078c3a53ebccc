"""Loading every checkpoint form into a model, whole or straight into sharded arrays (v4jax.io.restore)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sharding.mesh import make_mesh
from sharding.partition import spec_table
from sharding.rules import get_rules
from test_safe_writes import write_train_run
from v4jax.io import convert
from v4jax.io import official
from v4jax.io.checkpoint import CheckpointError, canonical_name, hf_tensors, save_hf
from v4jax.config import V4Config
from v4jax.model.transformer import Transformer
from v4jax.io.restore import assemble, load_hf, load_model, open_source
from v4jax.io.sources import ConvertedSource, Kind, TensorSource, detect

TOKENS = (jnp.arange(16)[None] * 7 + 3) % 256


def _logits(model):
    return np.asarray(model(TOKENS).logits, np.float32)


def _assert_same_variables(a, b):
    """Every variable of model a equals model b's (same paths, same values: the same function)."""
    fa, fb = nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b))
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (path, va), (_, vb) in zip(fa, fb):
        np.testing.assert_array_equal(np.asarray(va.get_value()), np.asarray(vb.get_value()), err_msg=str(path))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    save_hf(Transformer(V4Config.preset("tiny"), rngs=nnx.Rngs(3)), d)
    return d


@pytest.fixture(scope="module")
def reference(hf_dir):
    return load_hf(hf_dir)[0]


@pytest.fixture(scope="module")
def mesh():
    return make_mesh("fsdp=2,expert=4", devices=jax.devices()[:8])


def _assert_laid_out(model, mesh, rules):
    want = spec_table(nnx.state(model), mesh, rules)
    for path, var in nnx.to_flat_state(nnx.state(model)):
        name = ".".join(map(str, path))
        assert var.get_value().sharding.spec == want[name], name


def test_detect_names_each_form_and_refuses_others(hf_dir, tmp_path):
    assert detect(hf_dir) is Kind.SAFETENSORS
    with pytest.raises(CheckpointError, match="does not exist"):
        detect(tmp_path / "nope")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="not a checkpoint v4jax reads"):
        detect(tmp_path)


def test_hf_directory_loads_whole_and_sharded_to_the_same_variables(hf_dir, reference, mesh):
    _assert_same_variables(load_model(hf_dir).model, reference)
    rules = get_rules("fsdp_ep")
    sharded = load_model(hf_dir, mesh=mesh, rules=rules)
    _assert_laid_out(sharded.model, mesh, rules)
    _assert_same_variables(sharded.model, reference)


@pytest.fixture(scope="module")
def release_and_converted(tmp_path_factory):
    cfg = V4Config.preset("tiny")
    tensors = {canonical_name(k): v for k, v in hf_tensors(Transformer(cfg, rngs=nnx.Rngs(5))).items()}
    release = tmp_path_factory.mktemp("release")
    official.write_release(release, tensors.items(), max_shard_bytes=1 << 20, config=cfg.to_hf_dict(), overwrite=True)
    converted = tmp_path_factory.mktemp("conv") / "ckpt"
    convert.convert(release, converted, dtype="fp32", progress=False, batch_bytes=256 << 10)
    return release, converted


def test_official_release_and_its_conversion_load_to_the_same_sharded_model(release_and_converted, mesh):
    release, converted = release_and_converted
    assert detect(release) is Kind.SAFETENSORS and detect(converted) is Kind.CONVERTED
    rules = get_rules("fsdp_tp_ep")
    mesh = make_mesh("fsdp=2,expert=2,tensor=2", devices=jax.devices()[:8])
    a = load_model(release, mesh=mesh, rules=rules, dtype="float32", param_dtype="float32")
    b = load_model(converted, mesh=mesh, rules=rules, dtype="float32", param_dtype="float32")
    _assert_laid_out(b.model, mesh, rules)
    _assert_same_variables(a.model, b.model)
    _assert_same_variables(a.model, load_model(release, dtype="float32", param_dtype="float32").model)


@pytest.mark.slow
def test_sharded_converted_model_gives_the_logits_of_the_unsharded_release(release_and_converted):
    release, converted = release_and_converted
    mesh = make_mesh("fsdp=2,expert=2,tensor=2", devices=jax.devices()[:8])
    b = load_model(converted, mesh=mesh, rules=get_rules("fsdp_tp_ep"), dtype="float32", param_dtype="float32")
    whole = load_model(release, dtype="float32", param_dtype="float32")
    np.testing.assert_allclose(_logits(b.model), _logits(whole.model), rtol=1e-5, atol=1e-6)


class _CountingSource(TensorSource):
    """Wraps a source: records every read batch, to check each tensor is read once, in bounded batches."""

    def __init__(self, inner):
        self.inner, self.specs, self.reads = inner, inner.specs, []
        self.kind = inner.kind

    def read(self, names):
        self.reads.append(list(names))
        return self.inner.read(names)


def test_sharded_assembly_reads_each_tensor_once_in_bounded_batches(release_and_converted, mesh):
    _, converted = release_and_converted
    cfg = V4Config.from_json_file(os.path.join(converted, "config.json"))
    src = _CountingSource(ConvertedSource(str(converted)))
    limit = 64 << 10
    assemble(cfg, src, mesh=mesh, rules=get_rules("fsdp_ep"), read_batch_bytes=limit)
    names = [n for batch in src.reads for n in batch]
    assert sorted(names) == sorted(src.specs)  # every tensor read exactly once
    for batch in src.reads:
        size = sum(int(np.prod(src.specs[n][0])) * np.dtype(src.specs[n][1]).itemsize for n in batch)
        assert len(batch) == 1 or size <= limit


def _write_train_checkpoint(run, model, step=7):
    """A train.py run directory (config.json + checkpoints/<step>) with this model's parameters."""
    return write_train_run(run, model, step, tokenizer=None)


def test_one_detection_and_one_source_family_serve_every_form(release_and_converted, tmp_path):
    # load_model and the converter open checkpoints the same way: the same kinds, the same tensors
    release, converted = release_and_converted
    model = Transformer(V4Config.preset("tiny"), rngs=nnx.Rngs(5))  # the weights the release was written from
    _write_train_checkpoint(str(tmp_path / "run"), model)
    step_dir = tmp_path / "run" / "checkpoints" / "7"
    sources = {}
    for path, kind in ((release, Kind.SAFETENSORS), (converted, Kind.CONVERTED), (tmp_path / "run", Kind.TRAIN_RUN),
                       (step_dir, Kind.TRAIN_RUN)):
        src = open_source(path, np.float32)
        assert detect(path) is kind and src.kind is kind and isinstance(src, TensorSource), path
        sources[str(path)] = src
    names = list(sources[str(release)].specs)
    assert all(set(s.specs) == set(names) for s in sources.values())
    # the release (FP8/FP4, de-quantised) and its fp32 conversion hold the same values; the train run
    # holds the model's own weights
    rel, conv = (dict(sources[str(p)].tensors(names[:12])) for p in (release, converted))
    own = {canonical_name(k): v for k, v in hf_tensors(model).items()}
    for p in (tmp_path / "run", step_dir):
        run = dict(sources[str(p)].tensors(names[:12]))
        for n in names[:12]:
            np.testing.assert_array_equal(rel[n], conv[n], err_msg=n)
            np.testing.assert_array_equal(run[n], own[n].astype(run[n].dtype), err_msg=n)
    assert sources[str(step_dir)].step == 7 and sources[str(step_dir)].config["num_hidden_layers"] == 4


def test_train_run_loads_whole_sharded_and_refuses_corruption(tmp_path, mesh):
    model = Transformer(V4Config.preset("tiny"), rngs=nnx.Rngs(9))
    run = tmp_path / "run"
    _write_train_checkpoint(str(run), model)
    got = load_model(run)
    assert got.kind is Kind.TRAIN_RUN and got.step == 7 and got.cfg.n_mtp_layers == 1
    _assert_same_variables(got.model, model)
    assert load_model(run / "checkpoints" / "7", mtp=False).model.mtp is None
    rules = get_rules("fsdp_ep")
    sharded = load_model(run, mesh=mesh, rules=rules)
    _assert_laid_out(sharded.model, mesh, rules)
    _assert_same_variables(sharded.model, model)
    with pytest.raises(CheckpointError, match="no complete checkpoint for step 3"):
        load_model(run, step=3)
    # a changed fingerprint (what a silently corrupted tensor looks like) is refused
    meta = run / "checkpoints" / "7" / "meta" / "metadata"
    d = json.loads(meta.read_text())
    d["fingerprint"]["embed.embedding"] *= 1.5
    meta.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="embed.embedding does not match its saved fingerprint"):
        load_model(run)


def test_bad_checkpoints_give_one_line_errors(hf_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    cfg["layer_types"] = cfg["layer_types"][:3]
    for k in ("mlp_layer_types", "router_types"):
        if k in cfg:
            cfg[k] = cfg[k][:3]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        load_model(bad)
    run = tmp_path / "run"
    os.makedirs(run / "checkpoints" / "5.orbax-checkpoint-tmp-1")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_model(run)


@pytest.mark.slow
def test_infer_reads_a_train_run_and_an_hf_export_of_the_same_model_alike(tmp_path, capsys):
    import infer

    model = Transformer(V4Config.preset("tiny"), rngs=nnx.Rngs(4))
    _write_train_checkpoint(str(tmp_path / "run"), model)
    save_hf(model, tmp_path / "hf")
    ids = tmp_path / "ids.txt"
    ids.write_text("5 6 7\n")
    outs = []
    for ckpt in ("run", "hf"):
        assert infer.main(["--checkpoint", str(tmp_path / ckpt), "--prompt-ids", str(ids), "--max-new-tokens", "5",
                           "--stop"]) == 0
        io = capsys.readouterr()
        outs.append(io.out)
        assert ("train_run" if ckpt == "run" else "safetensors") in io.err
    assert outs[0] == outs[1] and len(outs[0].split()) == 5
