"""Generate text with a DeepSeek-V4 or V4.1 checkpoint (v4jax): cached, batched, optionally speculative.

  python infer.py --checkpoint DIR --prompt "Hello" [--tokenizer tokenizer.json|byte]
  python infer.py --checkpoint DIR --prompt-ids ids.txt        # one prompt per line, ids by spaces/commas
  python infer.py --checkpoint DIR --prompt-ids ids.npy        # int array [S] or [B, S] (no padding)
  python infer.py --checkpoint DIR --prompts-file prompts.txt [--slots 4]   # continuous batching, one per line
      [--max-new-tokens 64] [--temperature 0] [--top-k 0] [--top-p 1] [--seed 0] [--speculative]
      [--stop ID ...] [--max-len N] [--dtype float32|bfloat16] [--prefill-chunk N] [--step N]
      [--numerics exact|release]   # release: DeepSeek's own FP8/FP4 inference roundings (docs/numerics.md)
      [--mesh expert=8,... --rules fsdp_ep]   # over a device mesh: parameters and cache sharded by the rules
      [--coordinator HOST:PORT --num-processes N --process-id I]   # multi-host: the same command on every host
      [--image FILE ...] [--engram-token-map FILE.npy]   # DeepSeek-V4.1 checkpoints

The checkpoint (`v4jax.io.restore.load_model`) is any of: an HF-format directory (config.json +
*.safetensors, Hub or transformers spelling), the official release layout (FP8/FP4 weights,
de-quantised on load), a `python -m v4jax.io.convert` output (Orbax), or a `train.py` run directory
(its newest complete step, or --step N), or a DeepSeek-V4.1 checkpoint (the release or an unquantised
directory under the official names, or its conversion: greedy or sampled generation, plain or DSpark --speculative;
--image FILE puts an image's span ahead of the prompt's text, preprocessed as the release does; the
Engram hash's token map comes from the tokenizer or --engram-token-map). Paths may be relative. The tokenizer is --tokenizer, else
CHECKPOINT/tokenizer.json, else, for a train.py run, the one its config.json names ("byte": UTF-8
bytes, v4jax.train.data.ByteTokenizer; a path: that tokenizer.json, as given or relative to the run
directory). Tokens stream to stdout as they are produced; the cache size
per token and in total for the requested length is printed first, and the speed (and the speculative
acceptance rate) at the end. Without --checkpoint it explains how to get one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HOW_TO_GET_A_CHECKPOINT = """\
infer.py needs --checkpoint DIR: an HF-format directory (config.json + *.safetensors), an official
release directory, a `python -m v4jax.io.convert` output, or a train.py run directory. Ways to get one:
  * a random tiny model to try the tool (seconds):
      python infer.py --write-random-checkpoint /tmp/v4tiny --preset tiny
      python infer.py --checkpoint /tmp/v4tiny --prompt-ids ids.txt
  * a released model: download deepseek-ai/DeepSeek-V4-Flash (or -Pro) from the Hugging Face Hub and
    pass the download directory (FP8/FP4 weights are de-quantised as they load), or convert it once
    with `python -m v4jax.io.convert --from DOWNLOAD --to OUT` and pass OUT;
  * a model trained with train.py: pass its run directory (e.g. runs/tiny)."""


class InferError(ValueError):
    """Bad command-line input: reported as one line, exit status 2."""


def read_config(path: str):
    """The V4Config of a checkpoint (cheap: configuration only); a clear error for anything else."""
    from v4jax.io.restore import Kind, detect, train_run_config, _train_step_dir

    from v4jax.config import V4Config

    cfg_path = os.path.join(path, "config.json")
    if os.path.isfile(cfg_path):  # the architecture first: a foreign checkpoint is named as such
        d = _read_json(cfg_path)
        if not isinstance(d, dict):
            raise InferError(f"{cfg_path} does not hold a JSON object")
        model_type = d.get("model_type", "deepseek_v4")
        if "model" not in d and model_type != "deepseek_v4":
            raise InferError(f"{path} holds a {model_type!r} checkpoint; infer.py runs DeepSeek-V4 (model_type "
                             "'deepseek_v4') only")
    if detect(path) is Kind.TRAIN_RUN:
        return train_run_config(_train_step_dir(path, None)[1])
    if not os.path.isfile(cfg_path):
        raise InferError(f"{path} has no config.json: not an HF-format checkpoint directory")
    return V4Config.from_json_file(os.path.join(path, "config.json"))


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise InferError(f"{path} is not readable JSON ({e})") from None


class _TextTokenizer:
    """encode(text) -> ids and decode(ids) -> text over a `tokenizers` Tokenizer or ByteTokenizer."""

    def __init__(self, tok, name: str, vocab_size: int):
        self._tok, self.name, self.vocab_size = tok, name, vocab_size

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text)
        return list(ids.ids) if hasattr(ids, "ids") else [int(i) for i in ids]

    def decode(self, ids) -> str:
        # a model's vocabulary may be larger than its tokenizer's (train.py pads it): a sampled id
        # past the tokenizer's end has no text and is dropped rather than failing the whole output
        return self._tok.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])


def load_tokenizer(path: str, vocab_size: int) -> _TextTokenizer:
    """A `tokenizers` tokenizer.json (or "byte") whose vocabulary fits the model's."""
    if path == "byte":
        from v4jax.train.data import ByteTokenizer
        tok, n = ByteTokenizer(), ByteTokenizer.vocab_size
    else:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise InferError("--prompt needs the `tokenizers` package (pip install tokenizers), or use --prompt-ids")
        try:
            tok = Tokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001 - the library raises its own exception types
            raise InferError(f"cannot read tokenizer {path}: {str(e).splitlines()[0] if str(e) else e!r}") from None
        n = tok.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise InferError(f"tokenizer {path} has {n} tokens but the model's vocabulary has {vocab_size}: "
                         "they do not belong together")
    return _TextTokenizer(tok, path, n)


def read_prompts(args, vocab_size: int, tokenizer_hint: str) -> tuple[list[list[int]], _TextTokenizer | None, str | None]:
    """(the prompts' ids from --prompt / --prompts-file / --prompt-ids, each checked against the vocabulary;
    the tokenizer, which also decodes the output of --prompt-ids, or None; its path or None). A text
    prompt without a tokenizer is refused naming `tokenizer_hint`."""
    from v4jax.inference.generate import check_token_ids

    tok_path = find_tokenizer(args.checkpoint, args.tokenizer)
    text = "--prompt" if args.prompt is not None else "--prompts-file" if args.prompts_file is not None else None
    if text and tok_path is None:
        raise InferError(f"{text} needs a tokenizer: {os.path.join(args.checkpoint, 'tokenizer.json')} does not "
                         f"exist (pass {tokenizer_hint}, or use --prompt-ids)")
    tok = load_tokenizer(tok_path, vocab_size) if tok_path is not None else None
    if args.prompt is not None:
        prompts = [tok.encode(args.prompt)]
    elif args.prompts_file is not None:
        prompts = read_prompts_file(args.prompts_file, tok)
    else:
        prompts = read_prompt_ids(args.prompt_ids)
    for p in prompts:
        check_token_ids(p, vocab_size)
    return prompts, tok, tok_path


def find_tokenizer(checkpoint: str, given: str | None) -> str | None:
    """--tokenizer, else CHECKPOINT/tokenizer.json, else what a train.py run's config.json names
    (train.tokenizer: "byte" or a path, as given or relative to the run directory); None if nothing."""
    if given:
        if given != "byte" and not os.path.isfile(given):
            raise InferError(f"--tokenizer {given} does not exist (give a tokenizer.json or 'byte')")
        return given
    own = os.path.join(checkpoint, "tokenizer.json")
    if os.path.isfile(own):
        return own
    from v4jax.io.restore import Kind, _train_step_dir, detect

    if detect(checkpoint) is not Kind.TRAIN_RUN:
        return None
    run = _train_step_dir(checkpoint, None)[1]
    cfg_path = os.path.join(run, "config.json")
    d = _read_json(cfg_path)
    spec = d.get("train", {}).get("tokenizer") if isinstance(d, dict) and isinstance(d.get("train"), dict) else None
    if spec is None:
        return None
    if not isinstance(spec, str) or not spec:
        raise InferError(f"{cfg_path}: field train.tokenizer must be 'byte' or a path, got {spec!r}")
    if spec == "byte":
        return "byte"
    for cand in (os.path.join(run, "tokenizer.json"), spec, os.path.join(run, spec)):
        if os.path.isfile(cand):
            return cand
    raise InferError(f"{cfg_path}: the run's tokenizer {spec!r} does not exist (relative to here or to {run}); "
                     "pass --tokenizer")


def read_prompt_ids(path: str) -> list[list[int]]:
    """.npy ([S] or [B, S]) or text (one prompt per line; ids separated by spaces or commas)."""
    if not os.path.isfile(path):
        raise InferError(f"--prompt-ids file {path} does not exist")
    if path.endswith(".npy"):
        try:
            a = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise InferError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else e!r}") from None
        if not np.issubdtype(a.dtype, np.integer) or a.ndim not in (1, 2):
            raise InferError(f"{path}: expected integer ids [S] or [B, S], got {a.dtype} {a.shape}")
        return [list(map(int, r)) for r in np.atleast_2d(a)]
    rows = []
    with open(path, errors="replace") as f:  # binary junk is reported as non-integer ids, by line
        for n, line in enumerate(f, 1):
            fields = line.replace(",", " ").split()
            if not fields:
                continue
            try:
                rows.append([int(x) for x in fields])
            except ValueError:
                raise InferError(f"{path}:{n}: token ids must be integers") from None
    if not rows:
        raise InferError(f"{path} holds no token ids")
    return rows


def read_prompts_file(path: str, tok) -> list[list[int]]:
    """One prompt per non-empty line, tokenised."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise InferError(f"cannot read prompts from {path}: {e}") from None
    prompts = [tok.encode(line) for line in lines if line.strip()]
    if not prompts:
        raise InferError(f"{path} holds no prompt")
    return prompts


def serve(gen, prompts, args, sampling, stop, max_len: int, tok) -> int:
    """Continuous batching over --slots sequences: each result printed as its prompt finishes."""
    import time

    slots = args.slots or min(4, len(prompts))
    stats: list = []
    t0 = time.perf_counter()
    for index, ids in gen.serve(prompts, slots=slots, max_new_tokens=args.max_new_tokens, sampling=sampling,
                                stop_tokens=stop, seed=args.seed, max_len=max_len, stats=stats):
        print(f"[{index}] " + (tok.decode(ids) if tok else " ".join(map(str, ids))), flush=True)
    s, seconds = stats[0], time.perf_counter() - t0
    print(f"served {len(prompts)} prompts over {slots} slots: {s.prompt_tokens} prompt + {s.generated_tokens} new "
          f"tokens in {seconds:.2f} s ({s.generated_tokens / seconds:.1f} new tokens/s, {s.steps} decode steps, "
          "includes compilation)", file=sys.stderr)
    return 0


def jax_process_count() -> int:
    import jax

    return jax.process_count()


def print_cache_size(cfg, batch: int, max_len: int, dtype: str, numerics) -> None:
    import jax

    from v4jax.inference.cache_size import cache_size
    from v4jax.model.cache import cache_nbytes, init_cache

    layout = cache_size(cfg, "layout", dtype, numerics)
    release = cache_size(cfg, "release")
    held = cache_nbytes(jax.eval_shape(lambda: init_cache(cfg, batch, max_len, dtype, numerics=numerics)))
    print(f"KV cache: {layout.per_token:,.0f} B/token + {layout.fixed / 1e6:.2f} MB fixed per sequence "
          f"({dtype} layout, {numerics.value} numerics); {held / 1e6:.2f} MB allocated for {batch} x {max_len} "
          f"tokens. "
          f"Release format (FP8/FP4): {release.per_token:,.0f} B/token, {release.total(max_len) / 1e6:.2f} MB "
          f"per sequence at {max_len}.", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python infer.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="HF / official release / converted Orbax / train.py run directory")
    p.add_argument("--step", type=int, default=None, help="train.py runs: the step to read (default: newest)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", help="prompt text (needs a tokenizer)")
    g.add_argument("--prompt-ids", help=".npy or text file of token ids (one prompt per line)")
    g.add_argument("--prompts-file", help="text file, one prompt per line (needs a tokenizer), served with "
                                          "continuous batching over --slots sequences")
    p.add_argument("--slots", type=int, default=None, help="continuous batching: sequences decoded together "
                                                           "(default 4 with --prompts-file; with --prompt-ids it "
                                                           "turns continuous batching on)")
    p.add_argument("--tokenizer", help="tokenizer.json or 'byte' (default: CHECKPOINT/tokenizer.json, or the "
                                       "tokenizer a train.py run was trained with)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speculative", action="store_true",
                   help="self-speculative decoding (V4's MTP block, V4.1's DSpark stages), greedy or sampled")
    p.add_argument("--stop", type=int, nargs="*", default=None, help="stop token ids (default: the config's eos)")
    p.add_argument("--max-len", type=int, default=None, help="cache length (default: prompt + max new tokens)")
    p.add_argument("--prefill-chunk", type=int, default=None, help="prefill the prompt in chunks of N tokens")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: the checkpoint's (bfloat16 with --numerics release)")
    p.add_argument("--numerics", choices=["exact", "release"], default="exact",
                   help="release: DeepSeek's inference roundings, FP8/FP4 cache (docs/numerics.md)")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. 'fsdp=4,expert=2' (sharding.mesh; -1 = the rest); "
                                                "needs --rules")
    p.add_argument("--rules", default=None, help="sharding rules preset (fsdp, fsdp_ep, fsdp_tp_ep, serve_tp, long_context)")
    p.add_argument("--coordinator", default=None, help="multi-host: host:port of process 0")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--image", action="append", default=None, metavar="FILE",
                   help="DeepSeek-V4.1: an image placed ahead of the prompt's text (repeatable, in order)")
    p.add_argument("--engram-token-map", metavar="FILE.npy", default=None,
                   help="DeepSeek-V4.1: the Engram compressed token map [V] (default: rebuilt from the tokenizer)")
    p.add_argument("--write-random-checkpoint", metavar="DIR", help="write a random model (--preset) and exit")
    p.add_argument("--preset", default="tiny", help="preset for --write-random-checkpoint")
    p.add_argument("--overwrite", action="store_true", help="--write-random-checkpoint: replace a non-empty DIR")
    args = p.parse_args(argv)
    try:
        if (args.mesh is None) != (args.rules is None):
            raise InferError("--mesh and --rules go together (a mesh and the rules table that lays the model on it)")
        from sharding.distributed import initialize

        initialize(args.coordinator, args.num_processes, args.process_id)  # before any other JAX call
        return run(args)
    except (ValueError, OSError) as e:  # InferError, CheckpointError, ConfigError, generation input errors
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    if args.write_random_checkpoint:
        from flax import nnx

        from v4jax.io.checkpoint import save_hf
        from v4jax.config import RunOptions, V4Config
        from v4jax.model.transformer import Transformer

        from v4jax.io.safe_io import check_target

        # refused before the model is built; save_hf checks again and writes through DIR.partial
        check_target(args.write_random_checkpoint, overwrite=args.overwrite)
        save_hf(Transformer(V4Config.preset(args.preset), rngs=nnx.Rngs(args.seed),
                            options=RunOptions.preset(args.preset)), args.write_random_checkpoint,
                overwrite=args.overwrite)
        print(f"wrote a random {args.preset} model to {args.write_random_checkpoint}")
        return 0
    if not args.checkpoint:
        print(HOW_TO_GET_A_CHECKPOINT, file=sys.stderr)
        return 2
    if args.prompt is None and args.prompt_ids is None and args.prompts_file is None:
        raise InferError("give --prompt TEXT, --prompt-ids FILE or --prompts-file FILE")
    from v4jax.io.official_v41 import is_v41_checkpoint

    if is_v41_checkpoint(args.checkpoint):
        return run_v41(args)
    for flag, value in (("--image", args.image), ("--engram-token-map", args.engram_token_map)):
        if value:
            raise InferError(f"{flag} is for DeepSeek-V4.1 checkpoints; {args.checkpoint} is DeepSeek-V4")
    if args.slots is not None and (args.slots < 1 or args.speculative or args.prompt is not None):
        raise InferError("--slots must be a positive integer, with --prompts-file or --prompt-ids, without "
                         "--speculative")
    from v4jax.inference.generate import Generator, Sampling
    from v4jax.io.restore import load_model

    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    # every check that needs only config.json runs before the weights load
    cfg = read_config(args.checkpoint)
    sampling.validate(cfg.vocab_size)
    prompts, tok, _ = read_prompts(args, cfg.vocab_size, "--tokenizer FILE or --tokenizer byte")
    for p in prompts:
        if not p:
            raise InferError("the prompt is empty after tokenisation")
    stop = args.stop if args.stop is not None else ([cfg.eos_token_id] if cfg.eos_token_id is not None else [])
    need = max(map(len, prompts)) + args.max_new_tokens + int(args.speculative)
    max_len = args.max_len or min(need, cfg.max_seq_len)
    if need > max_len:
        raise InferError(f"prompt of {max(map(len, prompts))} tokens + --max-new-tokens {args.max_new_tokens} needs "
                         f"{need} cache positions, more than max_len {max_len} (model max_seq_len {cfg.max_seq_len})")

    if args.speculative and not cfg.n_mtp_layers:
        raise InferError(f"--speculative needs the MTP block; {args.checkpoint} has no mtp block (its config has no MTP layer)")
    dtype = args.dtype or ("bfloat16" if args.numerics == "release" else None)
    mesh = rules = None
    if args.mesh is not None:
        from sharding.mesh import make_mesh
        from sharding.rules import get_rules

        mesh, rules = make_mesh(args.mesh), get_rules(args.rules)  # ShardingError (a ValueError): one line
    loaded = load_model(args.checkpoint, dtype=dtype, param_dtype=dtype, step=args.step,
                        mtp=None if args.speculative else False, numerics=args.numerics, mesh=mesh, rules=rules)
    model = loaded.model
    if args.speculative and model.mtp is None:
        raise InferError(f"--speculative needs the MTP block; {args.checkpoint} has no mtp.* tensors")
    where = f" (step {loaded.step})" if loaded.step is not None else ""
    if mesh is not None:
        from sharding.mesh import describe

        where += f" on mesh {describe(mesh)} ({rules.name} rules, {jax_process_count()} process(es))"
    print(f"loaded {loaded.kind.value} checkpoint {args.checkpoint}{where}", file=sys.stderr)
    print_cache_size(cfg, len(prompts), max_len, loaded.options.dtype, loaded.options.numerics)

    gen = Generator(model, mesh=mesh, rules=rules)
    if args.prompts_file is not None or args.slots is not None:
        return serve(gen, prompts, args, sampling, stop, max_len, tok)
    stats: list = []
    texts = [[] for _ in prompts]

    def render(ids):
        return tok.decode(ids) if tok else " ".join(map(str, ids))

    shown = ""
    for update in gen.stream(prompts, max_new_tokens=args.max_new_tokens, sampling=sampling, stop_tokens=stop,
                             seed=args.seed, speculative=args.speculative, prefill_chunk=args.prefill_chunk,
                             max_len=max_len, stats=stats):
        for b, ids in update.items():
            texts[b] += ids
        if len(prompts) == 1:  # stream a single prompt as it is produced (re-decoded: pieces may merge)
            text = render(texts[0])
            if text.startswith(shown):
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text
    if len(prompts) == 1:
        print(render(texts[0])[len(shown):])
    else:
        for b, ids in enumerate(texts):
            print(f"[{b}] " + render(ids))
    s = stats[0]
    line = (f"prefill {s.prompt_tokens} tokens in {s.prefill_s:.2f} s; {s.generated_tokens} new tokens in "
            f"{s.decode_s:.2f} s ({s.steps} steps, includes compilation)")
    if args.speculative:
        line += f"; MTP acceptance {s.accepted}/{s.drafted} = {s.acceptance_rate:.1%}"
    print(line, file=sys.stderr)
    return 0


def run_v41(args) -> int:
    """A DeepSeek-V4.1 checkpoint (architecture.md §12): generation through the model's own forward, greedy or
    sampled, plain or DSpark-speculative (--speculative: greedy gives the same tokens, sampling the same
    distribution), text prompts and --image."""
    import time

    from v4jax.config_v41 import V41Config
    from v4jax.inference.generate import Sampling
    from v4jax.inference.generate_v41 import generate_v41, image_prompt, resolve_token_map
    from v4jax.inference.images import load_image
    from v4jax.io.restore import load_model
    from v4jax.model.v41 import Image

    if args.numerics != "exact":
        raise InferError("--numerics release is not supported for DeepSeek-V4.1 checkpoints yet (generation, greedy "
                         "or sampled, plain or --speculative, over --prompt / --prompt-ids / --prompts-file, "
                         "with --prefill-chunk or --slots)")
    if args.slots is not None and (args.slots < 1 or args.speculative or args.image or args.prompt is not None):
        raise InferError("--slots must be a positive integer, with --prompts-file or --prompt-ids, without "
                         "--speculative or --image")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise InferError(f"--prefill-chunk must be a positive number of tokens, got {args.prefill_chunk}")
    from v4jax.io.restore import Kind, _train_step_dir, detect, train_run_config

    if detect(args.checkpoint) is Kind.TRAIN_RUN:  # a V4.1 text backbone trained by train.py
        cfg = train_run_config(_train_step_dir(args.checkpoint, args.step)[1])
    elif args.step is not None:
        raise InferError("--step is for train.py runs; this DeepSeek-V4.1 checkpoint has one set of weights")
    else:
        cfg = V41Config.from_json_file(os.path.join(args.checkpoint, "config.json"))
    prompts, tok, tok_path = read_prompts(args, cfg.vocab_size, "--tokenizer FILE")
    token_map = resolve_token_map(cfg, args.engram_token_map, tok_path, args.checkpoint)
    images = [load_image(f, cfg) for f in args.image or ()]  # [(patches [h*w, 3*p*p], grid)]
    if images and (len(prompts) != 1 or not cfg.vision_n_layers):
        raise InferError("--image needs one prompt and a model with a vision tower" if cfg.vision_n_layers else
                         f"--image: {args.checkpoint} has no vision tower (vision_n_layers = 0)")
    if images:
        prompts[0], starts = image_prompt(cfg, prompts[0], [g for _, g in images])
    if not all(prompts):
        raise InferError("the prompt is empty after tokenisation")
    stop = args.stop if args.stop is not None else ([cfg.eos_token_id] if cfg.eos_token_id is not None else [])
    mesh = rules = None
    if args.mesh is not None:
        from sharding.mesh import make_mesh
        from sharding.rules import get_rules

        mesh, rules = make_mesh(args.mesh), get_rules(args.rules)
    loaded = load_model(args.checkpoint, dtype=args.dtype, param_dtype=args.dtype, step=args.step,
                        mtp=True if args.speculative else False, mesh=mesh, rules=rules)
    print(f"loaded DeepSeek-V4.1 {loaded.kind.value} checkpoint {args.checkpoint}"
          + (f" on mesh {args.mesh} ({rules.name} rules)" if mesh is not None else ""), file=sys.stderr)
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    if args.slots is not None or (args.prompts_file is not None and not args.speculative and not images):
        from v4jax.inference.generate_v41 import serve_v41

        slots, t0, produced = args.slots or min(4, len(prompts)), time.perf_counter(), 0
        for index, ids in serve_v41(loaded.model, prompts, args.max_new_tokens, token_map, slots=slots,
                                    stop_tokens=stop, sampling=sampling, seed=args.seed, max_len=args.max_len,
                                    mesh=mesh, rules=rules):
            produced += len(ids)
            ids = ids[:-1] if ids[-1] in stop else ids
            print(f"[{index}] " + (tok.decode(ids) if tok else " ".join(map(str, ids))), flush=True)
        seconds = time.perf_counter() - t0
        print(f"served {len(prompts)} prompts over {slots} slots: {sum(map(len, prompts))} prompt + {produced} new "
              f"tokens in {seconds:.2f} s ({produced / seconds:.1f} new tokens/s, includes compilation)",
              file=sys.stderr)
        return 0
    t0 = time.perf_counter()
    got = generate_v41(loaded.model, prompts, args.max_new_tokens, token_map,  # rows of any lengths, right-padded
                       draft=args.speculative, max_len=args.max_len, mesh=mesh, rules=rules, seed=args.seed,
                       prefill_chunk=args.prefill_chunk, stop_tokens=stop,
                       sampling=sampling,
                       images=tuple(Image(0, s, p, g) for (p, g), s in zip(images, starts)) if images else ())
    steps, accepted = got.steps, got.accepted
    outputs = {i: list(map(int, got.tokens[i])) for i in range(len(prompts))}
    seconds = time.perf_counter() - t0
    produced = 0
    for i in range(len(prompts)):
        ids = outputs[i]
        end = next((k for k, t in enumerate(ids) if t in stop), None)  # the first stop token
        produced += len(ids) if end is None else end + 1
        ids = ids if end is None else ids[:end]
        text = tok.decode(ids) if tok else " ".join(map(str, ids))
        print(text if len(prompts) == 1 else f"[{i}] {text}")
    line = (f"{sum(map(len, prompts))} prompt + {produced} new tokens in {seconds:.2f} s "
            f"({steps} main-model steps after the prefill, includes compilation)")
    if args.speculative:
        line += f"; DSpark accepted {accepted} drafted tokens"
    print(line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
