"""Attention of one (q shard, kv shard) pair of a ring step, per implementation, and the merge of partials.

Every ring variant computes, on each device and ring step, block-sparse attention between the
queries it holds and the keys/values it holds, in the internal layout of
:mod:`jaxsparse.ops.attention.differentiable` (q ``[B, H, Tp, D]``, k and v ``[B, K, Sp, D]``, padded to
whole blocks), and merges the partial ``(out, lse)`` of the steps by log-sum-exp. A
:class:`PairAttention` bundles an implementation's three entry points:

* ``forward(q, k, v, block_mask, *, scale, softcap) -> (out, lse)``;
* ``backward(q, k, v, block_mask, out, lse, d_out, delta, *, scale, softcap) -> (dq, dk, dv)``, where
  ``out`` and ``lse`` are the row statistics of the *whole* ring (the pair's probabilities are
  ``exp(logits - lse)``) and ``delta = rowsum(dO * O) - d_lse``;
* ``attend(q, k, v, block_mask, *, scale, softcap) -> (out, lse)``, differentiable (for rings whose
  gradients come from autodiff).

They are the backend functions of :mod:`jaxsparse.ops.attention` without the bias (the rings take
none).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from jaxsparse.masks.block_mask import BlockMask
from jaxsparse.ops.attention.api import IMPLEMENTATIONS
from jaxsparse.ops.attention.reference import reference_attention

RING_IMPLEMENTATIONS = ("reference", "xla")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PairAttention:
    """One implementation's per-pair entry points (see the module docstring).

    Attributes:
      forward, backward, attend: the three functions.
    """

    forward: Callable
    backward: Callable
    attend: Callable


def pair_attention(implementation: str | None) -> PairAttention:
    """The per-pair functions of ``implementation`` (None: ``"xla"``).

    Raises:
      ValueError: an unknown implementation name.
      NotImplementedError: ``"pallas_tpu"`` / ``"pallas_gpu"``: their adapters expose only the
        custom-VJP ``attend``, not the separate forward and backward (taking the ring's merged
        ``lse``) that the ring backward needs.
    """
    if implementation is None:
        implementation = "xla"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
    if implementation not in RING_IMPLEMENTATIONS:
        raise NotImplementedError(
            f"implementation={implementation!r} is not supported by the ring attentions: its adapter exposes only the "
            "custom-VJP attend, not the separate forward and backward (with the ring's merged lse) that a ring "
            f"backward needs; use one of {RING_IMPLEMENTATIONS}"
        )
    if implementation == "reference":
        return PairAttention(forward=reference_forward, backward=reference_backward, attend=reference_forward)
    # Attributes are looked up at trace time (tests wrap xla_forward to count the computed pairs).
    module = importlib.import_module("jaxsparse.ops.attention.xla")

    def forward(q, k, v, block_mask, *, scale, softcap):
        return module.xla_forward(q, k, v, None, block_mask, scale=scale, softcap=softcap)

    def backward(q, k, v, block_mask, out, lse, d_out, delta, *, scale, softcap):
        return module.xla_backward(q, k, v, None, block_mask, out, lse, d_out, delta, scale=scale, softcap=softcap)[:3]

    def attend(q, k, v, block_mask, *, scale, softcap):
        return module.attend(q, k, v, None, block_mask, scale, softcap)

    return PairAttention(forward=forward, backward=backward, attend=attend)


def _dense_visible(block_mask: BlockMask, q_padded_len: int, kv_padded_len: int):
    """bool ``[Bm, Hm, Tp, Sp]``: the pair's element visibility, False on padding."""
    visible = block_mask.dense()
    pad = ((0, 0), (0, 0), (0, q_padded_len - block_mask.q_len), (0, kv_padded_len - block_mask.kv_len))
    return jnp.pad(visible, pad)


def reference_forward(q, k, v, block_mask: BlockMask, *, scale, softcap):
    """Dense float32 attention of a pair (materialises ``Tp x Sp``; differentiable by autodiff)."""
    visible = _dense_visible(block_mask, q.shape[2], k.shape[2])
    out, lse = reference_attention(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                                   visible, scale=scale, softcap=softcap)
    return out.transpose(0, 2, 1, 3), lse


def reference_backward(q, k, v, block_mask: BlockMask, out, lse, d_out, delta, *, scale, softcap):
    """Autodiff of the surrogate ``sum(dO * P V) - sum(delta * rowsum P)`` with ``P = exp(logits - lse)``.

    Its gradient with ``lse`` held fixed is the pair's share of the true gradient: the derivative of
    the loss by a logit is ``P * (dP - delta)`` (flash attention's ``dS``), which the surrogate has.
    """
    del out  # folded into delta
    visible = _dense_visible(block_mask, q.shape[2], k.shape[2])
    group = q.shape[1] // k.shape[1]
    safe_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)

    def surrogate(q, k, v):
        k = jnp.repeat(k, group, axis=1).astype(jnp.float32)
        v = jnp.repeat(v, group, axis=1).astype(jnp.float32)
        logits = jnp.einsum("bhtd,bhsd->bhts", q.astype(jnp.float32), k) * scale
        if softcap is not None:
            logits = softcap * jnp.tanh(logits / softcap)
        probs = jnp.where(visible, jnp.exp(jnp.where(visible, logits, 0.0) - safe_lse[..., None]), 0.0)
        values = jnp.einsum("bhts,bhsd->bhtd", probs, v)
        return jnp.sum(d_out.astype(jnp.float32) * values) - jnp.sum(delta * probs.sum(-1))

    grads = jax.grad(surrogate, argnums=(0, 1, 2))(q, k, v)
    return tuple(g.astype(x.dtype) for g, x in zip(grads, (q, k, v)))


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Log-sum-exp merge of two partial attentions over disjoint key sets, in float32.

    ``out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b`` with ``lse = logaddexp(lse_a,
    lse_b)``; rows with ``lse = -inf`` on both sides stay 0 / ``-inf``, with finite (zero) gradients
    (``jnp.logaddexp`` has NaN gradients there).

    Args:
      out_a, out_b: ``[..., T, D]`` (any float dtype).
      lse_a, lse_b: float32 ``[..., T]``.

    Returns:
      ``(out float32 [..., T, D], lse float32 [..., T])``.
    """
    # The result does not depend on the shift: no gradient through it.
    shift = lax.stop_gradient(jnp.maximum(lse_a, lse_b))
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
    weight_a, weight_b = jnp.exp(lse_a - shift), jnp.exp(lse_b - shift)
    total = weight_a + weight_b
    seen = total > 0
    safe_total = jnp.where(seen, total, 1.0)
    out = (weight_a[..., None] * out_a.astype(jnp.float32) + weight_b[..., None] * out_b.astype(jnp.float32))
    lse = jnp.where(seen, shift + jnp.log(safe_total), -jnp.inf)
    return out / safe_total[..., None], lse


def to_internal(x, padded_len: int):
    """Public ``[B, L, N, D]`` -> internal ``[B, N, Lp, D]``, zero-padded along the sequence."""
    if x.shape[1] != padded_len:
        x = jnp.pad(x, ((0, 0), (0, padded_len - x.shape[1]), (0, 0), (0, 0)))
    return x.transpose(0, 2, 1, 3)


def from_internal(x, length: int):
    """Internal ``[B, N, Lp, D]`` -> public ``[B, L, N, D]``, cropping the padding."""
    return x[:, :, :length].transpose(0, 2, 1, 3)
