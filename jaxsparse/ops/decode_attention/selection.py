"""What a decode step reads from the cache: listed blocks (pages) or listed positions, per kv head."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockSelection:
    """Cache blocks of ``block_size`` positions to read, per sequence and kv head.

    Attributes:
      indices: int32 ``[B, K, nb]``: block ids, the ``counts`` listed ones first (distinct), then
        padding (any valid id).
      counts: int32 ``[B, K]`` in ``[0, nb]``.
      block_size: positions per block (static).
    """

    indices: jax.Array
    counts: jax.Array
    block_size: int = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def all_blocks(cls, batch: int, kv_heads: int, capacity: int, block_size: int) -> "BlockSelection":
        """Every block of the cache (dense decode through the block path)."""
        blocks = -(-capacity // block_size)
        indices = jnp.broadcast_to(jnp.arange(blocks, dtype=jnp.int32), (batch, kv_heads, blocks))
        return cls(indices=indices, counts=jnp.full((batch, kv_heads), blocks, jnp.int32), block_size=block_size)

    def positions(self):
        """``(positions [B, K, nb * block_size], listed [B, K, nb * block_size])``."""
        offsets = jnp.arange(self.block_size, dtype=jnp.int32)
        positions = (self.indices[..., None] * self.block_size + offsets).reshape(*self.indices.shape[:2], -1)
        listed = jnp.arange(self.indices.shape[-1])[:, None] < self.counts[..., None, None]
        listed = jnp.broadcast_to(listed, (*self.indices.shape, self.block_size)).reshape(positions.shape)
        return positions, listed


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PositionSelection:
    """Cache positions to read, per sequence and kv head (token-level selection, e.g. top-k keys).

    Attributes:
      positions: int32 ``[B, K, n]``: the ``counts`` listed positions first (distinct), then padding.
      counts: int32 ``[B, K]`` in ``[0, n]``.
    """

    positions: jax.Array
    counts: jax.Array

    def listed(self):
        return jnp.arange(self.positions.shape[-1]) < self.counts[..., None]
