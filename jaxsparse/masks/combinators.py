"""Masks made of masks: ``a & b``, ``a | b``, ``~a`` and one mask per head.

Block answers compose conservatively (see :mod:`jaxsparse.masks.base`): for ``a & b`` the block is
visited when both may have a visible element and full when both are full; for ``a | b`` it is visited
when either may be and full when either is; ``~a`` swaps the two questions.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

from jaxsparse.masks.base import BlockGrid, Mask, pytree_mask


@pytree_mask(data=("left", "right"))
class And(Mask):
    """Visible where both masks are."""

    left: Mask
    right: Mask

    def __call__(self, b, h, q_idx, kv_idx):
        return self.left(b, h, q_idx, kv_idx) & self.right(b, h, q_idx, kv_idx)

    def tile_operands(self, q_len, kv_len):
        return _zip_operands(self.left.tile_operands(q_len, kv_len), self.right.tile_operands(q_len, kv_len))

    def tile_visible(self, rows, columns, scalars, b, h, q_idx, kv_idx):
        left = self.left.tile_visible(rows[0], columns[0], scalars[0], b, h, q_idx, kv_idx)
        return left & self.right.tile_visible(rows[1], columns[1], scalars[1], b, h, q_idx, kv_idx)

    def block_visibility(self, grid: BlockGrid):
        left_any, left_all = self.left.block_visibility(grid)
        right_any, right_all = self.right.block_visibility(grid)
        return left_any & right_any, left_all & right_all


@pytree_mask(data=("left", "right"))
class Or(Mask):
    """Visible where either mask is."""

    left: Mask
    right: Mask

    def __call__(self, b, h, q_idx, kv_idx):
        return self.left(b, h, q_idx, kv_idx) | self.right(b, h, q_idx, kv_idx)

    def tile_operands(self, q_len, kv_len):
        return _zip_operands(self.left.tile_operands(q_len, kv_len), self.right.tile_operands(q_len, kv_len))

    def tile_visible(self, rows, columns, scalars, b, h, q_idx, kv_idx):
        left = self.left.tile_visible(rows[0], columns[0], scalars[0], b, h, q_idx, kv_idx)
        return left | self.right.tile_visible(rows[1], columns[1], scalars[1], b, h, q_idx, kv_idx)

    def block_visibility(self, grid: BlockGrid):
        left_any, left_all = self.left.block_visibility(grid)
        right_any, right_all = self.right.block_visibility(grid)
        return left_any | right_any, left_all | right_all


@pytree_mask(data=("inner",))
class Not(Mask):
    """Visible where the inner mask is not."""

    inner: Mask

    def __call__(self, b, h, q_idx, kv_idx):
        return ~self.inner(b, h, q_idx, kv_idx)

    def tile_operands(self, q_len, kv_len):
        return self.inner.tile_operands(q_len, kv_len)

    def tile_visible(self, rows, columns, scalars, b, h, q_idx, kv_idx):
        return ~self.inner.tile_visible(rows, columns, scalars, b, h, q_idx, kv_idx)

    def block_visibility(self, grid: BlockGrid):
        inner_any, inner_all = self.inner.block_visibility(grid)
        return ~inner_all, ~inner_any


@pytree_mask(data=("masks",))
class PerHead(Mask):
    """Head ``h`` uses ``masks[h]`` (MoA-style per-head windows, mixed global/local heads)."""

    masks: tuple[Mask, ...]

    def __call__(self, b, h, q_idx, kv_idx):
        h = jnp.asarray(h)
        visible = jnp.zeros(jnp.broadcast_shapes(jnp.shape(b), h.shape, jnp.shape(q_idx), jnp.shape(kv_idx)), bool)
        for head, mask in enumerate(self.masks):
            visible = jnp.where(h == head, mask(b, h, q_idx, kv_idx), visible)
        return visible

    def tile_operands(self, q_len, kv_len):
        return _zip_operands(*(mask.tile_operands(q_len, kv_len) for mask in self.masks))

    def tile_visible(self, rows, columns, scalars, b, h, q_idx, kv_idx):
        h = jnp.asarray(h)
        shape = jnp.broadcast_shapes(jnp.shape(b), h.shape, jnp.shape(q_idx), jnp.shape(kv_idx))
        visible = jnp.zeros(shape, bool)
        for head, mask in enumerate(self.masks):
            head_visible = mask.tile_visible(rows[head], columns[head], scalars[head], b, h, q_idx, kv_idx)
            visible = jnp.where(h == head, head_visible, visible)
        return visible

    def block_visibility(self, grid: BlockGrid):
        answers = [mask.block_visibility(grid) for mask in self.masks]
        batch = max(jnp.ndim(a) == 4 and a.shape[0] or 1 for pair in answers for a in pair)
        shape = (batch, 1, grid.num_q_blocks, grid.num_kv_blocks)
        any_visible = jnp.concatenate([jnp.broadcast_to(a, shape) for a, _ in answers], axis=1)
        all_visible = jnp.concatenate([jnp.broadcast_to(a, shape) for _, a in answers], axis=1)
        return any_visible, all_visible


def _zip_operands(*operands):
    """Per-child ``(rows, columns, scalars)`` regrouped as ``(rows per child, columns per child, ...)``."""
    return tuple(tuple(child[kind] for child in operands) for kind in range(3))


def per_head(masks: Sequence[Mask]) -> Mask:
    """One mask per query head: head ``h`` uses ``masks[h]``.

    Example (MoA: a different window per head)::

        mask = causal() & per_head([sliding_window(w) for w in (64, 128, 256, 1024)])

    Args:
      masks: one :class:`Mask` per query head; the attention call must have ``H == len(masks)``.

    Returns:
      A mask whose block metadata is per head (``Hm == len(masks)``).

    Raises:
      ValueError: if ``masks`` is empty; TypeError if an entry is not a mask.
    """
    masks = tuple(masks)
    if not masks:
        raise ValueError("per_head(masks): masks must name at least one mask, got an empty sequence")
    for index, mask in enumerate(masks):
        if not isinstance(mask, Mask):
            raise TypeError(f"per_head(masks): masks[{index}] must be a Mask, got {type(mask).__name__}")
    return PerHead(masks)
