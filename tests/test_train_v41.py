"""train.py with a V4.1 preset (architecture.md §12.10): the text backbone trains through the one training
step (CE + balance loss, Muon/AdamW, the selection-bias update per stacked layer), its batch carries the
Engram rows hashed on the host exactly as inference hashes them, runs resume exactly, and the settings the
V4.1 step does not support are refused before anything compiles."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v4jax.config_v41 import V41Config
from v4jax.inference.generate_v41 import engram_rows, engram_state
from v4jax.model.layers import Buffer
from v4jax.model.v41 import V41Transformer
from v4jax.train import losses
from v4jax.train.config import load_config
from v4jax.train.data import ByteTokenizer, DataError, EngramRows, PackedBatches, engram_token_map
from v4jax.train.loop import train
from v4jax.train.metrics import read_metrics
from v4jax.train.optim import flat_params, logical_axes, split_params, unflat_params
from v4jax.train.step import _bias_updates, gate_biases, hyperparams, make_loss, make_setup, make_step

from v41_fixtures import flash_shaped  # noqa: E402  (tests/v41_fixtures.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "train_v41_tiny.toml")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import json as j, random as r
    d = tmp_path_factory.mktemp("data")
    path = d / "corpus.txt"
    path.write_text("".join(open(m.__file__).read() for m in (j.decoder, j.encoder, r))[:40000])
    return path


def overrides(run_dir, data, **kw):
    base = {"seq_len": 32, "batch_size": 4, "steps": 6, "ckpt_every": 3, "log_every": 1, "warmup_steps": 2,
            "decay_steps": 2, "progress": False, "tensorboard": False, "plot": False, "async_checkpoints": False,
            "run_dir": str(run_dir), "data": str(data), "num_devices": 1, "compile_cache": ""}
    base.update(kw)
    return [f"{k}={json.dumps(v)}" for k, v in base.items()]


def test_a_v41_preset_trains_its_text_backbone():
    tc = load_config(CONFIG)
    cfg = tc.model_config()
    assert isinstance(cfg, V41Config) and cfg.n_mtp_layers == 0 and cfg.vision_n_layers == 0
    assert cfg.engram_layer_ids == V41Config.preset("v41-tiny").engram_layer_ids
    with pytest.raises(ValueError, match=r"^model.n_mtp_layers=2: train.py trains the V4.1 text backbone"):
        load_config(CONFIG, ["model.n_mtp_layers=2"]).model_config()
    with pytest.raises(ValueError, match=r"unknown model setting\(s\) \['model.layer_types'\]"):
        load_config(CONFIG, ['model.layer_types=["sliding_attention"]']).model_config()


@pytest.mark.parametrize("override,match", [
    ("document_mask=true", "document_mask=true: the V4.1 model has no packed-document masking yet"),
    ("model.engram_compressed_vocab_size=122",
     r"model.engram_compressed_vocab_size=122 does not fit .* set model.engram_compressed_vocab_size=229"),
])
def test_unsupported_v41_settings_are_refused_before_any_compile(tmp_path, corpus, override, match, monkeypatch):
    tc = load_config(CONFIG, overrides(tmp_path / "run", corpus) + [override])
    monkeypatch.setattr(jax.stages.Lowered, "compile", lambda *a, **k: pytest.fail("compiled before the checks"))
    with pytest.raises(ValueError, match=match):
        train(tc, log=lambda s: None)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_engram_tables_and_gains_are_on_adamw_without_decay():
    cfg = load_config(CONFIG).model_config()
    model = nnx.eval_shape(lambda: V41Transformer(cfg, rngs=nnx.Rngs(0)))
    groups = split_params(logical_axes(nnx.state(model, nnx.Param)))
    engram = {n: g for n, g in groups.items() if ".engram." in n}
    assert len(engram) == 4 * len(cfg.engram_layer_ids)
    for name, g in engram.items():
        want = ("muon", True) if name.endswith("wkv.kernel") else ("adamw", False)
        assert (g.optimizer, g.decay) == want, name


def test_the_training_batches_hash_engram_rows_as_inference_does(corpus):
    """EngramRows' rows for each packed row equal inference's hash of that row as a prompt."""
    cfg = load_config(CONFIG).model_config()
    tok = ByteTokenizer()
    token_map = engram_token_map(tok, cfg.vocab_size)
    tokens = np.concatenate([tok.encode(corpus.read_text()[:3000]), [tok.eos_id]]).astype(np.int32)
    batches = EngramRows(PackedBatches(tokens, 32, 4, grad_accum=2, seed=1), cfg, token_map)
    batch = next(batches)
    assert batch["tokens"].shape == (4, 2, 33) and batch["engram"].shape == (4, 2, 32, 2, 6)
    assert batches.state.batch == 1
    model = nnx.eval_shape(lambda: V41Transformer(cfg, rngs=nnx.Rngs(0)))
    for b in range(4):
        for a in range(2):
            row = batch["tokens"][b, a, :-1][None]
            want, _ = engram_rows(model, engram_state(cfg, token_map, 1), row)
            np.testing.assert_array_equal(batch["engram"][b, a], np.asarray(want)[0])
    # the byte tokenizer's map merges letter case (the release's normaliser): 'A' and 'a' share a row id
    assert token_map[tok.encode("A")[0]] == token_map[tok.encode("a")[0]]


@pytest.mark.parametrize("shape", ["v41-tiny", "flash-shaped"])
@pytest.mark.slow
def test_each_stacked_selection_bias_moves_with_its_own_layers_load(shape):
    """The bias update reaches every layer of every stacked run through `gate_biases`: after one update
    from a load that differs per layer, `V41Transformer.block(i)` holds the bias that layer i's load gives
    (flash-shaped: runs stacked [repeats, count], a scan in a scan)."""
    cfg = load_config(CONFIG).model_config() if shape == "v41-tiny" else flash_shaped().without_dspark()
    model = V41Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params, buffers, rest = nnx.split(model, nnx.Param, Buffer, ...)
    flat = flat_params(buffers)
    E = cfg.n_routed_experts
    load = jnp.asarray(np.random.default_rng(0).permutation(cfg.n_layers * E).reshape(cfg.n_layers, E), jnp.float32)
    new = _bias_updates(flat, load, None, 0.25, gate_biases(cfg))
    updated = nnx.merge(graphdef, params, unflat_params(buffers, new), rest)
    for i in range(cfg.n_layers):
        want = losses.bias_update(jnp.zeros(E), load[i], 0.25)
        np.testing.assert_array_equal(updated.block(i).ffn.gate.bias[...], want, err_msg=f"layer {i}")


def test_the_step_loss_is_cross_entropy_plus_the_balance_and_indexer_terms(corpus):
    tc = load_config(CONFIG, overrides("/tmp/unused", corpus) + ["balance_alpha=0.1", "indexer_loss_weight=0.5"])
    cfg = tc.model_config()
    setup = make_setup(tc, cfg)
    model = V41Transformer(cfg, rngs=nnx.Rngs(0), options=tc.run_options())
    _, p, b, _ = nnx.split(model, nnx.Param, Buffer, ...)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(2, 258, (2, 33)), jnp.int32)
    cols = (cfg.engram_max_ngram_size - 1) * cfg.engram_n_heads
    rows = jnp.asarray(np.stack([rng.integers(0, n, (2, 32, cols)) for n in cfg.engram_num_embeddings], 2), jnp.int32)
    total, (parts, load, _) = make_loss(tc, setup)(flat_params(p), flat_params(b), {"tokens": tokens, "engram": rows},
                                                   hyperparams(tc, setup.schedule, 0))
    out = model(tokens[:, :-1], rows, return_hidden_states=False, return_indexer_traces=True)
    ce = losses.cross_entropy(out.logits, tokens[:, 1:])
    bal = losses.balance_loss(out.routing, cfg.n_activated_experts)
    assert len(out.indexer) == len(cfg.index_source_layers)  # one KL per index source
    kl = sum(losses.indexer_kl_loss(*t) for t in out.indexer)
    assert float(kl) > 0 and float(parts["indexer"]) == pytest.approx(float(kl), rel=1e-6)
    assert float(parts["ce"]) == pytest.approx(float(ce), rel=1e-6)
    assert float(total) == pytest.approx(float(ce + 0.1 * bal + 0.5 * kl), rel=1e-6)
    np.testing.assert_array_equal(load, jnp.sum(out.routing.load, axis=1))
    assert float(jnp.sum(load)) == 2 * 32 * cfg.n_activated_experts * cfg.n_layers


@pytest.mark.slow
def test_train_py_runs_v41_and_resumes_exactly(tmp_path, corpus):
    """6 steps straight vs a resume from the same run's checkpoint at step 3: the same losses step by
    step; the loss falls; every loss term is logged; the Engram token map is saved beside the run."""
    straight = tmp_path / "straight"
    summary = train(load_config(CONFIG, overrides(straight, corpus, lr=1e-2)), log=lambda s: None)
    assert summary["end_step"] == 6 and summary["skipped"] == []
    want = read_metrics(summary["metrics_file"])
    assert want[6]["ce"] < want[1]["ce"] - 0.2, (want[1]["ce"], want[6]["ce"])
    assert all(rec["balance"] > 0 and rec["indexer"] > 0 for rec in want.values())  # every loss term logged
    assert np.load(straight / "engram_token_map.npy").shape == (258,)

    split = tmp_path / "split"  # the run as it was at step 3 (a shorter run would differ: its schedule ends earlier)
    (split / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "3", split / "checkpoints" / "3")
    shutil.copy(straight / "config.json", split / "config.json")
    logs = []
    train(load_config(CONFIG, overrides(split, corpus, lr=1e-2)), log=logs.append)
    assert any("resumed from step 3" in s for s in logs)
    got = read_metrics(str(split / "metrics.jsonl"))
    assert sorted(got) == [4, 5, 6]
    assert [got[s]["loss"] for s in range(4, 7)] == [want[s]["loss"] for s in range(4, 7)]

    # the run loads for inference: load_model gives the V4.1 text backbone with the trained weights, and
    # infer.py generates from it (the run's own tokenizer and Engram token map)
    import infer
    from v4jax.io.checkpoint import CheckpointError
    from v4jax.io.restore import Kind, load_model
    from v4jax.train.checkpointer import Checkpointer
    from v4jax.train.loop import build_mesh
    from v4jax.train.step import step_program

    tc = load_config(CONFIG, overrides(straight, corpus, lr=1e-2))
    loaded = load_model(str(straight))
    assert loaded.kind is Kind.TRAIN_RUN and loaded.step == 6 and isinstance(loaded.model, V41Transformer)
    assert loaded.cfg == tc.model_config()
    program = step_program(tc, tc.model_config(), *build_mesh(tc))
    ck = Checkpointer(str(straight / "checkpoints"), 3, False)
    try:
        state, _ = ck.restore_latest(program.state, lambda s: None)
    finally:
        ck.close()
    weights = flat_params(nnx.state(loaded.model, nnx.Param))
    assert sorted(weights) == sorted(state["params"])
    for k, v in state["params"].items():
        np.testing.assert_array_equal(np.asarray(weights[k]), np.asarray(v), err_msg=k)
    assert infer.main(["--checkpoint", str(straight), "--prompt", "import os", "--max-new-tokens", "4"]) == 0
    with pytest.raises(CheckpointError, match="DSpark stages requested but train.py trains the V4.1 text backbone"):
        load_model(str(straight), mtp=True)  # what infer.py --speculative asks for


@pytest.mark.slow
def test_gradient_accumulation_of_v41_micro_batches_equals_one_big_batch(corpus):
    """grad_accum=2 of 2 rows = one micro-batch of 4 rows (the Engram rows travel with their tokens)."""
    base = overrides("/tmp/unused", corpus, balance_alpha=0.0, clip_norm=0.0)
    cfg = load_config(CONFIG, base).model_config()
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 258, (4, 1, 33)).astype(np.int32)
    cols = (cfg.engram_max_ngram_size - 1) * cfg.engram_n_heads
    rows = np.stack([rng.integers(0, n, (4, 1, 32, cols)) for n in cfg.engram_num_embeddings], 3).astype(np.int32)
    grads = []
    for accum, batch in ((1, {"tokens": tokens, "engram": rows}),
                         (2, {"tokens": tokens.reshape(2, 2, 33), "engram": rows.reshape(2, 2, 32, 2, cols)})):
        tc = load_config(CONFIG, base + [f"grad_accum={accum}", f"batch_size={4 // accum}"])
        setup = make_setup(tc, cfg)
        model = V41Transformer(cfg, rngs=nnx.Rngs(0), options=tc.run_options())
        _, p, b, _ = nnx.split(model, nnx.Param, Buffer, ...)
        p, b = flat_params(p), flat_params(b)
        state = {"params": p, "buffers": b, "opt": setup.tx.init(p), "step": jnp.zeros((), jnp.int32),
                 "rng": jax.random.key_data(jax.random.key(0))}
        _, m = jax.jit(make_step(tc, setup, return_grads=True))(state, jax.tree.map(jnp.asarray, batch),
                                                                hyperparams(tc, setup.schedule, 3))
        grads.append(m["grads"])
    for k in grads[0]:
        np.testing.assert_allclose(grads[1][k], grads[0][k], rtol=2e-4, atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_the_v41_indexer_loss_trains_only_the_indexers_and_the_lm_loss_never_reaches_them():
    """Each index source's KL (architecture.md §12.10): its gradient reaches only indexer parameters (the
    index sources' query and head weights, and the key projections of the KV sources that own the index
    keys), the LM loss's none of them; the traces leave the logits unchanged; a few Adam steps on the KL
    lower it."""
    import optax

    cfg = load_config(CONFIG).model_config()
    model = V41Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(2, 258, (2, 41)), jnp.int32)
    cols = (cfg.engram_max_ngram_size - 1) * cfg.engram_n_heads
    rows = jnp.asarray(np.stack([rng.integers(0, n, (2, 40, cols)) for n in cfg.engram_num_embeddings], 2), jnp.int32)

    def parts(p):
        out = nnx.merge(graphdef, p, rest)(tokens[:, :-1], rows, return_hidden_states=False, return_indexer_traces=True)
        return sum(losses.indexer_kl_loss(*t) for t in out.indexer), losses.cross_entropy(out.logits, tokens[:, 1:])

    fn = jax.jit(lambda p: (jax.value_and_grad(lambda q: parts(q)[0])(p), jax.value_and_grad(lambda q: parts(q)[1])(p)))
    (kl0, kl_tree), (_, lm_tree) = fn(params)
    kl_grad, lm_grad = flat_params(kl_tree), flat_params(lm_tree)
    indexer = sorted(k for k in kl_grad if ".indexer." in k)
    owners = [k for k in indexer if k.endswith("indexer.wk.kernel")]
    assert len(owners) == len(cfg.kv_source_layers)  # the key projections learn from the KL of their group
    for k, g in kl_grad.items():
        if k in indexer:
            assert np.abs(g).sum() > 0, k
        else:
            assert not np.any(g), k  # exactly zero: detached inputs, a target without gradient
    for k in indexer:
        assert not np.any(lm_grad[k]), k  # top-k ids carry no gradient
    out = nnx.merge(graphdef, params, rest)(tokens[:, :-1], rows, return_indexer_traces=True)
    plain = nnx.merge(graphdef, params, rest)(tokens[:, :-1], rows)
    assert plain.indexer is None
    np.testing.assert_array_equal(np.asarray(plain.logits), np.asarray(out.logits))
    for layer, t in zip(cfg.index_source_layers, out.indexer):  # mass: a probability per head, summed over heads
        mass = np.asarray(t.attention_mass)
        assert np.all(mass >= 0) and np.all(mass.sum(-1) <= cfg.n_heads + 1e-4) and np.all(mass[~np.asarray(t.valid)] == 0)
        visible = (np.arange(40) + 1) // cfg.ratio(layer)  # entries a query sees; the source picks min(k, visible)
        if layer <= cfg.candidate_source_layer:
            want = np.minimum(t.valid.shape[-1], visible)
            np.testing.assert_array_equal(np.asarray(t.valid).sum(-1), np.broadcast_to(want, (2, 40)), err_msg=str(layer))

    tx = optax.adam(3e-3)
    opt = tx.init(params)
    kls, g = [float(kl0)], kl_tree
    for _ in range(5):
        updates, opt = tx.update(g, opt, params)
        params = optax.apply_updates(params, updates)
        (kl, g), _ = fn(params)
        kls.append(float(kl))
    assert kls[-1] < 0.9 * kls[0], kls
