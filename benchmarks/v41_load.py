"""Peak host memory of loading a DeepSeek-V4.1 checkpoint whose Engram tables dominate it, with the
tables read a block of rows at a time (what `load_model` does) against read whole (the earlier path,
still what a mapping without row reads gets).

The checkpoint is the `v41-tiny` text backbone with one Engram table of `--rows` rows (32 columns),
written by `write_release_v41` (the release layout: FP8 rows with a scale per 32 columns). Each load
runs in its own process (`load_model(DIR, dtype="float32")`) and reports the most memory its numpy
arrays held at once (tracemalloc: what the load reads, decodes and stages for the devices; the part
the change is about) and its peak RSS (VmHWM) over the process's peak after imports. On this CPU host
the devices' arrays live in host memory too, and JAX's CPU transfer of a staged array holds two more
copies of it for a moment (measured: a 0.95 GiB `jnp.asarray` peaks at 2.9 GiB), which the RSS column
includes for both paths; on an accelerator they are device memory.

Usage: JAX_PLATFORMS=cpu python -m benchmarks.v41_load [--rows 4000000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap

import numpy as np


def write_checkpoint(directory: str, rows: int) -> tuple[int, int]:
    """The checkpoint; (stored bytes of the Engram tables, float32 bytes of the loaded tables)."""
    from flax import nnx

    from v4jax.config import RunOptions
    from v4jax.config_v41 import V41Config
    from v4jax.io.official_v41 import official_tensors_v41, write_release_v41
    from v4jax.model.v41 import V41Transformer, engram_table_rows

    cfg = V41Config.preset("v41-tiny").without_dspark().replace(vision_n_layers=0, engram_layer_ids=(0,),
                                                                 engram_num_embeddings=(rows,))
    model = V41Transformer(cfg, rngs=nnx.Rngs(0), options=RunOptions.for_weights("float32"))
    write_release_v41(directory, official_tensors_v41(model), config=cfg.to_hf_dict("float32"))
    del model
    cols = cfg.engram_head_dim
    return rows * (cols + cols // 32), engram_table_rows(rows) * cols * 4


LOAD = textwrap.dedent("""
    import sys, tracemalloc
    from v4jax.io import official_v41
    from v4jax.io.convert import peak_rss_bytes
    from v4jax.io.restore import load_model
    if sys.argv[2] == "whole":  # the table built whole, as before row reads
        official_v41.SourceTensors.rows = lambda self, name: None
    base = peak_rss_bytes()
    tracemalloc.start()
    load_model(sys.argv[1], dtype="float32")
    print(tracemalloc.get_traced_memory()[1], peak_rss_bytes() - base)
""")



def run(rows: int, log=print) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        stored, loaded = write_checkpoint(tmp, rows)
        peaks = {}
        for how in ("blocks", "whole"):
            out = subprocess.run([sys.executable, "-c", LOAD, tmp, how], capture_output=True, text=True,
                                 env={**os.environ, "JAX_PLATFORMS": "cpu"})
            if out.returncode:
                raise RuntimeError(f"load ({how}) failed: {out.stderr.strip().splitlines()[-1]}")
            peaks[how], peaks[how + "_rss"] = map(int, out.stdout.split()[-2:])
            log(f"{how}: host arrays at most {peaks[how] / 2**30:.2f} GiB, peak RSS growth {peaks[how + '_rss'] / 2**30:.2f} GiB")
    return {"rows": rows, "stored": stored, "loaded": loaded, **peaks}  # blocks, whole (+ _rss): bytes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.v41_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=8_000_000, help="rows of the Engram table")
    a = p.parse_args(argv)
    r = run(a.rows, log=lambda m: print(m, file=sys.stderr))
    gib = 2.0**30
    print("| Engram table | stored | loaded (float32) | host arrays at most: blocks of rows | read whole | "
          "whole / blocks | peak RSS growth: blocks of rows | read whole |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {r['rows']:,} rows x 32 | {r['stored'] / gib:.2f} GiB | {r['loaded'] / gib:.2f} GiB | "
          f"{r['blocks'] / gib:.2f} GiB | {r['whole'] / gib:.2f} GiB | {r['whole'] / r['blocks']:.2f}x | "
          f"{r['blocks_rss'] / gib:.2f} GiB | {r['whole_rss'] / gib:.2f} GiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
