"""Every architectural value of a DeepSeek-V4.1 model (`model_type: deepseek_v41`, architecture.md §12).

V4.1 is a second model family beside V4 (`v4jax.config.V4Config`): compressors of ratio 2 and 1,
cross-layer KV and indexer sharing, a two-level candidate top-k, the mHC pre-shift, Engram memory,
a ViT and DSpark drafting. Field names are the official inference code's (`ModelArgs` of DeepSeek's
`inference/model.py`, which the release's weights follow); a config.json is read in either spelling:

* the inference `config.json` (flat: `dim`, `n_layers`, `kv_source_layers`, `engram_pad_id`, `vision_dim`...);
* the HF-style one (`text_config` / `vision_config`: `hidden_size`, `num_hidden_layers`,
  `kv_source_layer_ids`, `engram_pad_token_id`, `rope_scaling`, ...), also with the text keys hoisted to
  the top level, as some ports write it.

A key given in both spellings must agree. `gate_temp` is in neither released file: 1.0.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from v4jax.config import SCORE_FUNCS, ConfigError

RATIOS = (0, 1, 2)  # V4.1 compressors: none, one latent per token, gated pooling of 2 tokens


@dataclasses.dataclass(frozen=True)
class V41Config:
    """Fields (inference `ModelArgs` names). Layers count the backbone (`n_layers`); `compress_ratios`
    has one entry per backbone layer, then one per DSpark stage (`n_mtp_layers`, always 0)."""

    # backbone
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    head_dim: int
    rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    window_size: int
    compress_ratios: tuple[int, ...]
    kv_source_layers: tuple[int, ...]  # the layers that own a compressor and a compressed cache
    index_source_layers: tuple[int, ...]  # the layers that run an indexer (KV sources among them)
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    candidate_source_layer: int | None  # two-level top-k from this layer on (None: off)
    candidate_topk_blocks: int
    candidate_block_size: int
    n_routed_experts: int
    n_activated_experts: int
    moe_inter_dim: int
    n_shared_experts: int = 1
    score_func: str = "sqrtsoftplus"
    gate_temp: float = 1.0  # router logits / gate_temp before the score function
    norm_topk_prob: bool = True
    route_scale: float = 1.5
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    norm_eps: float = 1e-20
    rope_theta: float = 10000.0  # ratio-0 layers (no YaRN)
    compress_rope_theta: float = 160000.0  # layers with a compressed branch (with YaRN)
    rope_factor: float = 16.0
    original_seq_len: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    max_seq_len: int = 1048576
    # Engram (architecture.md §12)
    engram_layer_ids: tuple[int, ...] = ()
    engram_num_embeddings: tuple[int, ...] = ()  # table rows per Engram layer (= the sum of its primes)
    engram_max_ngram_size: int = 4
    engram_vocab_size: int = 16000000  # where the prime search starts
    engram_n_heads: int = 8
    engram_head_dim: int = 256
    engram_pad_id: int = 2  # a raw token id; the pad is its compressed id
    engram_compressed_vocab_size: int = 99092
    # vision (vision_n_layers 0: a text-only model)
    vision_n_layers: int = 0
    vision_dim: int = 1024
    vision_n_heads: int = 16
    vision_inter_dim: int = 2816
    vision_patch_size: int = 14
    vision_rope_theta: float = 10000.0
    vision_downsample_ratio: int = 3
    vision_max_n_token: int = 1024
    vision_min_pixels: int = 295936
    vision_max_wh_ratio: float | None = None
    image_token_id: int | None = None
    # DSpark (n_mtp_layers stages)
    n_mtp_layers: int = 0
    dspark_block_size: int = 5
    dspark_noise_token_id: int | None = None
    dspark_target_layer_ids: tuple[int, ...] = ()
    dspark_markov_rank: int = 256
    dspark_n_routed_experts: int = 128
    dspark_n_activated_experts: int = 3
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1

    def __post_init__(self):
        for name in ("compress_ratios", "kv_source_layers", "index_source_layers", "engram_layer_ids",
                     "engram_num_embeddings", "dspark_target_layer_ids"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
                raise ConfigError(f"{name} must be a list of integers, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        self.validate()

    # ----------------------------------------------------------------------------------------------
    # Derived values
    def ratio(self, layer: int) -> int:
        """Compression ratio of a backbone layer (0: sliding window only)."""
        return self.compress_ratios[layer]

    def kv_source(self, layer: int) -> int | None:
        """The layer whose compressed cache `layer` reads: the latest KV source at or before it (None
        for ratio-0 layers)."""
        return _latest(self.kv_source_layers, layer) if self.ratio(layer) else None

    def index_source(self, layer: int) -> int | None:
        """The layer whose top-k `layer` uses: the latest index source at or before it."""
        return _latest(self.index_source_layers, layer) if self.ratio(layer) else None

    def replace(self, **changes: Any) -> "V41Config":
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------------------------------------
    def without_dspark(self) -> "V41Config":
        """The same backbone with no DSpark stages (their compress_ratios entries dropped too)."""
        return self.replace(n_mtp_layers=0, compress_ratios=tuple(self.compress_ratios[:self.n_layers]))

    def validate(self) -> None:
        """Raise ConfigError naming the first inconsistent value."""

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        positive = ("vocab_size", "dim", "n_layers", "n_heads", "head_dim", "q_lora_rank", "o_groups", "o_lora_rank",
                    "window_size", "index_n_heads", "index_head_dim", "index_topk", "candidate_topk_blocks",
                    "candidate_block_size", "n_routed_experts", "n_activated_experts", "moe_inter_dim", "hc_mult",
                    "hc_sinkhorn_iters", "max_seq_len", "original_seq_len", "engram_max_ngram_size",
                    "engram_vocab_size", "engram_n_heads", "engram_head_dim", "engram_compressed_vocab_size",
                    "vision_dim", "vision_n_heads", "vision_inter_dim", "vision_patch_size",
                    "vision_downsample_ratio", "vision_max_n_token", "dspark_block_size", "dspark_markov_rank",
                    "dspark_n_routed_experts", "dspark_n_activated_experts")
        for name in positive:
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name} must be a positive integer, got {v!r}")
        for name in ("vision_n_layers", "n_mtp_layers"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f"{name} must be an integer >= 0, got {v!r}")
        for name in ("gate_temp", "route_scale", "swiglu_limit", "hc_eps", "norm_eps", "rope_theta",
                     "compress_rope_theta", "rope_factor", "beta_fast", "beta_slow", "vision_rope_theta"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
                 f"{name} must be a positive number, got {v!r}")
        need(self.rope_head_dim >= 2 and self.rope_head_dim % 2 == 0 and self.rope_head_dim <= self.head_dim,
             f"rope_head_dim must be even and at most head_dim ({self.head_dim}), got {self.rope_head_dim}")
        need(self.rope_head_dim <= self.index_head_dim,
             f"rope_head_dim ({self.rope_head_dim}) exceeds index_head_dim ({self.index_head_dim})")
        need(self.n_heads % self.o_groups == 0, f"n_heads ({self.n_heads}) is not divisible by o_groups ({self.o_groups})")
        need(self.n_activated_experts <= self.n_routed_experts,
             f"n_activated_experts ({self.n_activated_experts}) exceeds n_routed_experts ({self.n_routed_experts})")
        need(self.n_shared_experts == 1, f"n_shared_experts must be 1 (the official code asserts it), got {self.n_shared_experts}")
        need(self.score_func in SCORE_FUNCS, f"score_func must be one of {SCORE_FUNCS}, got {self.score_func!r}")
        need(self.beta_fast >= self.beta_slow, f"beta_fast ({self.beta_fast}) is below beta_slow ({self.beta_slow})")
        need(self.window_size <= self.max_seq_len, f"window_size ({self.window_size}) exceeds max_seq_len ({self.max_seq_len})")

        # layer schedule and the sharing it implies
        L, ratios = self.n_layers, self.compress_ratios
        need(len(ratios) == L + self.n_mtp_layers,
             f"compress_ratios has {len(ratios)} entries; expected n_layers + n_mtp_layers = {L + self.n_mtp_layers} "
             f"(one per backbone layer, then one per DSpark stage)")
        need(all(r in RATIOS for r in ratios), f"compress_ratios must hold only {RATIOS} in V4.1, got {list(ratios)}")
        need(all(r == 0 for r in ratios[L:]), f"compress_ratios of the DSpark stages must be 0, got {list(ratios[L:])}")
        for name in ("kv_source_layers", "index_source_layers"):
            ids = getattr(self, name)
            need(list(ids) == sorted(set(ids)), f"{name} must be increasing without repeats, got {list(ids)}")
            need(all(0 <= i < L for i in ids), f"{name} {list(ids)} has a layer outside 0..{L - 1}")
            zero = [i for i in ids if ratios[i] == 0]
            need(not zero, f"{name} names layer(s) {zero} whose compress ratio is 0: a source needs a compressor")
        missing = [i for i in self.kv_source_layers if i not in self.index_source_layers]
        need(not missing, f"kv_source_layers {missing} are not in index_source_layers: the index keys of a KV group "
                          f"come from its source's compressor, so each KV source must also be an index source")
        for i in range(L):
            if ratios[i] == 0:
                continue
            src = _latest(self.kv_source_layers, i)
            need(src is not None, f"layer {i} has compress ratio {ratios[i]} but no KV source at or before it "
                                  f"(kv_source_layers {list(self.kv_source_layers)})")
            need(ratios[src] == ratios[i], f"layer {i} (ratio {ratios[i]}) would read the compressed cache of layer "
                                           f"{src} (ratio {ratios[src]}): a KV group must share one ratio")
        c = self.candidate_source_layer
        if c is not None:
            need(c in self.index_source_layers,
                 f"candidate_source_layer {c} is not an index source ({list(self.index_source_layers)}): it scores every position")
            need(self.candidate_topk_blocks * self.candidate_block_size >= self.index_topk + self.candidate_block_size,
                 f"candidate_topk_blocks x candidate_block_size = {self.candidate_topk_blocks * self.candidate_block_size} "
                 f"cannot hold index_topk ({self.index_topk}) plus a partial newest block ({self.candidate_block_size}): "
                 f"top-k would reach outside the candidates")

        # Engram
        ids = self.engram_layer_ids
        need(list(ids) == sorted(set(ids)), f"engram_layer_ids must be increasing without repeats, got {list(ids)}")
        need(all(0 <= i < L for i in ids), f"engram_layer_ids {list(ids)} has a layer outside 0..{L - 1}")
        need(len(self.engram_num_embeddings) == len(ids),
             f"engram_num_embeddings has {len(self.engram_num_embeddings)} entries for {len(ids)} Engram layers")
        need(all(n >= 1 for n in self.engram_num_embeddings),
             f"engram_num_embeddings must be positive, got {list(self.engram_num_embeddings)}")
        need(self.engram_max_ngram_size >= 2, f"engram_max_ngram_size must be >= 2 (2-grams and up), got {self.engram_max_ngram_size}")
        need(0 <= self.engram_pad_id < self.vocab_size, f"engram_pad_id {self.engram_pad_id} is outside the vocabulary")

        # special tokens, DSpark, vision
        for name in ("image_token_id", "dspark_noise_token_id", "bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            need(v is None or (isinstance(v, int) and 0 <= v < self.vocab_size),
                 f"{name} {v!r} is outside the vocabulary of {self.vocab_size}")
        if self.n_mtp_layers:
            need(self.dspark_noise_token_id is not None, "DSpark stages need dspark_noise_token_id")
            need(self.dspark_block_size >= 2, f"dspark_block_size must be >= 2, got {self.dspark_block_size}")
            need(len(self.dspark_target_layer_ids) >= 1 and all(0 <= i < L for i in self.dspark_target_layer_ids),
                 f"dspark_target_layer_ids {list(self.dspark_target_layer_ids)} must name backbone layers 0..{L - 1}")
            need(self.dspark_n_activated_experts <= self.dspark_n_routed_experts,
                 f"dspark_n_activated_experts ({self.dspark_n_activated_experts}) exceeds dspark_n_routed_experts "
                 f"({self.dspark_n_routed_experts})")
        if self.vision_n_layers:
            need(self.image_token_id is not None, "a vision tower needs image_token_id")
            need(self.vision_dim % self.vision_n_heads == 0,
                 f"vision_dim ({self.vision_dim}) is not divisible by vision_n_heads ({self.vision_n_heads})")
            need((self.vision_dim // self.vision_n_heads) % 4 == 0,
                 f"the vision head width {self.vision_dim // self.vision_n_heads} must be a multiple of 4 (2D RoPE: "
                 f"half of the rotated pairs by row, half by column)")

    # ----------------------------------------------------------------------------------------------
    # Presets and config.json
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "V41Config":
        try:
            make = _PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown V4.1 preset {name!r}; choose one of {sorted(_PRESETS)}") from None
        return make().replace(**overrides) if overrides else make()

    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides: Any) -> "V41Config":
        """From a config.json dict in the inference or the HF-style spelling (module docstring)."""
        if not isinstance(d, dict):
            raise ConfigError("a V4.1 config must be a JSON object")
        model_type = d.get("model_type")
        if model_type not in (None, "deepseek_v41", "deepseek_v41_text"):
            raise ConfigError(f"model_type is {model_type!r}, expected 'deepseek_v41'")
        text = d.get("text_config", d)
        vision = d.get("vision_config") or {}
        if not isinstance(text, dict) or not isinstance(vision, dict):
            raise ConfigError("text_config and vision_config must be JSON objects")
        layers = (text, d) if text is not d else (d,)
        kwargs: dict[str, Any] = {}
        for field, keys in _KEYS.items():
            found = [(k, src[k]) for k in keys for src in layers if k in src]
            found += [(f"vision_config.{k}", vision[k]) for k in _VISION_KEYS.get(field, ()) if k in vision]
            if not found:
                continue
            (k0, v0), *rest = found
            for k, v in rest:
                if v != v0:
                    raise ConfigError(f"{field} is given twice with different values: {k0}={v0!r}, {k}={v!r}")
            kwargs[field] = v0
        rope = text.get("rope_scaling") or d.get("rope_scaling")
        if rope is not None:
            if not isinstance(rope, dict):
                raise ConfigError(f"rope_scaling must be an object, got {rope!r}")
            kind = rope.get("rope_type", rope.get("type", "yarn"))
            if kind != "yarn":
                raise ConfigError(f"rope_scaling type {kind!r} is not supported (V4.1 uses yarn)")
            for field, key in (("rope_factor", "factor"), ("original_seq_len", "original_max_position_embeddings"),
                               ("beta_fast", "beta_fast"), ("beta_slow", "beta_slow")):
                if key in rope:
                    if field in kwargs and kwargs[field] != rope[key]:
                        raise ConfigError(f"{field} is given twice with different values: {kwargs[field]!r} and "
                                          f"rope_scaling.{key}={rope[key]!r}")
                    kwargs[field] = rope[key]
        if "vision_n_layers" not in kwargs and not vision and not any(k.startswith("vision_") for k in text):
            kwargs["vision_n_layers"] = 0  # a text-only config
        required = [" or ".join(_KEYS[f]) for f in _REQUIRED if f not in kwargs]
        if required:
            raise ConfigError(f"config lacks required field(s): {'; '.join(required)}")
        for key, want in (("num_key_value_heads", 1), ("hidden_act", "silu"), ("attention_bias", False),
                          ("tie_word_embeddings", False)):
            got = next((src[key] for src in layers if key in src), want)
            if got != want:
                raise ConfigError(f"{key}={got!r} is not supported (DeepSeek-V4.1 has {want!r})")
        if kwargs.get("candidate_source_layer", 0) is not None and kwargs.get("candidate_source_layer", 0) < 0:
            kwargs["candidate_source_layer"] = None  # -1: no two-level top-k
        for field in ("rope_factor", "rope_theta", "compress_rope_theta", "beta_fast", "beta_slow", "gate_temp",
                      "route_scale", "swiglu_limit", "hc_eps", "norm_eps", "vision_rope_theta"):
            if isinstance(kwargs.get(field), int) and not isinstance(kwargs.get(field), bool):
                kwargs[field] = float(kwargs[field])
        kwargs.update(overrides)
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"unusable V4.1 config: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides: Any) -> "V41Config":
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(d, **overrides)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_inference_dict(self) -> dict[str, Any]:
        """The inference `config.json` spelling (official `ModelArgs` names)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    def to_hf_dict(self, dtype: str = "bfloat16") -> dict[str, Any]:
        """The HF-style `config.json` (`text_config` / `vision_config`), as the release writes it."""
        text: dict[str, Any] = {"model_type": "deepseek_v41_text"}
        vision: dict[str, Any] = {"model_type": "deepseek_v41_vision"}
        for field, keys in _KEYS.items():
            if field in _TOP_LEVEL or field in _VISION_KEYS or field in _YARN:
                continue
            v = getattr(self, field)
            text[keys[-1]] = list(v) if isinstance(v, tuple) else v
        text["rope_scaling"] = {"rope_type": "yarn", "factor": self.rope_factor, "beta_fast": self.beta_fast,
                                "beta_slow": self.beta_slow, "original_max_position_embeddings": self.original_seq_len}
        for field, keys in _VISION_KEYS.items():
            vision[keys[-1]] = getattr(self, field)
        out: dict[str, Any] = {"architectures": ["DeepseekV41ForCausalLM"], "model_type": "deepseek_v41",
                               "dtype": dtype, "text_config": text}
        out.update({f: getattr(self, f) for f in _TOP_LEVEL})
        if self.vision_n_layers:
            out["vision_config"] = vision
        return out


def _latest(sources: tuple[int, ...], layer: int) -> int | None:
    before = [s for s in sources if s <= layer]
    return before[-1] if before else None


# Field -> the keys it is read from: the inference name first, then the HF-style names (the last one is
# what `to_hf_dict` writes). Vision fields are also read from vision_config under _VISION_KEYS.
_KEYS: dict[str, tuple[str, ...]] = {
    "vocab_size": ("vocab_size",), "dim": ("dim", "hidden_size"), "n_layers": ("n_layers", "num_hidden_layers"),
    "n_heads": ("n_heads", "num_attention_heads"), "head_dim": ("head_dim",),
    "rope_head_dim": ("rope_head_dim", "qk_rope_head_dim"), "q_lora_rank": ("q_lora_rank",),
    "o_groups": ("o_groups",), "o_lora_rank": ("o_lora_rank",), "window_size": ("window_size", "sliding_window"),
    "compress_ratios": ("compress_ratios",), "kv_source_layers": ("kv_source_layers", "kv_source_layer_ids"),
    "index_source_layers": ("index_source_layers", "index_source_layer_ids"),
    "index_n_heads": ("index_n_heads",), "index_head_dim": ("index_head_dim",), "index_topk": ("index_topk",),
    "candidate_source_layer": ("candidate_source_layer", "candidate_source_layer_id"),
    "candidate_topk_blocks": ("candidate_topk_blocks",), "candidate_block_size": ("candidate_block_size",),
    "n_routed_experts": ("n_routed_experts",), "n_activated_experts": ("n_activated_experts", "num_experts_per_tok"),
    "moe_inter_dim": ("moe_inter_dim", "moe_intermediate_size"), "n_shared_experts": ("n_shared_experts",),
    "score_func": ("score_func", "scoring_func"), "gate_temp": ("gate_temp",), "norm_topk_prob": ("norm_topk_prob",),
    "route_scale": ("route_scale", "routed_scaling_factor"), "swiglu_limit": ("swiglu_limit",),
    "hc_mult": ("hc_mult",), "hc_sinkhorn_iters": ("hc_sinkhorn_iters",), "hc_eps": ("hc_eps",),
    "norm_eps": ("norm_eps", "rms_norm_eps"), "rope_theta": ("rope_theta",),
    "compress_rope_theta": ("compress_rope_theta",), "rope_factor": ("rope_factor",),
    "original_seq_len": ("original_seq_len",), "beta_fast": ("beta_fast",), "beta_slow": ("beta_slow",),
    "max_seq_len": ("max_seq_len", "max_position_embeddings"),
    "engram_layer_ids": ("engram_layer_ids",), "engram_num_embeddings": ("engram_num_embeddings",),
    "engram_max_ngram_size": ("engram_max_ngram_size",), "engram_vocab_size": ("engram_vocab_size",),
    "engram_n_heads": ("engram_n_heads",), "engram_head_dim": ("engram_head_dim",),
    "engram_pad_id": ("engram_pad_id", "engram_pad_token_id"),
    "engram_compressed_vocab_size": ("engram_compressed_vocab_size",),
    "vision_n_layers": ("vision_n_layers",), "vision_dim": ("vision_dim",), "vision_n_heads": ("vision_n_heads",),
    "vision_inter_dim": ("vision_inter_dim",), "vision_patch_size": ("vision_patch_size",),
    "vision_rope_theta": ("vision_rope_theta",), "vision_downsample_ratio": ("vision_downsample_ratio",),
    "vision_max_n_token": ("vision_max_n_token",), "vision_min_pixels": ("vision_min_pixels",),
    "vision_max_wh_ratio": ("vision_max_wh_ratio",), "image_token_id": ("image_token_id",),
    "n_mtp_layers": ("n_mtp_layers", "num_nextn_predict_layers"), "dspark_block_size": ("dspark_block_size",),
    "dspark_noise_token_id": ("dspark_noise_token_id",), "dspark_target_layer_ids": ("dspark_target_layer_ids",),
    "dspark_markov_rank": ("dspark_markov_rank",), "dspark_n_routed_experts": ("dspark_n_routed_experts",),
    "dspark_n_activated_experts": ("dspark_n_activated_experts", "dspark_num_experts_per_tok"),
    "bos_token_id": ("bos_token_id",), "eos_token_id": ("eos_token_id",),
}
_VISION_KEYS: dict[str, tuple[str, ...]] = {
    "vision_n_layers": ("num_hidden_layers",), "vision_dim": ("hidden_size",), "vision_n_heads": ("num_attention_heads",),
    "vision_inter_dim": ("intermediate_size",), "vision_patch_size": ("patch_size",),
    "vision_rope_theta": ("rope_theta",), "vision_downsample_ratio": ("downsample_ratio",),
    "vision_max_n_token": ("max_image_tokens",), "vision_min_pixels": ("min_pixels",),
    "vision_max_wh_ratio": ("max_wh_ratio",),
}
_TOP_LEVEL = ("image_token_id", "bos_token_id", "eos_token_id")  # HF-style: beside text_config
_YARN = ("rope_factor", "original_seq_len", "beta_fast", "beta_slow")  # HF-style: in rope_scaling
_REQUIRED = ("vocab_size", "dim", "n_layers", "n_heads", "head_dim", "rope_head_dim", "q_lora_rank", "o_groups",
             "o_lora_rank", "window_size", "compress_ratios", "kv_source_layers", "index_source_layers",
             "index_n_heads", "index_head_dim", "index_topk", "candidate_source_layer", "candidate_topk_blocks",
             "candidate_block_size", "n_routed_experts", "n_activated_experts", "moe_inter_dim")


# --------------------------------------------------------------------------------------------------
# Presets

def _flash() -> V41Config:
    """DeepSeek-V4.1-Flash as released (config.json of deepseek-ai/DeepSeek-V4.1-Flash, architecture.md §12.1)."""
    return V41Config(
        vocab_size=129280, dim=5120, n_layers=40, n_heads=64, head_dim=512, rope_head_dim=64, q_lora_rank=1280,
        o_groups=8, o_lora_rank=1024, window_size=128,
        compress_ratios=(0, 0) + (2,) * 18 + (1,) * 20 + (0,) * 3,
        kv_source_layers=(2, 8, 14, 20), index_source_layers=(2, 8, 14, 20, 24, 28, 32, 36),
        index_n_heads=32, index_head_dim=128, index_topk=512,
        candidate_source_layer=20, candidate_topk_blocks=2048, candidate_block_size=8,
        n_routed_experts=384, n_activated_experts=6, moe_inter_dim=2304, swiglu_limit=10.0, norm_eps=1e-20,
        rope_factor=16.0, original_seq_len=65536, max_seq_len=1048576,
        engram_layer_ids=(1, 14), engram_num_embeddings=(384006168, 384016682), engram_max_ngram_size=4,
        engram_vocab_size=16000000, engram_n_heads=8, engram_head_dim=256, engram_pad_id=2,
        engram_compressed_vocab_size=99092,
        vision_n_layers=32, vision_dim=1024, vision_n_heads=16, vision_inter_dim=2816, vision_patch_size=14,
        vision_downsample_ratio=3, vision_max_n_token=1024, vision_min_pixels=295936, image_token_id=129264,
        n_mtp_layers=3, dspark_block_size=5, dspark_noise_token_id=128799, dspark_target_layer_ids=(37, 38, 39),
        dspark_markov_rank=256, dspark_n_routed_experts=128, dspark_n_activated_experts=3)


def _tiny() -> V41Config:
    """Every V4.1 mechanism at CPU size: the model of the golden fixtures (architecture.md §12.2):
    ratios 0/2/1, two KV groups, three index sources, candidates from layer 4, Engram on layers 0
    and 4, two DSpark stages, a 2-layer ViT."""
    return V41Config(
        vocab_size=256, dim=64, n_layers=8, n_heads=4, head_dim=32, rope_head_dim=8, q_lora_rank=32, o_groups=2,
        o_lora_rank=16, window_size=8, compress_ratios=(0, 2, 2, 2, 1, 1, 1, 1, 0, 0),
        kv_source_layers=(1, 4), index_source_layers=(1, 4, 6), index_n_heads=8, index_head_dim=16, index_topk=6,
        candidate_source_layer=4, candidate_topk_blocks=3, candidate_block_size=4,
        n_routed_experts=8, n_activated_experts=2, moe_inter_dim=16, swiglu_limit=1.0, norm_eps=1e-20,
        rope_factor=16.0, original_seq_len=4096, max_seq_len=128,
        engram_layer_ids=(0, 4), engram_num_embeddings=(384, 552), engram_max_ngram_size=4, engram_vocab_size=50,
        engram_n_heads=2, engram_head_dim=32, engram_pad_id=2, engram_compressed_vocab_size=122,
        vision_n_layers=2, vision_dim=32, vision_n_heads=2, vision_inter_dim=48, vision_patch_size=14,
        vision_downsample_ratio=3, vision_max_n_token=1024, vision_min_pixels=295936, image_token_id=253,
        n_mtp_layers=2, dspark_block_size=3, dspark_noise_token_id=254, dspark_target_layer_ids=(5, 6, 7),
        dspark_markov_rank=16, dspark_n_routed_experts=6, dspark_n_activated_experts=3)


_PRESETS = {"v41-flash": _flash, "v41-tiny": _tiny}
PRESETS = tuple(_PRESETS)
