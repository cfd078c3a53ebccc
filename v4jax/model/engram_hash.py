"""The Engram n-gram hash of DeepSeek-V4.1 (architecture.md §12): token ids -> rows of each Engram table.

Host-side preprocessing, like tokenisation: plain numpy in int64, exact. The hash multiplies compressed
ids by multipliers of up to ~2^46 (released sizes; bounded so the products stay below 2^63), XORs them
and reduces modulo primes near 1.6e7: that needs 64-bit integers, and JAX without `jax_enable_x64` has
none. The model only receives the resulting row ids (int32 suffices: tables have < 2^31 rows).

Data flow (architecture.md §12, Engram):

1. `engram_layout(cfg)`: per Engram layer, the hash multipliers (one per look-back), the primes (one per
   n-gram order and head: the bucket count of that (order, head)) and the row offset of each
   (order, head) inside the layer's single table.
2. `compressed_ids(tokens, token_map)`: raw token ids -> compressed (normalised-token) ids. The pad is
   itself a compressed id, `pad_compressed_id(cfg, token_map) = token_map[engram_pad_id]`.
3. `ngram_hash_ids(...)`: for each position t and look-back k = 0..max_ngram-1, the token at t-k, or the
   pad once the look-back has reached before the sequence start or a dead (image-span) position; the
   block latches, so every longer look-back is pad too. `p_k = id_{t-k} * mult[k]`; the running XOR of
   p_0..p_k is the hash of the (k+1)-gram, reduced modulo each head's prime and shifted by that
   (order, head)'s offset. A decode call carries the last max_ngram-1 ids of the history
   (`HashHistory`, `advance_history`), so hashing token by token equals one call over the sequence.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from v4jax.config import ConfigError
from v4jax.config_v41 import V41Config

_INT64_MAX = np.iinfo(np.int64).max
_RNG_SEED_STRIDE = 10007  # multipliers of Engram layer `layer_id` come from default_rng(10007 * layer_id)
# Miller-Rabin with these bases is deterministic for every n < 3.3e24 (far above any table size)
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)


def is_prime(n: int) -> bool:
    """Deterministic primality test for n < 3.3e24 (Miller-Rabin with the first 13 prime bases)."""
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _next_unseen_prime(after: int, seen: set[int]) -> int:
    """The smallest prime above `after` not in `seen`."""
    n = after + 1
    while n in seen or not is_prime(n):
        n += 1
    return n


# --------------------------------------------------------------------------------------------------
# 1. Layout: multipliers, primes, offsets (from the config alone)
class EngramLayout(NamedTuple):
    """The hash constants of every Engram layer, in `cfg.engram_layer_ids` order (int64)."""

    layer_ids: tuple[int, ...]  # backbone layer of each Engram layer
    primes: np.ndarray  # [n_engram_layers, n_orders, n_heads]: bucket count per (n-gram order, head)
    offsets: np.ndarray  # [n_engram_layers, n_orders * n_heads]: first row of each (order, head)
    multipliers: np.ndarray  # [n_engram_layers, max_ngram]: odd, one per look-back 0..max_ngram-1

    @property
    def max_ngram(self) -> int:
        return self.multipliers.shape[1]

    @property
    def n_cols(self) -> int:
        """Row ids per token and layer: n_orders * n_heads, order-major then head."""
        return self.offsets.shape[1]


def hash_multipliers(layer_id: int, max_ngram: int, compressed_vocab_size: int) -> np.ndarray:
    """[max_ngram] odd int64 multipliers of one Engram layer. The bound keeps id * multiplier below
    2^63 for every compressed id < compressed_vocab_size, so the products never overflow."""
    bound = max(1, (_INT64_MAX // compressed_vocab_size) // 2)
    rng = np.random.default_rng(_RNG_SEED_STRIDE * layer_id)
    return rng.integers(0, bound, size=max_ngram, dtype=np.int64) * 2 + 1


def engram_layout(cfg: V41Config) -> EngramLayout:
    """The hash constants of `cfg` (architecture.md §12). Primes: for each Engram layer, then each
    order 2..max_ngram, the search restarts at engram_vocab_size-1 and takes, once per head, the next
    prime not handed out before anywhere (one seen set over all layers and orders). A layer's primes
    must sum to its `engram_num_embeddings` (its table's rows); else ConfigError."""
    n_orders, n_heads, max_ngram = cfg.engram_max_ngram_size - 1, cfg.engram_n_heads, cfg.engram_max_ngram_size
    seen: set[int] = set()
    primes = np.zeros((len(cfg.engram_layer_ids), n_orders, n_heads), np.int64)
    for i in range(len(cfg.engram_layer_ids)):
        for o in range(n_orders):
            current = cfg.engram_vocab_size - 1
            for h in range(n_heads):
                current = _next_unseen_prime(current, seen)
                seen.add(current)
                primes[i, o, h] = current
    for i, (layer_id, rows) in enumerate(zip(cfg.engram_layer_ids, cfg.engram_num_embeddings)):
        total = int(primes[i].sum())
        if total != rows:
            raise ConfigError(
                f"engram_num_embeddings[{i}] (Engram layer {layer_id}) is {rows}, but that layer's hash primes "
                f"sum to {total}: the table needs exactly one row per bucket (engram_vocab_size "
                f"{cfg.engram_vocab_size}, {n_orders} orders x {n_heads} heads)")
    flat = primes.reshape(len(cfg.engram_layer_ids), n_orders * n_heads)  # order-major, then head
    offsets = np.cumsum(flat, axis=1) - flat  # exclusive cumsum within each layer
    multipliers = np.zeros((len(cfg.engram_layer_ids), max_ngram), np.int64)
    for i, layer_id in enumerate(cfg.engram_layer_ids):
        multipliers[i] = hash_multipliers(layer_id, max_ngram, cfg.engram_compressed_vocab_size)
    return EngramLayout(tuple(cfg.engram_layer_ids), primes, offsets.astype(np.int64), multipliers)


# --------------------------------------------------------------------------------------------------
# 2. Compressed ids (the tokenizer's normalised-token map; a model input like the tokenizer itself)
def token_map_from_tokenizer(backend, vocab_size: int | None = None) -> np.ndarray:
    """The compressed token map (raw id -> compressed id, int64 [V]) rebuilt from a tokenizer, as the
    release derives it (architecture.md §12.4): each id decoded alone (`backend.decode([i],
    skip_special_tokens=False)`, no clean-up), normalised by NFKC, NFD, accent stripping, lowercasing,
    whitespace runs to one space, a lone space kept, outer spaces stripped; a decode holding U+FFFD is
    keyed by its raw token string instead, an empty normalisation by the decoded text; compressed ids
    in first-seen order. `backend`: a `tokenizers.Tokenizer` (or anything with its `decode`,
    `id_to_token` and `get_vocab_size`). On the V4.1 tokenizer this gives 99,092 ids."""
    from tokenizers import Regex, normalizers

    keep = "\ue000"  # a private-use character: a lone-space token must not strip to ""
    normalizer = normalizers.Sequence([
        normalizers.NFKC(), normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[ \t\r\n]+"), " "), normalizers.Replace(Regex(r"^ $"), keep),
        normalizers.Strip(), normalizers.Replace(keep, " ")])
    n = backend.get_vocab_size(with_added_tokens=True) if vocab_size is None else vocab_size
    ids: dict[str, int] = {}
    out = np.zeros(n, np.int64)
    for i in range(n):
        text = backend.decode([i], skip_special_tokens=False)
        if "\ufffd" in text:
            key = backend.id_to_token(i)
        else:
            key = normalizer.normalize_str(text) or text
        out[i] = ids.setdefault(key, len(ids))
    return out


def compressed_ids(tokens: np.ndarray, token_map: np.ndarray) -> np.ndarray:
    """tokens: int [...] raw ids -> int64 [...] compressed ids (token_map: [vocab] int)."""
    tokens = np.asarray(tokens)
    token_map = np.asarray(token_map, np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= token_map.shape[0]):
        raise ValueError(f"token ids must lie in [0, {token_map.shape[0]}), got {tokens.min()}..{tokens.max()}")
    return np.take(token_map, tokens)


def pad_compressed_id(cfg: V41Config, token_map: np.ndarray) -> int:
    """The Engram pad: the compressed id of the raw `engram_pad_id`, not the raw id. Checks that the map
    has `engram_compressed_vocab_size` distinct ids 0..n-1 (the multipliers derive from that size)."""
    token_map = np.asarray(token_map)
    n = int(token_map.max()) + 1 if token_map.size else 0
    if token_map.min(initial=0) < 0 or n != cfg.engram_compressed_vocab_size or np.unique(token_map).size != n:
        raise ConfigError(f"engram_compressed_vocab_size is {cfg.engram_compressed_vocab_size}, but the token map "
                          f"holds {np.unique(token_map).size} distinct ids in 0..{n - 1}")
    if cfg.engram_pad_id >= token_map.shape[0]:
        raise ConfigError(f"engram_pad_id {cfg.engram_pad_id} is outside the token map ({token_map.shape[0]} ids)")
    return int(token_map[cfg.engram_pad_id])


# --------------------------------------------------------------------------------------------------
# 3. History carried from one hashing call to the next (decode)
class HashHistory(NamedTuple):
    """The tail of what was hashed before, per row: right-aligned (the last column is the token just
    before the next call). Columns for positions before the sequence start hold anything: `length`
    marks them (the sequence-start rule needs the absolute position)."""

    ids: np.ndarray  # [B, max_ngram-1] int64 compressed ids
    dead: np.ndarray  # [B, max_ngram-1] bool: image-span positions
    length: np.ndarray  # [B] int64: tokens hashed so far (the position of the next token)


def empty_history(batch: int, layout: EngramLayout) -> HashHistory:
    """The history at the sequence start: nothing before position 0."""
    h = layout.max_ngram - 1
    return HashHistory(np.zeros((batch, h), np.int64), np.zeros((batch, h), bool), np.zeros(batch, np.int64))


def advance_history(history: HashHistory, ids: np.ndarray, dead: np.ndarray | None = None,
                    n_valid: np.ndarray | None = None) -> HashHistory:
    """The history after hashing `ids` ([B, T] compressed, `dead` [B, T] bool) with `history`; n_valid
    [B]: only each row's first n_valid tokens are its own (a right-padded batch; default all T)."""
    ids = np.asarray(ids, np.int64)
    dead = np.zeros(ids.shape, bool) if dead is None else np.asarray(dead, bool)
    b, t = ids.shape
    n = np.full(b, t, np.int64) if n_valid is None else np.asarray(n_valid, np.int64)
    h = history.ids.shape[1]  # keep each row's last max_ngram-1 columns of history ++ its valid tokens
    cols = n[:, None] + np.arange(h)  # [B, h]: in history ++ call, the h columns before column h + n
    take = lambda a: np.take_along_axis(a, cols, axis=1)  # noqa: E731
    return HashHistory(take(np.concatenate([history.ids, ids], axis=1)),
                       take(np.concatenate([history.dead, dead], axis=1)), history.length + n)


# --------------------------------------------------------------------------------------------------
# 4. The hash
def ngram_hash_ids(ids: np.ndarray, dead: np.ndarray | None, layout: EngramLayout, engram_index: int,
                   pad_id: int, history: HashHistory | None = None) -> np.ndarray:
    """Row ids into Engram layer `engram_index`'s table (its position in `cfg.engram_layer_ids`).

    ids: [B, T] compressed ids; dead: [B, T] bool, True on image-span positions (None: none); pad_id:
    the compressed pad; history: what came before (None: the sequence starts here).
    Returns int64 [B, T, n_orders * n_heads], order-major then head, the layer's offsets added.
    A dead position hashes as all pad (its look-back 0 is already blocked); the model gates it off.
    """
    ids = np.asarray(ids, np.int64)
    if ids.ndim != 2:
        raise ValueError(f"ids must be [B, T], got shape {ids.shape}")
    dead = np.zeros(ids.shape, bool) if dead is None else np.asarray(dead, bool)
    if dead.shape != ids.shape:
        raise ValueError(f"dead {dead.shape} must have the shape of ids {ids.shape}")
    b, t = ids.shape
    mult = layout.multipliers[engram_index]  # [K]  (K = max_ngram)
    k_max = mult.shape[0]
    hist = empty_history(b, layout) if history is None else history
    if hist.ids.shape != (b, k_max - 1) or hist.dead.shape != (b, k_max - 1) or np.shape(hist.length) != (b,):
        raise ValueError(f"history must hold [{b}, {k_max - 1}] ids and dead flags and [{b}] lengths")
    limit = _INT64_MAX // int(mult.max())  # ids above this would overflow id * multiplier
    if t and (ids.min() < 0 or ids.max() > limit):
        raise ValueError(f"compressed ids must lie in [0, {limit}], got {ids.min()}..{ids.max()}")
    if not 0 <= pad_id <= limit:
        raise ValueError(f"pad_id {pad_id} is outside [0, {limit}]")

    # look-back k of call position j reads column (k_max-1) + j - k of history ++ call
    all_ids = np.concatenate([hist.ids.astype(np.int64), ids], axis=1)  # [B, K-1+T]
    all_dead = np.concatenate([hist.dead.astype(bool), dead], axis=1)  # [B, K-1+T]
    pos = np.asarray(hist.length, np.int64)[:, None] + np.arange(t)  # [B, T] absolute positions
    blocked = np.zeros((b, t), bool)
    tokens = np.empty((b, t, k_max), np.int64)  # [B, T, K]: id at t-k, or the pad
    for k in range(k_max):  # latch: once blocked, every longer look-back stays blocked
        src = slice(k_max - 1 - k, k_max - 1 - k + t)
        blocked |= (pos < k) | all_dead[:, src]
        tokens[..., k] = np.where(blocked, pad_id, all_ids[:, src])

    rolling = np.bitwise_xor.accumulate(tokens * mult, axis=-1)  # [B, T, K]: hash of the (k+1)-gram
    primes = layout.primes[engram_index]  # [n_orders, n_heads]
    hashes = rolling[..., 1:, None] % primes  # [B, T, n_orders, n_heads]: orders 2..K
    return hashes.reshape(b, t, layout.n_cols) + layout.offsets[engram_index]
