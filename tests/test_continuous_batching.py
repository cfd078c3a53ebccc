"""Continuous batching (issue 18): `Generator.serve` decodes `slots` sequences together and gives a
finished row's slot to the next prompt without recompiling; every prompt gets the tokens it gets alone
(greedy and seeded sampling, stop tokens, on one device and over a mesh), and `infer.py --prompts-file`
serves a file of prompts this way."""

import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from sharding.mesh import make_mesh
from sharding.rules import get_rules
from v4jax import Transformer, V4Config
from v4jax.config import RunOptions
from v4jax.inference.generate import Generator, Sampling

CFG = V4Config.preset("tiny", n_mtp_layers=0)
RNG = np.random.default_rng(0)
PROMPTS = [list(map(int, RNG.integers(2, 500, n))) for n in (5, 17, 3, 9, 12)]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model():
    return Transformer(CFG, rngs=nnx.Rngs(0), options=RunOptions.preset("tiny"))


@pytest.fixture(scope="module")
def gen():
    return Generator(model())


@pytest.mark.parametrize("kw", [dict(), dict(sampling=Sampling(temperature=0.9, top_k=40), seed=5)],
                         ids=["greedy", "sampling"])
def test_every_prompt_gets_the_tokens_it_gets_alone(gen, kw):
    # alone, each prompt is prefilled in chunks of 8: one compiled prefill shape for every length
    alone = [gen.generate([p], max_new_tokens=6, max_len=40, prefill_chunk=8, **kw).tokens[0] for p in PROMPTS]
    stats: list = []
    order = []
    for index, ids in gen.serve(PROMPTS, slots=3, max_new_tokens=6, max_len=40, stats=stats, **kw):
        assert ids == alone[index]
        order.append(index)
    assert sorted(order) == list(range(len(PROMPTS)))
    assert stats[0].generated_tokens == 6 * len(PROMPTS) and stats[0].prompt_tokens == sum(map(len, PROMPTS))
    # one compiled prefill-into-slot and one compiled decode step served every prompt
    assert gen._prefill_slot._cache_size() == 1 and gen._serve_step._cache_size() == 1


def test_stop_tokens_free_slots_early(gen):
    alone = [gen.generate([p], max_new_tokens=8, max_len=40, prefill_chunk=8).tokens[0] for p in PROMPTS]
    stop = alone[1][2]  # prompt 1 stops at its third token; others may stop too
    want = {i: a[:a.index(stop) + 1] if stop in a else a for i, a in enumerate(alone)}
    got = dict(gen.serve(PROMPTS, slots=2, max_new_tokens=8, max_len=40, stop_tokens=[stop]))
    assert got == want


@pytest.mark.slow
def test_continuous_batching_over_a_mesh(gen):
    alone = [gen.generate([p], max_new_tokens=5, max_len=40, prefill_chunk=8).tokens[0] for p in PROMPTS]
    sharded = Generator(model(), mesh=make_mesh("data=2,tensor=2,expert=2"), rules=get_rules("fsdp_tp_ep"))
    got = dict(sharded.serve(PROMPTS, slots=4, max_new_tokens=5, max_len=40))
    assert got == dict(enumerate(alone))


def test_serve_refuses_what_does_not_fit(gen):
    with pytest.raises(ValueError, match="prompt 0 has 35 tokens; allowed 1..34"):
        list(gen.serve([[1] * 35], slots=1, max_new_tokens=6, max_len=40))
    with pytest.raises(ValueError, match="slots must be a positive integer"):
        list(gen.serve(PROMPTS, slots=0, max_new_tokens=6))


@pytest.mark.slow
def test_infer_serves_a_prompts_file(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    ckpt = tmp_path / "ckpt"
    r = subprocess.run([sys.executable, "infer.py", "--write-random-checkpoint", str(ckpt)], env=env, cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (tmp_path / "prompts.txt").write_text("hello\nthe quick brown fox\n\nab\n")
    r = subprocess.run([sys.executable, "infer.py", "--checkpoint", str(ckpt), "--prompts-file",
                        str(tmp_path / "prompts.txt"), "--tokenizer", "byte", "--slots", "2", "--max-new-tokens", "4"],
                       env=env, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(line.split("]")[0] for line in r.stdout.splitlines() if line.startswith("[")) == ["[0", "[1", "[2"]
    assert "served 3 prompts over 2 slots" in r.stderr and "new tokens/s" in r.stderr
