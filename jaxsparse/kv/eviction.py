"""KV eviction: the cache itself shrinks to a per-head budget (StreamingLLM, H2O, A2SF, SnapKV).

An :class:`EvictedKVCache` holds ``budget`` slots per sequence and kv head — real memory, not masked
dummies — with each slot's original token position. Policies are pure functions of the cache and
their own scores: they choose which slot a new token overwrites (or, for SnapKV, which prompt
tokens survive prefill). Formulas: REFERENCES (Attention: eviction).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from jaxsparse.ops.decode_attention.reference import attend


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EvictedKVCache:
    """A fixed-budget cache per sequence and kv head.

    Attributes:
      keys, values: ``[B, K, budget, D]``.
      positions: int32 ``[B, K, budget]``: the token position held by each slot, -1 when empty.
      scores: float32 ``[B, K, budget]``: the policy's importance of each slot (accumulated
        attention for H2O / A2SF; unused by StreamingLLM).
      lengths: int32 ``[B]``: tokens seen so far (the next token's position).
    """

    keys: jax.Array
    values: jax.Array
    positions: jax.Array
    scores: jax.Array
    lengths: jax.Array

    @classmethod
    def create(cls, batch: int, budget: int, kv_heads: int, head_dim: int, dtype=jnp.float32) -> "EvictedKVCache":
        """An empty cache of ``budget`` slots per head.

        Raises:
          ValueError: a non-positive size (``budget <= 0`` included).
        """
        for name, value in (("batch", batch), ("budget", budget), ("kv_heads", kv_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        shape = (batch, kv_heads, budget)
        return cls(keys=jnp.zeros((*shape, head_dim), dtype), values=jnp.zeros((*shape, head_dim), dtype),
                   positions=jnp.full(shape, -1, jnp.int32), scores=jnp.zeros(shape, jnp.float32),
                   lengths=jnp.zeros(batch, jnp.int32))

    @property
    def budget(self) -> int:
        return self.keys.shape[2]

    def nbytes(self) -> int:
        """Bytes held by keys and values (the memory the budget saves)."""
        return self.keys.nbytes + self.values.nbytes

    def _write(self, slot, keys, values, score) -> "EvictedKVCache":
        """Writes one new token (``keys, values [B, K, D]``) into ``slot [B, K]`` of every head."""
        b = jnp.arange(self.keys.shape[0])[:, None]
        h = jnp.arange(self.keys.shape[1])[None, :]
        position = jnp.broadcast_to(self.lengths[:, None], slot.shape)
        return EvictedKVCache(
            keys=self.keys.at[b, h, slot].set(keys.astype(self.keys.dtype)),
            values=self.values.at[b, h, slot].set(values.astype(self.values.dtype)),
            positions=self.positions.at[b, h, slot].set(position),
            scores=self.scores.at[b, h, slot].set(score),
            lengths=self.lengths + 1,
        )


def _empty_or(victim, cache: EvictedKVCache):
    """The first empty slot if any, else ``victim [B, K]``."""
    empty = cache.positions < 0
    return jnp.where(jnp.any(empty, axis=-1), jnp.argmax(empty, axis=-1), victim).astype(jnp.int32)


def streaming_llm_append(cache: EvictedKVCache, keys, values, *, sinks: int) -> EvictedKVCache:
    """StreamingLLM (Xiao et al. 2024): keep the first ``sinks`` tokens and the most recent ones.

    A full cache overwrites its oldest non-sink token. ``keys, values``: one new token ``[B, K, D]``.

    Raises:
      ValueError: ``sinks`` outside ``[0, budget)``.
    """
    if isinstance(sinks, bool) or not isinstance(sinks, int) or not 0 <= sinks < cache.budget:
        raise ValueError(f"sinks must be an int in [0, {cache.budget}) (budget), got {sinks!r}")
    evictable = cache.positions >= sinks
    oldest = jnp.argmin(jnp.where(evictable, cache.positions, jnp.iinfo(jnp.int32).max), axis=-1)
    return cache._write(_empty_or(oldest, cache), keys, values, 0.0)


def heavy_hitter_append(cache: EvictedKVCache, keys, values, attention, *, recent: int, decay: float = 1.0):
    """H2O (Zhang et al. 2023; ``decay = 1``) and A2SF (``decay = lambda < 1``): keep the recent
    tokens and the heavy hitters by accumulated attention.

    First ``scores = decay * scores + attention`` (the current query's attention to each slot),
    then a full cache overwrites the slot of lowest score among those older than the ``recent``
    newest tokens. The new token starts with score 0.

    Args:
      attention: float32 ``[B, K, budget]``, this step's attention weights of the slots (summed over
        the kv head's query heads), e.g. from :func:`evicted_decode_attention`.
      recent: newest tokens never evicted, in ``[0, budget)``.

    Raises:
      ValueError: ``recent`` out of range or ``decay`` outside ``(0, 1]``.
    """
    if isinstance(recent, bool) or not isinstance(recent, int) or not 0 <= recent < cache.budget:
        raise ValueError(f"recent must be an int in [0, {cache.budget}) (budget), got {recent!r}")
    if not 0 < decay <= 1:
        raise ValueError(f"decay must be in (0, 1], got {decay!r}")
    scores = decay * cache.scores + jnp.where(cache.positions >= 0, attention, 0.0)
    protected = cache.positions >= (cache.lengths[:, None, None] - recent)
    victim = jnp.argmin(jnp.where(protected | (cache.positions < 0), jnp.inf, scores), axis=-1)
    return dataclasses.replace(cache, scores=scores)._write(_empty_or(victim, cache), keys, values, 0.0)


def snapkv_prefill(keys, values, queries, budget: int, *, window: int = 32, pool: int = 7) -> EvictedKVCache:
    """SnapKV (Li et al. 2024): at the end of prefill, keep per kv head the prompt tokens that the
    last ``window`` prompt queries attend to most (scores max-pooled over ``pool`` neighbours), plus
    the window itself.

    Args:
      keys, values: the prompt's ``[B, T, K, D]`` (all sequences of length T).
      queries: the prompt's queries ``[B, T, H, D]``.
      budget: slots per head, in ``[window, T]``; ``window`` of them hold the observation window.
      window: the last prompt queries that vote (and the prompt tokens always kept).
      pool: width of the max-pooling of the votes (keeps neighbours of important tokens).

    Raises:
      ValueError: ``budget`` outside ``[window, T]``, ``window`` outside ``[1, T]``.
    """
    batch, length, kv_heads, dim = keys.shape
    heads = queries.shape[2]
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= length:
        raise ValueError(f"window must be an int in [1, {length}] (prompt length), got {window!r}")
    if isinstance(budget, bool) or not isinstance(budget, int) or not window <= budget <= length:
        raise ValueError(f"budget must be an int in [window={window}, {length}] (prompt length), got {budget!r}")
    k = jnp.swapaxes(keys, 1, 2).astype(jnp.float32)  # [B, K, T, D]
    q = queries[:, -window:].reshape(batch, window, kv_heads, heads // kv_heads, dim).astype(jnp.float32)
    logits = jnp.einsum("bwkgd,bktd->bkgwt", q, k) * dim**-0.5
    query_position = length - window + jnp.arange(window)
    logits = jnp.where(jnp.arange(length) <= query_position[:, None], logits, -jnp.inf)
    votes = jnp.sum(jax.nn.softmax(logits, axis=-1), axis=(2, 3))[..., : length - window]  # [B, K, T - w]
    pooled = lax.reduce_window(votes, -jnp.inf, lax.max, (1, 1, pool), (1, 1, 1), "SAME")
    _, chosen = lax.top_k(pooled, budget - window)
    kept = jnp.concatenate([jnp.sort(chosen, axis=-1), jnp.broadcast_to(jnp.arange(length - window, length),
                                                                        (batch, kv_heads, window))], axis=-1)
    gather = lambda store: jnp.take_along_axis(jnp.swapaxes(store, 1, 2), kept[..., None], axis=2)  # noqa: E731
    return EvictedKVCache(keys=gather(keys), values=gather(values), positions=kept.astype(jnp.int32),
                          scores=jnp.zeros(kept.shape, jnp.float32), lengths=jnp.full(batch, length, jnp.int32))


def evicted_decode_attention(q, cache: EvictedKVCache, *, scale: float | None = None, softcap: float | None = None):
    """One new query per sequence (``q [B, 1, H, D]``) over the kept slots of an evicted cache.

    Returns:
      ``(o [B, 1, H, D] in q's dtype, attention [B, K, budget] float32)``: the slots' attention
      weights summed over each kv head's query heads, for :func:`heavy_hitter_append`.
    """
    batch, queries, heads, dim = q.shape
    if queries != 1:
        raise ValueError(f"evicted_decode_attention takes one query per sequence, got Tq = {queries}")
    kv_heads = cache.keys.shape[1]
    scale = dim**-0.5 if scale is None else scale
    grouped = q.reshape(batch, 1, kv_heads, heads // kv_heads, dim).transpose(0, 2, 3, 1, 4)  # [B, K, G, 1, D]
    visible = (cache.positions >= 0)[:, :, None, None, :]
    out, _, probabilities = attend(grouped, cache.keys, cache.values, visible, scale=scale, softcap=softcap)
    attention = jnp.sum(probabilities, axis=(2, 3))
    return out.transpose(0, 3, 1, 2, 4).reshape(q.shape).astype(q.dtype), attention


def attend_and_append(q, cache: EvictedKVCache, keys, values, append, *, scale: float | None = None,
                      softcap: float | None = None):
    """One decode step under an eviction policy that ranks slots by attention (H2O, A2SF).

    The new query attends to the kept slots and to its own token, then ``append`` gets the slots'
    share of that attention, accumulates it and makes room for the token (the token that leaves is
    still seen by this query, as in H2O, where eviction follows the step's attention).

    Args:
      q: ``[B, 1, H, D]``; keys, values: the new token's ``[B, K, D]``.
      append: ``append(cache, keys, values, attention [B, K, budget]) -> cache``, e.g.
        ``functools.partial(heavy_hitter_append, recent=16)``.

    Returns:
      ``(o [B, 1, H, D] in q's dtype, the updated cache)``.
    """
    batch, kv_heads = cache.keys.shape[:2]
    new = lambda array, fill: jnp.concatenate([array, fill], axis=2)  # noqa: E731  (one more slot)
    with_token = EvictedKVCache(
        keys=new(cache.keys, keys[:, :, None].astype(cache.keys.dtype)),
        values=new(cache.values, values[:, :, None].astype(cache.values.dtype)),
        positions=new(cache.positions, jnp.broadcast_to(cache.lengths[:, None, None], (batch, kv_heads, 1))),
        scores=new(cache.scores, jnp.zeros((batch, kv_heads, 1), jnp.float32)),
        lengths=cache.lengths + 1,
    )
    out, attention = evicted_decode_attention(q, with_token, scale=scale, softcap=softcap)
    return out, append(cache, keys, values, attention[..., :-1])


def evicted_decode_step(q, cache: EvictedKVCache, keys, values, *, append=None, attention_append=None,
                        scale: float | None = None, softcap: float | None = None):
    """One decode step on an evicted cache under its policy, given as exactly one of:

    - ``append(cache, keys, values) -> cache`` (e.g. StreamingLLM): the token enters first, then
      the query attends to the kept slots, the new token included;
    - ``attention_append(cache, keys, values, attention [B, K, budget]) -> cache`` (H2O, A2SF):
      :func:`attend_and_append`.

    Args:
      q: ``[B, 1, H, D]``; keys, values: the new token's ``[B, K, D]``.

    Returns:
      ``(o [B, 1, H, D] in q's dtype, the updated cache)``.

    Raises:
      ValueError: neither or both of ``append`` and ``attention_append``.
    """
    if (append is None) == (attention_append is None):
        raise ValueError("an EvictedKVCache step needs exactly one of append= or attention_append= (its policy)")
    if attention_append is not None:
        return attend_and_append(q, cache, keys, values, attention_append, scale=scale, softcap=softcap)
    cache = append(cache, keys, values)
    out, _ = evicted_decode_attention(q, cache, scale=scale, softcap=softcap)
    return out, cache
