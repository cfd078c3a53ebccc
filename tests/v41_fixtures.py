"""Where the DeepSeek-V4.1 golden fixtures are (tests/fixtures/deepseek_v41/, README there), for the
V4.1 tests: `V4JAX_V41_FIXTURES` if set, else the copy in the repository."""

import os

import numpy as np
import pytest

from v4jax.config_v41 import V41Config

FIXTURES = os.environ.get("V4JAX_V41_FIXTURES") or os.path.join(os.path.dirname(__file__), "fixtures", "deepseek_v41")
needs_fixtures = pytest.mark.skipif(not os.path.isdir(FIXTURES), reason=f"no V4.1 fixtures at {FIXTURES}")


def load(name: str) -> np.ndarray:
    return np.load(os.path.join(FIXTURES, name))


INVENTORY = os.path.join(os.path.dirname(__file__), "fixtures", "v41_flash_inventory.json")


def release_dtypes() -> list:
    """(name pattern, stored dtype) of every tensor of the released V4.1-Flash checkpoint, from its tensor
    inventory (tests/fixtures/v41_flash_inventory.json), any layer / stage / expert / block number."""
    import json
    import re

    with open(INVENTORY) as f:
        entries = json.load(f)["tensors"]
    number = re.compile(r"(layers|mtp|experts|blocks)\\\.(?:\\\{[LKEB]\\\}|\d+)")
    return [(re.compile(number.sub(r"\1\\.\\d+", re.escape(e["name"]))), e["dtype"]) for e in entries]


def release_dtype(name: str, table=None) -> str:
    """The dtype the release stores the tensor `name` in (KeyError when the inventory has no such tensor)."""
    for pattern, dtype in table or release_dtypes():
        if pattern.fullmatch(name):
            return dtype
    raise KeyError(name)


def quantised_release(tensors: dict) -> dict:
    """The fixture's fp32 tensors in the release's storage, role by role as the release inventory stores them:
    FP8 32 x 32 blocks, MXFP4 routed experts, the Engram tables FP8 rows with a scale per 32 columns, the
    rest BF16 or F32."""
    import ml_dtypes

    from v4jax.io.quant import quant_fp4, quant_fp8_block

    out, table = {}, release_dtypes()
    for name, w in tensors.items():
        if name.endswith("engram.embed.scale"):
            continue
        stored = release_dtype(name, table)
        if name.endswith("engram.embed.weight"):
            w = w * np.repeat(tensors[name[:-len("weight")] + "scale"], 32, axis=1)  # the table the pair holds
            blocks = w.reshape(w.shape[0], -1, 32)
            scale = 2.0 ** np.ceil(np.log2(np.abs(blocks).max(-1) / 448.0))  # power-of-two scale per 32 columns
            out[name] = (blocks / scale[..., None]).reshape(w.shape).astype(ml_dtypes.float8_e4m3fn)
            out[name[:-len("weight")] + "scale"] = scale.astype(ml_dtypes.float8_e8m0fnu)
        elif stored == "I8":
            out[name], out[name[:-len("weight")] + "scale"] = quant_fp4(w, 32)
        elif stored == "F8_E4M3":
            out[name], out[name[:-len("weight")] + "scale"] = quant_fp8_block(w, 32)
        else:  # BF16 and F32 roles as stored
            out[name] = w.astype(ml_dtypes.bfloat16) if stored == "BF16" else w.astype(np.float32)
    return out


def engram_ids(cfg, tokens, dead=None):
    """The Engram row ids [B, T, n_engram_layers, cols] of `tokens` with the fixtures' token map."""
    import jax.numpy as jnp

    from v4jax.model.engram_hash import compressed_ids, engram_layout, ngram_hash_ids, pad_compressed_id

    token_map = load("engram_token_map.npy")
    layout, ids = engram_layout(cfg), compressed_ids(tokens, token_map)
    pad = pad_compressed_id(cfg, token_map)
    return jnp.asarray(np.stack([ngram_hash_ids(ids, dead, layout, i, pad) for i in range(len(layout.layer_ids))],
                                axis=2), jnp.int32)  # [B, T, n_engram_layers, cols]


def flash_shaped():
    """v41-flash's layer pattern at CPU size: two ratio-0 layers (Engram on the second), two ratio-2 KV
    groups of a source and two followers, a ratio-1 KV / index / candidate source with Engram, then
    index sources each followed by one layer, the last three feeding DSpark."""
    cfg = V41Config.preset("v41-tiny").replace(
        n_layers=16, compress_ratios=(0, 0) + (2,) * 6 + (1,) * 8 + (0, 0), kv_source_layers=(2, 5, 8),
        index_source_layers=(2, 5, 8, 10, 12, 14), candidate_source_layer=8, engram_layer_ids=(1, 8),
        dspark_target_layer_ids=(13, 14, 15), vision_n_layers=0)
    cfg.validate()
    return cfg
