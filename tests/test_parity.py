"""Number-for-number parity with transformers' DeepseekV4ForCausalLM (fp32), through HF checkpoints.

Every parameter of the peer is random (sinks, position biases, mHC base/scale, norm weights, selection
bias and hash table included). The seeds were chosen so that no top-k boundary (router or indexer)
is a near-tie, and each test checks that margin: a near-tie lets any two implementations disagree.
Exact ties (the indexer's ReLU zeros) are broken lowest-index-first on both sides.
"""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from v4jax import parity, peer

from v4jax.io import restore
from v4jax.config import V4Config

TOL = 1e-5
MARGIN = 1e-5

CASES = {  # name -> (config, seed); tiny-b runs with a small SwiGLU limit so both clamps fire
    "tiny": (lambda: V4Config.preset("tiny"), 0),
    "tiny-b": (lambda: V4Config.preset("tiny-b", swiglu_limit=0.5), 0),
}


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@functools.lru_cache(maxsize=None)
def setup(case: str, tmp_root: str):
    make, seed = CASES[case]
    cfg = make()
    torch_model = peer.build_peer(cfg, seed)
    directory = f"{tmp_root}/{case}"
    peer.save_peer(torch_model, directory)
    model, info = restore.load_hf(directory)
    return cfg, torch_model, model, directory


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("parity"))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("T", [64, 67, 5])  # whole windows; trailing partial windows; no entries yet
def test_logits_and_every_layer_match_transformers_fp32(case, T, tmp_root):
    cfg, torch_model, model, _ = setup(case, tmp_root)
    ids = np.random.default_rng(T).integers(0, cfg.vocab_size, (2, T))
    ref = peer.run_peer(torch_model, cfg, ids)
    assert ref.router_margin > MARGIN and ref.indexer_margin > MARGIN, "near-tie at a top-k boundary"
    out = model(jnp.asarray(ids), return_hidden_states=True)
    assert rel(out.logits, ref.logits) <= TOL
    assert rel(out.final_hidden, ref.final_hidden) <= TOL
    assert len(out.hidden_states) == cfg.n_layers + 1
    for i, h in enumerate(out.hidden_states):
        assert rel(h, ref.hidden_states[i]) <= TOL, f"streams after layer {i - 1}"


def test_selection_boundary_is_real_in_parity_inputs(tmp_root):
    """At T=64 the tiny CSA layers have 16 entries for top-4: selection really drops entries."""
    cfg, *_ = setup("tiny", tmp_root)
    assert 64 // cfg.csa_ratio > cfg.index_topk and 64 // cfg.hca_ratio >= 2 and 64 > cfg.window_size


def test_parity_tool_dump_and_compare_against_peer_dump(tmp_root, tmp_path, capsys):
    cfg, torch_model, _, directory = setup("tiny", tmp_root)
    ids = np.random.default_rng(7).integers(0, cfg.vocab_size, (2, 40))
    np.save(tmp_path / "ids.npy", ids)
    assert parity.main(["dump", "--checkpoint", directory, "--input-ids", str(tmp_path / "ids.npy"),
                        "--out", str(tmp_path / "ours")]) == 0
    ours = {n: np.load(tmp_path / "ours" / f"{n}.npy") for n in ("logits", "hidden_states", "final_hidden")}
    assert ours["hidden_states"].shape == (cfg.n_layers + 1, 2, 40, cfg.hc_mult, cfg.dim)
    ref = peer.run_peer(torch_model, cfg, ids)
    (tmp_path / "peer").mkdir()
    np.save(tmp_path / "peer" / "logits.npy", ref.logits)
    np.save(tmp_path / "peer" / "hidden_states.npy", ref.hidden_states)
    np.save(tmp_path / "peer" / "final_hidden.npy", ref.final_hidden)
    assert parity.main(["compare", str(tmp_path / "ours"), str(tmp_path / "peer")]) == 0
    np.save(tmp_path / "peer" / "logits.npy", ref.logits * (1 + 1e-3))  # a backend that is off by 0.1%
    assert parity.main(["compare", str(tmp_path / "ours"), str(tmp_path / "peer")]) == 1
    assert "EXCEEDS" in capsys.readouterr().out


def test_parity_tool_rejects_out_of_range_token_ids(tmp_root, tmp_path, capsys):
    cfg, _, _, directory = setup("tiny", tmp_root)
    np.save(tmp_path / "ids.npy", np.array([[1, 2, cfg.vocab_size]]))
    assert parity.main(["dump", "--checkpoint", directory, "--input-ids", str(tmp_path / "ids.npy"),
                        "--out", str(tmp_path / "o")]) == 2
    assert "token ids must lie in" in capsys.readouterr().err
    np.save(tmp_path / "f.npy", np.zeros((1, 3), np.float32))
    assert parity.main(["dump", "--checkpoint", directory, "--input-ids", str(tmp_path / "f.npy"),
                        "--out", str(tmp_path / "o")]) == 2
    assert "must be integers" in capsys.readouterr().err
    np.save(tmp_path / "long.npy", np.zeros((1, cfg.max_seq_len + 1), np.int64))  # the model's own length check
    assert parity.main(["dump", "--checkpoint", directory, "--input-ids", str(tmp_path / "long.npy"),
                        "--out", str(tmp_path / "o")]) == 2
    assert "exceeds max_seq_len" in capsys.readouterr().err


@pytest.mark.slow
def test_bf16_forward_runs_and_stays_near_fp32(tmp_root):
    """bf16 is not held to parity: routing and indexer choices flip near their boundaries. Layer 0
    (SWA + hash routing: no data-dependent choice) must stay within bf16 rounding of fp32."""
    cfg, _, _, directory = setup("tiny", tmp_root)
    model32, _ = restore.load_hf(directory)
    model16, _ = restore.load_hf(directory, dtype="bfloat16", param_dtype="bfloat16")
    ids = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 48)))
    a, b = model32(ids, return_hidden_states=True), model16(ids, return_hidden_states=True)
    assert b.logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(b.logits)))
    assert b.hidden_states[1].dtype == jnp.bfloat16
    assert rel(b.hidden_states[1], np.asarray(a.hidden_states[1])) < 2e-2
    assert rel(b.logits, np.asarray(a.logits)) < 0.2
