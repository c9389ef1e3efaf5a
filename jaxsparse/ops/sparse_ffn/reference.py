"""The spec of the sparse FFN op: dense float32 math with the inactive neurons zeroed."""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def reference_sparse_ffn(x, w_up, w_down, indices, counts, *, w_gate, gate, activation):
    """Dense sparse FFN: every neuron is computed, then the unlisted ones are zeroed.

    Args:
      x: ``[C, L, M]``; w_up, w_down, w_gate (or None): ``[F, M]`` neuron-major.
      indices, counts: the active lists ``[C, k_max]`` and their lengths ``[C]``.
      gate: ``[C, L, k_max]`` gate coefficients of the listed neurons, or None (use ``w_gate``).
      activation: elementwise callable for ``x @ w_gate.T``.

    Returns:
      ``[C, L, M]`` in ``x.dtype``.
    """
    neurons = w_up.shape[0]
    valid = jnp.arange(indices.shape[1]) < counts[:, None]
    in_set = jax.vmap(lambda idx, ok: jnp.zeros(neurons, bool).at[idx].max(ok))(indices, valid)  # [C, F]
    x32 = x.astype(jnp.float32)
    up = jnp.einsum("glm,fm->glf", x32, w_up.astype(jnp.float32), precision=_HIGHEST)
    if w_gate is not None:
        coefficient = activation(jnp.einsum("glm,fm->glf", x32, w_gate.astype(jnp.float32), precision=_HIGHEST))
    else:
        listed = jnp.where(valid[:, None, :], gate.astype(jnp.float32), 0.0)  # [C, L, k_max]
        coefficient = jax.vmap(lambda idx, g: jnp.zeros((g.shape[0], neurons)).at[:, idx].add(g))(indices, listed)
    hidden = jnp.where(in_set[:, None, :], coefficient * up, 0.0)
    y = jnp.einsum("glf,fm->glm", hidden, w_down.astype(jnp.float32), precision=_HIGHEST)
    return y.astype(x.dtype)
