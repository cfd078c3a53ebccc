"""DeepSeek-V4.1 image preprocessing: a picture -> the ViT's patches and their grid (architecture.md §12.5).

The rule is that of the official `image_processor.py` (`plan_image_grid`, `safe_resize`,
`solve_resize_ratio`, `load_image`), restated here. With p = `vision_patch_size`, r =
`vision_downsample_ratio` and N = `vision_max_n_token`:

1. Colour: `convert("RGB")`. Grey, palette and CMYK pictures become RGB; an alpha channel is dropped,
   not composited (a transparent pixel keeps its stored colour); the EXIF orientation is not applied.
2. Canvas, from the picture's W x H pixels:
   a. with `vision_max_wh_ratio` set and W > H * ratio, the plan uses W = H * ratio;
   b. a picture of fewer than `vision_min_pixels` pixels is scaled up to about that many: both sides
      times sqrt(min_pixels / (W * H)), truncated to integers;
   c. each side rounds up to a multiple of p (not of r * p: the aligner zero-pads the grid to
      multiples of r);
   d. N bounds the whole span, delimiters included: (w' + 1) * h' + 2 <= N with (h', w') the aligner
      grid (`image_tokens`). Over budget, the canvas shrinks to the largest one of the same aspect
      that fits: w'* solves h' * (w' + 1) = N - 2 with h' = w' * H / W, the scale is
      beta = min(floor(w'*) * r * p / W, floor(h'*) * r * p / H), and each side becomes
      floor(side * beta / p) * p. A picture too tall for one aligner column (w'* < 1) gets a single
      column of (N - 2) // 2 cells; one too wide for one row (h'* < 1) a single row of N - 3 cells.
3. Fit: the picture is scaled (bicubic, aspect kept) to the largest size inside the canvas and centred
   on it; the rest is gray (127, 127, 127) (`ImageOps.pad`). With `vision_max_wh_ratio` set and
   W >= ratio * H it is instead stretched over the whole canvas (bicubic, no pad).
4. Normalise: x / 255, then (x - 0.5) / 0.5, in float32: [-1, 1]; the pad becomes 127 / 127.5 - 1.
5. Patches, row-major over the (h, w) = (canvas_h / p, canvas_w / p) grid, each channel-first
   flattened: value c*p*p + i*p + j of patch R*w + C is channel c of pixel (R*p + i, C*p + j) -- the
   `Image.patches` layout `encode_image` reads.

Documented choices: the patches stay float32 (the official code casts them to bfloat16 right after
step 4; the float32 arithmetic is the same, so casting ours gives its values bit for bit); inputs are
a PIL image, an [H, W, 3] uint8 array or a file (the official records, base64 and URLs are the
caller's business).
"""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image, ImageOps

from v4jax.config_v41 import V41Config
from v4jax.model.vision import image_span_layout

PAD_GRAY = (127, 127, 127)  # the canvas around a letterboxed picture, before normalisation


def image_tokens(grid: tuple[int, int], cfg: V41Config) -> int:
    """Span length of an image on ViT grid (h, w): START, (w' IMAGE + NEWLINE) per aligner row, END
    (`image_span_layout`). The budget `vision_max_n_token` bounds this number."""
    return image_span_layout(grid, cfg.vision_downsample_ratio).n_tokens


def plan_canvas(height: int, width: int, cfg: V41Config) -> tuple[int, int]:
    """(canvas_h, canvas_w), multiples of the patch size, for a picture of height x width pixels
    (steps 2a-2d of the module docstring)."""
    p, budget = cfg.vision_patch_size, cfg.vision_max_n_token
    if height < 1 or width < 1:
        raise ValueError(f"an image needs at least one pixel, got {width} x {height}")
    if budget < 4:
        raise ValueError(f"vision_max_n_token must be at least 4 (START, IMAGE, NEWLINE, END), got {budget}")
    ratio = cfg.vision_max_wh_ratio
    if ratio is not None and width > height * ratio:
        width = height * ratio
    if width * height < cfg.vision_min_pixels:
        scale = (cfg.vision_min_pixels / (width * height)) ** 0.5
        width, height = int(width * scale), int(height * scale)
    canvas = (math.ceil(height / p) * p, math.ceil(width / p) * p)
    if image_tokens((canvas[0] // p, canvas[1] // p), cfg) > budget:
        canvas = _shrink_to_budget(height, width, cfg)
    return canvas


def _shrink_to_budget(height: float, width: float, cfg: V41Config) -> tuple[int, int]:
    """The largest canvas of the picture's aspect whose span fits `vision_max_n_token` (step 2d)."""
    p, budget = cfg.vision_patch_size, cfg.vision_max_n_token
    cell = p * cfg.vision_downsample_ratio  # pixels per aligner cell side
    aspect = height / width
    cols = math.sqrt((budget - 2) / aspect + 0.25) - 0.5  # w'*: rows * (cols + 1) = budget - 2
    rows = cols * aspect
    if cols < 1.0:  # too tall for one column at this aspect
        return (budget - 2) // 2 * cell, cell
    if rows < 1.0:  # too wide for one row
        return cell, (budget - 3) * cell
    beta = min(math.floor(cols) * cell / width, math.floor(rows) * cell / height)
    return math.floor(height * beta / p) * p, math.floor(width * beta / p) * p


def fit_to_canvas(image: Image.Image, canvas: tuple[int, int], cfg: V41Config) -> np.ndarray:
    """An RGB picture on its canvas (step 3) -> pixels [canvas_h, canvas_w, 3] uint8."""
    h, w = canvas
    ratio = cfg.vision_max_wh_ratio
    if ratio is not None and image.width >= ratio * image.height:
        image = image.resize((w, h), Image.Resampling.BICUBIC)  # stretched: a banner has no pad
    else:
        image = ImageOps.pad(image, (w, h), Image.Resampling.BICUBIC, color=PAD_GRAY)
    return np.asarray(image, dtype=np.uint8)  # [H, W, 3]


def normalise(pixels: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> float32 in [-1, 1]: (x / 255 - 0.5) / 0.5, in the official order."""
    x = pixels.astype(np.float32) / np.float32(255)
    return (x - np.float32(0.5)) / np.float32(0.5)


def patchify(x: np.ndarray, patch_size: int) -> np.ndarray:
    """[H, W, 3] (H, W multiples of p) -> [h*w, 3*p*p]: row-major patches, each channel-first flattened."""
    p = patch_size
    h, w = x.shape[0] // p, x.shape[1] // p
    x = x.reshape(h, p, w, p, 3)  # [h, i, w, j, c]
    x = x.transpose(0, 2, 4, 1, 3)  # [h, w, c, i, j]
    return np.ascontiguousarray(x.reshape(h * w, 3 * p * p))  # [h*w, 3*p*p]


def preprocess_image(image: Image.Image | np.ndarray, cfg: V41Config) -> tuple[np.ndarray, tuple[int, int]]:
    """A PIL image or an [H, W, 3] uint8 array -> (patches [h*w, 3*p*p] float32, ViT grid (h, w)),
    ready for `v4jax.model.v41.Image(row, start, patches, grid)`."""
    image = _as_rgb(image)
    p = cfg.vision_patch_size
    canvas = plan_canvas(image.height, image.width, cfg)  # (canvas_h, canvas_w)
    pixels = fit_to_canvas(image, canvas, cfg)  # [canvas_h, canvas_w, 3] uint8
    return patchify(normalise(pixels), p), (canvas[0] // p, canvas[1] // p)  # [h*w, 3*p*p]


def load_image(path: str | os.PathLike, cfg: V41Config) -> tuple[np.ndarray, tuple[int, int]]:
    """`preprocess_image` of an image file. A missing or unreadable file raises a one-line ValueError
    naming it."""
    try:
        with Image.open(path) as source:
            image = source.convert("RGB")  # decodes the whole file: truncated data fails here
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"cannot read image {os.fspath(path)}: {reason}") from None
    return preprocess_image(image, cfg)


def _as_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """Step 1: any PIL mode -> RGB; an array must be [H, W, 3] uint8."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"an image array must be [H, W, 3] uint8, got {list(a.shape)} {a.dtype}")
    return Image.fromarray(np.ascontiguousarray(a))  # mode RGB
