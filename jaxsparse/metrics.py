"""How sparse activations (FFN neurons or MoE experts) are: token- and chunk-level sparsity.

A mask is bool ``[..., T, F]``: True where neuron (or expert) f is active for token t, with T
consecutive tokens of one sequence on the second-to-last axis. Definitions (REFERENCES, Metrics):

- token-level sparsity (TLS): the share of inactive entries per token, averaged over tokens;
- chunk-level sparsity CLS_L: ``1 -`` the share of neurons active in at least one token of a chunk
  of L consecutive tokens of a sequence, averaged over chunks. What batched decoding and speculative
  verification can skip is set by CLS, not TLS: a chunk must read every neuron any of its tokens uses.
- activation ratio: the share of active entries, ``1 - TLS``.

All functions return float32 scalars and accept an optional ``valid`` token mask ``[..., T]``
(e.g. padding) whose False tokens are ignored.
"""

from __future__ import annotations

import jax.numpy as jnp


def _checked(mask, valid):
    mask = jnp.asarray(mask)
    if mask.ndim < 1:
        raise ValueError(f"mask must be [..., F], got a scalar")
    if valid is None:
        valid = jnp.ones(mask.shape[:-1], bool)
    valid = jnp.asarray(valid, bool)
    if valid.shape != mask.shape[:-1]:
        raise ValueError(f"valid must have the mask's token shape {mask.shape[:-1]}, got {valid.shape}")
    return mask.astype(bool), valid


def activation_ratio(mask, *, valid=None):
    """The share of active entries over the valid tokens: ``mean(mask)``."""
    mask, valid = _checked(mask, valid)
    per_token = jnp.mean(mask, axis=-1, dtype=jnp.float32)
    return jnp.sum(jnp.where(valid, per_token, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def token_level_sparsity(mask, *, valid=None):
    """TLS: the share of inactive neurons (or experts) per token, averaged over the valid tokens.

    Args:
      mask: bool ``[..., F]``, True where active.
      valid: optional bool ``[...]``.

    Returns:
      float32 scalar in ``[0, 1]``.
    """
    return 1.0 - activation_ratio(mask, valid=valid)


def chunk_level_sparsity(mask, chunk: int, *, valid=None):
    """CLS_L: ``1 -`` the share of neurons active in at least one token of each chunk of L tokens.

    Chunks are L consecutive tokens along the sequence axis (-2) of each sequence; a trailing partial
    chunk counts as a chunk of the tokens it has. Chunks without a valid token are ignored.
    ``chunk_level_sparsity(mask, 1) == token_level_sparsity(mask)``.

    Args:
      mask: bool ``[..., T, F]``, True where active.
      chunk: L, a positive int.
      valid: optional bool ``[..., T]``.

    Returns:
      float32 scalar in ``[0, 1]``.

    Raises:
      ValueError: ``chunk`` not a positive int, ``mask`` of rank < 2.
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    mask, valid = _checked(mask, valid)
    if mask.ndim < 2:
        raise ValueError(f"mask must be [..., T, F] for chunks along T, got shape {mask.shape}")
    length, width = mask.shape[-2:]
    padded = -(-length // chunk) * chunk
    pad = [(0, 0)] * (mask.ndim - 2) + [(0, padded - length)]
    mask = jnp.pad(mask & valid[..., None], pad + [(0, 0)])
    valid = jnp.pad(valid, pad)
    chunks = mask.reshape(mask.shape[:-2] + (padded // chunk, chunk, width))
    used = jnp.mean(jnp.any(chunks, axis=-2), axis=-1, dtype=jnp.float32)
    chunk_valid = jnp.any(valid.reshape(valid.shape[:-1] + (padded // chunk, chunk)), axis=-1)
    return 1.0 - jnp.sum(jnp.where(chunk_valid, used, 0.0)) / jnp.maximum(jnp.sum(chunk_valid), 1)
