"""The DeepSeek-V4.1 vision tower (ViT) and aligner (architecture.md §12; spec §10.3.1 (f)).

One image at a time; its ViT grid (h, w) is a static Python pair.

* Patches: each 3 x p x p patch, channel-first flattened, goes through a linear layer with bias. There
  is no class token and no absolute position embedding: positions enter only through the 2D RoPE.
* `vision_n_layers` pre-norm blocks: RMSNorm (eps 1e-6) -> bidirectional attention (q/k/v and output
  projections with bias, 2D RoPE on q and k, softmax scale head_dim^-0.5) -> residual; RMSNorm ->
  SwiGLU MLP without biases -> residual. A final RMSNorm.
* 2D RoPE, rotate-half over the whole head of width c: channel i pairs with i + c/2 (i < c/2). With
  f_k = theta^(-4k/c) for k < c/4, pair i < c/4 turns by row * f_i and pair c/4 <= i < c/2 by
  col * f_(i - c/4).
* Aligner: the ViT features, as an (h, w) grid, are zero-padded at the bottom and right to multiples of
  the downsample ratio r, cut into r x r cells, each cell flattened channel-major (feature index
  c*r*r + ki*r + kj), then Linear(with bias) -> exact (erf) GELU -> Linear(with bias) to the text width.
  Rows come out in row-major order over the (ceil(h/r), ceil(w/r)) aligner grid.
* Span layout of one image in the token stream: START, then per aligner row its IMAGE slots and a
  NEWLINE, then END.

Parameter layout: the fused official tensors are split (`wqkv` into q/k/v, `mlp.w1` into gate/up) so
that every kernel carries clean logical axes; `load_vision_params` does the split.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from v4jax.config_v41 import V41Config
from v4jax.model.layers import Linear, RMSNorm, param

VISION_NORM_EPS = 1e-6  # the ViT's RMSNorms (not the text model's norm_eps)

# Token types of a VL prompt (architecture.md §12; spec §10.3.1 (e)).
TOKEN_TEXT = -1
TOKEN_IMAGE_START = 0
TOKEN_IMAGE = 1
TOKEN_IMAGE_NEWLINE = 2
TOKEN_IMAGE_END = 3


class BiasedLinear(nnx.Module):
    """`Linear` (kernel [in, out]) plus a bias added after the product, in the output dtype."""

    def __init__(self, in_features: int, out_features: int, axes: tuple[str | None, str | None], *,
                 param_dtype, rngs: nnx.Rngs):
        self.linear = Linear(in_features, out_features, axes, param_dtype=param_dtype, rngs=rngs)
        self.bias = param(rngs, (out_features,), (axes[1],), param_dtype, init="zeros")

    def __call__(self, x: jax.Array, dtype=None) -> jax.Array:
        y = self.linear(x, dtype)
        return y + self.bias[...].astype(y.dtype)


# --------------------------------------------------------------------------------------------------
# 2D RoPE
def vision_rope_angles(grid: tuple[int, int], head_dim: int, theta: float) -> np.ndarray:
    """Rotation angle of each rotate-half pair at each patch: float32 [h*w, head_dim/2].

    Patch n sits at (row, col) = divmod(n, w). Column i < head_dim/4 holds row * f_i, column
    head_dim/4 + i holds col * f_i, with f_i = theta^(-2i / (head_dim/2))."""
    h, w = grid
    half = head_dim // 2
    inv_freq = (1.0 / theta ** (np.arange(0, half, 2, dtype=np.float32) / half)).astype(np.float32)  # [c/4]
    rows, cols = np.divmod(np.arange(h * w), w)  # [N], [N]
    angles = np.concatenate([rows[:, None].astype(np.float32) * inv_freq,
                             cols[:, None].astype(np.float32) * inv_freq], axis=-1)  # [N, c/2]
    return angles.astype(np.float32)


def apply_vision_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
    """Rotate-half RoPE: x [N, H, c], angles [N, c/2]; pair (i, i + c/2) turns by angles[:, i]. In fp32,
    cast back to x's dtype."""
    cos = jnp.cos(angles)[:, None, :]  # [N, 1, c/2]
    sin = jnp.sin(angles)[:, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # [N, H, c/2] each
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# --------------------------------------------------------------------------------------------------
# Tower
VISION_QUERY_CHUNK = 1024


class VisionAttention(nnx.Module):
    """Bidirectional multi-head attention over one image's patches, q/k/v/o with bias."""

    def __init__(self, cfg: V41Config, *, param_dtype, rngs: nnx.Rngs):
        d = cfg.vision_dim
        self.n_heads = cfg.vision_n_heads
        self.head_dim = d // cfg.vision_n_heads
        self.wq = BiasedLinear(d, d, ("embed", "heads"), param_dtype=param_dtype, rngs=rngs)
        self.wk = BiasedLinear(d, d, ("embed", "heads"), param_dtype=param_dtype, rngs=rngs)
        self.wv = BiasedLinear(d, d, ("embed", "heads"), param_dtype=param_dtype, rngs=rngs)
        self.wo = BiasedLinear(d, d, ("heads", "embed"), param_dtype=param_dtype, rngs=rngs)
        # queries per score block: a 1,024-token image has 9,216 patches, whose full [16, N, N] fp32
        # scores would be 5.4 GB; chunks of 1,024 queries keep them at 0.6 GB (same values)
        self.query_chunk = VISION_QUERY_CHUNK

    def __call__(self, x: jax.Array, angles: jax.Array) -> jax.Array:
        n = x.shape[0]
        shape = (n, self.n_heads, self.head_dim)
        q = apply_vision_rope(self.wq(x).reshape(shape), angles)  # [N, H, c]
        k = apply_vision_rope(self.wk(x).reshape(shape), angles)  # [N, H, c]
        v = self.wv(x).reshape(shape)  # [N, H, c]
        parts = []
        for lo in range(0, n, self.query_chunk):  # the scores of one chunk of queries at a time: [H, C, N]
            logits = jnp.einsum("nhc,mhc->hnm", q[lo:lo + self.query_chunk], k, preferred_element_type=jnp.float32)
            probs = jax.nn.softmax(logits * (1.0 / math.sqrt(self.head_dim)), axis=-1)
            parts.append(jnp.einsum("hnm,mhc->nhc", probs.astype(v.dtype), v, preferred_element_type=jnp.float32))
        o = jnp.concatenate(parts, axis=0)  # [N, H, c]
        return self.wo(o.astype(x.dtype).reshape(n, -1))  # [N, d]


class VisionMLP(nnx.Module):
    """SwiGLU without biases: w2(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: V41Config, *, param_dtype, rngs: nnx.Rngs):
        d, i = cfg.vision_dim, cfg.vision_inter_dim
        self.gate = Linear(d, i, ("embed", "mlp"), param_dtype=param_dtype, rngs=rngs)
        self.up = Linear(d, i, ("embed", "mlp"), param_dtype=param_dtype, rngs=rngs)
        self.w2 = Linear(i, d, ("mlp", "embed"), param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        g = self.gate(x, jnp.float32)  # [N, I]
        u = self.up(x, jnp.float32)  # [N, I]
        return self.w2((jax.nn.silu(g) * u).astype(x.dtype))  # [N, d]


class VisionBlock(nnx.Module):
    def __init__(self, cfg: V41Config, *, param_dtype, rngs: nnx.Rngs):
        self.norm1 = RMSNorm(cfg.vision_dim, VISION_NORM_EPS, "embed", rngs=rngs)
        self.attn = VisionAttention(cfg, param_dtype=param_dtype, rngs=rngs)
        self.norm2 = RMSNorm(cfg.vision_dim, VISION_NORM_EPS, "embed", rngs=rngs)
        self.mlp = VisionMLP(cfg, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, angles: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x), angles)  # [N, d]
        return x + self.mlp(self.norm2(x))  # [N, d]


class VisionTower(nnx.Module):
    """patches [N, 3*p*p] (channel-first flattened; [N, 3, p, p] also accepted), grid (h, w) with
    N = h*w in row-major order -> features [N, vision_dim] (after the final norm).

    The compute dtype is `dtype` (default: the patches' dtype); norms, RoPE and softmax run in fp32."""

    def __init__(self, cfg: V41Config, rngs: nnx.Rngs, param_dtype=jnp.float32):
        if cfg.vision_n_layers < 1:
            raise ValueError("VisionTower needs vision_n_layers >= 1 (this config is text-only)")
        d, p = cfg.vision_dim, cfg.vision_patch_size
        self.patch_size = p
        self.head_dim = d // cfg.vision_n_heads
        self.rope_theta = float(cfg.vision_rope_theta)
        self.patch_embed = BiasedLinear(3 * p * p, d, (None, "embed"), param_dtype=param_dtype, rngs=rngs)
        self.blocks = nnx.List([VisionBlock(cfg, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(cfg.vision_n_layers)])
        self.norm = RMSNorm(d, VISION_NORM_EPS, "embed", rngs=rngs)

    def __call__(self, patches: jax.Array, grid: tuple[int, int], dtype=None) -> jax.Array:
        h, w = _check_grid(grid)
        n = patches.shape[0]
        if n != h * w:
            raise ValueError(f"{n} patches for a ViT grid of {h} x {w} = {h * w}")
        x = patches.reshape(n, -1)  # [N, 3*p*p]
        if x.shape[1] != 3 * self.patch_size ** 2:
            raise ValueError(f"a patch has {x.shape[1]} values; expected 3 x {self.patch_size}^2")
        dtype = dtype or x.dtype
        angles = jnp.asarray(vision_rope_angles((h, w), self.head_dim, self.rope_theta))  # [N, c/2]
        x = self.patch_embed(x, dtype)  # [N, d]
        for block in self.blocks:
            x = block(x, angles)  # [N, d]
        return self.norm(x)  # [N, d]


# --------------------------------------------------------------------------------------------------
# Aligner
def aligner_grid(grid: tuple[int, int], ratio: int) -> tuple[int, int]:
    """(h', w') = (ceil(h / r), ceil(w / r)): the aligner grid of a ViT grid."""
    h, w = _check_grid(grid)
    return -(-h // ratio), -(-w // ratio)


def unfold_cells(x: jax.Array, grid: tuple[int, int], ratio: int) -> jax.Array:
    """x [h*w, C] (row-major grid) -> [h'*w', C*r*r]: zero-pad bottom/right to multiples of r, then
    each r x r cell (row-major over cells) flattened channel-major, feature c*r*r + ki*r + kj."""
    h, w = _check_grid(grid)
    hp, wp = aligner_grid(grid, ratio)
    c = x.shape[-1]
    x = x.reshape(h, w, c)  # [h, w, C]
    x = jnp.pad(x, ((0, hp * ratio - h), (0, wp * ratio - w), (0, 0)))  # [h'*r, w'*r, C]
    x = x.reshape(hp, ratio, wp, ratio, c)  # [h', ki, w', kj, C]
    x = x.transpose(0, 2, 4, 1, 3)  # [h', w', C, ki, kj]
    return x.reshape(hp * wp, c * ratio * ratio)  # [h'*w', C*r*r]


class Aligner(nnx.Module):
    """ViT features [h*w, vision_dim] with their grid -> [h'*w', dim] (text width), row-major."""

    def __init__(self, cfg: V41Config, rngs: nnx.Rngs, param_dtype=jnp.float32):
        r = cfg.vision_downsample_ratio
        self.ratio = r
        self.w1 = BiasedLinear(cfg.vision_dim * r * r, cfg.dim, (None, "mlp"), param_dtype=param_dtype, rngs=rngs)
        self.w2 = BiasedLinear(cfg.dim, cfg.dim, ("mlp", "embed"), param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, grid: tuple[int, int]) -> jax.Array:
        cells = unfold_cells(x, grid, self.ratio)  # [h'*w', d*r*r]
        y = self.w1(cells, jnp.float32)  # [h'*w', dim]
        y = jax.nn.gelu(y, approximate=False).astype(x.dtype)  # exact (erf) GELU
        return self.w2(y)  # [h'*w', dim]


def encode_image(tower: VisionTower, aligner: Aligner, patches: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """One image: patches [h*w, 3*p*p] (or [h*w, 3, p, p]) on ViT grid (h, w) -> [h'*w', dim], the rows
    that fill the IMAGE slots of its span in order. `grid` must be static (a pair of Python ints)."""
    grid = _check_grid(grid)
    return aligner(tower(patches, grid), grid)


# --------------------------------------------------------------------------------------------------
# Span layout
@dataclasses.dataclass(frozen=True)
class ImageSpan:
    """Where one image goes in the token stream."""

    aligner_grid: tuple[int, int]  # (h', w')
    token_types: np.ndarray  # int32 [n_tokens]: START, (IMAGE x w', NEWLINE) x h', END

    @property
    def n_tokens(self) -> int:
        """Positions the span occupies (all carry image_token_id): (w' + 1) * h' + 2."""
        return int(self.token_types.shape[0])

    @property
    def n_embeds(self) -> int:
        """IMAGE slots, = the rows `encode_image` returns: h' * w'."""
        return self.aligner_grid[0] * self.aligner_grid[1]


def image_span_layout(grid: tuple[int, int], downsample_ratio: int = 3) -> ImageSpan:
    """The span of an image whose ViT grid is (h, w): [START] + ([IMAGE] * w' + [NEWLINE]) * h' + [END]."""
    hp, wp = aligner_grid(grid, downsample_ratio)
    row = [TOKEN_IMAGE] * wp + [TOKEN_IMAGE_NEWLINE]
    types = np.asarray([TOKEN_IMAGE_START] + row * hp + [TOKEN_IMAGE_END], dtype=np.int32)
    return ImageSpan((hp, wp), types)


# --------------------------------------------------------------------------------------------------
# Loading official weights
def load_vision_params(tower: VisionTower, aligner: Aligner, tensors: dict[str, np.ndarray]) -> None:
    """Copy the official tensors (`vision.*`, `aligner.*`; other keys are ignored) into the modules.

    Convention: an official linear weight is torch's [out, in]; our kernel is its transpose [in, out].
    `attn.wqkv` is split by rows into q, k, v (thirds, in that order) and `mlp.w1` into gate then up
    (halves). Values are cast to each parameter's dtype. Raises ValueError listing every missing or
    mis-shaped tensor before anything is written."""
    plan: list[tuple[nnx.Variable, np.ndarray]] = []
    problems: list[str] = []

    def take(name: str, shape: tuple[int, ...]) -> np.ndarray | None:
        if name not in tensors:
            problems.append(f"missing {name} (expected shape {shape})")
            return None
        t = np.asarray(tensors[name])
        if t.shape != shape:
            problems.append(f"{name} has shape {t.shape}, expected {shape}")
            return None
        return t

    def linear(kernel: nnx.Variable, name: str) -> None:
        d_in, d_out = kernel.shape
        t = take(name, (d_out, d_in))
        if t is not None:
            plan.append((kernel, t.T))

    def biased(mod: BiasedLinear, name: str) -> None:
        linear(mod.linear.kernel, f"{name}.weight")
        vector(mod.bias, f"{name}.bias")

    def vector(var: nnx.Variable, name: str) -> None:
        t = take(name, tuple(var.shape))
        if t is not None:
            plan.append((var, t))

    def split_rows(mods: list[Linear], name: str) -> None:
        d_in, d_out = mods[0].kernel.shape
        t = take(name, (len(mods) * d_out, d_in))
        if t is not None:
            for j, mod in enumerate(mods):
                plan.append((mod.kernel, t[j * d_out:(j + 1) * d_out].T))

    biased(tower.patch_embed, "vision.patch_embed.proj")
    for i, block in enumerate(tower.blocks):
        pre = f"vision.blocks.{i}"
        vector(block.norm1.weight, f"{pre}.norm1.weight")
        vector(block.norm2.weight, f"{pre}.norm2.weight")
        a = block.attn
        split_rows([a.wq.linear, a.wk.linear, a.wv.linear], f"{pre}.attn.wqkv.weight")
        d = a.wq.bias.shape[0]
        bias = take(f"{pre}.attn.wqkv.bias", (3 * d,))
        if bias is not None:
            plan += [(a.wq.bias, bias[:d]), (a.wk.bias, bias[d:2 * d]), (a.wv.bias, bias[2 * d:])]
        biased(a.wo, f"{pre}.attn.wo")
        split_rows([block.mlp.gate, block.mlp.up], f"{pre}.mlp.w1.weight")
        linear(block.mlp.w2.kernel, f"{pre}.mlp.w2.weight")
    vector(tower.norm.weight, "vision.norm.weight")
    biased(aligner.w1, "aligner.w1")
    biased(aligner.w2, "aligner.w2")

    if problems:
        raise ValueError("cannot load the vision weights: " + "; ".join(problems))
    for var, value in plan:
        var.set_value(jnp.asarray(np.ascontiguousarray(value), dtype=var.dtype))


def vision_tensors(tower: VisionTower, aligner: Aligner) -> dict[str, np.ndarray]:
    """The inverse of `load_vision_params`: the modules' values under the official names (host numpy, in
    the parameters' dtypes; q, k, v joined into `attn.wqkv`, gate and up into `mlp.w1`)."""
    out: dict[str, np.ndarray] = {}

    def get(var: nnx.Variable) -> np.ndarray:
        return np.asarray(jax.device_get(var.get_value()))

    def linear(kernels: list[nnx.Variable], name: str) -> None:
        out[name] = np.ascontiguousarray(np.concatenate([get(k).T for k in kernels]))

    def biased(mod: BiasedLinear, name: str) -> None:
        linear([mod.linear.kernel], f"{name}.weight")
        out[f"{name}.bias"] = get(mod.bias)

    biased(tower.patch_embed, "vision.patch_embed.proj")
    for i, block in enumerate(tower.blocks):
        pre = f"vision.blocks.{i}"
        out[f"{pre}.norm1.weight"], out[f"{pre}.norm2.weight"] = get(block.norm1.weight), get(block.norm2.weight)
        a = block.attn
        linear([a.wq.linear.kernel, a.wk.linear.kernel, a.wv.linear.kernel], f"{pre}.attn.wqkv.weight")
        out[f"{pre}.attn.wqkv.bias"] = np.concatenate([get(a.wq.bias), get(a.wk.bias), get(a.wv.bias)])
        biased(a.wo, f"{pre}.attn.wo")
        linear([block.mlp.gate.kernel, block.mlp.up.kernel], f"{pre}.mlp.w1.weight")
        linear([block.mlp.w2.kernel], f"{pre}.mlp.w2.weight")
    out["vision.norm.weight"] = get(tower.norm.weight)
    biased(aligner.w1, "aligner.w1")
    biased(aligner.w2, "aligner.w2")
    return out


def _check_grid(grid) -> tuple[int, int]:
    h, w = grid
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in (h, w)):
        raise ValueError(f"an image grid must be two positive Python ints (static), got {grid!r}")
    return int(h), int(w)
