"""V41Config (issue 20 part 1): the presets, both config.json spellings of the golden fixtures, the
sharing the schedule implies, and one clear error per inconsistent config."""

import dataclasses
import json
import os
import re

import pytest

from v4jax.config import ConfigError, V4Config
from v4jax.config_v41 import V41Config

from v41_fixtures import FIXTURES, needs_fixtures  # noqa: E402  (tests/v41_fixtures.py)


@needs_fixtures
def test_both_spellings_of_the_fixture_config_give_the_tiny_preset():
    inference = V41Config.from_json_file(os.path.join(FIXTURES, "config.json"))
    hf = V41Config.from_json_file(os.path.join(FIXTURES, "config_hf.json"))
    # the inference file has no max_seq_len (a runtime argument there); the HF file says 128
    assert inference.replace(max_seq_len=128) == hf == V41Config.preset("v41-tiny")
    assert hf.kv_source_layers == (1, 4) and hf.candidate_source_layer == 4 and hf.engram_pad_id == 2
    assert hf.dspark_n_activated_experts == 3 and hf.n_mtp_layers == 2 and hf.vision_dim == 32
    assert (hf.rope_factor, hf.original_seq_len, hf.beta_fast, hf.beta_slow) == (16.0, 4096, 32.0, 1.0)


def test_the_flash_preset_is_the_release_and_round_trips_in_both_spellings():
    cfg = V41Config.preset("v41-flash")
    assert (cfg.dim, cfg.n_layers, cfg.n_mtp_layers, cfg.n_routed_experts, cfg.moe_inter_dim) == (5120, 40, 3, 384, 2304)
    assert cfg.compress_ratios == (0, 0) + (2,) * 18 + (1,) * 20 + (0, 0, 0)
    assert (cfg.vocab_size, cfg.image_token_id, cfg.dspark_noise_token_id) == (129280, 129264, 128799)
    assert V41Config.from_dict(cfg.to_hf_dict()) == cfg
    assert V41Config.from_dict(cfg.to_inference_dict()) == cfg
    hoisted = {**cfg.to_hf_dict()["text_config"], "vision_config": cfg.to_hf_dict()["vision_config"],
               "image_token_id": cfg.image_token_id}  # text keys at the top level, as some ports write them
    assert V41Config.from_dict(hoisted) == cfg


def test_kv_and_index_sources_follow_the_latest_source():
    cfg = V41Config.preset("v41-flash")
    assert [cfg.kv_source(i) for i in (0, 1, 2, 7, 8, 19, 20, 39)] == [None, None, 2, 2, 8, 14, 20, 20]
    assert [cfg.index_source(i) for i in (2, 3, 20, 23, 24, 27, 36, 39)] == [2, 2, 20, 20, 24, 24, 36, 36]
    tiny = V41Config.preset("v41-tiny")
    assert [tiny.kv_source(i) for i in range(8)] == [None, 1, 1, 1, 4, 4, 4, 4]
    assert [tiny.index_source(i) for i in range(8)] == [None, 1, 1, 1, 4, 4, 6, 6]


@pytest.mark.parametrize("change,message", [
    (dict(kv_source_layers=(0, 4)), "compress ratio is 0"),
    (dict(index_source_layers=(1, 4, 8)), "outside 0..7"),
    (dict(index_source_layers=(0, 1, 4)), "compress ratio is 0"),
    (dict(index_source_layers=(1, 6)), "not in index_source_layers"),
    (dict(kv_source_layers=(1,)), "a KV group must share one ratio"),
    (dict(kv_source_layers=(2, 4), index_source_layers=(2, 4, 6)), "no KV source at or before it"),
    (dict(candidate_topk_blocks=2), "cannot hold index_topk"),
    (dict(candidate_source_layer=5), "not an index source"),
    (dict(engram_layer_ids=(0, 8)), "outside 0..7"),
    (dict(engram_num_embeddings=(384,)), "1 entries for 2 Engram layers"),
    (dict(compress_ratios=(0, 2, 2, 2, 1, 1, 1, 1, 0)), "expected n_layers + n_mtp_layers = 10"),
    (dict(compress_ratios=(0, 4, 4, 4, 1, 1, 1, 1, 0, 0)), "only (0, 1, 2)"),
    (dict(compress_ratios=(0, 2, 2, 2, 1, 1, 1, 1, 0, 1)), "DSpark stages must be 0"),
    (dict(dspark_target_layer_ids=(5, 9)), "dspark_target_layer_ids"),
    (dict(dspark_n_activated_experts=7), "exceeds dspark_n_routed_experts"),
    (dict(image_token_id=256), "outside the vocabulary"),
    (dict(vision_n_heads=16), "multiple of 4"),
    (dict(gate_temp=0.0), "gate_temp must be a positive number"),
])
def test_inconsistent_configs_get_one_clear_error(change, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        V41Config.preset("v41-tiny", **change)


@needs_fixtures
def test_config_json_errors_name_the_file_and_the_field(tmp_path):
    with open(os.path.join(FIXTURES, "config_hf.json")) as f:
        hf = json.load(f)
    both = {**hf, "text_config": {**hf["text_config"], "kv_source_layers": [1]}}  # both spellings, disagreeing
    path = tmp_path / "config.json"
    path.write_text(json.dumps(both))
    with pytest.raises(ConfigError, match=r"config.json: kv_source_layers is given twice .*kv_source_layer_ids"):
        V41Config.from_json_file(path)
    missing = {**hf, "text_config": {k: v for k, v in hf["text_config"].items() if k != "candidate_source_layer_id"}}
    path.write_text(json.dumps(missing))
    with pytest.raises(ConfigError, match="lacks required field.*candidate_source_layer or candidate_source_layer_id"):
        V41Config.from_json_file(path)
    path.write_text(json.dumps({**hf, "text_config": {**hf["text_config"], "num_key_value_heads": 8}}))
    with pytest.raises(ConfigError, match="num_key_value_heads=8 is not supported"):
        V41Config.from_json_file(path)
    with pytest.raises(ConfigError, match="read it with v4jax.config_v41.V41Config"):
        V4Config.from_hf_dict(hf)


def test_no_field_is_left_out_of_the_key_table():
    from v4jax import config_v41

    assert {f.name for f in dataclasses.fields(V41Config)} == set(config_v41._KEYS)


def test_the_dry_runs_depth_reduced_flash_keeps_one_layer_of_each_kind():
    from benchmarks.dryrun_v41 import REPRESENTATIVE_LAYERS, keep_layers

    cfg = keep_layers(V41Config.preset("v41-flash").without_dspark(), REPRESENTATIVE_LAYERS)
    assert cfg.compress_ratios == (0, 0, 2, 2, 2, 2, 1, 1, 1, 1) and cfg.n_layers == 10
    assert cfg.kv_source_layers == (2, 4, 6) and cfg.index_source_layers == (2, 4, 6, 8)
    assert cfg.candidate_source_layer == 6 and cfg.engram_layer_ids == (1, 4)
    assert [cfg.kv_source(i) for i in range(10)] == [None, None, 2, 2, 4, 4, 6, 6, 6, 6]
    assert cfg.dim == 5120 and cfg.n_routed_experts == 384  # widths untouched
