"""Ahead-of-time dry run of DeepSeek-V4.1 (v41-flash) on a TPU topology, on a machine without TPUs
(architecture.md §12.9).

    python -m benchmarks.dryrun_v41 --mode decode|train --topology v5p:4x4x4 --rules fsdp_ep \
        [--config v41-flash] [--batch B] [--seq S] [--mesh fsdp=8,expert=8] [--remat full] [--json OUT]

decode: one token per sequence against a V4.1 cache of --seq positions, through the model's own forward
(`V41Transformer(tokens, engram_ids, cache=cache)`, bf16 weights; the cache's rows split over the batch
axes). train: the step train.py runs (`v4jax.train.step.step_program`: cross-entropy + balance loss + the
indexers' KL (--indexer-loss-weight), its gradient, Muon for the matrices and AdamW for the rest with a
bf16 Newton-Schulz, fp32 master weights and optimiser state, bf16 compute, the selection-bias update);
DSpark stages and the vision tower are left out of both (the text backbone is what a pod trains and
serves, architecture.md §12.10). The blocks are stacked and scanned by kind
(`v41.layer_plan`: 10 compiled blocks for v41-flash's 40), and the training step recomputes each block
in its backward (--remat full, the default), keeping only the blocks' input streams.

Reports per device the compiled memory (arguments, outputs, temporaries) against the chip's HBM, the
compiled FLOPs and HBM bytes, the bytes moved by collectives, and the roofline step time, as
`benchmarks.dryrun` does for V4.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from benchmarks.dryrun import _parse_sets, libtpu_version, tpu_devices
from benchmarks.hlo_costs import async_overlaps, breakdown, by_function, collective_bytes
from benchmarks.v41 import param_counts
from sharding.chips import chip_for
from sharding.context import use_mesh_rules
from sharding.mesh import compiler_options, describe, make_mesh
from sharding.partition import state_shardings
from sharding.rules import get_rules, parse_overrides
from v4jax.config import OPTION_FIELDS, RunOptions
from v4jax.config_v41 import V41Config
from v4jax.model.v41 import V41Transformer, init_v41_cache, v41_cache_shardings
from v4jax.train.config import TrainConfig
from v4jax.train.step import step_program


# v41-flash layers that keep one of each kind, for a depth-reduced compile (--layers): two ratio-0 layers
# (Engram at 1), a ratio-2 KV + index source and a follower, the second Engram layer (a ratio-2 source) and
# a follower, the ratio-1 KV + index + candidate source and a follower, a ratio-1 index-only source and a follower
REPRESENTATIVE_LAYERS = (0, 1, 2, 3, 14, 15, 20, 21, 24, 25)


def keep_layers(cfg: V41Config, keep: tuple[int, ...]) -> V41Config:
    """`cfg` with only the backbone layers `keep` (renumbered in order), each with its own ratio, source
    roles and Engram table: every shape stays full-size, the depth shrinks (DSpark must be off)."""
    if cfg.n_mtp_layers:
        raise ValueError("keep_layers: drop the DSpark stages first (without_dspark)")
    new = {old: i for i, old in enumerate(keep)}
    engram = [(new[i], n) for i, n in zip(cfg.engram_layer_ids, cfg.engram_num_embeddings) if i in new]
    candidate = cfg.candidate_source_layer
    return cfg.replace(n_layers=len(keep), compress_ratios=tuple(cfg.ratio(i) for i in keep),
                       kv_source_layers=tuple(new[i] for i in cfg.kv_source_layers if i in new),
                       index_source_layers=tuple(new[i] for i in cfg.index_source_layers if i in new),
                       candidate_source_layer=None if candidate is None else  # from the first kept layer on
                       next((new[i] for i in keep if i >= candidate), None),
                       engram_layer_ids=tuple(i for i, _ in engram), engram_num_embeddings=tuple(n for _, n in engram))


STEPS = {"train": "v4jax.train.step.step_program (train.py's step: CE + balance + indexer KL, Muon/AdamW, "
                  "bias update)",
         "decode": "V41Transformer(tokens, engram_ids, cache=cache), greedy"}


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def build(cfg: V41Config, mode: str, batch: int, seq: int, mesh, rules, remat: str = "full",
          sets: dict | None = None, indexer_loss_weight: float = TrainConfig.indexer_loss_weight):
    """(jitted step, abstract sharded arguments, the abstract model) for the mode; remat: what the
    training step's backward recomputes per block (`Remat`); sets: RunOptions fields (kernels, MoE
    dispatch), as `benchmarks.dryrun --set` and train.py's model table give them."""
    serving = mode == "decode"
    options = RunOptions(dtype="bfloat16", param_dtype="bfloat16" if serving else "float32",
                         remat="none" if serving else remat)
    unknown = sorted(set(sets or {}) - set(OPTION_FIELDS))
    if unknown:
        raise ValueError(f"--set {unknown[0]}: not a run-time option (V4.1 takes {sorted(OPTION_FIELDS)})")
    options = options.replace(**(sets or {}))
    model = nnx.eval_shape(lambda: V41Transformer(cfg, rngs=nnx.Rngs(0), options=options))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    p_sh, r_sh = state_shardings(params, mesh, rules), state_shardings(rest, mesh, rules)
    n_engram, cols = len(cfg.engram_layer_ids), cfg.engram_n_heads * (cfg.engram_max_ngram_size - 1)
    if serving:
        cache = jax.eval_shape(lambda: init_v41_cache(cfg, batch, seq, jnp.bfloat16))
        c_sh = v41_cache_shardings(cache, mesh, rules)
        tok_sh = NamedSharding(mesh, rules.spec(("batch", None), (batch, 1), mesh))
        eng_sh = NamedSharding(mesh, PartitionSpec(*tok_sh.spec, None, None))

        def step(params, rest, cache, tokens, engram_ids):
            with use_mesh_rules(mesh, rules):
                out = nnx.merge(graphdef, params, rest)(tokens, engram_ids, cache=cache)
            return jnp.argmax(out.logits[:, -1], axis=-1), out.cache

        fn = jax.jit(step, in_shardings=(p_sh, r_sh, c_sh, tok_sh, eng_sh), out_shardings=(None, c_sh),
                     donate_argnums=2, compiler_options=compiler_options(mesh))
        args = (_abstract(params, p_sh), _abstract(rest, r_sh), _abstract(cache, c_sh),
                jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=tok_sh),
                jax.ShapeDtypeStruct((batch, 1, n_engram, cols), jnp.int32, sharding=eng_sh))
        return fn, args, model
    # train.py's step (one program): its RunOptions come from the `model` table (every field given here, so
    # the preset names no default that matters), the rest from TrainConfig
    tc = TrainConfig(preset="v41-flash", batch_size=batch, seq_len=seq, document_mask=False,
                     indexer_loss_weight=indexer_loss_weight, muon_ns_dtype="bfloat16",
                     model={k: getattr(options, k) for k in OPTION_FIELDS})
    program = step_program(tc, cfg, mesh, rules)
    return program.jitted, (program.state, program.batch, program.hyper), model


def dry_run(mode: str, topology: str, rules_name: str, *, config: str = "v41-flash", batch: int = 64,
            seq: int = 8192, mesh_spec: str = "fsdp=8,expert=8", rule_overrides: str = "",
            layers: tuple[int, ...] | None = None, remat: str = "full", sets: dict | None = None,
            indexer_loss_weight: float = TrainConfig.indexer_loss_weight,
            hlo_out: str | None = None, breakdown_rows: int = 0) -> dict:
    """Compile one step; `layers`: keep only these backbone layers (`keep_layers`), full width."""
    chip = chip_for(topology)
    cfg = V41Config.preset(config).without_dspark()
    cfg = cfg.replace(vision_n_layers=0, max_seq_len=max(cfg.max_seq_len, seq + 1))
    if layers:
        cfg = keep_layers(cfg, layers)
    devices = tpu_devices(topology)
    rules = get_rules(rules_name, **parse_overrides(rule_overrides))
    mesh = make_mesh(mesh_spec, devices=devices)
    fn, args, model = build(cfg, mode, batch, seq, mesh, rules, remat, sets, indexer_loss_weight)
    t0 = time.time()
    head = {"config": config, "mode": mode, "topology": topology, "chip": chip.name, "devices": len(devices),
            "mesh": describe(mesh), "rules": rules_name + (f" ({rule_overrides})" if rule_overrides else ""),
            "batch": batch, "seq": seq, "layers": list(layers) if layers else "all",
            **({"remat": remat} if mode == "train" else {}), **{k: str(v) for k, v in (sets or {}).items()},
            "settings": {"step": STEPS[mode], **{k: str(v) for k, v in (sets or {}).items()},
                         **({"indexer_loss_weight": indexer_loss_weight} if mode == "train" else {})}}
    try:
        compiled = fn.lower(*args).compile()
    except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses a program that cannot fit
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return {**head, "compile_s": round(time.time() - t0, 1), "fits": False,
                "refusal": str(e).split("RESOURCE_EXHAUSTED: ")[-1].strip().splitlines()[0]}
    compile_s = time.time() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    try:
        hlo = compiled.as_text()
    except jax.errors.JaxRuntimeError:
        hlo = None
    coll = None if hlo is None else collective_bytes(hlo)
    if hlo is not None and hlo_out:
        with open(hlo_out, "w") as f:
            f.write(hlo)
    loops = breakdown(hlo) if hlo is not None else []  # every loop body times its trip count (hlo_costs)
    overlaps = async_overlaps(hlo) if hlo is not None else []
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    flops, traffic = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    counts = param_counts(cfg, model)  # the model `build` made, not a second abstract build
    tokens = batch if mode == "decode" else batch * seq
    model_flops = tokens * 2 * counts["active"] * (3 if mode == "train" else 1)  # matmuls; attention left out
    per_dev = chip.devices_per_chip
    step, bound = chip.roofline(flops, traffic, coll)
    loop_flops, loop_bytes = sum(c.flops for c in loops), sum(c.bytes for c in loops)
    loop_step, loop_bound = chip.roofline(loop_flops, loop_bytes, coll)
    return {**head, "compile_s": round(compile_s, 1),
            "argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
            "temp_bytes": mem.temp_size_in_bytes, "alias_bytes": mem.alias_size_in_bytes, "peak_bytes": peak,
            "hbm_bytes": chip.hbm_per_device, "fits": peak <= chip.hbm_per_device,
            "compiled_flops_per_device": flops, "hbm_bytes_accessed_per_device": traffic,
            "collective_bytes_per_device": coll, "model_flops": model_flops,
            "compiled_over_model_flops": flops * len(devices) / model_flops if model_flops else None,
            "step_s": step, "bound": bound, "tokens_per_s_per_chip": tokens / step / (len(devices) / per_dev),
            # the same program read loop by loop (benchmarks.hlo_costs: matmul FLOPs and top-level bytes, each
            # loop body times its trip count; XLA's figures above count a loop body once)
            **({"loop_flops_per_device": loop_flops, "loop_traffic_per_device": loop_bytes,
                "loop_vector_flops_per_device": sum(c.vector_flops for c in loops),
                "loop_over_model_flops": loop_flops * len(devices) / model_flops if model_flops else None,
                "loop_step_s": loop_step, "loop_bound": loop_bound,
                "loop_tokens_per_s_per_chip": tokens / loop_step / (len(devices) / per_dev),
                "loop_mfu": model_flops / (len(devices) / per_dev * chip.bf16_flops * loop_step),  # matmul FLOPs
                # ragged all-to-alls: [in all, asynchronous, overlapping a matmul or kernel]
                "ragged_all_to_alls": [len(overlaps), sum(o.compute is not None for o in overlaps),
                                       sum(bool(o.compute) for o in overlaps)],
                **({"breakdown": [[c.source, c.flops, c.bytes] for c in by_function(loops)[:breakdown_rows]]}
                   if breakdown_rows else {})}
               if loops else {}),
            "libtpu": libtpu_version()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dryrun_v41", description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["decode", "train"], default="decode")
    p.add_argument("--config", default="v41-flash")
    p.add_argument("--topology", default="v5p:4x4x4")
    p.add_argument("--rules", default="fsdp_ep")
    p.add_argument("--mesh", default="fsdp=8,expert=8")
    p.add_argument("--rule", default="", help="rule overrides, e.g. 'embed=,mlp=' (sharding.rules.parse_overrides)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--layers", default=None,
                   help="keep only these backbone layers, full width (comma-separated, or 'representative': "
                        f"{','.join(map(str, REPRESENTATIVE_LAYERS))}); a depth-reduced compile for hosts that "
                        "cannot hold the 40-layer program")
    p.add_argument("--remat", default="full", choices=["none", "full", "dots"],
                   help="training: what the backward recomputes in each block (RunOptions.remat)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="run-time option, repeatable: --set moe_impl=pallas --set attention_impl=pallas")
    p.add_argument("--hlo-out", default=None, metavar="FILE", help="also write the compiled HLO text here")
    p.add_argument("--breakdown", type=int, default=0, metavar="N",
                   help="also list the N source functions with the most FLOPs (benchmarks.hlo_costs, loop by loop)")
    p.add_argument("--indexer-loss-weight", type=float, default=TrainConfig.indexer_loss_weight,
                   help="training: the indexers' KL weight (train.py's indexer_loss_weight; 0 = no KL in the step)")
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)
    try:
        report = dry_run(args.mode, args.topology, args.rules, config=args.config, batch=args.batch, seq=args.seq,
                         mesh_spec=args.mesh, rule_overrides=args.rule, remat=args.remat,
                         indexer_loss_weight=args.indexer_loss_weight,
                         sets=_parse_sets(args.set), hlo_out=args.hlo_out, breakdown_rows=args.breakdown,
                         layers=None if args.layers is None else REPRESENTATIVE_LAYERS if args.layers == "representative"
                         else tuple(int(x) for x in args.layers.split(",")))
    except ValueError as e:  # ConfigError, ShardingError
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0 if report["fits"] else 2


if __name__ == "__main__":
    sys.exit(main())
