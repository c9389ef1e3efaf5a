"""Pure-JAX decode attention: gather only the selected positions (or blocks), then attend.

Cost is proportional to the selection, not to the cache: a top-256 selection reads 256 keys and
values per kv head whatever the cache length. Without a selection it reads the whole cache.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxsparse.ops.decode_attention.reference import attend, visible_positions
from jaxsparse.ops.decode_attention.selection import BlockSelection


def xla_decode_attention(q, keys, values, lengths, selection, *, scale, softcap):
    """Same contract as :func:`~jaxsparse.ops.decode_attention.reference.reference_decode_attention`."""
    queries = q.shape[3]
    if selection is None:
        visible = visible_positions(None, lengths, keys.shape[2], queries)[:, :, None]
        return attend(q, keys, values, visible, scale=scale, softcap=softcap)[:2]
    if isinstance(selection, BlockSelection):
        positions, listed = selection.positions()
    else:
        positions, listed = selection.positions, selection.listed()
    safe = jnp.clip(positions, 0, keys.shape[2] - 1)
    gather = lambda store: jnp.take_along_axis(store, safe[..., None], axis=2)  # noqa: E731  [B, K, n, D]
    query_position = lengths[:, None] - queries + jnp.arange(queries)  # [B, Tq]
    causal = positions[:, :, None, :] <= query_position[:, None, :, None]  # [B, K, Tq, n]
    inside = positions < lengths[:, None, None]
    visible = (listed & inside)[:, :, None, :] & causal
    return attend(q, gather(keys), gather(values), visible[:, :, None], scale=scale, softcap=softcap)[:2]
