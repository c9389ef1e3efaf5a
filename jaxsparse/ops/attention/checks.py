"""Argument checks and defaults shared by the attention entry points (single device and sequence parallel)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_qkv(q, k, v):
    """Checks ``q [B, T, H, D]``, ``k, v [B, S, K, D]`` (ranks, dtypes, GQA ratio); returns ``(B, T, H, D)``."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "ndim") or x.ndim != 4:
            raise ValueError(f"{name} must have rank 4 ([B, T, H, D] for q, [B, S, K, D] for k and v), got shape {getattr(x, 'shape', None)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise TypeError(f"q, k and v must be floating point, got {q.dtype}")
    batch, q_len, heads, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, S, K, D], got k {k.shape} and v {v.shape}")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k must be [B={batch}, S, K, D={head_dim}] to match q {q.shape}, got {k.shape}")
    if k.shape[2] == 0 or heads % k.shape[2]:
        raise ValueError(f"the number of query heads H={heads} must be divisible by the kv heads K={k.shape[2]}")
    if q_len == 0 or k.shape[1] == 0:
        raise ValueError(f"sequence lengths must be positive, got T={q_len}, S={k.shape[1]}")
    return batch, q_len, heads, head_dim


def check_positive(name, value, *, default):
    """A static positive python number (``scale``, ``softcap``) as a float, or ``default`` when None."""
    if value is None:
        return default
    if isinstance(value, jax.core.Tracer) or not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a python number (it is static), got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return float(value)


def default_block(length: int) -> int:
    """The default tile for a sequence of ``length``: 128, shrunk to a power of two >= 16 for short ones."""
    return min(128, max(16, 1 << (length - 1).bit_length()))
