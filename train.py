"""Train DeepSeek-V4 (v4jax).

  python train.py                                   # tiny preset on this machine's Python stdlib, CPU, minutes
  python train.py --config configs/train_tiny.toml steps=1000 lr=1e-3 model.dim=256
  python train.py --config my.toml data=corpus/*.jsonl tokenizer=tokenizer.json mesh=fsdp=8 rules=fsdp_ep

Settings: configs/train_tiny.toml lists every one; `key=value` arguments override the file and
`model.key=value` overrides the V4Config preset. The effective config is printed and saved in
run_dir/config.json. A run_dir with checkpoints resumes from the newest one that verifies (resume=false
refuses instead; --fresh starts over, moving the old ones aside); a non-empty run_dir that is not a
train.py run is refused (--overwrite). SIGTERM or Ctrl-C saves a checkpoint and exits. Multi-host:
start the same command on every host (jax.distributed via --coordinator/--num-processes/--process-id,
V4JAX_* variables, or the TPU pod's own environment). See docs/training.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "train_tiny.toml")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one `error: ...` line (exit 2) instead of usage + message."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see python train.py --help)\n")


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help=f"TOML config (default: {os.path.relpath(DEFAULT_CONFIG)})")
    p.add_argument("--metrics-file", default=None, help="JSONL metrics path (default: run_dir/metrics.jsonl)")
    p.add_argument("--resume", dest="resume", action="store_true", default=None,
                   help="continue from run_dir's latest good checkpoint (the default when one exists)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="refuse to start over an existing run")
    p.add_argument("--fresh", action="store_true", default=None,
                   help="start from step 0 although run_dir has checkpoints (they are moved aside, not deleted)")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="train in a non-empty run_dir that is not a train.py run (nothing in it is deleted)")
    p.add_argument("--coordinator", default=None, help="multi-host: host:port of process 0")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("overrides", nargs="*", help="key=value settings (model.key=value for the model config)")
    args = p.parse_args(argv)

    from sharding.distributed import initialize
    try:
        initialize(args.coordinator, args.num_processes, args.process_id)  # before any other JAX call
    except ValueError as e:  # incomplete multi-host settings
        print(f"error: {e}", file=sys.stderr)
        return 2

    from v4jax.train.checkpointer import CheckpointError
    from v4jax.train.config import load_config
    from v4jax.train.loop import Interrupted, TrainingStopped, signal_exit_code, train
    overrides = list(args.overrides)
    if args.metrics_file:
        overrides.append(f"metrics_file={json.dumps(args.metrics_file)}")
    if args.resume is not None:
        overrides.append(f"resume={'true' if args.resume else 'false'}")
    for flag in ("fresh", "overwrite"):
        if getattr(args, flag):
            overrides.append(f"{flag}=true")
    try:
        tc = load_config(args.config or DEFAULT_CONFIG, overrides)
        summary = train(tc, log=lambda s: print(s, flush=True))  # flushed: progress shows when piped too
    except Interrupted as e:
        print(f"\n{e}; exiting", file=sys.stderr, flush=True)
        if e.compiling:  # the compile thread cannot be stopped: leave without waiting for it
            sys.stdout.flush()
            os._exit(signal_exit_code(e.signum))
        return signal_exit_code(e.signum)
    except (TrainingStopped, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except ValueError as e:  # bad settings or data, reported before any compile
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary.get("finished"):  # train() has said so ("run already finished at step N ...")
        return 0
    if summary.get("preempted"):
        return signal_exit_code(summary["signum"])
    last = summary.get("last") or {}
    tps = last.get("tokens_per_s") or 0  # 0 until a second step gives a rate
    loss = (f"final loss {last['loss']:.4f} (ce {last.get('ce', float('nan')):.4f})" if last else "no step kept") + (
        f", {tps:,.0f} tok/s" if tps else "")
    print(f"done: steps {summary['start_step']}..{summary['end_step']}, {loss}, skipped steps {summary['skipped']}; "
          f"metrics {summary['metrics_file']}" + (f", curve {summary['plot']}" if 'plot' in summary else ""))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C while importing, before train() installs its handlers
        print("\ninterrupted before training started; exiting", file=sys.stderr)
        sys.exit(130)
