"""train.py refuses bad settings and data with one `error: ...` line naming the culprit, a non-zero
exit and no traceback, before anything compiles, and changes no file outside run_dir (issue 15).

Each row calls `train.main(argv)` in-process on the small model of tests/test_train.py; compiling is
made to fail loudly, so a row that got as far as a compile fails instead of passing slowly.
"""

import json
import os

import jax
import pytest

import train
from test_train import corpus, small_overrides  # noqa: F401  (corpus is a fixture)


def tree_state(root):
    """{path: (size, mtime_ns)} of every file under root."""
    out = {}
    for r, _, fs in os.walk(root):
        for f in fs:
            st = os.stat(os.path.join(r, f))
            out[os.path.join(r, f)] = (st.st_size, st.st_mtime_ns)
    return out


def make_inputs(tmp):
    """Bad data files and settings files the rows refer to by {name}."""
    (tmp / "in").mkdir()
    paths = {}

    def put(name, content):
        p = tmp / "in" / name
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        paths[name] = str(p)

    put("garbage.bin.txt", os.urandom(4096))  # binary data with a text extension
    put("garbage.jsonl", '{"text": "fine"}\n{"text": oops}\n')
    put("binary.jsonl", b'\xff\xfe\x00garbage\n')
    put("number.jsonl", '{"text": 5}\n')
    put("notext.jsonl", '{"body": "no text field"}\n')
    put("tiny.txt", "too short")
    put("bad_tokenizer.json", "{not json")
    put("bad.toml", "steps = = 3\n")
    put("a_file", "I am a file, not a directory")
    (tmp / "in" / "empty_dir").mkdir()
    paths["empty_dir"] = str(tmp / "in" / "empty_dir")
    foreign = tmp / "in" / "foreign_dir"  # someone else's directory
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    paths["foreign_dir"] = str(foreign)
    ours = tmp / "in" / "old_run"  # a train.py run with a checkpoint
    (ours / "checkpoints" / "4").mkdir(parents=True)
    (ours / "config.json").write_text(json.dumps({"train": {}, "model": {}}))
    paths["old_run"] = str(ours)
    return paths


# (argv items added to a good small run, culprit the one error line must name)
CASES = [
    pytest.param(["model.frobnicate=3"], "model.frobnicate", id="unknown-model-key"),
    pytest.param(["frobnicate=3"], "frobnicate", id="unknown-key"),
    pytest.param(['steps="ten"'], "steps", id="steps-wrong-type"),
    pytest.param(["steps=0"], "steps", id="steps-zero"),
    pytest.param(["batch_size=-4"], "batch_size", id="batch-negative"),
    pytest.param(["grad_accum=0"], "grad_accum", id="grad-accum-zero"),
    pytest.param(["keep_checkpoints=0"], "keep_checkpoints", id="keep-zero"),
    pytest.param(["lr=-1"], "lr", id="lr-negative"),
    pytest.param(["lr=nan"], "lr", id="lr-nan"),
    pytest.param(["warmup_steps=-1"], "warmup_steps", id="warmup-negative"),
    pytest.param(["adam_b1=1.5"], "adam_b1", id="beta-out-of-range"),
    pytest.param(["seq_len=1"], "seq_len", id="seq-len-one"),
    pytest.param(["seq_len=100"], "seq_len 100", id="seq-len-too-long"),
    pytest.param(["nan_steps=3"], "nan_steps", id="list-setting-scalar"),
    pytest.param(["model=3"], "model", id="model-not-a-table"),
    pytest.param(['model.dim="big"'], "dim", id="model-wrong-type"),
    pytest.param(["model.n_layers=0"], "n_layers", id="model-zero-layers"),
    pytest.param(['model.param_dtype="bfloat16"'], "param_dtype", id="model-bf16-master"),
    pytest.param(['preset="v9"'], "'v9'", id="unknown-preset"),
    pytest.param(['data="/nonexistent/corpus.txt"'], "/nonexistent/corpus.txt", id="data-missing"),
    pytest.param(['data="{empty_dir}"'], "empty_dir", id="data-empty-dir"),
    pytest.param(['data="{garbage.bin.txt}"'], "garbage.bin.txt", id="data-binary-garbage"),
    pytest.param(['data="{garbage.jsonl}"'], "garbage.jsonl:2", id="jsonl-garbage-line"),
    pytest.param(['data="{binary.jsonl}"'], "binary.jsonl:1", id="jsonl-binary"),
    pytest.param(['data="{number.jsonl}"'], "number.jsonl:1", id="jsonl-text-not-string"),
    pytest.param(['data="{notext.jsonl}"'], "notext.jsonl:1", id="jsonl-no-text-field"),
    pytest.param(['data="{tiny.txt}"'], "tiny.txt", id="data-too-small"),
    pytest.param(['tokenizer="/nonexistent/tokenizer.json"'], "/nonexistent/tokenizer.json", id="tokenizer-missing"),
    pytest.param(['tokenizer="{bad_tokenizer.json}"'], "bad_tokenizer.json", id="tokenizer-corrupt"),
    pytest.param(["model.vocab_size=200"], "vocab_size", id="tokenizer-larger-than-vocab"),
    pytest.param(['run_dir="{a_file}/run"'], "run_dir", id="run-dir-unwritable"),
    pytest.param(['run_dir="{a_file}"'], "run_dir", id="run-dir-is-a-file"),
    pytest.param(['run_dir="{foreign_dir}"'], "--overwrite", id="run-dir-not-ours"),
    pytest.param(['run_dir="{old_run}"', "--no-resume"], "already holds checkpoints", id="no-resume-over-a-run"),
    pytest.param(['metrics_file="{a_file}/m.jsonl"'], "metrics_file", id="metrics-file-unwritable"),
    pytest.param(['mesh="fsdp=abc"'], "fsdp", id="mesh-non-integer"),
    pytest.param(['mesh="bogus=2"'], "bogus", id="mesh-unknown-axis"),
    pytest.param(['mesh="fsdp=16"'], "16 devices", id="mesh-too-many-devices"),
    pytest.param(['rules="nope"'], "nope", id="rules-unknown"),
    pytest.param(["num_devices=99"], "num_devices", id="num-devices-too-many"),
    pytest.param(["--config", "/nonexistent.toml"], "/nonexistent.toml", id="config-missing"),
    pytest.param(["--config", "{bad.toml}"], "bad.toml", id="config-bad-toml"),
    pytest.param(["--batch-mb", "-1"], "--batch-mb", id="unknown-flag"),
    pytest.param(["--coordinator", "localhost:1234"], "num_processes", id="multihost-incomplete"),
]


@pytest.mark.parametrize("extra,culprit", CASES)
def test_bad_input_is_one_clear_line_before_any_compile(tmp_path, corpus, capsys, monkeypatch, extra, culprit):
    paths = make_inputs(tmp_path)
    run_dir = str(tmp_path / "run")
    for name, path in paths.items():
        extra = [a.replace("{" + name + "}", path) for a in extra]
    args = small_overrides(run_dir, corpus, compile_cache=str(tmp_path / "xla_cache")) + extra
    before = {k: v for k, v in tree_state(tmp_path).items() if not k.startswith(run_dir + os.sep)}

    def no_compile(*a, **k):
        raise AssertionError("compiled before validating the inputs")

    monkeypatch.setattr(jax.stages.Lowered, "compile", no_compile)
    try:
        rc = train.main(args)
    except SystemExit as e:  # argparse's refusals
        rc = e.code
    out, err = capsys.readouterr()
    lines = [s for s in err.splitlines() if s.strip()]
    assert rc not in (0, None), (out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert culprit in lines[0], lines[0]
    assert "Traceback" not in out + err
    after = {k: v for k, v in tree_state(tmp_path).items() if not k.startswith(run_dir + os.sep)}
    assert after == before, sorted(set(after.items()) ^ set(before.items()))


def test_a_foreign_run_dir_is_used_with_overwrite_and_nothing_in_it_is_deleted(tmp_path, corpus, monkeypatch):
    """--overwrite passes the run_dir check; the run gets as far as compiling (stopped there)."""
    paths = make_inputs(tmp_path)

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr(jax.stages.Lowered, "compile", stop)
    with pytest.raises(Stop):
        train.main(small_overrides(paths["foreign_dir"], corpus, compile_cache="") + ["--overwrite"])
    assert open(os.path.join(paths["foreign_dir"], "notes.txt")).read() == "precious"
    assert os.path.exists(os.path.join(paths["foreign_dir"], "config.json"))
