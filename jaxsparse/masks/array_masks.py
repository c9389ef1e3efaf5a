"""Masks whose parameters are arrays (segment ids, prefix lengths, token positions).

The arrays are pytree leaves, so these masks can be built from traced values inside ``jit``. Block
answers come from per-block summaries (min/max segment id, count of global tokens per block): O(T + S
+ number of blocks) work, never a ``T x S`` array.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.masks.base import BlockGrid, Mask, pytree_mask


def _gather(array, b, idx):
    """``array[b, idx]`` for a ``[B', L]`` array, clipping positions past the end (padding)."""
    idx = jnp.clip(idx, 0, array.shape[1] - 1)
    b = jnp.zeros_like(jnp.asarray(b)) if array.shape[0] == 1 else b
    return array[b, idx]


def _fit_length(values, length: int):
    """``values [B', L]`` cut or edge-padded to ``[B', length]``, as int32."""
    values = values[:, :length]
    return jnp.pad(values, ((0, 0), (0, length - values.shape[1])), mode="edge").astype(jnp.int32)


def _block_min_max(values, block: int, num_blocks: int):
    """Per-block min and max of ``values`` ``[B', L]``, padding by repeating the last entry.

    Returns two ``[B', num_blocks]`` arrays.
    """
    pad = num_blocks * block - values.shape[1]
    padded = jnp.pad(values, ((0, 0), (0, pad)), mode="edge").reshape(values.shape[0], num_blocks, block)
    return padded.min(-1), padded.max(-1)


@pytree_mask(data=("q_segment_ids", "kv_segment_ids"))
class Document(Mask):
    """Query ``i`` sees key ``j`` when both belong to the same segment (packed documents)."""

    q_segment_ids: jax.Array  # int32 [B', T]
    kv_segment_ids: jax.Array  # int32 [B', S]

    def __call__(self, b, h, q_idx, kv_idx):
        return _gather(self.q_segment_ids, b, q_idx) == _gather(self.kv_segment_ids, b, kv_idx)

    def tile_operands(self, q_len, kv_len):
        return _fit_length(self.q_segment_ids, q_len), _fit_length(self.kv_segment_ids, kv_len), None

    def tile_visible(self, rows, columns, scalars, b, h, q_idx, kv_idx):
        return rows == columns

    def block_visibility(self, grid: BlockGrid):
        q_min, q_max = _block_min_max(self.q_segment_ids[:, : grid.q_len], grid.block_q, grid.num_q_blocks)
        kv_min, kv_max = _block_min_max(self.kv_segment_ids[:, : grid.kv_len], grid.block_kv, grid.num_kv_blocks)
        q_min, q_max = q_min[:, None, :, None], q_max[:, None, :, None]
        kv_min, kv_max = kv_min[:, None, None, :], kv_max[:, None, None, :]
        # Disjoint id ranges share no id (exact for sorted ids, an over-approximation otherwise).
        any_visible = (q_min <= kv_max) & (kv_min <= q_max)
        all_visible = (q_min == q_max) & (kv_min == kv_max) & (q_min == kv_min)
        return any_visible, all_visible


@pytree_mask(data=("prefix_len",))
class PrefixLM(Mask):
    """Bidirectional over a prefix, causal after it: ``j < prefix_len[b] or j <= i``."""

    prefix_len: jax.Array  # int32 [B'] (B' = 1 broadcasts)

    def __call__(self, b, h, q_idx, kv_idx):
        prefix = self.prefix_len[0] if self.prefix_len.shape[0] == 1 else self.prefix_len[b]
        return (kv_idx < prefix) | (kv_idx <= q_idx)

    def tile_operands(self, q_len, kv_len):
        return None, None, self.prefix_len

    def tile_visible(self, rows, columns, scalars, b, h, q_idx, kv_idx):
        return (kv_idx < scalars) | (kv_idx <= q_idx)

    def block_visibility(self, grid: BlockGrid):
        prefix = self.prefix_len[:, None, None, None]
        lo, hi = grid.offset_range()
        return (grid.kv_start < prefix) | (hi >= 0), (grid.kv_end <= prefix) | (lo >= 0)


@pytree_mask(data=("positions",))
class GlobalTokens(Mask):
    """Global tokens see every key and are seen by every query (Longformer / BigBird global attention)."""

    positions: jax.Array  # int32 [P], distinct

    def _is_global(self, idx):
        return (jnp.asarray(idx)[..., None] == self.positions).any(-1)

    def __call__(self, b, h, q_idx, kv_idx):
        return self._is_global(q_idx) | self._is_global(kv_idx)

    def tile_operands(self, q_len, kv_len):
        def flags(length):
            return jnp.zeros((1, length), jnp.int32).at[0, self.positions].set(1, mode="drop")

        return flags(q_len), flags(kv_len), None

    def tile_visible(self, rows, columns, scalars, b, h, q_idx, kv_idx):
        return (rows != 0) | (columns != 0)

    def block_visibility(self, grid: BlockGrid):
        q_count = _count_per_block(self.positions, grid.block_q, grid.num_q_blocks)[:, None]
        kv_count = _count_per_block(self.positions, grid.block_kv, grid.num_kv_blocks)[None, :]
        q_size, kv_size = grid.q_end - grid.q_start, grid.kv_end - grid.kv_start
        q_count, kv_count = jnp.minimum(q_count, q_size), jnp.minimum(kv_count, kv_size)
        any_visible = (q_count > 0) | (kv_count > 0)
        return any_visible, (q_count == q_size) | (kv_count == kv_size)


def _count_per_block(positions, block: int, num_blocks: int):
    return jnp.zeros(num_blocks, jnp.int32).at[positions // block].add(1, mode="drop")


def _segment_array(name: str, ids) -> jax.Array:
    ids = jnp.asarray(ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"{name} must hold integers, got dtype {ids.dtype}")
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise ValueError(f"{name} must have shape [T] or [B, T], got {ids.shape}")
    return ids.astype(jnp.int32)


def document(segment_ids, kv_segment_ids=None) -> Mask:
    """Packed documents: a query sees only keys of its own segment.

    Combine with causality for packed causal LM training: ``causal() & document(segment_ids)``.

    Args:
      segment_ids: int ``[B, T]`` (or ``[T]``, shared by the batch): the segment of each query; also
        of each key when ``kv_segment_ids`` is omitted. May be traced. The block metadata is exact
        when ids are non-decreasing along the sequence (the usual packing) and conservative otherwise.
      kv_segment_ids: int ``[B, S]`` (or ``[S]``): the segment of each key, when keys and queries differ.

    Raises:
      TypeError: non-integer ids. ValueError: ranks other than 1 or 2, or mismatched batch sizes.
    """
    q_ids = _segment_array("document(segment_ids)", segment_ids)
    kv_ids = q_ids if kv_segment_ids is None else _segment_array("document(kv_segment_ids)", kv_segment_ids)
    if q_ids.shape[0] != kv_ids.shape[0] and 1 not in (q_ids.shape[0], kv_ids.shape[0]):
        raise ValueError(f"document(): batch sizes differ: q {q_ids.shape[0]} vs kv {kv_ids.shape[0]}")
    return Document(q_ids, kv_ids)


def prefix_lm(prefix_len) -> Mask:
    """Prefix-LM: every query sees the whole prefix; after the prefix, attention is causal.

    Args:
      prefix_len: int scalar or int ``[B]`` (one prefix length per sequence); may be traced.
    """
    prefix = jnp.asarray(prefix_len)
    if not jnp.issubdtype(prefix.dtype, jnp.integer):
        raise TypeError(f"prefix_lm(prefix_len) must be an integer, got dtype {prefix.dtype}")
    if prefix.ndim > 1:
        raise ValueError(f"prefix_lm(prefix_len) must be a scalar or [B], got shape {prefix.shape}")
    return PrefixLM(prefix.reshape(-1).astype(jnp.int32))


def global_tokens(positions) -> Mask:
    """Global tokens (Longformer): the listed positions see all keys and all queries see them.

    Args:
      positions: int ``[P]`` distinct positions (duplicates are removed when the values are concrete).
    """
    if not isinstance(positions, jax.core.Tracer):
        positions = np.unique(np.asarray(positions).reshape(-1))
        if positions.size and not np.issubdtype(positions.dtype, np.integer):
            raise TypeError(f"global_tokens(positions) must hold integers, got dtype {positions.dtype}")
    return GlobalTokens(jnp.asarray(positions, jnp.int32).reshape(-1))
