"""Any mask written as a jnp function of ``(b, h, q_idx, kv_idx)`` (FlexAttention's ``mask_mod``)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from jaxsparse.masks.base import BlockGrid, Mask, pytree_mask

MaskFunction = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


@pytree_mask()
class FromFunction(Mask):
    """A mask given by a function; blocks are classified by evaluating it one q-block row at a time."""

    fn: MaskFunction

    def __call__(self, b, h, q_idx, kv_idx):
        shape = jnp.broadcast_shapes(jnp.shape(b), jnp.shape(h), jnp.shape(q_idx), jnp.shape(kv_idx))
        return jnp.broadcast_to(jnp.asarray(self.fn(b, h, q_idx, kv_idx), bool), shape)

    def block_visibility(self, grid: BlockGrid):
        num_kv = grid.num_kv_blocks
        kv_idx = jnp.arange(num_kv * grid.block_kv, dtype=jnp.int32)
        kv_real = kv_idx < grid.kv_len
        b, h = grid.batch_index, grid.head_index

        def classify_row(q_start):
            q_idx = q_start + jnp.arange(grid.block_q, dtype=jnp.int32)
            q_real = q_idx < grid.q_len
            visible = self(b, h, q_idx[:, None], kv_idx[None, :])  # [Bm, Hm, block_q, S_padded]
            real = q_real[:, None] & kv_real[None, :]
            shape = visible.shape[:2] + (grid.block_q, num_kv, grid.block_kv)
            any_visible = (visible & real).reshape(shape).any(axis=(2, 4))
            all_visible = (visible | ~real).reshape(shape).all(axis=(2, 4))
            return any_visible, all_visible

        any_rows, all_rows = lax.map(classify_row, grid.q_start[:, 0])  # [nq, Bm, Hm, nk]
        return jnp.moveaxis(any_rows, 0, 2), jnp.moveaxis(all_rows, 0, 2)


def from_fn(fn: MaskFunction) -> Mask:
    """A mask from any ``fn(b, h, q_idx, kv_idx) -> bool`` written in jnp.

    The function receives integer arrays that broadcast together and must return a bool array of
    their broadcast shape (a scalar-valued rule such as ``q_idx >= kv_idx`` does). It may close over
    arrays, but to pass traced arrays through ``jit`` prefer a structured mask (``document``,
    ``prefix_lm``, ``global_tokens``), whose arrays are pytree leaves.

    Block metadata evaluates ``fn`` one q-block row (``block_q x S``) at a time: work ``T x S`` in
    total, memory ``block_q x S``. Pass ``batch=`` / ``heads=`` to :func:`make_block_mask` when the
    function depends on ``b`` / ``h``.

    Example::

        even_heads_local = from_fn(lambda b, h, q, k: (h % 2 == 1) | (abs(q - k) < 128))
    """
    if not callable(fn):
        raise TypeError(f"from_fn(fn) needs a callable, got {type(fn).__name__}")
    return FromFunction(fn)
