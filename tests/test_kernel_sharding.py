"""Pallas kernels on multi-device meshes (sharding/kernels.py) and inside expert parallelism.

8 host CPU devices (tests/conftest.py); kernels run in Pallas' interpreter, and the Mosaic tests
compile them for a TPU topology described by libtpu (no TPU needed). fp32, relative error <= 1e-5.
"""

from __future__ import annotations

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from benchmarks.hlo_costs import async_overlaps
from pallas_kernels.lightning_indexer import select_topk, select_topk_reference
from pallas_kernels.moe_dispatch import grouped_swiglu
from sharding import expert_parallel
from sharding.context import use_mesh_rules
from sharding.kernels import SPARSE_ATTENTION, by_platform, pallas_kernel, run_kernel
from sharding.mesh import compiler_options, make_mesh
from sharding.partition import shard_module, state_shardings
from sharding.rules import get_rules
from v4jax import Transformer, V4Config
from pallas_kernels.sparse_attention_reference import sparse_attention
from v4jax.model import kernels
from v4jax.config import AttentionImpl, RunOptions

pallas_sparse_attention = kernels.sparse_attention(AttentionImpl.PALLAS)  # the model's entry to the kernel
from v4jax.model.moe import Experts, Routing
from conftest import tpu_devices_or_skip

B, T, H, C = 4, 37, 4, 16  # T is no multiple of any block


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def attention_inputs(mode, seed=0):
    rng = np.random.default_rng(seed)
    a = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    q, kv, sinks = a(B, T, H, C), a(B, T, C), a(H)
    ratio = {"swa": 0, "csa": 4, "hca": 8}[mode]
    compressed = a(B, T // ratio, C) if ratio else None
    topk_idx = None
    if mode == "csa":
        n = T // ratio
        idx = rng.integers(0, n, size=(B, T, 3))
        visible = idx < ((np.arange(T) + 1) // ratio)[None, :, None]
        topk_idx = jnp.asarray(np.where(visible & (rng.random(idx.shape) < 0.8), idx, -1), jnp.int32)
    return q, kv, sinks, compressed, topk_idx, ratio


def _eqns(jaxpr):
    """Every equation of a jaxpr and of its sub-jaxprs (shard_map, scan, cond, custom rules)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):  # cond keeps its branches in a tuple
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _eqns(sub)


def shard_map_local_avals(fn, *args):
    """The per-device operand types of the shard_maps in fn's jaxpr."""
    return [[v.aval for v in eqn.params["jaxpr"].invars] for eqn in _eqns(jax.make_jaxpr(fn)(*args).jaxpr)
            if eqn.primitive.name == "shard_map"]


# ----------------------------------------------------------------------------------------------
# The attention core and the indexer, per device on a mesh


@pytest.mark.parametrize("mode", ["swa", "hca", "csa"])
def test_sharded_attention_kernel_runs_per_device_and_equals_the_reference(mode):
    # batch over data x fsdp (4 sequences -> 1 per device pair), heads over tensor (4 heads -> 2)
    mesh, rules = make_mesh("data=2,fsdp=2,tensor=2"), get_rules("fsdp_tp_ep")
    q, kv, sinks, compressed, topk_idx, ratio = attention_inputs(mode)
    window, chunk = 8, 16

    def gradients_and_output(core):
        def loss(q, kv, sinks, compressed, ct):
            out = core(q, kv, sinks, window, compressed, topk_idx, ratio, chunk)
            return jnp.sum(out * ct), out

        return jax.grad(loss, argnums=(0, 1, 2, 3) if compressed is not None else (0, 1, 2), has_aux=True)

    ct = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
    want_g, want = gradients_and_output(sparse_attention)(q, kv, sinks, compressed, ct)
    with use_mesh_rules(mesh, rules):
        got_g, got = jax.jit(gradients_and_output(pallas_sparse_attention))(q, kv, sinks, compressed, ct)
        local = shard_map_local_avals(
            lambda q, kv, sinks, compressed: pallas_sparse_attention(q, kv, sinks, window, compressed, topk_idx,
                                                                     ratio, chunk), q, kv, sinks, compressed)
    assert rel_err(got, want) <= 1e-5
    for name, g, w in zip(("q", "kv", "sinks", "compressed"), got_g, want_g):
        assert rel_err(g, w) <= 1e-5, name
    # the kernel sees one device's sequences (4 over data x fsdp) and heads (4 over tensor), whole in T
    want_local = [(1, T, 2, C), (1, T, C), (2,)]
    if compressed is not None:
        want_local.append((1, compressed.shape[1], C))
    if topk_idx is not None:
        want_local.append((1, T, 3))
    assert len(local) == 1 and [a.shape for a in local[0]] == want_local


def test_sharded_indexer_kernel_equals_the_reference():
    mesh, rules = make_mesh("fsdp=4,tensor=2"), get_rules("fsdp_tp_ep")
    rng = np.random.default_rng(2)
    n_heads, dim, ratio, topk = 3, 16, 4, 5
    q = jnp.asarray(rng.normal(size=(B, T, n_heads, dim)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(B, T, n_heads)), jnp.float32)
    keys = jnp.asarray(rng.normal(size=(B, T // ratio, dim)), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))  # per row, as the model passes them
    want = select_topk_reference(q, w, keys, positions, ratio, topk, 16)
    with use_mesh_rules(mesh, rules):
        fn = pallas_kernel(select_topk)
        got = jax.jit(lambda *a: fn(*a, ratio, topk, 16))(q, w, keys, positions)
        local = shard_map_local_avals(lambda *a: fn(*a, ratio, topk, 16), q, w, keys, positions)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert [a.shape for a in local[0]] == [(1, T, n_heads, dim), (1, T, n_heads), (1, T // ratio, dim), (1, T)]


def test_kernels_choose_mosaic_on_tpu_the_reference_on_gpu_and_the_interpreter_elsewhere():
    calls = []
    kernel = lambda x, interpret: calls.append(("kernel", interpret)) or x  # noqa: E731
    reference = lambda x: calls.append(("reference",)) or x  # noqa: E731
    for platform in ("tpu", "gpu", "cuda", "rocm", "cpu"):
        by_platform(kernel, reference, (1,), platform)
    assert calls == [("kernel", False), ("reference",), ("reference",), ("reference",), ("kernel", True)]
    with pytest.raises(ValueError, match="no layout declared"):
        pallas_kernel(sparse_attention)
    with pytest.raises(ValueError, match="logical axis 'batch' has size 3"):
        with use_mesh_rules(make_mesh("fsdp=8"), get_rules("fsdp")):
            q, kv, sinks, *_ = attention_inputs("swa")
            run_kernel(SPARSE_ATTENTION, lambda *a, platform: a[0], q, kv[:3], sinks, 8, None, None, 0, 16)


# ----------------------------------------------------------------------------------------------
# moe_impl=pallas inside the expert-parallel shard_map


def _routing(pattern, N, k, E, rng):
    if pattern == "random":
        ids = np.stack([rng.permutation(E)[:k] for _ in range(N)])
    elif pattern == "all_to_one_expert":  # every token's first choice is expert 5, the other experts 0..k-2
        ids = np.tile(np.r_[5, np.arange(k - 1)], (N, 1))
    else:  # "empty_experts": only the first half of the experts is ever chosen
        ids = np.stack([rng.permutation(E // 2)[:k] for _ in range(N)])
    return jnp.asarray(ids, jnp.int32), jnp.asarray(rng.uniform(0.1, 1.0, size=(N, k)), jnp.float32)


EP_CASES = [("fsdp=2,expert=4", "fsdp_ep", 8, 0),  # tokens meet their experts by all-to-all
            ("expert=8", "fsdp_ep", 1, 1024),  # batch 1: tokens replicated, partial sums
            ("expert=2,tensor=2,fsdp=2", "fsdp_tp_ep", 4, 0),  # plus tensor parallelism inside the experts
            ("fsdp=2,expert=4", "fsdp_ep", 8, 1024)]  # few tokens: gathered onto every device of the group
EP_DEFAULT = {("random", 0), ("all_to_one_expert", 1), ("empty_experts", 2), ("all_to_one_expert", 3)}  # each once


@pytest.mark.parametrize("pattern,case", [
    pytest.param(p, c, marks=() if (p, c) in EP_DEFAULT else pytest.mark.slow, id=f"{p}-{EP_CASES[c][0]}")
    for p in ("random", "all_to_one_expert", "empty_experts") for c in range(len(EP_CASES))])
def test_expert_parallel_pallas_equals_the_unsharded_reference_moe(pattern, case):
    mesh_spec, preset, batch, gather_tokens = EP_CASES[case]
    base = V4Config.preset("tiny", n_mtp_layers=0, n_routed_experts=8, n_activated_experts=3)
    # 12 tokens per device: 3 all-to-all rounds, the last padded
    chunk = RunOptions(moe_dispatch_chunk=5, moe_gather_tokens=gather_tokens, moe_dense_tokens=0)
    reference = Experts(base, rngs=nnx.Rngs(0), options=chunk.replace(moe_impl="reference"))  # one masked FFN per expert
    pallas = Experts(base, rngs=nnx.Rngs(0), options=chunk.replace(moe_impl="pallas"))
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(batch, 12, base.dim)), jnp.float32)
    ids, w = _routing(pattern, batch * 12, 3, 8, rng)
    mesh, rules = make_mesh(mesh_spec), get_rules(preset)

    def f(x, w, experts):
        return experts(x, Routing(w, ids, None))

    with jax.default_matmul_precision("highest"):
        want, vjp_want = jax.vjp(f, x, w, reference)
    with use_mesh_rules(mesh, rules):
        got, vjp_got = jax.vjp(jax.jit(f), x, w, shard_module(pallas, mesh, rules))
    assert rel_err(got, want) <= 1e-5
    ct = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
    g_got, g_want = vjp_got(ct), vjp_want(ct)
    assert rel_err(g_got[0], g_want[0]) <= 1e-5 and rel_err(g_got[1], g_want[1]) <= 1e-5
    for name in ("w1", "w2", "w3"):
        assert rel_err(getattr(g_got[2], name).get_value(), getattr(g_want[2], name).get_value()) <= 1e-5, name


# ----------------------------------------------------------------------------------------------
# The whole model with the kernels on a mesh


def _model_logits_and_grads(cfg, tokens, mesh=None, rules=None, options=RunOptions(attention_chunk=16)):
    model = Transformer(cfg, rngs=nnx.Rngs(0), options=options)
    if mesh is not None:
        model = shard_module(model, mesh, rules)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        logits = nnx.merge(graphdef, params, rest)(tokens).logits
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)), logits

    run = jax.jit(jax.value_and_grad(loss, has_aux=True))
    if mesh is None:
        (_, logits), grads = run(params)
    else:
        with use_mesh_rules(mesh, rules):
            (_, logits), grads = run(params)
    return np.asarray(logits), {p: np.asarray(v.get_value(), np.float64) for p, v in nnx.to_flat_state(grads)}


@pytest.mark.slow  # the interpreted kernels on 8 devices: ~minutes on 2 cores
@pytest.mark.parametrize("moe_impl", ["ragged_dot", "pallas"])
def test_model_with_pallas_attention_on_a_mesh_equals_the_unsharded_reference(moe_impl):
    cfg = V4Config.preset("tiny", n_mtp_layers=0, max_seq_len=64)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 24)), jnp.int32)
    want_logits, want = _model_logits_and_grads(cfg, tokens)
    mesh, rules = make_mesh("data=2,fsdp=2,tensor=2" if moe_impl == "ragged_dot" else "fsdp=2,expert=2,tensor=2"), \
        get_rules("fsdp_tp_ep")
    got_logits, got = _model_logits_and_grads(cfg, tokens, mesh, rules,
                                              RunOptions(attention_chunk=16, attention_impl="pallas", moe_impl=moe_impl))
    assert rel_err(got_logits, want_logits) <= 1e-5
    total = np.sqrt(sum(np.sum(g * g) for g in want.values()))
    for p, g in want.items():  # tensors under 1% of the total norm are held to 1e-7 of it
        assert np.linalg.norm(got[p] - g) <= 1e-5 * max(np.linalg.norm(g), 1e-2 * total), p


# ----------------------------------------------------------------------------------------------
# Mosaic inside the shard_maps (AOT for a TPU topology)


def _tpu_mesh(spec):
    devices = tpu_devices_or_skip("v5p:2x2x1")
    return make_mesh(spec, devices=devices)


@pytest.mark.parametrize("mode", ["swa", "csa"])
def test_mosaic_compiles_the_sharded_attention_kernel_forward_and_backward(mode):
    mesh, rules = _tpu_mesh("fsdp=2,tensor=2"), get_rules("fsdp_tp_ep")
    Tn, Hn, c, k, ratio = 512, 16, 128, 64, 4  # 8 heads per device: the CSA blocks adapt
    spec = lambda shape, names, dt=jnp.bfloat16: jax.ShapeDtypeStruct(  # noqa: E731
        shape, dt, sharding=NamedSharding(mesh, rules.spec(names, shape, mesh)))
    args = [spec((4, Tn, Hn, c), ("batch", None, "act_heads", None)), spec((4, Tn, c), ("batch", None, None)),
            spec((Hn,), (None,), jnp.float32)]
    if mode == "csa":
        args += [spec((4, Tn // ratio, c), ("batch", None, None)), spec((4, Tn, k), ("batch", None, None), jnp.int32)]

    def grads(q, kv, sinks, *rest):
        compressed, topk_idx = rest or (None, None)
        f = lambda q, kv, sinks: pallas_sparse_attention(q, kv, sinks, 128, compressed, topk_idx,  # noqa: E731
                                                         ratio if rest else 0, 512)
        out, vjp = jax.vjp(f, q, kv, sinks)
        return vjp(out)

    with use_mesh_rules(mesh, rules):
        hlo = jax.jit(grads).lower(*args).compile().as_text()
    assert "tpu_custom_call" in hlo  # Mosaic kernels, not the interpreter


def _tiny_experts_loss(mesh, rules, options, batch: int, T: int, dtype):
    """The tiny preset's routed experts over `mesh` as a loss of (params, x [batch, T, d], weights, ids),
    with abstract arguments (params and x sharded by `rules`) to lower for a TPU topology."""
    cfg = V4Config.preset("tiny", n_mtp_layers=0)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Experts(cfg, rngs=nnx.Rngs(0), options=options)), nnx.Param)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params,
                          state_shardings(params, mesh, rules))
    k = cfg.n_activated_experts
    x = jax.ShapeDtypeStruct((batch, T, cfg.dim), dtype, sharding=NamedSharding(
        mesh, rules.spec(("batch", None, None), (batch, T, cfg.dim), mesh)))
    ids, w = jax.ShapeDtypeStruct((batch * T, k), jnp.int32), jax.ShapeDtypeStruct((batch * T, k), jnp.float32)

    def loss(params, x, w, ids):
        return jnp.sum(nnx.merge(graphdef, params)(x, Routing(w, ids, None)))

    return loss, (params, x, w, ids)


@pytest.mark.parametrize("mesh_spec,batch,gather_tokens", [("fsdp=2,expert=2", 4, 0), ("expert=4", 1, 1024),
                                                           ("fsdp=2,expert=2", 4, 1024)],
                         ids=["tokens_exchanged", "tokens_replicated", "tokens_gathered"])
def test_mosaic_compiles_the_expert_parallel_pallas_layer_forward_and_backward(mesh_spec, batch, gather_tokens):
    # The typed (check_vma) shard_map of TPU: received rows and weights must be typed varying for the
    # gmm's custom VJP (this failed to trace before the ragged all-to-all buffers were typed varying)
    mesh, rules = _tpu_mesh(mesh_spec), get_rules("fsdp_ep")
    options = RunOptions(moe_impl="pallas", moe_gather_tokens=gather_tokens, moe_dense_tokens=0)  # the windows' gmm
    loss, args = _tiny_experts_loss(mesh, rules, options, batch, 64, jnp.float32)
    with use_mesh_rules(mesh, rules):
        hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile().as_text()
    assert "tpu_custom_call" in hlo and "moe_tgmm" in hlo
    assert ("ragged-all-to-all" in hlo) == (gather_tokens == 0)


def test_the_exchange_overlaps_its_all_to_alls_with_the_experts_given_the_mesh_compiler_options(monkeypatch):
    # Two passes per loop iteration (expert_parallel.PIPELINED_PASSES): one pass's rows travel while
    # the grouped matmul runs on the other's, once XLA:TPU makes the ragged all-to-all asynchronous
    # (sharding.mesh.compiler_options); by default it runs every one synchronously
    mesh, rules = _tpu_mesh("fsdp=2,expert=2"), get_rules("fsdp_ep")

    def overlaps(opts):  # the layer built anew, so each setting of PIPELINED_PASSES is traced anew
        loss, args = _tiny_experts_loss(mesh, rules, RunOptions(moe_impl="pallas", moe_gather_tokens=0), 4, 256,
                                        jnp.bfloat16)
        with use_mesh_rules(mesh, rules):
            hlo = jax.jit(jax.grad(loss, argnums=(0, 1)), compiler_options=opts).lower(*args).compile().as_text()
        return async_overlaps(hlo)

    assert compiler_options(mesh) == {"xla_tpu_enable_async_ragged_all_to_all": "true"}
    assert compiler_options(make_mesh("fsdp=1", devices=jax.devices("cpu")[:1])) == {} == compiler_options(None)
    default, tuned = overlaps({}), overlaps(compiler_options(mesh))
    assert default and all(o.compute is None for o in default)  # synchronous
    hidden = lambda found: sum(any("gmm" in c for c in o.compute or ()) for o in found)  # noqa: E731
    assert len(tuned) == len(default) and hidden(tuned) > 0
    monkeypatch.setattr(expert_parallel, "PIPELINED_PASSES", 1)  # one pass per iteration: less to overlap
    assert hidden(overlaps(compiler_options(mesh))) < hidden(tuned)


def test_tpu_expert_parallel_gradients_reduce_over_the_same_axes_as_the_tested_cpu_path():
    # TPU moves rows by ragged_all_to_all, which XLA:CPU lacks, so its numerics cannot run here. Its
    # gradient's collectives must be those of the CPU path (fixed all_to_all blocks), whose gradients
    # equal the unsharded layer (tests/test_sharding.py): weight gradients summed over fsdp (the token
    # axis the weights are replicated on), never over expert (which would mix different experts).
    cfg = V4Config.preset("tiny", n_mtp_layers=0)

    def reductions(devices):
        mesh, rules = make_mesh("fsdp=2,expert=2", devices=devices), get_rules("fsdp_ep")
        graphdef, params = nnx.split(nnx.eval_shape(  # the all-to-all dispatch (the gather one has no ragged op)
            lambda: Experts(cfg, rngs=nnx.Rngs(0), options=RunOptions(moe_gather_tokens=0))), nnx.Param)
        x, ids, w = (jax.ShapeDtypeStruct(s, d) for s, d in (((4, 16, cfg.dim), jnp.float32), ((64, 2), jnp.int32),
                                                             ((64, 2), jnp.float32)))
        loss = lambda p, x, w, ids: jnp.sum(nnx.merge(graphdef, p)(x, Routing(w, ids, None)))  # noqa: E731
        with use_mesh_rules(mesh, rules):
            jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(params, x, w, ids).jaxpr
        eqns = list(_eqns(jaxpr))
        return (sorted(tuple(e.params["axes"]) for e in eqns if e.primitive.name.startswith("psum")),
                any(e.primitive.name == "ragged_all_to_all" for e in eqns))

    cpu, cpu_ragged = reductions(jax.devices()[:4])
    tpu, tpu_ragged = reductions(_tpu_mesh("fsdp=2,expert=2").devices.flatten())
    assert tpu_ragged and not cpu_ragged
    assert tpu == cpu == [("fsdp",)] * 3


@pytest.mark.slow  # each compile of the whole model takes ~1-3 min on the shared host
@pytest.mark.parametrize("moe_impl", ["ragged_dot", "pallas"])
def test_mosaic_compiles_the_sharded_model_with_pallas_kernels(moe_impl):
    cfg = V4Config.preset("tiny", n_mtp_layers=0, max_seq_len=256)
    options = RunOptions.preset("tiny", attention_impl="pallas", moe_impl=moe_impl)
    mesh, rules = _tpu_mesh("fsdp=2,expert=2" if moe_impl == "pallas" else "fsdp=2,tensor=2"), \
        get_rules("fsdp_tp_ep" if moe_impl == "ragged_dot" else "fsdp_ep")
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), options=options))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    shard = lambda state: jax.tree.map(  # noqa: E731
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, state_shardings(state, mesh, rules))
    tokens = jax.ShapeDtypeStruct((4, 256), jnp.int32, sharding=NamedSharding(mesh, rules.spec(("batch", None), (4, 256), mesh)))

    def loss(params, rest, tokens):
        logits = nnx.merge(graphdef, params, rest)(tokens).logits
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    with use_mesh_rules(mesh, rules):
        hlo = jax.jit(jax.grad(loss)).lower(shard(params), shard(rest), tokens).compile().as_text()
    assert "tpu_custom_call" in hlo


# ----------------------------------------------------------------------------------------------
# GPU: the XLA reference, not Pallas' interpreter (lowered for CUDA on this host by jax.export)


def _op_counts(fn, platform, *args):
    text = jax.export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module()
    ops = collections.Counter(re.findall(r"stablehlo\.[a-z_]+", text))
    for wrapper in ("stablehlo.case", "stablehlo.return"):  # the resolved platform switch
        ops.pop(wrapper, None)
    return ops, text


def test_gpu_lowering_runs_the_xla_reference_instead_of_the_interpreter():
    q, kv, sinks, compressed, topk_idx = attention_inputs("csa")[:5]
    spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)  # noqa: E731
    args = [spec(a) for a in (q, kv, sinks, compressed, topk_idx)]
    attend = lambda core: lambda *a: core(*a[:3], 8, a[3], a[4], 4, 16)  # noqa: E731
    reference, _ = _op_counts(attend(sparse_attention), "cuda", *args)
    assert _op_counts(attend(pallas_sparse_attention), "cuda", *args)[0] == reference
    assert _op_counts(attend(pallas_sparse_attention), "cpu", *args)[0] != reference  # the interpreter
    # moe_impl=pallas: forward and backward by XLA's ragged dot, no grid loop
    shapes = [((70, 32), jnp.float32), ((5,), jnp.int32), ((5, 32, 16), jnp.float32), ((5, 32, 16), jnp.float32),
              ((5, 16, 32), jnp.float32), ((70,), jnp.float32)]
    grads = jax.grad(lambda *a: jnp.sum(grouped_swiglu(*a, 7.0)), argnums=(0, 2, 3, 4, 5))
    ops, text = _op_counts(grads, "cuda", *(jax.ShapeDtypeStruct(s, d) for s, d in shapes))
    assert "ragged" in text and ops["stablehlo.while"] == 0
    assert _op_counts(grads, "cpu", *(jax.ShapeDtypeStruct(s, d) for s, d in shapes))[0]["stablehlo.while"] > 0
