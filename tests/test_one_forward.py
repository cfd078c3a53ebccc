"""One forward for training, prefill and decode (issue 16): the cached calls run the model's own
layers, so the kernels configured by attention_impl / moe_impl run in prefill and decode too, and the
cached logits equal the stateless ones whatever the implementation (fp32, 1e-5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v4jax import Transformer, V4Config
from v4jax.config import RunOptions
from v4jax.model.cache import init_cache
from v4jax.inference.generate import decode_step, prefill

CFG = V4Config.preset("tiny", n_mtp_layers=0)  # SWA, CSA, HCA, CSA; window 8, ratios 4 and 16
OPTIONS = RunOptions.preset("tiny")
TOKENS = jnp.asarray(np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 21)), jnp.int32)
PROMPT = 17  # the decode steps cross a CSA window boundary (20) and read an HCA entry (16)


def cached_logits(model, tokens, prompt: int):
    """Prefill `prompt` tokens into an empty cache, then decode the rest one token at a time (jitted)."""
    step = jax.jit(lambda m, c, t: decode_step(m, c, t))
    logits, cache = prefill(model, tokens[:, :prompt], None, init_cache(model.cfg, tokens.shape[0], 32, model.options.dtype))
    out = [logits]
    for t in range(prompt, tokens.shape[1]):
        logits, cache = step(model, cache, tokens[:, t:t + 1])
        out.append(logits)
    return jnp.concatenate(out, axis=1)


@pytest.fixture(scope="module")
def stateless():
    return Transformer(CFG, rngs=nnx.Rngs(0), options=OPTIONS)(TOKENS).logits


@pytest.mark.parametrize("impls", [dict(), pytest.param(dict(attention_impl="pallas"), marks=pytest.mark.slow),
                                   dict(moe_impl="pallas")],
                         ids=["reference", "attention_pallas", "moe_pallas"])
def test_prefill_and_decode_equal_the_stateless_forward_with_each_implementation(stateless, impls):
    got = cached_logits(Transformer(CFG, rngs=nnx.Rngs(0), options=OPTIONS.replace(**impls)), TOKENS, PROMPT)
    assert float(jnp.linalg.norm(got - stateless) / jnp.linalg.norm(stateless)) <= 1e-5


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_the_configured_kernel_is_the_code_the_decode_step_runs(impl):
    model = Transformer(CFG, rngs=nnx.Rngs(0), options=OPTIONS.replace(
        attention_impl=impl, moe_impl="pallas" if impl == "pallas" else "ragged_dot"))
    cache = init_cache(CFG, 1, 32)
    jaxpr = str(jax.make_jaxpr(lambda c, t: decode_step(model, c, t))(cache, jnp.zeros((1, 1), jnp.int32)))
    # the sparse-attention kernel (window ring + entries as index lists), the indexer's top-k kernel
    # and the grouped expert matmuls: each a pallas_call in the traced decode step
    assert ("pallas_call" in jaxpr) == (impl == "pallas")
    if impl == "pallas":
        assert jaxpr.count("pallas_call") >= 3


def test_a_stateless_call_and_an_empty_cache_prefill_give_the_same_logits(stateless):
    model = Transformer(CFG, rngs=nnx.Rngs(0), options=OPTIONS)
    out = model(TOKENS, cache=init_cache(CFG, 2, 32))
    assert float(jnp.linalg.norm(out.logits - stateless) / jnp.linalg.norm(stateless)) <= 1e-6
    assert np.array_equal(np.asarray(out.cache.lengths), [21, 21])
