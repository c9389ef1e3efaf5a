"""Query-aware KV selection policies: which cached keys a decode step reads (the cache is kept).

Each policy is a pure function of the current queries, the cache and (where it has one) its own
state, returning a :class:`~jaxsparse.ops.decode_attention.PositionSelection` (tokens) or
:class:`~jaxsparse.ops.decode_attention.BlockSelection` (pages) per sequence and kv head, for
:func:`~jaxsparse.ops.decode_attention.decode_attention`. Selections are per kv head: scores of the
``G`` query heads of a group (and of the ``Tq`` queries) are combined as each docstring says.
Formulas: REFERENCES (Attention: decode selection).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from jaxsparse.kv.cache import KVCache
from jaxsparse.kv.paged_cache import PagedKVCache
from jaxsparse.ops.compaction import compact
from jaxsparse.ops.decode_attention.reference import visible_positions
from jaxsparse.ops.decode_attention.selection import BlockSelection, PositionSelection
from jaxsparse.ops.top_k_positions import top_k_positions


def _check_query(q, cache: KVCache):
    q = jnp.asarray(q)
    if q.ndim != 4 or q.shape[0] != cache.batch or q.shape[3] != cache.head_dim or q.shape[2] % cache.kv_heads:
        raise ValueError(f"q must be [B, Tq, H, D] with B = {cache.batch}, D = {cache.head_dim} and H a multiple of "
                         f"K = {cache.kv_heads}, got shape {q.shape}")
    batch, queries, heads, dim = q.shape
    return q.reshape(batch, queries, cache.kv_heads, heads // cache.kv_heads, dim).transpose(0, 2, 3, 1, 4)  # [B,K,G,Tq,D]


def _check_budget(name: str, value: int, limit: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise ValueError(f"{name} must be an integer in [1, {limit}] ({what}), got {value!r}")


def _top_positions(scores, valid, k: int) -> PositionSelection:
    """The k best valid positions of ``scores [B, K, S]``, ascending, counts = min(k, valid)."""
    positions, counts = top_k_positions(scores, k, valid=valid)
    return PositionSelection(positions=positions, counts=counts)


def _causal_valid(cache: KVCache):
    """bool ``[B, 1, S]``: the valid positions, broadcastable against ``[B, K, S]`` scores. Left
    unbroadcast: a ``[B, K, S]`` mask captured by a ``lax.cond`` would be materialised."""
    return cache.valid()[:, None, :]


def window_selection(q, cache: KVCache, *, window: int, sinks: int = 0) -> PositionSelection:
    """The positions a causal sliding window with attention sinks lets the new queries see.

    Decoding with it equals attention under ``masks.causal() & (masks.sinks(sinks) |
    masks.sliding_window(window))``: query ``t`` at position ``p = lengths[b] - Tq + t`` sees ``p -
    window <= j <= p`` and ``j < sinks``. The selection is shared by the ``Tq`` queries, so for
    ``Tq > 1`` the earlier queries also see up to ``Tq - 1`` older keys (exact for ``Tq == 1``, the
    decode step). Reads ``sinks + window + Tq`` positions whatever the cache length: this is how a
    sliding-window layer decodes at constant cost without evicting anything.

    Args:
      q: ``[B, Tq, H, D]`` (only its shape is used).
      cache: the layer's cache, with the new tokens appended.
      window: keys before the query, ``>= 0`` (as ``masks.sliding_window``).
      sinks: leading positions every query sees, ``>= 0``.

    Returns:
      A :class:`PositionSelection` ``[B, K, sinks + window + Tq]``, the same for every kv head.

    Raises:
      ValueError: a negative ``window`` or ``sinks``, or a q that does not match the cache.
    """
    queries = _check_query(q, cache).shape[3]
    for name, value in (("window", window), ("sinks", sinks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    size = sinks + window + queries
    lengths = cache.lengths[:, None]  # [B, 1]
    sink_count = jnp.minimum(sinks, lengths)
    start = jnp.maximum(lengths - queries - window, sink_count)  # first window position
    slots = jnp.arange(size)
    positions = jnp.where(slots < sink_count, slots, start + slots - sink_count)
    counts = (sink_count + jnp.maximum(lengths - start, 0))[:, 0]
    positions = jnp.where(slots < counts[:, None], positions, 0).astype(jnp.int32)
    shape = (cache.batch, cache.kv_heads, size)
    return PositionSelection(positions=jnp.broadcast_to(positions[:, None], shape),
                             counts=jnp.broadcast_to(counts[:, None], shape[:2]).astype(jnp.int32))


def low_rank_key_scores(q, cache: KVCache, rank: int | None = None) -> jax.Array:
    """Spark attention's key scores: every cached key scored with the first ``rank`` dims of q and k.

    ``score[b, kv, s] = sum over the group's query heads and queries of q[:rank] . k[s, :rank]``
    (``rank`` None: all D dims, the exact logits summed over the group). With a cache created with
    ``score_dims = rank`` the scores read only the contiguous ``score_keys`` (``rank / D`` of the
    key bytes); otherwise they slice the keys, which touches every cache line of them.

    Args:
      q: ``[B, Tq, H, D]``; cache: the layer's cache.
      rank: ``r`` in ``[1, D]``, or None.

    Returns:
      float32 ``[B, K, S_cap]``; positions past a sequence's length hold whatever the cache holds
      there (mask them with ``cache.valid()``).

    Raises:
      ValueError: ``rank`` out of range, q not matching the cache.
    """
    grouped = _check_query(q, cache)
    rank = cache.head_dim if rank is None else rank
    _check_budget("rank", rank, cache.head_dim, "the head dim D")
    query = jnp.sum(grouped[..., :rank].astype(jnp.float32), axis=(2, 3))  # [B, K, r]: scores are linear in q
    # One batch axis of B * K heads: for B = 1 XLA would otherwise drop the batch axis from the
    # product, and the reshape back to [B, K, S] became a copy of the scores wherever a lax.cond
    # captured them (0.15 ms of a 1.9 ms batch-1 decode step at S = 32768, K = 8).
    heads = cache.batch * cache.kv_heads
    query = query.reshape(heads, rank)
    if cache.score_dims == rank:
        scores = jnp.einsum("nr,nrs->ns", query, cache.score_keys.reshape(heads, rank, -1).astype(jnp.float32))
    else:
        keys = cache.keys[..., :rank].reshape(heads, cache.capacity, rank)
        scores = jnp.einsum("nr,nsr->ns", query, keys.astype(jnp.float32))
    return scores.reshape(cache.batch, cache.kv_heads, cache.capacity)


def top_k_keys(q, cache: KVCache, k: int, *, rank: int | None = None, method: str = "exact") -> PositionSelection:
    """Spark attention / top-k keys: score every key with the first ``rank`` dims of q and k, keep the top k.

    The scores are :func:`low_rank_key_scores` (``rank`` None: all D dims, exact top-k attention;
    a cache with ``score_dims = rank`` reads only its contiguous ``score_keys``).

    Args:
      q: ``[B, Tq, H, D]``; cache: the layer's cache (new keys already appended).
      k: keys to keep, in ``[1, capacity]`` (Spark: <= 256).
      rank: ``r`` in ``[1, D]``.
      method: ``"exact"`` (:func:`~jaxsparse.ops.top_k_positions.top_k_positions`: on CPU a
        threshold and a compaction, elsewhere ``lax.top_k``) or ``"statistical"``
        (Spark's statistical top-k over the valid scores: keep scores above ``mean + std *
        ndtri(1 - k / length)``, a linear-time compaction into ``2 k`` slots; about k survive on
        Gaussian-like scores; if more than ``2 k`` survive, the exact top-2k is taken instead).

    Raises:
      ValueError: ``k`` or ``rank`` out of range, q not matching the cache.
    """
    _check_budget("k", k, cache.capacity, "the cache capacity")
    scores = low_rank_key_scores(q, cache, rank)  # [B, K, S]
    valid = _causal_valid(cache)
    if method == "exact":
        return _top_positions(scores, valid, k)
    if method != "statistical":
        raise ValueError(f"method must be 'exact' or 'statistical', got {method!r}")
    return _statistical_positions(scores, valid, k)


def _statistical_positions(scores, valid, k: int) -> PositionSelection:
    """Positions whose score beats the Gaussian estimate of the k-th largest, compacted into 2k slots.

    ``scores [B, K, S]``; ``valid`` bool ``[B, 1, S]`` (:func:`_causal_valid`), shared by the kv heads.
    """
    slots = min(2 * k, scores.shape[-1])
    weights = valid[:, 0].astype(jnp.float32)  # [B, S]
    count = jnp.maximum(jnp.sum(weights, axis=-1), 1.0)[:, None, None]
    # Masked sums as products with the valid mask: XLA:CPU materialises a masked row before it
    # reduces it; the products took half the time (0.11 vs 0.21 ms on [8, 32768], warm). For B > 1
    # XLA still copies the scores once to feed them (1.9 ms at B = 8 against 2.6 ms for the masked rows).
    masked_sum = lambda rows: jnp.einsum("bks,bs->bk", rows, weights, precision=lax.Precision.HIGHEST)[..., None]  # noqa: E731
    mean = masked_sum(scores) / count
    variance = masked_sum(jnp.square(scores - mean)) / count
    keep_share = jnp.clip(k / count, 1e-6, 1.0 - 1e-6)
    theta = mean + jnp.sqrt(variance) * jax.scipy.special.ndtri(1.0 - keep_share)
    survivors = valid & (scores > theta)
    compacted, counts = compact(survivors, slots)

    def exact():
        chosen = _top_positions(scores, valid, slots)
        return chosen.positions, chosen.counts

    positions, counts = lax.cond(jnp.any(counts > slots), exact, lambda: (compacted, counts))
    return PositionSelection(positions=positions, counts=counts)


def _always_kept(cache: KVCache, sinks: int, recent: int):
    """bool ``[B, S]``: the first ``sinks`` and the last ``recent`` valid positions."""
    positions = jnp.arange(cache.capacity)
    lengths = cache.lengths[:, None]
    return (positions < jnp.minimum(sinks, lengths)) | ((positions >= lengths - recent) & (positions < lengths))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenSelectState:
    """The last query (``[B, H, D]``, float32) and the selection made for it."""

    query: jax.Array
    selection: PositionSelection

    @classmethod
    def create(cls, batch: int, heads: int, head_dim: int, kv_heads: int, size: int) -> "TokenSelectState":
        """A state whose query matches nothing, so the first step selects."""
        empty = PositionSelection(positions=jnp.zeros((batch, kv_heads, size), jnp.int32),
                                  counts=jnp.zeros((batch, kv_heads), jnp.int32))
        return cls(query=jnp.zeros((batch, heads, head_dim), jnp.float32), selection=empty)


def token_select(q, cache: KVCache, state: TokenSelectState, *, k: int, sinks: int = 4, recent: int = 16,
                 reuse_threshold: float = 0.9):
    """TokenSelect (Wu et al. 2025): per-head softmax of q.K, summed over all heads (soft vote),
    top-k tokens plus the sinks and the recent window; the last selection is reused while every
    query head's cosine similarity to the last selecting query stays above ``reuse_threshold``.

    One selection is shared by all kv heads (the vote is over all heads). The last query of ``Tq``
    decides. Size of the selection: ``sinks + recent + k`` positions.

    Returns:
      ``(PositionSelection, new state, reused: bool [])``.
    """
    grouped = _check_query(q, cache)
    size = sinks + recent + k
    _check_budget("k", k, cache.capacity, "the cache capacity")
    if size > cache.capacity:
        raise ValueError(f"sinks + recent + k = {size} exceeds the cache capacity {cache.capacity}")
    batch, kv_heads, groups, _, dim = grouped.shape
    last = grouped[:, :, :, -1].astype(jnp.float32)  # [B, K, G, D]
    flat = last.reshape(batch, kv_heads * groups, dim)
    cosine = jnp.sum(flat * state.query, -1) / (jnp.linalg.norm(flat, axis=-1) * jnp.linalg.norm(state.query, axis=-1) + 1e-9)
    reuse = jnp.all(cosine > reuse_threshold) & (state.query.shape == flat.shape)

    def select():
        logits = jnp.einsum("bkgd,bksd->bkgs", last, cache.keys.astype(jnp.float32)) * dim**-0.5
        valid = cache.valid()[:, None, None, :]
        probs = jax.nn.softmax(jnp.where(valid, logits, -jnp.inf), axis=-1)
        vote = jnp.sum(jnp.where(valid, probs, 0.0), axis=(1, 2))  # [B, S]
        kept = _always_kept(cache, sinks, recent)
        votes = jnp.where(kept, jnp.inf, vote)[:, None, :]  # sinks and recent always win
        chosen = _top_positions(votes, cache.valid()[:, None, :], size)
        return PositionSelection(positions=jnp.broadcast_to(chosen.positions, (batch, kv_heads, size)),
                                 counts=jnp.broadcast_to(chosen.counts, (batch, kv_heads)))

    selection = lax.cond(reuse, lambda: state.selection, select)
    query = jnp.where(reuse, state.query, flat)
    return selection, TokenSelectState(query=query, selection=selection), reuse


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PageSummary:
    """Quest's per-page key bounds: elementwise ``minimum`` and ``maximum`` ``[B, K, P, D]`` over
    each page's valid positions (+inf / -inf for an empty page)."""

    minimum: jax.Array
    maximum: jax.Array
    page_size: int = dataclasses.field(metadata=dict(static=True))


def page_summary(cache: KVCache | PagedKVCache, page_size: int | None = None) -> PageSummary:
    """Computes every page's key bounds (once after prefill; then :func:`update_page_summary`).

    Args:
      cache: a contiguous cache (pages are consecutive runs of ``page_size`` positions) or a
        :class:`PagedKVCache` (its own logical pages; ``page_size`` must be None or equal to its
        page size, so that the chosen pages are the ones the kernels read).

    Raises:
      ValueError: ``page_size`` not dividing the capacity, or not the paged cache's page size.
    """
    if isinstance(cache, PagedKVCache):
        if page_size not in (None, cache.page_size):
            raise ValueError(f"page_size must be None or the paged cache's page size {cache.page_size}, got {page_size!r}")
        page_size, cache = cache.page_size, cache.to_contiguous()
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1 or cache.capacity % page_size:
        raise ValueError(f"page_size must be a positive int dividing the capacity {cache.capacity}, got {page_size!r}")
    batch, kv_heads, capacity, dim = cache.keys.shape
    pages = cache.keys.astype(jnp.float32).reshape(batch, kv_heads, capacity // page_size, page_size, dim)
    valid = cache.valid().reshape(batch, 1, capacity // page_size, page_size, 1)
    return PageSummary(minimum=jnp.min(jnp.where(valid, pages, jnp.inf), axis=3),
                       maximum=jnp.max(jnp.where(valid, pages, -jnp.inf), axis=3), page_size=page_size)


def update_page_summary(summary: PageSummary, cache: KVCache | PagedKVCache, new_tokens: int) -> PageSummary:
    """Folds the last ``new_tokens`` appended positions into the bounds, reading only those keys."""
    start = cache.lengths - new_tokens  # [B]
    positions = jnp.clip(start[:, None] + jnp.arange(new_tokens), 0, cache.capacity - 1)  # [B, T]
    new_keys, _ = cache.gather(jnp.broadcast_to(positions[:, None], (cache.batch, cache.kv_heads, new_tokens)))
    pages = positions // summary.page_size
    rows = jnp.arange(cache.batch)[:, None, None]
    heads = jnp.arange(cache.kv_heads)[None, :, None]
    keys = new_keys.astype(jnp.float32)  # [B, K, T, D]
    return PageSummary(minimum=summary.minimum.at[rows, heads, pages[:, None, :]].min(keys),
                       maximum=summary.maximum.at[rows, heads, pages[:, None, :]].max(keys), page_size=summary.page_size)


def quest_pages(q, summary: PageSummary, cache: KVCache | PagedKVCache, num_pages: int) -> BlockSelection:
    """Quest (Tang et al. 2024): page upper bounds ``sum_d max(q_d min_d, q_d max_d)``, top pages.

    Each query head's bound is computed and the bounds of a kv group's heads (and queries) are
    summed. Pages without a valid position are never chosen.
    """
    grouped = _check_query(q, cache).astype(jnp.float32)  # [B, K, G, Tq, D]
    total_pages = summary.minimum.shape[2]
    _check_budget("num_pages", num_pages, total_pages, "the pages in the cache")
    lower = grouped[:, :, :, :, None, :] * summary.minimum[:, :, None, None]  # [B, K, G, Tq, P, D]
    upper = grouped[:, :, :, :, None, :] * summary.maximum[:, :, None, None]
    bound = jnp.sum(jnp.maximum(lower, upper), axis=-1)
    score = jnp.sum(jnp.where(jnp.isfinite(bound), bound, 0.0), axis=(2, 3))  # [B, K, P]
    occupied = jnp.arange(total_pages) * summary.page_size < cache.lengths[:, None]
    chosen = _top_positions(score, jnp.broadcast_to(occupied[:, None], score.shape), num_pages)
    return BlockSelection(indices=chosen.positions, counts=chosen.counts, block_size=summary.page_size)


def tidal_decode_selection(layer: int, selection_layers, q, cache: KVCache, previous, *, k: int):
    """TidalDecode (Yang et al. 2024): full-score top-k selection in ``selection_layers``, reuse elsewhere.

    Args:
      layer: this layer's index (static).
      selection_layers: the layers that select (e.g. ``(0, 13)``); the first layer must select.
      previous: the selection carried from the layer before (ignored where this layer selects).

    Returns:
      A :class:`PositionSelection` to use here and to carry to the next layer.
    """
    if layer in selection_layers:
        return top_k_keys(q, cache, k)
    if previous is None:
        raise ValueError(f"layer {layer} reuses a selection but got none: put the first layer in selection_layers")
    return previous


def attention_mass_recall(q, cache: KVCache, selection) -> jax.Array:
    """Share of the exact softmax mass that a selection covers, per query head: float32 ``[B, Tq, H]``.

    1.0 means the selection holds every key that matters; decode attention over it then equals dense.
    """
    grouped = _check_query(q, cache).astype(jnp.float32)
    queries = grouped.shape[3]
    dense = visible_positions(None, cache.lengths, cache.capacity, queries)[:, :, None]
    chosen = visible_positions(selection, cache.lengths, cache.capacity, queries)[:, :, None]
    logits = jnp.einsum("bkgtd,bksd->bkgts", grouped, cache.keys.astype(jnp.float32)) * grouped.shape[-1] ** -0.5
    probs = jax.nn.softmax(jnp.where(dense, logits, -jnp.inf), axis=-1)
    recall = jnp.sum(jnp.where(chosen & dense, probs, 0.0), axis=-1)  # [B, K, G, Tq]
    batch, kv_heads, groups = recall.shape[:3]
    return recall.transpose(0, 3, 1, 2).reshape(batch, queries, kv_heads * groups)
