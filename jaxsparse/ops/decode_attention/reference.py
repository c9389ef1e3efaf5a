"""The spec of decode attention: dense float32 logits over the whole cache, masked."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsparse.ops.decode_attention.selection import BlockSelection, PositionSelection

_HIGHEST = jax.lax.Precision.HIGHEST


def visible_positions(selection, lengths, capacity: int, queries: int):
    """bool ``[B, K or 1, Tq, S]``: listed, inside the sequence, and not after the query.

    Query t of sequence b sits at position ``lengths[b] - Tq + t``.
    """
    positions = jnp.arange(capacity)
    if selection is None:
        listed = jnp.ones((lengths.shape[0], 1, capacity), bool)
    else:
        chosen, ok = selection.positions() if isinstance(selection, BlockSelection) else (selection.positions, selection.listed())
        rows = jnp.arange(chosen.shape[0])[:, None, None]
        heads = jnp.arange(chosen.shape[1])[None, :, None]
        listed = jnp.zeros((*chosen.shape[:2], capacity), bool).at[rows, heads, chosen].max(ok, mode="drop")
    query_position = lengths[:, None] - queries + jnp.arange(queries)  # [B, Tq]
    causal = positions <= query_position[..., None]  # [B, Tq, S]
    inside = positions < lengths[:, None, None]
    return listed[:, :, None, :] & (causal & inside)[:, None]


def attend(q, keys, values, visible, *, scale, softcap, precision=None):
    """Masked softmax attention in float32.

    Args:
      q: ``[B, K, G, Tq, D]``; keys, values: ``[B, K, S', D]``; visible: bool broadcastable to
        ``[B, K, G, Tq, S']``.
      precision: of the two einsums (the reference asks for HIGHEST).

    Returns:
      ``(o [B, K, G, Tq, D] float32, lse [B, K, G, Tq] float32, probabilities [B, K, G, Tq, S']
      float32)``; rows that see nothing give 0, -inf and all-zero probabilities.
    """
    batch, kv_heads, groups, queries, dim = q.shape
    # (G, Tq) folded into one row axis: XLA:CPU runs the 4-D einsum ~4x faster than the 5-D form,
    # and 1.3-1.9x faster with the keys as the left operand (the few query rows are then the
    # operand it packs) than "bkrd,bksd->bkrs".
    rows = q.reshape(batch, kv_heads, groups * queries, dim).astype(jnp.float32)
    visible = jnp.broadcast_to(visible, (batch, kv_heads, groups, queries, keys.shape[2]))
    visible = visible.reshape(batch, kv_heads, groups * queries, keys.shape[2])
    logits = scale * jnp.swapaxes(jnp.einsum("bksd,bkrd->bksr", keys.astype(jnp.float32), rows, precision=precision), 2, 3)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    logits = jnp.where(visible, logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)
    weights = jnp.where(visible, jnp.exp(logits - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
    out = jnp.einsum("bkrs,bksd->bkrd", weights, values.astype(jnp.float32), precision=precision)
    return out.reshape(q.shape), lse.reshape(q.shape[:-1]), weights.reshape(*q.shape[:-1], keys.shape[2])


def reference_decode_attention(q, keys, values, lengths, selection, *, scale, softcap):
    """``q [B, K, G, Tq, D]`` over the whole cache ``[B, K, S, D]``; returns ``(o, lse)`` float32."""
    visible = visible_positions(selection, lengths, keys.shape[2], q.shape[3])[:, :, None]
    return attend(q, keys, values, visible, scale=scale, softcap=softcap, precision=_HIGHEST)[:2]
