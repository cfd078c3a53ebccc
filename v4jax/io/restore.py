"""Load any checkpoint v4jax reads into a model: whole on one host, or straight into sharded arrays.

The three checkpoint forms (HF / official release safetensors, a converted Orbax checkpoint, a
train.py run) are told apart by `v4jax.io.sources.detect`, and their tensors come from the one
family of sources there; `open_source` (here, because a train run's source is built on `load_model`)
opens any of them for the converter. A train run is read at its newest complete step (or `step=`),
parameters and buffers only.

With a mesh, no host ever holds the whole model. Safetensors and converted checkpoints store one
tensor per layer and per expert, while the model stacks them ([repeats, experts, ...] in scanned
stages), so each model variable is assembled on its own: every host works out which slices its
devices hold, reads each source tensor those slices need once, copies the slices into per-device
buffers and puts them on their devices. Host memory peaks at about one variable's host-local part
plus one source tensor (plus `read_batch_bytes` of read-ahead for converted checkpoints). A train
run's checkpoint is already stacked, and Orbax restores each shard directly on its device.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import json
import os
from collections import defaultdict
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from v4jax.config import ConfigError, RunOptions, V4Config, json_weights_dtype, split_options
from v4jax.config_v41 import V41Config
from v4jax.io.checkpoint import (CheckpointError, FusedExperts, LoadInfo, Rule, check_names, check_tensor, hf_rules,
                                 to_ours, transformers_name)
from v4jax.io.official_v41 import is_v41_checkpoint, is_v41_config, read_config_dict
from v4jax.io.sources import ConvertedSource, Kind, SafetensorsSource, TensorSource, detect


# --------------------------------------------------------------------------------------------------
# Assembly: per-layer tensors -> the model's (stacked) variables

def _shard_plan(shape, sharding) -> tuple[list[tuple[slice, ...]], dict[Any, int]]:
    """Distinct host-local slices of a variable and, per addressable device, which one it holds."""
    position: dict[tuple, int] = {}  # (start, stop, step) per dim -> index into the distinct slices
    which = {}
    for dev, idx in sharding.addressable_devices_indices_map(tuple(shape)).items():
        key = tuple(s.indices(n) for s, n in zip(idx, shape))
        which[dev] = position.setdefault(key, len(position))
    return [tuple(slice(*k) for k in key) for key in position], which


def _assemble_variable(var, rules: list[Rule], source: TensorSource, sharding, cfg: V4Config, where: str,
                       batch_bytes: int) -> jax.Array:
    shape, dtype = tuple(var.shape), np.dtype(var.dtype)
    lead = len(rules[0].index or ())
    by_slot = {r.index or (): r for r in rules}
    if sharding is None:
        slices, which = [tuple(slice(0, n, 1) for n in shape)], None
    else:
        slices, which = _shard_plan(shape, sharding)
    bufs = [np.empty(tuple(len(range(s.start, s.stop, s.step)) for s in idx), dtype) for idx in slices]
    # the slots (leading stacked indices) each distinct slice needs
    needs: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, idx in enumerate(slices):
        for slot in itertools.product(*(range(s.start, s.stop, s.step) for s in idx[:lead])):
            needs[slot].append(i)
    missing = [s for s in needs if s not in by_slot]
    if missing:
        raise CheckpointError(f"{where}: no tensor fills slot {missing[0]} of variable {'.'.join(map(str, rules[0].ours))}")
    order = sorted(needs)
    for (name, a), slot in zip(source.tensors([by_slot[s].name for s in order], batch_bytes=batch_bytes), order):
        rule = by_slot[slot]
        a = to_ours(rule.layout, a, shape[lead:])
        if np.issubdtype(dtype, np.integer) and a.size and (a.min() < 0 or a.max() >= cfg.n_routed_experts):
            raise CheckpointError(f"{where}: tensor {source.shown(name)!r} holds expert ids outside "
                                  f"[0, {cfg.n_routed_experts})")
        for i in needs[slot]:
            idx = slices[i]
            pos = tuple((k - s.start) // s.step for k, s in zip(slot, idx[:lead]))
            bufs[i][pos] = a[idx[lead:]].astype(dtype)
        del a
    if sharding is None:
        return jnp.asarray(bufs[0])
    arrays = [jax.device_put(bufs[i], dev) for dev, i in which.items()]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def assemble(cfg: V4Config, source: TensorSource, *, mesh=None, rules=None, where: str = "checkpoint",
             read_batch_bytes: int = 1 << 30, options: RunOptions = RunOptions()):
    """Build a Transformer for `cfg` (run with `options`) from per-layer tensors, one variable at a
    time; with a mesh and an AxisRules table every variable is created in the layout the table gives."""
    from sharding.partition import state_shardings
    from v4jax.model.transformer import Transformer

    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), options=options))
    graphdef, state = nnx.split(abstract)
    table = hf_rules(abstract)
    check_names({r.name for r in table}, set(source.specs), where, spell=source.shown)
    flat = dict(nnx.to_flat_state(state))
    by_var: dict[tuple, list[Rule]] = defaultdict(list)
    for r in table:
        by_var[r.ours].append(r)
        check_tensor(r, flat[r.ours], *source.specs[r.name], where, shown=source.shown(r.name))
    unfilled = [p for p in flat if p not in by_var]
    if unfilled:
        raise CheckpointError(f"{where}: no checkpoint tensor maps to variable {'.'.join(map(str, unfilled[0]))}")
    shardings = None
    if mesh is not None:
        if rules is None:
            raise ValueError("assemble: a mesh needs an AxisRules table (sharding.rules.get_rules)")
        shardings = dict(nnx.to_flat_state(state_shardings(state, mesh, rules)))
    for path, var in flat.items():
        sh = None if shardings is None else shardings[path].get_value()
        var.set_value(_assemble_variable(var, by_var[path], source, sh, cfg, where, read_batch_bytes))
    return nnx.merge(graphdef, state)


# --------------------------------------------------------------------------------------------------
# train.py runs: Orbax restore of the stacked variables, each shard on its device

def _train_step_dir(path: str, step: int | None) -> tuple[str, str]:
    """(step directory, run directory holding config.json)."""
    if os.path.isdir(os.path.join(path, "checkpoints")):
        ckdir, run = os.path.join(path, "checkpoints"), path
    elif os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA")) or os.path.isdir(os.path.join(path, "state")):
        ckdir, run = os.path.dirname(os.path.abspath(path)), os.path.dirname(os.path.dirname(os.path.abspath(path)))
        if step is None:
            step = int(os.path.basename(os.path.abspath(path)))
    else:
        raise CheckpointError(f"{path}: not a train.py run directory (no checkpoints/)")
    done = complete_steps(ckdir)
    if not done:
        raise CheckpointError(f"{ckdir}: no complete checkpoint (an interrupted save leaves only a temporary directory)")
    if step is None:
        step = done[-1]
    elif step not in done:
        raise CheckpointError(f"{ckdir}: no complete checkpoint for step {step} (have {done})")
    return os.path.join(ckdir, str(step)), run


def complete_steps(ckdir: str) -> list[int]:
    """The steps under a run's checkpoints/ whose save finished (Orbax writes _CHECKPOINT_METADATA last)."""
    return sorted(int(n) for n in os.listdir(ckdir) if n.isdigit()
                  and os.path.exists(os.path.join(ckdir, n, "_CHECKPOINT_METADATA")))


def train_run_steps(path: str) -> list[int]:
    """Complete steps of a train.py run directory, newest first (for callers that fall back)."""
    return complete_steps(os.path.join(os.fspath(path), "checkpoints"))[::-1]


def train_run_config(run_dir: str):
    """The architecture a train.py run trained (its config.json's `model` table, options left out): a
    V4Config, or a V41Config for a V4.1 run (architecture.md §12.10)."""
    arch = _train_run_model(run_dir)[0]
    return _run_family(arch)(**arch)


def _run_family(arch: dict):
    return V41Config if is_v41_config(arch) else V4Config


def train_run_options(run_dir: str) -> RunOptions:
    """The run-time options a train.py run trained with (dtypes, kernels, remat, ...)."""
    return RunOptions(**_train_run_model(run_dir)[1])


def _train_run_model(run_dir: str) -> tuple[dict, dict]:
    p = os.path.join(run_dir, "config.json")
    try:
        with open(p) as f:
            model = json.load(f)["model"]
        arch, options = split_options(model)  # train.py writes both into one `model` table
        _run_family(arch)(**arch), RunOptions(**options)  # refuse a bad table here, where the file is named
        return arch, options
    except FileNotFoundError:
        raise CheckpointError(f"{run_dir}: no config.json (train.py writes it next to checkpoints/)") from None
    except (KeyError, TypeError, json.JSONDecodeError, ConfigError) as e:
        raise CheckpointError(f"{p}: not a train.py run config ({e})") from None


def restore_train_run(path: str, cfg=None, *, step: int | None = None, mesh=None, rules=None,
                      verify: bool = True, options: RunOptions | None = None):
    """(model, cfg, step) from a train.py checkpoint: parameters and buffers only (no optimiser state
    is read). options: how the model runs (default: the run's own); model.options holds them.
    The stored per-parameter fingerprint is checked (`verify`)."""
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding, PartitionSpec

    from sharding.partition import state_shardings
    from v4jax.model.layers import Buffer
    from v4jax.train.optim import flat_params, unflat_params
    from v4jax.train.checkpointer import _fingerprint
    from v4jax.train.step import build_model

    step_dir, run = _train_step_dir(os.fspath(path), step)
    stored_cfg, stored_options = train_run_config(run), train_run_options(run)
    cfg, options = cfg or stored_cfg, options or stored_options
    # run-time options (RunOptions) may differ from training; every shape-determining field must not
    if type(cfg) is not type(stored_cfg):
        raise CheckpointError(f"{run}: the checkpoint is a {type(stored_cfg).__name__} model, the requested config "
                              f"a {type(cfg).__name__}")
    shape_fields = [f.name for f in dataclasses.fields(cfg) if f.name != "max_seq_len"]
    diff = [f for f in shape_fields if getattr(cfg, f) != getattr(stored_cfg, f)]
    if diff:
        raise CheckpointError(f"{run}: the checkpoint was trained with {diff[0]}={getattr(stored_cfg, diff[0])!r}, "
                              f"the requested config has {getattr(cfg, diff[0])!r}")
    abstract = nnx.eval_shape(lambda: build_model(cfg, 0, options))  # V4's Transformer or V4.1's text backbone
    graphdef, params, buffers, rest = nnx.split(abstract, nnx.Param, Buffer, ...)
    if mesh is None:
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
        replicated = NamedSharding(mesh, PartitionSpec())
        p_sh = jax.tree.map(lambda _: replicated, params)
        b_sh = jax.tree.map(lambda _: replicated, buffers)
    else:
        if rules is None:
            raise ValueError("restore_train_run: a mesh needs an AxisRules table (sharding.rules.get_rules)")
        p_sh, b_sh = state_shardings(params, mesh, rules), state_shardings(buffers, mesh, rules)

    # train.py saves {"params": {dotted path: array}, "buffers": {...}, "opt": ..., ...}
    item = {"params": {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s) for (k, v), s in
                       zip(flat_params(params).items(), flat_params(p_sh).values())},
            "buffers": {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s) for (k, v), s in
                        zip(flat_params(buffers).items(), flat_params(b_sh).values())}}
    try:
        got = ocp.PyTreeCheckpointer().restore(
            os.path.abspath(os.path.join(step_dir, "state")),  # Orbax refuses relative paths
            args=ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                        partial_restore=True))
    except Exception as e:  # truncated / corrupt files: name the step
        raise CheckpointError(f"{step_dir}: unreadable checkpoint ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''})") from None
    if verify:
        meta = os.path.join(step_dir, "meta", "metadata")
        try:
            with open(meta) as f:
                want = json.load(f).get("fingerprint", {})
        except (OSError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{meta}: unreadable step metadata ({e})") from None
        have = {k: float(v) for k, v in jax.device_get(jax.jit(_fingerprint)(got["params"])).items()}
        rtol = 1e-5 if options.param_dtype == stored_options.param_dtype else 1e-2  # a cast changes the sums a little
        bad = [k for k, v in have.items() if k in want and not np.isclose(v, want[k], rtol=rtol, atol=1e-6)]
        if bad:
            raise CheckpointError(f"{step_dir}: parameter {bad[0]} does not match its saved fingerprint (corrupt checkpoint)")
    params, buffers = unflat_params(params, got["params"]), unflat_params(buffers, got["buffers"])
    model = nnx.merge(graphdef, params, buffers, rest)
    return model, cfg, int(os.path.basename(step_dir))


# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Loaded:
    model: Any
    cfg: V4Config
    kind: Kind
    step: int | None = None  # train runs: the step read
    source: TensorSource | None = None  # safetensors and converted checkpoints: what was read

    @property
    def options(self) -> RunOptions:
        """How the loaded model runs (the checkpoint's dtype unless overridden)."""
        return self.model.options


def load_model(path: str | os.PathLike, *, mesh=None, rules=None, dtype: str | None = None,
               param_dtype: str | None = None, mtp: bool | None = None, step: int | None = None,
               read_batch_bytes: int = 1 << 30, options: RunOptions | None = None,
               numerics: str | None = None) -> Loaded:
    """Load any supported checkpoint (see the module docstring) into a model; sharded with mesh+rules.

    options: how the model runs (default: a train run's own, or the dtypes of config.json's
    torch_dtype); dtype / param_dtype / numerics override its compute / storage dtypes and its numerics
    (`exact` or `release`, architecture.md §10.3). mtp: True requires the MTP block,
    False drops it, None keeps it when the checkpoint has it."""
    path = os.fspath(path)
    kind = detect(path)
    overrides = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype), ("numerics", numerics))
                 if v is not None}
    if kind is Kind.TRAIN_RUN:
        _, run = _train_step_dir(path, step)
        cfg = train_run_config(run)
        if mtp and not cfg.n_mtp_layers and isinstance(cfg, V41Config):
            raise CheckpointError(f"{path}: DSpark stages requested but train.py trains the V4.1 text backbone "
                                  "without them (their training objective is not published)")
        if mtp and not cfg.n_mtp_layers:
            raise CheckpointError(f"{path}: MTP requested but the run trained no MTP block")
        keep_mtp = bool(cfg.n_mtp_layers)  # stored with the run; dropped after loading when mtp=False
        options = (options or train_run_options(run)).replace(**overrides)
        model, cfg, got_step = restore_train_run(path, cfg, step=step, mesh=mesh, rules=rules, options=options)
        if keep_mtp and mtp is False:
            model.mtp, cfg = None, cfg.replace(n_mtp_layers=0)
        return Loaded(model, cfg, kind, got_step)
    config = read_config_dict(path)
    if is_v41_config(config):
        return _load_v41(path, config, kind, mesh=mesh, rules=rules, options=options, overrides=overrides, mtp=mtp)
    try:
        cfg = V4Config.from_json_file(os.path.join(path, "config.json"))
        # the stored weights' dtype is the default run dtype: a bf16 checkpoint runs in bf16
        options = options or RunOptions.for_weights(json_weights_dtype(os.path.join(path, "config.json")))
        options = options.replace(**overrides)
    except ConfigError as e:  # names config.json already
        raise CheckpointError(str(e)) from None
    source = ConvertedSource(path) if kind is Kind.CONVERTED else SafetensorsSource(path, np.float32)
    has_mtp = any(n.startswith("mtp.") for n in source.specs)
    if mtp and not has_mtp:
        raise CheckpointError(f"{path}: MTP requested but the checkpoint has no mtp.* tensors")
    if mtp and not cfg.n_mtp_layers:
        raise CheckpointError(f"{path}: MTP requested but config.json sets num_nextn_predict_layers to 0")
    use_mtp = bool(cfg.n_mtp_layers) and has_mtp and mtp is not False
    cfg = cfg.replace(n_mtp_layers=1 if use_mtp else 0)
    if not use_mtp:
        source.specs = {n: s for n, s in source.specs.items() if not n.startswith("mtp.")}
    return Loaded(assemble(cfg, source, mesh=mesh, rules=rules, where=path, read_batch_bytes=read_batch_bytes,
                           options=options), cfg, kind, source=source)


def _load_v41(path: str, config: dict, kind: Kind, *, mesh, rules, options: RunOptions | None, overrides: dict,
              mtp: bool | None) -> Loaded:
    """A DeepSeek-V4.1 checkpoint (architecture.md §12.6): the release or an unquantised directory under
    the official names, or its `python -m v4jax.io.convert` Orbax form. mtp: the DSpark stages, as for
    V4's MTP block (True requires them, False drops them, None keeps them when present)."""
    from v4jax.config_v41 import V41Config
    from v4jax.io.official_v41 import V41Source, assemble_v41, v41_weights_dtype

    config_path = os.path.join(path, "config.json")
    source = ConvertedSource(path) if kind is Kind.CONVERTED else V41Source(path)
    try:
        cfg = V41Config.from_json_file(config_path)
        options = (options or RunOptions.for_weights(v41_weights_dtype(config, source.specs)))
        options = options.replace(**overrides)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    has_dspark = any(n.startswith("mtp.") for n in source.specs)
    if mtp and not (has_dspark and cfg.n_mtp_layers):
        raise CheckpointError(f"{path}: DSpark stages requested but the checkpoint has "
                              f"{'no mtp.* tensors' if not has_dspark else 'n_mtp_layers = 0 in config.json'}")
    if not (has_dspark and mtp is not False):
        cfg = cfg.without_dspark()
        source.specs = {n: s for n, s in source.specs.items() if not n.startswith("mtp.")}
    try:
        model = assemble_v41(cfg, source, mesh=mesh, rules=rules, options=options)
    except ValueError as e:  # a missing / mis-shaped tensor, a bad scale: name the checkpoint too
        raise CheckpointError(f"{path}: {e}") from None
    return Loaded(model, cfg, kind, source=source)


def load_hf(directory: str | os.PathLike, *, dtype: str | None = None, param_dtype: str | None = None,
            mtp: bool | None = None, options: RunOptions | None = None) -> tuple[Any, LoadInfo]:
    """A safetensors directory (HF, release or module-name spelling) through `load_model`, with what an
    exact write-back needs (`LoadInfo`: each tensor's on-disk name and dtype; `save_hf(model, info=)`).
    options / dtype / param_dtype / mtp as for `load_model`."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    if not any(n.endswith(".safetensors") for n in os.listdir(directory)):
        raise CheckpointError(f"{directory}: no *.safetensors files and no model.safetensors.index.json")
    loaded = load_model(directory, dtype=dtype, param_dtype=param_dtype, mtp=mtp, options=options)
    source = loaded.source
    names = {r.name for r in hf_rules(loaded.model)}
    spelling = {n: e.key for n, e in source.entries.items() if n in names}
    if any(isinstance(e.file, FusedExperts) for e in source.entries.values()):
        # module names with fused experts cannot be written back as found: save_pretrained's spelling
        spelling = {n: transformers_name(n) for n in spelling}
    dtypes = {n: dt for n, dt in source.stored_dtypes().items() if n in names}
    return loaded.model, LoadInfo(loaded.cfg, spelling, dtypes, loaded.model.mtp is not None, loaded.options)


# --------------------------------------------------------------------------------------------------
# The converter's view: any checkpoint as a stream of canonical-name tensors

class TrainRunSource(TensorSource):
    """A train.py run (or one step of it) as canonical-name tensors: its newest step that loads and
    matches its fingerprint (a corrupt newer one is skipped, and said), whole in memory, in the model's
    dtypes or `dtype` for the BF16/FP8/FP4 classes."""
    kind = Kind.TRAIN_RUN

    def __init__(self, directory: str, dtype=None):
        from v4jax.io import official
        from v4jax.io.checkpoint import canonical_name, hf_tensors

        _, run = _train_step_dir(directory, None)
        is_run = os.path.isdir(os.path.join(directory, "checkpoints"))
        errors = []
        for step in (train_run_steps(directory) if is_run else []) or [None]:
            try:
                loaded = load_model(directory, step=step)
                break
            except CheckpointError as e:  # a corrupt newest save: fall back to the previous one
                errors.append(str(e))
        else:
            raise CheckpointError(errors[0] if len(errors) == 1 else
                                  f"no checkpoint of {directory} loads; newest: {errors[0]}")
        if errors:  # said, not silent: the export is not the newest step
            print(f"note: {len(errors)} newer step(s) unusable ({errors[0]}); exporting step {loaded.step}",
                  file=sys.stderr)
        self.step = loaded.step
        self.arrays = {}
        if isinstance(loaded.cfg, V41Config):  # V4.1 has no transformers spelling: the official names (§12.6)
            from v4jax.io.official_v41 import fp32_class, official_tensors_v41
            for name, a in official_tensors_v41(loaded.model):
                want = np.float32 if fp32_class(name) else (a.dtype if dtype is None else dtype)
                self.arrays[name] = a.astype(want, copy=False)
        else:
            for key, a in hf_tensors(loaded.model).items():
                name = canonical_name(key)
                want = official.output_dtype(official.release_format(name), a.dtype,
                                             a.dtype if dtype is None else dtype)
                self.arrays[name] = a.astype(want, copy=False)
        del loaded
        self.specs = {n: (a.shape, a.dtype) for n, a in self.arrays.items()}
        self._attach(run)
        self.config_path = None  # the run's own config: consistent with its tensors by construction
        # as an HF config.json (V4.1: the release's HF-style spelling), in the saved weights' dtype
        self.config = train_run_config(run).to_hf_dict(train_run_options(run).param_dtype)

    def read(self, names):
        return {n: self.arrays[n] for n in names}


def open_source(path: str | os.PathLike, dtype=None, batch_bytes: int = 256 << 20) -> TensorSource:
    """Any checkpoint `load_model` reads, as a TensorSource (`detect` decides which). dtype: what the
    BF16/FP8/FP4-class tensors are read as (default: as stored; FP8/FP4 as bfloat16)."""
    path = os.fspath(path)
    kind = detect(path)
    if kind is Kind.CONVERTED:
        return ConvertedSource(path, batch_bytes)
    if kind is Kind.TRAIN_RUN:
        return TrainRunSource(path, dtype)
    if is_v41_checkpoint(path):
        from v4jax.io.official_v41 import V41Source
        return V41Source(path, dtype)
    return SafetensorsSource(path, dtype)
