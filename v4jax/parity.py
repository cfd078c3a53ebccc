"""Parity tool: dump this implementation's activations, and compare dumps from any two backends.

  python -m v4jax.parity dump --checkpoint DIR --input-ids IDS.npy --out OUT [--dtype float32]
  python -m v4jax.parity compare A B [--rtol 1e-5] [--atol X]

`dump` runs the stateless forward on int token ids [B, S] and writes OUT/logits.npy (float32
[B, S, V]), OUT/hidden_states.npy (float32 [L+1, B, S, hc_mult, d]: entry 0 the widened embedding,
entry i the streams after layer i-1), OUT/final_hidden.npy ([B, S, d], after the hc head and the
final norm) and, when the checkpoint has MTP weights, OUT/mtp_logits.npy ([B, S-1, V]).
`dump --decode-from S0` also runs the inference cache (v4jax.inference.generate): prefill the first S0 ids, then
feed the rest one token at a time (teacher forcing), and writes OUT/decode_logits.npy [B, S-S0+1, V]
whose entry j is the logits at position S0-1+j (j = 0 from the prefill).
`compare` prints max |a-b| and ||a-b|| / ||b|| for every array present in both folders and exits 1
when any exceeds the tolerances or is present in one folder only (2 on unusable input). Another
backend writes the same files to check itself against v4jax.

The checkpoint is any form `v4jax.io.restore.load_model` reads (HF / release safetensors, a convert
output, a train.py run directory). For a DeepSeek-V4.1 checkpoint the arrays follow the official code's
dumps (and the golden fixtures): logits, hidden_states [L, B, S, n_hc, d] (each block's output streams),
engram_block_inputs [n_engram, B, S, n_hc, d] and decode_logits; the Engram hash's token map comes from
CHECKPOINT/tokenizer.json or `--engram-token-map FILE.npy`. OUT must be absent or empty unless `--overwrite`; the arrays are
written to `OUT.partial` and renamed onto OUT when all are written (`v4jax.io.safe_io`).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def check_token_ids(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """Validate token ids: integer [B, S] (or [S]) within [0, vocab_size). Returns int32 [B, S]."""
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"token ids must have shape [B, S] with S >= 1, got {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}); found {ids.min()}..{ids.max()}")
    return ids.astype(np.int32)


def _load_npy(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def dump(checkpoint: str, input_ids: str, out: str, dtype: str | None = None, *,
         decode_from: int | None = None, overwrite: bool = False, numerics: str = "exact",
         engram_token_map: str | None = None) -> dict[str, np.ndarray]:
    """Run the forward (and, with decode_from, the cached decode) and write the arrays to `out`.
    dtype: compute and parameter dtype (default float32; bfloat16 with numerics=release, which needs it).
    engram_token_map: V4.1 only, a saved Engram token map (.npy) when the checkpoint has no tokenizer.json."""
    from v4jax.io.restore import load_model
    from v4jax.io.safe_io import check_target

    check_target(out, overwrite=overwrite)  # before minutes of work, not after
    try:
        ids = np.load(input_ids, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"cannot read token ids from {input_ids}: {str(e).splitlines()[0] if str(e) else e!r}") from None
    # every form infer.py reads: HF / release / module-name safetensors, a convert output, a train run
    dtype = dtype or ("bfloat16" if numerics == "release" else "float32")
    from v4jax.io.official_v41 import is_v41_checkpoint

    if is_v41_checkpoint(checkpoint):
        if numerics != "exact":
            raise ValueError("--numerics release is not supported for DeepSeek-V4.1 checkpoints")
        loaded = load_model(checkpoint, dtype=dtype, param_dtype=dtype, mtp=False)
        arrays = _dump_v41(loaded.model, check_token_ids(ids, loaded.cfg.vocab_size), decode_from, checkpoint,
                           engram_token_map)
    else:
        if engram_token_map:
            raise ValueError("--engram-token-map is for DeepSeek-V4.1 checkpoints")
        arrays = _dump_v4(load_model(checkpoint, dtype=dtype, param_dtype=dtype, numerics=numerics), ids, decode_from)
    from v4jax.io.safe_io import staged

    result = {name: np.asarray(a, dtype=np.float32) for name, a in arrays.items()}
    with staged(out, overwrite=overwrite) as tmp:
        for name, a in result.items():
            np.save(os.path.join(tmp, f"{name}.npy"), a)
    return result


def _dump_v41(model, ids: np.ndarray, decode_from: int | None, checkpoint: str, token_map_file: str | None):
    """DeepSeek-V4.1 (architecture.md §12), in the layout of the official code's dumps: logits [B, S, V],
    hidden_states [L, B, S, n_hc, d] (each block's output streams), engram_block_inputs [n_engram, B, S,
    n_hc, d] (the streams after each Engram update), decode_logits as for V4."""
    import jax.numpy as jnp
    from flax import nnx

    from v4jax.inference.generate_v41 import engram_rows, engram_state, resolve_token_map, teacher_forced_logits

    cfg = model.cfg
    tok = os.path.join(checkpoint, "tokenizer.json")
    token_map = resolve_token_map(cfg, token_map_file, tok if os.path.isfile(tok) else None, checkpoint)
    rows, _ = engram_rows(model, engram_state(cfg, token_map, ids.shape[0]), ids)
    o = nnx.jit(lambda m, t, e: m(t, e))(model, jnp.asarray(ids), rows)
    arrays = {"logits": o.logits, "hidden_states": jnp.stack(o.hidden_states)}
    if o.engram_inputs:
        arrays["engram_block_inputs"] = jnp.stack(o.engram_inputs)
    if decode_from is not None:
        arrays["decode_logits"] = teacher_forced_logits(model, ids, decode_from, token_map)
    return arrays


def _dump_v4(loaded, ids: np.ndarray, decode_from: int | None) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    model, cfg = loaded.model, loaded.cfg
    ids = check_token_ids(ids, cfg.vocab_size)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids):
        return nnx.merge(graphdef, state)(ids, return_hidden_states=True)

    o = forward(state, jnp.asarray(ids))
    arrays = {"logits": o.logits, "hidden_states": jnp.stack(o.hidden_states), "final_hidden": o.final_hidden}
    if o.mtp_logits is not None:
        arrays["mtp_logits"] = o.mtp_logits
    if decode_from is not None:
        arrays["decode_logits"] = decode_logits(model, ids, decode_from)
    return arrays


def decode_logits(model, ids: np.ndarray, decode_from: int) -> np.ndarray:
    """Teacher-forced cached decode: prefill ids[:, :S0], then one token per step. [B, S-S0+1, V] fp32."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from v4jax.model.cache import init_cache
    from v4jax.inference.generate import decode_step, prefill

    B, S = ids.shape
    if not 1 <= decode_from <= S:
        raise ValueError(f"--decode-from must lie in [1, {S}] (the number of input ids), got {decode_from}")
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda st, cache, t: decode_step(nnx.merge(graphdef, st), cache, t), donate_argnums=1)
    first = jax.jit(lambda st, cache, t: prefill(nnx.merge(graphdef, st), t, None, cache), donate_argnums=1)
    logits, cache = first(state, init_cache(model.cfg, B, S, model.options.dtype, mtp=False,
                                          numerics=model.options.numerics), jnp.asarray(ids[:, :decode_from]))
    out = [np.asarray(logits[:, -1], np.float32)]
    for t in range(decode_from, S):
        logits, cache = step(state, cache, jnp.asarray(ids[:, t:t + 1]))
        out.append(np.asarray(logits[:, 0], np.float32))
    return np.stack(out, axis=1)


def compare(a_dir: str, b_dir: str, rtol: float = 1e-5, atol: float | None = None) -> bool:
    """Print errors for every array in both folders; True when all are within tolerance."""
    for d in (a_dir, b_dir):
        if not os.path.isdir(d):
            raise ValueError(f"{d} is not a directory")
    in_a = {f[:-4] for f in os.listdir(a_dir) if f.endswith(".npy")}
    in_b = {f[:-4] for f in os.listdir(b_dir) if f.endswith(".npy")}
    names = sorted(in_a & in_b)
    if not names:
        raise ValueError(f"no .npy array is present in both {a_dir} and {b_dir}")
    ok = True
    print(f"{'array':<16} {'shape':<26} {'max_abs_err':>12} {'rel_err':>12}  status")
    # an array one side did not write is a failure, not something to skip: a backend that drops
    # mtp_logits or decode_logits would otherwise pass on the arrays it did write
    for name, (have, lack) in sorted({**{n: (a_dir, b_dir) for n in in_a - in_b},
                                      **{n: (b_dir, a_dir) for n in in_b - in_a}}.items()):
        print(f"{name:<16} {'-':<26} {'-':>12} {'-':>12}  ONLY IN {have} (missing from {lack})")
        ok = False
    for name in names:
        a = _load_npy(os.path.join(a_dir, f"{name}.npy"))
        b = _load_npy(os.path.join(b_dir, f"{name}.npy"))
        for path, x in ((os.path.join(a_dir, f"{name}.npy"), a), (os.path.join(b_dir, f"{name}.npy"), b)):
            if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or np.issubdtype(x.dtype, np.complexfloating):
                raise ValueError(f"{path}: holds {x.dtype}, expected a real numeric array")
        a, b = a.astype(np.float64), b.astype(np.float64)
        if a.shape != b.shape:
            print(f"{name:<16} {str(a.shape) + ' vs ' + str(b.shape):<26} {'-':>12} {'-':>12}  SHAPE MISMATCH")
            ok = False
            continue
        max_abs = float(np.max(np.abs(a - b))) if a.size else 0.0
        norm_b = float(np.linalg.norm(b))
        rel = float(np.linalg.norm(a - b) / norm_b) if norm_b else (0.0 if max_abs == 0 else float("inf"))
        good = np.isfinite(rel) and rel <= rtol and (atol is None or max_abs <= atol)
        ok &= bool(good)
        print(f"{name:<16} {str(a.shape):<26} {max_abs:12.3e} {rel:12.3e}  {'ok' if good else 'EXCEEDS'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m v4jax.parity", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dump", help="run the forward and write logits / hidden states as .npy")
    d.add_argument("--checkpoint", required=True, help="any checkpoint infer.py reads: HF, release or module-name safetensors, a convert output, a train.py run")
    d.add_argument("--input-ids", required=True, help=".npy file of int token ids [B, S]")
    d.add_argument("--out", required=True, help="output folder")
    d.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="compute and parameter dtype (default float32; bfloat16 with --numerics release)")
    d.add_argument("--numerics", default="exact", choices=["exact", "release"],
                   help="release: DeepSeek's inference roundings (FP8 activations and KV, FP4 indexer; docs/numerics.md)")
    d.add_argument("--decode-from", type=int, default=None, metavar="S0",
                   help="also write decode_logits.npy: prefill S0 ids, then decode the rest one token at a time")
    d.add_argument("--engram-token-map", default=None, metavar="FILE.npy",
                   help="DeepSeek-V4.1: the Engram token map when the checkpoint has no tokenizer.json")
    d.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    c = sub.add_parser("compare", help="compare the arrays of two dump folders")
    c.add_argument("a")
    c.add_argument("b", help="the reference: relative error is ||a-b|| / ||b||")
    c.add_argument("--rtol", type=float, default=1e-5, help="max relative error (default 1e-5)")
    c.add_argument("--atol", type=float, default=None, help="max absolute error (default: unchecked)")
    args = p.parse_args(argv)
    try:
        if args.command == "dump":
            arrays = dump(args.checkpoint, args.input_ids, args.out, args.dtype, decode_from=args.decode_from,
                          overwrite=args.overwrite, numerics=args.numerics,
                          engram_token_map=args.engram_token_map)
            for name, a in arrays.items():
                print(f"wrote {os.path.join(args.out, name + '.npy')} {a.shape}")
            return 0
        return 0 if compare(args.a, args.b, args.rtol, args.atol) else 1
    except (ValueError, OSError) as e:  # CheckpointError, ConfigError and TargetError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
