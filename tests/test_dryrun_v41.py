"""The V4.1 dry run (benchmarks/dryrun_v41.py) on a small topology: the v41-tiny decode step and training
step compile with libtpu on this CPU machine and the report is sane (architecture.md §12.9)."""

import pytest

from benchmarks import dryrun_v41
from sharding.chips import CHIPS

pytest.importorskip("libtpu", reason="libtpu (pip install 'jax[tpu]') is needed for TPU dry runs")
pytestmark = pytest.mark.tpu


def _sane(r, mode, tokens):
    assert r["mode"] == mode and r["devices"] == 4 and r["mesh"] == "fsdp=2,expert=2"
    assert r["fits"] and 0 < r["peak_bytes"] < r["hbm_bytes"] == CHIPS["v5p"].hbm_bytes
    assert r["compiled_flops_per_device"] > 0 and r["hbm_bytes_accessed_per_device"] > 0
    assert r["collective_bytes_per_device"] > 0  # the experts are split: tokens or weights move
    assert 0.5 < r["compiled_over_model_flops"] < 10  # the model's matmuls, within the overheads
    assert 0.5 < r["loop_over_model_flops"] < 10 and r["loop_bound"] in ("compute", "memory", "collectives")
    chips = r["devices"] / CHIPS["v5p"].devices_per_chip
    assert r["step_s"] > 0 and r["tokens_per_s_per_chip"] * r["step_s"] * chips == pytest.approx(tokens)


def test_decode_dry_run_compiles_one_token_against_the_v41_cache():
    r = dryrun_v41.dry_run("decode", "v5p:2x2x1", "fsdp_ep", config="v41-tiny", batch=4, seq=256,
                           mesh_spec="fsdp=2,expert=2")
    _sane(r, "decode", 4)


@pytest.mark.slow
def test_train_dry_run_compiles_the_step_train_py_runs():
    r = dryrun_v41.dry_run("train", "v5p:2x2x1", "fsdp_ep", config="v41-tiny", batch=4, seq=256,
                           mesh_spec="fsdp=2,expert=2")
    _sane(r, "train", 4 * 256)
    assert r["settings"]["step"].startswith("v4jax.train.step.step_program")
    assert r["alias_bytes"] > 0.9 * r["output_bytes"]  # the fp32 weights and optimiser state are updated in place
