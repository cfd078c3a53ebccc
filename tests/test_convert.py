"""Official release layout (reader / writer) and the streaming converter, on a synthetic release
quantised by our own writer from a random tiny model."""

import filecmp
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from v4jax import V4Config, Transformer

from v4jax.io import convert

from v4jax.io import official

from v4jax.io import quant
from v4jax.io.checkpoint import canonical_name, hf_tensors, transformers_name
from v4jax.io.restore import load_hf
from v4jax.io.convert import ConvertError
from v4jax.io.official import Format, ReleaseError
from v4jax.io.tensorfile import TensorFile, write_tensors

SHARD = 1 << 20  # small shards so the tiny release spans several files


@pytest.fixture(scope="module")
def model_tensors():
    cfg = V4Config.preset("tiny")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    return cfg, {canonical_name(k): v for k, v in hf_tensors(model).items()}


@pytest.fixture(scope="module")
def release(model_tensors, tmp_path_factory):
    cfg, tensors = model_tensors
    d = tmp_path_factory.mktemp("release")
    official.write_release(d, tensors.items(), max_shard_bytes=SHARD, config=cfg.to_hf_dict(), overwrite=True)
    return d


@pytest.fixture(scope="module")
def orbax_ckpt(release, tmp_path_factory):
    d = tmp_path_factory.mktemp("orbax") / "ckpt"
    convert.convert(release, d, progress=False, batch_bytes=256 << 10)
    return d


def _files(d):
    return sorted(f for f in os.listdir(d) if f.endswith((".safetensors", ".json")) and f != "conversion.json")


# ---------------------------------------------------------------------------- the format table

def test_release_table_covers_every_model_tensor_with_the_spec_formats(model_tensors):
    _, tensors = model_tensors
    fmt = {n: official.release_format(n) for n in tensors}
    assert fmt["embed.weight"] is Format.BF16 and fmt["head.weight"] is Format.BF16
    assert fmt["layers.1.attn.wq_a.weight"] is Format.FP8 and fmt["layers.1.attn.wo_a.weight"] is Format.FP8
    assert fmt["layers.1.attn.indexer.wq_b.weight"] is Format.FP8
    assert fmt["layers.1.attn.indexer.weights_proj.weight"] is Format.BF16
    assert fmt["layers.1.attn.compressor.wkv.weight"] is Format.BF16
    assert fmt["layers.2.ffn.experts.7.w2.weight"] is Format.FP4
    assert fmt["layers.2.ffn.shared_experts.w2.weight"] is Format.FP8
    assert fmt["layers.0.ffn.gate.tid2eid"] is Format.INT and fmt["layers.2.ffn.gate.bias"] is Format.FP32
    assert fmt["layers.2.hc_attn_scale"] is Format.FP32 and fmt["hc_head_fn"] is Format.FP32
    assert fmt["layers.1.attn.compressor.ape"] is Format.FP32 and fmt["layers.1.attn.attn_sink"] is Format.FP32
    if "mtp.0.e_proj.weight" in fmt:
        assert fmt["mtp.0.e_proj.weight"] is Format.FP8 and fmt["mtp.0.hc_head_base"] is Format.FP32
    with pytest.raises(ReleaseError, match="not part of the DeepSeek-V4 release layout"):
        official.release_format("layers.0.attn.bogus.weight")
    assert official.scale_name("layers.0.attn.wq_a.weight") == "layers.0.attn.wq_a.scale"
    assert official.hf_name("layers.0.attn.wq_a.weight") == "model.layers.0.attn.wq_a.weight"
    assert official.official_name("model.embed_tokens.weight") == "embed.weight"


def test_written_release_has_scales_dtypes_and_index_of_the_official_layout(release, model_tensors):
    _, tensors = model_tensors
    index = json.load(open(release / "model.safetensors.index.json"))["weight_map"]
    assert len(set(index.values())) > 1
    tf = {f: TensorFile(release / f) for f in set(index.values())}
    get = lambda k: tf[index[k]][k]  # noqa: E731
    assert get("layers.1.attn.wq_b.weight").dtype == ml_dtypes.float8_e4m3fn
    assert get("layers.1.attn.wq_b.scale").dtype == ml_dtypes.float8_e8m0fnu
    e = get("layers.3.ffn.experts.5.w1.weight")
    assert e.dtype == np.int8 and e.shape == (tensors["layers.3.ffn.experts.5.w1.weight"].shape[0],
                                              tensors["layers.3.ffn.experts.5.w1.weight"].shape[1] // 2)
    assert get("embed.weight").dtype == ml_dtypes.bfloat16 and get("hc_head_fn").dtype == np.float32
    for k in index:  # a weight and its scales share a shard
        if k.endswith(".scale"):
            assert index[k] == index[k[:-6] + ".weight"]
    cfg = json.load(open(release / "config.json"))
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128] and cfg["expert_dtype"] == "fp4"


def test_reader_yields_dequantised_values_of_the_written_tensors(release, model_tensors):
    _, tensors = model_tensors
    out = dict(official.read_release(release, np.float32))
    assert set(out) == set(tensors)
    for n, a in tensors.items():
        f = official.release_format(n)
        if f in (Format.FP32, Format.INT):
            np.testing.assert_array_equal(out[n], a)
            assert out[n].dtype == a.dtype
        elif f is Format.BF16:
            np.testing.assert_array_equal(out[n], a.astype(ml_dtypes.bfloat16).astype(np.float32))
        else:
            q, s = quant.quant_fp8_block(a) if f is Format.FP8 else quant.quant_fp4(a)
            deq = (quant.dequant_fp8_block if f is Format.FP8 else quant.dequant_fp4)(q, s, out_dtype=np.float32)
            np.testing.assert_array_equal(out[n], deq)
            assert np.abs(out[n] - a).max() <= np.abs(a).max() / (16 if f is Format.FP8 else 2)


def test_release_scales_are_canonical_so_requantising_reproduces_them(release):
    entries = official.scan_release(release)
    assert sum(e.stored in (Format.FP8, Format.FP4) for e in entries) > 100
    assert all(official.requant_mismatches(e) == 0 for e in entries)


def test_every_fp4_expert_of_the_release_converts_to_fp8_losslessly(release):
    n = 0
    for e in official.scan_release(release):
        if e.stored is Format.FP4:
            q8, s8 = quant.fp4_to_fp8(e.file[e.key], e.scale_file[e.scale_key])
            np.testing.assert_array_equal(quant.dequant_fp8_block(q8, s8, out_dtype=np.float32),
                                          official.read_tensor(e, np.float32))
            n += 1
    assert n == 4 * 8 * 3 + (8 * 3 if any(e.name.startswith("mtp.") for e in official.scan_release(release)) else 0)


# ---------------------------------------------------------------------------- round trips

def test_official_to_orbax_to_official_is_byte_identical(release, orbax_ckpt, tmp_path):
    m = json.load(open(orbax_ckpt / "manifest.json"))
    assert m["complete"] and m["dtype"] == "bfloat16"
    out = tmp_path / "official"
    convert.convert(orbax_ckpt, out, fmt="official", max_shard_bytes=SHARD, progress=False)
    assert _files(out) == _files(release)
    for f in _files(release):
        if f != "config.json":
            assert filecmp.cmp(release / f, out / f, shallow=False), f
    assert json.load(open(out / "conversion.json"))["complete"]


def test_orbax_holds_dequantised_values_keyed_by_canonical_name(release, orbax_ckpt):
    got = convert.load_converted(orbax_ckpt)
    want = dict(official.read_release(release, ml_dtypes.bfloat16))
    assert list(got) == list(want) or set(got) == set(want)
    for n, a in want.items():
        assert got[n].dtype == a.dtype, n
        np.testing.assert_array_equal(got[n], a)
    assert got["hc_head_fn"].dtype == np.float32 and got["layers.0.ffn.gate.tid2eid"].dtype == np.int64


def test_orbax_to_hf_loads_into_the_model_with_the_dequantised_weights(orbax_ckpt, model_tensors, tmp_path):
    cfg, _ = model_tensors
    out = tmp_path / "hf"
    convert.convert(orbax_ckpt, out, fmt="hf", progress=False)
    keys = set(json.load(open(out / "model.safetensors.index.json"))["weight_map"])
    assert "model.layers.1.attn.wq_a.weight" in keys and not any(k.endswith(".scale") for k in keys)
    assert "quantization_config" not in json.load(open(out / "config.json"))
    model, info = load_hf(out, dtype="float32", param_dtype="float32")
    loaded = {canonical_name(k): v for k, v in hf_tensors(model, info).items()}
    ref = convert.load_converted(orbax_ckpt)
    for n in ("layers.1.attn.wq_a.weight", "layers.2.ffn.experts.3.w2.weight", "embed.weight", "hc_head_fn"):
        np.testing.assert_array_equal(np.asarray(loaded[n], np.float32), np.asarray(ref[n], np.float32))


def test_load_converted_checks_names_against_config_and_restores_into_shardings(orbax_ckpt, model_tensors):
    cfg, _ = model_tensors
    devices = np.array(jax.devices()[:8] if len(jax.devices()) >= 8 else jax.devices()[:1])
    mesh = jax.sharding.Mesh(devices.reshape(-1), ("x",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    pick = lambda name, shape, dt: rows if name == "embed.weight" else rep  # noqa: E731
    out = convert.load_converted(orbax_ckpt, cfg, mesh=mesh, shardings=pick)
    emb = out["embed.weight"]
    assert isinstance(emb, jax.Array) and emb.sharding == rows
    assert len(emb.addressable_shards) == devices.size
    assert emb.addressable_shards[0].data.shape == (512 // devices.size, 128)
    host = convert.load_converted(orbax_ckpt)
    np.testing.assert_array_equal(np.asarray(emb), host["embed.weight"])
    assert out["norm.weight"].sharding == rep
    with pytest.raises(ConvertError, match="missing tensor 'layers.4"):
        convert.load_converted(orbax_ckpt, cfg.replace(n_layers=5, layer_types=cfg.layer_types + cfg.layer_types[-1:],
                                                       router_types=cfg.router_types + cfg.router_types[-1:]))


# ---------------------------------------------------------------------------- interruption and bad input

class _Stop(Exception):
    pass


def test_interrupted_conversion_resumes_and_matches_an_uninterrupted_one(release, orbax_ckpt, tmp_path):
    dst = tmp_path / "resumed"

    def stop(n):
        if n == 3:
            raise _Stop

    with pytest.raises(_Stop):
        convert.convert(release, dst, progress=False, batch_bytes=256 << 10, after_batch=stop)
    assert not dst.exists()  # the partial output lives next to the target, never under its name
    m = json.load(open(f"{dst}.partial/manifest.json"))
    saved = sum(t["crc32"] is not None for t in m["tensors"])
    assert not m["complete"] and 0 < saved < len(m["tensors"])
    with pytest.raises(ConvertError, match="not complete"):
        convert.load_converted(f"{dst}.partial")
    seen = []
    convert.convert(release, dst, progress=False, batch_bytes=256 << 10, after_batch=seen.append)
    assert json.load(open(dst / "manifest.json"))["complete"]
    assert 0 < len(seen) < len(m["tensors"])  # only the remaining batches were written
    a, b = convert.load_converted(dst), convert.load_converted(orbax_ckpt)
    assert set(a) == set(b)
    for n in a:
        np.testing.assert_array_equal(a[n], b[n])


def test_crash_between_a_save_and_its_manifest_update_is_recognised_on_resume(release, orbax_ckpt, tmp_path,
                                                                               monkeypatch):
    dst, calls = tmp_path / "gap", [0]
    real = convert.checksum

    def checksum_then_crash(a):  # runs after the batch is saved, before the manifest records it
        calls[0] += 1
        if calls[0] == 5:
            raise _Stop
        return real(a)

    monkeypatch.setattr(convert, "checksum", checksum_then_crash)
    with pytest.raises(_Stop):
        convert.convert(release, dst, progress=False, batch_bytes=256 << 10)
    monkeypatch.setattr(convert, "checksum", real)
    convert.convert(release, dst, progress=False, batch_bytes=64 << 10)  # the first run's batch size is kept
    a, b = convert.load_converted(dst), convert.load_converted(orbax_ckpt)
    assert set(a) == set(b) and all(np.array_equal(a[n], b[n]) for n in a)


def test_crash_after_finalize_resumes_with_the_verification_pass(release, orbax_ckpt, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(orbax_ckpt, dst)
    m = json.load(open(dst / "manifest.json"))
    m["complete"] = m["finalized"] = False
    json.dump(m, open(dst / "manifest.json", "w"))
    convert.convert(release, dst, progress=False)
    assert json.load(open(dst / "manifest.json"))["complete"]
    with pytest.raises(ConvertError, match="conversion of a different source or dtype"):
        convert.convert(release, dst, dtype="fp32", progress=False)


def test_failed_verification_leaves_the_checkpoint_incomplete(release, tmp_path):
    dst = tmp_path / "v"
    convert.convert(release, dst, progress=False)
    m = json.load(open(dst / "manifest.json"))
    m["complete"] = False
    t = next(t for t in m["tensors"] if t["name"] == "layers.2.attn.wq_b.weight")
    t["crc32"] ^= 1
    json.dump(m, open(dst / "manifest.json", "w"))
    with pytest.raises(ConvertError, match="verification failed for tensor 'layers.2.attn.wq_b.weight'"):
        convert.convert(release, dst, progress=False)
    assert not json.load(open(dst / "manifest.json"))["complete"]


def _rewrite(release, dst, edit):
    """Copy the release into one safetensors file after `edit(dict)` (no index)."""
    tensors = {}
    for f in os.listdir(release):
        if f.endswith(".safetensors"):
            tf = TensorFile(release / f)
            tensors.update({k: np.array(tf[k]) for k in tf.keys()})
    edit(tensors)
    os.makedirs(dst)
    write_tensors(dst / "model.safetensors", tensors)
    return dst / "model.safetensors"


@pytest.mark.parametrize("case,match", [
    ("truncated", r"truncated: tensor '.*'"),
    ("missing_scale", r"'layers.3.ffn.experts.2.w2.weight' is quantised .* scale tensor 'layers.3.ffn.experts.2.w2.scale' is missing"),
    ("wrong_dtype", r"'layers.1.attn.wkv.weight' is stored as FP4 .* stores 'layers.1.attn.wkv.weight' as FP8"),
    ("scale_dtype", r"scale tensor 'layers.1.attn.wq_a.scale' has dtype float32, expected F8_E8M0"),
    ("scale_shape", r"scale tensor 'layers.2.ffn.experts.0.w1.scale' has shape"),
    ("orphan_scale", r"scale tensor 'layers.0.attn.bogus.scale' has no weight"),
    ("int_as_float", r"'layers.0.ffn.gate.tid2eid' has dtype float32, expected an integer"),
])
def test_corrupt_release_is_rejected_naming_the_tensor_and_nothing_is_marked_complete(release, tmp_path, case, match):
    src = tmp_path / "bad"
    edits = {
        "truncated": lambda t: None,
        "missing_scale": lambda t: t.pop("layers.3.ffn.experts.2.w2.scale"),
        "wrong_dtype": lambda t: t.update({"layers.1.attn.wkv.weight": t["layers.1.attn.wkv.weight"].view(np.int8)}),
        "scale_dtype": lambda t: t.update({"layers.1.attn.wq_a.scale": np.ones(t["layers.1.attn.wq_a.scale"].shape, np.float32)}),
        "scale_shape": lambda t: t.update({"layers.2.ffn.experts.0.w1.scale": t["layers.2.ffn.experts.0.w1.scale"][:, :1]}),
        "orphan_scale": lambda t: t.update({"layers.0.attn.bogus.scale": t["layers.0.attn.wq_a.scale"]}),
        "int_as_float": lambda t: t.update({"layers.0.ffn.gate.tid2eid": t["layers.0.ffn.gate.tid2eid"].astype(np.float32)}),
    }
    path = _rewrite(release, src, edits[case])
    if case == "truncated":
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(size - 1000)
    dst = tmp_path / "out"
    with pytest.raises(ConvertError, match=match):
        convert.convert(src, dst, progress=False)
    assert not os.path.exists(dst / "manifest.json") or not json.load(open(dst / "manifest.json"))["complete"]
    assert not os.path.exists(dst / "tensors")


def test_nan_codes_in_a_release_tensor_are_reported_by_name(release, tmp_path):
    def poison(t):
        w = t["layers.1.attn.wq_b.weight"].view(np.uint8).copy()
        w[0, 0] = 0x7F
        t["layers.1.attn.wq_b.weight"] = w.view(ml_dtypes.float8_e4m3fn)
    _rewrite(release, tmp_path / "nan", poison)
    with pytest.raises(ReleaseError, match="'layers.1.attn.wq_b.weight' holds 1 NaN codes"):
        dict(official.read_release(tmp_path / "nan"))
    dst = tmp_path / "out"
    with pytest.raises(ReleaseError):
        convert.convert(tmp_path / "nan", dst, progress=False)
    assert not dst.exists() and not json.load(open(f"{dst}.partial/manifest.json"))["complete"]


def test_transformers_spelling_reads_like_the_release(release, tmp_path):
    def respell(t):
        for k in list(t):
            t[transformers_name(canonical_name(k[:-6] + ".weight"))[:-7] + ".scale" if k.endswith(".scale")
              else transformers_name(k)] = t.pop(k)
    _rewrite(release, tmp_path / "hfspell", respell)
    a = dict(official.read_release(tmp_path / "hfspell", np.float32))
    b = dict(official.read_release(release, np.float32))
    assert set(a) == set(b)
    for n in b:
        np.testing.assert_array_equal(a[n], b[n])


def test_unquantised_hf_checkpoint_converts_to_orbax_and_to_a_quantised_release(model_tensors, tmp_path):
    cfg, tensors = model_tensors
    official.write_hf(tmp_path / "hf", tensors.items(), config=cfg.to_hf_dict())  # float32, `model.` spelling
    convert.convert(tmp_path / "hf", tmp_path / "o", progress=False)  # default: float32 stays float32
    got = convert.load_converted(tmp_path / "o", cfg)
    for n, a in tensors.items():
        assert got[n].dtype == a.dtype
        np.testing.assert_array_equal(got[n], a)
    convert.convert(tmp_path / "hf", tmp_path / "o16", dtype="bf16", progress=False)
    got = convert.load_converted(tmp_path / "o16", cfg)
    for n, a in tensors.items():
        keep = official.release_format(n) in (Format.FP32, Format.INT)
        np.testing.assert_array_equal(got[n], a if keep else a.astype(ml_dtypes.bfloat16))
    convert.convert(tmp_path / "o", tmp_path / "rel", fmt="official", progress=False)
    wq = next(e for e in official.scan_release(tmp_path / "rel") if e.name == "layers.1.attn.wq_a.weight")
    assert wq.stored is Format.FP8 and wq.scale_key == "layers.1.attn.wq_a.scale"


def test_cli_reports_throughput_and_peak_rss(release, tmp_path):
    r = subprocess.run([sys.executable, "-m", "v4jax.io.convert", "--from", str(release), "--to", str(tmp_path / "o"),
                        "--dtype", "fp32", "--no-progress"], capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "peak RSS" in r.stdout and "GB/s" in r.stdout
    assert convert.load_converted(tmp_path / "o")["layers.1.attn.wq_a.weight"].dtype == np.float32
    bad = subprocess.run([sys.executable, "-m", "v4jax.io.convert", "--from", str(tmp_path / "nope"), "--to",
                          str(tmp_path / "o2")], capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("error: source")


# ---------------------------------------------------------------------------- memory

_MEMORY_SCRIPT = textwrap.dedent("""
    import sys
    from v4jax.io import convert
    base = convert.peak_rss_bytes()  # after imports; VmHWM, which (unlike ru_maxrss) starts afresh at exec
    convert.convert(sys.argv[1], sys.argv[2], progress=False, batch_bytes=int(sys.argv[3]))
    print(convert.peak_rss_bytes() - base)
""")


@pytest.mark.slow
def test_conversion_peak_rss_stays_near_the_largest_tensor(tmp_path):
    rng = np.random.default_rng(0)
    n_layers, n_experts, d, inter = 4, 12, 2048, 1024  # 4*12*3 experts of 2M values + 4 x [8192, 2048]
    def tensors():
        for i in range(n_layers):
            yield f"layers.{i}.attn.wq_b.weight", rng.standard_normal((4 * d, d), np.float32) * 0.02
            for e in range(n_experts):
                for w, shape in (("w1", (inter, d)), ("w2", (d, inter)), ("w3", (inter, d))):
                    yield f"layers.{i}.ffn.experts.{e}.{w}.weight", rng.standard_normal(shape, np.float32) * 0.02
    src = tmp_path / "release"
    official.write_release(src, tensors(), max_shard_bytes=64 << 20)
    largest = 4 * d * d * 2  # bf16 output of the largest tensor: 32 MiB
    total = n_layers * (4 * d * d + n_experts * 3 * inter * d) * 2  # ~ 700 MiB of bf16
    r = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(src), str(tmp_path / "o"), str(largest)],
                       capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr[-2000:]
    growth = int(r.stdout.strip().splitlines()[-1])
    assert total > 12 * largest
    assert 0 < growth < 6 * largest, f"peak RSS grew by {growth / 2**20:.0f} MiB for a {largest / 2**20:.0f} MiB largest tensor"
