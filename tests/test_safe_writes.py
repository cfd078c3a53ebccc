"""Writers never destroy what a user owns (issue 15): every writer refuses a non-empty target that is
not its own resumable output, `--overwrite` replaces it, and an interrupted write leaves nothing
half-written under the final name. Also: a train.py run directory -> infer.py --prompt TEXT through a
relative path prints text, and `convert --from RUN_DIR` exports the run.

The helpers here (`snapshot`, `write_train_run`, fixtures' builders) are shared with
tests/test_bad_inputs_io.py."""

import hashlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v4jax import V4Config, Transformer, parity

from v4jax.io import convert
from v4jax.io.checkpoint import CheckpointError, hf_tensors, save_hf
from v4jax.io.restore import load_hf

# --------------------------------------------------------------------------------------------------
# shared helpers


def snapshot(root, exclude=()) -> dict[str, str]:
    """{relative path: sha256} of every file under root (and each directory, as 'dir/'), skipping the
    top-level names in `exclude`: what must not change when a command is refused."""
    out = {}
    root = str(root)
    for d, dirs, files in os.walk(root):
        rel = os.path.relpath(d, root)
        if rel != "." and rel.split(os.sep)[0] in exclude:
            dirs[:] = []
            continue
        for n in dirs:
            if rel == "." and n in exclude:
                continue
            out[os.path.normpath(os.path.join(rel, n)) + "/"] = ""
        for n in files:
            if rel == "." and n in exclude:
                continue
            with open(os.path.join(d, n), "rb") as f:
                out[os.path.normpath(os.path.join(rel, n))] = hashlib.sha256(f.read()).hexdigest()
    return out


def tiny_model(seed=0, **kw):
    return Transformer(V4Config.preset("tiny", **kw), rngs=nnx.Rngs(seed))


def write_train_run(run, model, step=7, tokenizer="byte"):
    """A train.py run directory as train.py writes it: config.json {"train": {...}, "model": {...}}
    (train.tokenizer as given) and checkpoints/<step>/ saved by v4jax.train.checkpointer.Checkpointer."""
    from v4jax.model.layers import Buffer
    from v4jax.train.optim import flat_params
    from v4jax.train.data import IteratorState
    from v4jax.train.checkpointer import Checkpointer

    _, p, b, _ = nnx.split(model, nnx.Param, Buffer, ...)
    os.makedirs(run, exist_ok=True)
    cfg_dict = {k: (v.value if hasattr(v, "value") else
                    ([getattr(x, "value", x) for x in v] if isinstance(v, tuple) else v))
                for k, v in {**vars(model.cfg), **vars(model.options)}.items()}  # train.py's one `model` table
    train = {} if tokenizer is None else {"tokenizer": tokenizer}
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump({"train": train, "model": cfg_dict}, f)
    params = flat_params(p)
    state = {"params": params, "buffers": flat_params(b), "opt": {"mu": jax.tree.map(jnp.zeros_like, params)},
             "step": jnp.asarray(step, jnp.int32), "rng": jnp.zeros((2,), jnp.uint32)}
    ck = Checkpointer(os.path.join(run, "checkpoints"), keep=2, use_async=False)
    ck.save(state, IteratorState(), wait=True)
    ck.close()
    return str(run)


@pytest.fixture(scope="module")
def model():
    return tiny_model(0, n_mtp_layers=0)


@pytest.fixture(scope="module")
def hf_ckpt(model, tmp_path_factory):
    """A user's HF checkpoint (plus a file of theirs that is no checkpoint file)."""
    d = tmp_path_factory.mktemp("user") / "hf"
    save_hf(model, d)
    (d / "NOTES.txt").write_text("mine\n")
    return d


@pytest.fixture(scope="module")
def train_run(model, tmp_path_factory):
    return write_train_run(tmp_path_factory.mktemp("runs") / "run", model)


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------------------------------
# refusing, and --overwrite


@pytest.mark.parametrize("fmt", ["hf", "orbax", "official"])
def test_convert_into_an_existing_hf_checkpoint_is_refused_and_leaves_it_byte_identical(fmt, hf_ckpt, tmp_path,
                                                                                      capsys):
    dst = tmp_path / "dst"
    shutil.copytree(hf_ckpt, dst)
    before = snapshot(tmp_path)
    rc = convert.main(["--from", str(hf_ckpt), "--to", str(dst), "--format", fmt, "--no-progress"])
    assert rc != 0
    line = one_line_error(capsys.readouterr().err)
    assert str(dst) in line and "--overwrite" in line
    assert snapshot(tmp_path) == before


def test_convert_with_overwrite_replaces_the_checkpoint_whole_only_when_done(hf_ckpt, model, tmp_path, capsys):
    dst = tmp_path / "dst"
    shutil.copytree(hf_ckpt, dst)
    assert convert.main(["--from", str(hf_ckpt), "--to", str(dst), "--format", "hf", "--no-progress",
                         "--overwrite"]) == 0
    assert sorted(os.listdir(dst)) == ["config.json", "conversion.json", "model-00001-of-00001.safetensors",
                                       "model.safetensors.index.json"]
    assert not os.path.exists(f"{dst}.partial")
    loaded, _ = load_hf(dst)
    for k, a in hf_tensors(loaded).items():  # fp32 stays fp32 (default --dtype keeps the source's)
        b = hf_tensors(model)[k]
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    # a second run is a no-op on its own finished output, not a refusal
    assert convert.main(["--from", str(hf_ckpt), "--to", str(dst), "--format", "hf", "--no-progress"]) == 0


def test_each_writer_refuses_a_non_empty_foreign_target(model, hf_ckpt, tmp_path, capsys):
    import infer

    target = tmp_path / "mine"
    target.mkdir()
    (target / "thesis.tex").write_text("irreplaceable\n")
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=r"mine is not empty; pass overwrite=True"):
        save_hf(model, target)
    assert infer.main(["--write-random-checkpoint", str(target)]) == 2
    assert "--overwrite" in one_line_error(capsys.readouterr().err)
    ids = tmp_path / "ids.npy"
    np.save(ids, np.array([[1, 2, 3]]))
    before = snapshot(tmp_path)
    assert parity.main(["dump", "--checkpoint", str(hf_ckpt), "--input-ids", str(ids), "--out", str(target)]) == 2
    assert "--overwrite" in one_line_error(capsys.readouterr().err)
    assert convert.main(["--from", str(hf_ckpt), "--to", str(target), "--no-progress"]) == 1
    assert "--overwrite" in one_line_error(capsys.readouterr().err)
    assert snapshot(tmp_path) == before
    # a `.partial` directory the user made is never taken for v4jax's staging directory
    (tmp_path / "new.partial").mkdir()
    (tmp_path / "new.partial" / "x").write_text("x")
    before = snapshot(tmp_path)
    assert convert.main(["--from", str(hf_ckpt), "--to", str(tmp_path / "new"), "--no-progress"]) == 1
    assert "was not made by v4jax" in one_line_error(capsys.readouterr().err)
    assert snapshot(tmp_path) == before


def test_writers_replace_with_overwrite(model, hf_ckpt, tmp_path, capsys):
    import infer

    target = tmp_path / "t"
    target.mkdir()
    (target / "old.txt").write_text("old")
    save_hf(model, target, overwrite=True)
    assert not (target / "old.txt").exists() and (target / "config.json").exists()
    assert infer.main(["--write-random-checkpoint", str(target), "--overwrite"]) == 0
    ids = tmp_path / "ids.npy"
    np.save(ids, np.array([[1, 2, 3]]))
    out = tmp_path / "dump"
    for extra in ([], ["--overwrite"]):  # a second dump into the same folder needs --overwrite
        assert parity.main(["dump", "--checkpoint", str(hf_ckpt), "--input-ids", str(ids), "--out", str(out),
                            *extra]) == 0
    assert sorted(os.listdir(out)) == ["final_hidden.npy", "hidden_states.npy", "logits.npy"]
    assert parity.main(["dump", "--checkpoint", str(hf_ckpt), "--input-ids", str(ids), "--out", str(out)]) == 2
    capsys.readouterr()


# --------------------------------------------------------------------------------------------------
# interrupted writes


class _Crash(Exception):
    pass


def _crash_after(n):
    def hook(i):
        if i == n:
            raise _Crash
    return hook


@pytest.mark.parametrize("fmt", ["orbax", "hf", "official"])
def test_interrupted_convert_leaves_no_half_written_target_and_an_old_one_intact(fmt, hf_ckpt, tmp_path):
    fresh, existing = tmp_path / "fresh", tmp_path / "existing"
    shutil.copytree(hf_ckpt, existing)
    before = snapshot(existing)
    for dst, overwrite in ((fresh, False), (existing, True)):
        with pytest.raises(_Crash):
            convert.convert(hf_ckpt, dst, fmt=fmt, progress=False, overwrite=overwrite, batch_bytes=64 << 10,
                            after_batch=_crash_after(3))
    assert not fresh.exists()
    assert snapshot(existing) == before
    if fmt == "orbax":  # its own partial output resumes and only then takes the final name
        convert.convert(hf_ckpt, fresh, progress=False, batch_bytes=64 << 10)
        assert json.load(open(fresh / "manifest.json"))["complete"] and not os.path.exists(f"{fresh}.partial")


def test_interrupted_save_hf_and_parity_dump_leave_the_target_as_it_was(model, hf_ckpt, tmp_path, monkeypatch):
    from v4jax.io import checkpoint

    target = tmp_path / "t"
    shutil.copytree(hf_ckpt, target)
    before = snapshot(tmp_path)
    real = checkpoint.write_sharded

    def write_then_crash(directory, tensors, max_shard_bytes):
        real(directory, tensors, max_shard_bytes)
        raise _Crash

    monkeypatch.setattr(checkpoint, "write_sharded", write_then_crash)
    with pytest.raises(_Crash):
        save_hf(model, target, overwrite=True)
    with pytest.raises(_Crash):
        save_hf(model, tmp_path / "new")
    monkeypatch.undo()
    assert snapshot(tmp_path) == before  # the partial output is gone too

    ids = tmp_path / "ids.npy"
    np.save(ids, np.array([[1, 2, 3]]))
    before = snapshot(tmp_path)
    calls = []
    real_save = np.save

    def save_one_then_crash(path, a):
        calls.append(path)
        if len(calls) == 2:
            raise _Crash
        real_save(path, a)

    monkeypatch.setattr(np, "save", save_one_then_crash)
    with pytest.raises(_Crash):
        parity.dump(str(hf_ckpt), str(ids), str(tmp_path / "out"))
    monkeypatch.undo()
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------------------------------
# train.py run -> infer.py / convert / load_model through relative paths


@pytest.mark.slow
def test_train_run_to_infer_with_a_relative_path_prints_text(train_run, tmp_path, monkeypatch, capsys):
    import infer
    from v4jax.train.data import ByteTokenizer
    from v4jax.io.restore import load_model

    monkeypatch.chdir(os.path.dirname(train_run))
    rel = os.path.basename(train_run)
    assert load_model(rel).step == 7  # Orbax needs absolute paths; load_model makes them so
    assert infer.main(["--checkpoint", rel, "--prompt", "def ", "--max-new-tokens", "6", "--stop"]) == 0
    io = capsys.readouterr()
    assert f"loaded train_run checkpoint {rel}" in io.err
    text = io.out.rstrip("\n")
    # the byte tokenizer named by the run's config.json decoded the output (ids past its 258 are
    # dropped, invalid UTF-8 becomes replacement characters): text, not space-separated ids
    assert text and not text.replace(" ", "").isdigit()
    assert len(ByteTokenizer().encode(text)) <= 6 * 3


def test_convert_exports_a_train_run_from_a_relative_path(train_run, model, tmp_path, monkeypatch, capsys):
    shutil.copytree(train_run, tmp_path / "run")
    (tmp_path / "run" / "tokenizer.json").write_text('{"tokenizer": "of the run"}')
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "export"
    assert convert.main(["--from", "run", "--to", "export", "--format", "hf", "--no-progress"]) == 0
    assert (out / "tokenizer.json").read_text() == '{"tokenizer": "of the run"}'  # travels with the weights
    loaded, info = load_hf(out)
    assert not info.mtp_loaded
    want = hf_tensors(model)
    for k, a in hf_tensors(loaded).items():
        assert a.dtype == want[k].dtype  # a float32 run exports float32
        np.testing.assert_array_equal(a, want[k])


def test_convert_falls_back_to_the_previous_step_when_the_newest_is_corrupt(model, tmp_path, capsys):
    run = write_train_run(tmp_path / "run", model, step=7)
    write_train_run(run, tiny_model(5, n_mtp_layers=0), step=9)
    meta = tmp_path / "run" / "checkpoints" / "9" / "meta" / "metadata"
    d = json.loads(meta.read_text())
    d["fingerprint"]["embed.embedding"] *= 1.5  # what a silently corrupted tensor looks like
    meta.write_text(json.dumps(d))
    convert.convert(run, tmp_path / "out", fmt="hf", progress=False)
    assert "exporting step 7" in capsys.readouterr().err
    loaded, _ = load_hf(tmp_path / "out")
    want = hf_tensors(model)
    for k, a in hf_tensors(loaded).items():
        np.testing.assert_array_equal(a, want[k])


def test_infer_finds_the_tokenizer_a_train_run_names(train_run, tmp_path, monkeypatch):
    import infer

    run = tmp_path / "run"
    shutil.copytree(train_run, run)
    monkeypatch.chdir(tmp_path)
    assert infer.find_tokenizer("run", None) == "byte"  # train.tokenizer "byte"
    cfg = json.loads((run / "config.json").read_text())
    cfg["train"]["tokenizer"] = "tok/tokenizer.json"  # a path relative to where train.py ran...
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "tok").mkdir()
    (run / "tok" / "tokenizer.json").write_text("{}")
    assert infer.find_tokenizer("run", None) == os.path.join("run", "tok/tokenizer.json")  # ...or to the run
    (run / "tokenizer.json").write_text("{}")  # one saved with the run comes first
    assert infer.find_tokenizer("run", None) == os.path.join("run", "tokenizer.json")
    assert infer.find_tokenizer("run", "byte") == "byte"  # and --tokenizer before everything
