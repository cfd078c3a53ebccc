"""Bad inputs to the writers, loaders and commands (issue 15): each row builds one bad input in its
own folder (the working directory, so relative paths are exercised) and checks that

  (a) the command exits non-zero (or `load_model` raises CheckpointError),
  (b) the error is ONE line, no traceback, naming the culprit file, field or flag,
  (c) nothing on disk changed: every input, and the refused target itself (bytes snapshot).

The CLIs run in-process (`main(argv)`); every row fails before any model is compiled."""

import json
import os
import shutil
from typing import Callable

import numpy as np
import pytest

import infer
from v4jax import parity
from v4jax.io import convert
from v4jax.io.checkpoint import CheckpointError
from v4jax.io.restore import load_model
from v4jax.io.tensorfile import TensorFile, write_tensors

from test_safe_writes import snapshot, tiny_model, write_train_run
from v4jax.io.checkpoint import save_hf


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Small inputs every row copies from: an HF checkpoint and a train.py run (byte tokenizer)."""
    root = tmp_path_factory.mktemp("inputs")
    model = tiny_model(3, n_mtp_layers=0)
    save_hf(model, root / "hf")
    write_train_run(root / "run", model, step=5)
    return root


def copy(inputs, name, t, as_name=None):
    dst = t / (as_name or name)
    shutil.copytree(inputs / name, dst)
    return dst


def edit_json(path, edit):
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


def write_garbage(path, data=b"\x93NUMPY\x01\x00garbage"):
    path.write_bytes(data)
    return path


def reshape_tensor(ckpt, key):
    """Rewrite the checkpoint's single safetensors file with `key` one row short."""
    path = ckpt / "model.safetensors"
    tf = TensorFile(path)
    tensors = {k: np.array(tf[k]) for k in tf.keys()}
    del tf
    tensors[key] = tensors[key][:-1]
    write_tensors(path, tensors)


CONVERT = ["--no-progress"]


# each row: (tool, setup(t, inputs) -> argv or callable, substrings the error line must hold)
def _rows() -> dict[str, tuple[str, Callable, tuple[str, ...]]]:
    rows = {}

    def row(name, tool, *needles):
        def deco(fn):
            rows[name] = (tool, fn, needles)
            return fn
        return deco

    # ---------------------------------------------------------------- convert
    @row("convert-to-under-a-file", "convert", "cannot write output afile/out", "afile is not a directory")
    def _(t, inp):
        (t / "afile").write_text("x")
        return ["--from", str(inp / "hf"), "--to", "afile/out", *CONVERT]

    @row("convert-to-is-a-file", "convert", "notes.txt", "not a directory")
    def _(t, inp):
        (t / "notes.txt").write_text("mine")
        return ["--from", str(inp / "hf"), "--to", "notes.txt", *CONVERT]

    @row("convert-into-existing-hf-checkpoint", "convert", "user_ckpt", "--overwrite")
    def _(t, inp):
        copy(inp, "hf", t, "user_ckpt")
        return ["--from", str(inp / "hf"), "--to", "user_ckpt", "--format", "hf", *CONVERT]

    @row("convert-orbax-into-existing-hf-checkpoint", "convert", "user_ckpt", "--overwrite")
    def _(t, inp):
        copy(inp, "hf", t, "user_ckpt")
        return ["--from", str(inp / "hf"), "--to", "user_ckpt", *CONVERT]

    @row("convert-max-shard-gb-0", "convert", "--max-shard-gb")
    def _(t, inp):
        return ["--from", str(inp / "hf"), "--to", "out", "--format", "hf", "--max-shard-gb", "0", *CONVERT]

    @row("convert-batch-mb-negative", "convert", "--batch-mb")
    def _(t, inp):
        return ["--from", str(inp / "hf"), "--to", "out", "--batch-mb", "-1", *CONVERT]

    @row("convert-wrong-shaped-tensor", "convert", "layers.1.attn.wq_a.weight", "has shape", "config.json")
    def _(t, inp):
        reshape_tensor(copy(inp, "hf", t), "model.layers.1.attn.wq_a.weight")
        return ["--from", "hf", "--to", "out", *CONVERT]

    @row("convert-broken-config-json", "convert", "hf/config.json", "JSON")
    def _(t, inp):
        (copy(inp, "hf", t) / "config.json").write_text('{"hidden_size": 64,')
        return ["--from", "hf", "--to", "out", *CONVERT]

    @row("convert-wrong-typed-config-field", "convert", "hf/config.json", "'hidden_size'")
    def _(t, inp):
        edit_json(copy(inp, "hf", t) / "config.json", lambda d: d.update(hidden_size="64"))
        return ["--from", "hf", "--to", "out", "--format", "hf", *CONVERT]

    @row("convert-missing-source", "convert", "source nope")
    def _(t, inp):
        return ["--from", "nope", "--to", "out", *CONVERT]

    @row("convert-target-inside-source", "convert", "inside the source")
    def _(t, inp):
        copy(inp, "hf", t)
        return ["--from", "hf", "--to", "hf/export", *CONVERT]

    @row("convert-foreign-partial-dir", "convert", "out.partial", "not made by v4jax")
    def _(t, inp):
        (t / "out.partial").mkdir()
        (t / "out.partial" / "data.bin").write_text("mine")
        return ["--from", str(inp / "hf"), "--to", "out", *CONVERT]

    @row("convert-truncated-safetensors", "convert", "model.safetensors", "truncated")
    def _(t, inp):
        p = copy(inp, "hf", t) / "model.safetensors"
        with open(p, "r+b") as f:
            f.truncate(os.path.getsize(p) - 100)
        return ["--from", "hf", "--to", "out", *CONVERT]

    @row("convert-train-run-with-broken-model-config", "convert", "run/config.json", "dim")
    def _(t, inp):
        edit_json(copy(inp, "run", t) / "config.json", lambda d: d["model"].update(dim="wide"))
        return ["--from", "run", "--to", "out", "--format", "hf", *CONVERT]

    # ---------------------------------------------------------------- infer
    @row("infer-missing-relative-checkpoint", "infer", "checkpoint nope does not exist")
    def _(t, inp):
        return ["--checkpoint", "nope", "--prompt", "x"]

    @row("infer-broken-config-json", "infer", "hf/config.json", "JSON")
    def _(t, inp):
        (copy(inp, "hf", t) / "config.json").write_text("{")
        return ["--checkpoint", "hf", "--prompt", "x", "--tokenizer", "byte"]

    @row("infer-wrong-typed-config-field", "infer", "hf/config.json", "'num_hidden_layers'")
    def _(t, inp):
        edit_json(copy(inp, "hf", t) / "config.json", lambda d: d.update(num_hidden_layers="two"))
        return ["--checkpoint", "hf", "--prompt", "x", "--tokenizer", "byte"]

    @row("infer-corrupt-npy-prompt", "infer", "ids.npy")
    def _(t, inp):
        write_garbage(t / "ids.npy")
        return ["--checkpoint", str(inp / "hf"), "--prompt-ids", "ids.npy"]

    @row("infer-missing-tokenizer-flag", "infer", "--tokenizer nope.json")
    def _(t, inp):
        return ["--checkpoint", str(inp / "hf"), "--prompt", "x", "--tokenizer", "nope.json"]

    @row("infer-broken-tokenizer-json", "infer", "bad.json")
    def _(t, inp):
        (t / "bad.json").write_text("{")
        return ["--checkpoint", str(inp / "hf"), "--prompt", "x", "--tokenizer", "bad.json"]

    @row("infer-prompt-without-tokenizer", "infer", "--prompt needs a tokenizer", "--tokenizer byte")
    def _(t, inp):
        return ["--checkpoint", str(inp / "hf"), "--prompt", "x"]

    @row("infer-mesh-without-rules", "infer", "--mesh and --rules go together")
    def _(t, inp):
        return ["--checkpoint", str(inp / "hf"), "--prompt-ids", "1 2 3", "--mesh", "fsdp=2"]

    @row("infer-mesh-larger-than-the-devices", "infer", "mesh 'fsdp=64' asks for 64 devices")
    def _(t, inp):
        (t / "ids.txt").write_text("1 2 3\n")
        return ["--checkpoint", str(inp / "hf"), "--prompt-ids", "ids.txt", "--mesh", "fsdp=64", "--rules", "fsdp"]

    @row("infer-missing-prompts-file", "infer", "cannot read prompts from gone.txt")
    def _(t, inp):
        return ["--checkpoint", str(inp / "hf"), "--prompts-file", "gone.txt", "--tokenizer", "byte"]

    @row("infer-run-names-a-missing-tokenizer", "infer", "run/config.json", "gone/tok.json")
    def _(t, inp):
        edit_json(copy(inp, "run", t) / "config.json", lambda d: d["train"].update(tokenizer="gone/tok.json"))
        return ["--checkpoint", "run", "--prompt", "x"]

    @row("infer-write-random-into-non-empty-dir", "infer", "mine", "--overwrite")
    def _(t, inp):
        (t / "mine").mkdir()
        (t / "mine" / "a.txt").write_text("a")
        return ["--write-random-checkpoint", "mine"]

    @row("infer-write-random-under-a-file", "infer", "cannot write output afile/ckpt", "afile is not a directory")
    def _(t, inp):
        (t / "afile").write_text("x")
        return ["--write-random-checkpoint", "afile/ckpt"]

    # ---------------------------------------------------------------- parity
    @row("parity-dump-train-run-without-config", "parity", "run", "no config.json")
    def _(t, inp):
        os.remove(copy(inp, "run", t) / "config.json")
        np.save(t / "ids.npy", np.array([[1, 2]]))
        return ["dump", "--checkpoint", "run", "--input-ids", "ids.npy", "--out", "out"]

    @row("parity-dump-not-a-checkpoint", "parity", "junk", "not a checkpoint v4jax reads")
    def _(t, inp):
        (t / "junk").mkdir()
        (t / "junk" / "README").write_text("x")
        np.save(t / "ids.npy", np.array([[1, 2]]))
        return ["dump", "--checkpoint", "junk", "--input-ids", "ids.npy", "--out", "out"]

    @row("parity-dump-out-not-empty", "parity", "mine", "--overwrite")
    def _(t, inp):
        (t / "mine").mkdir()
        (t / "mine" / "logits.npy").write_text("theirs")
        np.save(t / "ids.npy", np.array([[1, 2]]))
        return ["dump", "--checkpoint", str(inp / "hf"), "--input-ids", "ids.npy", "--out", "mine"]

    @row("parity-dump-corrupt-ids", "parity", "ids.npy")
    def _(t, inp):
        write_garbage(t / "ids.npy")
        return ["dump", "--checkpoint", str(inp / "hf"), "--input-ids", "ids.npy", "--out", "out"]

    @row("parity-compare-array-on-one-side-only", "parity-table", "mtp_logits", "ONLY IN a")
    def _(t, inp):
        for d in ("a", "b"):
            (t / d).mkdir()
            np.save(t / d / "logits.npy", np.ones((1, 2, 3), np.float32))
        np.save(t / "a" / "mtp_logits.npy", np.ones((1, 1, 3), np.float32))
        return ["compare", "a", "b"]

    @row("parity-compare-corrupt-npy", "parity", "b/logits.npy")
    def _(t, inp):
        for d in ("a", "b"):
            (t / d).mkdir()
        np.save(t / "a" / "logits.npy", np.ones((1, 2, 3), np.float32))
        write_garbage(t / "b" / "logits.npy")
        return ["compare", "a", "b"]

    # ---------------------------------------------------------------- load_model
    @row("load-model-missing-relative-path", "load_model", "checkpoint runs/tiny does not exist")
    def _(t, inp):
        return lambda: load_model("runs/tiny")

    @row("load-model-wrong-typed-config-field", "load_model", "hf/config.json", "'num_attention_heads'")
    def _(t, inp):
        edit_json(copy(inp, "hf", t) / "config.json", lambda d: d.update(num_attention_heads=2.5))
        return lambda: load_model("hf")

    @row("load-model-run-missing-step-metadata", "load_model", "checkpoints/5/meta/metadata")
    def _(t, inp):
        os.remove(copy(inp, "run", t) / "checkpoints" / "5" / "meta" / "metadata")
        return lambda: load_model("run")

    @row("load-model-run-unknown-step", "load_model", "no complete checkpoint for step 3")
    def _(t, inp):
        copy(inp, "run", t)
        return lambda: load_model("run", step=3)

    return rows


ROWS = _rows()
MAINS = {"convert": convert.main, "infer": infer.main, "parity": parity.main, "parity-table": parity.main}


@pytest.mark.parametrize("name", list(ROWS))
def test_bad_input_fails_in_one_line_naming_the_culprit_and_changes_nothing(name, inputs, tmp_path, monkeypatch,
                                                                          capsys):
    tool, setup, needles = ROWS[name]
    monkeypatch.chdir(tmp_path)
    call = setup(tmp_path, inputs)
    before, before_inputs = snapshot(tmp_path), snapshot(inputs)
    capsys.readouterr()
    if tool == "load_model":
        with pytest.raises(CheckpointError) as e:
            call()
        line = str(e.value)
        assert "\n" not in line
    else:
        rc = MAINS[tool](call)
        io = capsys.readouterr()
        assert rc != 0
        if tool == "parity-table":  # compare's verdict is its table: one failing row names the array
            assert rc == 1 and not io.err
            bad = [ln for ln in io.out.splitlines() if "ONLY IN" in ln]
            assert len(bad) == 1, io.out
            line = bad[0]
        else:
            lines = [ln for ln in io.err.splitlines() if ln.strip()]
            assert len(lines) == 1 and lines[0].startswith("error: "), io.err
            line = lines[0]
    for needle in needles:
        assert needle in line, line
    assert snapshot(tmp_path) == before and snapshot(inputs) == before_inputs
