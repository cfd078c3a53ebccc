"""HF-format checkpoints: `config.json` + safetensors with the `deepseek_v4` tensor names.

On disk, DeepSeek-V4 checkpoints use the official tensor names (`layers.3.attn.wq_a.weight`,
`layers.3.hc_attn_fn`, per-expert `ffn.experts.7.w1.weight`, ...): the Hub release as is, and
transformers' `save_pretrained` with a `model.` prefix (and `model.embed_tokens.weight`,
`model.hc_head.hc_fn`, `head.weight`); transformers renames them to its module names when loading.
Every spelling loads (the name table below). One table (`hf_rules`) maps each canonical name to the
model variable it fills and the layout change (torch [out, in] vs our [in, out] kernels; the grouped
`wo_a`; expert e of a stacked [E, ...] weight). Reading goes through `v4jax.io.restore.load_model`
(`load_hf` there adds the on-disk names and dtypes), which checks every tensor's presence, shape and
dtype kind and names the first bad one; writing (`save_hf`) is the exact inverse (a round trip
reproduces every tensor, name and dtype).

MTP: transformers does not instantiate the MTP block, so checkpoints it saves have no `mtp.*`
tensors and load with `n_mtp_layers = 0`; the Hub release's `mtp.0.*` tensors load when present.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from v4jax.config import RunOptions, V4Config
from v4jax.io.tensorfile import TensorFileError, open_directory, write_sharded


class CheckpointError(ValueError):
    """A missing, unexpected, mis-shaped or mis-typed tensor, or an unusable checkpoint directory."""


class Layout(enum.Enum):
    SAME = "same"
    TRANSPOSE = "transpose"  # torch Linear [out, in] <-> our kernel [in, out]
    GROUPED_OUT = "grouped_out"  # wo_a [g*d_g, in] <-> ours [g, in, d_g]


Path = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
    name: str  # canonical (official-style) tensor name, e.g. "layers.1.attn.wq_a.weight"
    ours: Path  # variable path in the model state
    layout: Layout
    index: tuple[int, ...] | None = None  # leading indices into a stacked variable: (layer repeat,)
    # for a scanned block's tensors, (repeat, expert) or (expert,) for per-expert tensors


def _block_rules(prefix: str, ours: Path, block, n_experts: int, lead: tuple[int, ...] = ()) -> list[Rule]:
    """Rules for one Block at canonical prefix `prefix` (e.g. "layers.3") and model path `ours`;
    `lead` indexes the block's slot in stacked (scanned) variables."""
    T, S = Layout.TRANSPOSE, Layout.SAME
    table = [
        ("hc_attn_fn", ("attn_hc", "fn"), S), ("hc_attn_base", ("attn_hc", "base"), S),
        ("hc_attn_scale", ("attn_hc", "scale"), S),
        ("hc_ffn_fn", ("ffn_hc", "fn"), S), ("hc_ffn_base", ("ffn_hc", "base"), S),
        ("hc_ffn_scale", ("ffn_hc", "scale"), S),
        ("attn_norm.weight", ("attn_norm", "weight"), S),
        ("ffn_norm.weight", ("ffn_norm", "weight"), S),
        ("attn.wq_a.weight", ("attn", "wq_a", "kernel"), T),
        ("attn.q_norm.weight", ("attn", "q_norm", "weight"), S),
        ("attn.wq_b.weight", ("attn", "wq_b", "kernel"), T),
        ("attn.wkv.weight", ("attn", "wkv", "kernel"), T),
        ("attn.kv_norm.weight", ("attn", "kv_norm", "weight"), S),
        ("attn.wo_a.weight", ("attn", "wo_a"), Layout.GROUPED_OUT),
        ("attn.wo_b.weight", ("attn", "wo_b", "kernel"), T),
        ("attn.attn_sink", ("attn", "sinks"), S),
        ("ffn.gate.weight", ("ffn", "gate", "weight", "kernel"), T),
        ("ffn.shared_experts.w1.weight", ("ffn", "shared_experts", "w1", "kernel"), T),
        ("ffn.shared_experts.w2.weight", ("ffn", "shared_experts", "w2", "kernel"), T),
        ("ffn.shared_experts.w3.weight", ("ffn", "shared_experts", "w3", "kernel"), T),
    ]
    if hasattr(block.ffn.gate, "tid2eid"):
        table.append(("ffn.gate.tid2eid", ("ffn", "gate", "tid2eid"), S))
    else:
        table.append(("ffn.gate.bias", ("ffn", "gate", "bias"), S))
    attn = block.attn
    for name_c, ours_c, present in (("attn.compressor", ("attn", "compressor"), attn.compressor is not None),
                                    ("attn.indexer.compressor", ("attn", "indexer", "compressor"), attn.indexer is not None)):
        if present:
            table += [(f"{name_c}.wkv.weight", ours_c + ("wkv", "kernel"), T),
                      (f"{name_c}.wgate.weight", ours_c + ("wgate", "kernel"), T),
                      (f"{name_c}.ape", ours_c + ("ape",), S),
                      (f"{name_c}.norm.weight", ours_c + ("norm", "weight"), S)]
    if attn.indexer is not None:
        table += [("attn.indexer.wq_b.weight", ("attn", "indexer", "wq_b", "kernel"), T),
                  ("attn.indexer.weights_proj.weight", ("attn", "indexer", "weights_proj", "kernel"), T)]
    rules = [Rule(f"{prefix}.{n}", ours + o, lay, lead or None) for n, o, lay in table]
    for e in range(n_experts):  # per-expert tensors [I, d] / [d, I] fill slot e of the stacked weights
        for w in ("w1", "w2", "w3"):
            rules.append(Rule(f"{prefix}.ffn.experts.{e}.{w}.weight", ours + ("ffn", "experts", w), T, lead + (e,)))
    return rules


def hf_rules(model) -> list[Rule]:
    """Every tensor of `model` (a Transformer, concrete or abstract) by canonical name."""
    S, T = Layout.SAME, Layout.TRANSPOSE
    E = model.cfg.n_routed_experts
    rules = [Rule("embed.weight", ("embed", "embedding"), S),
             Rule("norm.weight", ("norm", "weight"), S),
             Rule("hc_head_fn", ("hc_head", "fn"), S),
             Rule("hc_head_base", ("hc_head", "base"), S),
             Rule("hc_head_scale", ("hc_head", "scale"), S),
             Rule("head.weight", ("head", "kernel"), T)]
    for i, (s, p, r) in enumerate(model.layer_slots()):  # layer i lives in slot r of stage s, position p
        rules += _block_rules(f"layers.{i}", ("stages", s, "blocks", p), model.stages[s].blocks[p], E, (r,))
    if model.mtp is not None:
        rules += [Rule("mtp.0.e_proj.weight", ("mtp", "e_proj", "kernel"), T),
                  Rule("mtp.0.h_proj.weight", ("mtp", "h_proj", "kernel"), T),
                  Rule("mtp.0.enorm.weight", ("mtp", "enorm", "weight"), S),
                  Rule("mtp.0.hnorm.weight", ("mtp", "hnorm", "weight"), S),
                  Rule("mtp.0.norm.weight", ("mtp", "norm", "weight"), S),
                  Rule("mtp.0.hc_head_fn", ("mtp", "hc_head", "fn"), S),
                  Rule("mtp.0.hc_head_base", ("mtp", "hc_head", "base"), S),
                  Rule("mtp.0.hc_head_scale", ("mtp", "hc_head", "scale"), S)]
        rules += _block_rules("mtp.0", ("mtp", "block"), model.mtp.block, E)
    return rules


# Spellings (architecture.md §9). Canonical names are the release's: DeepSeek's published files and
# its inference/convert.py output (`layers.N.attn.kv_norm.weight`, `ffn.experts.E.w1.weight`, ...).
# Three more spellings are read, all through the table below:
#   save_pretrained  transformers' files: the canonical names under `model.` (MTP: none), a few module
#                    names at the top, and the attention KV norm as `attn.norm.weight` (transformers'
#                    loader renames `.norm.` to `.kv_norm.`; its writer inverts that).
#   module names     `model.state_dict()` saved as is (what `from_pretrained` also loads): transformers'
#                    module names, and the routed experts fused per layer ([E, 2I, d] gate_up_proj =
#                    [w1_e; w3_e], [E, d, I] down_proj = w2_e), seen per expert under canonical names.
#   convert.py input the Hub layout with `model.`, `self_attn`/`mlp` and `weight_scale_inv` scales.
# `--format official` writes the canonical spelling, `--format hf` / save_hf the save_pretrained one.

_BLOCK_MODULE_NAMES = [  # (canonical, transformers module name) within one block `layers.N.`
    ("hc_attn_fn", "attn_hc.fn"), ("hc_attn_base", "attn_hc.base"), ("hc_attn_scale", "attn_hc.scale"),
    ("hc_ffn_fn", "ffn_hc.fn"), ("hc_ffn_base", "ffn_hc.base"), ("hc_ffn_scale", "ffn_hc.scale"),
    ("attn_norm.weight", "input_layernorm.weight"), ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("attn.wq_a.weight", "self_attn.q_a_proj.weight"), ("attn.q_norm.weight", "self_attn.q_a_norm.weight"),
    ("attn.wq_b.weight", "self_attn.q_b_proj.weight"), ("attn.wkv.weight", "self_attn.kv_proj.weight"),
    ("attn.kv_norm.weight", "self_attn.kv_norm.weight"), ("attn.wo_a.weight", "self_attn.o_a_proj.weight"),
    ("attn.wo_b.weight", "self_attn.o_b_proj.weight"), ("attn.attn_sink", "self_attn.sinks"),
    ("ffn.gate.weight", "mlp.gate.weight"), ("ffn.gate.bias", "mlp.gate.e_score_correction_bias"),
    ("ffn.gate.tid2eid", "mlp.gate.tid2eid"),
    ("ffn.shared_experts.w1.weight", "mlp.shared_experts.gate_proj.weight"),
    ("ffn.shared_experts.w2.weight", "mlp.shared_experts.down_proj.weight"),
    ("ffn.shared_experts.w3.weight", "mlp.shared_experts.up_proj.weight"),
    ("attn.indexer.wq_b.weight", "self_attn.compressor.indexer.q_b_proj.weight"),
    ("attn.indexer.weights_proj.weight", "self_attn.compressor.indexer.scorer.weights_proj.weight"),
] + [(c + a, m + b) for c, m in (("attn.compressor.", "self_attn.compressor."),
                                  ("attn.indexer.compressor.", "self_attn.compressor.indexer."))
     for a, b in (("wkv.weight", "kv_proj.weight"), ("wgate.weight", "gate_proj.weight"), ("ape", "position_bias"),
                  ("norm.weight", "kv_norm.weight"))]
_TOP_MODULE_NAMES = [("embed.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight"),
                     ("head.weight", "lm_head.weight"), ("hc_head_fn", "model.hc_head.hc_fn"),
                     ("hc_head_base", "model.hc_head.hc_base"), ("hc_head_scale", "model.hc_head.hc_scale")]
# save_pretrained: `model.` + canonical, except these
_SAVE_PRETRAINED_TOP = {"embed.weight": "model.embed_tokens.weight", "head.weight": "head.weight",
                        "hc_head_fn": "model.hc_head.hc_fn", "hc_head_base": "model.hc_head.hc_base",
                        "hc_head_scale": "model.hc_head.hc_scale"}
_SAVE_PRETRAINED_BLOCK = {"attn.kv_norm.weight": "attn.norm.weight"}
# fused routed experts (module names): key suffix -> [(canonical per-expert weight, row block of 2 / of 1)]
FUSED_EXPERTS = {"mlp.experts.gate_up_proj": (("w1", 0, 2), ("w3", 1, 2)), "mlp.experts.down_proj": (("w2", 0, 1),)}

_CANONICAL = ({v: k for k, v in _SAVE_PRETRAINED_TOP.items()} | {m: c for c, m in _TOP_MODULE_NAMES}
              | {"model.embed.weight": "embed.weight"})
_BLOCK_CANONICAL = ({m: c for c, m in _BLOCK_MODULE_NAMES} | {v: k for k, v in _SAVE_PRETRAINED_BLOCK.items()}
                    | {"self_attn.kv_norm.weight": "attn.kv_norm.weight"})
_BLOCK = re.compile(r"^((?:layers|mtp)\.\d+)\.(.+)$")


def canonical_name(key: str) -> str:
    """The canonical (release) name of a tensor as found on disk, in any spelling above."""
    if key in _CANONICAL:
        return _CANONICAL[key]
    name = key[len("model."):] if key.startswith("model.") else key
    m = _BLOCK.match(name)
    if m and m.group(2) in _BLOCK_CANONICAL:
        return f"{m.group(1)}.{_BLOCK_CANONICAL[m.group(2)]}"
    return name


def transformers_name(name: str) -> str:
    """The spelling transformers' save_pretrained uses for a canonical name."""
    if name in _SAVE_PRETRAINED_TOP:
        return _SAVE_PRETRAINED_TOP[name]
    m = _BLOCK.match(name)
    if m and m.group(2) in _SAVE_PRETRAINED_BLOCK:
        name = f"{m.group(1)}.{_SAVE_PRETRAINED_BLOCK[m.group(2)]}"
    return name if name.startswith("mtp.") else f"model.{name}"


class FusedExperts:
    """One fused expert tensor of a module-name checkpoint (`layers.N.mlp.experts.gate_up_proj`
    [E, 2I, d] or `.down_proj` [E, d, I]) seen as its per-expert tensors under canonical names, with
    the TensorFile interface the readers use. Each part is a contiguous byte range of the file."""

    def __init__(self, tf, key: str, layer: str, parts):
        self.path, self.tf, self.key = tf.path, tf, key
        E, R = tf.shape(key)[:2]
        rows = {w: (R // n * i, R // n * (i + 1)) for w, i, n in parts}
        self.parts = {f"{layer}.ffn.experts.{e}.{w}.weight": (e, *rows[w]) for e in range(E) for w, _, _ in parts}

    def keys(self) -> list[str]:
        return list(self.parts)

    def shape(self, name: str) -> tuple[int, ...]:
        _, r0, r1 = self.parts[name]
        return (r1 - r0, *self.tf.shape(self.key)[2:])

    def dtype(self, name: str) -> np.dtype:
        return self.tf.dtype(self.key)

    def __contains__(self, name: str) -> bool:
        return name in self.parts

    def __getitem__(self, name: str) -> np.ndarray:
        e, r0, r1 = self.parts[name]
        return self.tf[self.key][e, r0:r1]

    def read_copy(self, name: str) -> np.ndarray:
        """The part read into fresh memory with a plain file read (see official.read_stored)."""
        e, r0, r1 = self.parts[name]
        shape, dt = self.tf.shape(self.key), self.tf.dtype(self.key)
        row = int(np.prod(shape[2:], dtype=np.int64))
        first = (e * shape[1] + r0) * row
        a = np.fromfile(self.path, dtype=dt, count=(r1 - r0) * row, offset=self.tf.offset(self.key) + first * dt.itemsize)
        if a.size != (r1 - r0) * row:
            raise TensorFileError(f"{self.path}: tensor {self.key!r} is truncated")
        return a.reshape(self.shape(name))


def open_checkpoint_files(directory: str | os.PathLike) -> dict[str, Any]:
    """Every tensor of a safetensors directory by on-disk key (`open_directory`), with fused expert
    tensors replaced by their per-expert parts (`FusedExperts`, keyed by canonical name)."""
    found = open_directory(directory)
    for key in list(found):
        m = _BLOCK.match(key.removeprefix("model."))
        if not m or m.group(2) not in FUSED_EXPERTS:
            continue
        tf = found.pop(key)
        if len(tf.shape(key)) != 3:
            raise TensorFileError(f"{tf.path}: fused expert tensor {key!r} has shape {tf.shape(key)}, expected "
                                  "[experts, rows, columns]")
        view = FusedExperts(tf, key, m.group(1), FUSED_EXPERTS[m.group(2)])
        for name in view.keys():
            if name in found:
                raise TensorFileError(f"{directory}: tensor {name!r} is stored twice (also in the fused {key!r})")
            found[name] = view
    return found


# --------------------------------------------------------------------------------------------------
# Layout conversions (numpy; they also work on zero-stride placeholder arrays to derive shapes)

def to_ours(layout: Layout, a: np.ndarray, model_shape: tuple[int, ...]) -> np.ndarray:
    if layout is Layout.SAME:
        return a
    if layout is Layout.TRANSPOSE:
        return a.T
    g, fan_in, d_g = model_shape  # GROUPED_OUT: row block g' of wo_a is group g'
    return a.reshape(g, d_g, fan_in).transpose(0, 2, 1)


def to_hf(layout: Layout, a: np.ndarray) -> np.ndarray:
    if layout is Layout.SAME:
        return a
    if layout is Layout.TRANSPOSE:
        return a.T
    g, fan_in, d_g = a.shape
    return a.transpose(0, 2, 1).reshape(g * d_g, fan_in)


def _placeholder(shape, dtype) -> np.ndarray:
    return np.broadcast_to(np.zeros((), dtype), shape)


def check_names(expected, have, where: str, error: type[Exception] = CheckpointError, spell=str) -> None:
    """Refuse a checkpoint whose tensor names are not exactly those the model expects: the first
    unexpected name (likely a config.json that does not match), then the first missing one."""
    extra, missing = sorted(set(have) - set(expected)), sorted(set(expected) - set(have))
    if extra:
        raise error(f"{where}: unexpected tensor {spell(extra[0])!r}"
                    + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                    + "; does config.json match the checkpoint?")
    if missing:
        raise error(f"{where}: missing tensor {spell(missing[0])!r}"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def check_tensor(rule: Rule, var, shape, dtype, where: str, shown: str | None = None) -> None:
    """Refuse a stored tensor whose shape is not what `rule` maps onto `var`, or that is integer where
    the variable is floating point (or the reverse)."""
    shown = shown or rule.name
    want = to_hf(rule.layout, _placeholder(tuple(var.shape[len(rule.index or ()):]), np.float32)).shape
    if tuple(shape) != tuple(want):
        raise CheckpointError(f"{where}: tensor {shown!r} has shape {tuple(shape)}, expected {tuple(want)}")
    is_int = bool(jnp.issubdtype(var.dtype, jnp.integer))
    if is_int != bool(np.issubdtype(dtype, np.integer)):
        raise CheckpointError(f"{where}: tensor {shown!r} has dtype {dtype}, expected "
                              f"{'an integer' if is_int else 'a floating-point'} dtype")


# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class LoadInfo:
    config: V4Config
    spelling: dict[str, str]  # canonical name -> key as found on disk (module names: save_pretrained's)
    dtypes: dict[str, np.dtype]  # canonical name -> dtype found on disk
    mtp_loaded: bool
    options: RunOptions = RunOptions()  # the loaded model's run-time options (model.options)


def hf_tensors(model, info: LoadInfo | None = None) -> dict[str, np.ndarray]:
    """The model's tensors by on-disk name: the spelling and dtypes of `info` when given (exact
    write-back of a loaded checkpoint), else transformers' spelling, the variables' dtypes, and
    int64 for the hash table (transformers' buffer dtype)."""
    variables = dict(nnx.to_flat_state(nnx.state(model)))
    arrays: dict[Path, np.ndarray] = {}
    out = {}
    for rule in hf_rules(model):
        if rule.ours not in arrays:
            arrays[rule.ours] = np.asarray(variables[rule.ours].get_value())
        a = arrays[rule.ours] if rule.index is None else arrays[rule.ours][rule.index]
        a = to_hf(rule.layout, a)
        if info is not None and rule.name in info.dtypes:
            want, key = info.dtypes[rule.name], info.spelling[rule.name]
        else:
            want = np.int64 if np.issubdtype(a.dtype, np.integer) else a.dtype
            key = transformers_name(rule.name)
        out[key] = np.ascontiguousarray(a.astype(want))
    return out


def weights_dtype(tensors: dict[str, np.ndarray]) -> str:
    """config.json's torch_dtype for these tensors: the floating dtype holding the most bytes (a bf16
    checkpoint keeps its RMSNorm and mHC weights in fp32; those do not name it)."""
    size: dict[str, int] = {}
    for a in tensors.values():
        if np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16":
            size[a.dtype.name] = size.get(a.dtype.name, 0) + a.nbytes
    return max(size, key=size.get) if size else "float32"


def save_hf(model, directory: str | os.PathLike, *, info: LoadInfo | None = None,
            max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> list[str]:
    """Write config.json and the safetensors shards (+ index when sharded). Refuses a non-empty
    directory unless overwrite=True, so an existing checkpoint is never clobbered by accident; the
    files are written into `DIR.partial` and renamed onto DIR only when all are written, so an
    interrupted save leaves DIR as it was (`v4jax.io.safe_io`). overwrite=True replaces DIR as a whole."""
    from v4jax.io.safe_io import staged

    with staged(directory, overwrite=overwrite, error=CheckpointError, flag="overwrite=True") as tmp:
        tensors = hf_tensors(model, info)
        files = write_sharded(tmp, tensors, max_shard_bytes)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(model.cfg.to_hf_dict(weights_dtype(tensors)), f, indent=2)
    return files + ["config.json"]
