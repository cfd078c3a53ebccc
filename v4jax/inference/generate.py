"""Generation on the model's own forward: prefill, one-token decode, sampling, batched generation and
MTP speculation.

The model's forward with a cache (`Transformer(tokens, cache=...)`) feeds T new tokens per sequence at
each sequence's own position (`cache.lengths`); it gives the same logits as the stateless forward
(architecture.md §4.6: prefill of T tokens == prefill of T0 + decode steps). Sequences of a batch may hold
different lengths; `n_valid` [B] says how many of the T new tokens of each row are real: the rest
(right padding) are computed but never enter a ring, a compressor window or `lengths`, and a causal
model never lets them change a real token's output.

Speculative decoding (architecture.md §6): the MTP block drafts token t+2 from the last main block's streams at
t and the embedding of token t+1; the main model verifies [pending, draft] in one call of T = 2 (greedy:
the draft stands if it is the argmax; sampled: with the main model's probability of it,
`speculative_tokens`). A rejected draft is rolled back by not advancing `lengths`: its KV went to window
slot (p+1) mod W and compressor slot (p+1) mod kappa*m, which held positions p+1-W and p+1-kappa*m, that
no later query reads; an entry it completed is invisible until the window really completes and rewrites it.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sharding.context import constrain, use_mesh_rules
from sharding.mesh import compiler_options
from sharding.partition import shard_module
from v4jax.model.cache import Cache, cache_rows, cache_shardings, init_cache, put_cache_rows, reset_rows

def decode_step(model, cache: Cache, tokens: jax.Array) -> tuple[jax.Array, Cache]:
    """One token per sequence: tokens [B, 1] -> (logits [B, 1, V] fp32, cache). Pure, jit-friendly."""
    out = model(tokens, cache=cache)
    return out.logits, out.cache


def _check_fits(cache: Cache, n_new: np.ndarray, what: str) -> None:
    lengths = np.asarray(cache.lengths)
    end = lengths + np.asarray(n_new)
    if np.any(end > cache.max_len):
        b = int(np.argmax(end - cache.max_len))
        raise ValueError(f"{what}: sequence {b} would hold {int(end[b])} tokens but the cache holds at most "
                         f"{cache.max_len} (max_len)")


def check_token_ids(tokens, vocab_size: int) -> np.ndarray:
    """Integer ids within [0, vocab_size), as an int32 array (ValueError otherwise)."""
    a = np.asarray(tokens)
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {a.dtype}")
    if a.size and (a.min() < 0 or a.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}); found {a.min()}..{a.max()}")
    return a.astype(np.int32)


def _concrete(x) -> np.ndarray | None:
    """x as a numpy array, or None while tracing (checks run on concrete inputs only)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def prefill(model, tokens: jax.Array, lengths: jax.Array | None, cache: Cache) -> tuple[jax.Array, Cache]:
    """Feed a (chunk of a) prompt: tokens [B, T] right-padded, lengths [B] real tokens per row (default
    T). Continues from the cache's current lengths, so calling it chunk by chunk equals one call.
    Returns (logits [B, T, V] fp32, cache); row b's next-token logits are at lengths[b] - 1.
    Checks concrete inputs (ids in the vocabulary, room in the cache); traceable with abstract ones."""
    B, T = tokens.shape
    lengths = jnp.full((B,), T, jnp.int32) if lengths is None else lengths
    ids, n, held = _concrete(tokens), _concrete(lengths), _concrete(cache.lengths)
    if ids is not None:
        check_token_ids(ids, model.cfg.vocab_size)
    if n is not None and held is not None:
        if np.any(n < 0) or np.any(n > T):
            raise ValueError(f"lengths must lie in [0, {T}] (the padded prompt width), got {n}")
        _check_fits(cache, n, "prefill")
    out = model(jnp.asarray(tokens, jnp.int32), cache=cache, n_valid=jnp.asarray(lengths, jnp.int32))
    return out.logits, out.cache


# ----------------------------------------------------------------------------------------------------
# Sampling


class Sampling(NamedTuple):
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    def validate(self, vocab_size: int) -> "Sampling":
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (isinstance(self.top_k, int) and 0 <= self.top_k <= vocab_size):
            raise ValueError(f"top_k must be an integer in [0, {vocab_size}], got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        return self

    def as_arrays(self) -> "Sampling":
        """The parameters as device scalars: jitted steps take them traced (no recompile per setting)."""
        return Sampling(jnp.float32(self.temperature), jnp.int32(self.top_k), jnp.float32(self.top_p))


def sampling_logprobs(logits: jax.Array, params: Sampling) -> jax.Array:
    """Log-probabilities [..., V] of the sampling distribution: logits / temperature, then top-k and
    top-p (nucleus: the smallest set of most likely tokens whose mass reaches top_p) masks.
    The parameters may be traced scalars (one compiled step serves every setting); temperature > 0."""
    logits = logits.astype(jnp.float32) / params.temperature
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]  # descending
    V = logits.shape[-1]
    k = jnp.where(params.top_k > 0, params.top_k, V)
    kth = jnp.take(sorted_logits, jnp.clip(k - 1, 0, V - 1), axis=-1)[..., None]
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
    sorted_logits = jnp.where(jnp.arange(V) < k, sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted token
    cutoff = jnp.min(jnp.where(before < params.top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.nn.log_softmax(logits, axis=-1)


def sample(logits: jax.Array, keys: jax.Array, params: Sampling) -> jax.Array:
    """logits [B, V], keys [B] (one PRNG key per row) -> tokens [B] int32. Greedy when temperature is 0.
    Parameters may be traced."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if isinstance(params.temperature, (int, float)) and params.temperature == 0:
        return greedy
    hot = Sampling(jnp.maximum(params.temperature, 1e-6), params.top_k, params.top_p)
    logp = sampling_logprobs(logits, hot)
    drawn = jax.vmap(lambda k, lp: jax.random.categorical(k, lp))(keys, logp).astype(jnp.int32)
    return jnp.where(params.temperature == 0, greedy, drawn)


def row_keys(seed, rows: int, position: jax.Array) -> jax.Array:
    """One key per row and position [B] of the token drawn: a row's draws do not depend on its batch mates."""
    base = jax.random.key(seed)
    return jax.vmap(lambda r, t: jax.random.fold_in(jax.random.fold_in(base, r), t))(jnp.arange(rows), position)


def speculative_tokens(logits: jax.Array, candidate: jax.Array, positions: jax.Array, seed,
                       params: Sampling) -> tuple[jax.Array, jax.Array]:
    """Speculative sampling against drafts that are point masses (each draft its drafter's argmax).
    logits [B, 1+k, V]: the main model's logits at the candidate's positions; candidate [B, 1+k]: the
    last emitted token, then k drafts; positions [B]: the position of candidate[:, 1], the first token
    decided. -> (stands [B, k] bool: draft i+1 stands given those before it; emitted [B, 1+k]: the
    token the main model emits at each decided position when every draft before it stood).

    Draft d at position i stands with probability p_i(d), the sampling distribution of logits[:, i]
    (`sampling_logprobs`); a rejected draft is replaced by a draw from p_i without d, renormalised; past
    the last draft a draw from p_k. So each emitted token is distributed as p_i (the rejection rule of
    speculative sampling for a point-mass proposal), whatever the drafts. Row b's draws at position t
    are keyed by (seed, b, t), as `sample`'s. Temperature 0: p_i is the argmax, drafts stand where they
    equal it and every emitted token is the argmax. Parameters may be traced."""
    drafts = candidate[:, 1:]  # [B, k]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, 1+k]
    if isinstance(params.temperature, (int, float)) and params.temperature == 0:
        return greedy[:, :-1] == drafts, greedy
    B, K1, V = logits.shape
    logp = sampling_logprobs(logits, Sampling(jnp.maximum(params.temperature, 1e-6), params.top_k, params.top_p))
    keys = jax.vmap(lambda t: row_keys(seed, B, positions + t), out_axes=1)(jnp.arange(K1))  # [B, 1+k]
    fold = lambda stream: jax.vmap(jax.vmap(lambda key: jax.random.fold_in(key, stream)))(keys)  # noqa: E731
    u = jax.vmap(jax.vmap(jax.random.uniform))(fold(1)[:, :-1])  # [B, k]
    p_draft = jnp.exp(jnp.take_along_axis(logp[:, :-1], drafts[..., None], axis=-1)[..., 0])  # [B, k]
    without = jnp.where(jax.nn.one_hot(drafts, V, dtype=bool), -jnp.inf, logp[:, :-1])  # [B, k, V]
    residual = jax.vmap(jax.vmap(jax.random.categorical))(fold(2)[:, :-1], without).astype(jnp.int32)
    last = jax.vmap(jax.random.categorical)(keys[:, -1], logp[:, -1]).astype(jnp.int32)  # [B]
    stands = u < p_draft
    emitted = jnp.concatenate([jnp.where(stands, drafts, residual), last[:, None]], axis=1)
    hot = params.temperature > 0
    return jnp.where(hot, stands, greedy[:, :-1] == drafts), jnp.where(hot, emitted, greedy)


# ----------------------------------------------------------------------------------------------------
# Generation


class GenerationStats(NamedTuple):
    prompt_tokens: int
    generated_tokens: int
    prefill_s: float
    decode_s: float
    steps: int  # decode calls of the main model after the prefill
    drafted: int  # speculative: drafts verified
    accepted: int  # speculative: drafts accepted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class Generation(NamedTuple):
    tokens: list[list[int]]  # generated ids per prompt (a stop token, when hit, is the last one)
    stats: GenerationStats


class GenerationSteps(NamedTuple):
    """The jitted steps a Generator runs (cache = argument 1, donated), built from a model's graphdef:
    the same functions the dry run compiles for TPU topologies (`benchmarks/dryrun.py`)."""

    prefill: Callable  # (state, cache, tokens [B, T], n_valid [B]) -> (logits [B, V] at n_valid - 1, streams, cache)
    step: Callable  # (state, cache, pending [B], positions [B], seed, Sampling) -> (next [B], logits [B, V], cache)
    prefill_slot: Callable  # (state, cache, slot, tokens [1, T], n [1], seed, Sampling) -> (first [1], cache)
    serve_step: Callable  # (state, cache, pending [B], active [B], seed, Sampling) -> (next [B], cache)
    mtp_prefill: Callable  # (state, cache, streams, next_tokens, n_valid) -> (draft [B], cache)
    spec_step: Callable  # (state, cache, pending, draft, seed, Sampling) -> (target, accept, draft, logits, cache)


def generation_steps(gd, mesh: jax.sharding.Mesh | None = None, rules=None) -> GenerationSteps:
    """Every generation step, jitted for one device or (mesh and rules) traced under the rules with the
    returned cache kept in its layout and every other output replicated."""

    def _prefill(state, cache, tokens, n_valid):
        # returns each row's logits at its last token of this chunk (the next-token logits when the
        # prompt ends here), not [B, T, V]: at 8K-token chunks those would be GBs per device
        out = nnx.merge(gd, state)(tokens, cache=cache, n_valid=n_valid)
        last = jnp.take_along_axis(out.logits, jnp.maximum(n_valid - 1, 0)[:, None, None], axis=1)[:, 0]
        return last, out.streams, out.cache

    def _step(state, cache, pending, step, seed, params):
        out = nnx.merge(gd, state)(pending[:, None], cache=cache)
        logits = constrain(out.logits[:, 0], ("batch", None))  # [B, V]: each device draws its own rows
        nxt = sample(logits, row_keys(seed, pending.shape[0], step), params)
        return nxt, logits, out.cache

    def _mtp_prefill(state, cache, streams, next_tokens, n_valid):
        logits, cache = nnx.merge(gd, state).draft(cache, streams, next_tokens, n_valid)
        return jnp.take_along_axis(jnp.argmax(logits, -1), (n_valid - 1)[:, None], 1)[:, 0].astype(jnp.int32), cache

    def _spec_step(state, cache, pending, draft, seed, params):
        model = nnx.merge(gd, state)
        candidate = jnp.stack([pending, draft], 1)
        out = model(candidate, cache=cache)
        # [B, 2]: the tokens at p+1 (the draft if it stands) and p+2; greedy: the argmax
        stands, target = speculative_tokens(out.logits, candidate, cache.lengths + 1, seed, params)
        accept = stands[:, 0]
        n_acc = 1 + accept.astype(jnp.int32)
        cache = out.cache.replace(lengths=cache.lengths + n_acc)  # rollback = not advancing
        logits, cache = model.draft(cache, out.streams, target, n_acc)
        new_draft = jnp.take_along_axis(jnp.argmax(logits, -1), (n_acc - 1)[:, None], 1)[:, 0]
        return target, accept, new_draft.astype(jnp.int32), out.logits, cache

    def _prefill_slot(state, cache, slot, tokens, n, seed, params):
        # a new sequence in row `slot`: emptied, its prompt fed through the model at batch 1, its
        # first token drawn as row 0 of a batch of one would draw it
        row = reset_rows(cache_rows(cache, slot), jnp.ones((1,), bool))
        out = nnx.merge(gd, state)(tokens, cache=row, n_valid=n)
        logits = jnp.take_along_axis(out.logits, (n - 1)[:, None, None], axis=1)[:, 0]  # [1, V]
        return sample(logits, row_keys(seed, 1, n), params), put_cache_rows(cache, out.cache, slot)

    def _serve_step(state, cache, pending, active, seed, params):
        # every slot decodes one token; idle slots (active False) neither advance nor write. Row b's
        # draw is keyed by its own position, as row 0 of a batch of one (a prompt's tokens do not
        # depend on its slot or its batch mates)
        out = nnx.merge(gd, state)(pending[:, None], cache=cache, n_valid=active.astype(jnp.int32))
        keys = jax.vmap(lambda t: row_keys(seed, 1, t[None])[0])(cache.lengths + 1)
        return sample(constrain(out.logits[:, 0], ("batch", None)), keys, params), out.cache

    def jit(fn, per_row: tuple[int, ...] = ()):
        """per_row: outputs that stay split over the batch axes (streams, per-position logits: read
        only by the next step or by tests); every other output is replicated, for the host to read."""
        if mesh is None:
            return jax.jit(fn, donate_argnums=1)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

        def placed(*args):
            with use_mesh_rules(mesh, rules):
                out = fn(*args)
                return tuple(jax.lax.with_sharding_constraint(o, cache_shardings(o, mesh, rules)) if isinstance(o, Cache)
                             else constrain(o, ("batch",) + (None,) * (o.ndim - 1)) if i in per_row and o is not None
                             else jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, replicated), o)
                             for i, o in enumerate(out))

        return jax.jit(placed, donate_argnums=1, compiler_options=compiler_options(mesh))

    return GenerationSteps(jit(_prefill, per_row=(1,)), jit(_step, per_row=(1,)), jit(_prefill_slot), jit(_serve_step),
                           jit(_mtp_prefill), jit(_spec_step, per_row=(3,)))


class Generator:
    """Batched generation with jitted, cache-donating steps; build once per model and reuse.

    >>> gen = Generator(model)                       # one device
    >>> gen = Generator(model, mesh=mesh, rules=rules)  # over a mesh (sharding.mesh / sharding.rules)
    >>> out = gen.generate([[1, 2, 3], [4, 5]], max_new_tokens=16)
    >>> for step in gen.stream(prompts, max_new_tokens=16): print(step)   # {row: [new ids]}

    Over a mesh the parameters and the cache are laid out by the rules table (the batch over the data
    axes, heads over `tensor`, experts over `expert` with the expert-parallel exchange, compressed
    entries over `context` under `long_context`), the steps are traced under the rules so the model's
    constraints apply, and tokens and logits come back replicated: every process of a multi-host job
    runs the same command and sees the same tokens.
    """

    def __init__(self, model, mesh: jax.sharding.Mesh | None = None, rules=None):
        if (mesh is None) != (rules is None):
            raise ValueError("Generator needs both a mesh and a rules table, or neither")
        self.mesh, self.rules = mesh, rules
        if mesh is not None:
            model = shard_module(model, mesh, rules)  # ShardingError naming a parameter the mesh cannot split
        self.model, self.cfg = model, model.cfg
        self.graphdef, self.state = nnx.split(model)
        for name, fn in generation_steps(self.graphdef, mesh, rules)._asdict().items():
            setattr(self, f"_{name}", fn)

    def _put(self, x):
        """A host value as a device array: replicated over the mesh (every process passes the same)."""
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(np.asarray(x), jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))

    def new_cache(self, batch: int, max_len: int) -> Cache:
        """An empty cache for this model (its dtype and numerics), laid out on the mesh by the rules."""
        opts = self.model.options

        def make():
            return init_cache(self.cfg, batch, max_len, opts.dtype, numerics=opts.numerics)

        if self.mesh is None:
            return make()
        return jax.jit(make, out_shardings=cache_shardings(jax.eval_shape(make), self.mesh, self.rules))()

    def stream(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, sampling: Sampling = Sampling(),
               stop_tokens: Sequence[int] = (), seed: int = 0, speculative: bool = False,
               prefill_chunk: int | None = None, max_len: int | None = None, stats: list | None = None
               ) -> Iterator[dict[int, list[int]]]:
        """Yield {row: [new token ids]} after the prefill and after every step, until every row has hit a
        stop token or max_new_tokens. `stats` (a list) receives the GenerationStats at the end."""
        cfg = self.cfg
        sampling = Sampling(*sampling).validate(cfg.vocab_size)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        rows = [check_token_ids(p, cfg.vocab_size) for p in prompts]
        check_token_ids(list(stop_tokens), cfg.vocab_size)
        if speculative:
            if self.model.mtp is None:
                raise ValueError("--speculative needs an MTP block; this model has none (n_mtp_layers = 0)")
        B = len(rows)
        lengths = np.array([len(r) for r in rows], np.int32)
        if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
            raise ValueError(f"prefill_chunk must be a positive integer, got {prefill_chunk!r}")
        need = int(lengths.max()) + max_new_tokens + (1 if speculative else 0)  # verify writes one ahead
        max_len = max_len or min(need, cfg.max_seq_len)
        if need > max_len:
            raise ValueError(f"prompt of {int(lengths.max())} tokens + max_new_tokens {max_new_tokens} needs "
                             f"{need} cache positions, more than max_len {max_len} (model max_seq_len "
                             f"{cfg.max_seq_len})")
        chunk = prefill_chunk or int(lengths.max())
        if speculative and chunk < lengths.max():
            raise ValueError("speculative decoding runs the prompt in one prefill (prefill_chunk unsupported)")
        T = -(-int(lengths.max()) // chunk) * chunk  # whole chunks: one compiled prefill shape per chunk size
        padded = np.zeros((B, T), np.int32)
        for b, r in enumerate(rows):
            padded[b, :len(r)] = r
        cache = self.new_cache(B, max_len)  # with the MTP block's (small) cache whenever there is one: one shape

        t0 = time.perf_counter()
        last_logits = np.zeros((B, cfg.vocab_size), np.float32)
        for s in range(0, T, chunk):
            n_valid = np.clip(lengths - s, 0, chunk).astype(np.int32)
            logits, streams, cache = self._prefill(self.state, cache, self._put(padded[:, s:s + chunk]),
                                                   self._put(n_valid))
            logits = np.asarray(logits)  # [B, V] at each row's last token of this chunk
            for b in range(B):
                if s < lengths[b] <= s + chunk:
                    last_logits[b] = logits[b]
        traced = sampling.as_arrays()
        first = np.asarray(sample(jnp.asarray(last_logits), row_keys(seed, B, jnp.asarray(lengths)), traced))
        draft = None
        if speculative:
            nxt = np.concatenate([padded[:, 1:], np.zeros((B, 1), np.int32)], axis=1)
            nxt[np.arange(B), lengths - 1] = first
            draft, cache = self._mtp_prefill(self.state, cache, streams, self._put(nxt), self._put(lengths))
        prefill_s = time.perf_counter() - t0

        stop = set(int(t) for t in stop_tokens)
        produced = [[] for _ in range(B)]
        done = np.zeros(B, bool)

        def emit(b, toks):
            new = []
            for t in toks:
                if done[b]:
                    break
                produced[b].append(int(t))
                new.append(int(t))
                if int(t) in stop or len(produced[b]) >= max_new_tokens:
                    done[b] = True
            return new

        yield {b: emit(b, [first[b]]) for b in range(B)}
        t1 = time.perf_counter()
        steps = drafted = accepted = 0
        pending = self._put(first)
        params, seed_ = jax.tree.map(self._put, traced), self._put(np.int32(seed))
        while not done.all():
            steps += 1
            if speculative:
                target, acc, draft, _, cache = self._spec_step(self.state, cache, pending, draft, seed_, params)
                target, acc = np.asarray(target), np.asarray(acc)
                live = ~done
                drafted += int(live.sum())
                accepted += int((acc & live).sum())
                update = {b: emit(b, target[b, :1 + int(acc[b])]) for b in range(B) if live[b]}
                pending = self._put(np.where(acc, target[:, 1], target[:, 0]))
            else:
                pending, _, cache = self._step(self.state, cache, pending, self._put(lengths + steps), seed_,
                                               params)
                nxt = np.asarray(pending)
                update = {b: emit(b, [nxt[b]]) for b in range(B) if not done[b]}
            yield update
        decode_s = time.perf_counter() - t1
        if stats is not None:
            stats.append(GenerationStats(int(lengths.sum()), sum(map(len, produced)), prefill_s, decode_s, steps,
                                         drafted, accepted))

    def serve(self, prompts: Iterable[Sequence[int]], *, slots: int, max_new_tokens: int,
              sampling: Sampling = Sampling(), stop_tokens: Sequence[int] = (), seed: int = 0,
              max_len: int | None = None, stats: list | None = None) -> Iterator[tuple[int, list[int]]]:
        """Continuous batching: `slots` sequences decode together; when one finishes (a stop token or
        max_new_tokens) its slot takes the next waiting prompt, without recompiling (one compiled
        prefill-into-slot, one compiled decode step). Yields (prompt index, generated ids) as each
        prompt finishes. A prompt gets the tokens `generate([prompt], seed=seed, ...)` gives it alone.
        `max_len` (default the model's max_seq_len) bounds prompt + new tokens; prompts are padded to
        max_len - max_new_tokens (one prefill shape). `stats` (a list) receives one GenerationStats."""
        cfg = self.cfg
        sampling = Sampling(*sampling).validate(cfg.vocab_size)
        if not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots must be a positive integer, got {slots!r}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        check_token_ids(list(stop_tokens), cfg.vocab_size)
        max_len = max_len or cfg.max_seq_len
        width = max_len - max_new_tokens
        if width < 1:
            raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in max_len {max_len}")
        cache = self.new_cache(slots, max_len)
        params, seed_ = jax.tree.map(self._put, sampling.as_arrays()), self._put(np.int32(seed))
        stop = set(int(t) for t in stop_tokens)
        queue = enumerate(prompts)
        owner = [-1] * slots  # the prompt index each slot holds, -1 = idle
        produced: list[list[int]] = [[] for _ in range(slots)]
        pending = np.zeros(slots, np.int32)
        n_prompt = n_new = steps = 0
        t0 = time.perf_counter()

        def take(slot: int, tok: int) -> bool:  # True when the slot's prompt is finished
            nonlocal n_new
            produced[slot].append(tok)
            n_new += 1
            return tok in stop or len(produced[slot]) >= max_new_tokens

        def fill(slot: int):  # prefill waiting prompts into `slot` until one needs decoding
            nonlocal cache, n_prompt
            owner[slot] = -1
            for index, prompt in queue:
                ids = check_token_ids(prompt, cfg.vocab_size)
                if not 1 <= len(ids) <= width:
                    raise ValueError(f"prompt {index} has {len(ids)} tokens; allowed 1..{width} (max_len "
                                     f"{max_len} - max_new_tokens {max_new_tokens})")
                padded = np.zeros((1, width), np.int32)
                padded[0, :len(ids)] = ids
                first, cache = self._prefill_slot(self.state, cache, self._put(np.int32(slot)), self._put(padded),
                                                  self._put(np.array([len(ids)], np.int32)), seed_, params)
                n_prompt += len(ids)
                owner[slot], produced[slot], pending[slot] = index, [], int(np.asarray(first)[0])
                if not take(slot, int(pending[slot])):
                    return
                yield index, produced[slot]
                owner[slot] = -1

        for slot in range(slots):
            yield from fill(slot)
        while any(o >= 0 for o in owner):
            active = np.array([o >= 0 for o in owner])
            nxt, cache = self._serve_step(self.state, cache, self._put(pending), self._put(active), seed_, params)
            nxt, steps = np.asarray(nxt), steps + 1
            for slot in np.flatnonzero(active):
                pending[slot] = nxt[slot]
                if take(slot, int(nxt[slot])):
                    yield owner[slot], produced[slot]
                    yield from fill(slot)
        if stats is not None:
            stats.append(GenerationStats(n_prompt, n_new, 0.0, time.perf_counter() - t0, steps, 0, 0))

    def generate(self, prompts: Sequence[Sequence[int]], **kw) -> Generation:
        """All of `stream`, collected: generated ids per prompt and GenerationStats."""
        produced = [[] for _ in prompts]
        stats: list = []
        for update in self.stream(prompts, stats=stats, **kw):
            for b, toks in update.items():
                produced[b].extend(toks)
        return Generation(produced, stats[0])


def generate(model, prompts: Sequence[Sequence[int]], **kw) -> Generation:
    """One-off `Generator(model).generate(prompts, **kw)` (compiles the steps each call)."""
    return Generator(model).generate(prompts, **kw)
