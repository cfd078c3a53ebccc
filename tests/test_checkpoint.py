"""HF-format checkpoints: exact round trips (single file, sharded, write-back of a loaded checkpoint),
interop with transformers' DeepseekV4ForCausalLM in both directions, MTP tensors, and rejection of
broken checkpoints with an error naming the tensor or problem."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from v4jax.io import checkpoint
from v4jax.io.checkpoint import CheckpointError
from v4jax.io.restore import load_hf
from v4jax.config import V4Config
from v4jax.model.transformer import Transformer
from v4jax.io.tensorfile import TensorFile, write_tensors

SEQ = 40  # > 4 * index_topk: the tiny CSA layers' indexer really selects; > hca_ratio 16


def _forward_impl(graphdef, state, ids):
    out = nnx.merge(graphdef, state)(ids)
    return out.logits, out.mtp_logits


_forward_jit = jax.jit(_forward_impl, static_argnums=0)


def forward(model, ids):
    """(logits, mtp_logits) as numpy; jitted, cached per model structure."""
    graphdef, state = nnx.split(model)
    logits, mtp_logits = _forward_jit(graphdef, state, jnp.asarray(ids))
    return np.asarray(logits), None if mtp_logits is None else np.asarray(mtp_logits)


def read_dir(directory) -> dict[str, dict[str, np.ndarray]]:
    """file name -> {tensor name -> array} for every .safetensors file in directory."""
    out = {}
    for f in sorted(os.listdir(directory)):
        if f.endswith(".safetensors"):
            tf = TensorFile(os.path.join(directory, f))
            out[f] = {k: np.array(tf[k]) for k in tf.keys()}
    return out


def assert_same_tensors(a: dict[str, np.ndarray], b: dict[str, np.ndarray]):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


def rewrite(path, edit):
    """Apply edit(tensors) to the tensors of one safetensors file and write it back."""
    tf = TensorFile(path)
    tensors = {k: np.array(tf[k]) for k in tf.keys()}
    del tf
    edit(tensors)
    write_tensors(path, tensors, {"format": "pt"})


# --------------------------------------------------------------------------------------------------
# Fixtures: one tiny model (with MTP), saved once; tests copy the directory before changing it.

@pytest.fixture(scope="module")
def cfg():
    return V4Config.preset("tiny")


@pytest.fixture(scope="module")
def model(cfg):
    return Transformer(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def ids(cfg):
    return np.random.default_rng(0).integers(0, cfg.vocab_size, (2, SEQ)).astype(np.int32)


@pytest.fixture(scope="module")
def outputs(model, ids):
    return forward(model, ids)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt") / "tiny"
    checkpoint.save_hf(model, directory)
    return directory


@pytest.fixture
def ckpt(saved, tmp_path):
    """A private copy of the saved checkpoint, free to break."""
    directory = tmp_path / "ckpt"
    shutil.copytree(saved, directory)
    return directory


# --------------------------------------------------------------------------------------------------
# Round trips

def test_save_writes_config_and_one_safetensors_file_in_transformers_spelling(saved, model):
    assert sorted(os.listdir(saved)) == ["config.json", "model.safetensors"]
    (names,) = [list(t) for t in read_dir(saved).values()]
    assert "model.embed_tokens.weight" in names and "head.weight" in names
    assert "model.hc_head.hc_fn" in names and "model.layers.0.ffn.gate.tid2eid" in names
    assert "model.layers.3.ffn.experts.7.w2.weight" in names and "mtp.0.e_proj.weight" in names
    assert len(names) == len(checkpoint.hf_rules(model))
    assert json.loads((saved / "config.json").read_text())["model_type"] == "deepseek_v4"


def test_saved_tensors_have_torch_layouts_and_int64_hash_table(saved, cfg):
    t = read_dir(saved)["model.safetensors"]
    d, V = cfg.dim, cfg.vocab_size
    assert t["model.embed_tokens.weight"].shape == (V, d)
    assert t["head.weight"].shape == (V, d)
    assert t["model.layers.1.attn.wq_a.weight"].shape == (cfg.q_lora_rank, d)
    assert t["model.layers.1.attn.wo_a.weight"].shape == (cfg.o_groups * cfg.o_lora_rank,
                                                          cfg.n_heads * cfg.head_dim // cfg.o_groups)
    assert t["model.layers.1.ffn.experts.0.w1.weight"].shape == (cfg.moe_inter_dim, d)
    assert t["model.layers.1.ffn.experts.0.w2.weight"].shape == (d, cfg.moe_inter_dim)
    assert t["model.layers.1.attn.compressor.ape"].shape == (cfg.csa_ratio, 2 * cfg.head_dim)
    assert t["model.layers.2.attn.compressor.ape"].shape == (cfg.hca_ratio, cfg.head_dim)
    assert t["model.layers.0.ffn.gate.tid2eid"].shape == (V, cfg.n_activated_experts)
    assert t["model.layers.0.ffn.gate.tid2eid"].dtype == np.int64
    assert t["model.layers.1.attn.norm.weight"].dtype == np.float32


def test_save_then_load_reproduces_every_tensor_name_dtype_and_value(model, saved):
    loaded, info = load_hf(saved)
    assert info.mtp_loaded
    assert_same_tensors(checkpoint.hf_tensors(model), checkpoint.hf_tensors(loaded))


def test_sharded_save_writes_several_shards_and_an_index_and_loads_exactly(model, tmp_path):
    max_bytes = 1_000_000
    directory = tmp_path / "sharded"
    files = checkpoint.save_hf(model, directory, max_shard_bytes=max_bytes)
    shards = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    assert len(shards) >= 3
    assert shards == [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    assert set(shards) <= set(files)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    contents = read_dir(directory)
    reference = checkpoint.hf_tensors(model)
    assert index["weight_map"] == {k: f for f, ts in contents.items() for k in ts}
    assert sorted(index["weight_map"]) == sorted(reference)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in reference.values())
    for ts in contents.values():
        assert sum(a.nbytes for a in ts.values()) <= max_bytes
    loaded, info = load_hf(directory)
    assert info.mtp_loaded
    assert_same_tensors(reference, checkpoint.hf_tensors(loaded))


def test_load_then_save_with_info_rewrites_every_file_with_identical_tensors(model, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    checkpoint.save_hf(model, first, max_shard_bytes=1_000_000)
    loaded, info = load_hf(first)
    checkpoint.save_hf(loaded, second, info=info, max_shard_bytes=1_000_000)
    a, b = read_dir(first), read_dir(second)
    assert sorted(a) == sorted(b)
    for f in a:
        assert_same_tensors(a[f], b[f])
    assert json.loads((first / "model.safetensors.index.json").read_text()) == \
        json.loads((second / "model.safetensors.index.json").read_text())


def test_hub_spelling_with_mixed_dtypes_loads_and_writes_back_with_the_same_names_and_dtypes(ckpt, model, tmp_path):
    # The Hub release spells names without the `model.` prefix, stores norms/embeddings in BF16 and
    # (per one loader) the hash table in int32; a write-back with the LoadInfo must keep all of that.
    def to_hub(t):
        for k in list(t):
            a = t.pop(k)
            name = checkpoint.canonical_name(k)
            if name.endswith("norm.weight") or name in ("embed.weight", "head.weight"):
                a = a.astype(ml_dtypes.bfloat16)
            if name.endswith("tid2eid"):
                a = a.astype(np.int32)
            t[name] = a

    rewrite(ckpt / "model.safetensors", to_hub)
    hub = read_dir(ckpt)["model.safetensors"]
    assert "embed.weight" in hub and "layers.0.attn_norm.weight" in hub and "hc_head_fn" in hub
    loaded, info = load_hf(ckpt)
    assert info.spelling["embed.weight"] == "embed.weight"
    assert info.dtypes["layers.0.ffn.gate.tid2eid"] == np.int32
    # float32 variables hold the exact BF16 values
    emb = np.asarray(loaded.embed.embedding.get_value())
    assert emb.dtype == np.float32
    np.testing.assert_array_equal(emb, hub["embed.weight"].astype(np.float32))
    # everything not converted to BF16 is bit-identical to the original model
    orig = checkpoint.hf_tensors(model)
    np.testing.assert_array_equal(checkpoint.hf_tensors(loaded)["model.layers.1.attn.wq_a.weight"],
                                  orig["model.layers.1.attn.wq_a.weight"])
    out = tmp_path / "out"
    checkpoint.save_hf(loaded, out, info=info)
    assert_same_tensors(hub, read_dir(out)["model.safetensors"])


def test_lm_head_weight_spelling_loads_as_head(ckpt, model):
    rewrite(ckpt / "model.safetensors", lambda t: t.__setitem__("lm_head.weight", t.pop("head.weight")))
    loaded, info = load_hf(ckpt)
    assert info.spelling["head.weight"] == "lm_head.weight"
    np.testing.assert_array_equal(np.asarray(loaded.head.kernel.get_value()),
                                  np.asarray(model.head.kernel.get_value()))


def test_save_with_overwrite_replaces_an_older_sharded_checkpoint(model, saved, tmp_path):
    directory = tmp_path / "ckpt"
    checkpoint.save_hf(model, directory, max_shard_bytes=1_000_000)
    other, _ = load_hf(saved, mtp=False)  # a different model: no MTP, other embedding
    other.embed.embedding.set_value(other.embed.embedding.get_value() * 2)
    checkpoint.save_hf(other, directory, overwrite=True)  # fits one file: no shards, no index
    loaded, info = load_hf(directory)
    assert not info.mtp_loaded
    assert_same_tensors(checkpoint.hf_tensors(other), checkpoint.hf_tensors(loaded))


# --------------------------------------------------------------------------------------------------
# MTP tensors

def test_mtp_tensors_reload_and_give_identical_mtp_logits(saved, ids, outputs):
    loaded, info = load_hf(saved)
    assert info.mtp_loaded and info.config.n_mtp_layers == 1 and loaded.mtp is not None
    logits, mtp_logits = forward(loaded, ids)
    assert mtp_logits is not None and mtp_logits.shape == (2, SEQ - 1, 512)
    np.testing.assert_array_equal(mtp_logits, outputs[1])
    np.testing.assert_array_equal(logits, outputs[0])


def test_load_with_mtp_false_drops_the_mtp_block_and_keeps_the_main_logits(saved, ids, outputs):
    loaded, info = load_hf(saved, mtp=False)
    assert not info.mtp_loaded and info.config.n_mtp_layers == 0 and loaded.mtp is None
    assert not any(k.startswith("mtp.") for k in checkpoint.hf_tensors(loaded))
    logits, mtp_logits = forward(loaded, ids)
    assert mtp_logits is None
    np.testing.assert_array_equal(logits, outputs[0])


def test_partial_mtp_tensors_are_rejected_naming_the_missing_one(ckpt):
    rewrite(ckpt / "model.safetensors", lambda t: t.pop("mtp.0.h_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'mtp.0.h_proj.weight'"):
        load_hf(ckpt)


# --------------------------------------------------------------------------------------------------
# transformers interop

@pytest.fixture(scope="module")
def peer_mod():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from v4jax import peer

    return peer


@pytest.fixture(scope="module")
def peer_dir(cfg, peer_mod, tmp_path_factory):
    model = peer_mod.build_peer(cfg.replace(n_mtp_layers=0), 0)
    directory = tmp_path_factory.mktemp("peer") / "tiny"
    peer_mod.save_peer(model, str(directory))
    return model, directory


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_transformers_checkpoint_loads_without_mtp_and_gives_transformers_logits(peer_dir, peer_mod, cfg, ids):
    import torch

    peer_model, directory = peer_dir
    loaded, info = load_hf(directory)
    assert not info.mtp_loaded and loaded.mtp is None
    assert info.config == cfg.replace(n_mtp_layers=0)
    assert info.options.dtype == loaded.options.dtype == "float32"  # config.json's torch_dtype
    assert info.spelling["embed.weight"] == "model.embed_tokens.weight"
    assert info.dtypes["layers.0.ffn.gate.tid2eid"] == np.int64
    with torch.no_grad(), peer_mod.stable_topk():
        want = peer_model(torch.as_tensor(ids, dtype=torch.long), use_cache=False).logits.float().numpy()
    logits, _ = forward(loaded, ids)
    assert rel_err(logits, want) <= 1e-5


def test_transformers_checkpoint_written_back_with_info_is_tensor_identical(peer_dir, tmp_path):
    _, directory = peer_dir
    loaded, info = load_hf(directory)
    checkpoint.save_hf(loaded, tmp_path / "out", info=info)
    assert_same_tensors(read_dir(directory)["model.safetensors"], read_dir(tmp_path / "out")["model.safetensors"])


def test_transformers_checkpoint_with_mtp_requested_is_rejected(peer_dir):
    _, directory = peer_dir
    with pytest.raises(CheckpointError, match=r"MTP requested but the checkpoint has no mtp\.\* tensors"):
        load_hf(directory, mtp=True)


def test_our_checkpoint_loads_in_transformers_and_gives_our_logits(saved, peer_mod, ids, outputs):
    # Our file carries mtp.* tensors; transformers has no MTP module and ignores them.
    import torch
    from transformers import DeepseekV4ForCausalLM

    hf, loading = DeepseekV4ForCausalLM.from_pretrained(saved, output_loading_info=True)
    hf.eval()
    assert list(loading["missing_keys"]) == [] and list(loading["mismatched_keys"]) == []
    assert all(k.startswith("mtp.") for k in loading["unexpected_keys"])
    with torch.no_grad(), peer_mod.stable_topk():
        got = hf(torch.as_tensor(ids, dtype=torch.long), use_cache=False).logits.float().numpy()
    assert got.dtype == np.float32
    assert rel_err(outputs[0], got) <= 1e-5


# --------------------------------------------------------------------------------------------------
# Broken checkpoints

def test_missing_tensor_is_rejected_naming_it(ckpt):
    rewrite(ckpt / "model.safetensors", lambda t: t.pop("model.layers.1.attn.wq_a.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.1.attn.wq_a.weight'"):
        load_hf(ckpt)


def test_missing_expert_tensor_is_rejected_naming_it(ckpt):
    rewrite(ckpt / "model.safetensors", lambda t: t.pop("model.layers.2.ffn.experts.5.w3.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.2.ffn.experts.5.w3.weight'"):
        load_hf(ckpt)


def test_extra_tensor_is_rejected_naming_it(ckpt):
    rewrite(ckpt / "model.safetensors",
            lambda t: t.__setitem__("model.layers.0.attn.bogus.weight", np.zeros((2, 2), np.float32)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.layers.0.attn.bogus.weight'"):
        load_hf(ckpt)


def test_indexer_tensor_in_a_sliding_layer_is_rejected_as_unexpected(ckpt):
    def add(t):
        t["model.layers.0.attn.indexer.wq_b.weight"] = t["model.layers.1.attn.indexer.wq_b.weight"]

    rewrite(ckpt / "model.safetensors", add)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.layers.0.attn.indexer.wq_b.weight'"):
        load_hf(ckpt)


def test_mis_shaped_tensor_is_rejected_naming_it_and_both_shapes(ckpt):
    def transpose(t):
        t["model.layers.1.attn.wkv.weight"] = np.ascontiguousarray(t["model.layers.1.attn.wkv.weight"].T)

    rewrite(ckpt / "model.safetensors", transpose)
    with pytest.raises(CheckpointError,
                       match=r"tensor 'model.layers.1.attn.wkv.weight' has shape \(128, 64\), expected \(64, 128\)"):
        load_hf(ckpt)


def test_float_hash_table_is_rejected_as_non_integer(ckpt):
    def to_float(t):
        t["model.layers.0.ffn.gate.tid2eid"] = t["model.layers.0.ffn.gate.tid2eid"].astype(np.float32)

    rewrite(ckpt / "model.safetensors", to_float)
    with pytest.raises(CheckpointError,
                       match=r"tensor 'model.layers.0.ffn.gate.tid2eid' has dtype float32, expected an integer dtype"):
        load_hf(ckpt)


def test_integer_norm_weight_is_rejected_as_non_float(ckpt):
    def to_int(t):
        t["model.norm.weight"] = t["model.norm.weight"].astype(np.int32)

    rewrite(ckpt / "model.safetensors", to_int)
    with pytest.raises(CheckpointError, match=r"tensor 'model.norm.weight' has dtype int32, expected a floating-point"):
        load_hf(ckpt)


@pytest.mark.parametrize("bad_id", [8, -1])
def test_hash_table_with_expert_id_out_of_range_is_rejected(ckpt, bad_id):
    def corrupt(t):
        t["model.layers.0.ffn.gate.tid2eid"][17, 1] = bad_id

    rewrite(ckpt / "model.safetensors", corrupt)
    with pytest.raises(CheckpointError,
                       match=r"tensor 'model.layers.0.ffn.gate.tid2eid' holds expert ids outside \[0, 8\)"):
        load_hf(ckpt)


@pytest.mark.parametrize("keep", [0.5, 0.999, 4 / 7_000_000])
def test_truncated_safetensors_file_is_rejected(ckpt, keep):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:max(4, int(len(data) * keep))])
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated"):
        load_hf(ckpt)


def test_index_naming_a_missing_shard_is_rejected(model, tmp_path):
    directory = tmp_path / "sharded"
    checkpoint.save_hf(model, directory, max_shard_bytes=1_000_000)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    os.remove(directory / victim)
    with pytest.raises(CheckpointError, match=rf"is in {victim}, which does not exist"):
        load_hf(directory)


def test_index_naming_a_tensor_absent_from_its_shard_is_rejected(model, tmp_path):
    directory = tmp_path / "sharded"
    checkpoint.save_hf(model, directory, max_shard_bytes=1_000_000)
    path = directory / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["weight_map"]["model.layers.9.attn_norm.weight"] = sorted(index["weight_map"].values())[0]
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"'model.layers.9.attn_norm.weight' is listed in .* but not stored there"):
        load_hf(directory)


def test_missing_directory_is_rejected(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint directory .*nowhere does not exist"):
        load_hf(tmp_path / "nowhere")


def test_missing_config_json_is_rejected(ckpt):
    os.remove(ckpt / "config.json")
    with pytest.raises(CheckpointError, match=r"no config.json at"):
        load_hf(ckpt)


def test_invalid_config_json_is_rejected(ckpt):
    (ckpt / "config.json").write_text('{"model_type": "deepseek_v4", ')
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON"):
        load_hf(ckpt)


def test_config_json_of_another_model_type_is_rejected(ckpt):
    d = json.loads((ckpt / "config.json").read_text())
    d["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"model_type is 'llama'"):
        load_hf(ckpt)


def test_directory_without_safetensors_is_rejected(ckpt):
    os.remove(ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files"):
        load_hf(ckpt)


def test_config_of_another_size_is_rejected_naming_a_mismatched_tensor(ckpt):
    V4Config.preset("tiny").replace(q_lora_rank=32).save_json(ckpt / "config.json")
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.0.attn.wq_a.weight' has shape \(64, 128\), "
                                              r"expected \(32, 128\)"):
        load_hf(ckpt)


def test_save_into_non_empty_directory_is_refused_and_leaves_its_files_untouched(model, ckpt):
    (ckpt / "notes.txt").write_text("keep me")
    before = {f: (ckpt / f).read_bytes() for f in os.listdir(ckpt)}
    with pytest.raises(CheckpointError, match=r"is not empty; pass overwrite=True"):
        checkpoint.save_hf(model, ckpt)
    with pytest.raises(CheckpointError, match=r"is not empty; pass overwrite=True"):
        checkpoint.save_hf(model, ckpt, max_shard_bytes=1_000_000)
    assert {f: (ckpt / f).read_bytes() for f in os.listdir(ckpt)} == before


def test_same_tensor_under_both_spellings_is_rejected(ckpt):
    def duplicate(t):
        t["layers.0.attn_norm.weight"] = t["model.layers.0.attn_norm.weight"].copy()

    rewrite(ckpt / "model.safetensors", duplicate)
    with pytest.raises(CheckpointError, match=r"tensor '(model\.)?layers.0.attn_norm.weight' is stored twice \(also as '(model\.)?layers.0.attn_norm"):
        load_hf(ckpt)


def test_same_tensor_in_two_files_is_rejected(ckpt):
    t = TensorFile(ckpt / "model.safetensors")
    write_tensors(ckpt / "extra.safetensors", {"model.norm.weight": np.array(t["model.norm.weight"])})
    with pytest.raises(CheckpointError, match=r"tensor 'model.norm.weight' is stored twice"):
        load_hf(ckpt)


def test_per_expert_tensors_of_mixed_float_dtypes_load_exactly(ckpt, model):
    # Experts are stacked into one [E, ...] variable; one BF16 expert must not round the others.
    def one_bf16(t):
        k = "model.layers.1.ffn.experts.0.w1.weight"
        t[k] = t[k].astype(ml_dtypes.bfloat16)

    rewrite(ckpt / "model.safetensors", one_bf16)
    loaded, _ = load_hf(ckpt)
    got, want = checkpoint.hf_tensors(loaded), checkpoint.hf_tensors(model)
    for e in range(1, 8):
        k = f"model.layers.1.ffn.experts.{e}.w1.weight"
        np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.parametrize("header", [b"[]", b'{"model.norm.weight": {"dtype": "F32", "shape": [128]}}',
                                    b'{"model.norm.weight": 5}'],
                         ids=["list", "no-data-offsets", "entry-not-object"])
def test_malformed_safetensors_header_is_rejected(ckpt, header):
    with open(ckpt / "model.safetensors", "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
    with pytest.raises(CheckpointError, match=r"model.safetensors"):
        load_hf(ckpt)


def test_save_pretrained_names_the_kv_norm_attn_norm_and_the_release_attn_kv_norm(peer_dir):
    # transformers' writer spells the attention KV norm `attn.norm`, the release `attn.kv_norm`: both load
    _, directory = peer_dir
    keys = set(read_dir(directory)["model.safetensors"])
    assert "model.layers.0.attn.norm.weight" in keys and "model.layers.1.attn.compressor.norm.weight" in keys
    loaded, info = load_hf(directory)
    assert info.spelling["layers.0.attn.kv_norm.weight"] == "model.layers.0.attn.norm.weight"
    assert checkpoint.transformers_name("layers.0.attn.kv_norm.weight") == "model.layers.0.attn.norm.weight"
    assert checkpoint.canonical_name("layers.0.attn.kv_norm.weight") == "layers.0.attn.kv_norm.weight"


def test_module_name_state_dict_with_fused_experts_loads_to_the_transformers_logits(peer_dir, peer_mod, ids, tmp_path):
    # `safetensors.torch.save_file(model.state_dict())`: transformers module names, fused gate_up_proj / down_proj
    import torch
    from safetensors.torch import save_file

    from v4jax.io.restore import load_model

    peer_model, directory = peer_dir
    sd = {k: v.contiguous() for k, v in peer_model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in sd and "model.layers.0.self_attn.kv_norm.weight" in sd
    out = tmp_path / "state_dict"
    out.mkdir()
    save_file(sd, str(out / "model.safetensors"))
    shutil.copy(directory / "config.json", out / "config.json")
    with torch.no_grad(), peer_mod.stable_topk():
        want = peer_model(torch.as_tensor(ids, dtype=torch.long), use_cache=False).logits.float().numpy()
    via_hf, info = load_hf(out)
    via_load_model = load_model(out).model
    reference, _ = load_hf(directory)  # the save_pretrained files of the same model
    for m in (via_hf, via_load_model):
        a, b = nnx.to_flat_state(nnx.state(m)), nnx.to_flat_state(nnx.state(reference))
        for (path, va), (_, vb) in zip(a, b):
            np.testing.assert_array_equal(np.asarray(va.get_value()), np.asarray(vb.get_value()), err_msg=str(path))
        assert rel_err(forward(m, ids)[0], want) <= 1e-5
    # written back: save_pretrained spelling throughout (transformers reads it; nothing fused is half-renamed)
    checkpoint.save_hf(via_hf, tmp_path / "back", info=info)
    assert_same_tensors(read_dir(directory)["model.safetensors"], read_dir(tmp_path / "back")["model.safetensors"])


def test_fused_expert_parts_are_the_rows_transformers_concatenates(tmp_path):
    # gate_up_proj[e] = [w1_e; w3_e] (rows), down_proj[e] = w2_e; each part read alone from its byte range
    E, I, d = 3, 4, 5
    gate_up = np.arange(E * 2 * I * d, dtype=np.float32).reshape(E, 2 * I, d)
    down = -np.arange(E * d * I, dtype=np.float32).reshape(E, d, I)
    write_tensors(tmp_path / "model.safetensors", {"model.layers.2.mlp.experts.gate_up_proj": gate_up,
                                                   "model.layers.2.mlp.experts.down_proj": down,
                                                   "model.norm.weight": np.ones(d, np.float32)})
    found = checkpoint.open_checkpoint_files(tmp_path)
    assert "model.layers.2.mlp.experts.gate_up_proj" not in found and "model.norm.weight" in found
    for e in range(E):
        for name, want in ((f"layers.2.ffn.experts.{e}.w1.weight", gate_up[e, :I]),
                           (f"layers.2.ffn.experts.{e}.w3.weight", gate_up[e, I:]),
                           (f"layers.2.ffn.experts.{e}.w2.weight", down[e])):
            view = found[name]
            assert view.shape(name) == want.shape
            np.testing.assert_array_equal(view[name], want)
            np.testing.assert_array_equal(view.read_copy(name), want)
