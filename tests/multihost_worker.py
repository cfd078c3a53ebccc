"""One process of the multi-host test (tests/test_multihost.py), or the single-process reference.

usage: python tests/multihost_worker.py OUT.npz NUM_PROCESSES PROCESS_ID PORT LOCAL_DEVICES
Builds the tiny model sharded over an fsdp x expert mesh spanning every process, feeds each host only
its rows of the batch, and writes (from process 0) the loss, the logits and the parameters after one
SGD step, all gathered to the host."""

import os
import sys

out, n_proc, proc, port, local = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local}"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from sharding.distributed import initialize  # noqa: E402

if n_proc > 1:
    initialize(f"127.0.0.1:{port}", n_proc, proc)

from sharding.context import use_mesh_rules  # noqa: E402
from sharding.mesh import make_mesh  # noqa: E402
from sharding.partition import create_sharded, host_local_to_global  # noqa: E402
from sharding.rules import get_rules  # noqa: E402
from v4jax.config import RunOptions, V4Config  # noqa: E402
from v4jax.model.transformer import Transformer  # noqa: E402

assert jax.device_count() == 8, jax.devices()
cfg = V4Config.preset("tiny", n_mtp_layers=0, max_seq_len=64)
mesh, rules = make_mesh("fsdp=2,expert=4"), get_rules("fsdp_ep")
model = create_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0), options=RunOptions(attention_chunk=16)), mesh, rules)
B, T = 8, 32
tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
rows = B // jax.process_count()
local_rows = tokens[jax.process_index() * rows:(jax.process_index() + 1) * rows]  # this host's shard only
batch = host_local_to_global(local_rows, mesh, rules, (B, T))

graphdef, params, rest = nnx.split(model, nnx.Param, ...)


def loss_fn(params, rest, tokens):
    logits = nnx.merge(graphdef, params, rest)(tokens).logits
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)), logits


@jax.jit
def step(params, rest, tokens):
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, tokens)
    return loss, logits, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)


with use_mesh_rules(mesh, rules):
    loss, logits, new_params = step(params, rest, batch)


def gather(a):
    if a.is_fully_replicated:
        return np.asarray(a.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))


result = {"loss": gather(loss), "logits": gather(logits)}
for path, v in nnx.to_flat_state(new_params):
    result["param/" + ".".join(map(str, path))] = gather(v.get_value())
if jax.process_index() == 0:
    np.savez(out, **result)
