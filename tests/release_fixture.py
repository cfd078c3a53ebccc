"""A checkpoint laid out as DeepSeek publishes V4, written here with torch and `safetensors.torch`
independently of v4jax's own writer (`v4jax.io.official`), so that a reader bug cannot hide behind a
writer with the same bug.

What it writes follows DeepSeek's inference code (`inference/model.py`, `inference/convert.py`,
described in architecture.md §9), restated here in our own code:
  * names: the release's (`layers.N.attn.kv_norm.weight`, `layers.N.ffn.experts.E.w1.weight`, ...);
  * FP8 linears (attention wq_a wq_b wkv wo_a wo_b, indexer wq_b, shared experts, MTP e_proj h_proj):
    float8_e4m3fn codes [out, in] and a float8_e8m0fnu `.scale` per 128x128 block;
  * MXFP4 routed experts: int8 [out, in/2], element 2j in the low nibble and 2j+1 in the high one,
    E2M1 codes (0..7 = 0, .5, 1, 1.5, 2, 3, 4, 6; +8 = negative), a float8_e8m0fnu `.scale` per 1x32;
  * BF16 embed, head, norms, compressor wkv / wgate, indexer weights_proj, router weight; FP32 sinks,
    `ape`, `hc_*`, router bias; int64 tid2eid;
  * several shards and `model.safetensors.index.json`, the release's config.json with its
    quantization_config.
Scales are powers of two chosen as 2^ceil(log2(amax / max_code)) (1 for an all-zero block).

`write_release_fixture` returns the tensors the files hold, de-quantised here by table lookup and
multiplication in float32: what any correct reader must produce from them.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import torch
from safetensors.torch import save_file

FP8_BLOCK, FP4_BLOCK = 128, 32
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_L = r"^(?:layers|mtp)\.\d+\."
FP8 = re.compile(_L + r"(?:attn\.(?:wq_a|wq_b|wkv|wo_a|wo_b|indexer\.wq_b)|ffn\.shared_experts\.w[123]|e_proj|h_proj)\.weight$")
FP4 = re.compile(_L + r"ffn\.experts\.\d+\.w[123]\.weight$")
FP32 = re.compile(r"(?:attn_sink|\.ape|hc_[a-z_]+|ffn\.gate\.bias)$")


def _pow2_scale(amax: torch.Tensor, top: float) -> torch.Tensor:
    s = torch.exp2(torch.ceil(torch.log2(amax / top)))
    return torch.where(amax > 0, s, torch.ones_like(s))


def quant_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes e4m3 [out, in], scales e8m0 [ceil(out/128), ceil(in/128)], de-quantised fp32)."""
    out, inp = w.shape
    bo, bi = -(-out // FP8_BLOCK), -(-inp // FP8_BLOCK)
    padded = torch.zeros(bo * FP8_BLOCK, bi * FP8_BLOCK)
    padded[:out, :inp] = w
    blocks = padded.view(bo, FP8_BLOCK, bi, FP8_BLOCK)
    scale = _pow2_scale(blocks.abs().amax(dim=(1, 3)), 448.0)  # [bo, bi]
    full = scale.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[:out, :inp]
    codes = (w / full).to(torch.float8_e4m3fn)
    return codes, scale.to(torch.float8_e8m0fnu), codes.float() * full


def quant_fp4(w: torch.Tensor, swap_nibbles: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed int8 [out, in/2], scales e8m0 [out, in/32], de-quantised fp32), round to the nearest code."""
    out, inp = w.shape
    blocks = w.view(out, inp // FP4_BLOCK, FP4_BLOCK)
    scale = _pow2_scale(blocks.abs().amax(dim=2), 6.0)  # [out, in/32]
    v = (blocks / scale[..., None]).view(out, inp)
    mag = (v.abs()[..., None] - E2M1).abs().argmin(dim=-1)  # nearest magnitude code 0..7
    code = mag + 8 * (v < 0).long() * (mag > 0).long()
    value = E2M1[mag] * torch.where(v < 0, -1.0, 1.0)
    lo, hi = code[:, 0::2], code[:, 1::2]
    if swap_nibbles:
        lo, hi = hi, lo
    packed = (lo | (hi << 4)).to(torch.uint8).view(torch.int8)
    return packed, scale.to(torch.float8_e8m0fnu), (value.view(out, inp // FP4_BLOCK, FP4_BLOCK) * scale[..., None]).view(out, inp)


def write_release_fixture(tensors: dict[str, np.ndarray], config: dict, directory: str, *, shards: int = 3,
                          swap_nibbles: bool = False) -> dict[str, np.ndarray]:
    """Write `tensors` (canonical name -> float array, integer for tid2eid) as a release directory.
    Returns what the files hold, de-quantised to float32 (integers as stored)."""
    os.makedirs(directory, exist_ok=True)
    stored, truth = {}, {}
    for name, a in tensors.items():
        t = torch.from_numpy(np.ascontiguousarray(a))
        if not torch.is_floating_point(t):
            stored[name], truth[name] = t.to(torch.int64), a.astype(np.int64)
        elif FP8.search(name):
            codes, scale, deq = quant_fp8(t.float())
            stored[name], stored[name[: -len(".weight")] + ".scale"], truth[name] = codes, scale, deq.numpy()
        elif FP4.search(name):
            packed, scale, deq = quant_fp4(t.float(), swap_nibbles=False)
            if swap_nibbles:  # a writer with the nibble order wrong: same truth, other bytes
                packed = quant_fp4(t.float(), swap_nibbles=True)[0]
            stored[name], stored[name[: -len(".weight")] + ".scale"], truth[name] = packed, scale, deq.numpy()
        elif FP32.search(name):
            stored[name], truth[name] = t.float(), a.astype(np.float32)
        else:
            b = t.to(torch.bfloat16)
            stored[name], truth[name] = b, b.float().numpy()
    names = list(stored)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: stored[n].contiguous() for n in names[i::shards]}
        save_file(part, os.path.join(directory, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    config = dict(config, quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                               "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
                  torch_dtype="bfloat16")
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return truth
