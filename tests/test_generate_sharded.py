"""Generation over a mesh (issue 18): `Generator(model, mesh=..., rules=...)` on 8 CPU devices gives the
single-device tokens, and logits within 1e-5 (fp32), for greedy, seeded sampling, mixed prompt lengths
and speculative decoding, under each rules preset that applies; a bad mesh gets one clear error."""

import jax
import numpy as np
import pytest
from flax import nnx

from sharding.mesh import make_mesh
from sharding.rules import ShardingError, get_rules
from v4jax import Transformer, V4Config
from v4jax.config import RunOptions
from v4jax.inference.generate import Generator, Sampling

CFG = V4Config.preset("tiny")  # SWA, CSA, HCA, CSA + MTP; 4 heads, 8 experts
OPTIONS = RunOptions.preset("tiny")
PROMPTS = [list(range(5, 22)), list(range(40, 49)), [7, 3, 300, 11, 9, 2, 100, 64, 1, 5, 6, 8, 13]]
MESHES = [pytest.param("fsdp=8", "fsdp", id="fsdp"),
          pytest.param("fsdp=4,expert=2", "fsdp_ep", id="fsdp_ep"),
          pytest.param("data=2,tensor=2,expert=2", "fsdp_tp_ep", id="fsdp_tp_ep"),
          pytest.param("context=2,expert=2,fsdp=2", "long_context", id="long_context"),
          # serving layout: experts whole, every matrix over tensor; decode's 3 x 2 rows take the
          # gathered expert path (architecture.md §5.5)
          pytest.param("data=2,tensor=4", "serve_tp", id="serve_tp")]


def model():
    return Transformer(CFG, rngs=nnx.Rngs(0), options=OPTIONS)


def teacher_forced_logits(gen: Generator, prompts, follow: np.ndarray) -> np.ndarray:
    """Prefill the prompts (right-padded), then feed `follow` [B, S] one token per step: [B, 1 + S, V]."""
    B, T = len(prompts), max(map(len, prompts))
    padded = np.zeros((B, T), np.int32)
    for b, p in enumerate(prompts):
        padded[b, :len(p)] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    cache = gen.new_cache(B, T + follow.shape[1] + 1)
    logits, _, cache = gen._prefill(gen.state, cache, gen._put(padded), gen._put(lengths))
    out = [np.asarray(logits)]  # [B, V]: each row's last prompt token
    params = jax.tree.map(gen._put, Sampling().as_arrays())
    for s in range(follow.shape[1]):
        _, step_logits, cache = gen._step(gen.state, cache, gen._put(follow[:, s]), gen._put(lengths + s),
                                          gen._put(0), params)
        out.append(np.asarray(step_logits))
    return np.stack(out, axis=1)


@pytest.fixture(scope="module")
def single():
    gen = Generator(model())
    follow = np.random.default_rng(1).integers(0, CFG.vocab_size, (len(PROMPTS), 6)).astype(np.int32)
    return gen, follow, teacher_forced_logits(gen, PROMPTS, follow)


@pytest.mark.slow  # the default run checks V4.1's sharded generation (tests/test_v41_checkpoint.py)
@pytest.mark.parametrize("axes,rules", MESHES)
def test_sharded_generation_gives_the_single_device_tokens_and_logits(single, axes, rules):
    gen1, follow, want = single
    gen = Generator(model(), mesh=make_mesh(axes), rules=get_rules(rules))
    got = teacher_forced_logits(gen, PROMPTS, follow)  # prefill of mixed lengths, then cached decode
    assert float(np.linalg.norm(got - want) / np.linalg.norm(want)) <= 1e-5
    for kw in (dict(), dict(sampling=Sampling(temperature=0.8, top_k=50), seed=3)):
        a = gen1.generate(PROMPTS, max_new_tokens=6, **kw).tokens
        assert gen.generate(PROMPTS, max_new_tokens=6, **kw).tokens == a, kw


@pytest.mark.slow
def test_sharded_speculative_decoding_gives_the_single_device_tokens(single):
    gen1, _, _ = single
    gen = Generator(model(), mesh=make_mesh("fsdp=4,expert=2"), rules=get_rules("fsdp_ep"))
    want = gen1.generate(PROMPTS, max_new_tokens=6, speculative=True)
    got = gen.generate(PROMPTS, max_new_tokens=6, speculative=True)
    assert got.tokens == want.tokens and got.stats.drafted == want.stats.drafted


def test_a_mesh_that_cannot_split_the_model_is_refused_with_one_clear_error():
    with pytest.raises(ShardingError, match="divide none of its dimensions"):
        Generator(model(), mesh=make_mesh("tensor=8"), rules=get_rules("fsdp_tp_ep"))  # 4 heads over 8
    with pytest.raises(ShardingError, match="asks for 16 devices, but only 8 exist"):
        make_mesh("fsdp=16")
    with pytest.raises(ValueError, match="both a mesh and a rules table"):
        Generator(model(), mesh=make_mesh("fsdp=8"))


@pytest.mark.slow  # three processes, ~2.5 min on the 2-core host
def test_two_processes_generate_the_tokens_of_one(tmp_path):
    """infer.py on two processes (gloo on loopback, 4 CPU devices each) with one 8-device mesh prints
    the tokens one process with 8 devices prints."""
    import os
    import socket
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ckpt, ids = tmp_path / "ckpt", tmp_path / "ids.txt"
    ids.write_text("\n".join(" ".join(map(str, p)) for p in PROMPTS))
    env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "infer.py", "--write-random-checkpoint", str(ckpt)], env=env, cwd=root,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["infer.py", "--checkpoint", str(ckpt), "--prompt-ids", str(ids), "--max-new-tokens", "5",
              "--mesh", "fsdp=4,expert=2", "--rules", "fsdp_ep"]

    def start(devices: int, extra: list[str]):
        e = {**env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        return subprocess.Popen([sys.executable, *common, *extra], env=e, cwd=root, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    procs = [start(4, ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)])
             for i in range(2)] + [start(8, [])]
    outs, errs = [], []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
        outs.append([line for line in out.splitlines() if line[:1] == "[" and line[1:2].isdigit()])  # not gloo's
        errs.append(err)
    assert "fsdp_ep rules, 2 process(es)" in errs[0] and "fsdp_ep rules, 1 process(es)" in errs[2]
    assert outs[0] == outs[1] == outs[2] and len(outs[0]) == len(PROMPTS)
