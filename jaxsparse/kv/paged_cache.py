"""A paged KV cache: one pool of fixed-size pages shared by all sequences, and a page table.

A contiguous :class:`~jaxsparse.kv.KVCache` reserves ``capacity`` positions for every sequence; a
paged cache hands out pages from a shared pool as sequences grow and takes them back when they end
(vLLM's PagedAttention layout), so memory follows the tokens actually held. The page is also the
unit that Quest scores and that the decode kernels read: a
:class:`~jaxsparse.ops.decode_attention.BlockSelection` of logical pages (block size = page size)
is translated through the page table.

Storage is kv-head major, ``[K, P, page, D]``: the positions of one page of one kv head are one
contiguous tile. Allocation and release are pure array updates (a stack of free page ids), so the
cache works inside ``jit`` and ``lax.scan``; running out of pages cannot raise there and is
reported by :meth:`PagedKVCache.overflowed` (the tokens that found no page are not written).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxsparse.kv.cache import KVCache, gather_rows


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    """Keys and values of one attention layer for B sequences in a shared pool of pages.

    Attributes:
      keys, values: the pool, ``[K, P, page, D]``.
      page_table: int32 ``[B, max_pages]``: physical page of each logical page ``j`` of sequence
        ``b`` (logical page ``j`` holds positions ``[j * page, (j + 1) * page)``); entries past
        ``ceil(lengths[b] / page)`` are stale.
      lengths: int32 ``[B]``, the positions each sequence holds.
      free_pages: int32 ``[P]``, a stack of free page ids; the first ``free_count`` are free.
      free_count: int32 ``[]``; negative after an allocation that found no page (see
        :meth:`overflowed`).
    """

    keys: jax.Array
    values: jax.Array
    page_table: jax.Array
    lengths: jax.Array
    free_pages: jax.Array
    free_count: jax.Array

    @classmethod
    def create(cls, batch: int, num_pages: int, page_size: int, kv_heads: int, head_dim: int,
               dtype=jnp.float32, *, max_pages: int | None = None) -> "PagedKVCache":
        """An empty cache with a pool of ``num_pages`` pages of ``page_size`` positions.

        Args:
          max_pages: the most pages one sequence may hold (the page table's width); default
            ``num_pages`` (one sequence may take the whole pool).

        Raises:
          ValueError: a non-positive size.
        """
        max_pages = num_pages if max_pages is None else max_pages
        for name, value in (("batch", batch), ("num_pages", num_pages), ("page_size", page_size),
                            ("kv_heads", kv_heads), ("head_dim", head_dim), ("max_pages", max_pages)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        shape = (kv_heads, num_pages, page_size, head_dim)
        # Popped from the end: page 0 is handed out first.
        free_pages = jnp.arange(num_pages - 1, -1, -1, dtype=jnp.int32)
        return cls(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
                   page_table=jnp.zeros((batch, max_pages), jnp.int32), lengths=jnp.zeros(batch, jnp.int32),
                   free_pages=free_pages, free_count=jnp.asarray(num_pages, jnp.int32))

    @property
    def batch(self) -> int:
        return self.page_table.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.keys.shape[0]

    @property
    def num_pages(self) -> int:
        return self.keys.shape[1]

    @property
    def page_size(self) -> int:
        return self.keys.shape[2]

    @property
    def head_dim(self) -> int:
        return self.keys.shape[3]

    @property
    def max_pages(self) -> int:
        return self.page_table.shape[1]

    @property
    def capacity(self) -> int:
        """The most positions one sequence can hold (``max_pages * page_size``)."""
        return self.max_pages * self.page_size

    def pages_held(self) -> jax.Array:
        """int32 ``[B]``: pages each sequence holds, ``ceil(lengths / page_size)``."""
        return -(-self.lengths // self.page_size)

    def overflowed(self) -> jax.Array:
        """bool ``[]``: an append found no free page, or a sequence outgrew its page table."""
        return (self.free_count < 0) | jnp.any(self.lengths > self.capacity)

    def valid(self) -> jax.Array:
        """bool ``[B, capacity]``: which logical positions hold data."""
        return jnp.arange(self.capacity) < self.lengths[:, None]

    def append(self, keys, values, counts=None) -> "PagedKVCache":
        """Writes new positions after each sequence's length, taking pages from the pool as needed.

        Args:
          keys, values: ``[B, T, K, D]`` in the public layout.
          counts: optional int ``[B]`` in ``[0, T]``: only the first ``counts[b]`` of the ``T``
            new positions of sequence ``b`` are written (default all); e.g. one sequence joins
            with its prompt while the others receive nothing.

        Returns:
          The cache with ``lengths + counts``.
        """
        keys, values = jnp.asarray(keys), jnp.asarray(values)
        expected = (self.batch, keys.shape[1] if keys.ndim == 4 else -1, self.kv_heads, self.head_dim)
        if keys.ndim != 4 or keys.shape != expected or values.shape != keys.shape:
            raise ValueError(f"keys and values must be [B, T, K, D] = [{self.batch}, T, {self.kv_heads}, "
                             f"{self.head_dim}], got {keys.shape} and {values.shape}")
        new_tokens = keys.shape[1]
        counts = jnp.full(self.batch, new_tokens, jnp.int32) if counts is None else jnp.asarray(counts, jnp.int32)
        if counts.shape != (self.batch,):
            raise ValueError(f"counts must be [B] = [{self.batch}], got shape {counts.shape}")
        counts = jnp.clip(counts, 0, new_tokens)
        lengths = self.lengths + counts
        page_table, owned, free_count = self._allocate(lengths)

        position = self.lengths[:, None] + jnp.arange(new_tokens)  # [B, T] logical positions
        logical_page = jnp.minimum(position // self.page_size, self.max_pages - 1)
        page = jnp.take_along_axis(page_table, logical_page, axis=1)
        granted = jnp.take_along_axis(owned, logical_page, axis=1) & (position < self.capacity)
        written = (jnp.arange(new_tokens) < counts[:, None]) & granted
        page = jnp.where(written, page, self.num_pages)  # out of range: dropped
        slot = position % self.page_size

        def write(store, new):  # store [K, P, page, D], new [B, T, K, D]
            return store.at[:, page, slot].set(jnp.moveaxis(new, 2, 0).astype(store.dtype), mode="drop")

        return dataclasses.replace(self, keys=write(self.keys, keys), values=write(self.values, values),
                                   page_table=page_table, lengths=lengths, free_count=free_count)

    def prefill(self, keys, values, lengths=None) -> "PagedKVCache":
        """Releases every sequence, then writes a prompt ``[B, T, K, D]`` valid up to ``lengths``
        (default ``T`` for every sequence)."""
        released = self.release(jnp.ones(self.batch, bool))
        return released.append(keys, values, counts=lengths)

    def release(self, done) -> "PagedKVCache":
        """Returns the pages of the finished sequences (bool ``[B]``) to the pool and empties them."""
        done = jnp.asarray(done, bool)
        if done.shape != (self.batch,):
            raise ValueError(f"done must be bool [B] = [{self.batch}], got shape {done.shape}")
        returned = jnp.where(done, jnp.minimum(self.pages_held(), self.max_pages), 0)
        offsets = jnp.cumsum(returned) - returned
        columns = jnp.arange(self.max_pages)
        slot = jnp.maximum(self.free_count, 0) + offsets[:, None] + columns  # stack slot of each returned page
        slot = jnp.where(columns < returned[:, None], slot, self.num_pages)  # not returned: dropped
        free_pages = self.free_pages.at[slot].set(self.page_table, mode="drop")
        free_count = jnp.maximum(self.free_count, 0) + jnp.sum(returned)
        return dataclasses.replace(self, free_pages=free_pages, free_count=free_count.astype(jnp.int32),
                                   lengths=jnp.where(done, 0, self.lengths))

    def _allocate(self, lengths):
        """``(page_table, owned [B, max_pages], free_count)`` after giving every sequence the pages
        that ``lengths`` needs, popped from the stack in batch order; ``owned`` marks the logical
        pages that have a physical page."""
        held = self.pages_held()[:, None]
        needed = -(-lengths[:, None] // self.page_size)
        columns = jnp.arange(self.max_pages)
        new = (columns >= held) & (columns < needed)  # [B, max_pages]
        granted = jnp.sum(new, axis=1)
        rank = (jnp.cumsum(granted) - granted)[:, None] + columns - held  # allocation order of new pages
        top = self.free_count - 1 - rank  # the stack is popped from its end
        popped = jnp.take(self.free_pages, jnp.clip(top, 0, self.num_pages - 1))
        fresh = new & (top >= 0)
        page_table = jnp.where(fresh, popped, self.page_table).astype(jnp.int32)
        owned = (columns < jnp.minimum(held, needed)) | fresh
        return page_table, owned, (self.free_count - jnp.sum(granted)).astype(jnp.int32)

    def physical_positions(self, positions) -> jax.Array:
        """int32 indices into the flattened pool ``[K, P * page, D]`` of logical ``positions [B, K, n]``."""
        logical_page = jnp.clip(positions // self.page_size, 0, self.max_pages - 1)
        rows = jnp.arange(self.batch)[:, None, None]
        return (self.page_table[rows, logical_page] * self.page_size + positions % self.page_size).astype(jnp.int32)

    def gather(self, positions):
        """Keys and values at logical ``positions [B, K, n]``: ``([B, K, n, D], [B, K, n, D])``."""
        rows = jnp.arange(self.kv_heads)[None, :, None] * (self.num_pages * self.page_size) + self.physical_positions(positions)
        return gather_rows(self.keys, rows), gather_rows(self.values, rows)

    def to_contiguous(self) -> KVCache:
        """The same sequences as a contiguous :class:`KVCache` of ``capacity`` positions (a copy:
        for reference checks and for policies that read every key)."""
        positions = jnp.broadcast_to(jnp.arange(self.capacity), (self.batch, self.kv_heads, self.capacity))
        keys, values = self.gather(positions)
        return KVCache(keys=keys, values=values, lengths=self.lengths)
