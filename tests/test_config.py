"""V4Config: released presets (architecture.md §1.1, §1.2), config.json I/O in current and older field names,
interop with transformers' DeepseekV4Config, and rejection of inconsistent configurations.
RunOptions: the run-time settings kept apart from the architecture (never in config.json)."""

import dataclasses
import json

import pytest

from v4jax.config import (HF_FIELDS, OPTION_FIELDS, PRESETS, AttentionImpl, AttentionKind, ConfigError, MoEImpl,
                           Remat, RouterKind, RunOptions, V4Config, hf_weights_dtype, split_options)

S, C, H = AttentionKind.SLIDING, AttentionKind.CSA, AttentionKind.HCA

# --------------------------------------------------------------------------------------------------
# Presets against the spec tables

FLASH_RATIOS = (0, 0) + (4, 128) * 20 + (4, 0)  # architecture.md §1.2, MTP entry last
PRO_RATIOS = (128, 128) + (4, 128) * 29 + (4, 0)

# architecture.md §1.1: field -> (Flash, Pro)
SPEC_TABLE = {
    "vocab_size": (129280, 129280), "dim": (4096, 7168), "n_layers": (43, 61), "n_heads": (64, 128),
    "head_dim": (512, 512), "rope_head_dim": (64, 64), "nope_head_dim": (448, 448),
    "q_lora_rank": (1024, 1536), "o_groups": (8, 16), "o_lora_rank": (1024, 1024), "window_size": (128, 128),
    "csa_ratio": (4, 4), "hca_ratio": (128, 128), "index_n_heads": (64, 64), "index_head_dim": (128, 128),
    "index_topk": (512, 1024), "n_routed_experts": (256, 384), "n_shared_experts": (1, 1),
    "n_activated_experts": (6, 6), "moe_inter_dim": (2048, 3072), "score_func": ("sqrtsoftplus",) * 2,
    "route_scale": (1.5, 2.5), "swiglu_limit": (10.0, 10.0), "hc_mult": (4, 4), "hc_sinkhorn_iters": (20, 20),
    "hc_eps": (1e-6, 1e-6), "norm_eps": (1e-6, 1e-6), "rope_theta": (10000.0, 10000.0),
    "compress_rope_theta": (160000.0, 160000.0), "rope_factor": (16.0, 16.0),
    "original_seq_len": (65536, 65536), "beta_fast": (32.0, 32.0), "beta_slow": (1.0, 1.0),
    "max_seq_len": (1048576, 1048576), "n_mtp_layers": (1, 1), "n_hash_layers": (3, 3),
    "bos_token_id": (0, 0), "eos_token_id": (1, 1),
}


@pytest.mark.parametrize("field", sorted(SPEC_TABLE))
@pytest.mark.parametrize("name,column", [("v4-flash", 0), ("v4-pro", 1)])
def test_preset_value_matches_spec_table(name, column, field):
    assert getattr(V4Config.preset(name), field) == SPEC_TABLE[field][column]


def test_flash_compress_ratios_are_two_swa_then_csa_hca_interleave_with_swa_mtp():
    ratios = V4Config.preset("v4-flash").compress_ratios
    assert len(ratios) == 44
    assert ratios == FLASH_RATIOS


def test_pro_compress_ratios_are_two_hca_then_csa_hca_interleave_with_swa_mtp():
    ratios = V4Config.preset("v4-pro").compress_ratios
    assert len(ratios) == 62
    assert ratios == PRO_RATIOS


def test_flash_has_21_csa_layers_at_even_indices_and_20_hca_layers_at_odd_indices():
    kinds = V4Config.preset("v4-flash").layer_types
    assert [i for i, k in enumerate(kinds) if k is S] == [0, 1]
    assert [i for i, k in enumerate(kinds) if k is C] == list(range(2, 43, 2))
    assert [i for i, k in enumerate(kinds) if k is H] == list(range(3, 42, 2))
    assert (kinds.count(C), kinds.count(H)) == (21, 20)


def test_pro_has_30_csa_layers_and_31_hca_layers_including_layers_0_and_1():
    kinds = V4Config.preset("v4-pro").layer_types
    assert S not in kinds
    assert [i for i, k in enumerate(kinds) if k is C] == list(range(2, 61, 2))
    assert [i for i, k in enumerate(kinds) if k is H] == [0, 1] + list(range(3, 60, 2))
    assert (kinds.count(C), kinds.count(H)) == (30, 31)


@pytest.mark.parametrize("name", ["v4-flash", "v4-pro"])
def test_first_three_layers_are_hash_routed_and_the_rest_learned(name):
    cfg = V4Config.preset(name)
    assert cfg.router_types[:3] == (RouterKind.HASH,) * 3
    assert set(cfg.router_types[3:]) == {RouterKind.LEARNED}


def test_tiny_presets_keep_every_attention_kind_router_kind_and_mtp_active():
    for name in ("tiny", "tiny-b"):
        cfg = V4Config.preset(name)
        assert set(cfg.layer_types) == {S, C, H}
        assert set(cfg.router_types) == {RouterKind.HASH, RouterKind.LEARNED}
        assert cfg.n_mtp_layers == 1
    assert V4Config.preset("tiny").compress_ratios == (0, 4, 16, 4, 0)
    assert V4Config.preset("tiny-b").compress_ratios == (8, 2, 0, 2, 8, 0)


def test_preset_overrides_replace_only_the_named_field():
    base = V4Config.preset("tiny")
    cfg = V4Config.preset("tiny", n_mtp_layers=0)
    assert cfg.n_mtp_layers == 0
    assert cfg == base.replace(n_mtp_layers=0)
    assert cfg.compress_ratios == (0, 4, 16, 4)


def test_layer_schedule_strings_are_normalised_to_enums():
    cfg = V4Config.preset("tiny").replace(
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                     "compressed_sparse_attention"],
        router_types=["hash_moe", "moe", "moe", "moe"])
    assert cfg == V4Config.preset("tiny")
    assert isinstance(cfg.layer_types, tuple)


# --------------------------------------------------------------------------------------------------
# config.json in the current field names

@pytest.mark.parametrize("name", PRESETS)
def test_hf_dict_round_trip_reproduces_every_preset(name):
    cfg = V4Config.preset(name)
    back = V4Config.from_hf_dict(cfg.to_hf_dict())
    diff = {f.name: (getattr(cfg, f.name), getattr(back, f.name)) for f in dataclasses.fields(cfg)
            if getattr(cfg, f.name) != getattr(back, f.name)}
    assert diff == {}
    assert back == cfg


@pytest.mark.parametrize("name", PRESETS)
def test_json_file_round_trip_reproduces_every_preset(name, tmp_path):
    cfg = V4Config.preset(name)
    cfg.save_json(tmp_path / "config.json")
    assert V4Config.from_json_file(tmp_path / "config.json") == cfg


def test_hf_dict_uses_current_transformers_field_names_for_tiny():
    d = V4Config.preset("tiny").to_hf_dict()
    assert d["model_type"] == "deepseek_v4"
    assert d["layer_types"] == ["sliding_attention", "compressed_sparse_attention",
                                "heavily_compressed_attention", "compressed_sparse_attention"]
    assert d["mlp_layer_types"] == ["hash_moe", "moe", "moe", "moe"]
    assert d["compress_rates"] == {"compressed_sparse_attention": 4, "heavily_compressed_attention": 16}
    assert d["partial_rotary_factor"] == 0.25
    assert d["rope_parameters"]["compress"] == {
        "rope_type": "yarn", "rope_theta": 160000.0, "partial_rotary_factor": 0.25, "factor": 4.0,
        "original_max_position_embeddings": 32, "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 1.0}
    assert d["rope_parameters"]["main"] == {"rope_type": "default", "rope_theta": 10000.0,
                                            "partial_rotary_factor": 0.25}
    for old in ("compress_ratios", "num_hash_layers", "qk_rope_head_dim", "rope_scaling"):
        assert old not in d


# --------------------------------------------------------------------------------------------------
# config.json in the older field names (as shipped with the release)

def official_flash_config_json() -> dict:
    """The released DeepSeek-V4-Flash config.json (older field names), written out from architecture.md §1.1/§1.2."""
    return {
        "architectures": ["DeepseekV4ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "compress_ratios": list(FLASH_RATIOS),
        "compress_rope_theta": 160000,
        "expert_dtype": "fp4",
        "hc_eps": 1e-06,
        "hc_mult": 4,
        "hc_sinkhorn_iters": 20,
        "head_dim": 512,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "index_head_dim": 128,
        "index_n_heads": 64,
        "index_topk": 512,
        "initializer_range": 0.02,
        "max_position_embeddings": 1048576,
        "model_type": "deepseek_v4",
        "moe_intermediate_size": 2048,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": 64,
        "num_experts_per_tok": 6,
        "num_hash_layers": 3,
        "num_hidden_layers": 43,
        "num_key_value_heads": 1,
        "num_nextn_predict_layers": 1,
        "o_groups": 8,
        "o_lora_rank": 1024,
        "q_lora_rank": 1024,
        "qk_rope_head_dim": 64,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 16,
                         "original_max_position_embeddings": 65536, "type": "yarn"},
        "rope_theta": 10000,
        "routed_scaling_factor": 1.5,
        "scoring_func": "sqrtsoftplus",
        "sliding_window": 128,
        "swiglu_limit": 10.0,
        "tie_word_embeddings": False,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 129280,
    }


def old_style(cfg: V4Config) -> dict:
    """cfg's config.json rewritten with the older field names only."""
    d = cfg.to_hf_dict()
    for new in ("layer_types", "mlp_layer_types", "compress_rates", "rope_parameters", "partial_rotary_factor"):
        del d[new]
    d["compress_ratios"] = list(cfg.compress_ratios)  # includes the MTP entry
    d["compress_rate_csa"] = cfg.csa_ratio
    d["num_hash_layers"] = cfg.n_hash_layers
    d["qk_rope_head_dim"] = cfg.rope_head_dim
    d["rope_scaling"] = {"type": "yarn", "factor": cfg.rope_factor,
                         "original_max_position_embeddings": cfg.original_seq_len,
                         "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow}
    d["compress_rope_theta"] = cfg.compress_rope_theta
    return d


def test_official_flash_config_json_with_older_names_loads_as_the_flash_preset():
    loaded = V4Config.from_hf_dict(official_flash_config_json())
    flash = V4Config.preset("v4-flash")
    assert hf_weights_dtype(official_flash_config_json()) == "bfloat16"  # torch_dtype: the run's default dtypes
    assert loaded == flash
    assert loaded.compress_ratios == FLASH_RATIOS


def test_official_pro_style_config_json_with_older_names_loads_as_the_pro_preset():
    d = official_flash_config_json()
    d.update(compress_ratios=list(PRO_RATIOS), num_hidden_layers=61, hidden_size=7168, num_attention_heads=128,
             q_lora_rank=1536, o_groups=16, index_topk=1024, n_routed_experts=384, moe_intermediate_size=3072,
             routed_scaling_factor=2.5)
    assert V4Config.from_hf_dict(d) == V4Config.preset("v4-pro")


@pytest.mark.parametrize("name", PRESETS)
def test_older_field_names_give_the_same_config_as_current_names(name):
    cfg = V4Config.preset(name)
    old = V4Config.from_hf_dict(old_style(cfg))
    new = V4Config.from_hf_dict(cfg.to_hf_dict())
    assert old == new
    assert old.compress_ratios == cfg.compress_ratios


def test_older_compress_ratios_without_mtp_entry_are_accepted():
    cfg = V4Config.preset("tiny")
    d = old_style(cfg)
    d["compress_ratios"] = d["compress_ratios"][:-1]  # n_layers entries only
    assert V4Config.from_hf_dict(d).layer_types == (S, C, H, C)


def test_older_hca_ratio_is_taken_from_compress_ratios():
    d = old_style(V4Config.preset("tiny"))  # [0, 4, 16, 4, 0]
    assert V4Config.from_hf_dict(d).hca_ratio == 16


def test_rope_scaling_default_type_disables_yarn():
    d = old_style(V4Config.preset("tiny"))
    d["rope_scaling"] = {"type": "default"}
    assert V4Config.from_hf_dict(d).rope_factor == 1.0


def test_num_hash_layers_sets_the_leading_hash_routers():
    d = old_style(V4Config.preset("tiny"))
    d["num_hash_layers"] = 2
    assert V4Config.from_hf_dict(d).router_types == (RouterKind.HASH,) * 2 + (RouterKind.LEARNED,) * 2


# --------------------------------------------------------------------------------------------------
# transformers interop

@pytest.fixture(scope="module")
def transformers_config_cls():
    transformers = pytest.importorskip("transformers")
    return transformers.DeepseekV4Config


TRANSFORMERS_VIEW = {
    "tiny": dict(
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                     "compressed_sparse_attention"],
        mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
        qk_rope_head_dim=16, factor=4.0, original_max_position_embeddings=32),
    "tiny-b": dict(
        layer_types=["heavily_compressed_attention", "compressed_sparse_attention", "sliding_attention",
                     "compressed_sparse_attention", "heavily_compressed_attention"],
        mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe", "moe"],
        compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 8},
        qk_rope_head_dim=8, factor=8.0, original_max_position_embeddings=16),
}


@pytest.mark.parametrize("name", ["tiny", "tiny-b"])
def test_transformers_config_from_our_dict_has_our_schedule_and_rope(name, transformers_config_cls):
    want = TRANSFORMERS_VIEW[name]
    cfg = V4Config.preset(name)
    hf = transformers_config_cls(**cfg.to_hf_dict())
    assert hf.layer_types == want["layer_types"]
    assert hf.mlp_layer_types == want["mlp_layer_types"]
    assert dict(hf.compress_rates) == want["compress_rates"]
    assert hf.qk_rope_head_dim == want["qk_rope_head_dim"] == cfg.rope_head_dim
    assert hf.num_hidden_layers == cfg.n_layers
    compress = hf.rope_parameters["compress"]
    assert compress["rope_type"] == "yarn"
    assert compress["factor"] == want["factor"] == cfg.rope_factor
    assert compress["original_max_position_embeddings"] == want["original_max_position_embeddings"]
    assert compress["attention_factor"] == 1.0  # architecture.md §7: no YaRN mscale
    assert (compress["beta_fast"], compress["beta_slow"]) == (32.0, 1.0)
    assert compress["rope_theta"] == 160000.0
    assert hf.rope_parameters["main"]["rope_type"] == "default"
    assert hf.rope_parameters["main"]["rope_theta"] == 10000.0


@pytest.mark.parametrize("name", ["tiny", "tiny-b"])
def test_config_saved_by_transformers_loads_back_to_our_config(name, transformers_config_cls, tmp_path):
    # Compares every V4Config field; transformers writes the weights' dtype as `"dtype": "float32"`.
    cfg = V4Config.preset(name)
    transformers_config_cls(**cfg.to_hf_dict()).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "deepseek_v4"
    loaded = V4Config.from_json_file(tmp_path / "config.json")
    diff = {f.name: (getattr(cfg, f.name), getattr(loaded, f.name)) for f in dataclasses.fields(cfg)
            if getattr(cfg, f.name) != getattr(loaded, f.name)}
    assert diff == {}


def _nested_rope_disagreeing_with_top_level() -> dict:
    d = V4Config.preset("tiny").to_hf_dict()
    d["rope_parameters"]["compress"]["rope_theta"] = 40000.0  # top-level compress_rope_theta stays 160000
    d["rope_parameters"]["main"]["rope_theta"] = 5000.0  # top-level rope_theta stays 10000
    return d


def _flat_rope_parameters_without_compress_theta() -> dict:
    d = V4Config.preset("tiny").to_hf_dict()
    del d["compress_rope_theta"]
    d["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                            "beta_fast": 32.0, "beta_slow": 1.0, "rope_theta": 10000.0}
    return d


@pytest.mark.parametrize("make", [lambda: V4Config.preset("tiny").to_hf_dict(), _nested_rope_disagreeing_with_top_level,
                                  _flat_rope_parameters_without_compress_theta],
                         ids=["ours", "nested-disagreeing", "flat-no-compress-theta"])
def test_rope_bases_and_yarn_are_the_ones_transformers_computes_with(make, transformers_config_cls):
    # transformers' modeling reads only rope_parameters["main"/"compress"] (rope_theta, factor, ...)
    # after DeepseekV4Config.__post_init__ has normalised them; the same config.json must give us the
    # same RoPE tables.
    d = make()
    rp = transformers_config_cls(**d).rope_parameters
    cfg = V4Config.from_hf_dict(d)
    assert cfg.rope_theta == rp["main"]["rope_theta"]
    assert cfg.compress_rope_theta == rp["compress"]["rope_theta"]
    assert cfg.rope_factor == rp["compress"]["factor"]
    assert cfg.original_seq_len == rp["compress"]["original_max_position_embeddings"]


# --------------------------------------------------------------------------------------------------
# Rejected configurations

def tiny(**changes):
    return V4Config.preset("tiny").replace(**changes)


def test_heads_not_divisible_by_o_groups_is_rejected():
    with pytest.raises(ConfigError, match=r"n_heads \(4\) is not divisible by o_groups \(3\)"):
        tiny(o_groups=3)


def test_unknown_layer_type_string_is_rejected():
    with pytest.raises(ConfigError, match=r"unknown layer_types entry 'full_attention'"):
        tiny(layer_types=("sliding_attention", "full_attention", "heavily_compressed_attention",
                          "compressed_sparse_attention"))


def test_unknown_router_type_string_is_rejected():
    with pytest.raises(ConfigError, match=r"unknown router_types entry 'dense'"):
        tiny(router_types=("hash_moe", "moe", "dense", "moe"))


def test_layer_types_length_differing_from_n_layers_is_rejected():
    with pytest.raises(ConfigError, match=r"layer_types has 3 entries but n_layers is 4"):
        tiny(layer_types=(S, C, H))


def test_router_types_length_differing_from_n_layers_is_rejected():
    with pytest.raises(ConfigError, match=r"router_types has 5 entries but n_layers is 4"):
        tiny(router_types=(RouterKind.HASH,) + (RouterKind.LEARNED,) * 4)


def test_odd_rope_head_dim_is_rejected():
    with pytest.raises(ConfigError, match=r"rope_head_dim must be a positive even number, got 15"):
        tiny(rope_head_dim=15)


def test_rope_head_dim_larger_than_head_dim_is_rejected():
    with pytest.raises(ConfigError, match=r"rope_head_dim \(66\) exceeds head_dim \(64\)"):
        tiny(rope_head_dim=66)


def test_rope_head_dim_larger_than_index_head_dim_is_rejected():
    with pytest.raises(ConfigError, match=r"rope_head_dim \(34\) exceeds index_head_dim \(32\)"):
        tiny(rope_head_dim=34)


def test_more_activated_than_routed_experts_is_rejected():
    with pytest.raises(ConfigError, match=r"n_activated_experts \(9\) exceeds n_routed_experts \(8\)"):
        tiny(n_activated_experts=9)


def test_two_shared_experts_are_rejected():
    with pytest.raises(ConfigError, match=r"n_shared_experts must be 1"):
        tiny(n_shared_experts=2)


def test_index_topk_above_compressed_entries_at_max_seq_len_is_rejected():
    assert tiny(index_topk=32).index_topk == 32  # 128 // 4 entries: the largest allowed
    with pytest.raises(ConfigError, match=r"index_topk \(33\) exceeds the number of compressed entries .*\(32\)"):
        tiny(index_topk=33)


def test_window_larger_than_max_seq_len_is_rejected():
    assert tiny(window_size=128).window_size == 128
    with pytest.raises(ConfigError, match=r"window_size \(129\) exceeds max_seq_len \(128\)"):
        tiny(window_size=129)


@pytest.mark.parametrize("field,value", [("vocab_size", 0), ("dim", -128), ("n_heads", 0), ("head_dim", -64),
                                         ("moe_inter_dim", 0), ("index_topk", 0), ("hc_mult", -1),
                                         ("n_layers", 0), ("dim", True), ("dim", 128.0)])
def test_non_positive_or_non_integer_dims_are_rejected(field, value):
    with pytest.raises(ConfigError, match=rf"{field} must be a positive integer, got {value!r}"):
        tiny(**{field: value})


def test_mtp_depth_two_is_rejected():
    with pytest.raises(ConfigError, match=r"n_mtp_layers must be 0 or 1"):
        tiny(n_mtp_layers=2)


def test_unknown_score_func_is_rejected():
    with pytest.raises(ConfigError, match=r"score_func must be one of .*got 'relu'"):
        tiny(score_func="relu")


@pytest.mark.parametrize("field", ["dtype", "param_dtype"])
def test_unknown_dtype_is_rejected(field):
    with pytest.raises(ConfigError, match=rf"{field} must be one of .*got 'float8'"):
        RunOptions(**{field: "float8"})


@pytest.mark.parametrize("field", ["route_scale", "norm_eps", "compress_rope_theta", "rope_factor"])
def test_non_positive_float_hyperparameters_are_rejected(field):
    with pytest.raises(ConfigError, match=rf"{field} must be a positive number"):
        tiny(**{field: 0.0})


def test_beta_fast_below_beta_slow_is_rejected():
    with pytest.raises(ConfigError, match=r"beta_fast \(0.5\) is below beta_slow \(1.0\)"):
        tiny(beta_fast=0.5)


def test_unknown_preset_name_is_rejected():
    with pytest.raises(ConfigError, match=r"unknown preset 'v4-huge'"):
        V4Config.preset("v4-huge")


def test_hf_dict_of_another_model_type_is_rejected():
    d = V4Config.preset("tiny").to_hf_dict()
    d["model_type"] = "llama"
    with pytest.raises(ConfigError, match=r"model_type is 'llama', expected 'deepseek_v4'"):
        V4Config.from_hf_dict(d)


def test_hf_dict_with_several_kv_heads_is_rejected():
    d = V4Config.preset("tiny").to_hf_dict()
    d["num_key_value_heads"] = 8
    with pytest.raises(ConfigError, match=r"num_key_value_heads must be 1"):
        V4Config.from_hf_dict(d)


def test_hf_dict_without_any_layer_schedule_is_rejected():
    d = V4Config.preset("tiny").to_hf_dict()
    del d["layer_types"]
    assert "compress_ratios" not in d
    with pytest.raises(ConfigError, match=r"neither layer_types nor compress_ratios"):
        V4Config.from_hf_dict(d)


def test_hf_dict_layer_types_length_differing_from_num_hidden_layers_is_rejected():
    d = V4Config.preset("tiny").to_hf_dict()
    d["layer_types"] = d["layer_types"][:3]
    with pytest.raises(ConfigError, match=r"layer_types has 3 entries but num_hidden_layers is 4"):
        V4Config.from_hf_dict(d)


@pytest.mark.parametrize("ratios", [[0, 4, 16], [0, 4, 16, 4, 0, 0]])
def test_compress_ratios_of_wrong_length_are_rejected(ratios):
    d = old_style(V4Config.preset("tiny"))
    d["compress_ratios"] = ratios
    with pytest.raises(ConfigError, match=rf"compress_ratios has {len(ratios)} entries; expected 4 or 5"):
        V4Config.from_hf_dict(d)


def test_compress_ratios_with_two_hca_ratios_are_rejected():
    d = old_style(V4Config.preset("tiny"))
    d["compress_ratios"] = [0, 4, 16, 128, 0]
    with pytest.raises(ConfigError, match=r"mixes several HCA ratios \[16, 128\]"):
        V4Config.from_hf_dict(d)


def test_hf_dict_missing_num_hidden_layers_is_rejected():
    d = V4Config.preset("tiny").to_hf_dict()
    del d["num_hidden_layers"]
    with pytest.raises(ConfigError, match=r"lacks required field 'num_hidden_layers'"):
        V4Config.from_hf_dict(d)


@pytest.mark.parametrize("flag,value", [("tie_word_embeddings", True), ("attention_bias", True),
                                        ("mlp_bias", True), ("norm_topk_prob", False)])
def test_unsupported_boolean_flags_are_rejected(flag, value):
    d = V4Config.preset("tiny").to_hf_dict()
    d[flag] = value
    with pytest.raises(ConfigError, match=rf"{flag}={value!r} is not supported"):
        V4Config.from_hf_dict(d)


def test_other_activation_is_rejected():
    d = V4Config.preset("tiny").to_hf_dict()
    d["hidden_act"] = "gelu"
    with pytest.raises(ConfigError, match=r"hidden_act 'gelu' is not supported"):
        V4Config.from_hf_dict(d)


def test_unsupported_rope_type_is_rejected():
    d = old_style(V4Config.preset("tiny"))
    d["rope_scaling"] = {"type": "linear", "factor": 2.0}
    with pytest.raises(ConfigError, match=r"rope type 'linear' is not supported"):
        V4Config.from_hf_dict(d)


def test_non_json_config_file_is_rejected(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "deepseek_v4",')
    with pytest.raises(ConfigError, match=r"is not valid JSON"):
        V4Config.from_json_file(path)


def test_json_config_file_that_is_not_an_object_is_rejected(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[1, 2, 3]")
    with pytest.raises(ConfigError, match=r"does not hold a JSON object"):
        V4Config.from_json_file(path)


def test_missing_config_file_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"no config.json at"):
        V4Config.from_json_file(tmp_path / "config.json")


# --------------------------------------------------------------------------------------------------
# Architecture (V4Config, config.json) apart from run-time settings (RunOptions, issue 16)

def test_v4config_has_no_run_time_field():
    arch = {f.name for f in dataclasses.fields(V4Config)}
    options = {f.name for f in dataclasses.fields(RunOptions)}
    assert options == set(OPTION_FIELDS) == {"dtype", "param_dtype", "attention_chunk", "moe_dispatch_chunk",
                                             "moe_gather_tokens", "moe_dense_tokens", "moe_capacity_factor", "remat", "attention_impl", "moe_impl", "csa_dense", "indexer_detach", "numerics"}
    assert arch & options == set()


@pytest.mark.parametrize("name", PRESETS)
def test_config_json_holds_no_run_time_option(name, tmp_path):
    V4Config.preset(name).save_json(tmp_path / "config.json", torch_dtype="bfloat16")
    d = json.loads((tmp_path / "config.json").read_text())
    assert set(d) & (set(OPTION_FIELDS) - {"dtype"}) == set()
    assert "dtype" not in d and "attention_chunk" not in d
    assert d["torch_dtype"] == "bfloat16"  # the stored weights' dtype (HF convention), given by the writer
    assert V4Config.preset(name).to_hf_dict()["torch_dtype"] == "float32"  # default


def test_older_attention_chunk_key_is_read_and_ignored():
    d = V4Config.preset("tiny").to_hf_dict()
    d["attention_chunk"] = 7  # written by older versions
    assert V4Config.from_hf_dict(d) == V4Config.preset("tiny")


@pytest.mark.parametrize("field,key,convert,default,older", HF_FIELDS, ids=[r[0] for r in HF_FIELDS])
def test_every_table_row_round_trips(field, key, convert, default, older):
    base = V4Config.preset("tiny-b")
    value = getattr(base, field)
    # a value other than the preset's that the config still accepts, so the row is really exercised
    changed = {"n_layers": None, "head_dim": None, "n_mtp_layers": 0, "score_func": "sigmoid", "bos_token_id": None,
               "eos_token_id": 7, "n_shared_experts": None, "index_topk": 6, "max_seq_len": 256,
               "n_activated_experts": 2, "n_routed_experts": 7, "window_size": 9}.get(field, "bump")
    if changed == "bump":
        changed = value * 2 if isinstance(value, int) else value * 1.5
    cfg = base if changed is None else base.replace(**{field: changed})
    d = cfg.to_hf_dict()
    got = d
    for k in (key,) if isinstance(key, str) else key:
        got = got[k]
    assert got == getattr(cfg, field)  # written under the table's key
    back = V4Config.from_hf_dict(d)
    assert getattr(back, field) == getattr(cfg, field) and back == cfg


@pytest.mark.parametrize("field,key,convert,default,older",
                         [r for r in HF_FIELDS if r[4]], ids=[r[0] for r in HF_FIELDS if r[4]])
def test_an_older_spelling_of_a_table_row_is_read(field, key, convert, default, older):
    cfg = V4Config.preset("tiny-b")
    d = cfg.to_hf_dict()
    parent = d
    for k in ((key,) if isinstance(key, str) else key)[:-1]:
        parent = parent[k]
    del parent[((key,) if isinstance(key, str) else key)[-1]]
    for old in older:
        d[old] = getattr(cfg, field)
    assert V4Config.from_hf_dict(d) == cfg


def test_older_spellings_of_structured_fields_are_read():
    cfg = V4Config.preset("tiny")
    d = old_style(cfg)
    assert "qk_rope_head_dim" in d and "layer_types" not in d and "rope_scaling" in d
    assert V4Config.from_hf_dict(d) == cfg
    assert hf_weights_dtype({"dtype": "bfloat16"}) == "bfloat16"  # transformers' newer spelling of torch_dtype


def test_run_options_normalise_enums_validate_and_replace():
    o = RunOptions(remat="full", attention_impl="pallas", moe_impl="reference", dtype="bf16")
    assert (o.remat, o.attention_impl, o.moe_impl, o.dtype) == (Remat.FULL, AttentionImpl.PALLAS, MoEImpl.REFERENCE,
                                                                "bfloat16")
    assert o.replace(csa_dense=True).csa_dense and not o.csa_dense
    with pytest.raises(ConfigError, match=r"attention_chunk must be a positive integer, got 0"):
        RunOptions(attention_chunk=0)
    with pytest.raises(ConfigError, match=r"csa_dense must be true or false, got 1"):
        RunOptions(csa_dense=1)
    with pytest.raises(ConfigError, match=r"unknown remat entry 'some'"):
        RunOptions(remat="some")
    with pytest.raises(ConfigError, match=r"vocab_size is not a run-time option"):
        o.replace(vocab_size=3)


@pytest.mark.parametrize("field", ["dtype", "remat", "csa_dense", "attention_impl"])
def test_v4config_refuses_a_run_time_option_by_name(field):
    with pytest.raises(ConfigError, match=rf"^{field} is a run-time option: set it on RunOptions, not V4Config$"):
        V4Config.preset("tiny", **{field: "x"})
    with pytest.raises(ConfigError, match=rf"^{field} is a run-time option"):
        V4Config.preset("tiny").replace(**{field: "x"})


def test_preset_options_and_split():
    assert (RunOptions.preset("v4-flash").dtype, RunOptions.preset("v4-pro").param_dtype) == ("bfloat16", "bfloat16")
    assert RunOptions.preset("tiny").attention_chunk == 32 and RunOptions.preset("tiny").dtype == "float32"
    assert RunOptions.for_weights("bfloat16").param_dtype == "bfloat16"
    assert split_options({"vocab_size": 3, "remat": "full", "bogus": 1}) == ({"vocab_size": 3, "bogus": 1},
                                                                            {"remat": "full"})
