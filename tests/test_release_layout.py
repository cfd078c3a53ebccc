"""DeepSeek's published V4 layout, as written by an independent torch writer (tests/release_fixture.py):
every reader (load_model, the converter, infer.py, parity dump) takes it and gives the weights and
logits of its de-quantised HF form; a renamed tensor, a wrong dtype, a missing shard or a wrong nibble
order is caught."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

pytest.importorskip("torch")

from release_fixture import write_release_fixture  # noqa: E402
from v4jax.config import V4Config  # noqa: E402
from v4jax.io.checkpoint import CheckpointError, canonical_name, hf_tensors, transformers_name  # noqa: E402
from v4jax.io.restore import load_model  # noqa: E402
from v4jax.model.transformer import Transformer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = (np.arange(24)[None] * 11 + 5) % 512


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(release dir, the tensors it holds de-quantised, an HF dir holding exactly those tensors)."""
    from safetensors.torch import save_file
    import torch

    cfg = V4Config.preset("tiny")  # with the MTP block, as the release has
    model = Transformer(cfg, rngs=nnx.Rngs(11))
    tensors = {canonical_name(k): v for k, v in hf_tensors(model).items()}
    d = tmp_path_factory.mktemp("release")
    truth = write_release_fixture(tensors, cfg.to_hf_dict(), str(d / "ckpt"))
    hf = d / "hf"  # the de-quantised tensors in save_pretrained spelling, float32
    hf.mkdir()
    save_file({transformers_name(n): torch.from_numpy(np.ascontiguousarray(a)) for n, a in truth.items()},
              str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json.dumps(cfg.to_hf_dict("float32")))
    return d / "ckpt", truth, hf


def _tensors(model) -> dict[str, np.ndarray]:
    return {canonical_name(k): np.asarray(v, np.float32) if v.dtype.kind == "f" else v
            for k, v in hf_tensors(model).items()}


def _logits(model) -> np.ndarray:
    return np.asarray(model(IDS).logits, np.float32)


def test_the_fixture_has_the_release_names_dtypes_and_shards(release):
    ckpt, _, _ = release
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) == 3
    from v4jax.io.tensorfile import open_directory
    found = open_directory(ckpt)
    assert "layers.0.attn.kv_norm.weight" in found and "layers.0.attn.norm.weight" not in found
    assert str(found["layers.0.attn.wq_a.weight"].dtype("layers.0.attn.wq_a.weight")) == "float8_e4m3fn"
    assert found["layers.0.attn.wq_a.scale"].dtype("layers.0.attn.wq_a.scale").name == "float8_e8m0fnu"
    w1 = "layers.0.ffn.experts.3.w1.weight"
    assert found[w1].dtype(w1) == np.int8 and found[w1].shape(w1)[1] * 2 == 128  # d = 128, two codes a byte
    assert "mtp.0.attn.kv_norm.weight" in found


@pytest.mark.slow
def test_the_release_loads_to_exactly_the_tensors_it_holds_and_to_the_logits_of_its_hf_form(release):
    ckpt, truth, hf = release
    got = load_model(ckpt, dtype="float32", param_dtype="float32")
    assert got.cfg.n_mtp_layers == 1
    have = _tensors(got.model)
    assert set(have) == set(truth)
    for name, want in truth.items():
        np.testing.assert_array_equal(have[name], want, err_msg=name)
    via_hf = load_model(hf, dtype="float32", param_dtype="float32", mtp=False)
    a, b = _logits(got.model), _logits(via_hf.model)
    assert float(np.abs(a - b).max() / np.abs(b).max()) <= 1e-5


def test_a_writer_with_the_nibble_order_swapped_is_caught(release, tmp_path):
    _, truth, _ = release
    cfg = V4Config.preset("tiny")
    tensors = {canonical_name(k): v for k, v in hf_tensors(Transformer(cfg, rngs=nnx.Rngs(11))).items()}
    swapped_truth = write_release_fixture(tensors, cfg.to_hf_dict(), str(tmp_path / "x"), swap_nibbles=True)
    have = _tensors(load_model(tmp_path / "x", dtype="float32", param_dtype="float32").model)
    w1 = "layers.0.ffn.experts.3.w1.weight"
    np.testing.assert_array_equal(swapped_truth[w1], truth[w1])  # the intended values are the same
    assert not np.array_equal(have[w1], truth[w1])  # so a reader reading the swapped bytes differs: caught
    np.testing.assert_array_equal(have[w1].reshape(-1, 2)[:, ::-1].reshape(have[w1].shape), truth[w1])


def _copy(release, tmp_path):
    ckpt, _, _ = release
    out = tmp_path / "ckpt"
    shutil.copytree(ckpt, out)
    return out


def _rewrite(path, fn):
    """Apply fn to one shard's tensors (a dict of torch tensors) and write it back."""
    from safetensors.torch import load_file, save_file
    t = load_file(str(path))
    fn(t)
    save_file(t, str(path))


def _shard_of(ckpt, name):
    return ckpt / json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"][name]


def test_a_renamed_tensor_is_refused_naming_it(release, tmp_path):
    ckpt = _copy(release, tmp_path)
    name = "layers.1.attn.kv_norm.weight"
    shard = _shard_of(ckpt, name)
    _rewrite(shard, lambda t: t.__setitem__("layers.1.attn.kvnorm.weight", t.pop(name)))
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"]["layers.1.attn.kvnorm.weight"] = index["weight_map"].pop(name)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"layers\.1\.attn\.kvnorm\.weight"):
        load_model(ckpt)


def test_a_wrong_dtype_is_refused_naming_the_tensor(release, tmp_path):
    import torch
    ckpt = _copy(release, tmp_path)
    name = "layers.0.attn.wkv.weight"  # FP8 with a scale: stored as float16 it is neither FP8 nor plain
    _rewrite(_shard_of(ckpt, name), lambda t: t.__setitem__(name, t[name].to(torch.float16)))
    with pytest.raises(CheckpointError, match=r"layers\.0\.attn\.wkv\.weight.*float16"):
        load_model(ckpt)


def test_a_missing_shard_is_refused_naming_it(release, tmp_path):
    ckpt = _copy(release, tmp_path)
    os.remove(ckpt / "model-00002-of-00003.safetensors")
    with pytest.raises(CheckpointError, match=r"model-00002-of-00003\.safetensors, which does not exist"):
        load_model(ckpt)


@pytest.mark.slow
def test_parity_dump_and_infer_read_the_release_as_its_hf_form(release, tmp_path):
    ckpt, _, hf = release
    ids = tmp_path / "ids.npy"
    np.save(ids, IDS.astype(np.int32))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for src, out in ((ckpt, "a"), (hf, "b")):
        r = subprocess.run([sys.executable, "-m", "v4jax.parity", "dump", "--checkpoint", str(src), "--input-ids",
                            str(ids), "--out", str(tmp_path / out)], capture_output=True, text=True, env=env, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-2000:]
    a, b = np.load(tmp_path / "a" / "logits.npy"), np.load(tmp_path / "b" / "logits.npy")
    assert float(np.abs(a - b).max() / np.abs(b).max()) <= 1e-5
    outs = []
    for src in (ckpt, hf):
        r = subprocess.run([sys.executable, "infer.py", "--checkpoint", str(src), "--prompt-ids", str(ids),
                            "--max-new-tokens", "4", "--dtype", "float32"], capture_output=True, text=True, env=env,
                           cwd=ROOT)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(r.stdout.strip().splitlines()[-1])
    assert outs[0] == outs[1]


@pytest.mark.slow
def test_release_numerics_through_parity_dump_and_infer(release, tmp_path):
    """Issue 17: `--numerics release` runs the release's own roundings on the released weights (bf16);
    its cached decode (FP8 / FP4 cache) reproduces its stateless logits, and they differ from exact mode."""
    ckpt, _, _ = release
    ids = tmp_path / "ids.npy"
    np.save(ids, IDS.astype(np.int32))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for numerics in ("release", "exact"):
        r = subprocess.run([sys.executable, "-m", "v4jax.parity", "dump", "--checkpoint", str(ckpt), "--input-ids",
                            str(ids), "--out", str(tmp_path / numerics), "--numerics", numerics, "--dtype", "bfloat16",
                            "--decode-from", "18"], capture_output=True, text=True, env=env, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-2000:]
    rel, exact = (np.load(tmp_path / n / "logits.npy") for n in ("release", "exact"))
    decoded = np.load(tmp_path / "release" / "decode_logits.npy")  # [B, 24 - 18 + 1, V]
    np.testing.assert_allclose(decoded[:, :1], rel[:, 17:18], rtol=0, atol=1e-6 * np.abs(rel).max())  # the prefill's
    # one-token steps: within 10% (an FP8 rounding flip on some hosts, docs/numerics.md; a wrong cache format is O(1))
    assert float(np.linalg.norm(decoded[:, 1:] - rel[:, 18:]) / np.linalg.norm(rel[:, 18:])) <= 0.1
    assert 1e-3 < float(np.linalg.norm(rel - exact) / np.linalg.norm(exact)) < 0.2
    r = subprocess.run([sys.executable, "infer.py", "--checkpoint", str(ckpt), "--prompt-ids", str(ids),
                        "--max-new-tokens", "3", "--numerics", "release"], capture_output=True, text=True, env=env,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "bfloat16 layout, release numerics" in r.stderr
