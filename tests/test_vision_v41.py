"""V4.1 vision tower + aligner (issue 20; architecture.md §12): the golden image embeddings of the official
code, the 2D RoPE and the aligner's unfold order on hand-made cases, the span layout, the loader's errors."""

import math
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sharding.rules import LOGICAL_AXES
from v4jax.config_v41 import V41Config
from v4jax.model.vision import (
    TOKEN_IMAGE,
    TOKEN_IMAGE_END,
    TOKEN_IMAGE_NEWLINE,
    TOKEN_IMAGE_START,
    Aligner,
    VisionTower,
    apply_vision_rope,
    encode_image,
    image_span_layout,
    load_vision_params,
    unfold_cells,
    vision_rope_angles,
)

from v41_fixtures import FIXTURES, needs_fixtures  # noqa: E402  (tests/v41_fixtures.py)

# (ViT grid, aligner grid, span length, span start in image_input_ids) of the two fixture images (README)
FIXTURE_IMAGES = {0: ((5, 7), (2, 3), 10, 5), 1: ((4, 3), (2, 1), 6, 17)}


def _tensors():
    from safetensors.numpy import load_file  # the `test` extra
    return load_file(os.path.join(FIXTURES, "model.safetensors"))


@pytest.fixture(scope="module")
def tiny_modules():
    cfg = V41Config.preset("v41-tiny")
    tower, aligner = VisionTower(cfg, nnx.Rngs(0)), Aligner(cfg, nnx.Rngs(1))
    load_vision_params(tower, aligner, _tensors())
    return cfg, tower, aligner


@nnx.jit(static_argnames="grid")
def _encode(tower, aligner, patches, grid):
    return encode_image(tower, aligner, patches, grid)


@needs_fixtures
@pytest.mark.parametrize("image", [0, 1])
def test_fixture_images_match_the_official_embeddings(tiny_modules, image):
    cfg, tower, aligner = tiny_modules
    grid, (hp, wp), _, _ = FIXTURE_IMAGES[image]
    patches = np.load(os.path.join(FIXTURES, f"image{image}_patches.npy"))  # [h*w, 3, 14, 14]
    want = np.load(os.path.join(FIXTURES, f"image{image}_embeds.npy"))  # [h'*w', dim]
    assert patches.shape == (grid[0] * grid[1], 3, 14, 14) and want.shape == (hp * wp, cfg.dim)
    got = np.asarray(_encode(tower, aligner, jnp.asarray(patches.reshape(len(patches), -1)), grid))
    assert got.shape == want.shape and got.dtype == np.float32
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel < 1e-5, f"image {image}: max |diff| / max |want| = {rel:.2e}"
    # the [N, 3, p, p] form gives the same rows
    np.testing.assert_array_equal(np.asarray(_encode(tower, aligner, jnp.asarray(patches), grid)), got)


def test_2d_rope_rotates_row_pairs_by_row_and_column_pairs_by_column():
    c, theta = 8, 10000.0  # f = [1, 10000^(-1/2)] = [1, 0.01]; pairs (0,4) (1,5) by row, (2,6) (3,7) by column
    angles = vision_rope_angles((3, 4), c, theta)  # [12, 4]
    np.testing.assert_allclose(angles[6], [1.0, 0.01, 2.0, 0.02], rtol=1e-6)  # patch 6 = (row 1, col 2)
    np.testing.assert_array_equal(angles[0], 0.0)
    np.testing.assert_allclose(angles[11], [2.0, 0.02, 3.0, 0.03], rtol=1e-6)  # (row 2, col 3)

    basis = jnp.eye(c, dtype=jnp.float32)[:, None, :]  # [8 vectors, 1 head, 8]: e_j each
    got = np.asarray(apply_vision_rope(basis, jnp.broadcast_to(jnp.asarray(angles[6]), (c, c // 2))))[:, 0]
    want = np.zeros((c, c), np.float32)  # want[j] = the rotated e_j
    for i, a in enumerate([1.0, 0.01, 2.0, 0.02]):  # pair (i, i + 4) turns by a
        want[i, i], want[i, i + 4] = math.cos(a), math.sin(a)
        want[i + 4, i], want[i + 4, i + 4] = -math.sin(a), math.cos(a)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_aligner_unfold_pads_and_orders_features_channel_major():
    h, w, ch, r = 4, 5, 2, 3  # -> aligner grid 2 x 2, the last cell row / column partly padding

    def value(row, col, c):
        return 1 + 1000 * c + 10 * row + col

    x = np.array([[value(n // w, n % w, c) for c in range(ch)] for n in range(h * w)], np.float32)  # [20, 2]
    got = np.asarray(unfold_cells(jnp.asarray(x), (h, w), r))
    assert got.shape == (4, ch * r * r)
    for cell, (ci, cj) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):  # cells in row-major order
        for c in range(ch):
            for ki in range(r):
                for kj in range(r):
                    row, col = ci * r + ki, cj * r + kj
                    want = value(row, col, c) if row < h and col < w else 0.0
                    assert got[cell, c * r * r + ki * r + kj] == want, (cell, c, ki, kj)
    assert got[1, 0] == 4 and got[3, 9 + 1] == 1035 and got[3, 9 + 3] == 0  # spot checks, by hand


@needs_fixtures
def test_span_layout_of_the_fixture_images():
    types = np.load(os.path.join(FIXTURES, "image_token_types.npy"))  # [2, 40]
    for image, (grid, agrid, n_tokens, start) in FIXTURE_IMAGES.items():
        span = image_span_layout(grid)
        assert (span.n_tokens, span.aligner_grid, span.n_embeds) == (n_tokens, agrid, agrid[0] * agrid[1])
        np.testing.assert_array_equal(span.token_types, types[image, start:start + n_tokens])
    assert image_span_layout((5, 7)).token_types.tolist() == [0, 1, 1, 1, 2, 1, 1, 1, 2, 3]
    assert image_span_layout((1, 1)).token_types.tolist() == [
        TOKEN_IMAGE_START, TOKEN_IMAGE, TOKEN_IMAGE_NEWLINE, TOKEN_IMAGE_END]


@needs_fixtures
def test_loader_names_missing_and_mis_shaped_tensors():
    cfg = V41Config.preset("v41-tiny")
    tower, aligner = VisionTower(cfg, nnx.Rngs(0)), Aligner(cfg, nnx.Rngs(1))
    tensors = _tensors()
    before = np.asarray(tower.patch_embed.bias[...])
    missing = {k: v for k, v in tensors.items() if k != "vision.blocks.1.attn.wqkv.bias"}
    with pytest.raises(ValueError, match=r"missing vision\.blocks\.1\.attn\.wqkv\.bias"):
        load_vision_params(tower, aligner, missing)
    bad = dict(tensors, **{"aligner.w1.weight": tensors["aligner.w1.weight"].T})
    with pytest.raises(ValueError, match=r"aligner\.w1\.weight has shape \(288, 64\), expected \(64, 288\)"):
        load_vision_params(tower, aligner, bad)
    np.testing.assert_array_equal(np.asarray(tower.patch_embed.bias[...]), before)  # nothing written


def test_grid_must_match_the_patches():
    cfg = V41Config.preset("v41-tiny")
    tower = VisionTower(cfg, nnx.Rngs(0))
    with pytest.raises(ValueError, match="12 patches for a ViT grid of 3 x 5"):
        tower(jnp.zeros((12, 3 * 14 * 14)), (3, 5))


def test_flash_shapes_and_logical_axes():
    cfg = V41Config.preset("v41-flash")
    tower = nnx.eval_shape(lambda: VisionTower(cfg, nnx.Rngs(0), param_dtype=jnp.bfloat16))
    aligner = nnx.eval_shape(lambda: Aligner(cfg, nnx.Rngs(0), param_dtype=jnp.bfloat16))
    n = 0
    for module in (tower, aligner):
        for _, var in nnx.iter_graph(module):
            if isinstance(var, nnx.Param):
                axes = var.get_metadata()["logical_axes"]
                assert len(axes) == len(var.shape) and all(a is None or a in LOGICAL_AXES for a in axes), axes
                n += math.prod(var.shape)
    d, i = 1024, 2816
    per_block = 2 * d + 4 * (d * d + d) + 3 * d * i
    assert n == (588 * d + d) + 32 * per_block + d + (9 * d * 5120 + 5120) + (5120 * 5120 + 5120)
    assert tower.blocks[0].attn.wq.linear.kernel.shape == (d, d) and aligner.w1.linear.kernel.shape == (9 * d, 5120)


def test_attention_in_query_chunks_equals_whole():
    """The scores are built for a chunk of queries at a time (memory); the output is the same."""
    import jax

    from v4jax.model.vision import VisionAttention, vision_rope_angles

    cfg = V41Config.preset("v41-tiny")
    attn = VisionAttention(cfg, param_dtype=np.float32, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (35, cfg.vision_dim))
    angles = vision_rope_angles((5, 7), cfg.vision_dim // cfg.vision_n_heads, cfg.vision_rope_theta)
    whole = attn(x, angles)
    attn.query_chunk = 8  # 35 queries: chunks of 8, 8, 8, 8, 3
    np.testing.assert_allclose(attn(x, angles), whole, rtol=1e-6, atol=1e-6)
