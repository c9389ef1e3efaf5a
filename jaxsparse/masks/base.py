"""The mask protocol: elementwise visibility plus an analytic answer per block.

A mask answers two questions:

* elementwise, ``mask(b, h, q_idx, kv_idx) -> bool``: may query position ``q_idx`` of batch ``b``
  and head ``h`` attend to key position ``kv_idx``? The arguments are integer arrays that broadcast
  together (scalars and ``[block_q, 1]`` / ``[1, block_kv]`` tiles inside kernels, whole ``[T, 1]`` /
  ``[1, S]`` ranges in the dense reference). This is FlexAttention's ``mask_mod``.
* per block, :meth:`Mask.block_visibility`: for every (q block, kv block) pair of a :class:`BlockGrid`,
  is *any* element visible, and are *all* elements visible? Structured masks answer from the block
  bounds alone, in O(number of blocks) work and without ever forming a ``T x S`` array.

Block answers may be conservative, never wrong: ``any`` may say True for a block that has no visible
element (it is then visited and masked elementwise: correct, a little slower), and ``all`` may say
False for a block that is in fact full (the element mask is then applied needlessly). Both bounds are
preserved by ``&``, ``|`` and ``~``, so composed masks stay correct; each primitive mask is exact.

Masks are immutable dataclasses registered as pytrees: array fields (segment ids, positions) are
leaves, so masks travel through ``jit`` with traced values; sizes (window widths, strides) are static.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class BlockGrid:
    """The tiling a mask is classified on, as broadcastable integer arrays.

    Attributes:
      q_start: int32 ``[nq, 1]``: first query position of each q block.
      q_end: int32 ``[nq, 1]``: one past the last *real* query position (clipped to ``q_len``).
      kv_start: int32 ``[1, nk]``: first key position of each kv block.
      kv_end: int32 ``[1, nk]``: one past the last real key position (clipped to ``kv_len``).
      batch_index: int32 ``[Bm, 1, 1, 1]``: the batch indices to classify (``[0]`` when the mask
        does not depend on the batch).
      head_index: int32 ``[1, Hm, 1, 1]``: the head indices to classify.
      q_len, kv_len, block_q, block_kv: the static sizes.
    """

    q_start: jax.Array
    q_end: jax.Array
    kv_start: jax.Array
    kv_end: jax.Array
    batch_index: jax.Array
    head_index: jax.Array
    q_len: int
    kv_len: int
    block_q: int
    block_kv: int

    @classmethod
    def create(cls, *, q_len: int, kv_len: int, block_q: int, block_kv: int, batch: int = 1, heads: int = 1):
        num_q_blocks = -(-q_len // block_q)
        num_kv_blocks = -(-kv_len // block_kv)
        q_start = jnp.arange(num_q_blocks, dtype=jnp.int32)[:, None] * block_q
        kv_start = jnp.arange(num_kv_blocks, dtype=jnp.int32)[None, :] * block_kv
        return cls(
            q_start=q_start,
            q_end=jnp.minimum(q_start + block_q, q_len),
            kv_start=kv_start,
            kv_end=jnp.minimum(kv_start + block_kv, kv_len),
            batch_index=jnp.arange(batch, dtype=jnp.int32).reshape(batch, 1, 1, 1),
            head_index=jnp.arange(heads, dtype=jnp.int32).reshape(1, heads, 1, 1),
            q_len=q_len,
            kv_len=kv_len,
            block_q=block_q,
            block_kv=block_kv,
        )

    @property
    def num_q_blocks(self) -> int:
        return self.q_start.shape[0]

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_start.shape[1]

    def offset_range(self) -> tuple[jax.Array, jax.Array]:
        """The range ``[lo, hi]`` of ``q_idx - kv_idx`` over each block's real elements, ``[nq, nk]``."""
        return self.q_start - (self.kv_end - 1), (self.q_end - 1) - self.kv_start


class Mask:
    """Base class of all masks. Subclasses are frozen dataclasses registered with :func:`pytree_mask`.

    Subclasses implement :meth:`__call__` and :meth:`block_visibility`.
    """

    def __call__(self, b, h, q_idx, kv_idx) -> jax.Array:
        """Elementwise visibility; the integer arguments broadcast together."""
        raise NotImplementedError

    def block_visibility(self, grid: BlockGrid) -> tuple[jax.Array, jax.Array]:
        """``(any_visible, all_visible)``: bool arrays broadcastable to ``[Bm, Hm, nq, nk]``.

        ``any_visible`` may over-approximate and ``all_visible`` may under-approximate the truth over
        the real (unpadded) elements of each block; primitives are exact.
        """
        raise NotImplementedError

    def tile_operands(self, q_len: int, kv_len: int):
        """Arrays a kernel must slice per tile to evaluate this mask without gathers.

        Returns ``(rows, columns, scalars)``: pytrees (None when empty) of int32 arrays ``[B', T]``
        (one value per query position), ``[B', S]`` (one per key position) and ``[B']`` (one per
        sequence), ``B'`` being 1 or the batch size. ``q_len`` and ``kv_len`` are the operands'
        lengths; kernels pass the block-padded lengths (values past the real sequence are never
        visible: padded queries are discarded, padded keys masked). Masks without arrays have none.
        """
        del q_len, kv_len
        return None, None, None

    def tile_visible(self, rows, columns, scalars, b, h, q_idx, kv_idx) -> jax.Array:
        """Elementwise visibility inside one tile, from the tile's slices of :meth:`tile_operands`.

        ``rows`` holds ``[block_q, 1]`` values of the tile's queries, ``columns`` ``[1, block_kv]``
        values of its keys, ``scalars`` the values of batch entry ``b`` (same tree structures as
        :meth:`tile_operands`). Equals ``self(b, h, q_idx, kv_idx)``; masks without arrays use it.
        """
        del rows, columns, scalars
        return self(b, h, q_idx, kv_idx)

    def __and__(self, other: Mask) -> Mask:
        from jaxsparse.masks.combinators import And

        return And(_as_mask(self), _as_mask(other))

    def __or__(self, other: Mask) -> Mask:
        from jaxsparse.masks.combinators import Or

        return Or(_as_mask(self), _as_mask(other))

    def __invert__(self) -> Mask:
        from jaxsparse.masks.combinators import Not

        return Not(self)

    def __rand__(self, other: Mask) -> Mask:
        return _as_mask(other) & self

    def __ror__(self, other: Mask) -> Mask:
        return _as_mask(other) | self


def _as_mask(value: Any) -> Mask:
    if not isinstance(value, Mask):
        raise TypeError(f"masks combine only with masks, got {type(value).__name__}: {value!r}")
    return value


def pytree_mask(*, data: tuple[str, ...] = ()):
    """Class decorator: a frozen dataclass mask registered as a pytree with ``data`` as leaves.

    Every other field is static metadata and must be hashable.
    """

    def register(cls):
        cls = dataclasses.dataclass(frozen=True)(cls)
        fields = [f.name for f in dataclasses.fields(cls)]
        jax.tree_util.register_dataclass(
            cls, data_fields=list(data), meta_fields=[f for f in fields if f not in data]
        )
        return cls

    return register
