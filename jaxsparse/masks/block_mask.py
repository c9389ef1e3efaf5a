"""Block metadata: which kv blocks each q block visits, and which of those need the element mask.

A :class:`BlockMask` is what every attention implementation consumes. It is a registered pytree of
device arrays, built on device (also inside ``jit`` from traced segment ids or top-k indices) in work
proportional to the number of blocks.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.masks.base import BlockGrid, Mask
from jaxsparse.masks.structured import full


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockMask:
    """Per (batch, head, q block), the kv blocks to visit; and the transposed lists for dK/dV.

    ``Bm`` is 1 when the pattern is the same for every batch entry (else the batch size), ``Hm`` is 1
    when it is the same for every head (else the number of query heads).

    Attributes:
      kv_indices: int32 ``[Bm, Hm, nq, max_kv]``: kv block ids visited by each q block, increasing;
        entries past the count repeat the last valid id (0 when the count is 0), so a TPU pipeline
        re-uses the block instead of fetching a new one.
      kv_counts: int32 ``[Bm, Hm, nq]``: how many entries of ``kv_indices`` are valid.
      kv_full: int32 ``[Bm, Hm, nq, max_kv]``: 1 where every element of the tile is visible (the
        element mask is skipped), 0 where the tile is partial (or the entry is padding).
      q_indices, q_counts, q_full: the same for each kv block: the q blocks that read it
        (``[Bm, Hm, nk, max_q]``, ``[Bm, Hm, nk]``, ``[Bm, Hm, nk, max_q]``).
      mask: the element mask applied inside partial tiles (keys past ``kv_len`` are always masked).
      q_len, kv_len: the real sequence lengths ``T`` and ``S``.
      block_q, block_kv: the tile sizes.
      max_pairs: a static bound on the visited blocks of one (batch, head): exact when the mask was
        built from concrete values, ``nq * max_kv`` when traced.
    """

    kv_indices: jax.Array
    kv_counts: jax.Array
    kv_full: jax.Array
    q_indices: jax.Array
    q_counts: jax.Array
    q_full: jax.Array
    mask: Mask
    q_len: int = dataclasses.field(metadata=dict(static=True))
    kv_len: int = dataclasses.field(metadata=dict(static=True))
    block_q: int = dataclasses.field(metadata=dict(static=True))
    block_kv: int = dataclasses.field(metadata=dict(static=True))
    max_pairs: int = dataclasses.field(metadata=dict(static=True))

    @property
    def num_q_blocks(self) -> int:
        return self.kv_indices.shape[2]

    @property
    def num_kv_blocks(self) -> int:
        return self.q_indices.shape[2]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(Bm, Hm, nq, nk)``."""
        return self.kv_indices.shape[:3] + (self.num_kv_blocks,)

    @property
    def num_visited_blocks(self) -> jax.Array:
        """int32 ``[Bm, Hm]``: visited (q block, kv block) pairs of each batch entry and head."""
        return self.kv_counts.sum(-1)

    @property
    def density(self) -> jax.Array:
        """Share of (q block, kv block) pairs that are visited, averaged over batch and heads."""
        return self.kv_counts.sum() / (self.kv_counts.size * self.num_kv_blocks)

    def element_mask(self, b, h, q_idx, kv_idx) -> jax.Array:
        """The mask applied inside partial tiles: the user's mask and ``kv_idx < kv_len``."""
        return self.mask(b, h, q_idx, kv_idx) & (kv_idx < self.kv_len)

    def visited(self) -> jax.Array:
        """bool ``[Bm, Hm, nq, nk]``: which block pairs are visited."""
        return _scatter_lists(self.kv_indices, self.kv_counts, self.num_kv_blocks)

    def dense(self) -> jax.Array:
        """bool ``[Bm, Hm, T, S]``: element visibility implied by this metadata.

        Materialises ``T x S``: for tests, the reference implementation and pictures, not kernels.
        """
        batch, heads, _, _ = self.shape
        visited = self.visited()
        full_pairs = _scatter_lists(self.kv_indices, self.kv_counts, self.num_kv_blocks, self.kv_full)
        q_block = jnp.arange(self.q_len) // self.block_q
        kv_block = jnp.arange(self.kv_len) // self.block_kv
        visited = visited[:, :, q_block][:, :, :, kv_block]
        full_pairs = full_pairs[:, :, q_block][:, :, :, kv_block]
        b = jnp.arange(batch).reshape(batch, 1, 1, 1)
        h = jnp.arange(heads).reshape(1, heads, 1, 1)
        q_idx = jnp.arange(self.q_len).reshape(1, 1, -1, 1)
        kv_idx = jnp.arange(self.kv_len).reshape(1, 1, 1, -1)
        return visited & (full_pairs | self.element_mask(b, h, q_idx, kv_idx))

    def visualize(self, batch: int = 0, head: int = 0) -> str:
        """A text picture of the block pattern: '#' full, '+' partial, '.' skipped."""
        from jaxsparse.masks.visualize import block_pattern_text

        return block_pattern_text(self, batch, head)

    def plot(self, batch: int = 0, head: int = 0, ax=None):
        """Draws the block pattern with matplotlib (optional dependency); returns the axes."""
        from jaxsparse.masks.visualize import plot_block_pattern

        return plot_block_pattern(self, batch, head, ax)

    @classmethod
    def from_indices(
        cls,
        kv_block_indices,
        counts,
        *,
        q_len: int,
        kv_len: int,
        block_q: int = 128,
        block_kv: int = 128,
        mask: Mask | None = None,
    ) -> BlockMask:
        """Block metadata from run-time block choices (dynamic selection, top-k blocks).

        Args:
          kv_block_indices: int ``[..., nq, n]`` (up to 4 dims, leading ``[Bm, Hm]`` optional): the kv
            blocks each q block attends to, in any order; may be traced. Duplicates are merged and
            ids outside ``[0, nk)`` are ignored.
          counts: int ``[..., nq]``: how many leading entries of each row are valid (``<= n``).
          q_len, kv_len, block_q, block_kv: sizes, as :func:`make_block_mask`.
          mask: optional element mask intersected with the chosen blocks (e.g. ``causal()``); without
            it every chosen block is attended in full (padding keys excepted).

        Returns:
          A :class:`BlockMask` with ``max_kv <= n``.

        Raises:
          ValueError: shapes that do not match the number of blocks.
        """
        indices = jnp.asarray(kv_block_indices, jnp.int32)
        counts = jnp.asarray(counts, jnp.int32)
        num_q_blocks, num_kv_blocks = -(-q_len // block_q), -(-kv_len // block_kv)
        if not 2 <= indices.ndim <= 4 or indices.shape[-2] != num_q_blocks:
            raise ValueError(
                f"kv_block_indices must have shape [..., nq={num_q_blocks}, n] with 2 to 4 dims, got {indices.shape}"
            )
        if counts.shape != indices.shape[:-1]:
            raise ValueError(f"counts must have shape {indices.shape[:-1]}, got {counts.shape}")
        indices = indices.reshape((1,) * (4 - indices.ndim) + indices.shape)
        counts = counts.reshape(indices.shape[:-1])
        listed = _scatter_lists(jnp.where(indices < 0, num_kv_blocks, indices), counts, num_kv_blocks)
        return _compile(
            full() if mask is None else mask,
            q_len=q_len,
            kv_len=kv_len,
            block_q=block_q,
            block_kv=block_kv,
            batch=listed.shape[0],
            heads=listed.shape[1],
            restrict_to=listed,
            width=indices.shape[-1],
        )


def make_block_mask(
    mask: Mask | None,
    *,
    q_len: int,
    kv_len: int,
    block_q: int = 128,
    block_kv: int = 128,
    batch: int | None = None,
    heads: int | None = None,
) -> BlockMask:
    """Compiles a mask into block metadata for ``q_len x kv_len`` attention.

    Works under ``jit`` with traced mask arrays (segment ids, prefix lengths). Structured masks cost
    O(number of blocks) and never form a ``T x S`` array; ``from_fn`` masks are evaluated one q-block
    row at a time. When every input is concrete (also inside ``jit``: masks built from Python values
    are evaluated at trace time), the index lists are exactly as wide as the busiest row; with traced
    inputs they are ``nk`` wide.

    Args:
      mask: a :class:`Mask` (``None`` means :func:`full`).
      q_len, kv_len: query and key lengths ``T`` and ``S`` (any positive ints; the last block may be
        partial).
      block_q, block_kv: tile sizes (positive; kernels may require multiples of 8 or 128).
      batch, heads: how many batch entries / heads to classify for masks that depend on ``b`` / ``h``
        through ``from_fn``; structured masks know their own (``document`` its batch, ``per_head`` its
        heads).

    Returns:
      A :class:`BlockMask`.

    Raises:
      TypeError: ``mask`` is not a Mask. ValueError: non-positive lengths or block sizes.

    Example::

        bm = make_block_mask(causal() & sliding_window(1024), q_len=8192, kv_len=8192)
        print(bm.density, bm.visualize())
    """
    if mask is None:
        mask = full()
    if not isinstance(mask, Mask):
        raise TypeError(f"mask must be a jaxsparse Mask (e.g. causal()), got {type(mask).__name__}")
    for name, value in (("q_len", q_len), ("kv_len", kv_len), ("block_q", block_q), ("block_kv", block_kv)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    for name, value in (("batch", batch), ("heads", heads)):
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ValueError(f"{name} must be None or a positive int, got {value!r}")
    return _compile(mask, q_len=q_len, kv_len=kv_len, block_q=block_q, block_kv=block_kv, batch=batch or 1, heads=heads or 1)


def _compile(mask, *, q_len, kv_len, block_q, block_kv, batch, heads, restrict_to=None, width=None) -> BlockMask:
    sizes = dict(q_len=q_len, kv_len=kv_len, block_q=block_q, block_kv=block_kv, batch=batch, heads=heads)
    tables = _classify_concretely(mask, restrict_to, sizes)
    if tables is None:  # traced inputs: everything stays in the trace, lists as wide as nk
        any_visible, all_visible = _classify(mask, restrict_to, **sizes)
        num_q_blocks, num_kv_blocks = any_visible.shape[-2:]
        kv_width = min(width or num_kv_blocks, num_kv_blocks)
        lists = _both_index_lists(any_visible, all_visible, kv_width=kv_width, q_width=num_q_blocks)
        max_pairs = num_q_blocks * kv_width
    else:  # concrete: numpy lists (no compilation per shape), as wide as the busiest row
        any_visible, all_visible = tables
        kv_width = max(int(any_visible.sum(-1).max()), 1)
        q_width = max(int(any_visible.sum(-2).max()), 1)
        lists = _both_index_lists.__wrapped__(any_visible, all_visible, kv_width=kv_width, q_width=q_width, xp=np)
        lists = tuple(map(jnp.asarray, lists))
        max_pairs = max(int(any_visible.sum((-1, -2)).max()), 1)
    kv_indices, kv_counts, kv_full, q_indices, q_counts, q_full = lists
    return BlockMask(
        kv_indices=kv_indices,
        kv_counts=kv_counts,
        kv_full=kv_full,
        q_indices=q_indices,
        q_counts=q_counts,
        q_full=q_full,
        mask=mask,
        q_len=q_len,
        kv_len=kv_len,
        block_q=block_q,
        block_kv=block_kv,
        max_pairs=max_pairs,
    )


def _classify_concretely(mask, restrict_to, sizes):
    """The visibility tables as numpy arrays, or None when they depend on traced values.

    Runs the compiled classification directly (not as a traced call), so a static mask yields
    concrete tables even when ``attention`` is called inside ``jit``.
    """
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((mask, restrict_to))):
        return None
    try:
        tables = _classify.lower(mask, restrict_to, **sizes).compile()(mask, restrict_to)
    except (jax.errors.UnexpectedTracerError, TypeError):
        # A from_fn closing over traced values: the compiled call wants them as extra inputs. (A
        # genuine error in the mask resurfaces from the traced path.)
        return None
    return tuple(np.asarray(table) for table in tables)


@functools.partial(jax.jit, static_argnames=("q_len", "kv_len", "block_q", "block_kv", "batch", "heads"))
def _classify(mask, restrict_to, *, q_len, kv_len, block_q, block_kv, batch, heads):
    """``(any_visible, all_visible)``, bool ``[Bm, Hm, nq, nk]``."""
    grid = BlockGrid.create(q_len=q_len, kv_len=kv_len, block_q=block_q, block_kv=block_kv, batch=batch, heads=heads)
    any_visible, all_visible = mask.block_visibility(grid)
    # A block holding padding keys is never full: the padding must be masked.
    all_visible = all_visible & (grid.kv_start + block_kv <= kv_len)
    if restrict_to is not None:
        any_visible, all_visible = any_visible & restrict_to, all_visible & restrict_to
    shape = jnp.broadcast_shapes(any_visible.shape, all_visible.shape, (1, 1, grid.num_q_blocks, grid.num_kv_blocks))
    any_visible = jnp.broadcast_to(any_visible, shape)
    return any_visible, jnp.broadcast_to(all_visible, shape) & any_visible


@functools.partial(jax.jit, static_argnames=("kv_width", "q_width", "xp"))
def _both_index_lists(any_visible, all_visible, *, kv_width: int, q_width: int, xp=jnp):
    return _index_lists(any_visible, all_visible, kv_width, xp) + _index_lists(
        any_visible.swapaxes(-1, -2), all_visible.swapaxes(-1, -2), q_width, xp
    )


def _index_lists(any_visible, all_visible, width: int, xp):
    """Rows of a ``[..., n_rows, n_cols]`` visibility table as padded, increasing index lists.

    ``xp`` is ``numpy`` (concrete tables) or ``jax.numpy`` (traced ones).
    """
    counts = any_visible.sum(-1).astype(np.int32)
    # Stable sort of "not visible" puts the visible columns first, in increasing order.
    not_visible = (~any_visible).astype(np.int8)
    order = (xp.argsort(not_visible, axis=-1, kind="stable") if xp is np else xp.argsort(not_visible, axis=-1, stable=True))
    order = order[..., :width].astype(np.int32)
    valid = xp.arange(width, dtype=np.int32) < counts[..., None]
    last = xp.take_along_axis(order, xp.maximum(counts - 1, 0)[..., None], axis=-1)
    indices = xp.where(valid, order, last)
    is_full = xp.take_along_axis(all_visible, indices, axis=-1) & valid
    return indices, counts, is_full.astype(np.int32)


def _scatter_lists(indices, counts, num_cols, values=None):
    """Inverse of :func:`_index_lists`: bool ``[..., n_rows, num_cols]`` marking the listed entries."""
    valid = jnp.arange(indices.shape[-1]) < counts[..., None]
    if values is not None:
        valid = valid & (values != 0)
    leading = [jnp.arange(n).reshape((-1,) + (1,) * (indices.ndim - 1 - axis)) for axis, n in enumerate(indices.shape[:-1])]
    target = jnp.where(valid, indices, num_cols)
    table = jnp.zeros(indices.shape[:-1] + (num_cols,), bool)
    return table.at[(*leading, target)].set(True, mode="drop")
