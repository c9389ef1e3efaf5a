"""The custom VJP shared by the block-sparse backends.

A backend provides two functions in the internal layout (q ``[B, H, Tp, D]``, k and v
``[B, K, Sp, D]``, padded to whole blocks; bias ``[Bb, Hb, Tp, Sp]`` or None):

* ``forward(q, k, v, bias, block_mask, *, scale, softcap) -> (out, lse)``
* ``backward(q, k, v, bias, block_mask, out, lse, d_out, delta, *, scale, softcap)
  -> (dq, dk, dv, dbias)``

Residuals are the inputs plus the output and the row statistics (logsumexp). ``delta`` is the flash
attention row term ``rowsum(dO * O)`` minus the cotangent of ``lse``, which folds a gradient through
the returned logsumexp into the same backward pass: ``dS = P * (dP - delta)``.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp


def differentiable(forward: Callable, backward: Callable) -> Callable:
    """``attend(q, k, v, bias, block_mask, scale, softcap) -> (out, lse)`` with a custom VJP."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
    def attend(q, k, v, bias, block_mask, scale, softcap):
        return forward(q, k, v, bias, block_mask, scale=scale, softcap=softcap)

    def attend_forward(q, k, v, bias, block_mask, scale, softcap):
        out, lse = forward(q, k, v, bias, block_mask, scale=scale, softcap=softcap)
        return (out, lse), (q, k, v, bias, block_mask, out, lse)

    def attend_backward(scale, softcap, residuals, cotangents):
        q, k, v, bias, block_mask, out, lse = residuals
        d_out, d_lse = cotangents
        delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1) - d_lse
        dq, dk, dv, dbias = backward(
            q, k, v, bias, block_mask, out, lse, d_out, delta, scale=scale, softcap=softcap
        )
        return dq, dk, dv, dbias, None

    attend.defvjp(attend_forward, attend_backward)
    return attend
