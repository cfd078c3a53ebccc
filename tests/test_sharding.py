"""Sharding: the rules table, meshes, sharded == unsharded numerics, expert parallelism, scanned layers.

Runs on 8 host CPU devices (tests/conftest.py forces the count)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from sharding import expert_parallel
from sharding.context import use_mesh_rules
from sharding.mesh import make_mesh
from sharding.partition import create_sharded, shard_module, spec_table, state_shardings
from sharding.rules import LOGICAL_AXES, PRESETS, ShardingError, get_rules, parse_overrides
from v4jax.config import AttentionKind, MoEImpl, RouterKind, RunOptions, V4Config
from v4jax.model import kernels
from v4jax.model.transformer import Transformer, layer_schedule
from pallas_kernels.moe_dispatch_reference import swiglu
from v4jax.model.moe import Experts, Routing

S, C, H = AttentionKind.SLIDING, AttentionKind.CSA, AttentionKind.HCA


def small_cfg(**kw):
    base = dict(n_mtp_layers=0, max_seq_len=64)
    return V4Config.preset("tiny", **{**base, **kw})


OPTIONS = RunOptions(attention_chunk=16)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def loss_fn(model, tokens):
    logits = model(tokens).logits[:, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def loss_and_grads(model, tokens, mesh=None, rules=None):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def f(params, rest, tokens):
        return loss_fn(nnx.merge(graphdef, params, rest), tokens)

    def run(params, rest, tokens):
        loss, grads = jax.value_and_grad(f)(params, rest, tokens)
        return loss, grads, nnx.merge(graphdef, params, rest)(tokens).logits

    if mesh is None:
        return jax.jit(run)(params, rest, tokens)
    with use_mesh_rules(mesh, rules):
        return jax.jit(run)(params, rest, tokens)


def test_every_preset_maps_every_logical_axis_and_overrides_apply():
    for name in PRESETS:
        rules = get_rules(name)
        assert {k for k, _ in rules.table} == set(LOGICAL_AXES)
    r = get_rules("fsdp_ep", **parse_overrides("experts=expert+fsdp,vocab="))
    assert r.mesh_axes("experts") == ("expert", "fsdp") and r.mesh_axes("vocab") == ()


# (preset, mesh, batch): every preset, at least four mesh shapes, batch divisible by the token axes
CASES = [  # the default run keeps one mesh (FSDP and experts split); the rest are `slow`
    pytest.param("fsdp", "fsdp=8", 8, marks=pytest.mark.slow),
    ("fsdp_ep", "fsdp=2,expert=4", 8),
    pytest.param("fsdp_tp_ep", "fsdp=2,expert=2,tensor=2", 4, marks=pytest.mark.slow),
    pytest.param("long_context", "fsdp=2,expert=2,context=2", 4, marks=pytest.mark.slow),
    pytest.param("serve_tp", "data=2,tensor=4", 2, marks=pytest.mark.slow),
]
SLOW_CASES = [("fsdp", "data=2,fsdp=4", 8), ("fsdp_ep", "expert=8", 8), ("fsdp_tp_ep", "expert=4,tensor=2", 4), ("long_context", "context=8", 1),
              ("serve_tp", "expert=2,tensor=4", 2)]

# What the table says for a few parameters, written out by hand (leading None = scanned layers axis).
EXPECTED = {
    "fsdp": {"embed.embedding": P("fsdp"), "stages.0.blocks.1.ffn.experts.w1": P(None, None, "fsdp"),
             "stages.0.blocks.1.attn.wq_b.kernel": P(None, "fsdp")},
    "fsdp_ep": {"embed.embedding": P(("fsdp", "expert")),
                "stages.0.blocks.1.ffn.experts.w1": P(None, "expert", "fsdp"),
                "stages.0.blocks.1.ffn.experts.w2": P(None, "expert", "fsdp"),
                "stages.0.blocks.1.attn.wq_b.kernel": P(None, ("fsdp", "expert"))},
    "fsdp_tp_ep": {"embed.embedding": P(("tensor", "fsdp"), "expert"),
                   "stages.0.blocks.1.ffn.experts.w1": P(None, "expert", "fsdp", "tensor"),
                   "stages.0.blocks.1.attn.wq_b.kernel": P(None, ("fsdp", "expert"), "tensor"),
                   "head.kernel": P(("fsdp", "expert"), "tensor")},
    "serve_tp": {"embed.embedding": P("tensor"),  # every matrix split over tensor, nothing over fsdp
                 "stages.0.blocks.1.ffn.experts.w1": P(None, None, "tensor"),  # experts whole, width split
                 "stages.0.blocks.1.ffn.experts.w2": P(None, None, "tensor"),
                 "stages.0.blocks.1.attn.wq_a.kernel": P(None, "tensor"),
                 "stages.0.blocks.1.attn.wq_b.kernel": P(None, "tensor"),
                 "head.kernel": P("tensor")},
    "long_context": {"embed.embedding": P(("fsdp", "context"), "expert"),
                     "stages.0.blocks.1.ffn.experts.w1": P(None, "expert", ("fsdp", "context"))},
}


def _check_sharded_equals_unsharded(preset, mesh_spec, batch):
    cfg = small_cfg()
    model = Transformer(cfg, rngs=nnx.Rngs(0), options=OPTIONS)
    T = 32
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (batch, T)), jnp.int32)
    loss0, grads0, logits0 = loss_and_grads(model, tokens)

    mesh, rules = make_mesh(mesh_spec), get_rules(preset)
    sharded = shard_module(model, mesh, rules)
    state = nnx.state(sharded)
    # the parameters really are laid out as the table says
    table = spec_table(state, mesh, rules)
    for path, var in nnx.to_flat_state(state):
        name = ".".join(map(str, path))
        assert var.get_value().sharding.spec == table[name], name
    for name, spec in EXPECTED[preset].items():
        got = table[name]
        assert tuple(got) + (None,) * (len(spec) - len(got)) == tuple(spec) + (None,) * (len(got) - len(spec)), \
            (name, got, spec)
    loss1, grads1, logits1 = loss_and_grads(sharded, tokens, mesh, rules)
    assert rel_err(logits1, logits0) <= 1e-5
    assert abs(float(loss1) - float(loss0)) <= 1e-5 * abs(float(loss0))
    flat0 = {p: np.asarray(v.get_value(), np.float64) for p, v in nnx.to_flat_state(grads0)}
    flat1 = {p: np.asarray(v.get_value(), np.float64) for p, v in nnx.to_flat_state(grads1)}
    total = np.sqrt(sum(np.sum(g * g) for g in flat0.values()))
    assert np.sqrt(sum(np.sum((flat1[p] - g) ** 2) for p, g in flat0.items())) <= 1e-5 * total
    for path, g in flat0.items():  # per tensor; tensors under 1% of the total norm are held to 1e-7 of it
        assert np.linalg.norm(flat1[path] - g) <= 1e-5 * max(np.linalg.norm(g), 1e-2 * total), path


@pytest.mark.parametrize("preset,mesh_spec,batch", CASES)
def test_sharded_forward_and_gradient_equal_unsharded_and_params_follow_the_table(preset, mesh_spec, batch):
    _check_sharded_equals_unsharded(preset, mesh_spec, batch)


@pytest.mark.slow
@pytest.mark.parametrize("preset,mesh_spec,batch", SLOW_CASES)
def test_sharded_equals_unsharded_more_meshes(preset, mesh_spec, batch):
    _check_sharded_equals_unsharded(preset, mesh_spec, batch)


@pytest.mark.slow
def test_create_sharded_builds_variables_in_place_with_the_table_layout():
    cfg = small_cfg()
    mesh, rules = make_mesh("fsdp=2,expert=4"), get_rules("fsdp_ep")
    model = create_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0), options=OPTIONS), mesh, rules)
    w1 = model.stages[0].blocks[1].ffn.experts.w1.get_value()
    assert w1.sharding.spec == P(None, "expert", "fsdp", None)
    assert w1.addressable_shards[0].data.shape == (1, cfg.n_routed_experts // 4, cfg.dim // 2, cfg.moe_inter_dim)


# ---------------------------------------------------------------- expert parallelism
def _routing(pattern, N, k, E, rng):
    if pattern == "random":
        ids = np.stack([rng.permutation(E)[:k] for _ in range(N)])
    elif pattern == "all_to_one_expert":  # every token's first choice is expert 5; the rest on expert 0..
        ids = np.tile(np.r_[5, np.arange(k - 1)], (N, 1))
    else:  # "empty_experts": only the first half of the experts ever chosen
        ids = np.stack([rng.permutation(E // 2)[:k] for _ in range(N)])
    w = rng.uniform(0.1, 1.0, size=(N, k)).astype(np.float32)
    return jnp.asarray(ids, jnp.int32), jnp.asarray(w)


@pytest.mark.parametrize("pattern", ["random", "all_to_one_expert", "empty_experts"])
@pytest.mark.parametrize("mesh_spec,preset,batch,dispatch", [
    ("fsdp=2,expert=4", "fsdp_ep", 8, "all_to_all"),  # tokens meet experts by all-to-all
    ("fsdp=2,expert=4", "fsdp_ep", 8, "gather"),  # the same tokens few enough to gather
    ("fsdp=2,expert=4", "fsdp_ep", 8, "dense"),  # and few enough for every local expert on every token
    ("expert=8", "fsdp_ep", 1, "gather"),  # batch 1: tokens replicated, psum
    ("expert=8", "fsdp_ep", 1, "dense"),
    ("expert=2,tensor=2,fsdp=2", "fsdp_tp_ep", 4, "all_to_all"),
    ("expert=2,tensor=2,fsdp=2", "fsdp_tp_ep", 4, "gather"),
    ("expert=2,tensor=2,fsdp=2", "fsdp_tp_ep", 4, "dense")])
def test_expert_parallel_dispatch_is_dropless_and_equals_unsharded(pattern, mesh_spec, preset, batch, dispatch):
    cfg = small_cfg(n_routed_experts=8, n_activated_experts=3)
    gather = {"all_to_all": 0, "gather": 1024, "dense": 1024}[dispatch]  # 12 tokens/device: 3 all-to-all rounds of 5
    dense = 1024 if dispatch == "dense" else 0  # the gather dispatch's windows, or every local expert densely
    experts = Experts(cfg, rngs=nnx.Rngs(0), options=OPTIONS.replace(moe_dispatch_chunk=5, moe_gather_tokens=gather,
                                                                      moe_dense_tokens=dense))
    rng = np.random.default_rng(3)
    T = 12
    x = jnp.asarray(rng.normal(size=(batch, T, cfg.dim)), jnp.float32)
    ids, w = _routing(pattern, batch * T, 3, 8, rng)
    mesh, rules = make_mesh(mesh_spec), get_rules(preset)
    assert expert_parallel.expert_axes(mesh, rules)

    def f(x, w, experts):
        return experts(x, Routing(w, ids, None))

    want, vjp0 = jax.vjp(f, x, w, experts)
    sharded = shard_module(experts, mesh, rules)
    with use_mesh_rules(mesh, rules):
        got, vjp1 = jax.vjp(jax.jit(f), x, w, sharded)
        prims = {e.primitive.name for e in _eqns(jax.make_jaxpr(f)(x, w, sharded).jaxpr)}
    assert ("all_to_all" in prims) == (dispatch == "all_to_all")
    assert ("all_gather" in prims) == (batch > 1 and dispatch != "all_to_all")
    assert ("while" in prims) == (dispatch != "dense")  # the dense way has no loop over windows or passes
    assert rel_err(got, want) <= 1e-5
    # dropless: every (token, choice) contributes; the per-token loop agrees with the dispatch
    W1, W3, W2 = (np.asarray(v[...]) for v in (experts.w1, experts.w3, experts.w2))
    xn, idn, wn = np.asarray(x).reshape(-1, cfg.dim), np.asarray(ids), np.asarray(w)
    loop = np.zeros_like(xn)
    for n in range(xn.shape[0]):
        for j in range(3):
            e = idn[n, j]
            h = np.asarray(swiglu(jnp.asarray(xn[n] @ W1[e]), jnp.asarray(xn[n] @ W3[e]), cfg.swiglu_limit))
            loop[n] += wn[n, j] * (h @ W2[e])
    assert rel_err(np.asarray(got).reshape(-1, cfg.dim), loop) <= 1e-5
    ct = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
    g0, g1 = vjp0(ct), vjp1(ct)
    assert rel_err(g1[0], g0[0]) <= 1e-5 and rel_err(g1[1], g0[1]) <= 1e-5
    for name in ("w1", "w2", "w3"):
        assert rel_err(getattr(g1[2], name).get_value(), getattr(g0[2], name).get_value()) <= 1e-5, name


def test_expert_parallel_rows_travel_in_the_compute_dtype_both_ways():
    """BF16 activations: every all-to-all of rows (out to the experts, results back, and the backward's
    cotangents) carries bf16, each expert's W2 result rounded once as DeepSeek's `Expert` returns it
    (architecture.md §5.3); values and gradients equal the unsharded dispatch to bf16 rounding."""
    cfg = small_cfg(n_routed_experts=8, n_activated_experts=3)
    experts = Experts(cfg, rngs=nnx.Rngs(0), options=OPTIONS.replace(moe_dispatch_chunk=5, moe_gather_tokens=0))
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(8, 12, cfg.dim)), jnp.bfloat16)
    ids, w = _routing("random", 8 * 12, 3, 8, rng)
    mesh, rules = make_mesh("fsdp=2,expert=4"), get_rules("fsdp_ep")

    def f(x, w, experts):
        return experts(x, Routing(w, ids, None))

    want, vjp0 = jax.vjp(f, x, w, experts)
    sharded = shard_module(experts, mesh, rules)
    ct = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
    with use_mesh_rules(mesh, rules):
        got, vjp1 = jax.vjp(jax.jit(f), x, w, sharded)
        grad_jaxpr = jax.make_jaxpr(lambda x, w, m, ct: jax.vjp(f, x, w, m)[1](ct))(x, w, sharded, ct).jaxpr
    moved = [v.aval.dtype for e in _eqns(grad_jaxpr) if e.primitive.name in ("all_to_all", "ragged_all_to_all")
             for v in e.invars if v.aval.ndim >= 2 and v.aval.shape[-1] == cfg.dim]
    assert len(moved) >= 4 and set(moved) == {jnp.dtype(jnp.bfloat16)}, moved  # rows, results, cotangents x2
    assert got.dtype == jnp.float32 and rel_err(got, want) <= 1e-2
    g0, g1 = vjp0(ct), vjp1(ct)
    assert g1[0].dtype == jnp.bfloat16 and rel_err(g1[0], g0[0]) <= 1e-2 and rel_err(g1[1], g0[1]) <= 1e-2
    for name in ("w1", "w2", "w3"):
        assert rel_err(getattr(g1[2], name).get_value(), getattr(g0[2], name).get_value()) <= 1e-2, name


def _eqns(jaxpr):
    """Every equation of a jaxpr and of its sub-jaxprs (shard_map, scan, cond branches)."""
    for e in jaxpr.eqns:
        yield e
        for v in e.params.values():
            for sub in (v if isinstance(v, (list, tuple)) else [v]):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _eqns(sub)


@pytest.mark.parametrize("pattern", ["random", "all_to_one_expert"])
@pytest.mark.parametrize("window", [8, 40])
def test_gather_dispatch_equals_the_all_to_all_and_the_one_hot_reference_in_windows(pattern, window):
    # Windows smaller than one device's rows (8: every device runs several; all_to_one_expert puts
    # 3 x 64 rows on one device) give what the all-to-all and the unsharded one-hot layer give, and
    # so do their gradients (the windows' own backward loop against the all-to-all's and autodiff's).
    cfg = small_cfg(n_routed_experts=8, n_activated_experts=3)
    reference = Experts(cfg, rngs=nnx.Rngs(0), options=OPTIONS.replace(moe_impl="reference"))
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(4, 16, cfg.dim)), jnp.float32)
    ids, w = _routing(pattern, 64, 3, 8, rng)
    want = reference(x, Routing(w, ids, None))
    mesh, rules = make_mesh("fsdp=2,expert=4"), get_rules("fsdp_ep")
    sharded = shard_module(reference, mesh, rules)
    ffn = functools.partial(kernels.grouped_swiglu(MoEImpl.RAGGED_DOT), limit=cfg.swiglu_limit)

    ct = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
    gx, gw, gm = jax.vjp(lambda x, w, m: m(x, Routing(w, ids, None)), x, w, reference)[1](ct)
    want_grads = (gx, gw, *(getattr(gm, n).get_value() for n in ("w1", "w3", "w2")))

    def dispatch(gather_tokens, window=None):
        f = lambda x, w, w1, w3, w2: expert_parallel.expert_parallel_ffn(  # noqa: E731
            x, ids.reshape(4, 16, 3), w.reshape(4, 16, 3), w1, w3, w2, ffn, mesh, rules, gather_tokens=gather_tokens,
            window=window)
        with use_mesh_rules(mesh, rules):
            out, vjp = jax.vjp(jax.jit(f), x, w, *(getattr(sharded, n)[...] for n in ("w1", "w3", "w2")))
            return out, vjp(ct)

    (gathered, g_gathered), (exchanged, g_exchanged) = dispatch(1024, window), dispatch(0)
    assert rel_err(gathered, want) <= 1e-6 and rel_err(exchanged, want) <= 1e-6
    assert rel_err(gathered, exchanged) <= 1e-6
    for name, a, b, c in zip(("x", "weights", "w1", "w3", "w2"), g_gathered, g_exchanged, want_grads):
        assert rel_err(a, c) <= 1e-5 and rel_err(a, b) <= 1e-5, name


@pytest.mark.parametrize("pattern", ["random", "all_to_one_expert", "empty_experts"])
@pytest.mark.parametrize("ep", [2, pytest.param(4, marks=pytest.mark.slow), 8])
def test_all_to_all_passes_bound_the_receive_buffer_and_drop_nothing(pattern, ep):
    # The all-to-all's receive buffer holds `capacity` rows; a device routed more takes further
    # passes. At the default factor, at a buffer of 8 rows (many passes; all_to_one_expert sends
    # every token to one device) and at the worst case (factor 0: one pass), the output and every
    # gradient equal the unsharded one-hot layer's: no (token, choice) row is dropped.
    cfg = small_cfg(n_routed_experts=8, n_activated_experts=3)
    reference = Experts(cfg, rngs=nnx.Rngs(0), options=OPTIONS.replace(moe_impl="reference"))
    rng = np.random.default_rng(ep)
    x = jnp.asarray(rng.normal(size=(8, 6, cfg.dim)), jnp.float32)  # 6 tokens per device
    ids, w = _routing(pattern, 48, 3, 8, rng)
    ids, w = ids.reshape(8, 6, 3), w.reshape(8, 6, 3)
    W = tuple(getattr(reference, n)[...] for n in ("w1", "w3", "w2"))
    one_hot = functools.partial(kernels.grouped_swiglu(MoEImpl.REFERENCE), limit=cfg.swiglu_limit)

    def unsharded(x, w, w1, w3, w2):
        flat = ids.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        y = one_hot(x.reshape(-1, cfg.dim)[order // 3], jnp.bincount(flat, length=8).astype(jnp.int32), w1, w3, w2,
                    w.reshape(-1)[order])
        return jnp.zeros((48, cfg.dim), jnp.float32).at[order // 3].add(y).reshape(x.shape)

    ct = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    want, vjp = jax.vjp(unsharded, x, w, *W)
    want_grads = vjp(ct)
    mesh, rules = make_mesh(f"fsdp={8 // ep},expert={ep}"), get_rules("fsdp_ep")
    ffn = functools.partial(kernels.grouped_swiglu(MoEImpl.RAGGED_DOT), limit=cfg.swiglu_limit)
    rows = 6 * 3  # rows each device sends per round
    for factor, capacity in ((1.25, expert_parallel.receive_capacity(rows, ep, 1.25)), (0.01, 8), (0, ep * rows)):
        assert expert_parallel.receive_capacity(rows, ep, factor) == capacity

        def f(x, w, w1, w3, w2):
            return expert_parallel.expert_parallel_ffn(x, ids, w, w1, w3, w2, ffn, mesh, rules, gather_tokens=0,
                                                       capacity_factor=factor)

        with use_mesh_rules(mesh, rules):
            got, vjp = jax.vjp(jax.jit(f), x, w, *W)
            grads = vjp(ct)
        assert rel_err(got, want) <= 1e-5, (factor, capacity)
        for g, g0 in zip(grads, want_grads):
            assert rel_err(g, g0) <= 1e-5, (factor, capacity)


def test_each_pass_and_window_tells_the_experts_the_rows_of_the_mean_load():
    # The grouped matmul's static cost estimate counts the rows it is told to expect (the kernel itself
    # visits only the real rows' tiles): each of an iteration's two passes the rows it receives when
    # every device is routed the mean load (18 rows per device here: 6 tokens x 3 choices), each
    # gather window the mean load of the expert group (at most a window).
    cfg = small_cfg(n_routed_experts=8, n_activated_experts=3)
    ffn = functools.partial(kernels.grouped_swiglu(MoEImpl.RAGGED_DOT), limit=cfg.swiglu_limit)
    told = []

    def recording(*args, expected_rows):
        told.append((args[0].shape[0], expected_rows))
        return ffn(*args, expected_rows=expected_rows)

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 6, cfg.dim)), jnp.float32)
    ids, w = _routing("random", 48, 3, 8, rng)
    W = [jnp.asarray(rng.normal(size=s), jnp.float32) * 0.1 for s in ((8, cfg.dim, cfg.moe_inter_dim),) * 2
         + ((8, cfg.moe_inter_dim, cfg.dim),)]
    mesh, rules = make_mesh("fsdp=2,expert=4"), get_rules("fsdp_ep")

    def run(**kw):
        told.clear()
        f = lambda x, w, *W: expert_parallel.expert_parallel_ffn(  # noqa: E731
            x, ids.reshape(8, 6, 3), w.reshape(8, 6, 3), *W, recording, mesh, rules, **kw)
        with use_mesh_rules(mesh, rules):
            jax.jit(jax.grad(lambda *a: jnp.sum(f(*a)), argnums=(0, 2))).lower(x, w, *W)
        return sorted(set(told))

    capacity = expert_parallel.receive_capacity(18, 4, 1.1 / 2)  # 16 rows (multiples of 8): 16 + 2
    assert capacity == 16
    assert run(gather_tokens=0, capacity_factor=1.1) == [(16, 2), (16, 16)]
    assert run(gather_tokens=0, capacity_factor=0) == [(4 * 18, 18)]  # one worst-case buffer, the mean in it
    # gather: an expert group (4 devices; fsdp=2 groups) holds 24 tokens x 3 choices: 18 rows per device
    # at the mean, in windows of 8 rows or of the default 1.25 x 18 -> 24
    assert run(gather_tokens=1024, window=8) == [(8, 8)]
    assert run(gather_tokens=1024) == [(expert_parallel.gather_window(24, 3, 4), 18)] == [(24, 18)]


def test_receive_capacity_is_the_factor_over_the_mean_load_within_the_worst_case():
    assert expert_parallel.receive_capacity(768, 8, 1.25) == 960  # 128 tokens x 6 choices per device
    assert expert_parallel.receive_capacity(768, 64, 1.25) == 960  # independent of the EP width
    assert expert_parallel.receive_capacity(768, 8, 0) == 8 * 768  # the worst case: one pass
    assert expert_parallel.receive_capacity(768, 1, 1.25) == 768  # never above the worst case
    assert expert_parallel.receive_capacity(3, 8, 1.25) == 8  # at least one row tile
    # a pod's round (4,096 tokens x 6 choices at 1.1): whole 512-row tiles, so the grouped matmul pads nothing
    assert expert_parallel.receive_capacity(24576, 64, 1.1) == 27136 == 53 * 512


def test_gather_window_is_a_quarter_over_the_mean_load_in_multiples_of_8():
    assert expert_parallel.gather_window(64, 6, 64) == 8  # 6 rows per device on average
    assert expert_parallel.gather_window(1024, 6, 8) == 960  # 768 x 1.25
    assert expert_parallel.gather_window(1, 6, 64) == 8  # padded rows give zeros
    assert expert_parallel.gather_window(16, 6, 64) == 8


# ---------------------------------------------------------------- scanned layers
def test_layer_schedule_scans_the_repeating_period():
    f = V4Config.preset("v4-flash")
    stages = layer_schedule(tuple(zip(f.layer_types, f.router_types)))
    assert sum(len(u) * r for u, r in stages) == f.n_layers
    assert sum(len(u) for u, _ in stages) <= 4  # distinct compiled blocks, not 43
    p = V4Config.preset("v4-pro")
    assert sum(len(u) for u, _ in layer_schedule(tuple(zip(p.layer_types, p.router_types)))) <= 4


@pytest.mark.slow
def test_scanned_stack_equals_applying_each_layer_in_turn_and_compiles_each_unit_once():
    L = RouterKind.LEARNED
    cfg = small_cfg(n_layers=7, layer_types=(S, C, H, C, H, C, H), router_types=(RouterKind.HASH,) + (L,) * 6)
    model = Transformer(cfg, rngs=nnx.Rngs(0), options=OPTIONS)
    assert [len(s.unit) * s.repeats for s in model.stages] == [1, 6] and model.stages[1].repeats == 3
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24)), jnp.int32)
    out = model(tokens, return_hidden_states=True)
    # by hand: slice each layer's parameters out of the stacks and apply the blocks one by one
    streams = out.hidden_states[0]
    for i, (s, p, r) in enumerate(model.layer_slots()):
        graphdef, state = nnx.split(model.stages[s].blocks[p])
        block = nnx.merge(graphdef, jax.tree.map(lambda a: a[r], state))
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        streams, _, _, _ = block(streams, tokens, positions)
        assert rel_err(streams, out.hidden_states[i + 1]) <= 1e-6, i
    jaxpr = jax.make_jaxpr(lambda t: model(t).logits)(tokens)
    assert str(jaxpr).count("scan[") >= len(model.stages)


# ---------------------------------------------------------------- bad meshes and rules
def test_bad_meshes_and_rules_fail_before_compiling():
    with pytest.raises(ShardingError, match="asks for 16 devices, but only 8 exist"):
        make_mesh("fsdp=16")
    with pytest.raises(ShardingError, match="unknown mesh axis 'pipeline'"):
        make_mesh("pipeline=2")
    with pytest.raises(ShardingError, match="only one axis may be -1"):
        make_mesh("fsdp=-1,expert=-1")
    with pytest.raises(ShardingError, match="unknown rules preset 'zero3'"):
        get_rules("zero3")
    with pytest.raises(ShardingError, match="unknown logical axis 'embedding'"):
        get_rules("fsdp", embedding=("fsdp",))
    cfg = small_cfg(dim=100)  # 100 does not split over 8
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), options=OPTIONS))
    with pytest.raises(ShardingError, match=r"embed.embedding: mesh axes \('fsdp',\) of sizes \(8,\) divide none of its "
                                            r"dimensions \(vocab=512, embed=100\)"):
        state_shardings(nnx.state(abstract), make_mesh("fsdp=8"), get_rules("fsdp", vocab=()))
    with pytest.raises(ShardingError, match=r"6 routed experts do not divide over mesh axes \('expert',\) of size 4"):
        expert_parallel.expert_parallel_ffn(
            jnp.zeros((8, 2, 128)), jnp.zeros((8, 2, 2), jnp.int32), jnp.ones((8, 2, 2)),
            jnp.zeros((6, 128, 64)), jnp.zeros((6, 128, 64)), jnp.zeros((6, 64, 128)),
            lambda *a: a[0], make_mesh("expert=4,fsdp=2"), get_rules("fsdp_ep"))
