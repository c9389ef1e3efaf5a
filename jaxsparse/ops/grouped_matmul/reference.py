"""The spec of the grouped matmul: every group against every row, masked (E times a dense matmul)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def _row_groups(group_sizes, num_rows):
    """int32 ``[N]``: each row's group, E for padding rows past the sum of the sizes."""
    ends = jnp.cumsum(group_sizes)
    return jnp.searchsorted(ends, jnp.arange(num_rows), side="right")


def grouped_matmul(x, w, group_sizes, *, transpose_rhs: bool = False):
    """``y[rows of e] = x[rows of e] @ w[e]`` (``w[e].T`` when ``transpose_rhs``); padding rows 0."""
    if transpose_rhs:
        w = jnp.swapaxes(w, 1, 2)
    one_hot = jax.nn.one_hot(_row_groups(group_sizes, x.shape[0]), w.shape[0], dtype=jnp.float32)  # [N, E]
    every = jnp.einsum("nk,ekf->nef", x.astype(jnp.float32), w.astype(jnp.float32), precision=_HIGHEST)
    return jnp.einsum("ne,nef->nf", one_hot, every, precision=_HIGHEST).astype(x.dtype)


def transposed_grouped_matmul(x, dy, group_sizes):
    """``dw[e] = x[rows of e].T @ dy[rows of e]``, ``[E, K, F]``; empty groups give zeros."""
    one_hot = jax.nn.one_hot(_row_groups(group_sizes, x.shape[0]), group_sizes.shape[0], dtype=jnp.float32)
    return jnp.einsum("ne,nk,nf->ekf", one_hot, x.astype(jnp.float32), dy.astype(jnp.float32),
                      precision=_HIGHEST).astype(x.dtype)
