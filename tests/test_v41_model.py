"""The DeepSeek-V4.1 text model (issue 20, architecture.md §12) against the golden outputs of DeepSeek's
official V4.1 code (fp32, `shared/fixtures/deepseek_v41/`): logits, every block's streams and the
Engram-updated streams of the text prompt, the logits of the image prompt (ViT, aligner, span
delimiters, bias_vl, Engram gate 0 on image spans); plus hand-checkable cases of the mechanisms."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v4jax.config import RunOptions
from v4jax.config_v41 import V41Config
from v4jax.model.mhc import collapse
from v4jax.model.v41 import Compressor, Image, V41Transformer, candidate_blocks

from v41_fixtures import FIXTURES, engram_ids, flash_shaped, needs_fixtures, quantised_release  # noqa: E402  (tests/v41_fixtures.py)
OPTIONS = RunOptions(dtype="float32", param_dtype="float32", attention_chunk=64)


def _load(name):
    return np.load(os.path.join(FIXTURES, name))


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def model():
    from safetensors.numpy import load_file

    from v4jax.io.official_v41 import load_official_v41

    cfg = V41Config.from_json_file(os.path.join(FIXTURES, "config_hf.json"))
    m = V41Transformer(cfg, rngs=nnx.Rngs(0), options=OPTIONS)
    load_official_v41(m, load_file(os.path.join(FIXTURES, "model.safetensors")))
    return m


@needs_fixtures
def test_text_prompt_equals_the_official_code(model):
    tokens = _load("input_ids.npy")
    out = nnx.jit(lambda m, t, e: m(t, e))(model, jnp.asarray(tokens, jnp.int32), engram_ids(model.cfg, tokens))
    assert _rel(out.logits, _load("logits.npy")) <= 1e-5
    hidden = _load("hidden_states.npy")
    assert max(_rel(h, hidden[i]) for i, h in enumerate(out.hidden_states)) <= 1e-5
    engram = _load("engram_block_inputs.npy")
    assert max(_rel(h, engram[i]) for i, h in enumerate(out.engram_inputs)) <= 1e-5


@needs_fixtures
def test_image_prompt_equals_the_official_code(model):
    tokens, types = _load("image_input_ids.npy"), _load("image_token_types.npy")
    images = (Image(0, 5, jnp.asarray(_load("image0_patches.npy")), (5, 7)),
              Image(1, 17, jnp.asarray(_load("image1_patches.npy")), (4, 3)))
    embeddings, image = model.embed_prompt(jnp.asarray(tokens, jnp.int32), images)
    np.testing.assert_array_equal(image, types >= 0)  # the spans, delimiters included
    out = model(jnp.asarray(tokens, jnp.int32), engram_ids(model.cfg, tokens, types >= 0), image, embeddings)
    assert _rel(out.logits, _load("image_logits.npy")) <= 1e-5


@needs_fixtures
def test_text_is_causal(model):
    tokens = _load("input_ids.npy")
    fwd = nnx.jit(lambda m, t, e: m(t, e).logits)
    base = fwd(model, jnp.asarray(tokens, jnp.int32), engram_ids(model.cfg, tokens))
    p = 23
    changed = tokens.copy()
    changed[:, p] = (changed[:, p] + 5) % model.cfg.vocab_size
    got = fwd(model, jnp.asarray(changed, jnp.int32), engram_ids(model.cfg, changed))
    np.testing.assert_allclose(got[:, :p], base[:, :p], rtol=1e-6, atol=1e-6)
    assert float(jnp.max(jnp.abs(got[:, p] - base[:, p]))) > 1e-4


def test_candidate_blocks_by_hand():
    # 10 entries in blocks of 4: [0-3], [4-7], [8-9]; block maxima 5, 7, 1
    scores = jnp.asarray([[[1, 5, 0, 0, 7, 2, 0, 0, 1, 0], [3, 0, 1] + [-np.inf] * 7]], jnp.float32)
    visible = jnp.asarray([10, 3])
    keep = np.asarray(candidate_blocks(scores, visible, 2, 4))
    # query 0: block 2 (the newest entry's) always, then the best other block (1, max 7)
    assert keep[0, 0].tolist() == [False] * 4 + [True] * 6
    # query 1 sees 3 entries: block 0 only; the other blocks are all -inf and dropped though 2 are asked
    assert keep[0, 1].tolist() == [True] * 4 + [False] * 6


def test_ratio_two_pools_pairs_with_a_per_channel_softmax_and_ratio_one_does_not_pool():
    cfg = V41Config.preset("v41-tiny")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1, 5, cfg.dim)), jnp.float32)
    two = Compressor(cfg, 2, rngs=nnx.Rngs(0), options=OPTIONS)
    got = np.asarray(two(x))
    assert got.shape == (1, 2, cfg.head_dim)  # the 5th token waits: pools nothing
    v = np.asarray(x) @ np.asarray(two.wkv.kernel[...])
    g = np.asarray(x) @ np.asarray(two.wgate.kernel[...])
    for n in range(2):
        w = np.exp(g[0, 2 * n:2 * n + 2]) / np.exp(g[0, 2 * n:2 * n + 2]).sum(0)  # per channel over the pair
        pooled = (w * v[0, 2 * n:2 * n + 2]).sum(0)
        np.testing.assert_allclose(got[0, n], pooled / np.sqrt(np.mean(pooled ** 2) + cfg.norm_eps), rtol=1e-5)
    one = Compressor(cfg, 1, rngs=nnx.Rngs(1), options=OPTIONS)
    assert one.wgate is None and one(x).shape == (1, 5, cfg.head_dim)


def test_a_ratio_one_query_can_pick_its_own_token():
    """Ratio 1: query t sees latents 0..t, its own token's included (no de-duplication with the window)."""
    cfg = V41Config.preset("v41-tiny", engram_layer_ids=(), engram_num_embeddings=(), vision_n_layers=0,
                           n_mtp_layers=0, compress_ratios=(0, 2, 2, 2, 1, 1, 1, 1), index_topk=40,
                           candidate_topk_blocks=11)
    m = V41Transformer(cfg, rngs=nnx.Rngs(0), options=OPTIONS)
    layer = m.block(4).attn  # ratio 1, KV and index source
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 12, cfg.dim)), jnp.float32)
    from v4jax.model.v41 import Shared

    _, shared, _, _ = layer(x, Shared(), jnp.arange(12)[None])
    picks = np.asarray(shared.topk)[0]  # [T, k]
    for t in range(12):
        assert sorted(p for p in picks[t] if p >= 0) == list(range(t + 1))


def test_engram_layers_need_their_hash_ids():
    m = V41Transformer(V41Config.preset("v41-tiny", vision_n_layers=0), rngs=nnx.Rngs(0), options=OPTIONS)
    with pytest.raises(ValueError, match="pass engram_ids"):
        m(jnp.zeros((1, 4), jnp.int32))


@pytest.mark.slow
def test_v41_flash_builds_abstractly_with_known_logical_axes():
    from sharding.rules import LOGICAL_AXES

    cfg = V41Config.preset("v41-flash")
    abstract = nnx.eval_shape(lambda: V41Transformer(cfg, rngs=nnx.Rngs(0), options=RunOptions(
        dtype="bfloat16", param_dtype="bfloat16")))
    names = {a for _, v in nnx.to_flat_state(nnx.state(abstract))
             for a in v.get_metadata().get("logical_axes", ()) if a is not None}
    assert names <= set(LOGICAL_AXES)
    sizes = {".".join(map(str, p)): int(np.prod(v.get_value().shape)) for p, v in nnx.to_flat_state(nnx.state(abstract))}
    experts = sum(n for k, n in sizes.items() if k.startswith("segments.") and ".ffn.experts." in k)
    drafts = sum(n for k, n in sizes.items() if k.startswith("dspark.") and ".ffn.experts." in k)
    assert drafts == 3 * 128 * 3 * 5120 * 2304  # the DSpark stages' 128 experts each
    engram = sum(n for k, n in sizes.items() if k.endswith("engram.table"))
    assert experts == 40 * 384 * 3 * 5120 * 2304  # routed experts: 543.6e9
    assert engram == (384008192 + 384020480) * 256  # the two Engram tables, rows padded to a multiple of 4096
    assert 7.5e11 < sum(sizes.values()) < 7.8e11  # text, vision and the three DSpark stages
    # every matrix places under the fsdp_ep rules on 8 devices (fsdp 2 x expert 4): nothing that
    # should split is left whole (the rules' strict check), the Engram tables split by columns (engram_cols)
    from sharding.mesh import make_mesh
    from sharding.partition import spec_table
    from sharding.rules import get_rules

    specs = spec_table(nnx.state(abstract), make_mesh("fsdp=2,expert=4"), get_rules("fsdp_ep"))
    assert tuple(specs["segments.0.runs.1.engram.table"]) == (None, ("fsdp", "expert"))  # layer 1
    assert specs["segments.1.runs.0.ffn.experts.w1"][:2] == (None, "expert")  # layers 2 and 8, stacked
    jax.clear_caches()


@needs_fixtures
def test_prefill_then_decode_equals_the_official_decode_and_the_stateless_forward(model):
    """The fixed decode path of the official code (README: index-key owners re-point on every call):
    prefill 40 tokens, then the 6 greedy steps one token at a time; and chunks of any size."""
    from v4jax.model.v41 import init_v41_cache

    cfg = model.cfg
    tokens, generated = _load("input_ids.npy"), _load("generated_ids.npy")
    full = np.concatenate([tokens, generated[:, :6]], axis=1)  # [2, 46]
    ids = engram_ids(cfg, full)  # the host hash over the whole history: what each call's rows are
    step = nnx.jit(lambda m, t, e, c: m(t, e, cache=c))
    out = step(model, jnp.asarray(tokens, jnp.int32), ids[:, :40], init_v41_cache(cfg, 2, 64))
    assert _rel(out.logits, _load("logits.npy")) <= 1e-5
    cache, logits = out.cache, []
    for j in range(6):
        out = step(model, jnp.asarray(full[:, 40 + j:41 + j], jnp.int32), ids[:, 40 + j:41 + j], cache)
        cache = out.cache
        logits.append(np.asarray(out.logits))
    logits = np.concatenate(logits, axis=1)
    assert _rel(logits, _load("decode_logits.npy")) <= 1e-5
    np.testing.assert_array_equal(logits.argmax(-1), generated[:, 1:7])
    stateless = np.asarray(model(jnp.asarray(full, jnp.int32), ids).logits)
    _check_dspark(model, tokens, full, ids)
    cache, chunks, p = init_v41_cache(cfg, 2, 64), [], 0
    for n in (17, 3, 1, 2, 3, 1, 17, 2):  # ratio-2 groups split across calls, single tokens, longer chunks
        out = step(model, jnp.asarray(full[:, p:p + n], jnp.int32), ids[:, p:p + n], cache)
        cache, p = out.cache, p + n
        chunks.append(np.asarray(out.logits))
    assert _rel(np.concatenate(chunks, axis=1), stateless) <= 1e-5


def _check_dspark(model, tokens, full, ids):
    """DSpark as the official forward_spec runs it: the rings seeded with the prefill's target features,
    then at each decode step the step's features and the token it sampled -> a block of 3 drafts, their
    logits (head + Markov bias) and confidences."""
    from v4jax.model.v41 import init_v41_cache

    step = nnx.jit(lambda m, t, e, c: m(t, e, cache=c))
    draft = nnx.jit(lambda m, f, c, t: m.draft(f, c, t))
    out = step(model, jnp.asarray(tokens, jnp.int32), ids[:, :40], init_v41_cache(model.cfg, 2, 64))
    cache = nnx.jit(lambda m, f, c: m.draft(f, c)[1])(model, out.target_features, out.cache)
    want_ids, want_logits = _load("dspark_draft_ids.npy"), _load("dspark_draft_logits.npy")
    want_confidence = _load("dspark_confidence.npy")
    for j in range(6):
        out = step(model, jnp.asarray(full[:, 40 + j:41 + j], jnp.int32), ids[:, 40 + j:41 + j], cache)
        d, cache = draft(model, out.target_features, out.cache, jnp.argmax(out.logits[:, -1], -1).astype(jnp.int32))
        np.testing.assert_array_equal(d.ids, want_ids[j])
        assert _rel(d.logits, want_logits[j]) <= 1e-5 and _rel(d.confidence, want_confidence[j]) <= 1e-5


@needs_fixtures
def test_the_release_storage_loads_with_its_per_role_block_sizes(model):
    from safetensors.numpy import load_file

    from v4jax.io.official_v41 import dequantize_release_v41, load_official_v41
    from v4jax.io.quant import QuantError, dequant_fp4, dequant_fp8_block, quant_fp8_block

    tensors = load_file(os.path.join(FIXTURES, "model.safetensors"))
    release = quantised_release(tensors)
    plain = dequantize_release_v41(release)
    name, expert = "layers.1.attn.wq_a.weight", "layers.1.ffn.experts.3.w2.weight"
    np.testing.assert_array_equal(plain[name], dequant_fp8_block(release[name], release[name[:-6] + "scale"], 32,
                                                                 np.float32))
    np.testing.assert_array_equal(plain[expert], dequant_fp4(release[expert], release[expert[:-6] + "scale"], 32,
                                                             np.float32))
    assert not any(k.endswith(".scale") and "engram" not in k for k in plain)
    # the whole model from the release storage = the model from the same values rounded by the test itself
    expected = {}
    for k, v in release.items():
        scale = release.get(k[:-len("weight")] + "scale")
        if k.endswith("engram.embed.weight"):
            expected[k] = v.astype(np.float32)
            expected[k[:-len("weight")] + "scale"] = scale.astype(np.float32)
        elif scale is not None:
            expected[k] = (dequant_fp4 if ".ffn.experts." in k else dequant_fp8_block)(v, scale, 32, np.float32)
        elif not k.endswith(".scale"):
            expected[k] = v
    tokens = _load("input_ids.npy")
    logits = []
    for ts in (plain, expected):
        m = V41Transformer(model.cfg, rngs=nnx.Rngs(1), options=OPTIONS)
        load_official_v41(m, ts)
        logits.append(np.asarray(m(jnp.asarray(tokens, jnp.int32), engram_ids(model.cfg, tokens)).logits))
    np.testing.assert_array_equal(logits[0], logits[1])
    assert _rel(logits[0], _load("logits.npy")) > 1e-3  # the rounding is there (this random model is not robust to it)
    # a V4-style 128 x 128 scale on a V4.1 FP8 weight is refused, naming it
    bad = dict(release)
    w = tensors["layers.2.attn.wo_b.weight"]
    bad["layers.2.attn.wo_b.weight"], bad["layers.2.attn.wo_b.scale"] = quant_fp8_block(np.pad(w, ((0, 64), (0, 96))),
                                                                                        128)
    with pytest.raises(QuantError, match="layers.2.attn.wo_b.weight"):
        dequantize_release_v41(bad)


def test_the_layer_plan_stacks_each_kind_once():
    from v4jax.model.v41 import layer_plan

    def plan(cfg):
        return [[(len(run), len(run[0]), run[0][0]) for run in segment] for segment in layer_plan(cfg)]

    # v41-flash: (repeats, count, first layer) per run; a unit's runs repeat together
    flash = V41Config.preset("v41-flash")
    assert plan(flash.without_dspark()) == [[(1, 1, 0), (1, 1, 1)], [(2, 1, 2), (2, 5, 3)],
                                            [(1, 1, 14), (1, 5, 15), (1, 1, 20), (1, 3, 21)], [(4, 1, 24), (4, 3, 25)]]
    assert plan(flash)[-2:] == [[(4, 3, 21), (4, 1, 24)], [(1, 3, 37)]]  # 37-39 feed DSpark: their own kind
    assert plan(flash_shaped())[1] == [(2, 1, 2), (2, 2, 3)]  # layers 2, 3-4, then 5, 6-7
    ids = [i for segment in layer_plan(flash) for run in segment for r in run for i in r]
    assert sorted(ids) == list(range(40))


def _rows(model, cfg, B, T, seed):
    rng = np.random.default_rng(seed)
    cols = cfg.engram_n_heads * (cfg.engram_max_ngram_size - 1)
    n = [model.block(i).engram.table.shape[0] for i in cfg.engram_layer_ids]
    return jnp.asarray(np.stack([rng.integers(0, r, (B, T, cols)) for r in n], axis=2), jnp.int32)


def test_the_scanned_backbone_equals_a_loop_over_its_layers():
    """Stacked runs in repeated units (scan in scan), single blocks, Engram and DSpark targets: the model's
    forward equals the blocks called one by one, layer after layer (architecture.md §12.3); the hidden
    states and the routing statistics come back in layer order; prefill + decode through the stacked
    cache equal the stateless forward."""
    from v4jax.model.v41 import Shared, init_v41_cache, widen

    cfg = flash_shaped()
    model = V41Transformer(cfg, rngs=nnx.Rngs(3), options=OPTIONS)
    B, T = 2, 24
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    rows = _rows(model, cfg, B, T, 1)
    out = nnx.jit(lambda m, t, e: m(t, e))(model, tokens, rows)

    streams, pre = widen(model.embed(tokens, jnp.float32), cfg.hc_mult)
    shared, targets, positions = Shared(), [], jnp.broadcast_to(jnp.arange(T), (B, T))
    for i in range(cfg.n_layers):
        block = model.block(i)
        if block.engram is not None:
            streams = block.engram(streams, rows[:, :, cfg.engram_layer_ids.index(i)], None)
        if i in cfg.dspark_target_layer_ids:
            targets.append(jnp.mean(streams, axis=2))
        streams, pre, shared, _, stats, _ = block(streams, pre, shared, None, positions)
        np.testing.assert_allclose(out.hidden_states[i], streams, rtol=1e-5, atol=1e-5, err_msg=f"layer {i}")
        np.testing.assert_array_equal(out.routing.load[i], stats.load, err_msg=f"layer {i}: expert load")
        np.testing.assert_allclose(out.routing.mean_affinity[i], stats.mean_affinity, rtol=1e-5, err_msg=f"layer {i}")
    want = model.head(model.norm(collapse(pre, streams)), jnp.float32)
    assert _rel(out.logits, want) <= 1e-6
    assert _rel(out.target_features, jnp.concatenate(targets, -1)) <= 1e-6

    step = nnx.jit(lambda m, t, e, c: m(t, e, cache=c))
    cache, got = init_v41_cache(cfg, B, 32), []
    for a, b in ((0, 15), (15, 16), (16, 17), (17, T)):
        o = step(model, tokens[:, a:b], rows[:, a:b], cache)
        cache = o.cache
        got.append(o.logits)
    assert _rel(jnp.concatenate(got, 1), out.logits) <= 1e-5


@pytest.mark.slow
def test_remat_changes_neither_the_scanned_backbones_loss_nor_its_gradient():
    """Full remat (each stacked block recomputed in the backward pass) on the flash-shaped backbone."""
    cfg = flash_shaped()
    model = V41Transformer(cfg, rngs=nnx.Rngs(3), options=OPTIONS)
    B, T = 2, 24
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    rows = _rows(model, cfg, B, T, 1)

    def loss(m):
        return jnp.mean(m(tokens, rows, return_hidden_states=False).logits ** 2)

    remat = V41Transformer(cfg, rngs=nnx.Rngs(3), options=OPTIONS.replace(remat="full"))
    (l0, g0), (l1, g1) = (nnx.jit(nnx.value_and_grad(loss))(m) for m in (model, remat))
    assert abs(float(l0 - l1)) <= 1e-6 * abs(float(l0))
    for (path, a), (_, b) in zip(nnx.to_flat_state(g0), nnx.to_flat_state(g1)):
        np.testing.assert_allclose(a.get_value(), b.get_value(), rtol=1e-4, atol=1e-7, err_msg=str(path))


def test_a_cached_call_reads_the_stacked_parameters_in_place():
    """A cached call (prefill, decode) scans layer indices and each block reads its slice of the full
    parameter stacks, so no scan takes a stack, or a repeat's slice of one, as its input (XLA copies
    such a slice out of the stack before an inner scan; architecture.md §12.3); a stateless call (the
    one training differentiates) scans the stacks themselves."""
    from v4jax.model.v41 import init_v41_cache, stack_dims

    cfg = flash_shaped()
    # bf16 parameters: the caches and activations are fp32, so a bf16 scan input is a parameter slice
    model = V41Transformer(cfg, rngs=nnx.Rngs(0), options=OPTIONS.replace(param_dtype="bfloat16"))
    stacked = set()
    for segment, ids in zip(model.segments, model.plan):
        for run, block in zip(ids, segment.runs):
            lead = stack_dims(run)
            for a in jax.tree.leaves(nnx.state(block, nnx.Param)):
                if lead and a.dtype == jnp.bfloat16:
                    stacked.update({a.shape, a.shape[1:]} if len(lead) == 2 else {a.shape})
    assert any(len(stack_dims(run)) == 2 for ids in model.plan for run in ids)  # a scan in a scan is covered

    def scanned_inputs(jaxpr):  # the shapes of every bf16 array any scan (at any depth) takes as xs
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "scan":
                skip = eqn.params["num_consts"] + eqn.params["num_carry"]
                yield from (v.aval.shape for v in eqn.invars[skip:] if v.aval.dtype == jnp.bfloat16)
            for value in eqn.params.values():  # nested jaxprs: scan, cond, jit, checkpoint bodies
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                    if hasattr(sub, "eqns"):
                        yield from scanned_inputs(sub)

    B, T = 2, 8
    tokens, rows = jnp.zeros((B, T), jnp.int32), _rows(model, cfg, B, T, 1)
    graphdef, state = nnx.split(model)
    decode = lambda s, c: nnx.merge(graphdef, s)(tokens[:, :1], rows[:, :1], cache=c)  # noqa: E731
    cached = jax.make_jaxpr(decode)(state, init_v41_cache(cfg, B, 16))
    stateless = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens, rows))(state)
    assert stacked & set(scanned_inputs(stateless.jaxpr))  # the stateless call scans the stacks
    assert not stacked & set(scanned_inputs(cached.jaxpr))


def test_a_stacked_variable_is_read_one_layer_at_a_time_into_its_devices():
    """The loader builds a stacked parameter layer by layer (each layer's tensors read once, host memory
    one layer beside the devices' slices), in the plan's order, into the sharding the rules give."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    from jax.sharding import NamedSharding, PartitionSpec

    from sharding.mesh import make_mesh
    from v4jax.io.official_v41 import _placed

    rng = np.random.default_rng(0)
    layers = [rng.normal(size=(6, 8)).astype(np.float32) for _ in range(6)]
    calls = []
    builds = [lambda k=k: calls.append(k) or layers[k] for k in range(6)]
    keys = [f"layers.{k}.w" for k in range(6)]
    sharding = NamedSharding(make_mesh("fsdp=2,expert=4"), PartitionSpec(None, None, "fsdp", "expert"))
    for where in (sharding, None):
        calls.clear()
        got = _placed(builds, (2, 3), (2, 3, 6, 8), np.float32, keys, "segments.1.runs.0.w", where)
        assert calls == list(range(6))  # once each, whatever the devices
        np.testing.assert_array_equal(np.asarray(got), np.stack(layers).reshape(2, 3, 6, 8))
        assert where is None or got.sharding == where
    layers[4] = layers[4][:, :7]
    with pytest.raises(ValueError, match=r"'layers.4.w' gives shape \(6, 7\) for a layer of segments.1.runs.0.w"):
        _placed(builds, (2, 3), (2, 3, 6, 8), np.float32, keys, "segments.1.runs.0.w", sharding)
