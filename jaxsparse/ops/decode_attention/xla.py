"""Pure-JAX decode attention: gather only the selected positions (or blocks), then attend.

Cost is proportional to the selection, not to the cache: a top-256 selection reads 256 keys and
values per kv head whatever the cache length. Without a selection a contiguous cache is read whole
and a paged cache page by page through its page table.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxsparse.kv.cache import KVCache
from jaxsparse.ops.decode_attention.reference import attend, visible_positions
from jaxsparse.ops.decode_attention.selection import BlockSelection


def xla_decode_attention(q, cache, selection, *, scale, softcap):
    """``q [B, K, G, Tq, D]`` over a :class:`KVCache` or :class:`PagedKVCache`; returns ``(o, lse)``
    float32 (the contract of :func:`~jaxsparse.ops.decode_attention.reference.reference_decode_attention`)."""
    queries = q.shape[3]
    lengths = cache.lengths
    if selection is None and isinstance(cache, KVCache):
        visible = visible_positions(None, lengths, cache.capacity, queries)[:, :, None]
        return attend(q, cache.keys, cache.values, visible, scale=scale, softcap=softcap)[:2]
    if selection is None:  # a paged cache: every logical page
        selection = BlockSelection.all_blocks(cache.batch, cache.kv_heads, cache.capacity, cache.page_size)
    if isinstance(selection, BlockSelection):
        positions, listed = selection.positions()
    else:
        positions, listed = selection.positions, selection.listed()
    keys, values = cache.gather(positions)  # [B, K, n, D]
    query_position = lengths[:, None] - queries + jnp.arange(queries)  # [B, Tq]
    causal = positions[:, :, None, :] <= query_position[:, None, :, None]  # [B, K, Tq, n]
    inside = positions < lengths[:, None, None]
    visible = (listed & inside)[:, :, None, :] & causal
    return attend(q, keys, values, visible[:, :, None], scale=scale, softcap=softcap)[:2]
