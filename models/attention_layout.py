"""From a layer's :class:`~models.config.LayerAttention` to what attention needs in training: the
mask, the token positions of packed documents, and the exact share of (query, key) pairs it visits."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxsparse import masks
from models.config import LayerAttention


def layer_mask(layer: LayerAttention) -> masks.Mask:
    """The layer's causal mask: ``causal()`` or ``causal() & (sinks(s) | sliding_window(window - 1))``.

    ``masks.sliding_window(w)`` shows ``w + 1`` keys; a window of ``window`` keys (the query's own
    included) is ``sliding_window(window - 1)``.
    """
    mask = masks.causal()
    if layer.kind == "full":
        return mask
    local = masks.sliding_window(layer.window - 1)
    return mask & (masks.sinks(layer.sinks) | local if layer.sinks else local)


def document_starts(segment_ids, length: int):
    """int32 ``[B, T]``: the position where each token's document starts (0 everywhere without ids).

    Args:
      segment_ids: int ``[B, T]`` document ids, constant within a document and changing between
        neighbours of different documents (the usual packing), or None.
      length: ``T``.
    """
    index = jnp.arange(length, dtype=jnp.int32)
    if segment_ids is None:
        return jnp.zeros((1, length), jnp.int32)
    segment_ids = jnp.asarray(segment_ids)
    changed = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return lax.cummax(jnp.where(changed, index, 0), axis=1)


def visible_share(layer: LayerAttention, starts):
    """The exact share of the ``T x T`` (query, key) pairs a layer's mask (and the documents) lets through.

    Counted per query in O(T), never forming the ``T x T`` mask: query ``i`` of a document starting
    at ``d`` sees ``i - d + 1`` keys in a full layer; in a windowed layer the window
    ``[max(d, i - window + 1), i]`` plus the sinks ``j < sinks`` of its document before the window.
    (Sinks are the first positions of the packed row, so they are visible only inside the first
    document.)

    Args:
      layer: the layer's pattern.
      starts: int32 ``[B, T]`` (or ``[1, T]``) from :func:`document_starts`.

    Returns:
      float32 scalar in ``(0, 1]``.
    """
    length = starts.shape[-1]
    query = jnp.arange(length, dtype=jnp.int32)
    if layer.kind == "full":
        visible = query - starts + 1
    else:
        low = jnp.maximum(starts, query - layer.window + 1)
        visible = query - low + 1 + jnp.maximum(0, jnp.minimum(layer.sinks, low) - starts)
    return jnp.mean(visible.astype(jnp.float32)) / length
