"""Rotary position embeddings (RoPE), half-split ("rotate_half") convention as in Llama and Gemma."""

from __future__ import annotations

import jax.numpy as jnp


def apply_rotary(x, positions, *, theta: float = 10000.0):
    """Rotates each head vector by angles proportional to its token's position.

    With ``d = D // 2``, ``freq[i] = theta ** (-2 i / D)`` and ``angle = position * freq[i]``, the
    pairs ``(x[..., i], x[..., i + d])`` are rotated by ``angle``::

        x1, x2 = x[..., :d], x[..., d:]
        out = concat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    so that ``apply_rotary(q, m) . apply_rotary(k, n)`` depends on ``m - n`` only (Su et al. 2021,
    "RoFormer: Enhanced Transformer with Rotary Position Embedding"). The angles are computed in
    float32 and the result is cast back to ``x``'s dtype.

    Args:
      x: ``[B, T, N, D]`` (``N`` heads: ``H`` for queries, ``K`` for keys), ``D`` even.
      positions: integer ``[B, T]`` (per token, e.g. restarting at 0 in each packed document) or
        ``[T]`` (shared by the batch).
      theta: the frequency base, positive (10000 in Llama 2; larger for long contexts).

    Returns:
      ``[B, T, N, D]`` in ``x``'s dtype.

    Raises:
      ValueError: ``x`` not of rank 4, an odd ``D``, ``positions`` of another shape, a
        non-positive ``theta``.
      TypeError: non-integer ``positions``.

    Example::

        q = apply_rotary(q, jnp.arange(q.shape[1]))
    """
    if not hasattr(x, "ndim") or x.ndim != 4:
        raise ValueError(f"x must have rank 4 [B, T, N, D], got shape {getattr(x, 'shape', None)}")
    batch, length, _, head_dim = x.shape
    if head_dim % 2:
        raise ValueError(f"x: the head dim D must be even for rotary embeddings, got D={head_dim}")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise ValueError(f"theta must be a positive number, got {theta!r}")
    positions = jnp.asarray(positions)
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise TypeError(f"positions must hold integers, got dtype {positions.dtype}")
    if positions.shape not in ((length,), (batch, length)):
        raise ValueError(f"positions must have shape [T]=({length},) or [B, T]=({batch}, {length}), got {positions.shape}")

    half = head_dim // 2
    inv_freq = float(theta) ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / head_dim)  # [d]
    angle = positions.astype(jnp.float32)[..., None] * inv_freq  # [T, d] or [B, T, d]
    angle = jnp.broadcast_to(angle, (batch, length, half))[:, :, None, :]  # [B, T, 1, d]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
