"""Which cached keys each layer reads at a decode step: KV selection policies for :func:`models.generate`.

A policy is a frozen (hashable) dataclass with a small pure protocol:

- ``cache_score_dims``: r to keep ``score_keys`` in the layer's :class:`~jaxsparse.kv.KVCache` (or None);
- ``capacity_multiple``: the cache capacity must be a multiple of it (Quest pages);
- ``init_state(cache, num_heads)``: the policy's state after prefill (a pytree, or None);
- ``select(q, cache, state) -> (selection or None, state)``: called by ``nn.Attention.decode`` after
  the new keys are appended (None reads the whole cache);
- ``make_cache(batch, capacity, kv_heads, head_dim, dtype)``, ``fill(cache, keys, values, queries, *,
  scale, softcap)`` (the prompt's rotated keys, values ``[B, P, K, D]`` and queries ``[B, P, H, D]``,
  and the layer's logit scale and soft-cap), and ``append``
  or ``attention_append`` (None, or how a new token enters an evicting cache, see
  ``nn.Attention.decode``): the cache a layer keeps. Selection policies keep the whole
  :class:`~jaxsparse.kv.KVCache` (:class:`KeepsWholeCache`); :class:`StreamingLLM` and
  :class:`HeavyHitters` (H2O, A2SF) keep only ``budget`` slots per head
  (:class:`~jaxsparse.kv.EvictedKVCache`).

Policies apply to full-attention layers; sliding-window layers always read their trained pattern,
the sinks and the last ``window`` positions (:class:`SlidingWindow`).
"""

from __future__ import annotations

import dataclasses

import functools

import jax
import jax.numpy as jnp

from jaxsparse.kv import selection as kv_selection
from jaxsparse.kv import EvictedKVCache, KVCache, evicted_decode_step, heavy_hitter_append, streaming_llm_append
from models.config import LayerAttention, ModelConfig

POLICY_NAMES = (None, "top_k", "quest", "token_select", "streaming_llm", "h2o")
QUEST_PAGE_SIZE = 16
STREAMING_SINKS = 4
HEAVY_HITTER_RECENT = 16


class KeepsWholeCache:
    """The cache of a selection policy: every position, in a :class:`~jaxsparse.kv.KVCache`."""

    append = None
    attention_append = None

    def make_cache(self, batch: int, capacity: int, kv_heads: int, head_dim: int, dtype):
        return KVCache.create(batch, capacity, kv_heads, head_dim, dtype, score_dims=self.cache_score_dims)

    def fill(self, cache, keys, values, queries, *, scale, softcap):
        return cache.prefill(keys, values)


@dataclasses.dataclass(frozen=True)
class FullCache(KeepsWholeCache):
    """Every cached key (dense decode)."""

    cache_score_dims = None
    capacity_multiple = 1

    def init_state(self, cache: KVCache, num_heads: int):
        return None

    def select(self, q, cache: KVCache, state):
        return None, state


@dataclasses.dataclass(frozen=True)
class TopKKeys(KeepsWholeCache):
    """Spark attention at decode: the ``k`` keys of largest low-rank score per kv head
    (:func:`jaxsparse.kv.selection.top_k_keys`; ``k`` is capped at the cache capacity, so
    ``k >= capacity`` is exact dense decode).

    Attributes:
      k: keys kept per kv head.
      rank: q and k dims that score the keys (None: all); the cache keeps a contiguous copy of them.
      method: ``"exact"`` or ``"statistical"`` (see ``top_k_keys``).
    """

    k: int
    rank: int | None = None
    method: str = "exact"
    capacity_multiple = 1

    @property
    def cache_score_dims(self) -> int | None:
        return self.rank

    def init_state(self, cache: KVCache, num_heads: int):
        return None

    def select(self, q, cache: KVCache, state):
        return kv_selection.top_k_keys(q, cache, min(self.k, cache.capacity), rank=self.rank, method=self.method), state


@dataclasses.dataclass(frozen=True)
class QuestPages(KeepsWholeCache):
    """Quest: the ``num_pages`` pages of largest key-bound score (:func:`jaxsparse.kv.selection.quest_pages`),
    with the page bounds kept up to date incrementally as the state.

    Attributes:
      num_pages: pages read per kv head (capped at the pages of the cache).
      page_size: positions per page; the cache capacity must be a multiple of it.
    """

    num_pages: int
    page_size: int = QUEST_PAGE_SIZE
    cache_score_dims = None

    @property
    def capacity_multiple(self) -> int:
        return self.page_size

    def init_state(self, cache: KVCache, num_heads: int):
        return kv_selection.page_summary(cache, self.page_size)

    def select(self, q, cache: KVCache, state):
        summary = kv_selection.update_page_summary(state, cache, q.shape[1])
        pages = min(self.num_pages, cache.capacity // self.page_size)
        return kv_selection.quest_pages(q, summary, cache, pages), summary


@dataclasses.dataclass(frozen=True)
class TokenSelect(KeepsWholeCache):
    """TokenSelect: top-k tokens by a soft vote of all heads, plus sinks and recent tokens, reused
    while the query stays similar (:func:`jaxsparse.kv.selection.token_select`).

    Attributes:
      k: voted tokens (capped so that ``sinks + recent + k`` fits the cache).
      sinks, recent: always-kept first and last tokens.
      reuse_threshold: cosine similarity above which the last selection is reused.
    """

    k: int
    sinks: int = 4
    recent: int = 16
    reuse_threshold: float = 0.9
    cache_score_dims = None
    capacity_multiple = 1

    def _k(self, cache: KVCache) -> int:
        k = min(self.k, cache.capacity - self.sinks - self.recent)
        if k < 1:
            raise ValueError(f"TokenSelect: sinks + recent = {self.sinks + self.recent} leave no room for voted "
                             f"tokens in a cache of capacity {cache.capacity}")
        return k

    def init_state(self, cache: KVCache, num_heads: int):
        size = self.sinks + self.recent + self._k(cache)
        return kv_selection.TokenSelectState.create(cache.batch, num_heads, cache.head_dim, cache.kv_heads, size)

    def select(self, q, cache: KVCache, state):
        chosen, state, _ = kv_selection.token_select(q, cache, state, k=self._k(cache), sinks=self.sinks,
                                                     recent=self.recent, reuse_threshold=self.reuse_threshold)
        return chosen, state


@dataclasses.dataclass(frozen=True)
class SlidingWindow(KeepsWholeCache):
    """A sliding-window layer's pattern at decode: its sinks and its last ``window`` positions (the
    query's own included; :func:`jaxsparse.kv.selection.window_selection` with ``window - 1`` keys before it)."""

    window: int
    sinks: int = 0
    cache_score_dims = None
    capacity_multiple = 1

    def init_state(self, cache: KVCache, num_heads: int):
        return None

    def select(self, q, cache: KVCache, state):
        return kv_selection.window_selection(q, cache, window=self.window - 1, sinks=self.sinks), state


class _Evicting:
    """An eviction policy's cache: ``budget`` slots per kv head (capped at the generation length,
    where nothing is evicted); the prompt enters token by token, as it would have been decoded.
    Subclasses define ``append`` or ``attention_append`` (see :func:`jaxsparse.kv.evicted_decode_step`)."""

    cache_score_dims = None
    capacity_multiple = 1
    append = None
    attention_append = None

    def make_cache(self, batch: int, capacity: int, kv_heads: int, head_dim: int, dtype):
        self._check(min(self.budget, capacity))
        return EvictedKVCache.create(batch, min(self.budget, capacity), kv_heads, head_dim, dtype)

    def fill(self, cache: EvictedKVCache, keys, values, queries, *, scale, softcap):
        def step(cache, token):  # the attention output is unused (dead code for XLA)
            key, value, query = token
            return evicted_decode_step(query[:, None], cache, key, value, append=self.append,
                                       attention_append=self.attention_append, scale=scale, softcap=softcap)[1], None

        tokens = (jnp.swapaxes(keys, 0, 1), jnp.swapaxes(values, 0, 1), jnp.swapaxes(queries, 0, 1))
        cache, _ = jax.lax.scan(step, cache, tokens)
        return cache

    def init_state(self, cache, num_heads: int):
        return None

    def select(self, q, cache, state):
        return None, state


@dataclasses.dataclass(frozen=True)
class StreamingLLM(_Evicting):
    """StreamingLLM eviction: each full-attention layer keeps ``budget`` slots per kv head, the
    first ``sinks`` tokens and the most recent others (:func:`jaxsparse.kv.streaming_llm_append`),
    so its cache memory is ``budget`` positions whatever the sequence length. Keys keep the rotary
    phase of their absolute position.

    Attributes:
      budget: slots per kv head (capped at the generation length, where nothing is evicted).
      sinks: leading tokens that are never evicted, ``< budget``.
    """

    budget: int
    sinks: int = STREAMING_SINKS

    def _check(self, budget: int) -> None:
        if not self.sinks < budget:
            raise ValueError(f"StreamingLLM: sinks = {self.sinks} must be below the budget {budget}")

    @property
    def append(self):
        return functools.partial(streaming_llm_append, sinks=self.sinks)


@dataclasses.dataclass(frozen=True)
class HeavyHitters(_Evicting):
    """H2O (``decay = 1``) and A2SF (``decay < 1``) eviction: each full-attention layer keeps
    ``budget`` slots per kv head, the ``recent`` newest tokens and the heavy hitters by accumulated
    attention (:func:`jaxsparse.kv.heavy_hitter_append`). Each new query attends to the kept slots
    and itself, then the least attended old slot makes room (:func:`jaxsparse.kv.attend_and_append`).

    Attributes:
      budget: slots per kv head (capped at the generation length, where nothing is evicted).
      recent: newest tokens never evicted, ``< budget``.
      decay: forgetting factor of the accumulated attention, in ``(0, 1]``.
    """

    budget: int
    recent: int = HEAVY_HITTER_RECENT
    decay: float = 1.0

    def _check(self, budget: int) -> None:
        if not self.recent < self.budget:
            raise ValueError(f"HeavyHitters: recent = {self.recent} must be below the budget {self.budget}")
        if not 0 < self.decay <= 1:
            raise ValueError(f"HeavyHitters: decay must be in (0, 1], got {self.decay!r}")

    @property
    def attention_append(self):
        def append(cache: EvictedKVCache, keys, values, attention):
            # A cache capped at the generation length never evicts: ``recent`` only has to fit it.
            return heavy_hitter_append(cache, keys, values, attention, recent=min(self.recent, cache.budget - 1),
                                       decay=self.decay)

        return append


def resolve_policy(policy, config: ModelConfig):
    """The policy object for ``policy``: None (full cache), a name of :data:`POLICY_NAMES`, or a policy.

    Names take their budget from the config: ``"top_k"`` keeps ``decode_keys`` keys scored on
    ``score_dims`` dims; ``"quest"`` reads ``decode_keys // 16`` pages of 16; ``"token_select"``
    votes ``decode_keys`` tokens (plus 4 sinks and 16 recent); ``"streaming_llm"`` keeps
    ``decode_keys`` slots per head (4 of them sinks) and evicts the rest; ``"h2o"`` keeps
    ``decode_keys`` slots per head, the 16 newest and the most attended (recent capped below the budget).

    Raises:
      ValueError: an unknown name, or a name that needs ``config.decode_keys`` when it is None.
    """
    if policy is None:
        return FullCache()
    if isinstance(policy, (FullCache, TopKKeys, QuestPages, TokenSelect, StreamingLLM, HeavyHitters)):
        return policy
    if policy not in POLICY_NAMES:
        raise ValueError(f"policy must be one of {POLICY_NAMES} or a policy object, got {policy!r}")
    if config.decode_keys is None:
        raise ValueError(f"policy={policy!r} takes its budget from config.decode_keys, which is None")
    if policy == "top_k":
        return TopKKeys(config.decode_keys, config.score_dims)
    if policy == "quest":
        return QuestPages(max(1, config.decode_keys // QUEST_PAGE_SIZE))
    if policy == "streaming_llm":
        return StreamingLLM(config.decode_keys)
    if policy == "h2o":
        return HeavyHitters(config.decode_keys, recent=min(HEAVY_HITTER_RECENT, config.decode_keys - 1))
    return TokenSelect(config.decode_keys)


def layer_policy(layout: LayerAttention, policy):
    """The policy a layer uses: its window for sliding-window layers, ``policy`` for full ones."""
    if layout.kind == "sliding_window":
        return SlidingWindow(layout.window, layout.sinks)
    return policy
