"""The positions of the k largest entries of each row, listed ascending: a partial sort or a threshold.

``top_k_positions(x, k, valid=...)`` chooses what ``lax.top_k`` chooses and lists it by position,
the form sparse kernels and gathers want. Two methods give the same result:

- ``"partial_sort"``: ``lax.top_k``, then a sort of the k positions. On XLA:CPU, ``lax.top_k``
  calls a comparator per element: about 1.1 ms for the top 256 of ``[8, 32768]`` on 2 cores,
  more than the rest of a Spark-attention decode step.
- ``"threshold"`` (the default on CPU), a few vectorised passes: 1.5-2.7x faster there at
  ``[8, 32768]`` and 2.0-3.2x at ``[64, 32768]`` (runs on a shared 2-core machine vary; BENCHMARKS.md):

  1. Split each row into ``4 k`` strided blocks and take their maxima. A lower bound ``T`` of the
     k-th largest block maximum (12 bisection steps) is a lower bound of the row's k-th largest
     entry: k blocks have maxima ``>= T``, so k entries do. On i.i.d. rows about ``1.15 k``
     entries reach it.
  2. Compact the entries ``>= T`` (:func:`~jaxsparse.ops.compaction.compact`) into
     ``candidates`` slots. They hold the top k.
  3. Find the exact k-th largest candidate by bisection on order-preserving int32 keys (the order
     ``lax.top_k`` uses: ``-0 < +0``, NaN above +inf), stopping early at a key exactly k
     candidates reach, and keep the candidates above it plus the first ties, as ``lax.top_k`` does.

  A call where some row has more passing entries than ``candidates`` (large entries sharing a few
  strided blocks, i.e. repeating with a period of about ``4 k`` positions; neighbouring positions
  fall in different blocks) or a NaN runs ``"partial_sort"`` instead (``lax.cond``), so the result is exact on every
  input; only the cost changes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxsparse.ops.compaction import WORD_BITS, compact, prefix_sum

_INT32_MIN = jnp.iinfo(jnp.int32).min
_BLOCKS_PER_K = 4  # k-th largest of 4k block maxima: about 1.15 k entries pass it on i.i.d. rows
_BOUND_STEPS = 12  # bisection steps for the block-maxima bound (a lower bound at every step)
METHODS = ("threshold", "partial_sort")
# The float that lax.top_k's total order puts last (sortable key INT32_MIN): a negative NaN.
_LOWEST = np.array(-1, np.int32).view(np.float32)


def sortable_keys(x) -> jax.Array:
    """int32 keys that order like float32 ``x`` under ``lax.top_k``'s total order (NaN above +inf)."""
    bits = lax.bitcast_convert_type(jnp.asarray(x).astype(jnp.float32), jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _from_keys(keys) -> jax.Array:
    """The float32 values of :func:`sortable_keys` (its inverse)."""
    return lax.bitcast_convert_type(jnp.where(keys < 0, keys ^ jnp.int32(0x7FFFFFFF), keys), jnp.float32)


def _kth_largest(keys, valid, k: int, *, exact: bool):
    """Per row, an int32 ``t`` with ``count(keys > t) <= k <= count(keys >= t)`` over the valid keys
    (INT32_MIN if fewer than k are valid): the k-th largest key, or any ``t`` that exactly k keys
    reach, where the search stops early.

    Bisection between the smallest and the largest valid key, one compare-and-count over ``[R, n]``
    a step: until every row is settled (``exact``; about ``log2(n)`` steps on spread-out keys), or
    12 steps, which leave ``t`` only a lower bound (at least k keys reach it), within ``(max -
    min) / 2**12`` keys of the k-th largest.
    """
    low = jnp.min(jnp.where(valid, keys, jnp.iinfo(jnp.int32).max), axis=-1)
    high = jnp.max(jnp.where(valid, keys, _INT32_MIN), axis=-1)
    low = jnp.where(jnp.sum(valid, axis=-1) >= k, low, _INT32_MIN)  # invariant: count(keys >= low) >= k

    def step(bounds):
        low, high = bounds
        middle = (low >> 1) + (high >> 1) + ((low | high) & 1)  # ceil((low + high) / 2) without overflow
        reaching = jnp.sum(valid & (keys >= middle[..., None]), axis=-1)
        open_rows = low < high  # a settled row keeps its bounds (``middle - 1`` could wrap around)
        enough = open_rows & (reaching >= k)
        return (jnp.where(enough, middle, low),
                jnp.where(enough & (reaching == k), middle, jnp.where(open_rows & ~enough, middle - 1, high)))

    if exact:
        low, _ = lax.while_loop(lambda bounds: jnp.any(bounds[0] < bounds[1]), step, (low, high))
    else:
        low, _ = lax.fori_loop(0, _BOUND_STEPS, lambda _, bounds: step(bounds), (low, high), unroll=True)
    return low


def _candidate_count(size: int, k: int, candidates: int | None) -> int:
    if candidates is None:
        candidates = 2 * k
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < k:
        raise ValueError(f"candidates must be an int >= k = {k}, got {candidates!r}")
    return min(candidates, size)


def top_k_positions(x, k: int, *, valid=None, method: str | None = None, candidates: int | None = None):
    """The positions of the k largest valid entries of each row, ascending, with their count.

    The chosen set is ``lax.top_k``'s: the k largest under its total order, ties going to the
    lower position. Only the listing order differs (ascending positions, not falling values).

    Args:
      x: float ``[..., n]`` (compared as float32).
      k: entries to keep per row, in ``[1, n]`` (static).
      valid: optional bool broadcastable to ``x``: entries that may be chosen (default all).
      method: ``"threshold"``, ``"partial_sort"`` or None: ``"threshold"`` on CPU, where it is
        1.5-2.7x faster at ``[8, 32768]``, k = 256; ``"partial_sort"`` elsewhere (unmeasured there).
      candidates: ``"threshold"``'s slots for the entries that pass the bound, ``>= k`` (default
        ``2 k``). A call with a row over it runs ``"partial_sort"`` (same result, its cost).

    Returns:
      ``(positions, counts)``: int32 ``[..., k]``, the ``counts = min(k, valid entries)`` chosen
      positions first and ascending, then 0; int32 ``[...]``.

    Raises:
      ValueError: ``x`` of rank 0, ``k`` outside ``[1, n]``, an unknown ``method``,
        ``candidates < k``.
    """
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError(f"x must have at least one axis, got shape {x.shape}")
    n = x.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer in [1, {n}] (the last axis), got {k!r}")
    if method is None:
        method = "threshold" if jax.default_backend() == "cpu" else "partial_sort"
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} or None, got {method!r}")
    slots = _candidate_count(n, k, candidates)
    lead = x.shape[:-1]
    given_valid = None if valid is None else jnp.atleast_1d(jnp.asarray(valid, bool))

    def rows():
        """``(values, valid)`` as ``[R, n]`` rows (valid None: every entry). The ``lax.cond`` branches
        call it again rather than capture its arrays: XLA:CPU copies a captured reshape (and
        materialises a captured broadcast) into the cond's operands; the copy of ``[64, 32768]``
        scores took 0.47 ms of a 15 ms batch-8 decode step."""
        values = x.astype(jnp.float32).reshape(-1, n)
        return values, None if given_valid is None else jnp.broadcast_to(given_valid, x.shape).reshape(-1, n)

    if given_valid is None:  # every entry: no mask pass at all
        counts = jnp.full((int(np.prod(lead)),), k, jnp.int32)
    else:
        # Counted on the mask as given (e.g. [B, 1, S] for [B, K, S] scores; a last axis of 1 stands
        # for all n entries), then broadcast; a float32 sum (exact below 2**24): XLA:CPU reduces a
        # bool-to-int32 row 4x slower.
        given_counts = jnp.sum(jnp.where(given_valid, 1.0, 0.0), axis=-1) * (n // given_valid.shape[-1])
        counts = jnp.broadcast_to(jnp.minimum(given_counts, k), lead).reshape(-1).astype(jnp.int32)

    def partial_sort():
        values, valid = rows()
        # Float rows: XLA:CPU sorts int32 rows whole (40x slower than its float TopK).
        _, positions = lax.top_k(_where_valid(valid, values, _LOWEST), k)
        # Ascending, the chosen (valid) ones first: invalid picks only pad rows with fewer than k.
        listed = jnp.arange(k) < counts[:, None]
        return jnp.sort(jnp.where(listed, positions, positions + n), axis=-1) % n

    if method == "partial_sort":
        positions = partial_sort()
    else:
        positions = _threshold_positions(rows, k, slots, partial_sort)
    positions = jnp.where(jnp.arange(k) < counts[:, None], positions, 0).astype(jnp.int32)
    return positions.reshape(*lead, k), counts.reshape(lead)


def _strided_block_max(x, block_size: int, blocks: int):
    """``max over c of x[:, c * blocks + b]`` for ``x [R, block_size * blocks]``: ``[R, blocks]``.

    A halving tree of elementwise maxima of contiguous halves, one loop fusion. XLA:CPU hands the
    equivalent ``jnp.max`` over the strided axis to an XNNPACK fusion: in a profiled cold decode
    step on ``[8, 32768]`` that op took 0.19 ms (median of 12), the tree 0.07 ms.
    """
    x = x.reshape(-1, block_size, blocks)
    while x.shape[1] > 1:
        half = x.shape[1] // 2
        x = jnp.concatenate([jnp.maximum(x[:, :half], x[:, half:2 * half]), x[:, 2 * half:]], axis=1)
    return x[:, 0]


def _where_valid(valid, a, fill):
    """``a`` where ``valid`` (None: everywhere), else ``fill``."""
    return a if valid is None else jnp.where(valid, a, fill)


def _threshold_positions(rows, k: int, slots: int, partial_sort):
    """Steps 1-3 of the module docstring on the ``[R, n]`` rows ``(values, valid) = rows()`` (``valid``
    None: all entries); ``partial_sort()`` when they cannot. Reads the rows twice: block maxima, then
    the compaction."""
    values, valid = rows()
    n = values.shape[-1]
    # Strided blocks (entry c * blocks + b is in block b): neighbouring entries fall in different blocks.
    block_size = max(1, n // (_BLOCKS_PER_K * k))
    blocks = -(-n // block_size)
    masked = _where_valid(valid, values, -jnp.inf)
    if block_size * blocks > n:
        masked = jnp.pad(masked, ((0, 0), (0, block_size * blocks - n)), constant_values=-jnp.inf)
    block_max = _strided_block_max(masked, block_size, blocks)  # [R, blocks]; NaN if a block has one
    bound = _kth_largest(sortable_keys(block_max), jnp.ones(block_max.shape, bool), k, exact=False)
    threshold = jnp.where(bound == _INT32_MIN, -jnp.inf, _from_keys(bound))  # fewer than k blocks: every entry
    candidate, passed = compact(_where_valid(valid, values >= threshold[:, None], False), slots)

    def exact_among_candidates():
        values, _ = rows()
        listed = jnp.arange(slots) < passed[:, None]
        candidate_keys = sortable_keys(jnp.take_along_axis(values, candidate, axis=1))
        kth = _kth_largest(candidate_keys, listed, k, exact=True)
        above = listed & (candidate_keys > kth[:, None])
        tie = listed & (candidate_keys == kth[:, None])
        needed = k - jnp.sum(above, axis=-1, dtype=jnp.int32)
        first_ties = lambda: above | (tie & (prefix_sum(tie) - tie < needed[:, None]))  # noqa: E731
        some_ties_left = jnp.any(jnp.sum(tie, axis=-1, dtype=jnp.int32) > needed)  # else keep every tie
        chosen, _ = compact(lax.cond(some_ties_left, first_ties, lambda: above | tie), k)
        return jnp.take_along_axis(candidate, chosen, axis=1)

    # NaN (ordered above +inf by lax.top_k, but failing every comparison) or too many candidates.
    fast = jnp.all(passed <= slots) & ~jnp.any(jnp.isnan(block_max))
    return lax.cond(fast, exact_among_candidates, partial_sort)
