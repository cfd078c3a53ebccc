"""The TPU dry run on a small topology: compiles with libtpu on this CPU machine, report is sane."""


import pytest

from benchmarks import dryrun
from sharding.chips import CHIPS, chip_for
from v4jax.config import AttentionKind, RouterKind, V4Config

pytest.importorskip("libtpu", reason="libtpu (pip install 'jax[tpu]') is needed for TPU dry runs")


def small():
    return V4Config.preset("tiny", n_layers=2, layer_types=(AttentionKind.SLIDING, AttentionKind.CSA),
                           router_types=(RouterKind.HASH, RouterKind.LEARNED), n_mtp_layers=0, max_seq_len=64)


def test_train_dry_run_on_v5p_reports_memory_flops_and_roofline():
    r = dryrun.dry_run(small(), "v5p:2x2x1", "fsdp_ep", mode="train", seq=32)
    # the step train.py runs (issue 16): make_step with every loss term of this model
    assert r.settings["step"] == "v4jax.train.step.make_step"
    assert r.settings["loss_terms"] == ["ce", "balance", "indexer"]  # no MTP block in small()
    assert r.devices == 4 and r.mesh == "expert=4" and r.batch == 4 and r.tokens == 128
    assert r.fits and 0 < r.peak_bytes < r.hbm_bytes == CHIPS["v5p"].hbm_bytes
    assert r.argument_bytes > 0 and r.temp_bytes > 0
    assert r.flops_per_device > 0 and r.hbm_traffic_per_device > 0 and r.collective_bytes_per_device > 0
    # analytic model FLOPs and compiled FLOPs agree to within the overheads (remat, attention, routing,
    # and in train.py's step the indexer KL's recomputed attention mass and Muon's Newton-Schulz
    # iterations, which at 128 tokens cost about as much as the model: measured ratio 0.27)
    assert 0.15 < r.model_flops / (r.devices * r.flops_per_device) < 3
    # the loop-aware reading runs Muon's Newton-Schulz loop its trip count, which XLA counts once
    assert r.loop_flops_per_device > r.flops_per_device and r.loop_traffic_per_device > 0
    assert r.loop_bound in ("compute", "memory", "collectives") and 0 < r.loop_mfu < 1
    assert r.step_time_s > 0 and 0 < r.mfu <= 1 and r.bound in ("compute", "memory", "collectives")
    assert "does" not in r.table() and "roofline step time" in r.table()


def test_default_train_step_uses_train_py_optimizer_split():
    """Muon keeps one fp32 momentum per matrix, AdamW two moments for the embedding (architecture.md §8.3)."""
    import jax

    from sharding.mesh import make_mesh
    from sharding.rules import get_rules
    from v4jax.config import RunOptions
    mesh = make_mesh("fsdp=2", devices=jax.devices()[:2])
    _, _, names, terms = dryrun.build(small(), "train", 2, 32, mesh, get_rules("fsdp"),
                                      options=RunOptions(dtype="bfloat16", param_dtype="float32"))
    assert terms == ["ce", "balance", "indexer"]
    emb = names["embed.embedding"]  # fp32, [V, d]
    assert names["optimizer state of embed.embedding"] == 2 * emb  # AdamW: two moments
    wq = "stages.0.blocks.0.attn.wq_a.kernel"
    assert names[f"optimizer state of {wq}"] == names[wq]  # one momentum of the parameter's size


def test_decode_dry_run_compiles_one_token_against_the_cache(monkeypatch):
    import jax

    # and reports what it can when the compiled HLO cannot be read back (a libtpu newer than this jax's
    # XLA, given by TPU_LIBRARY_PATH): memory and FLOPs, no collectives term in the roofline
    def unreadable(self):
        raise jax.errors.JaxRuntimeError("INTERNAL: RET_CHECK failure: async-update instruction")
    monkeypatch.setattr(jax.stages.Compiled, "as_text", unreadable)
    r = dryrun.dry_run(small(), "v6e:2x2", "fsdp_ep", mode="decode", seq=48)
    assert r.devices == 4 and r.tokens == r.batch == 4 and r.fits
    assert any(name == "KV cache (all layers)" and b > 0 for name, b in r.biggest_buffers) or r.temp_bytes > 0
    assert r.flops_per_device > 0 and r.model_flops > 0
    assert r.collective_bytes_per_device is None and r.bound in ("compute", "memory") and r.step_time_s > 0
    assert "collective bytes / device  unknown" in r.table()
    assert r.settings["libtpu"] == dryrun.libtpu_version() != "not installed"


def test_dry_run_refuses_a_model_that_does_not_fit_and_names_the_biggest_buffers(monkeypatch):
    import dataclasses

    tiny_chip = dataclasses.replace(CHIPS["v5p"], hbm_bytes=1e6)  # pretend the chip has 1 MB of HBM
    monkeypatch.setitem(CHIPS, "v5p", tiny_chip)
    with pytest.raises(dryrun.DoesNotFit, match=r"does not fit on v5p:2x2x1 .* biggest buffers per device: .*GiB") as e:
        dryrun.dry_run(small(), "v5p:2x2x1", "fsdp", mode="prefill", seq=32, breakdown_rows=5)
    # the compiled figures travel with the refusal (they say what to shrink), the breakdown among them
    r = e.value.report
    assert not r.fits and r.peak_bytes > 1e6 and r.breakdown[0][0] == "(all sources)" and r.breakdown[0][1] > 0
    assert any(row[0].startswith("v4jax/") for row in r.breakdown[1:])


def test_a_refusal_is_written_to_the_json_too(monkeypatch, tmp_path):
    import json

    def refuse(*a, **k):
        raise dryrun.DoesNotFit("v4-pro train does not fit on v5p:8x8x4: 180 GiB per device needed")
    monkeypatch.setattr(dryrun, "dry_run", refuse)
    out = tmp_path / "r.json"
    assert dryrun.main(["--config", "v4-pro", "--topology", "v5p:8x8x4", "--set", "moe_dispatch_chunk=256",
                        "--json", str(out)]) == 2
    r = json.loads(out.read_text())
    assert r["fits"] is False and "180 GiB" in r["reason"] and r["settings"]["moe_dispatch_chunk"] == 256


def test_command_line_errors_are_one_line_and_precede_compilation(capsys, tmp_path):
    assert dryrun.main(["--config", "tiny", "--topology", "v5p:2x2x1", "--rules", "fsdp", "--mesh", "fsdp=8"]) == 1
    assert "asks for 8 devices, but only 4 exist" in capsys.readouterr().err
    assert dryrun.main(["--config", "tiny", "--topology", "v5p:2x2x1", "--rules", "zero3"]) == 1
    assert "unknown rules preset 'zero3'" in capsys.readouterr().err
    assert dryrun.main(["--config", "tiny", "--topology", "v5p:2x2x1", "--set", "moe_chunk=8"]) == 1
    assert "unknown config field 'moe_chunk'" in capsys.readouterr().err
    assert dryrun.main(["--config", "tiny", "--topology", "v5p:2x2x1", "--set", "moe_dispatch_chunk=0"]) == 1
    assert "moe_dispatch_chunk must be a positive integer" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no chip figures for TPU generation 'v9'"):
        chip_for("v9:2x2")


def test_roofline_is_the_slowest_of_compute_memory_and_collectives_per_device():
    v5p, tpu7x = CHIPS["v5p"], CHIPS["tpu7x"]
    assert v5p.roofline(459e12, 0.0) == (1.0, "compute")  # one second of a v5p chip's peak
    assert v5p.roofline(0.0, 2 * 2765e9) == (2.0, "memory")
    assert v5p.roofline(459e12, 0.0, 3 * 1200e9) == (3.0, "collectives")
    assert v5p.roofline(459e12, 0.0, None)[1] == "compute"  # collectives unknown: not a candidate
    assert tpu7x.roofline(2307e12 / 2, 0.0) == (1.0, "compute")  # a TPU7x device is half a chip


def test_collective_bytes_counts_loop_bodies_by_trip_count():
    hlo = """HloModule m

%cond (p: (s32[], f32[8])) -> pred[] {
  %c = s32[]{:T(128)} constant(5)
  ROOT %lt = pred[]{:T(512)} compare(%g, %c), direction=LT
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ar = f32[8]{0} all-reduce(%x), channel_id=1, to_apply=%add
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body
  %ag = bf16[2,4]{1,0:T(8,128)} all-gather(%y), dimensions={0}
  %s = (bf16[4]{0}, bf16[16]{0}) all-gather-start(%z), dimensions={0}
  %d = bf16[16]{0} all-gather-done(%s)
}
"""
    assert dryrun.collective_bytes(hlo) == 5 * 32 + 16 + 32  # loop body x 5, plain gather, async gather result


def test_default_mesh_is_the_first_candidate_every_parameter_resolves_on():
    from sharding.rules import get_rules
    from v4jax.config import V4Config

    pro = V4Config.preset("v4-pro")
    devices = dryrun.tpu_devices("v5p:8x8x16")  # 1024 chips
    assert dryrun.mesh_candidates("fsdp_ep", pro, 1024)[0] == "expert=64,fsdp=16"
    # fsdp=16 x expert=64 divides the width 7168 but not the indexer's q_lora 1536: one step down
    assert dryrun.default_mesh("fsdp_ep", pro, devices, get_rules("fsdp_ep")) == "expert=64,fsdp=8,data=2"


def test_the_dry_run_compiles_the_generators_own_steps():
    """Issue 18: decode and prefill_chunk compile `generation_steps` (what Generator runs), the cache
    donated and kept in its layout."""
    r = dryrun.dry_run(small(), "v5p:2x2x1", "fsdp_ep", mode="decode", seq=48)
    assert r.settings["step"] == "v4jax.inference.generate.generation_steps step" and r.tokens == r.batch == 4
    r = dryrun.dry_run(small(), "v5p:2x2x1", "long_context", mode="prefill_chunk", seq=48, chunk=8,
                       mesh_spec="context=2,expert=2")
    assert r.settings["step"] == "v4jax.inference.generate.generation_steps prefill, chunk 8"
    assert r.tokens == r.batch * 8 and r.fits and r.flops_per_device > 0


def test_micro_batch_accumulation_counts_every_micro_batch():
    """grad_accum=2 runs the micro-batch loop twice: XLA counts its body once, so the scan correction
    doubles; the loop-aware reading doubles the model's work and keeps one optimizer update."""
    one = dryrun.dry_run(small(), "v5p:2x2x1", "fsdp_ep", mode="train", seq=32)
    two = dryrun.dry_run(small(), "v5p:2x2x1", "fsdp_ep", mode="train", seq=32, grad_accum=2)
    assert two.tokens == 2 * one.tokens and two.model_flops == pytest.approx(2 * one.model_flops)
    assert two.scan_correction == pytest.approx(2 * one.scan_correction)
    assert 1.2 < two.loop_flops_per_device / one.loop_flops_per_device < 2.0  # Newton-Schulz once a step
    assert two.mfu < 1 and two.loop_mfu < 1


def test_batch_one_decode_under_serve_tp_counts_the_model_once_by_the_loop_reading():
    """One token over 4 devices with every matrix split over tensor and the decode-shaped experts
    (architecture.md §5.5): the loop-by-loop reading (matmul + vector FLOPs, decode's one-row products
    being vector work on TPU) stays near the analytic FLOPs, where fsdp_ep repeats the token's
    non-expert work on every device."""
    tp = dryrun.dry_run(small(), "v5p:2x2x1", "serve_tp", mode="decode", batch=1, seq=48, mesh_spec="tensor=4")
    ep = dryrun.dry_run(small(), "v5p:2x2x1", "fsdp_ep", mode="decode", batch=1, seq=48)
    assert tp.mesh == "tensor=4" and tp.loop_vector_flops_per_device > 0
    ratio = lambda r: (r.loop_flops_per_device + r.loop_vector_flops_per_device) * r.devices / r.model_flops  # noqa: E731
    # measured 1.9x vs 2.6x (5.4x for fsdp_ep with its experts in row windows, moe_dense_tokens=0: the
    # dense local experts read less and compute less for one token)
    assert ratio(tp) < 0.8 * ratio(ep)
    assert "vector FLOPs" in tp.table()


def test_serve_tp_splits_the_indexer_scores_by_head():
    """A long cache's index scores (every compressed entry, every index head) are most of a batch-1
    decode step's work: serve_tp splits the index queries by head over tensor (act_index_heads), so
    each device scores its heads' share; with the axis unsplit every device scores all heads."""
    cfg = small().replace(max_seq_len=8192)

    def index_work(rule_overrides=None):
        r = dryrun.dry_run(cfg, "v5p:2x2x1", "serve_tp", mode="decode", batch=1, seq=8192, mesh_spec="tensor=4",
                           rule_overrides=rule_overrides, breakdown_rows=100)
        return sum(flops + vector for source, flops, _, vector in r.breakdown[1:] if "index_scores" in source)

    split, whole = index_work(), index_work({"act_index_heads": ()})
    assert 0 < split < 0.4 * whole  # 4 heads over 4 devices: a quarter, plus the sum over heads


def test_a_train_config_file_compiles_the_step_train_py_runs_from_it(monkeypatch, tmp_path, capsys):
    """--train-config: the model table, mesh, rules, batch and loss settings come from the train.py file;
    the flags it sets are refused beside it (one line each)."""
    import dataclasses
    import json

    import v4jax.train.step as step_module
    from v4jax.train.config import load_config

    toml = tmp_path / "run.toml"
    toml.write_text('preset = "tiny"\n[model]\ndtype = "bfloat16"\nremat = "dots"\nmoe_capacity_factor = 1.1\n'
                    'vocab_size = 264\n[mesh]\nmesh = "fsdp=2,expert=2"\nrules = "fsdp_ep"\n[data]\nseq_len = 32\n'
                    'batch_size = 8\ngrad_accum = 2\ndocument_mask = false\n[optim]\nindexer_loss_weight = 0.0\n'
                    'muon_ns_dtype = "bfloat16"\nbalance_alpha = 0.01\n')
    seen = {}

    class Captured(Exception):
        pass

    def capture(tc, cfg, mesh, rules, setup=None):
        seen.update(tc=tc, cfg=cfg, mesh=dict(mesh.shape), rules=rules)
        raise Captured

    monkeypatch.setattr(step_module, "step_program", capture)
    with pytest.raises(Captured):
        dryrun.main(["--train-config", str(toml), "--topology", "v5p:2x2x1"])
    want = load_config(str(toml))
    got = seen["tc"]
    # every train.py setting the step reads is the file's, and so are the model and its run-time options
    assert dataclasses.replace(got, model={}) == dataclasses.replace(want, model={})
    assert got.run_options() == want.run_options() and got.run_options().remat.value == "dots"
    assert seen["cfg"] == want.model_config() and seen["cfg"].vocab_size == 264
    assert {k: n for k, n in seen["mesh"].items() if n > 1} == {"fsdp": 2, "expert": 2}
    # the flags the file sets are refused beside it, before anything compiles
    for flag in (["--seq", "64"], ["--mesh", "fsdp=4"], ["--config", "v4-pro"], ["--grad-accum", "4"]):
        assert dryrun.main(["--train-config", str(toml), "--topology", "v5p:2x2x1", *flag]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{flag[0]} is set by --train-config" in err
    # a refusal's record names the file and the options it set
    def refuse(*args, **kwargs):
        raise dryrun.DoesNotFit("no room")

    monkeypatch.setattr(dryrun, "dry_run", refuse)
    assert dryrun.main(["--train-config", str(toml), "--topology", "v5p:2x2x1", "--json", str(tmp_path / "r.json")]) == 2
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["settings"]["train_config"] == str(toml) and record["settings"]["moe_capacity_factor"] == 1.1
    assert record["seq"] == 32 and record["batch"] == 8 and record["mesh"] == "fsdp=2,expert=2"
    capsys.readouterr()
    bad = tmp_path / "bad.toml"
    bad.write_text('preset = "tiny"\nsteps = 0\n')
    assert dryrun.main(["--train-config", str(bad), "--topology", "v5p:2x2x1"]) == 1
    assert "bad.toml: setting steps must be >= 1" in capsys.readouterr().err


def test_the_shipped_pod_configs_are_valid_train_py_configs():
    """configs/*.toml: each loads and passes train.py's checks, and the dry run reads the same step from it."""
    import glob
    import os

    from v4jax.train.config import check_settings, load_config
    files = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.toml")))
    assert len(files) >= 2
    for path in files:
        tc = load_config(path)
        check_settings(tc, tc.model_config())
        config, kw = dryrun.arguments(dryrun.parser().parse_args(["--train-config", path, "--topology", "v5p:2x2x1"]))
        assert config == tc.preset and kw["grad_accum"] == tc.grad_accum and kw["options"] == tc.run_options()
