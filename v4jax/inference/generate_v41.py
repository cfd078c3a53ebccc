"""Greedy generation for DeepSeek-V4.1 on the model's own forward, plain or with DSpark drafting
(architecture.md §12.8).

The host keeps what the device cannot: the Engram n-gram history (int64 hashing, `engram_hash`). Each
call hashes its new tokens with the history of the tokens already in the cache, so the rows the model
reads are those of one call over the whole sequence.

Speculative decoding: after each token t the DSpark stages draft a block d_1..d_k from the target
features of the main tokens so far. The main model scores [t, d_1..d_k] in one call from the current
cache, kept unchanged (JAX arrays are values: the verification's cache is simply dropped). Greedy, the
drafts are accepted while each equals the main model's greedy token at the position before it, so the
output is exactly plain greedy decoding; sampled, each draft stands with the main model's probability
of it and a rejected one is replaced by a draw without it (`speculative_tokens`), so each token is
distributed as plain sampling draws it. The same number of drafts is kept for every row (the
smallest); the token after them is what the main model emits there (a row whose next draft also stood
emits that draft, which is a draw from the right distribution too). The kept tokens then go through
the model once more from the kept cache (their cache and target features), and the DSpark rings take
their features.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sharding.context import active
from sharding.mesh import compiler_options
from v4jax.inference.generate import Sampling, row_keys, sample, speculative_tokens
from v4jax.model.engram_hash import (advance_history, compressed_ids, empty_history, engram_layout, ngram_hash_ids,
                                     pad_compressed_id, token_map_from_tokenizer)
from v4jax.model.v41 import Image, V41Transformer, init_v41_cache, v41_cache_shardings
from v4jax.model.vision import image_span_layout


class Engram(NamedTuple):
    """The host side of Engram hashing for one batch of sequences."""

    token_map: np.ndarray  # [V] raw id -> compressed id
    history: object  # engram_hash.HashHistory


class V41Generation(NamedTuple):
    tokens: np.ndarray  # [B, n] new tokens: n = max_new, or fewer once every row has emitted a stop token
    steps: int  # main-model calls after the prefill (= max_new - 1 without drafting)
    accepted: int  # drafted tokens accepted in all


_JITTED: "OrderedDict[tuple, object]" = OrderedDict()  # (graphdef, name, mesh, rules) -> jitted, newest last
_JITTED_KEEP = 16


def model_jit(model: V41Transformer, fn, mesh=None, name: str | None = None):
    """fn(model, *args) jitted over the model's state (split once, passed to every call) with the mesh's
    XLA options (`sharding.mesh.compiler_options`: on TPU the expert exchange's all-to-alls run
    asynchronously, overlapping the experts). -> f(*args). name: reuse the function jitted under this name
    for a model of the same structure and mesh (its compiled programs too: a later generation call with
    the same shapes compiles nothing); fn must then depend on nothing but its arguments."""
    graphdef, state = nnx.split(model)
    key = None if name is None else (graphdef, name, mesh, active())  # traced under the active rules
    jitted = None if key is None else _JITTED.get(key)
    if jitted is None:
        jitted = jax.jit(lambda state, *args: fn(nnx.merge(graphdef, state), *args),
                         compiler_options=compiler_options(mesh))
        if key is not None:
            _JITTED[key] = jitted
            while len(_JITTED) > _JITTED_KEEP:
                _JITTED.popitem(last=False)
    else:
        _JITTED.move_to_end(key)
    return lambda *args: jitted(state, *args)


def _padded(m: V41Transformer, tokens, rows, cache, n_valid):  # right-padded rows (§12.7)
    return m(tokens, rows, cache=cache, return_hidden_states=False, n_valid=n_valid)


def engram_state(cfg, token_map: np.ndarray | None, batch: int) -> Engram | None:
    """The host side of Engram hashing for `batch` sequences starting at position 0 (None without Engram
    layers)."""
    if not cfg.engram_layer_ids:
        return None
    return Engram(np.asarray(token_map), empty_history(batch, engram_layout(cfg)))


def engram_rows(model: V41Transformer, engram: Engram | None, tokens: np.ndarray, dead: np.ndarray | None = None,
                n_valid: np.ndarray | None = None):
    """(engram row ids [B, T, n_layers, cols] for the model, the history after these tokens). dead [B, T]:
    image-span positions, which hash as pad and block the look-back across them. n_valid [B]: each row's
    tokens (the rest right padding, left out of the history)."""
    cfg = model.cfg
    if not cfg.engram_layer_ids:
        return None, engram
    layout = engram_layout(cfg)
    ids = compressed_ids(tokens, engram.token_map)
    pad = pad_compressed_id(cfg, engram.token_map)
    rows = np.stack([ngram_hash_ids(ids, dead, layout, i, pad, engram.history) for i in range(len(layout.layer_ids))],
                    axis=2)
    return jnp.asarray(rows, jnp.int32), engram._replace(history=advance_history(engram.history, ids, dead, n_valid))


def resolve_token_map(cfg, token_map_file: str | None, tokenizer_file: str | None,
                      checkpoint: str | None = None) -> np.ndarray | None:
    """The Engram compressed token map [V] for `cfg`'s model: a saved one (.npy; a train.py run keeps its
    own as `engram_token_map.npy`, used when none is given), else rebuilt from the release's
    tokenizer.json (architecture.md §12.4); None for a model without Engram layers. A one-line
    ValueError naming the file or what is missing."""
    if not cfg.engram_layer_ids:
        return None
    if not token_map_file and checkpoint:
        from v4jax.io.restore import Kind, _train_step_dir, detect

        if detect(checkpoint) is Kind.TRAIN_RUN:  # the map the run trained with (v4jax.train.loop)
            own = os.path.join(_train_step_dir(checkpoint, None)[1], "engram_token_map.npy")
            token_map_file = own if os.path.isfile(own) else None
    if token_map_file:
        try:
            token_map = np.load(token_map_file, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"cannot read the Engram token map {token_map_file}: {e}") from None
        if token_map.ndim != 1 or not np.issubdtype(token_map.dtype, np.integer) or len(token_map) < cfg.vocab_size:
            raise ValueError(f"Engram token map {token_map_file}: expected integer ids [{cfg.vocab_size}], got "
                             f"{token_map.dtype} {token_map.shape}")
        return token_map
    if tokenizer_file is None or tokenizer_file == "byte":
        raise ValueError("this model has Engram layers: its n-gram hash needs the release's tokenizer.json or a "
                         "saved token map (--engram-token-map FILE.npy)")
    from tokenizers import Tokenizer

    return token_map_from_tokenizer(Tokenizer.from_file(tokenizer_file), cfg.vocab_size)


def teacher_forced_logits(model: V41Transformer, ids: np.ndarray, decode_from: int,
                          token_map: np.ndarray | None) -> np.ndarray:
    """Cached decode under teacher forcing (the parity tool's decode_logits): prefill ids[:, :S0] into the
    V4.1 cache, then feed the rest one token at a time. -> [B, S - S0 + 1, V] fp32, entry j the logits
    at position S0 - 1 + j (equal to the stateless forward's there)."""
    cfg = model.cfg
    ids = np.asarray(ids, np.int64)
    B, S = ids.shape
    if not 1 <= decode_from <= S:
        raise ValueError(f"--decode-from must lie in [1, {S}] (the number of input ids), got {decode_from}")
    engram = engram_state(cfg, token_map, B)
    forward = model_jit(model, lambda m, t, e, c: m(t, e, cache=c, return_hidden_states=False))
    cache, out = init_v41_cache(cfg, B, S), []
    for lo, hi in [(0, decode_from)] + [(t, t + 1) for t in range(decode_from, S)]:
        rows, engram = engram_rows(model, engram, ids[:, lo:hi])
        o = forward(jnp.asarray(ids[:, lo:hi], jnp.int32), rows, cache)
        cache = o.cache
        out.append(np.asarray(o.logits[:, -1], np.float32))
    return np.stack(out, axis=1)


def image_prompt(cfg, tokens: list[int], grids: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """A prompt with images ahead of its text: each image's span (`[START] + ([IMAGE] * w' + [NEWLINE]) * h'
    + [END]`, architecture.md §12.5), one after the other, then `tokens`. Span positions carry
    `image_token_id` (their embeddings are replaced). -> (token ids, the start of each span)."""
    if grids and cfg.image_token_id is None:
        raise ValueError("this model has no image_token_id: it takes no images")
    out, starts = [], []
    for grid in grids:
        starts.append(len(out))
        out += [cfg.image_token_id] * image_span_layout(grid, cfg.vision_downsample_ratio).n_tokens
    return out + list(tokens), starts


def _right_padded(prompt) -> tuple[np.ndarray, np.ndarray]:
    """A [B, T] array, or B sequences of several lengths right-padded with 0 -> (prompt [B, T] int64,
    lengths [B])."""
    if isinstance(prompt, np.ndarray) and prompt.ndim == 2 or not len(prompt) or np.ndim(prompt[0]) != 1:
        prompt = np.asarray(prompt, np.int64)
        if prompt.ndim != 2:
            raise ValueError(f"prompt must be [B, T] or a list of token sequences, got shape {prompt.shape}")
        return prompt, np.full(prompt.shape[0], prompt.shape[1], np.int64)
    lengths = np.array([len(p) for p in prompt], np.int64)
    if not lengths.min() > 0:
        raise ValueError("every prompt needs at least one token")
    out = np.zeros((len(prompt), int(lengths.max())), np.int64)
    for b, p in enumerate(prompt):
        out[b, :len(p)] = p
    return out, lengths


def generate_v41(model: V41Transformer, prompt, max_new: int, token_map: np.ndarray | None = None,
                 draft: bool = False, max_len: int | None = None, images: tuple[Image, ...] = (),
                 mesh=None, rules=None, sampling: Sampling = Sampling(), seed: int = 0,
                 prefill_chunk: int | None = None, stop_tokens=()) -> V41Generation:
    """prompt [B, T] int, or B sequences of several lengths (decoded together, right-padded: each row's
    tokens are those it gets alone) -> `max_new` tokens per row, greedy unless `sampling` says otherwise (temperature,
    top-k, top-p as for V4; each row's draw keyed by (seed, row, position)). token_map: the Engram compressed token map
    (`engram_hash.token_map_from_tokenizer`), needed when the model has Engram layers. draft: speculate
    with the DSpark stages (fewer main-model calls; greedy: the same tokens, sampled: tokens from the
    same distribution, though not the same draws). images: `Image`s whose spans the
    prompt holds (`image_prompt`); the prefill embeds them (ViT + aligner) in place of those tokens.
    mesh, rules: over a device mesh (the model loaded sharded by `rules`, `load_model(mesh=, rules=)`):
    the cache's sequences split over the rules' batch axes, every step SPMD over the mesh.
    prefill_chunk: prefill the prompt through the cache in calls of at most this many tokens (a long
    prompt's activations bounded by the chunk; the same tokens as one call). stop_tokens: generation
    ends once every row has emitted one (a row that stopped earlier keeps decoding with the others;
    its tokens after the stop are what it would generate, for the caller to drop)."""
    if (mesh is None) != (rules is None):
        raise ValueError("generate_v41: mesh and rules go together")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be a positive number of tokens, got {prefill_chunk}")
    if mesh is not None:
        from sharding.context import use_mesh_rules

        with use_mesh_rules(mesh, rules):
            return _generate(model, prompt, max_new, token_map, draft, max_len, images, mesh, rules, sampling, seed,
                             prefill_chunk, stop_tokens)
    return _generate(model, prompt, max_new, token_map, draft, max_len, images, None, None, sampling, seed,
                     prefill_chunk, stop_tokens)


def _generate(model, prompt, max_new, token_map, draft, max_len, images, mesh, rules, sampling,
              seed, prefill_chunk, stop_tokens) -> V41Generation:
    cfg = model.cfg
    prompt, lengths = _right_padded(prompt)
    B, T = prompt.shape
    if images and (lengths < T).any():
        raise ValueError("images go with prompts of one length (one row)")
    if images and not cfg.vision_n_layers:
        raise ValueError("this model has no vision tower (vision_n_layers = 0): it takes no images")
    if cfg.engram_layer_ids and token_map is None:
        raise ValueError("this model has Engram layers: pass token_map (engram_hash.token_map_from_tokenizer)")
    if draft and not cfg.n_mtp_layers:
        raise ValueError("draft=True needs the DSpark stages (n_mtp_layers > 0)")
    sampling.validate(cfg.vocab_size)
    params = sampling.as_arrays() if sampling.temperature > 0 else sampling  # greedy stays static: exact argmax
    choose = jax.jit(lambda logits, position: sample(logits, row_keys(seed, B, position), params))
    speculate = jax.jit(lambda logits, candidate, position: speculative_tokens(logits, candidate, position, seed,
                                                                               params))
    block = cfg.dspark_block_size if draft else 0
    max_len = max_len or T + max_new + block + 1
    if max_len > cfg.max_seq_len:
        raise ValueError(f"prompt {T} + {max_new} new tokens need {max_len} positions; max_seq_len is {cfg.max_seq_len}")
    engram = engram_state(cfg, token_map, B)
    padded = model_jit(model, _padded, mesh, "padded")  # the one step: prefill, decode, verification

    def forward(t, e, c):  # every row's tokens its own
        return padded(t, e, c, jnp.full((B,), t.shape[1], jnp.int32))

    drafter = model_jit(model, lambda m, f, c, t, n: m.draft(f, c, t, n), mesh, "draft")

    spans = np.zeros(prompt.shape, bool)  # [B, T]: the image spans, delimiters included
    for img in images:
        spans[img.row, img.start:img.start + image_span_layout(img.grid, cfg.vision_downsample_ratio).n_tokens] = True
    tokens, cache = jnp.asarray(prompt, jnp.int32), init_v41_cache(cfg, B, max_len)
    if mesh is not None:  # each sequence's cache on the devices that hold its rows
        cache = jax.device_put(cache, v41_cache_shardings(cache, mesh, rules))
    embeddings = image = None
    if images:  # the spans' embeddings replaced (ViT + aligner once), bias_vl and Engram gate 0 there
        where = [(img.row, img.start, img.grid) for img in images]
        embeddings, image = model_jit(model, lambda m, t, patches: m.embed_prompt(
            t, tuple(Image(r, s, p, g) for (r, s, g), p in zip(where, patches))), mesh)(
                tokens, [img.patches for img in images])
        embedded = model_jit(model, lambda m, t, e, c, x, im: m(t, e, image=im, embeddings=x, cache=c,
                                                                 return_hidden_states=False), mesh)
    features, last = [], None
    for lo in range(0, T, prefill_chunk or T):  # the prompt in calls of at most prefill_chunk tokens
        hi = min(T, lo + (prefill_chunk or T))
        n = np.clip(lengths - lo, 0, hi - lo)  # [B]: each row's tokens in this call (right padding after)
        rows, engram = engram_rows(model, engram, prompt[:, lo:hi], spans[:, lo:hi], n)
        if images:
            out = embedded(tokens[:, lo:hi], rows, cache, embeddings[:, lo:hi], image[:, lo:hi])
        else:
            out = padded(tokens[:, lo:hi], rows, cache, jnp.asarray(n, jnp.int32))
        cache = out.cache
        features.append(out.target_features)
        here = out.logits[jnp.arange(B), jnp.asarray(np.maximum(n - 1, 0))]  # [B, V]: each row's last token here
        last = here if last is None else jnp.where(jnp.asarray(n > 0)[:, None], here, last)
    features = features[0] if len(features) == 1 or features[0] is None else jnp.concatenate(features, axis=1)
    token = choose(last, cache.lengths)  # [B]: the token at each row's next position
    generated, steps, accepted = [np.asarray(token)], 0, 0
    stop = np.asarray(sorted({int(t) for t in stop_tokens}), np.int64)
    stopped = np.isin(generated[0], stop)  # [B]: rows that have emitted a stop token
    while len(generated) < max_new and not stopped.all():
        if not draft:
            rows, engram = engram_rows(model, engram, np.asarray(token)[:, None])
            out = forward(token[:, None], rows, cache)
            cache = out.cache
            token = choose(out.logits[:, -1], cache.lengths)
            generated.append(np.asarray(token))
            stopped |= np.isin(generated[-1], stop)
            steps += 1
            continue
        # the rings take the features of the tokens so far: the prompt's each row's own (padding left out)
        seen = lengths if steps == 0 else np.full(B, features.shape[1])
        d, cache = drafter(features, cache, token, jnp.asarray(seen, jnp.int32))
        candidate = np.asarray(d.ids)  # [B, 1 + k]: the token, then the drafts
        rows, _ = engram_rows(model, engram, candidate)
        verify = forward(jnp.asarray(candidate, jnp.int32), rows, cache)  # scored, its cache dropped
        stands, emitted = (np.asarray(a) for a in speculate(verify.logits, jnp.asarray(candidate, jnp.int32),
                                                            cache.lengths + 1))
        n = int(np.min(np.sum(np.cumprod(stands, axis=1), axis=1)))  # drafts kept: the same count for every row
        n = min(n, max_new - len(generated) - 1)
        keep = candidate[:, :1 + n]  # the token and the drafts that stood
        rows, engram = engram_rows(model, engram, keep)
        out = forward(jnp.asarray(keep, jnp.int32), rows, cache)
        cache, features = out.cache, out.target_features
        generated += [keep[:, i] for i in range(1, 1 + n)]
        token = jnp.asarray(emitted[:, n], jnp.int32)  # what the main model emits after them
        generated.append(np.asarray(token))
        stopped |= np.isin(np.stack(generated[-1 - n:], axis=1), stop).any(axis=1)
        steps, accepted = steps + 1, accepted + n
    return V41Generation(np.stack(generated[:max_new], axis=1), steps, accepted)


def serve_v41(model: V41Transformer, prompts, max_new: int, token_map: np.ndarray | None = None, *, slots: int,
              stop_tokens=(), sampling: Sampling = Sampling(), seed: int = 0, max_len: int | None = None,
              mesh=None, rules=None):
    """Continuous batching for V4.1 (architecture.md §12.7): `slots` sequences decode together; when one
    finishes (a stop token or `max_new` tokens) its slot takes the next waiting prompt. Yields (prompt
    index, generated ids, the stop token included) as each prompt finishes. A prompt gets the tokens
    `generate_v41([prompt], seed=seed, ...)` gives it alone.

    Every call is right-padded (`n_valid`): the prompts that enter free slots are prefilled together,
    padded to the longest prompt (one compiled prefill), the other slots passing 0 tokens; a decode step
    feeds one token to each busy slot and 0 to an idle one. A slot is reused by setting its lengths to 0:
    what its cache still holds lies past the new sequence's positions and is never read (the window's
    past keys are those below the row's start, the entries those its positions have completed, the DSpark
    ring's those up to its newest main token); the host's Engram history of the slot starts empty."""
    import dataclasses
    from collections import deque

    cfg = model.cfg
    prompts = [np.asarray(p, np.int64).reshape(-1) for p in prompts]
    if not isinstance(slots, int) or slots < 1:
        raise ValueError(f"slots must be a positive integer, got {slots!r}")
    if not prompts or min(len(p) for p in prompts) < 1:
        raise ValueError("every prompt needs at least one token")
    if cfg.engram_layer_ids and token_map is None:
        raise ValueError("this model has Engram layers: pass token_map (engram_hash.token_map_from_tokenizer)")
    if (mesh is None) != (rules is None):
        raise ValueError("serve_v41: mesh and rules go together")
    sampling.validate(cfg.vocab_size)
    P = max(len(p) for p in prompts)
    max_len = max_len or P + max_new + 1
    if P + max_new > max_len or max_len > cfg.max_seq_len:
        raise ValueError(f"prompt {P} + {max_new} new tokens need {P + max_new} positions; max_len is {max_len}, "
                         f"max_seq_len {cfg.max_seq_len}")
    params = sampling.as_arrays() if sampling.temperature > 0 else sampling
    base = jax.random.key(seed)  # each slot draws as row 0 of a batch of its own prompt does

    @jax.jit
    def choose(logits, position):
        keys = jax.vmap(lambda t: jax.random.fold_in(jax.random.fold_in(base, 0), t))(position)
        return sample(logits, keys, params)

    def run():
        step = model_jit(model, _padded, mesh, "padded")
        cache = init_v41_cache(cfg, slots, max_len)
        if mesh is not None:
            cache = jax.device_put(cache, v41_cache_shardings(cache, mesh, rules))
        engram = engram_state(cfg, token_map, slots)
        stop = np.asarray(sorted({int(t) for t in stop_tokens}), np.int64)
        waiting, busy = deque(enumerate(prompts)), {}  # slot -> (prompt index, ids so far)
        token = np.zeros(slots, np.int64)
        while waiting or busy:
            free = [s for s in range(slots) if s not in busy][:len(waiting)]
            if free:  # the next prompts enter the free slots, prefilled together
                tokens, n = np.zeros((slots, P), np.int64), np.zeros(slots, np.int64)
                for s in free:
                    i, p = waiting.popleft()
                    tokens[s, :len(p)], n[s], busy[s] = p, len(p), (i, [])
                reset = jnp.asarray(np.isin(np.arange(slots), free))
                cache = dataclasses.replace(cache, lengths=jnp.where(reset, 0, cache.lengths),
                                            dspark_lengths=jnp.where(reset, 0, cache.dspark_lengths))
                if engram is not None:
                    fresh = empty_history(slots, engram_layout(cfg))
                    engram = engram._replace(history=type(fresh)(*(np.where(
                        np.isin(np.arange(slots), free).reshape((-1,) + (1,) * (a.ndim - 1)), f, a)
                        for f, a in zip(fresh, engram.history))))
                rows, engram = engram_rows(model, engram, tokens, None, n)
                out = step(jnp.asarray(tokens, jnp.int32), rows, cache, jnp.asarray(n, jnp.int32))
                cache = out.cache
                first = np.asarray(choose(out.logits[jnp.arange(slots), jnp.asarray(np.maximum(n - 1, 0))],
                                          cache.lengths))
                token = np.where(n > 0, first, token)
            else:  # one token for every busy slot
                n = np.array([1 if s in busy else 0 for s in range(slots)], np.int64)
                rows, engram = engram_rows(model, engram, token[:, None], None, n)
                out = step(jnp.asarray(token[:, None], jnp.int32), rows, cache, jnp.asarray(n, jnp.int32))
                cache = out.cache
                token = np.where(n > 0, np.asarray(choose(out.logits[:, 0], cache.lengths)), token)
            for s in sorted(busy):  # the token each busy slot just produced
                if s in busy and (not free or s in free):
                    i, ids = busy[s]
                    ids.append(int(token[s]))
                    if len(ids) >= max_new or np.isin(token[s], stop):
                        del busy[s]
                        yield i, ids

    if mesh is None:
        yield from run()
        return
    from sharding.context import use_mesh_rules

    with use_mesh_rules(mesh, rules):
        yield from run()
