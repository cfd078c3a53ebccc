"""The implementation switches give the same model: attention_impl (reference | pallas) and
moe_impl (reference | ragged_dot | pallas), logits and gradients (Pallas kernels interpreted on CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v4jax import Transformer, V4Config
from v4jax.config import RunOptions

CFG = V4Config.preset("tiny", n_mtp_layers=0)
OPTIONS = RunOptions.preset("tiny")
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (1, 40)), jnp.int32)


def logits_and_grads(**kw):
    model = Transformer(CFG, rngs=nnx.Rngs(0), options=OPTIONS.replace(**kw))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        logits = nnx.merge(graphdef, params, rest)(TOKENS).logits
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, TOKENS[:, 1:, None], axis=-1)), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.asarray(logits), {p: np.asarray(v.get_value(), np.float64) for p, v in nnx.to_flat_state(grads)}


def close(a, b):
    (la, ga), (lb, gb) = a, b
    assert np.linalg.norm(la - lb) <= 1e-5 * np.linalg.norm(lb)
    total = np.sqrt(sum(np.sum(g * g) for g in gb.values()))
    assert np.sqrt(sum(np.sum((ga[p] - g) ** 2) for p, g in gb.items())) <= 1e-5 * total
    for p, g in gb.items():  # tensors under 1% of the total norm are held to 1e-7 of it
        assert np.linalg.norm(ga[p] - g) <= 1e-5 * max(np.linalg.norm(g), 1e-2 * total), p


@pytest.fixture(scope="module")
def reference():
    return logits_and_grads()


@pytest.mark.slow
@pytest.mark.parametrize("kw", [dict(attention_impl="pallas"), dict(moe_impl="pallas"), dict(moe_impl="reference")],
                         ids=["attention_pallas", "moe_pallas", "moe_onehot"])
def test_every_implementation_gives_the_reference_logits_and_gradients(reference, kw):
    close(logits_and_grads(**kw), reference)


@pytest.mark.slow  # interpreted kernels: minutes on 2 cores; the kernel files test numerics in the default suite
def test_pallas_attention_and_moe_give_the_reference_logits():
    tokens = TOKENS[:, :24]
    want = Transformer(CFG, rngs=nnx.Rngs(0), options=OPTIONS)(tokens).logits
    got = Transformer(CFG, rngs=nnx.Rngs(0), options=OPTIONS.replace(attention_impl="pallas", moe_impl="pallas"))(tokens).logits
    assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) <= 1e-5
