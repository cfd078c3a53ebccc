"""The benchmark suite (`python -m benchmarks`): sections render, markers replace only their span,
dry-run JSONs are read, and the quick benchmarks run with finite numbers. Never asserts a time."""

from __future__ import annotations

import json
import math
import os

import pytest

from benchmarks import suite


def _report(config="v4-flash", mode="train", topology="v5p:8x8x8", devices=512, fits=True, peak=80.0, mfu=0.2):
    g = 2**30
    return dict(config=config, topology=topology, chip="TPU v5p", devices=devices, mesh="expert=64,fsdp=8",
                rules="fsdp_ep", mode=mode, batch=devices, seq=4096, compile_seconds=1.0, argument_bytes=1,
                output_bytes=1, temp_bytes=1, alias_bytes=0, peak_bytes=peak * g, hbm_bytes=95 * g, fits=fits,
                flops_per_device=1e15, flops_per_device_text=1e14, scan_correction=10.0, hbm_traffic_per_device=1e12,
                collective_bytes_per_device=1e11, model_flops=1e17, step_time_s=2.5, bound="compute", mfu=mfu,
                tokens=devices * 4096, biggest_buffers=[["params", 10]])


def test_markers_replace_only_their_span_and_keep_hand_written_text(tmp_path):
    path = tmp_path / "BENCH.md"
    path.write_text("# Benchmarks\n\nhand-written intro\n\n<!-- suite:gpu begin -->\nold gpu text\n"
                    "<!-- suite:gpu end -->\n\nhand-written tail\n")
    suite.update_file(str(path), {"gpu": "<!-- suite:gpu begin -->\nnew gpu\n<!-- suite:gpu end -->",
                                  "peer": "<!-- suite:peer begin -->\npeer table\n<!-- suite:peer end -->"})
    text = path.read_text()
    assert "old gpu text" not in text and "new gpu" in text
    assert text.index("hand-written intro") < text.index("new gpu") < text.index("hand-written tail")
    assert text.rstrip().endswith("<!-- suite:peer end -->")  # a new section is appended
    suite.update_file(str(path), {"peer": "<!-- suite:peer begin -->\npeer 2\n<!-- suite:peer end -->"})
    text2 = path.read_text()
    assert text2.count("suite:peer begin") == 1 and "peer 2" in text2 and "peer table" not in text2
    assert "hand-written tail" in text2


def test_unbalanced_markers_are_refused(tmp_path):
    path = tmp_path / "BENCH.md"
    path.write_text("<!-- suite:gpu begin -->\nno end marker\n")
    with pytest.raises(ValueError, match="unbalanced markers"):
        suite.update_file(str(path), {"gpu": "x"})


def test_dryrun_tables_show_the_loop_by_loop_mfu_beside_xla_s(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({**_report(mfu=0.359), "loop_mfu": 0.544}))
    body = suite.section_dryrun(True, print, directory=str(tmp_path)).body
    assert "| 35.9% | 54.4% | r.json |" in body  # the run's row
    assert "| 35.9% | 54.4% | v5p:8x8x8 |" in body  # the smallest-topology row


def test_dryrun_section_renders_reports_and_picks_the_smallest_fitting_topology(tmp_path):
    reports = [_report(topology="v5p:8x8x8", devices=512, mfu=0.05),
               _report(topology="v5p:4x4x8", devices=128, fits=False, peak=140.0),
               _report(topology="v5p:8x8x4", devices=256, mfu=0.07),
               _report(config="v4-pro", mode="decode", topology="v6e:16x16", devices=256)]
    for i, r in enumerate(reports):
        (tmp_path / f"r{i}.json").write_text(json.dumps(r))
    section = suite.section_dryrun(True, print, directory=str(tmp_path))
    assert "v5p | v5p:8x8x4 | 256" in section.body  # smallest of the fitting v5p runs
    assert "| 7.0% | - | v5p:4x4x8, v5p:8x8x4, v5p:8x8x8 |" in section.body  # no loop-by-loop reading recorded
    assert "33.2%" in section.body  # the MaxText DeepSeek-V3 reference row
    assert "tpu-recipes" in section.body
    assert len(section.numbers) == 16 and all(math.isfinite(x) for x in section.numbers)


def test_a_compile_without_a_verdict_is_shown_as_unknown_not_as_a_refusal(tmp_path):
    aborted = {"config": "v4-pro", "topology": "tpu7x:4x8x8", "mode": "train", "seq": 4096, "fits": None,
               "error": "libtpu aborted the compile: LLVM ERROR"}
    (tmp_path / "a.json").write_text(json.dumps(aborted))
    body = suite.section_dryrun(True, print, directory=str(tmp_path)).body
    assert "| ? (libtpu aborted the compile: LLVM ERROR) |" in body
    assert "none recorded fits (a compile ended without a verdict)" in body


def test_every_dryrun_plan_entry_is_a_valid_dryrun_command_line_named_after_its_run():
    from benchmarks.dryrun import arguments, parser
    from sharding.rules import get_rules
    from v4jax import V4Config

    for name, args in suite.DRYRUN_PLAN.items():
        a = parser().parse_args(args.split())  # an unknown flag or bad choice exits here
        config, kw = arguments(a)  # the defaults filled in, as the dry run reads them
        V4Config.preset(config)
        get_rules(kw["rules_name"], **kw["rule_overrides"])
        assert a.json is None, name  # run_dryruns names the file
        assert name.startswith(f"{config}_{kw['mode']}_{a.topology.replace(':', '-')}_"), name


def test_dryrun_section_skips_and_names_files_that_are_not_reports(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"hello": 1}))
    (tmp_path / "partial.json").write_text("")  # another process is still writing it
    (tmp_path / "good.json").write_text(json.dumps(_report()))
    runs, skipped = suite.load_dryruns(str(tmp_path))
    assert [r["_file"] for r in runs] == ["good.json"]
    assert len(skipped) == 2 and skipped[0].startswith("bad.json: not a benchmarks.dryrun report")
    assert "partial.json: unreadable" in suite.section_dryrun(True, print, directory=str(tmp_path)).body


def test_a_failing_section_does_not_lose_the_others(tmp_path, monkeypatch):
    def boom(quick, log):
        raise RuntimeError("broken benchmark")

    monkeypatch.setitem(suite.SECTIONS, "components", boom)
    out = tmp_path / "BENCH.md"
    assert suite.main(["--only", "gpu,components", "--out", str(out)]) == 1
    text = out.read_text()
    assert "<!-- suite:gpu begin -->" in text and "suite:components" not in text


def test_recorded_dryruns_render():
    """Whatever the repository holds in benchmarks/results/dryrun renders (it may be empty)."""
    section = suite.section_dryrun(True, print)
    assert "MaxText" in section.body and all(math.isfinite(x) for x in section.numbers)


def test_gpu_section_says_when_no_gpu_is_lent():
    section = suite.section_gpu(True, print)
    assert "GPU" in section.title and section.body


def test_cli_rejects_unknown_sections(capsys):
    with pytest.raises(SystemExit):
        suite.main(["--only", "nosuchsection", "--no-write"])
    assert "unknown section" in capsys.readouterr().err


def test_scaling_tables_are_finite_and_match_the_spec_accounting():
    from benchmarks import scaling

    md, shares = scaling.cache_table()
    assert 0.06 < shares["v4-flash"] < 0.08 and 0.09 < shares["v4-pro"] < 0.12  # architecture.md §4.7: 13.7x / 9.6x
    md, shares = scaling.flops_table(actives={"v4-flash": 13e9, "v4-pro": 49e9})
    for full, half in shares.values():
        assert 0 < half < full < 1


def test_scaling_layer_costs_compile_and_grow_as_expected():
    """Compiled per-token costs at two contexts (XLA:CPU, no libtpu needed): dense grows ~linearly with S,
    SWA stays flat, CSA and HCA stay far below dense at the longer context."""
    from benchmarks import scaling

    rows, where = scaling.layer_table((4096, 16384), backend="cpu", log=lambda s: None,
                                      variants=lambda S: scaling.VARIANTS if S > 4096 else ("SWA", "dense"))
    by = {(r["variant"], r["S"]): r for r in rows}
    assert all(math.isfinite(r[k]) and r[k] > 0 for r in rows for k in ("flops", "bytes", "cache"))
    dense_growth = by[("dense", 16384)]["flops"] - by[("dense", 4096)]["flops"]
    assert dense_growth == pytest.approx(4 * 64 * 512 * (16384 - 4096), rel=0.1)  # QK + PV over the extra keys
    assert by[("SWA", 16384)]["flops"] == pytest.approx(by[("SWA", 4096)]["flops"], rel=0.01)
    for v in ("CSA", "HCA"):
        assert by[(v, 16384)]["flops"] < 0.5 * by[("dense", 16384)]["flops"]
    assert "XLA:CPU" in scaling.format_layer_table(rows, where)


def _check_peer_rows(rows, expected):
    assert [(r["task"], r["B"]) for r in rows] == expected
    for r in rows:
        assert r["check"].startswith("ok"), r
        assert all(math.isfinite(t) and t > 0 for t in r["ours"] + r["peer"])


@pytest.mark.slow
def test_quick_peer_comparison_agrees_and_reports_finite_times():
    from benchmarks import peer_compare

    rows = peer_compare.compare("tiny", batches=(2,), seq=32, steps=4, repeats=1, warmup=0, log=lambda s: None,
                                tasks={2: ("forward", "prefill", "decode")})
    _check_peer_rows(rows, [("forward", 2), ("prefill", 2), ("decode", 2)])
    assert "ratio peer/v4jax" in peer_compare.table(rows)


@pytest.mark.slow
def test_peer_training_step_agrees_on_loss_and_gradient_norm():
    from benchmarks import peer_compare

    rows = peer_compare.compare("tiny-b", batches=(2,), seq=32, steps=4, repeats=1, warmup=0, log=lambda s: None,
                                tasks={2: ("train",)})
    _check_peer_rows(rows, [("train", 2)])


@pytest.mark.slow
def test_quick_suite_runs_every_section(tmp_path, monkeypatch):
    monkeypatch.setattr(suite, "PLOT", str(tmp_path / "scaling.png"))  # keep the committed plot
    out = tmp_path / "BENCH.md"
    out.write_text("# Benchmarks\n\nkept\n")
    assert suite.main(["--quick", "--out", str(out)]) == 0
    text = out.read_text()
    assert "kept" in text
    for name in suite.SECTIONS:
        assert f"<!-- suite:{name} begin -->" in text
    assert os.path.getsize(tmp_path / "scaling.png") > 0


def test_components_that_compile_for_tpu_are_skipped_with_the_reason_without_libtpu(monkeypatch):
    # The README's install (`.[test]`) has no libtpu: the smoke run must still pass, saying what it skipped.
    from benchmarks import dryrun

    monkeypatch.setattr(dryrun, "libtpu_available", lambda: False)
    logged = []
    section = suite.section_components(True, logged.append, names=["sparse_attention", "lightning_indexer"])
    assert section.body.count("Skipped: needs libtpu") == 2 and "pip install -e '.[tpu]'" in section.body
    assert any("lightning_indexer skipped" in line for line in logged)
    tpu_only = {name for name, _, _, only in suite.COMPONENTS if only}
    assert tpu_only == {"sparse_attention", "lightning_indexer"}


def test_serving_table_covers_every_generation_model_context_and_batch_and_renders_the_recorded_cells():
    from benchmarks import serving_table as st
    cells = st.plan()
    assert len(cells) == len(set(cells)) == 3 * 2 * 3 * 3 and sorted(st.run_order()) == sorted(cells)
    assert {c[1].split(":")[0] for c in st.run_order()[:6]} == {"v5p", "v6e", "tpu7x"}  # every pod first
    assert st.rules_for("v5p:4x4x4", 16) == ("long_context", "fsdp_ep")  # 16 sequences cannot split 64 ways
    assert st.rules_for("v5p:4x4x4", 128)[0] == "fsdp_ep"
    assert st.rules_for("v5p:4x4x4", 1) == ("serve_tp", "fsdp_ep")  # one token: the matrices split instead
    recorded = st.load()
    assert recorded, "no recorded decode cells"
    table = st.table(recorded)
    assert table.count("\n") == len(cells) + 1
    for key, r in recorded.items():
        assert r["mode"] == "decode" and r["batch"] == key[3] and r["seq"] == st.CONTEXTS[key[2]]
        assert st.row(key, r) in table
        # the layout shown is the one with the shortest roofline step of those that fit
        assert all(r["step_time_s"] <= step for _, _, step in r["other_layouts"])
    assert [suffix for suffix, _ in st.layouts("v5p:4x4x4", 1)] == ["", st.ALTERNATE]
    assert [suffix for suffix, _ in st.layouts("v5p:4x4x4", 16)] == [""]


def test_serving_table_shows_the_faster_layout_of_a_batch_one_cell(tmp_path, monkeypatch):
    from benchmarks import serving_table as st
    monkeypatch.setattr(st, "RESULTS", str(tmp_path))
    key = ("v4-flash", "v5p:4x4x4", "8k", 1)
    cell = {"mode": "decode", "batch": 1, "seq": 8192, "devices": 64, "tokens": 1, "model_flops": 6.4e10,
            "flops_per_device": 2e9, "hbm_traffic_per_device": 4e9, "peak_bytes": 8 * 2**30, "fits": True,
            "bound": "memory"}
    for suffix, rules, mesh, step in [("", "serve_tp", "tensor=64", 0.009), (st.ALTERNATE, "fsdp_ep", "expert=64", 0.002)]:
        with open(st.cell_path(*key, suffix), "w") as f:
            json.dump({**cell, "rules": rules, "mesh": mesh, "step_time_s": step}, f)
    shown = st.load()[key]
    assert (shown["rules"], shown["other_layouts"]) == ("fsdp_ep", [("serve_tp", "tensor=64", 0.009)])
    assert "fsdp_ep `expert=64` (vs serve_tp `tensor=64`: 9.0 ms)" in st.row(key, shown)
    with open(st.cell_path(*key, st.ALTERNATE), "w") as f:  # a layout that does not fit is never shown
        json.dump({**cell, "rules": "fsdp_ep", "mesh": "expert=64", "fits": False}, f)
    assert st.load()[key]["rules"] == "serve_tp" and st.load()[key]["other_layouts"] == []


def test_gathered_experts_benchmark_checks_its_forms_agree_and_refuses_bad_flags(capsys):
    from benchmarks import gathered_experts
    assert gathered_experts.main(["--tokens", "1", "2", "--experts", "8", "--dim", "128", "--inter", "128",
                                  "--repeats", "1"]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| 1 ") or
            line.startswith("| 2 ")]
    assert len(rows) == 2 and all(float(r[-2]) < 1e-5 for r in rows)  # per-row and stacked equal the grouped path
    with pytest.raises(SystemExit):
        gathered_experts.main(["--tokens", "0"])
    assert "--tokens must be positive, got 0" in capsys.readouterr().err
