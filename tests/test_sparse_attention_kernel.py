"""Pallas sparse attention (pallas_kernels/sparse_attention.py) against v4jax.model.attention.sparse_attention.

Numerical tests run the kernels with interpret=True on CPU: forward and every gradient (q, kv,
compressed, sinks) for SWA, HCA and CSA, with sequence lengths that are not multiples of the
blocks, several head counts and head groups, ragged and all-empty CSA index rows. TPU tests compile
the kernels with the real Mosaic compiler for TPU topologies described by libtpu (no TPU needed).
"""

import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several test processes may load libtpu at once

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sparse_attention import sparse_attention, sparse_attention_reference
from conftest import tpu_devices_or_skip


def make_inputs(mode, *, B=2, T=37, H=4, c=32, window=8, k=6, ratio=4, seed=0, empty_rows=()):
    """fp32 inputs. CSA indices: distinct visible entries, a ragged number per row (some -1 slots),
    rows in `empty_rows` all -1; rows before the first visible entry are all -1 anyway."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, H, c), np.float32)
    kv = rng.standard_normal((B, T, c), np.float32)
    sinks = rng.standard_normal((H,), np.float32)
    compressed = topk_idx = None
    if mode == "swa":
        ratio = 0
    else:
        compressed = rng.standard_normal((B, T // ratio, c), np.float32)
    if mode == "csa":
        topk_idx = np.full((B, T, k), -1, np.int32)
        for b in range(B):
            for t in range(T):
                visible = (t + 1) // ratio
                n = 0 if t in empty_rows else min(visible, k - (t % 3))
                slots = rng.permutation(k)[:n]  # -1 holes anywhere in the row
                topk_idx[b, t, slots] = rng.choice(visible, n, replace=False)
        topk_idx = jnp.asarray(topk_idx)
    as_jnp = lambda x: None if x is None else jnp.asarray(x)
    return dict(q=as_jnp(q), kv=as_jnp(kv), sinks=as_jnp(sinks), compressed=as_jnp(compressed),
                topk_idx=topk_idx, window=window, ratio=ratio)


def outputs_and_grads(fn, inp, dtype):
    """Output and grads of a fixed random projection of it, w.r.t. q, kv, sinks (and compressed)."""
    names = ["q", "kv", "sinks"] + (["compressed"] if inp["compressed"] is not None else [])
    cast = lambda name, x: x if name == "sinks" else x.astype(dtype)
    w = jnp.asarray(np.random.default_rng(1).standard_normal(inp["q"].shape), jnp.float32)

    def loss(*xs):
        a = dict(zip(names, xs))
        out = fn(a["q"], a["kv"], a["sinks"], inp["window"], a.get("compressed"), inp["topk_idx"], inp["ratio"])
        return jnp.sum(out.astype(jnp.float32) * w), out

    xs = [cast(n, inp[n]) for n in names]
    grads, out = jax.grad(loss, argnums=tuple(range(len(names))), has_aux=True)(*xs)
    return {"out": out, **dict(zip(names, grads))}


def assert_close(got, want, tol):
    for name in want:
        g, w = np.asarray(got[name], np.float32), np.asarray(want[name], np.float32)
        err = np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-30)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol}"


def kernel(**blocks):
    return lambda *a: sparse_attention(*a, interpret=True, **blocks)


def reference(*a):
    return sparse_attention_reference(*a, 16)  # small chunk: exercises its chunking too


CASES = {  # name: (make_inputs kwargs, kernel block kwargs)
    "swa": (dict(mode="swa", T=37, H=4, window=8), dict(block_q=8, block_k=8)),
    "swa_window_wider_than_blocks": (dict(mode="swa", T=29, H=2, window=13), dict(block_q=8, block_k=8)),
    "hca_two_head_groups": (dict(mode="hca", T=45, H=4, window=8, ratio=4), dict(block_q=8, block_k=8, block_h=2)),
    "csa_ragged_and_empty_rows": (dict(mode="csa", T=37, H=4, window=8, k=6, empty_rows=(9, 20, 21)),
                                  dict(block_q=8, block_k=8)),
    "csa_two_heads_chunked_backward": (dict(mode="csa", T=27, H=2, window=16, k=4, ratio=2),
                                       dict(block_q=8, block_k=16)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fp32_forward_and_all_gradients_match_reference(case):
    inp_kw, blocks = CASES[case]
    inp = make_inputs(**inp_kw)
    fn = kernel(**blocks)
    if case == "csa_two_heads_chunked_backward":
        fn = lambda *a: sparse_attention(*a, chunk=8, interpret=True, **blocks)  # 4 scatter-add chunks
    assert_close(outputs_and_grads(fn, inp, jnp.float32), outputs_and_grads(reference, inp, jnp.float32), 1e-5)


@pytest.mark.parametrize("case", ["swa", "hca_two_head_groups", "csa_ragged_and_empty_rows"])
def test_bf16_forward_and_all_gradients_match_fp32_reference(case):
    inp_kw, blocks = CASES[case]
    inp = make_inputs(**inp_kw)
    rounded = {n: (v.astype(jnp.bfloat16).astype(jnp.float32) if n in ("q", "kv", "compressed") and v is not None
                   else v) for n, v in inp.items()}
    got = outputs_and_grads(kernel(**blocks), rounded, jnp.bfloat16)
    assert got["out"].dtype == jnp.bfloat16
    assert_close(got, outputs_and_grads(reference, rounded, jnp.float32), 2e-2)


def test_default_blocks_and_jit_match_reference():
    inp = make_inputs("hca", B=1, T=200, H=2, window=128, ratio=16)
    args = (inp["q"], inp["kv"], inp["sinks"], inp["window"], inp["compressed"], None, inp["ratio"])
    got = jax.jit(lambda *a: sparse_attention(*a, interpret=True), static_argnums=(3, 6))(*args)
    assert_close({"out": got}, {"out": reference(*args)}, 1e-5)


def test_empty_compressed_is_sliding_window_only():
    inp = make_inputs("swa", B=1, T=16, H=2)
    empty = jnp.zeros((1, 0, 32), jnp.float32)
    got = sparse_attention(inp["q"], inp["kv"], inp["sinks"], 8, empty, None, 4, block_q=8, block_k=8, interpret=True)
    want = sparse_attention_reference(inp["q"], inp["kv"], inp["sinks"], 8)
    assert_close({"out": got}, {"out": want}, 1e-5)


@pytest.mark.parametrize("bad, message", [
    (dict(kv=jnp.zeros((1, 8, 16))), "inconsistent shapes"),
    (dict(window=0), "window"),
    (dict(compressed=jnp.zeros((1, 2, 32)), ratio=0), "ratio"),
    (dict(topk_idx=jnp.zeros((1, 8, 2), jnp.int32)), "needs compressed"),
    (dict(compressed=jnp.zeros((1, 2, 32)), topk_idx=jnp.zeros((1, 8, 2), jnp.float32), ratio=4), "integer"),
    (dict(block_q=12), "multiples of 8"),
    (dict(block_h=3), "divide"),
])
def test_bad_input_raises_a_clear_value_error(bad, message):
    a = dict(q=jnp.zeros((1, 8, 2, 32)), kv=jnp.zeros((1, 8, 32)), sinks=jnp.zeros((2,)), window=4,
             compressed=None, topk_idx=None, ratio=0)
    blocks = {n: bad.pop(n) for n in ("block_q", "block_h") if n in bad}
    a.update(bad)
    with pytest.raises(ValueError, match=message):
        sparse_attention(*a.values(), interpret=True, **blocks)


# ----------------------------------------------------------------------------------------------
# Real Mosaic compilation for TPU topologies (no TPU needed).

def compile_for_tpu(topology, mode, T, *, H=16, c=128, k=64, window=128, backward=False, dtype=jnp.bfloat16,
                    fn=sparse_attention):
    """AOT-compile forward (or forward + backward) for one TPU chip of `topology`."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    sharding = NamedSharding(Mesh(tpu_devices_or_skip(topology)[:1], ("x",)), PartitionSpec())
    spec = lambda shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
    ratio = {"swa": 0, "csa": 4, "hca": 128}[mode]
    args = (spec((1, T, H, c)), spec((1, T, c)), spec((H,), jnp.float32),
            spec((1, T // ratio, c)) if ratio else None, spec((1, T, k), jnp.int32) if mode == "csa" else None)

    def forward(q, kv, sinks, compressed, topk_idx):
        return fn(q, kv, sinks, window, compressed, topk_idx, ratio)

    def gradients(q, kv, sinks, compressed, topk_idx, d_out):  # d_out: cotangent from the layers above
        _, vjp = jax.vjp(lambda q, kv, sinks, compressed: forward(q, kv, sinks, compressed, topk_idx),
                         q, kv, sinks, compressed)
        return vjp(d_out)

    if backward:
        return jax.jit(gradients).lower(*args, spec((1, T, H, c))).compile()
    return jax.jit(forward).lower(*args).compile()


@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v6e:2x2"])
@pytest.mark.parametrize("mode", ["swa", "hca", "csa"])
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_mosaic_compiles_the_kernels_for_tpu(topology, mode, backward):
    compiled = compile_for_tpu(topology, mode, 1024, backward=backward)
    assert compiled.memory_analysis() is not None


def test_mosaic_compiles_fp32_inputs():
    compile_for_tpu("v5p:2x2x1", "csa", 1024, backward=True, dtype=jnp.float32)


@pytest.mark.parametrize("heads", [4, 8])
def test_mosaic_compiles_csa_with_fewer_than_16_heads(heads):
    # Heads split over devices (tensor parallelism) leave few per call: CSA's query blocks grow so that
    # block_q x H statistics rows still fill 128 lanes (16 heads x 8 queries before).
    compile_for_tpu("v5p:2x2x1", "csa", 1024, H=heads, backward=True)


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v6e:2x2"])
@pytest.mark.parametrize("mode", ["swa", "hca", "csa"])
@pytest.mark.parametrize("heads", [64, 128])
def test_mosaic_compiles_forward_and_backward_at_the_real_sizes(topology, mode, heads):
    compile_for_tpu(topology, mode, 2048, H=heads, c=512, k=512, backward=True)


@pytest.mark.parametrize("mode", ["swa", "csa"])
def test_compiled_training_memory_grows_linearly_in_T(mode):
    """Forward + backward temp bytes at T and 4T: linear growth, far below one T x T score matrix."""
    small, large = 8192, 32768
    temp = {T: compile_for_tpu("v5p:2x2x1", mode, T, backward=True).memory_analysis().temp_size_in_bytes
            for T in (small, large)}
    assert temp[large] <= 4.5 * temp[small]  # T grew 4x; anything T x T would grow 16x
    assert temp[large] < large * large * 4  # below a single fp32 T x T matrix
