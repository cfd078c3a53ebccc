"""The inference cache layout (v4jax.model.cache, v4jax.inference.cache_size): sizes, logical axes / shardings, the size calculator
against architecture.md §4.7 / architecture.md §4.7, and the `python -m v4jax.parity dump --decode-from` path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v4jax.inference import cache_size as S
from v4jax.model import cache as C
from v4jax.config import AttentionKind, V4Config


def test_release_format_reproduces_spec_per_token_figures_and_reductions():
    flash, pro = V4Config.preset("v4-flash"), V4Config.preset("v4-pro")
    f, p, base = S.cache_size(flash), S.cache_size(pro), S.v32_baseline_size()
    # architecture.md §4.7: 21*(583+68)/4 + 20*583/128 ~ 3.51 KB; 30*(583+68)/4 + 31*583/128 ~ 5.02 KB; 61*(656+132) ~ 48.1 KB
    assert f.per_token == pytest.approx(21 * (583 + 68) / 4 + 20 * 583 / 128)
    assert round(f.per_token / 1e3, 2) == 3.51 and round(p.per_token / 1e3, 2) == 5.02
    assert round(base.per_token / 1e3, 1) == 48.1
    assert round(f.total(1048576) / 1e9, 1) == 3.7 and round(p.total(1048576) / 1e9, 1) == 5.3
    assert round(f.fixed / 1e6, 1) == 3.2 and round(p.fixed / 1e6, 1) == 4.6  # 43 / 61 layers x 128 x 583 B
    # report: 13.7x (Flash) and 9.5x (Pro; 9.6x from this accounting) smaller than V3.2 at 1M
    assert round(base.total(1048576) / f.total(1048576), 1) == 13.7
    assert round(base.total(1048576) / p.total(1048576), 1) == 9.6
    # technical report §2.3.4: V4-Pro ~ 2% of a BF16 GQA-8 (head dim 128) cache
    assert round(100 * p.per_token / S.gqa_baseline_size(pro.n_layers).per_token) == 2


@pytest.mark.parametrize("numerics", ["exact", "release"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-b"])
def test_allocated_cache_bytes_equal_the_layout_calculator(preset, numerics):
    cfg = V4Config.preset(preset)
    max_len = 128  # a multiple of every ratio: no rounding
    dtype = "bfloat16" if numerics == "release" else "float32"
    cache = jax.eval_shape(lambda: C.init_cache(cfg, 1, max_len, dtype, mtp=False, numerics=numerics))
    s = S.cache_size(cfg, "layout", dtype, numerics)
    lengths_bytes = 4
    assert C.cache_nbytes(cache) == pytest.approx(s.total(max_len) + lengths_bytes)


def test_with_release_numerics_the_layout_is_the_release_format():
    """Issue 17: the cache of a release-numerics model holds the release's FP8 / FP4 formats, so the
    calculator's layout and release figures agree (583 B per KV entry, 68 B per indexer key)."""
    for name in ("v4-flash", "v4-pro"):
        cfg = V4Config.preset(name)
        layout, release = S.cache_size(cfg, "layout", "bfloat16", "release"), S.cache_size(cfg, "release")
        assert layout.per_token == release.per_token
        assert layout.per_token < S.cache_size(cfg, "layout", "bfloat16").per_token / 1.7


def test_init_cache_layout_per_stage_and_kind():
    cfg = V4Config.preset("tiny")  # layers S, C, H, C
    cache = C.init_cache(cfg, 3, 64)
    kinds = [k for unit, _ in C.stage_units(cfg) for k, _ in unit]
    layers = [lc for stage in cache.stages for lc in stage]
    assert len(layers) == len(kinds)
    for (unit, repeats), stage in zip(C.stage_units(cfg), cache.stages):
        for (kind, _), lc in zip(unit, stage):
            R = repeats
            assert lc.window.shape == (R, 3, cfg.window_size, cfg.head_dim)
            m = cfg.compress_ratio(kind)
            if kind is AttentionKind.SLIDING:
                assert lc.compressor is None and lc.indexer is None
            else:
                kappa = 2 if kind is AttentionKind.CSA else 1
                assert lc.compressor.entries.shape == (R, 3, 64 // m, cfg.head_dim)
                assert lc.compressor.logits.shape == (R, 3, kappa * m, kappa * cfg.head_dim)
                assert bool(jnp.all(lc.compressor.logits == -jnp.inf))  # no token yet: softmax weight 0
            if kind is AttentionKind.CSA:
                assert lc.indexer.entries.shape == (R, 3, 64 // m, cfg.index_head_dim)
                assert lc.indexer.values.shape == (R, 3, 2 * m, 2 * cfg.index_head_dim)
    assert cache.mtp.window.shape == (3, cfg.window_size, cfg.head_dim)
    assert cache.lengths.shape == cache.mtp_lengths.shape == (3,)


def is_axes(x):
    return isinstance(x, tuple) and bool(x) and all(isinstance(n, (str, type(None))) for n in x)


def test_logical_axes_name_every_dimension_and_resolve_on_a_mesh():
    from sharding.mesh import make_mesh
    from sharding.rules import get_rules

    cfg = V4Config.preset("tiny")
    cache = jax.eval_shape(lambda: C.init_cache(cfg, 8, 64))
    axes = C.cache_logical_axes(cache)
    for a, names in zip(jax.tree.leaves(cache), jax.tree.leaves(axes, is_leaf=is_axes)):
        assert len(names) == len(a.shape)
    mesh = make_mesh("fsdp=4,expert=2")
    sh = C.cache_shardings(cache, mesh, get_rules("fsdp_ep"))
    assert sh.lengths.spec[0] == ("fsdp", "expert")  # the batch over the data axes
    window = sh.stages[0][0].window.spec
    assert window[0] is None and window[1] == ("fsdp", "expert")
    # batch 1 (decode of one request) stays whole instead of failing to divide
    one = C.cache_shardings(jax.eval_shape(lambda: C.init_cache(cfg, 1, 64)), mesh, get_rules("fsdp_ep"))
    assert one.lengths.spec[0] is None


def test_bad_cache_arguments_raise_value_errors():
    cfg = V4Config.preset("tiny")
    with pytest.raises(ValueError, match="max_seq_len"):
        C.init_cache(cfg, 1, cfg.max_seq_len + 1)
    with pytest.raises(ValueError, match="batch"):
        C.init_cache(cfg, 0, 16)
    with pytest.raises(ValueError, match="MTP"):
        C.init_cache(cfg.replace(n_mtp_layers=0), 1, 16, mtp=True)
    with pytest.raises(ValueError, match="fmt"):
        S.cache_size(cfg, "fp8")


def test_calculator_command_prints_the_table(capsys):
    assert S.main(["--config", "v4-flash", "--context", "1048576"]) == 0
    out = capsys.readouterr().out
    assert "v4-flash" in out and "3.68 GB" in out and "13.7x smaller" in out and "V3.2 baseline" in out
    assert S.main(["--context", "0"]) == 2


@pytest.mark.slow
def test_parity_dump_decode_from_equals_the_stateless_logits(tmp_path):
    from flax import nnx

    from v4jax import parity
    from v4jax.io.checkpoint import save_hf
    from v4jax.model.transformer import Transformer

    cfg = V4Config.preset("tiny-b")
    save_hf(Transformer(cfg, rngs=nnx.Rngs(0)), str(tmp_path / "ckpt"))
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 30))
    np.save(tmp_path / "ids.npy", ids)
    assert parity.main(["dump", "--checkpoint", str(tmp_path / "ckpt"), "--input-ids", str(tmp_path / "ids.npy"),
                        "--out", str(tmp_path / "out"), "--decode-from", "17"]) == 0
    dec = np.load(tmp_path / "out" / "decode_logits.npy")
    full = np.load(tmp_path / "out" / "logits.npy")
    assert dec.shape == (2, 30 - 17 + 1, cfg.vocab_size)
    assert np.linalg.norm(dec - full[:, 16:]) / np.linalg.norm(full[:, 16:]) <= 1e-5
    assert parity.main(["dump", "--checkpoint", str(tmp_path / "ckpt"), "--input-ids", str(tmp_path / "ids.npy"),
                        "--out", str(tmp_path / "out2"), "--decode-from", "31"]) == 2
