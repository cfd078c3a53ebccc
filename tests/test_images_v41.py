"""V4.1 image preprocessing (`v4jax.inference.images`, architecture.md §12.5): the canvas the official rule
picks (min_pixels, the span budget, multiples of the patch), the normalisation and the gray pad, the
patch order on a hand-built picture, the hand-off to the span layout and the ViT, and the errors."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image as PILImage

from v4jax.config_v41 import V41Config
from v4jax.inference.images import (
    PAD_GRAY,
    image_tokens,
    load_image,
    normalise,
    plan_canvas,
    preprocess_image,
)
from v4jax.model.vision import Aligner, VisionTower, encode_image, image_span_layout

FLASH = V41Config.preset("v41-flash")
P = FLASH.vision_patch_size


def _grid(canvas):
    return canvas[0] // P, canvas[1] // P


def _unpatch(patches, grid, p=P):
    """[h*w, 3*p*p] -> [h*p, w*p, 3]: the inverse of the documented patch order."""
    h, w = grid
    return patches.reshape(h, w, 3, p, p).transpose(0, 3, 1, 4, 2).reshape(h * p, w * p, 3)


# (width, height) -> (canvas_w, canvas_h, span tokens), worked by hand from the official rule:
# 448^2 is scaled up to 544^2 then rounded to 546^2; 1920 x 1080 and 4000 x 3000 are over the budget.
@pytest.mark.parametrize("size, want", [
    ((448, 448), (546, 546, 184)),
    ((1024, 1024), (1036, 1036, 652)),
    ((1920, 1080), (1708, 966, 968)),
    ((4000, 3000), (1512, 1134, 1001)),
    ((40000, 5), (42 * 1021, 42, 1024)),  # too wide for the aspect: one row of N - 3 cells
    ((5, 40000), (42, 42 * 511, 1024)),  # too tall: one column of (N - 2) // 2 cells
])
def test_canvas_of_known_sizes(size, want):
    (width, height), (cw, ch, tokens) = size, want
    canvas = plan_canvas(height, width, FLASH)
    assert canvas == (ch, cw)
    assert image_tokens(_grid(canvas), FLASH) == tokens


@pytest.mark.parametrize("width, height", [(1, 1), (10, 3), (3, 10), (100, 60), (543, 544), (300, 986)])
def test_small_images_are_scaled_up_to_min_pixels(width, height):
    ch, cw = plan_canvas(height, width, FLASH)
    assert ch % P == 0 and cw % P == 0
    scale = math.sqrt(FLASH.vision_min_pixels / (width * height))
    assert abs(cw - width * scale) <= P and abs(ch - height * scale) <= P  # aspect kept up to whole patches
    assert ch * cw >= 0.99 * FLASH.vision_min_pixels  # sides truncated before rounding up: about min_pixels


@pytest.mark.parametrize("width, height", [(700, 560), (1000, 600), (560, 1000)])
def test_images_within_the_rules_only_round_up_to_whole_patches(width, height):
    assert width * height >= FLASH.vision_min_pixels
    canvas = plan_canvas(height, width, FLASH)
    assert canvas == (math.ceil(height / P) * P, math.ceil(width / P) * P)
    assert image_tokens(_grid(canvas), FLASH) <= FLASH.vision_max_n_token


@pytest.mark.parametrize("width, height", [(3000, 3000), (8000, 1000), (1000, 8000), (20000, 300), (777, 9999),
                                           (123457, 65537)])
def test_huge_images_are_capped_at_the_token_budget(width, height):
    canvas = plan_canvas(height, width, FLASH)
    assert canvas[0] % P == 0 and canvas[1] % P == 0 and min(canvas) >= P
    tokens = image_tokens(_grid(canvas), FLASH)
    assert tokens <= FLASH.vision_max_n_token
    assert canvas[0] < height and canvas[1] < width  # shrunk, keeping the aspect:
    assert abs(math.log((canvas[1] / canvas[0]) / (width / height))) < 0.1


def test_normalisation_of_known_values():
    x = normalise(np.array([[[0, 127, 255]]], np.uint8))
    assert x.dtype == np.float32
    np.testing.assert_allclose(x[0, 0], [-1.0, 127 / 127.5 - 1, 1.0], rtol=0, atol=1e-7)


def test_letterbox_is_gray_and_content_is_normalised():
    # 600 x 500 -> canvas 602 x 504; the picture scaled to 602 x 502 is centred: one gray row above and below
    black = np.zeros((500, 600, 3), np.uint8)
    patches, grid = preprocess_image(black, FLASH)
    assert grid == (36, 43) and patches.shape == (36 * 43, 3 * P * P) and patches.dtype == np.float32
    x = _unpatch(patches, grid)
    gray = np.float32(PAD_GRAY[0]) / np.float32(255) * 2 - 1
    np.testing.assert_allclose(x[[0, -1]], gray, atol=1e-7)
    np.testing.assert_array_equal(x[1:-1], -1.0)
    white, _ = preprocess_image(np.full((500, 600, 3), 255, np.uint8), FLASH)
    np.testing.assert_array_equal(_unpatch(white, grid)[1:-1], 1.0)


def test_patch_order_on_a_hand_built_picture():
    # no scaling (min_pixels 0) and an exact canvas: the pixels reach the patches unchanged
    cfg = V41Config.preset("v41-tiny", vision_min_pixels=0)
    pixels = np.random.default_rng(0).integers(0, 256, (28, 42, 3), dtype=np.uint8)  # H 28, W 42
    patches, grid = preprocess_image(pixels, cfg)
    assert grid == (2, 3) and patches.shape == (6, 588)
    for k in range(6):
        r, c = divmod(k, 3)
        crop = pixels[r * 14:(r + 1) * 14, c * 14:(c + 1) * 14]  # [14, 14, 3]
        want = (crop.transpose(2, 0, 1).astype(np.float32) / 255 - 0.5) / 0.5  # [3, 14, 14]
        np.testing.assert_array_equal(patches[k], want.reshape(-1))
    # value c*196 + i*14 + j of patch k is channel c of pixel (row*14 + i, col*14 + j)
    assert patches[4, 2 * 196 + 5 * 14 + 9] == normalise(pixels[14 + 5, 14 + 9, 2])


def test_pil_modes_and_arrays_agree():
    rgb = np.random.default_rng(1).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    want, grid = preprocess_image(rgb, FLASH)
    got, got_grid = preprocess_image(PILImage.fromarray(rgb), FLASH)
    assert got_grid == grid
    np.testing.assert_array_equal(got, want)
    rgba = np.concatenate([rgb, np.zeros((40, 30, 1), np.uint8)], axis=2)  # alpha dropped, not composited
    np.testing.assert_array_equal(preprocess_image(PILImage.fromarray(rgba), FLASH)[0], want)
    grey, _ = preprocess_image(PILImage.fromarray(rgb[..., 0]), FLASH)  # mode L -> RGB
    assert np.array_equal(grey[:, :196], grey[:, 196:392])


def test_max_wh_ratio_stretches_wide_pictures_without_pad():
    cfg = V41Config.preset("v41-tiny", vision_max_wh_ratio=2)
    plan = plan_canvas(100, 1000, cfg)  # planned as 200 x 100, then scaled up to min_pixels
    assert plan == plan_canvas(100, 200, cfg)
    patches, grid = preprocess_image(np.full((100, 1000, 3), 255, np.uint8), cfg)
    assert grid == _grid(plan)
    np.testing.assert_array_equal(patches, 1.0)  # the whole canvas is picture


def test_output_feeds_the_span_layout_and_the_vit():
    cfg = V41Config.preset("v41-tiny", vision_min_pixels=0)
    picture = np.random.default_rng(2).integers(0, 256, (70, 98, 3), dtype=np.uint8)
    patches, grid = preprocess_image(picture, cfg)
    assert grid == (5, 7) and patches.reshape(-1, 3, 14, 14).shape == (35, 3, 14, 14)  # the fixture's image 0
    span = image_span_layout(grid, cfg.vision_downsample_ratio)
    assert span.aligner_grid == (2, 3) and span.n_embeds == 6
    assert span.n_tokens == image_tokens(grid, cfg) == 10
    rows = encode_image(VisionTower(cfg, nnx.Rngs(0)), Aligner(cfg, nnx.Rngs(1)), jnp.asarray(patches), grid)
    assert rows.shape == (span.n_embeds, cfg.dim) and bool(jnp.all(jnp.isfinite(rows)))
    flash_patches, flash_grid = preprocess_image(picture, FLASH)  # scaled up: a real-size span
    assert flash_patches.shape == (flash_grid[0] * flash_grid[1], 3 * P * P)
    flash_span = image_span_layout(flash_grid, FLASH.vision_downsample_ratio)
    assert flash_span.n_tokens == image_tokens(flash_grid, FLASH) <= FLASH.vision_max_n_token


def test_load_image_reads_a_file(tmp_path):
    pixels = np.random.default_rng(3).integers(0, 256, (50, 80, 3), dtype=np.uint8)
    path = tmp_path / "picture.png"
    PILImage.fromarray(pixels).save(path)
    patches, grid = load_image(path, FLASH)
    want, want_grid = preprocess_image(pixels, FLASH)
    assert grid == want_grid
    np.testing.assert_array_equal(patches, want)


@pytest.mark.parametrize("content", [None, b"not an image at all", "truncated"])
def test_unreadable_files_give_a_one_line_error_naming_them(tmp_path, content):
    path = tmp_path / "bad.png"
    if content == "truncated":
        PILImage.fromarray(np.zeros((64, 64, 3), np.uint8) + 9).save(tmp_path / "whole.png")
        path.write_bytes((tmp_path / "whole.png").read_bytes()[:80])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        load_image(path, FLASH)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("array", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8),
                                   np.zeros((4, 4, 3), np.float32), np.zeros((0, 4, 3), np.uint8)])
def test_bad_arrays_are_refused(array):
    with pytest.raises(ValueError):
        preprocess_image(array, FLASH)
