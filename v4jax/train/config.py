"""Training settings: `TrainConfig` (one TOML file plus key=value overrides), their checks before
anything compiles, and the run's config.json (`config_dict`: the train table and the model table)."""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from typing import Any


from v4jax.config import OPTION_FIELDS, RunOptions, V4Config, split_options
from v4jax.config_v41 import PRESETS as V41_PRESETS
from v4jax.config_v41 import V41Config
from v4jax.train.optim import OptimConfig, Schedule

BATCH_AXES = ("batch", None, "seq")  # [batch, grad_accum, seq_len + 1] (data_sharding wants batch first)


# --------------------------------------------------------------------------------------------------
# Configuration

@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every training setting. A TOML file sets them (top-level keys or any table except [model],
    whose keys override V4Config or RunOptions); `key=value` / `model.key=value` arguments override the file."""

    preset: str = "tiny"  # V4Config preset, or a V4.1 one (v41-tiny, v41-flash: its text backbone, see model_config)
    model: dict = dataclasses.field(default_factory=dict)  # V4Config (V41Config) and RunOptions overrides
    mesh: str = ""  # ici mesh, "fsdp=4,expert=2"; "" = every device on fsdp
    dcn: str = ""  # mesh across slices
    num_devices: int = 0  # use only the first n devices (single process; 0 = all)
    rules: str = "fsdp"  # sharding.rules preset
    rule_overrides: str = ""  # "experts=expert+fsdp,vocab="
    data: str = "stdlib"  # "stdlib" | comma-separated files / directories / globs (.txt .md .py .jsonl .array_record)
    tokenizer: str = "byte"  # "byte" | path to tokenizer.json
    cache_dir: str = ""  # packed-token cache (memory-mapped on later runs)
    grain_threads: int = 0  # > 0: batches read ahead by grain with this many threads (data.GrainBatches)
    seq_len: int = 64
    document_mask: bool = True  # sample-level masking (architecture.md §8.5): each packed document (closed by
    # the model's eos_token_id) attends, compresses and is predicted as if alone; false = one long stream
    batch_size: int = 8  # global rows per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    data_seed: int = 0
    steps: int = 200
    lr: float = 3e-3  # peak learning rate (spec: 2.7e-4 at scale)
    final_lr: float = 3e-4
    warmup_steps: int = 20
    decay_steps: int = 60  # cosine decay over the last decay_steps (MTP weight drops then, architecture.md §6)
    # optimiser settings (architecture.md §8); the defaults are OptimConfig's, one source for both
    adam_b1: float = OptimConfig.adam_b1
    adam_b2: float = OptimConfig.adam_b2
    adam_eps: float = OptimConfig.adam_eps
    weight_decay: float = OptimConfig.weight_decay
    muon_momentum: float = OptimConfig.muon_momentum
    muon_update_rms: float = OptimConfig.muon_update_rms
    muon_ns_dtype: str = OptimConfig.muon_ns_dtype
    clip_norm: float = OptimConfig.clip_norm
    mtp_weight: float = 0.3
    mtp_weight_decay_phase: float = 0.1
    balance_alpha: float = 1e-4  # sequence-wise balance loss weight (architecture.md §5.4)
    balance_hash_layers: bool = False  # whether hash-routed layers join the balance loss (architecture.md §11.5)
    bias_update_speed: float = 1e-3  # aux-loss-free bias speed gamma (architecture.md §5.4)
    indexer_loss_weight: float = 1.0  # lightning-indexer KL (architecture.md §8.2); 0 = indexers untrained, no traces
    # (model.csa_dense=true: dense CSA attention, the KL over all visible entries = the warm-up stage)
    seed: int = 0  # parameter init and RNG
    run_dir: str = "runs/tiny"
    overwrite: bool = False  # train in a non-empty run_dir that is not a train.py run (nothing is deleted)
    fresh: bool = False  # start from step 0 although run_dir has checkpoints (they are moved aside, not deleted)
    ckpt_every: int = 50
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    resume: bool = True  # continue from run_dir's latest good checkpoint when there is one
    max_bad_steps: int = 5  # consecutive non-finite steps before stopping
    log_every: int = 10
    metrics_file: str = ""  # JSONL path ("" = run_dir/metrics.jsonl)
    tensorboard: bool = True
    plot: bool = True  # PNG loss curve at the end
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU (0 = from the device kind when known)
    nan_steps: tuple = ()  # testing hook: these steps (1-based, as logged) get a NaN loss and gradient
    # (a runtime input, so it never changes the compiled program)
    nan_update_steps: tuple = ()  # testing hook: at these steps one parameter's update is NaN while the
    # loss and gradient stay finite (the post-update state check must catch it)
    compile_cache: str = "~/.cache/v4jax/jax"  # persistent XLA compilation cache directory ("" = off)
    progress: bool = True

    def model_config(self) -> V4Config | V41Config:
        """The architecture: the preset with the `model` table's V4Config (V41Config) keys. A V4.1 preset
        trains its text backbone (architecture.md §12.10): no DSpark stages (their training objective is
        not published) and no vision tower (text data); model.n_mtp_layers / vision_n_layers > 0 is refused."""
        arch, _ = split_options(self.model)  # one table on the command line, two objects in the code
        self.run_options()  # a bad option value is refused here too, before anything is built
        family = V41Config if self.preset in V41_PRESETS else V4Config
        known = [f.name for f in dataclasses.fields(family)]
        unknown = sorted(set(arch) - set(known))
        if unknown:
            raise ValueError(f"unknown model setting(s) {['model.' + k for k in unknown]}; known: "
                             f"{sorted(known + list(OPTION_FIELDS))}")
        if family is V41Config:
            for k in ("n_mtp_layers", "vision_n_layers"):
                if arch.get(k, 0):
                    raise ValueError(f"model.{k}={arch[k]}: train.py trains the V4.1 text backbone (DSpark's "
                                     f"objective is not published; no image data), set it to 0")
        try:
            cfg = family.preset(self.preset, **arch)
        except (TypeError, AttributeError) as e:  # a wrong type caught by the config's own checks
            raise ValueError(f"model settings {self.model}: {e}") from None
        return cfg.without_dspark().replace(vision_n_layers=0) if family is V41Config else cfg

    def run_options(self) -> RunOptions:
        """How the model runs: the preset's options with the `model` table's RunOptions keys."""
        _, options = split_options(self.model)
        try:
            options = RunOptions.preset(self.preset, **{"param_dtype": "float32", **options})
        except (TypeError, AttributeError) as e:
            raise ValueError(f"model settings {self.model}: {e}") from None
        if options.param_dtype != "float32":
            raise ValueError(f"model.param_dtype must be float32 for training (fp32 master weights, architecture.md §8.6), "
                             f"got {options.param_dtype!r}")
        return options

    def schedule(self) -> Schedule:
        return Schedule(self.lr, self.final_lr, self.warmup_steps, self.steps, self.decay_steps,
                        self.mtp_weight, self.mtp_weight_decay_phase)

    def optim(self) -> OptimConfig:
        names = [f.name for f in dataclasses.fields(OptimConfig)]
        return OptimConfig(**{n: getattr(self, n) for n in names})


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string


def load_config(path: str | None = None, overrides: list[str] = ()) -> TrainConfig:
    """TOML file (optional) + `key=value` overrides -> TrainConfig; unknown keys raise ValueError."""
    values: dict[str, Any] = {}
    model: dict[str, Any] = {}
    if path:
        if not os.path.isfile(path):
            raise ValueError(f"config file {path!r} does not exist")
        with open(path, "rb") as f:
            try:
                doc = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"config file {path!r} is not valid TOML: {e}") from None
        for k, v in doc.items():
            if k == "model":
                if not isinstance(v, dict):
                    raise ValueError(f"config file {path!r}: model must be a table of V4Config settings, got {v!r}")
                model.update(v)
            elif isinstance(v, dict):
                values.update(v)  # [data], [optim], [run] tables are for readability only
            else:
                values[k] = v
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        k, v = item.split("=", 1)
        k = k.strip()
        if k.startswith("model."):
            model[k[len("model."):]] = _parse_value(v)
        else:
            values[k] = _parse_value(v)
    unknown = sorted(set(values) - set(_FIELDS) - {"model"})
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; known: {sorted(_FIELDS)}")
    for k, v in values.items():
        want = _FIELDS[k].type
        if want == "float" and isinstance(v, int) and not isinstance(v, bool):
            values[k] = float(v)
        elif want == "tuple":
            if not isinstance(v, list):
                raise ValueError(f"setting {k} must be a list, got {v!r}")
            values[k] = tuple(v)
        elif want in ("int", "float", "bool", "str") and type(v).__name__ != want:
            raise ValueError(f"setting {k} must be {want}, got {v!r}")
    if "model" in values:
        if not isinstance(values["model"], dict):
            raise ValueError(f"setting model must be a table of V4Config settings, got {values['model']!r}")
        model.update(values.pop("model"))
    return TrainConfig(**values, model=model)


# Range checks of TrainConfig, run by `train` before anything is read or compiled. (load_config checks types.)
_POSITIVE = ("steps", "batch_size", "grad_accum", "ckpt_every", "keep_checkpoints", "max_bad_steps", "log_every")
_NON_NEGATIVE = ("warmup_steps", "decay_steps", "num_devices", "grain_threads", "data_seed", "seed", "lr", "final_lr",
                 "weight_decay", "clip_norm", "adam_eps", "mtp_weight", "mtp_weight_decay_phase", "balance_alpha",
                 "bias_update_speed", "indexer_loss_weight", "peak_flops")
_UNIT_INTERVAL = ("adam_b1", "adam_b2", "muon_momentum")  # [0, 1)


def check_settings(tc: TrainConfig, cfg: V4Config) -> None:
    """Raise ValueError naming the first out-of-range setting."""
    for k, f in _FIELDS.items():
        v = getattr(tc, k)
        if f.type == "float" and not math.isfinite(v):
            raise ValueError(f"setting {k} must be a finite number, got {v}")
    for k in _POSITIVE:
        if getattr(tc, k) < 1:
            raise ValueError(f"setting {k} must be >= 1, got {getattr(tc, k)}")
    for k in _NON_NEGATIVE:
        if getattr(tc, k) < 0:
            raise ValueError(f"setting {k} must be >= 0, got {getattr(tc, k)}")
    for k in _UNIT_INTERVAL:
        if not 0 <= getattr(tc, k) < 1:
            raise ValueError(f"setting {k} must be in [0, 1), got {getattr(tc, k)}")
    if tc.seq_len < 2 or tc.seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len {tc.seq_len} must be in [2, max_seq_len={cfg.max_seq_len}] of the model config")
    if isinstance(cfg, V41Config):  # what the V4.1 step does not have yet (architecture.md §12.10)
        if tc.document_mask:
            raise ValueError("document_mask=true: the V4.1 model has no packed-document masking yet; set "
                             "document_mask=false (each row is then one stream of documents)")
    for k in ("nan_steps", "nan_update_steps"):
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in getattr(tc, k)):
            raise ValueError(f"setting {k} must be a list of step numbers, got {list(getattr(tc, k))}")


def config_dict(tc: TrainConfig, cfg: V4Config) -> dict:
    """The effective configuration (printed and saved as run_dir/config.json)."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v.value if hasattr(v, "value") else v
    return {"train": {k: plain(v) for k, v in dataclasses.asdict(tc).items()},
            "model": {k: plain(v) for k, v in {**dataclasses.asdict(cfg), **dataclasses.asdict(tc.run_options())}.items()}}
