"""The specification: dense attention in float32 with the mask materialised.

Short and obviously right; every other implementation is tested against it. Gradients come from
JAX's autodiff of this code (an independent check of the hand-written backward passes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reference_attention(q, k, v, visible, *, scale: float, softcap: float | None, bias=None):
    """Dense masked attention.

    Args:
      q: ``[B, T, H, D]``; k, v: ``[B, S, K, D]`` with ``H % K == 0``.
      visible: bool, broadcastable to ``[B, H, T, S]``: may query t (head h) see key s.
      scale: multiplies ``q . k``.
      softcap: if set, logits ``s`` become ``softcap * tanh(s / softcap)`` (after scaling).
      bias: optional additive logits, broadcastable to ``[B, H, T, S]`` (added after the soft-cap).

    Returns:
      ``(out [B, T, H, D] in q.dtype, lse [B, H, T] float32)``. A row that sees no key has output 0
      and ``lse = -inf``; its gradients are zero.
    """
    num_heads, num_kv_heads = q.shape[2], k.shape[2]
    k = jnp.repeat(k, num_heads // num_kv_heads, axis=2).astype(jnp.float32)
    v = jnp.repeat(v, num_heads // num_kv_heads, axis=2).astype(jnp.float32)
    logits = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k) * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    visible = jnp.broadcast_to(visible, logits.shape)
    # Double where: masked logits never reach exp, so their gradients stay finite.
    logits = jnp.where(visible, logits, 0.0)
    row_max = jnp.max(jnp.where(visible, logits, -jnp.inf), axis=-1, keepdims=True)
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    weights = jnp.where(visible, jnp.exp(logits - row_max), 0.0)
    total = weights.sum(-1, keepdims=True)
    has_keys = total > 0
    probs = weights / jnp.where(has_keys, total, 1.0)
    out = jnp.einsum("bhts,bshd->bthd", probs, v)
    lse = jnp.where(has_keys, row_max + jnp.log(jnp.where(has_keys, total, 1.0)), -jnp.inf)[..., 0]
    return out.astype(q.dtype), lse
