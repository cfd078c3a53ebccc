"""Training reliability (issue 15): checkpoint checksums and fallback, non-finite states never kept or
saved, no silent restart when every checkpoint is bad, Ctrl-C and signals during compile, strict-JSON
metrics, the finished-run summary.

One 8-step in-process run of the small model of tests/test_train.py (checkpoints at 4 and 8, step 4's
update poisoned with a NaN) is shared; the other runs reuse its compiled step through the persistent
compilation cache (the NaN hook and the schedule are runtime inputs, so every run here compiles the
same program).
"""

import json
import os
import shutil
import signal
import time

import jax
import numpy as np
import pytest

import train
from test_train import _wait_for_steps, cache, cli, corpus, restore_newest, small_overrides  # noqa: F401  (fixtures)
from v4jax.train.checkpointer import MANIFEST, verify_manifest
from v4jax.train.config import load_config
from v4jax.train.metrics import read_metrics
from v4jax.train.step import all_finite, nan_update_target
from v4jax.train.loop import train as run_training

STEPS = dict(steps=8, ckpt_every=4)


def args_for(run_dir, corpus, cache, **kw):
    return small_overrides(run_dir, corpus, compile_cache=cache, **{**STEPS, **kw})


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, corpus, cache):
    """8 steps, checkpoints at 4 and 8; step 4's update makes one parameter NaN (nan_update_steps)."""
    d = tmp_path_factory.mktemp("base") / "run"
    logs = []
    summary = run_training(load_config(None, args_for(d, corpus, cache, nan_update_steps=[4])), log=logs.append)
    return d, logs, summary


def restore(run_dir, corpus):
    """(state, iterator state, log lines) of the newest usable checkpoint of run_dir (or CheckpointError)."""
    return restore_newest(load_config(None, args_for(run_dir, corpus, "")))


def flip_byte(path, where=0.5):
    """Invert one byte in place (size unchanged), as a bad disk or a stray write would."""
    with open(path, "r+b") as f:
        f.seek(int(os.path.getsize(path) * where))
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


def step_files(step_dir):
    return sorted(os.path.relpath(os.path.join(r, f), step_dir) for r, _, fs in os.walk(step_dir) for f in fs
                  if f != MANIFEST)


def listing(root):
    return sorted(os.path.relpath(os.path.join(r, f), root) for r, _, fs in os.walk(root) for f in fs)


def strict_json(line):
    def refuse(name):
        raise ValueError(f"non-JSON constant {name}")
    return json.loads(line, parse_constant=refuse)


# --------------------------------------------------------------------------------------------------
# Non-finite states

@pytest.mark.slow
def test_a_step_whose_update_is_not_finite_is_skipped_and_never_saved(base_run, corpus, tmp_path):
    run, logs, summary = base_run
    rec = read_metrics(str(run / "metrics.jsonl"))
    assert summary["skipped"] == [4] and sorted(rec) == list(range(1, 9))
    assert not rec[4]["ok"] and rec[4]["state_ok"] is False and np.isfinite(rec[4]["loss"])
    assert all(rec[s]["ok"] for s in rec if s != 4)
    assert any("step 4: the update would make parameters or optimizer state non-finite" in s for s in logs), logs
    # both checkpoints (4 holds step 3's state, kept in place of the poisoned update) are finite
    got, _, _ = restore(run, corpus)
    assert int(got["step"]) == 8 and bool(all_finite(got))
    only4 = tmp_path / "only4"
    shutil.copytree(run, only4)
    shutil.rmtree(only4 / "checkpoints" / "8")
    got, _, _ = restore(only4, corpus)
    assert int(got["step"]) == 4 and bool(all_finite(got))
    assert np.isfinite(np.asarray(got["params"][nan_update_target(got["params"])])).all()


def test_metrics_are_strict_json(base_run):
    run, _, _ = base_run
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 8
    recs = [strict_json(s) for s in lines]  # raises on bare NaN / Infinity
    assert recs[0]["step_time_s"] is None  # the first step has no rate yet: null, not NaN


# --------------------------------------------------------------------------------------------------
# Checksums and fallback

def test_every_checkpoint_file_is_covered_by_the_manifest(base_run, tmp_path):
    """A flipped byte in any file of a step directory (arrays of params and optimizer state, Orbax
    metadata, the data-iterator state) fails verification; an intact one passes."""
    run, _, _ = base_run
    assert verify_manifest(str(run / "checkpoints" / "8")) is None
    files = step_files(run / "checkpoints" / "8")
    assert "data/metadata" in files and any(f.startswith("state/ocdbt.process_0/d/") for f in files)
    for rel in files:
        step = tmp_path / rel.replace("/", "_")
        shutil.copytree(run / "checkpoints" / "8", step)
        flip_byte(step / rel)
        problem = verify_manifest(str(step))
        assert problem is not None and rel in problem, (rel, problem)


@pytest.mark.parametrize("which", ["array data", "iterator state", "orbax metadata"])
def test_a_flipped_byte_in_the_newest_checkpoint_falls_back_to_the_previous_one(base_run, corpus, tmp_path, which):
    run = tmp_path / "run"
    shutil.copytree(base_run[0], run)
    step8 = run / "checkpoints" / "8"
    target = {"array data": max((step8 / "state").rglob("*"), key=lambda p: p.stat().st_size if p.is_file() else 0),
              "iterator state": step8 / "data" / "metadata",
              "orbax metadata": step8 / "state" / "_METADATA"}[which]
    size = target.stat().st_size
    flip_byte(target)
    assert target.stat().st_size == size
    got, it, logs = restore(run, corpus)
    assert int(got["step"]) == 4 and it.batch == 4 and bool(all_finite(got))
    assert any("checkpoint step 8 in" in s and "falling back to the previous one" in s for s in logs), logs
    assert any("moved the unusable checkpoint step 8 aside to" in s for s in logs), logs
    assert (run / "checkpoints" / "corrupt-8").is_dir() and not step8.exists()


def test_no_usable_checkpoint_stops_with_an_error_and_moves_nothing(base_run, corpus, cache, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(base_run[0], run)
    for step in (4, 8):
        flip_byte(run / "checkpoints" / str(step) / "data" / "metadata")
    before = listing(run)
    rc = train.main(args_for(run, corpus, cache))
    out, err = capsys.readouterr()
    assert rc == 3, (out, err)
    assert err.strip().startswith("error: no usable checkpoint in") and "--fresh" in err and len(err.strip().splitlines()) == 1
    assert "nothing was moved or deleted" in err
    assert "Traceback" not in out + err
    assert listing(run) == before
    # --fresh starts over (2 steps here) and moves the old checkpoints and metrics aside, saying so
    rc = train.main(args_for(run, corpus, cache, steps=2) + ["--fresh"])
    out, err = capsys.readouterr()
    assert rc == 0, (out, err)
    assert "moved" in out and "checkpoints.old-1" in out and "metrics.jsonl.old-1" in out
    assert sorted(os.listdir(run / "checkpoints.old-1")) == ["4", "8"]
    assert sorted(read_metrics(str(run / "metrics.jsonl"))) == [1, 2]


def test_a_finished_run_says_so_and_does_nothing(base_run, corpus, cache, capsys):
    run = base_run[0]
    before = {p: os.path.getmtime(os.path.join(run, p)) for p in listing(run) if p != "config.json"}
    t0 = time.time()
    rc = train.main(args_for(run, corpus, cache))
    out, err = capsys.readouterr()
    assert rc == 0, (out, err)
    rec = read_metrics(str(run / "metrics.jsonl"))
    assert f"run already finished at step 8 of steps=8 (final loss {rec[8]['loss']:.4f} from" in out
    assert "nothing to do" in out and "nan" not in out.split("run already finished")[1]
    assert {p: os.path.getmtime(os.path.join(run, p)) for p in listing(run) if p != "config.json"} == before
    assert time.time() - t0 < 60  # nothing compiled


# --------------------------------------------------------------------------------------------------
# Signals (subprocesses)

@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits(tmp_path, corpus, cache, base_run):
    """The first SIGINT saves after the current step (exit 130, as shells expect from Ctrl-C)."""
    p = cli(args_for(tmp_path, corpus, cache, steps=200, ckpt_every=1000), devices=8)  # as here: cache hits
    _wait_for_steps(tmp_path / "metrics.jsonl", 2, p)
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 130, out[-3000:]
    assert "received SIGINT (Ctrl-C): saved a checkpoint at step" in out, out[-3000:]
    assert "Traceback" not in out
    saved = int(out.split("saved a checkpoint at step ")[1].split()[0])
    assert verify_manifest(str(tmp_path / "checkpoints" / str(saved))) is None  # complete, checksummed


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_compiling_exits_at_once_without_a_crash_dump(tmp_path, corpus, sig):
    """compile_cache="" so the step really compiles (tens of seconds); the signal must not wait for it."""
    p = cli(args_for(tmp_path / "run", corpus, ""))
    t0 = time.time()
    seen = []
    for line in p.stdout:  # wait for the compile announcement
        seen.append(line)
        if line.startswith("compiling the step"):
            break
        assert time.time() - t0 < 300, "".join(seen)[-3000:]
    time.sleep(1.0)
    p.send_signal(sig)
    t_sig = time.time()
    out = "".join(seen) + p.communicate(timeout=120)[0]
    assert time.time() - t_sig < 15, "waited for the compile to finish"
    assert p.returncode == (0 if sig == signal.SIGTERM else 130), out[-3000:]
    assert f"interrupted by {signal.Signals(sig).name} before the first step; nothing new to save" in out
    for crash in ("Traceback", "Fatal Python error", "*** SIG", "Check failure"):  # absl's dump: "*** SIGTERM received"
        assert crash not in out, out[-3000:]


def test_a_run_with_a_tokenizer_json_carries_a_copy(tmp_path, corpus, monkeypatch):
    """run_dir/tokenizer.json is written before anything compiles (stopped there); config.json names the
    original path; byte-level runs keep recording "byte"."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    t = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "def": 2, "return": 3}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = tmp_path / "tok.json"
    t.save(str(tok))

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr(jax.stages.Lowered, "compile", stop)
    run = tmp_path / "run"
    with pytest.raises(Stop):
        run_training(load_config(None, args_for(run, corpus, "", tokenizer=str(tok))), log=lambda s: None)
    assert (run / "tokenizer.json").read_text() == tok.read_text()
    assert json.loads((run / "config.json").read_text())["train"]["tokenizer"] == str(tok)
    with pytest.raises(Stop):
        run_training(load_config(None, args_for(tmp_path / "byte", corpus, "")), log=lambda s: None)
    assert json.loads((tmp_path / "byte" / "config.json").read_text())["train"]["tokenizer"] == "byte"
    assert not (tmp_path / "byte" / "tokenizer.json").exists()
