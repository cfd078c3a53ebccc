"""DeepSeek-V4 configuration (architecture.md §1).

One frozen dataclass, `V4Config`, holds every architectural value: exactly what `config.json` holds.
How a model runs (dtypes, kernel choices, chunk sizes, remat, the training-stage switches) is a
second frozen dataclass, `RunOptions`, passed beside the config and never written into
`config.json`. Layer kinds are enums, not strings scattered through the model: `AttentionKind`
per layer (architecture.md §1.2) and `RouterKind` per MoE layer (architecture.md §5). Presets: `v4-flash`, `v4-pro`
(released values, architecture.md §1.1) and `tiny`, `tiny-b` (CPU test configs that keep every mechanism
active, architecture.md §1.3); `RunOptions.preset` gives the options each is meant to run with.

HF `config.json` I/O (`from_hf_dict` / `to_hf_dict`) accepts both the current transformers field names
(`layer_types`, `mlp_layer_types`, `compress_rates`, `rope_parameters`, `partial_rotary_factor`) and the
older ones shipped with the release (`compress_ratios`, `compress_rate_csa/hca`, `num_hash_layers`,
`qk_rope_head_dim`, `rope_scaling`), and writes the current ones. The 1:1 fields are one table,
`HF_FIELDS`, read by both directions; the few structured fields have their own code beside it.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
from typing import Any


class ConfigError(ValueError):
    """An inconsistent or unsupported configuration value."""


class AttentionKind(enum.Enum):
    """Attention variant of one layer (architecture.md §4). Values are the HF `layer_types` labels."""

    SLIDING = "sliding_attention"  # SWA only (compress ratio 0)
    CSA = "compressed_sparse_attention"  # overlapping compressor + lightning indexer top-k
    HCA = "heavily_compressed_attention"  # non-overlapping compressor, all visible entries


class RouterKind(enum.Enum):
    """Expert selection of one MoE layer (architecture.md §5). Values are the HF `mlp_layer_types` labels."""

    HASH = "hash_moe"  # frozen token-id -> experts table (architecture.md §5.2)
    LEARNED = "moe"  # top-k of sqrt(softplus) affinities + selection bias (architecture.md §5.1)


class Remat(enum.Enum):
    """What the backward pass recomputes in each scanned block (memory/compute trade-off, not math)."""

    NONE = "none"  # keep every activation
    FULL = "full"  # keep only the block inputs; recompute the block
    DOTS = "dots"  # keep matmul outputs without batch dimensions (jax.checkpoint_policies)


class AttentionImpl(enum.Enum):
    """Which implementation of the core sparse attention and indexer top-k runs (same function)."""

    REFERENCE = "reference"  # pure JAX (v4jax.model.attention.sparse_attention, v4jax.model.indexer.select_topk)
    PALLAS = "pallas"  # pallas_kernels.sparse_attention / lightning_indexer


class Numerics(enum.Enum):
    """Which run-time roundings the forward applies (architecture.md §10.3)."""

    EXACT = "exact"  # the weights' values in the compute dtype, fp32 where the peer keeps fp32
    RELEASE = "release"  # what DeepSeek's inference code computes: FP8 activations before FP8/FP4 GEMMs, BF16
    #                      GEMM results, FP8 KV (non-RoPE dims), Hadamard + FP4 indexer q/k, BF16 index scores


class MoEImpl(enum.Enum):
    """Which implementation of the routed experts' grouped SwiGLU runs (same function)."""

    REFERENCE = "reference"  # one-hot per-expert masked matmuls (slow; for checking)
    RAGGED_DOT = "ragged_dot"  # jax.lax.ragged_dot on expert-sorted rows
    PALLAS = "pallas"  # pallas_kernels.moe_dispatch grouped matmul


SCORE_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a model runs: settings that never change what the model computes (beyond rounding) and
    are therefore not architecture. Passed beside the config (`Transformer(cfg, rngs=..., options=...)`)
    and never written into config.json. Set by train.py's `model` table / `--model.FIELD=...`, by
    `--set` in the dry run, or, for a loaded checkpoint, from its `torch_dtype` (the dtypes).

    Fields:
      dtype: compute dtype of activations ("float32", "bfloat16", "float16").
      param_dtype: storage dtype of the parameters (RMSNorm weights, mHC and sinks stay fp32).
      attention_chunk: queries per chunk in the reference attention and indexer (memory knob).
      moe_dispatch_chunk: tokens per device per expert-parallel all-to-all round (memory knob).
      moe_gather_tokens: under expert parallelism, the most tokens per expert group (the devices that
        split the experts) that go the decode-shaped way: gathered onto every device of the group, each
        device running its own experts on the rows routed to them (architecture.md §5.5). 0: always
        the all-to-all. Chosen from the token count at trace time; both ways compute the same function.
      moe_dense_tokens: under expert parallelism, the most tokens per expert group for which each device
        runs every one of its experts on every token of the group (the combine weight 0 where a token did
        not choose it) instead of the routed rows in windows: E/ep times the routed FLOPs, but plain dots
        that read a layer's expert weights in place inside the scan over stacked layers, where the
        windows' loop and grouped matmul get them copied out of the stack (architecture.md §5.5). At the
        default 128 the extra FLOPs stay under the time the weights take to read on TPUs (decode).
        0: never.
      moe_capacity_factor: rows a device receives per all-to-all pass, as a multiple of the rows it sends
        (the mean load); a device routed more takes further passes, so no row is ever dropped
        (architecture.md §5.5). 0: one pass with room for the worst case (every row on one device).
      remat: what the backward pass recomputes in each scanned block (`Remat`).
      attention_impl: code behind the sparse attention core and the indexer top-k (`AttentionImpl`).
      moe_impl: code behind the routed experts' grouped SwiGLU (`MoEImpl`).
      csa_dense: training stage switch (architecture.md §4.8, §8.2): CSA layers attend to every visible
        compressed entry, as HCA does, and skip the indexer's top-k (dense stage, indexer warm-up).
      indexer_detach: the indexer reads x and cQ through stop_gradient, so it learns only from its
        KL loss and the KL trains nothing else (architecture.md §8.2); no effect on the forward values.
      numerics: `Numerics.EXACT` or `Numerics.RELEASE` (DeepSeek's inference roundings, architecture.md §10.3;
        needs dtype bfloat16, as that code computes in BF16).
    """

    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_chunk: int = 512
    moe_dispatch_chunk: int = 1024
    moe_gather_tokens: int = 1024
    moe_dense_tokens: int = 128
    moe_capacity_factor: float = 1.25
    remat: Remat = Remat.NONE
    attention_impl: AttentionImpl = AttentionImpl.REFERENCE
    moe_impl: MoEImpl = MoEImpl.RAGGED_DOT
    csa_dense: bool = False
    indexer_detach: bool = True
    numerics: Numerics = Numerics.EXACT

    def __post_init__(self):
        # accept the enum values as strings (command line, TOML) and normalise them to enums
        for name, kind in (("remat", Remat), ("attention_impl", AttentionImpl), ("moe_impl", MoEImpl),
                           ("numerics", Numerics)):
            object.__setattr__(self, name, _as_enum(kind, getattr(self, name), name))
        for name in ("dtype", "param_dtype"):
            object.__setattr__(self, name, _dtype_name(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first bad value."""
        for name in ("attention_chunk", "moe_dispatch_chunk"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        v = self.moe_gather_tokens
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            raise ConfigError(f"moe_gather_tokens must be a non-negative integer, got {v!r}")
        v = self.moe_capacity_factor
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0):
            raise ConfigError(f"moe_capacity_factor must be a non-negative number, got {v!r}")
        for name in ("csa_dense", "indexer_detach"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        if self.numerics is Numerics.RELEASE and self.dtype != "bfloat16":
            raise ConfigError(f"numerics=release computes in bfloat16 as DeepSeek's inference code does; "
                              f"dtype is {self.dtype!r} (set dtype=bfloat16)")

    def replace(self, **changes: Any) -> "RunOptions":
        unknown = sorted(set(changes) - set(OPTION_FIELDS))
        if unknown:
            raise ConfigError(f"{unknown[0]} is not a run-time option; options are {list(OPTION_FIELDS)}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "RunOptions":
        """The options a preset is meant to run with (release dtypes; small chunks for the tiny ones)."""
        if name not in _PRESET_OPTIONS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(_PRESET_OPTIONS)}")
        return cls().replace(**{**_PRESET_OPTIONS[name], **overrides})

    @classmethod
    def for_weights(cls, dtype: str, **overrides: Any) -> "RunOptions":
        """Options of a model loaded from weights stored in `dtype` (a checkpoint's torch_dtype):
        computed and stored in that dtype unless overridden."""
        return cls().replace(**{"dtype": dtype, "param_dtype": dtype, **overrides})


OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(RunOptions))


def split_options(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split one table of settings (train.py's `model` table, the dry run's --set) into
    (V4Config fields, RunOptions fields). Unknown keys stay in the first, where the caller refuses them."""
    return ({k: v for k, v in values.items() if k not in OPTION_FIELDS},
            {k: v for k, v in values.items() if k in OPTION_FIELDS})


def _refuse_options(changes: dict[str, Any]) -> None:
    """One line naming a run-time option given to V4Config (it moved to RunOptions)."""
    for name in changes:
        if name in OPTION_FIELDS:
            raise ConfigError(f"{name} is a run-time option: set it on RunOptions, not V4Config")


@dataclasses.dataclass(frozen=True)
class V4Config:
    """Every architectural value of a DeepSeek-V4 model.

    Fields (architecture.md §1.1 notation in brackets):
      vocab_size [V]; dim [d] hidden size; n_layers [L] main blocks (MTP not counted);
      n_heads [H]; head_dim [c] shared q/kv head width; rope_head_dim [r] RoPE dims at the end of a head;
      q_lora_rank [d_c] query latent; o_groups [g], o_lora_rank [d_g] grouped output projection;
      window_size [n_win] sliding window including the query token;
      layer_types: one AttentionKind per main layer; csa_ratio [m], hca_ratio [m'] compression ratios;
      router_types: one RouterKind per main layer (hash layers first in the releases);
      index_n_heads [n_I], index_head_dim [c_I], index_topk [k_I] lightning indexer;
      n_routed_experts [E], n_shared_experts (must be 1), n_activated_experts [k], moe_inter_dim [I];
      score_func router affinity; route_scale routed-weight scale; swiglu_limit [L] clamp;
      hc_mult [n_hc] residual streams; hc_sinkhorn_iters, hc_eps mHC (architecture.md §3.2);
      norm_eps every RMSNorm; rope_theta plain RoPE base (SWA layers); compress_rope_theta base of
      CSA/HCA layers; rope_factor, original_seq_len, beta_fast, beta_slow YaRN (architecture.md §7; factor 1
      disables it); max_seq_len positions supported; n_mtp_layers MTP depth (0 or 1, architecture.md §6);
      bos_token_id, eos_token_id carried through config.json.
    How the model runs (dtypes, kernels, chunk sizes, remat, csa_dense, indexer_detach) is not
    architecture: that is `RunOptions`.
    """

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
    layer_types: tuple[AttentionKind, ...]
    router_types: tuple[RouterKind, ...]
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    n_routed_experts: int
    n_activated_experts: int
    moe_inter_dim: int
    csa_ratio: int = 4
    hca_ratio: int = 128
    n_shared_experts: int = 1
    score_func: str = "sqrtsoftplus"
    route_scale: float = 1.5
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_factor: float = 16.0
    original_seq_len: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    max_seq_len: int = 1048576
    n_mtp_layers: int = 1
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1

    def __post_init__(self):
        # Accept lists/strings for the schedules and normalise them to enum tuples.
        object.__setattr__(self, "layer_types", tuple(_as_enum(AttentionKind, t, "layer_types") for t in self.layer_types))
        object.__setattr__(self, "router_types", tuple(_as_enum(RouterKind, t, "router_types") for t in self.router_types))
        self.validate()

    # ----------------------------------------------------------------------------------------------
    # Derived values
    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.rope_head_dim

    @property
    def n_hash_layers(self) -> int:
        return sum(t is RouterKind.HASH for t in self.router_types)

    def compress_ratio(self, kind: AttentionKind) -> int:
        """Tokens per compressed entry for a layer kind (0 = no compressor)."""
        return {AttentionKind.SLIDING: 0, AttentionKind.CSA: self.csa_ratio, AttentionKind.HCA: self.hca_ratio}[kind]

    @property
    def compress_ratios(self) -> tuple[int, ...]:
        """Official-style per-layer ratios, MTP entries (always SWA, architecture.md §6) appended."""
        return tuple(self.compress_ratio(k) for k in self.layer_types) + (0,) * self.n_mtp_layers

    def replace(self, **changes: Any) -> "V4Config":
        _refuse_options(changes)
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming the first inconsistent value."""

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "head_dim", "q_lora_rank", "o_groups",
                     "o_lora_rank", "window_size", "index_n_heads", "index_head_dim", "index_topk",
                     "n_routed_experts", "n_activated_experts", "moe_inter_dim", "hc_mult",
                     "hc_sinkhorn_iters", "max_seq_len"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name} must be a positive integer, got {v!r}")
        need(len(self.layer_types) == self.n_layers,
             f"layer_types has {len(self.layer_types)} entries but n_layers is {self.n_layers}")
        need(len(self.router_types) == self.n_layers,
             f"router_types has {len(self.router_types)} entries but n_layers is {self.n_layers}")
        need(self.rope_head_dim >= 2 and self.rope_head_dim % 2 == 0,
             f"rope_head_dim must be a positive even number, got {self.rope_head_dim}")
        need(self.rope_head_dim <= self.head_dim,
             f"rope_head_dim ({self.rope_head_dim}) exceeds head_dim ({self.head_dim})")
        need(self.rope_head_dim <= self.index_head_dim,
             f"rope_head_dim ({self.rope_head_dim}) exceeds index_head_dim ({self.index_head_dim})")
        need(self.n_heads % self.o_groups == 0,
             f"n_heads ({self.n_heads}) is not divisible by o_groups ({self.o_groups})")
        need(self.n_activated_experts <= self.n_routed_experts,
             f"n_activated_experts ({self.n_activated_experts}) exceeds n_routed_experts ({self.n_routed_experts})")
        need(self.n_shared_experts == 1, f"n_shared_experts must be 1 (official code asserts it), got {self.n_shared_experts}")
        need(self.score_func in SCORE_FUNCS, f"score_func must be one of {SCORE_FUNCS}, got {self.score_func!r}")
        need(self.n_mtp_layers in (0, 1), f"n_mtp_layers must be 0 or 1 (architecture.md §6: depth 1), got {self.n_mtp_layers}")
        need(self.window_size <= self.max_seq_len, f"window_size ({self.window_size}) exceeds max_seq_len ({self.max_seq_len})")
        uses = set(self.layer_types)
        if AttentionKind.CSA in uses:
            need(isinstance(self.csa_ratio, int) and 1 <= self.csa_ratio <= self.max_seq_len,
                 f"csa_ratio must be in [1, max_seq_len], got {self.csa_ratio}")
        if AttentionKind.HCA in uses:
            need(isinstance(self.hca_ratio, int) and 1 <= self.hca_ratio <= self.max_seq_len,
                 f"hca_ratio must be in [1, max_seq_len], got {self.hca_ratio}")
        if AttentionKind.CSA in uses:
            need(self.index_topk <= max(1, self.max_seq_len // self.csa_ratio),
                 f"index_topk ({self.index_topk}) exceeds the number of compressed entries at max_seq_len "
                 f"({self.max_seq_len // self.csa_ratio})")
        for name in ("route_scale", "swiglu_limit", "hc_eps", "norm_eps", "rope_theta", "compress_rope_theta",
                     "rope_factor", "beta_fast", "beta_slow"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and math.isfinite(v) and v > 0, f"{name} must be a positive number, got {v!r}")
        need(self.beta_fast >= self.beta_slow, f"beta_fast ({self.beta_fast}) is below beta_slow ({self.beta_slow})")
        need(self.original_seq_len >= 1, f"original_seq_len must be >= 1, got {self.original_seq_len}")

    # ----------------------------------------------------------------------------------------------
    # Presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "V4Config":
        try:
            make = _PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(_PRESETS)}") from None
        return make().replace(**overrides) if overrides else make()

    # ----------------------------------------------------------------------------------------------
    # HF config.json
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides: Any) -> "V4Config":
        """Build from an HF `config.json` dict (current or older field names). Run-time keys are not
        architecture: `torch_dtype`/`dtype` is read by `hf_weights_dtype`, an older file's
        `attention_chunk` is ignored."""
        _refuse_options(overrides)
        if d.get("model_type", "deepseek_v4") != "deepseek_v4":
            hint = (" (a DeepSeek-V4.1 config: read it with v4jax.config_v41.V41Config)"
                    if str(d.get("model_type", "")).startswith("deepseek_v41") else "")
            raise ConfigError(f"model_type is {d.get('model_type')!r}, expected 'deepseek_v4'{hint}")
        if d.get("num_key_value_heads", 1) != 1:
            raise ConfigError(f"num_key_value_heads must be 1 (shared single-head KV), got {d['num_key_value_heads']}")
        for flag, want in _HF_CONSTANTS.items():
            if flag in d and d[flag] is not want:
                raise ConfigError(f"{flag}={d[flag]!r} is not supported (DeepSeek-V4 uses {want})")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {d['hidden_act']!r} is not supported (DeepSeek-V4 uses 'silu')")
        for key in _HF_REQUIRED:
            if key not in d:
                raise ConfigError(f"config.json lacks required field {key!r}")

        # the 1:1 fields: one table, current key first, then the older spellings
        kwargs: dict[str, Any] = {}
        for field, key, convert, default, older in HF_FIELDS:
            for k in (key,) + older:
                value = _hf_get(d, k)
                if value is not _MISSING:
                    break
            else:
                value = default
            kwargs[field] = value if convert is None or value is None else convert(value)
        n_layers, head_dim, n_mtp = kwargs["n_layers"], kwargs["head_dim"], kwargs["n_mtp_layers"]
        csa = kwargs["csa_ratio"]

        # layer schedule: current `layer_types`, or the release's per-layer `compress_ratios`
        if d.get("layer_types") is not None:
            layer_types = [_as_enum(AttentionKind, t, "layer_types") for t in d["layer_types"]]
        elif d.get("compress_ratios") is not None:
            ratios = list(d["compress_ratios"])
            if len(ratios) not in (n_layers, n_layers + n_mtp):
                raise ConfigError(f"compress_ratios has {len(ratios)} entries; expected {n_layers} or "
                                  f"{n_layers + n_mtp} (layers + MTP)")
            hca_seen = sorted({r for r in ratios[:n_layers] if r not in (0, csa)})
            if len(hca_seen) > 1:
                raise ConfigError(f"compress_ratios mixes several HCA ratios {hca_seen}; one is supported")
            if hca_seen:
                kwargs["hca_ratio"] = hca_seen[0]
            if any(r < 0 for r in ratios):
                raise ConfigError(f"compress_ratios has a negative ratio: {ratios}")
            layer_types = [AttentionKind.SLIDING if r == 0 else AttentionKind.CSA if r == csa else AttentionKind.HCA
                           for r in ratios[:n_layers]]
        else:
            raise ConfigError("config.json has neither layer_types nor compress_ratios; the layer schedule is "
                              "required (transformers' default is the Pro schedule, wrong for Flash)")
        if len(layer_types) != n_layers:
            raise ConfigError(f"layer_types has {len(layer_types)} entries but num_hidden_layers is {n_layers}")

        # routers: current `mlp_layer_types`, or the release's count of leading hash layers
        if d.get("mlp_layer_types") is not None:
            router_types = [_as_enum(RouterKind, t, "mlp_layer_types") for t in d["mlp_layer_types"]]
        else:
            n_hash = int(d.get("num_hash_layers", 3))
            router_types = [RouterKind.HASH] * min(n_layers, n_hash) + [RouterKind.LEARNED] * max(0, n_layers - n_hash)

        # RoPE width: the release's `qk_rope_head_dim`, or transformers' fraction of head_dim
        if "qk_rope_head_dim" in d:
            rope_head_dim = int(d["qk_rope_head_dim"])
        elif d.get("partial_rotary_factor") is not None:
            rope_head_dim = int(round(head_dim * float(d["partial_rotary_factor"])))
        else:
            rope_head_dim = 64

        # RoPE bases and YaRN: nested `rope_parameters` {main, compress}, or a flat one, or `rope_scaling`
        rp = d.get("rope_parameters") or {}
        compress_rope = rp.get("compress") if isinstance(rp.get("compress"), dict) else (d.get("rope_scaling") or rp)
        compress_rope = dict(compress_rope or {})
        rope_type = compress_rope.get("rope_type", compress_rope.get("type", "default"))
        if rope_type not in ("yarn", "default"):
            raise ConfigError(f"rope type {rope_type!r} is not supported for compressed layers (yarn or default)")
        if rope_type == "yarn":
            yarn = dict(rope_factor=float(compress_rope.get("factor", 16.0)),
                        original_seq_len=int(compress_rope.get("original_max_position_embeddings", 65536)),
                        beta_fast=float(compress_rope.get("beta_fast") or 32), beta_slow=float(compress_rope.get("beta_slow") or 1))
        else:
            yarn = dict(rope_factor=1.0)
        main_rope = rp.get("main") if isinstance(rp.get("main"), dict) else {}
        # transformers reads the compressed-layer base from rope_parameters["compress"] when nested
        nested = rp.get("compress") if isinstance(rp.get("compress"), dict) else {}
        compress_theta = nested.get("rope_theta", d.get("compress_rope_theta", 160000.0))

        kwargs.update(
            rope_head_dim=rope_head_dim,
            layer_types=tuple(layer_types),
            router_types=tuple(router_types),
            rope_theta=float(main_rope.get("rope_theta", d.get("rope_theta", 10000.0))),
            compress_rope_theta=float(compress_theta),
            **yarn,
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_dict(self, torch_dtype: str = "float32") -> dict[str, Any]:
        """HF `config.json` dict in the current transformers field names. torch_dtype: the dtype of the
        weights stored beside it (HF convention; not a property of the architecture)."""
        out: dict[str, Any] = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
                               "num_key_value_heads": 1}
        for field, key, _, _, _ in HF_FIELDS:
            _hf_set(out, key, getattr(self, field))
        fraction = self.rope_head_dim / self.head_dim
        compress = {"rope_type": "default", "rope_theta": self.compress_rope_theta, "partial_rotary_factor": fraction}
        if self.rope_factor != 1.0:
            compress.update(rope_type="yarn", factor=self.rope_factor,
                            original_max_position_embeddings=self.original_seq_len,
                            beta_fast=self.beta_fast, beta_slow=self.beta_slow, attention_factor=1.0)
        out.update(
            partial_rotary_factor=fraction,
            layer_types=[t.value for t in self.layer_types],
            mlp_layer_types=[t.value for t in self.router_types],
            rope_theta=self.rope_theta,
            compress_rope_theta=self.compress_rope_theta,
            rope_parameters={"main": {"rope_type": "default", "rope_theta": self.rope_theta,
                                      "partial_rotary_factor": fraction},
                             "compress": compress},
            hidden_act="silu",
            **_HF_CONSTANTS,
            torch_dtype=_dtype_name(torch_dtype),
        )
        return out

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides: Any) -> "V4Config":
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path} does not hold a JSON object")
        # from_hf_dict coerces with int()/float(): "64" or 2.5 would pass silently and None or a
        # string would fail without naming the field, so the JSON types are checked here first
        for field, kinds, what in _HF_FIELD_TYPES:
            v = d.get(field)
            if v is not None and (isinstance(v, bool) or not isinstance(v, kinds)):
                raise ConfigError(f"{path}: field {field!r} must be {what}, got {v!r}")
        try:
            return cls.from_hf_dict(d, **overrides)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{path}: unusable value ({e})") from None

    def save_json(self, path: str | os.PathLike, torch_dtype: str = "float32") -> None:
        """Write config.json; torch_dtype names the dtype of the weights saved beside it."""
        with open(path, "w") as f:
            json.dump(self.to_hf_dict(torch_dtype), f, indent=2)
            f.write("\n")


# --------------------------------------------------------------------------------------------------
# The HF config.json field table

# One row per 1:1 field, read by from_hf_dict and written by to_hf_dict:
# (V4Config field, current HF key, converter applied on read, default when absent, older keys also read).
# A key given as a tuple is a path into nested dicts. Defaults are the V4-Flash values transformers
# assumes. The structured fields (layer schedule, routers, RoPE width, RoPE bases/YaRN) are the
# explicit code in from_hf_dict / to_hf_dict.
_CSA_RATE, _HCA_RATE = ("compress_rates", AttentionKind.CSA.value), ("compress_rates", AttentionKind.HCA.value)
HF_FIELDS: tuple[tuple[str, str | tuple[str, ...], Any, Any, tuple[str, ...]], ...] = (
    ("vocab_size", "vocab_size", int, 129280, ()),
    ("dim", "hidden_size", int, 4096, ()),
    ("n_layers", "num_hidden_layers", int, None, ()),
    ("n_heads", "num_attention_heads", int, 64, ()),
    ("head_dim", "head_dim", int, None, ()),
    ("q_lora_rank", "q_lora_rank", int, 1024, ()),
    ("o_groups", "o_groups", int, 8, ()),
    ("o_lora_rank", "o_lora_rank", int, 1024, ()),
    ("window_size", "sliding_window", int, 128, ()),
    ("csa_ratio", _CSA_RATE, int, 4, ("compress_rate_csa",)),
    ("hca_ratio", _HCA_RATE, int, 128, ("compress_rate_hca",)),
    ("index_n_heads", "index_n_heads", int, 64, ()),
    ("index_head_dim", "index_head_dim", int, 128, ()),
    ("index_topk", "index_topk", int, 512, ()),
    ("n_routed_experts", "n_routed_experts", int, 256, ()),
    ("n_shared_experts", "n_shared_experts", int, 1, ()),
    ("n_activated_experts", "num_experts_per_tok", int, 6, ()),
    ("moe_inter_dim", "moe_intermediate_size", int, 2048, ()),
    ("score_func", "scoring_func", str, "sqrtsoftplus", ()),
    ("route_scale", "routed_scaling_factor", float, 1.5, ()),
    ("swiglu_limit", "swiglu_limit", float, 10.0, ()),
    ("hc_mult", "hc_mult", int, 4, ()),
    ("hc_sinkhorn_iters", "hc_sinkhorn_iters", int, 20, ()),
    ("hc_eps", "hc_eps", float, 1e-6, ()),
    ("norm_eps", "rms_norm_eps", float, 1e-6, ()),
    ("max_seq_len", "max_position_embeddings", int, 1048576, ()),
    ("n_mtp_layers", "num_nextn_predict_layers", int, 1, ()),
    ("bos_token_id", "bos_token_id", None, 0, ()),  # None (no token) is a valid value: no converter
    ("eos_token_id", "eos_token_id", None, 1, ()),
)
_HF_REQUIRED = ("num_hidden_layers", "head_dim")  # no sensible default: they size everything else
# fixed properties of every DeepSeek-V4: written as they are, refused when a file says otherwise
_HF_CONSTANTS = {"norm_topk_prob": True, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False}
_MISSING = object()


def _hf_get(d: dict[str, Any], key: str | tuple[str, ...]) -> Any:
    """d[key], following a tuple key into nested dicts; _MISSING when absent."""
    for k in (key,) if isinstance(key, str) else key:
        if not isinstance(d, dict) or k not in d:
            return _MISSING
        d = d[k]
    return d


def _hf_set(d: dict[str, Any], key: str | tuple[str, ...], value: Any) -> None:
    *parents, last = (key,) if isinstance(key, str) else key
    for k in parents:
        d = d.setdefault(k, {})
    d[last] = value


def hf_weights_dtype(d: dict[str, Any], default: str = "float32") -> str:
    """The stored weights' dtype a config.json names (`torch_dtype`, or transformers' newer `dtype`):
    the default RunOptions dtype and param_dtype of a model loaded from it."""
    name = _dtype_name(d.get("torch_dtype", d.get("dtype", default)))
    if name not in DTYPES:
        raise ConfigError(f"torch_dtype must be one of {DTYPES}, got {name!r}")
    return name


def json_weights_dtype(path: str | os.PathLike, default: str = "float32") -> str:
    """`hf_weights_dtype` of a config.json file (read after `V4Config.from_json_file` accepted it)."""
    try:
        with open(path) as f:
            d = json.load(f)
        return hf_weights_dtype(d if isinstance(d, dict) else {}, default)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


# from_json_file checks the JSON types of the flat keys first (from_hf_dict coerces with int()/float())
_INT_FIELDS = tuple(k for _, key, conv, _, older in HF_FIELDS if conv is int for k in (key,) + older
                    if isinstance(k, str)) + ("num_hash_layers", "qk_rope_head_dim", "num_key_value_heads")
_FLOAT_FIELDS = tuple(key for _, key, conv, _, _ in HF_FIELDS if conv is float) + (
    "rope_theta", "partial_rotary_factor", "compress_rope_theta")
_LIST_FIELDS = ("layer_types", "mlp_layer_types", "compress_ratios")
_HF_FIELD_TYPES = ([(f, int, "an integer") for f in _INT_FIELDS] + [(f, (int, float), "a number") for f in _FLOAT_FIELDS]
                   + [(f, list, "a list") for f in _LIST_FIELDS])


def _as_enum(enum_cls, value, field: str):
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        allowed = [m.value for m in enum_cls]
        raise ConfigError(f"unknown {field} entry {value!r}; expected one of {allowed}") from None


def _dtype_name(name: Any) -> str:
    name = str(name).replace("torch.", "")
    return {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16", "float": "float32"}.get(name, name)


# --------------------------------------------------------------------------------------------------
# Presets (architecture.md §1.1, §1.2, architecture.md §1.3)

def _flash() -> V4Config:
    S, C, H = AttentionKind.SLIDING, AttentionKind.CSA, AttentionKind.HCA
    return V4Config(
        vocab_size=129280, dim=4096, n_layers=43, n_heads=64, head_dim=512, rope_head_dim=64,
        q_lora_rank=1024, o_groups=8, o_lora_rank=1024, window_size=128,
        layer_types=(S, S) + (C, H) * 20 + (C,),  # [0,0] + [4,128]x20 + [4]; MTP (SWA) implied
        router_types=(RouterKind.HASH,) * 3 + (RouterKind.LEARNED,) * 40,
        index_n_heads=64, index_head_dim=128, index_topk=512,
        n_routed_experts=256, n_activated_experts=6, moe_inter_dim=2048, route_scale=1.5,
    )


def _pro() -> V4Config:
    C, H = AttentionKind.CSA, AttentionKind.HCA
    return V4Config(
        vocab_size=129280, dim=7168, n_layers=61, n_heads=128, head_dim=512, rope_head_dim=64,
        q_lora_rank=1536, o_groups=16, o_lora_rank=1024, window_size=128,
        layer_types=(H, H) + (C, H) * 29 + (C,),  # [128,128] + [4,128]x29 + [4]
        router_types=(RouterKind.HASH,) * 3 + (RouterKind.LEARNED,) * 58,
        index_n_heads=64, index_head_dim=128, index_topk=1024,
        n_routed_experts=384, n_activated_experts=6, moe_inter_dim=3072, route_scale=2.5,
    )


def _tiny() -> V4Config:
    """architecture.md §1.3: SWA+hash, CSA, HCA (ratio 16), CSA; MTP; YaRN ramp exercised (lo=0, hi=2)."""
    S, C, H = AttentionKind.SLIDING, AttentionKind.CSA, AttentionKind.HCA
    return V4Config(
        vocab_size=512, dim=128, n_layers=4, n_heads=4, head_dim=64, rope_head_dim=16,
        q_lora_rank=64, o_groups=2, o_lora_rank=32, window_size=8,
        layer_types=(S, C, H, C), router_types=(RouterKind.HASH,) + (RouterKind.LEARNED,) * 3,
        csa_ratio=4, hca_ratio=16,
        index_n_heads=4, index_head_dim=32, index_topk=4,
        n_routed_experts=8, n_activated_experts=2, moe_inter_dim=64, route_scale=1.5,
        rope_factor=4.0, original_seq_len=32, max_seq_len=128,
    )


def _tiny_b() -> V4Config:
    """A second small config with different heads, streams, ratios, window, top-k and experts."""
    S, C, H = AttentionKind.SLIDING, AttentionKind.CSA, AttentionKind.HCA
    return V4Config(
        vocab_size=300, dim=96, n_layers=5, n_heads=6, head_dim=32, rope_head_dim=8,
        q_lora_rank=48, o_groups=3, o_lora_rank=16, window_size=12,
        layer_types=(H, C, S, C, H), router_types=(RouterKind.HASH,) * 2 + (RouterKind.LEARNED,) * 3,
        csa_ratio=2, hca_ratio=8,
        index_n_heads=3, index_head_dim=16, index_topk=5,
        n_routed_experts=6, n_activated_experts=3, moe_inter_dim=40, route_scale=2.5,
        hc_mult=3, rope_factor=8.0, original_seq_len=16, max_seq_len=128,
    )


_PRESETS = {"v4-flash": _flash, "v4-pro": _pro, "tiny": _tiny, "tiny-b": _tiny_b}
# the run-time options each preset is meant for (RunOptions.preset): the releases' bf16 weights;
# query chunks that still split the tiny configs' short test sequences
_PRESET_OPTIONS = {"v4-flash": dict(dtype="bfloat16", param_dtype="bfloat16"),
                   "v4-pro": dict(dtype="bfloat16", param_dtype="bfloat16"),
                   "tiny": dict(attention_chunk=32), "tiny-b": dict(attention_chunk=16),
                   "v41-flash": dict(dtype="bfloat16", param_dtype="bfloat16"), "v41-tiny": {}}  # V4.1 (config_v41)
PRESETS = tuple(_PRESETS)


def layer_schedule(kinds: tuple) -> tuple[tuple[tuple, int], ...]:
    """Split a layer schedule into stages `(unit, repeats)`: `unit` is a run of consecutive block
    kinds repeated `repeats` times. Minimises the total unit length, i.e. the number of distinct
    blocks XLA compiles, so compile time follows the schedule's period rather than its depth
    (v4-flash: 2 SWA layers, then (CSA, HCA) x 20, then CSA -> a handful of compiled blocks)."""
    n = len(kinds)
    best: list[tuple[int, tuple]] = [(0, ())] * (n + 1)  # best[i]: (cost, stages) for kinds[i:]
    for i in range(n - 1, -1, -1):
        options = []
        for p in range(1, n - i + 1):
            unit = kinds[i:i + p]
            r = 1
            while i + (r + 1) * p <= n and kinds[i + r * p:i + (r + 1) * p] == unit:
                r += 1
            for reps in {1, r}:
                cost, rest = best[i + p * reps]
                options.append((cost + p, ((unit, reps),) + rest))
        best[i] = min(options, key=lambda o: (o[0], len(o[1])))
    return best[0][1]


def stage_units(cfg: V4Config) -> tuple[tuple[tuple, int], ...]:
    """The model's stages as ((unit of (attention kind, router kind)), repeats): how `Transformer`
    stacks and scans its blocks, and how the cache stacks its layers."""
    return layer_schedule(tuple(zip(cfg.layer_types, cfg.router_types)))
