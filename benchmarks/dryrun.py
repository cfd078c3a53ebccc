"""Ahead-of-time dry run of a v4jax step on a TPU topology, on a machine without TPUs.

    python -m benchmarks.dryrun --config v4-flash --topology v5p:8x8x8 --rules fsdp_ep \
        [--mode train|prefill|decode] [--batch B] [--seq S] [--mesh fsdp=64,expert=8] \
        [--num-slices N --dcn data=N] [--json OUT]
    python -m benchmarks.dryrun --train-config configs/v4-flash_v5p-128.toml --topology v5p:4x4x8

--train-config: the model, run-time options, mesh, rules, batch, sequence length, micro-batches and every
loss and optimiser setting from a train.py TOML file (`v4jax.train.config.load_config`), so the compiled
step is the one `python train.py --config FILE` runs on that pod.

Compiles the step with libtpu for the topology's devices (jax.experimental.topologies) and reports,
per device: argument / output / temporary bytes from the compiled memory analysis against the chip's
HBM; FLOPs and HBM bytes from the compiled cost analysis; bytes moved by collectives (summed from the
compiled HLO); and a roofline estimate of the step time (the slowest of compute, HBM traffic and ICI
traffic) with the MFU it implies for the model FLOPs (6 N_active per token for training, 2 N_active for
inference, plus attention). XLA counts a loop body once; the report scales its count by one scan
correction and also gives the program read loop by loop (`benchmarks.hlo_costs`: each body times its
trip count, matmul FLOPs, top-level bytes) with the roofline that reading implies. When the step does not fit, it says so and names the biggest buffers
(exit status 2). Layers are scanned, so compile time follows the number of distinct blocks.

train: exactly the step train.py runs (`v4jax.train.step.step_program`: `make_step` with every loss term,
the micro-batch accumulation scan, the selection-bias update and the non-finite guard, jitted with the
same state shardings); fp32 master weights and optimizer state (Muon + AdamW split, bf16 Newton-Schulz),
bf16 compute, full remat.
prefill: forward over the prompt, logits of the last position (bf16 weights).
decode: one token against a cache of --seq positions (needs the inference cache, v4jax.inference.generate).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from benchmarks.hlo_costs import Cost, async_overlaps, breakdown, by_function, collective_bytes, format_table
from sharding.chips import chip_for
from sharding.context import use_mesh_rules
from sharding.mesh import compiler_options, describe, make_mesh
from sharding.partition import data_sharding, state_shardings
from sharding.rules import AxisRules, ShardingError, get_rules, parse_overrides
from v4jax.config import OPTION_FIELDS, AttentionKind, Remat, RunOptions, V4Config, split_options
from v4jax.model.transformer import Transformer
from v4jax.train.config import TrainConfig, check_settings, load_config


class DoesNotFit(RuntimeError):
    """The step needs more memory per device than the chip has; `report`: the compiled figures when the
    compile itself succeeded (memory analysis over the HBM), else None."""

    def __init__(self, message: str, report: "Report | None" = None):
        super().__init__(message)
        self.report = report


@dataclasses.dataclass
class Report:
    config: str
    topology: str
    chip: str
    devices: int
    mesh: str
    rules: str
    mode: str
    batch: int
    seq: int
    compile_seconds: float
    argument_bytes: int  # per device
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    peak_bytes: int  # argument + output + temp - alias
    hbm_bytes: float  # per device
    fits: bool
    flops_per_device: float  # compiled cost analysis x scan correction
    flops_per_device_text: float  # compiled cost analysis as XLA reports it (each loop body once)
    scan_correction: float
    hbm_traffic_per_device: float  # compiled cost analysis "bytes accessed"
    collective_bytes_per_device: float | None  # summed over collective ops in the compiled HLO (None: the
    # compiled HLO could not be read back, e.g. a libtpu newer than this jax: the roofline then omits ICI)
    model_flops: float  # analytic, whole step, all devices
    step_time_s: float  # roofline estimate
    bound: str  # compute | memory | collectives
    mfu: float
    tokens: int
    biggest_buffers: list[tuple[str, int]]
    settings: dict = dataclasses.field(default_factory=dict)  # config overrides (--set), remat, moe_impl
    breakdown: list = dataclasses.field(default_factory=list)  # --breakdown: [source, FLOPs, bytes], the sum
    # over all sources first, then the top functions (benchmarks.hlo_costs: loops by their trip counts)
    # the same step read from the HLO with every loop body times its trip count (benchmarks.hlo_costs; matmul
    # FLOPs only, top-level bytes) instead of XLA's count x one scan correction, and the roofline it gives
    # (None when the HLO could not be read back)
    loop_flops_per_device: float | None = None
    loop_traffic_per_device: float | None = None
    loop_step_time_s: float | None = None
    loop_bound: str | None = None
    loop_mfu: float | None = None
    loop_vector_flops_per_device: float | None = None  # elementwise + reductions (matrix-vector products)
    # the ragged all-to-alls in the program text: [all, asynchronous, with a matmul or kernel scheduled between
    # start and done] (benchmarks.hlo_costs.async_overlaps; None when the HLO could not be read back)
    ragged_all_to_alls: list[int] | None = None

    def table(self) -> str:
        g = 2**30
        rows = [
            ("config / mode", f"{self.config} / {self.mode}  (batch {self.batch} x seq {self.seq} = {self.tokens} tokens)"),
            ("topology", f"{self.topology}: {self.devices} devices ({self.chip}), mesh {self.mesh}, rules {self.rules}"),
            ("settings", ", ".join(f"{k}={v}" for k, v in self.settings.items())),
            ("compile time", f"{self.compile_seconds:.0f} s"),
            ("per-device memory", f"args {self.argument_bytes / g:.2f} GiB + out {self.output_bytes / g:.2f} GiB + temp "
                                  f"{self.temp_bytes / g:.2f} GiB - aliased {self.alias_bytes / g:.2f} GiB = "
                                  f"{self.peak_bytes / g:.2f} GiB of {self.hbm_bytes / g:.1f} GiB HBM "
                                  f"({'fits' if self.fits else 'DOES NOT FIT'})"),
            ("compiled FLOPs / device", f"{self.flops_per_device:.3e} (XLA counts each scanned body once: "
                                        f"{self.flops_per_device_text:.3e} x {self.scan_correction:.2f})"),
            ("HBM traffic / device", f"{self.hbm_traffic_per_device / g:.2f} GiB"),
            ("collective bytes / device", "unknown (the compiled HLO could not be read back; the roofline omits ICI)"
             if self.collective_bytes_per_device is None else f"{self.collective_bytes_per_device / g:.2f} GiB"),
            ("model FLOPs (all devices)", f"{self.model_flops:.3e}"),
            ("roofline step time", f"{self.step_time_s * 1e3:.1f} ms ({self.bound}-bound)"),
            ("MFU at that step time", f"{100 * self.mfu:.1f}%"),
            *([("loops by trip count", f"{self.loop_flops_per_device:.3e} matmul + "
                                       f"{self.loop_vector_flops_per_device or 0:.3e} vector FLOPs "
                                       f"({(self.loop_flops_per_device + (self.loop_vector_flops_per_device or 0)) * self.devices / self.model_flops:.2f}x the model's), "
                                       f"{self.loop_traffic_per_device / g:.2f} GiB / device: roofline "
                                       f"{self.loop_step_time_s * 1e3:.1f} ms ({self.loop_bound}-bound), MFU "
                                       f"{100 * self.loop_mfu:.1f}%")] if self.loop_flops_per_device is not None else []),
            *([("ragged all-to-alls", f"{self.ragged_all_to_alls[0]} in the program text, {self.ragged_all_to_alls[1]} "
                                      f"asynchronous, {self.ragged_all_to_alls[2]} of them overlapping a matmul or kernel")]
              if self.ragged_all_to_alls and self.ragged_all_to_alls[0] else []),
            ("biggest buffers / device", ", ".join(f"{n} {b / g:.2f} GiB" for n, b in self.biggest_buffers[:5])),
        ]
        w = max(len(r[0]) for r in rows)
        return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


# ------------------------------------------------------------------------------------------------
def tpu_devices(topology: str, num_slices: int = 1):
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover
        raise SystemExit(f"jax.experimental.topologies unavailable: {e}")
    # libtpu takes a machine-wide lock by default; a compile-only client does not need it
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kw = {"num_slices": num_slices} if num_slices > 1 else {}
    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=topology, **kw).devices
    except Exception as e:  # libtpu missing or an unknown topology name
        raise SystemExit(f"cannot build TPU topology {topology!r}: {str(e).splitlines()[0]} "
                         f"(install libtpu with: pip install 'jax[tpu]')")


def mesh_candidates(rules: str, cfg: V4Config, n: int) -> list[str]:
    """Sensible meshes for a preset on n devices, best first: experts over the largest power of two
    dividing both n and E (capped at 64), tensor 4 for fsdp_tp_ep, context 4 for long_context; fsdp
    takes the largest share of the rest that divides the model width together with the other
    parameter-splitting axes (v4-pro's 7168 = 2^10 x 7 stops at 1024-way), then smaller shares, and
    data (pure replication) the remainder."""
    def pow2_gcd(a, b, cap):
        g = math.gcd(a, b)
        return min(1 << (g.bit_length() - 1) if g & (g - 1) else g, cap)

    def with_fsdp(fixed: dict[str, int], splitting_embed: int) -> list[str]:
        rest = n // math.prod(fixed.values())
        out = []
        for fsdp in sorted((f for f in range(1, rest + 1) if rest % f == 0 and cfg.dim % (f * splitting_embed) == 0),
                           reverse=True):
            axes = {**fixed, "fsdp": fsdp, "data": rest // fsdp}
            out.append(",".join(f"{k}={v}" for k, v in axes.items() if v > 1) or "fsdp=1")
        return out

    if rules == "fsdp":
        return with_fsdp({}, 1)
    ep = pow2_gcd(n, cfg.n_routed_experts, 64)
    if rules == "fsdp_ep":
        return with_fsdp({"expert": ep}, ep)
    if rules == "fsdp_tp_ep":
        tp = 4 if n % 4 == 0 else 1
        ep = pow2_gcd(n // tp, cfg.n_routed_experts, 64)
        return with_fsdp({"tensor": tp, "expert": ep}, ep)
    cp = 4 if n % 4 == 0 else 1
    ep = pow2_gcd(n // cp, cfg.n_routed_experts, 64)
    return with_fsdp({"context": cp, "expert": ep}, ep * cp)


def default_mesh(rules_name: str, cfg: V4Config, devices, rules: AxisRules | None = None) -> str:
    """The first of `mesh_candidates` on which every parameter resolves through the rules table
    (e.g. v4-pro's indexer wq_b [1536, 8192] cannot take fsdp=16 x expert=64: it gets fsdp=8, data=2)."""
    candidates = mesh_candidates(rules_name, cfg, len(devices))
    if rules is None:
        return candidates[0]
    state = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    error = None
    for spec in candidates:
        try:
            state_shardings(state, make_mesh(spec, devices=devices), rules)
            return spec
        except ShardingError as e:
            error = error or e
    raise error


def active_params(cfg: V4Config, abstract_state) -> tuple[int, int]:
    """(total parameters, parameters active per token: routed experts count k of E; the embedding
    table is a lookup and does not count)."""
    total = active = 0
    for path, var in nnx.to_flat_state(abstract_state):
        n = int(np.prod(var.shape))
        total += n
        names = [str(p) for p in path]
        if "embed" in names and "embedding" in names:
            continue
        if "experts" in names and names[-1] in ("w1", "w2", "w3"):
            n = n * cfg.n_activated_experts // cfg.n_routed_experts
        if "tid2eid" in names or "bias" in names:
            continue
        active += n
    return total, active


def attention_flops_per_token(cfg: V4Config, context: int) -> float:
    """Forward FLOPs of the core attention of one token at position ~context (QK and PV products),
    summed over layers: window + (CSA: top-k entries | HCA: all context/m' entries)."""
    per_key = 4 * cfg.n_heads * cfg.head_dim
    total = 0.0
    for kind in cfg.layer_types:
        keys = min(cfg.window_size, context)
        if kind is AttentionKind.CSA:
            keys += min(cfg.index_topk, context // cfg.csa_ratio)
            total += 2 * cfg.index_n_heads * cfg.index_head_dim * (context // cfg.csa_ratio)  # indexer scores
        elif kind is AttentionKind.HCA:
            keys += context // cfg.hca_ratio
        total += per_key * keys
    return total


def scan_correction(cfg: V4Config, abstract_state, seq: int) -> float:
    """XLA's cost analysis counts a while-loop body once; v4jax scans each stage's unit `repeats`
    times. Ratio of the analytic FLOPs of the whole model to those of its program text (each unit
    once, plus everything outside the stages), used to scale the compiled FLOPs and bytes."""
    from v4jax.model.transformer import layer_schedule

    stages = layer_schedule(tuple(zip(cfg.layer_types, cfg.router_types)))
    outside, per_unit = 0.0, {}
    for path, var in nnx.to_flat_state(abstract_state):
        names = [str(p) for p in path]
        n = float(np.prod(var.shape))
        if names[-1] in ("w1", "w2", "w3") and "experts" in names:
            n *= cfg.n_activated_experts / cfg.n_routed_experts
        if "embedding" in names or "tid2eid" in names:
            continue
        if names[0] == "stages":
            s = int(names[1])
            per_unit[s] = per_unit.get(s, 0.0) + 2 * n / stages[s][1]  # one repeat's worth
        else:
            outside += 2 * n
    attn = {k: attention_flops_per_token(cfg.replace(n_layers=1, layer_types=(k,), router_types=cfg.router_types[:1]), seq)
            for k in set(cfg.layer_types)}
    text = outside + sum(per_unit[s] + sum(attn[a] for a, _ in unit) for s, (unit, _) in enumerate(stages))
    full = outside + sum(r * (per_unit[s] + sum(attn[a] for a, _ in unit)) for s, (unit, r) in enumerate(stages))
    return full / text


# ------------------------------------------------------------------------------------------------
def build(cfg: V4Config, mode: str, batch: int, seq: int, mesh, rules: AxisRules, grad_accum: int = 1,
          options: RunOptions = RunOptions(), chunk: int = 8192, train: TrainConfig | None = None):
    """(jitted step, abstract args with shardings, per-device bytes by name, loss terms | None) for the mode.
    train: the train.py settings whose loss and optimiser the step uses (default: train.py's defaults
    with a bf16 Newton-Schulz); its batch, sequence, micro-batches and options are these arguments'."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), options=options))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    p_sh, r_sh = state_shardings(params, mesh, rules), state_shardings(rest, mesh, rules)
    tok_sh = data_sharding(mesh, rules, (batch, seq)) if mode in ("train", "prefill") else None

    def spec_of(tree, shardings):
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)

    names = {}
    for (path, var), (_, sh) in zip(nnx.to_flat_state(params), nnx.to_flat_state(p_sh)):
        names[".".join(map(str, path))] = _per_device_bytes(var.shape, var.dtype, sh.get_value(), mesh)

    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=tok_sh)
    if mode == "train":
        from v4jax.train.step import step_program

        # train.py's step reads its RunOptions from the `model` table: hand it these
        tc = dataclasses.replace(train or TrainConfig(muon_ns_dtype="bfloat16"), batch_size=batch, seq_len=seq,
                                 grad_accum=grad_accum, model=dataclasses.asdict(options))
        program = step_program(tc, cfg, mesh, rules)
        flat_p, flat_sh = program.state["params"], program.shardings["params"]
        for path, leaf in jax.tree_util.tree_flatten_with_path(program.state["opt"])[0]:
            name = next((k.key for k in reversed(path) if getattr(k, "key", None) in flat_p), None)
            if name is not None and tuple(flat_p[name].shape) == tuple(leaf.shape):
                key = f"optimizer state of {name}"
                names[key] = names.get(key, 0) + _per_device_bytes(leaf.shape, leaf.dtype, flat_sh[name], mesh)
        return program.jitted, (program.state, program.batch, program.hyper), names, program.loss_terms()
    if mode == "prefill":
        def step(params, rest, tokens):
            with use_mesh_rules(mesh, rules):
                return nnx.merge(graphdef, params, rest)(tokens, with_mtp=False).logits[:, -1]

        fn = jax.jit(step, in_shardings=(p_sh, r_sh, tok_sh), compiler_options=compiler_options(mesh))
        return fn, (spec_of(params, p_sh), spec_of(rest, r_sh), tokens), names, None
    if mode in ("decode", "prefill_chunk"):  # the Generator's own steps against a cache of `seq` positions
        from v4jax.inference.generate import Sampling, generation_steps
        from v4jax.model.cache import cache_shardings, init_cache

        cache = jax.eval_shape(lambda: init_cache(cfg, batch, seq, options.dtype, mtp=False, numerics=options.numerics))
        c_sh = cache_shardings(cache, mesh, rules)
        names["KV cache (all layers)"] = sum(_per_device_bytes(a.shape, a.dtype, sh, mesh) for a, sh in
                                             zip(jax.tree.leaves(cache), jax.tree.leaves(c_sh)))
        full_gd, full = nnx.split(abstract)
        steps = generation_steps(full_gd, mesh, rules)
        state = spec_of(full, state_shardings(full, mesh, rules))
        replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
        rows = lambda dtype, shape=(batch,): jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)  # noqa: E731
        if mode == "decode":  # Generator._step: one token per sequence, sampled on device
            params = Sampling(rows(jnp.float32, ()), rows(jnp.int32, ()), rows(jnp.float32, ()))
            args = (state, spec_of(cache, c_sh), rows(jnp.int32), rows(jnp.int32), rows(jnp.int32, ()), params)
            return steps.step, args, names, None
        # Generator._prefill: one chunk of `chunk` prompt tokens per sequence, continuing the cache
        args = (state, spec_of(cache, c_sh), rows(jnp.int32, (batch, chunk)), rows(jnp.int32))
        return steps.prefill, args, names, None
    raise SystemExit(f"unknown mode {mode!r}")


STEP_NAMES = {"train": "v4jax.train.step.make_step", "decode": "v4jax.inference.generate.generation_steps step",
              "prefill_chunk": "v4jax.inference.generate.generation_steps prefill",
              "prefill": "v4jax.model.transformer.Transformer"}


def _activation_buffers(cfg: V4Config, options: RunOptions, mode: str, batch: int, seq: int, mesh,
                        rules: AxisRules, chunk: int = 8192) -> list[tuple[str, int]]:
    """The large per-device activation buffers of one step, by formula (for the does-not-fit report)."""
    from sharding.expert_parallel import expert_axes, gather_window, receive_capacity

    split = math.prod(mesh.shape[a] for a in rules.mesh_axes("batch") + rules.mesh_axes("seq") if a in mesh.shape)
    new_tokens = {"decode": 1, "prefill_chunk": min(chunk, seq)}.get(mode, seq)  # per sequence, this step
    n = max(1, batch * new_tokens // split)  # tokens per device
    out = [("logits (fp32) of one step", n * cfg.vocab_size * 4)]
    ep = math.prod(mesh.shape[a] for a in expert_axes(mesh, rules)) if expert_axes(mesh, rules) else 1
    if ep > 1 and n * ep <= options.moe_gather_tokens:  # gather dispatch (architecture.md §5.5)
        dense = n * ep <= options.moe_dense_tokens  # every local expert on every gathered token
        rows = n * ep * (cfg.n_routed_experts // ep) if dense else gather_window(n * ep, cfg.n_activated_experts, ep)
        out.append(("gathered tokens of the expert group per layer", n * ep * cfg.dim * 2))
        out.append((f"routed-expert hidden [{'tokens x local experts' if dense else 'window'}, 2 x moe_inter_dim] "
                    "fp32 per layer", rows * 2 * cfg.moe_inter_dim * 4))
    elif ep > 1:
        rows = receive_capacity(min(n, options.moe_dispatch_chunk) * cfg.n_activated_experts, ep,
                                options.moe_capacity_factor)
        out.append(("expert-parallel receive buffer per layer (one pass)", rows * cfg.dim * 2))
        out.append(("routed-expert hidden [rows, 2 x moe_inter_dim] fp32 per layer", rows * 2 * cfg.moe_inter_dim * 4))
    out.append(("residual streams per layer (kept for backward)" if mode == "train" else "residual streams",
                n * cfg.hc_mult * cfg.dim * 2))
    return out


def _per_device_bytes(shape, dtype, sharding: NamedSharding, mesh) -> int:
    n = int(np.prod(shape)) * jnp.dtype(dtype).itemsize
    for entry in sharding.spec:
        for ax in (entry,) if isinstance(entry, str) else (entry or ()):
            n //= mesh.shape[ax]
    return n


def libtpu_available() -> bool:
    """Whether a libtpu can compile here: the `tpu` extra installed, or TPU_LIBRARY_PATH naming one."""
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None or bool(os.environ.get("TPU_LIBRARY_PATH"))


NO_LIBTPU = "needs libtpu to compile for a TPU topology, and it is not installed (pip install -e '.[tpu]')"


def libtpu_version() -> str:
    """The version of the libtpu that compiles: the installed package, or the one TPU_LIBRARY_PATH names
    when that is another (a wheel unpacked beside its dist-info), marked as such."""
    import glob
    from importlib import metadata

    try:
        installed = metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        installed = "not installed"
    path = os.environ.get("TPU_LIBRARY_PATH")
    if path:
        infos = glob.glob(os.path.join(os.path.dirname(os.path.dirname(path)), "libtpu-*.dist-info"))
        version = os.path.basename(infos[0])[len("libtpu-"):-len(".dist-info")] if infos else "unknown version"
        if version != installed:
            return f"{version} (TPU_LIBRARY_PATH)"
    return installed


def dry_run(config: str | V4Config, topology: str, rules_name: str, *, mode: str = "train", batch: int | None = None,
            seq: int = 4096, mesh_spec: str | None = None, num_slices: int = 1, dcn: str | None = None,
            rule_overrides: dict | None = None, remat: str | None = None, require_fit: bool = True,
            overrides: dict | None = None, grad_accum: int = 1, chunk: int = 8192, breakdown_rows: int = 0,
            hlo_out: str | None = None, options: RunOptions | None = None, train: TrainConfig | None = None) -> Report:
    """Compile one step and read it. options: the run-time options (default: bf16 compute, fp32 master
    weights and full remat for training, bf16 weights and no remat for serving), `overrides` on top;
    train: the train.py settings of the training step (`build`)."""
    chip = chip_for(topology)
    if isinstance(config, V4Config):
        cfg, config_name = config, "custom"
    else:
        cfg, config_name = V4Config.preset(config), config
    serving = mode != "train"
    cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, seq + 1), n_mtp_layers=0 if serving else cfg.n_mtp_layers)
    options = options or RunOptions(dtype="bfloat16", param_dtype="bfloat16" if serving else "float32",
                                    remat=Remat.NONE if serving else Remat.FULL)
    if remat:
        options = options.replace(remat=Remat(remat))
    if overrides:  # e.g. moe_dispatch_chunk=256, moe_impl=pallas: options to RunOptions, the rest to V4Config
        arch, opts = split_options(overrides)
        unknown = sorted(set(arch) - {f.name for f in dataclasses.fields(V4Config)})
        if unknown:
            raise ValueError(f"unknown config field {unknown[0]!r} in --set (run-time options: {list(OPTION_FIELDS)})")
        cfg, options = cfg.replace(**arch), options.replace(**opts)
    devices = tpu_devices(topology, num_slices)
    rules = get_rules(rules_name, **(rule_overrides or {}))
    mesh_spec = mesh_spec or default_mesh(rules_name, cfg, devices[:len(devices) // max(num_slices, 1)], rules)
    mesh = make_mesh(mesh_spec, dcn, devices) if dcn else make_mesh(mesh_spec, devices=devices)
    if batch is None:  # one sequence per device along the token-splitting axes
        batch = math.prod(mesh.shape[a] for a in rules.mesh_axes("batch") if a in mesh.shape)
    fn, args, names, loss_terms = build(cfg, mode, batch, seq, mesh, rules, grad_accum, options, chunk, train)
    t0 = time.time()
    try:
        compiled = fn.lower(*args).compile()
    except jax.errors.JaxRuntimeError as e:  # the TPU compiler itself refuses programs that cannot fit
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        biggest = sorted(names.items(), key=lambda kv: -kv[1])[:5] + _activation_buffers(cfg, options, mode, batch, seq, mesh, rules, chunk)
        biggest.sort(key=lambda kv: -kv[1])
        raise DoesNotFit(f"{config_name} {mode} does not fit on {topology} with mesh {describe(mesh)}: the TPU compiler "
                         f"reports {str(e).split('RESOURCE_EXHAUSTED: ')[-1].strip()} Biggest buffers per device: "
                         + ", ".join(f"{n} {b / 2**30:.2f} GiB" for n, b in biggest[:6])) from None
    compile_s = time.time() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    try:
        hlo = compiled.as_text()
    except jax.errors.JaxRuntimeError:  # a libtpu newer than this jax's XLA (TPU_LIBRARY_PATH) compiles fine but
        hlo = None  # its HLO protos may not parse here; memory and cost analyses still come through
    arg, out, tmp = mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.temp_size_in_bytes
    alias = mem.alias_size_in_bytes
    peak = arg + out + tmp - alias
    hbm = chip.hbm_per_device
    tokens = {"decode": batch, "prefill_chunk": batch * chunk}.get(mode, batch * seq * (grad_accum if mode == "train" else 1))
    abstract_state = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), options=options)))
    # train.py's micro-batch accumulation is a loop too: its body (one micro-batch) counts once (the
    # optimizer update after it then counts grad_accum times: the loop-aware reading below has it once)
    correction = scan_correction(cfg, abstract_state, seq) * (grad_accum if mode == "train" else 1)
    flops_text = float(cost.get("flops", 0.0))
    flops, traffic = flops_text * correction, float(cost.get("bytes accessed", 0.0)) * correction
    coll = None if hlo is None else collective_bytes(hlo)
    _, n_active = active_params(cfg, abstract_state)
    per_token = 2 * n_active + attention_flops_per_token(cfg, seq if mode != "train" else seq // 2)
    model_flops = tokens * per_token * (3 if mode == "train" else 1)
    per_dev_peak = chip.bf16_flops / chip.devices_per_chip
    step, bound = chip.roofline(flops, traffic, coll)
    mfu = model_flops / (len(devices) * per_dev_peak * step) if step > 0 else 0.0
    biggest = sorted([*names.items(), ("temporaries (activations, gradients, collectives)", tmp)],
                     key=lambda kv: -kv[1])[:8]
    report = Report(config_name, topology, chip.name, len(devices), describe(mesh), rules_name, mode, batch, seq,
                    compile_s, arg, out, tmp, alias, peak, hbm, peak <= hbm, flops, flops_text, correction, traffic, coll, model_flops, step,
                    bound, mfu, tokens, biggest,
                    {**option_settings(options), **({"step": "v4jax.train.step.make_step", "loss_terms": loss_terms, "optimizer": "muon",
                                           "grad_accum": grad_accum} if mode == "train" else {}),
                     **({"step": STEP_NAMES[mode] + ("" if mode == "decode" else f", chunk {chunk}")}
                        if mode in ("decode", "prefill_chunk") else {}), **{k: str(v) for k, v in (overrides or {}).items()},
                     **({"rule_overrides": ",".join(f"{k}={'+'.join(v)}" for k, v in rule_overrides.items())}
                        if rule_overrides else {}),
                     "libtpu": libtpu_version(), **compiler_options(mesh),
                     **{k: os.environ[k] for k in ("LIBTPU_INIT_ARGS",) if os.environ.get(k)}})
    if hlo is not None and hlo_out:
        with open(hlo_out, "w") as f:
            f.write(hlo)
    if hlo is not None:  # the loop-aware reading of the same program (benchmarks.hlo_costs)
        rows = by_function(breakdown(hlo))
        lf, lb = sum(c.flops for c in rows), sum(c.bytes for c in rows)
        report.loop_step_time_s, report.loop_bound = chip.roofline(lf, lb, coll)
        report.loop_flops_per_device, report.loop_traffic_per_device = lf, lb
        report.loop_vector_flops_per_device = lv = sum(c.vector_flops for c in rows)
        report.loop_mfu = model_flops / (len(devices) * per_dev_peak * report.loop_step_time_s) if lf else 0.0
        overlaps = async_overlaps(hlo)
        report.ragged_all_to_alls = [len(overlaps), sum(o.compute is not None for o in overlaps),
                                     sum(bool(o.compute) for o in overlaps)]
    if breakdown_rows and hlo is not None:
        top = list(dict.fromkeys(rows[:breakdown_rows] + sorted(rows, key=lambda c: -c.vector_flops)[:breakdown_rows]
                                 + sorted(rows, key=lambda c: -c.bytes)[:breakdown_rows]))
        report.breakdown = [["(all sources)", lf, lb, lv]] + [
            [c.source, c.flops, c.bytes, c.vector_flops] for c in top]
    if require_fit and not report.fits:
        raise DoesNotFit(f"{config_name} {mode} does not fit on {topology} with mesh {describe(mesh)}: "
                         f"{peak / 2**30:.1f} GiB per device needed, {hbm / 2**30:.1f} GiB available; biggest "
                         "buffers per device: " + ", ".join(f"{n} {b / 2**30:.2f} GiB" for n, b in biggest[:5]),
                         report)
    return report


def option_settings(options: RunOptions) -> dict:
    """The run-time options a report records."""
    return {"remat": options.remat.value, "moe_impl": options.moe_impl.value,
            "attention_impl": options.attention_impl.value, "moe_dispatch_chunk": options.moe_dispatch_chunk,
            "moe_capacity_factor": options.moe_capacity_factor}


def _parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --set expects FIELD=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value  # a bare string such as pallas
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dryrun", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="preset name or a config.json path (default: v4-flash)")
    p.add_argument("--train-config", default=None, metavar="TOML",
                   help="train mode: a train.py config file; the model, options, mesh, rules, batch, seq_len, "
                        "grad_accum and loss settings come from it (--set still applies on top)")
    p.add_argument("--topology", required=True, help="e.g. v5p:8x8x8, v6e:16x16, tpu7x:4x4x4")
    p.add_argument("--rules", default=None,
                   help="rules preset: fsdp, fsdp_ep (default), fsdp_tp_ep, serve_tp, long_context")
    p.add_argument("--rule", default=None, help="overrides, e.g. experts=expert+fsdp,vocab=")
    p.add_argument("--mode", default=None, choices=["train", "prefill", "decode", "prefill_chunk"],
                   help="prefill: the stateless forward over --seq tokens; decode / prefill_chunk: the Generator's "
                        "own decode step / prefill of --chunk tokens against a cache of --seq positions")
    p.add_argument("--chunk", type=int, default=8192, help="prefill_chunk: prompt tokens per sequence per call")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: one sequence per device)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 4096)")
    p.add_argument("--mesh", default=None, help="axis sizes, e.g. expert=8,fsdp=-1 (default per rules preset)")
    p.add_argument("--num-slices", type=int, default=1)
    p.add_argument("--dcn", default=None, help="axis sizes across slices, e.g. data=2")
    p.add_argument("--remat", default=None, choices=[r.value for r in Remat])
    p.add_argument("--grad-accum", type=int, default=None, help="train mode: micro-batches per step (train.py's grad_accum)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="config or run-time option override, repeatable: --set moe_dispatch_chunk=256 --set moe_impl=pallas")
    p.add_argument("--breakdown", type=int, default=0, metavar="N",
                   help="also list the N source functions with the most FLOPs and HBM bytes (benchmarks.hlo_costs)")
    p.add_argument("--hlo-out", default=None, metavar="FILE",
                   help="also write the compiled HLO text here (to read again with benchmarks.hlo_costs)")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    return p


# the flags a train.py config file sets instead (--train-config), with the file's key for each
FROM_TRAIN_CONFIG = {"config": "preset", "rules": "rules", "rule": "rule_overrides", "mesh": "mesh", "dcn": "dcn",
                     "batch": "batch_size", "seq": "seq_len", "grad_accum": "grad_accum", "remat": "model.remat"}


def arguments(a: argparse.Namespace) -> tuple[Any, dict]:
    """(config, dry_run keyword arguments) from the command line, or from a train.py config file:
    `--train-config FILE` compiles the step `python train.py --config FILE` runs (its model table, mesh,
    rules, batch and loss settings); the flags it replaces are refused beside it."""
    sets = _parse_sets(a.set)
    if a.train_config is None:
        config = a.config or "v4-flash"
        return (V4Config.from_json_file(config) if os.path.isfile(config) else config,
                dict(rules_name=a.rules or "fsdp_ep", mode=a.mode or "train", batch=a.batch, seq=a.seq or 4096,
                     mesh_spec=a.mesh, dcn=a.dcn, rule_overrides=parse_overrides(a.rule or ""), remat=a.remat,
                     overrides=sets, grad_accum=a.grad_accum or 1))
    for flag, key in FROM_TRAIN_CONFIG.items():
        if getattr(a, flag) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} is set by --train-config {a.train_config} ({key}): "
                             f"change it there")
    if a.mode not in (None, "train"):
        raise ValueError(f"--train-config {a.train_config} describes a training run; --mode {a.mode} has no use for it")
    tc = load_config(a.train_config)
    try:
        check_settings(tc, tc.model_config())
    except ValueError as e:
        raise ValueError(f"{a.train_config}: {e}") from None
    arch, options = split_options(tc.model)  # the preset's V4Config with the file's model table, as train.py builds it
    return tc.preset, dict(rules_name=tc.rules, mode="train", batch=tc.batch_size, seq=tc.seq_len,
                           mesh_spec=tc.mesh or "fsdp=-1", dcn=tc.dcn or None,
                           rule_overrides=parse_overrides(tc.rule_overrides), overrides={**arch, **sets},
                           grad_accum=tc.grad_accum, options=tc.run_options(), train=tc)


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        config, kw = arguments(a)
        report = dry_run(config, a.topology, num_slices=a.num_slices, chunk=a.chunk, breakdown_rows=a.breakdown,
                         hlo_out=a.hlo_out, **kw)
    except (ShardingError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except DoesNotFit as e:
        print(f"does not fit: {e}", file=sys.stderr)
        if e.report is not None and e.report.breakdown:
            total, *rows = (Cost(*row) for row in e.report.breakdown)
            print(format_table(rows, a.breakdown, total[1:]), file=sys.stderr)
        if a.json:  # a refusal is a result too (it bounds the smallest pod)
            mode = kw["mode"]
            with open(a.json, "w") as f:
                json.dump({"config": config if isinstance(config, str) else a.config, "topology": a.topology,
                           "rules": kw["rules_name"], "mode": mode, "seq": kw["seq"], "batch": kw["batch"],
                           "mesh": kw["mesh_spec"], "fits": False, "reason": str(e),
                           **({"report": dataclasses.asdict(e.report)} if e.report is not None else {}),
                           "settings": {"step": STEP_NAMES.get(mode, "v4jax.train.step.make_step"),
                                        **({"grad_accum": kw["grad_accum"]} if mode == "train" else {}),
                                        **({"chunk": a.chunk} if mode == "prefill_chunk" else {}),
                                        **({"rule_overrides": a.rule} if a.rule else {}),
                                        **({"train_config": a.train_config, **option_settings(kw["options"])}
                                           if a.train_config else {}),
                                        **kw["overrides"]}}, f, indent=2)
        return 2
    if a.train_config:
        report.settings["train_config"] = a.train_config
    print(report.table())
    if report.breakdown:
        total, *rows = (Cost(*row) for row in report.breakdown)
        print(format_table(rows, a.breakdown, total[1:]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dataclasses.asdict(report), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
