"""MoE auxiliary losses: load balance, router z-loss, and BlockFFN's locality and chunk losses.

Each returns an unweighted float32 scalar; the caller multiplies by its coefficient (typical values
in the docstrings). Formulas: REFERENCES (MoE).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxsparse.moe.routing import Routing


def load_balance_loss(routing: Routing):
    """Switch / GShard load-balance loss ``E * sum_e f_e * P_e`` (coefficient alpha ~ 1e-2).

    ``f_e``: share of the routed slots (nonzero weight) given to expert e; ``P_e``: mean router
    probability of e over tokens. Equals 1 under perfect balance of both. Gradients flow through P.
    """
    routed = jax.nn.one_hot(routing.expert_index, routing.num_experts, dtype=jnp.float32)
    routed = routed * (routing.expert_weight != 0)[..., None]
    slots_per_expert = jnp.sum(routed, axis=(0, 1))
    share = slots_per_expert / jnp.maximum(jnp.sum(slots_per_expert), 1.0)
    return routing.num_experts * jnp.sum(jax.lax.stop_gradient(share) * jnp.mean(routing.router_probs, axis=0))


def router_z_loss(logits):
    """ST-MoE router z-loss ``mean_t logsumexp_e(z_te)^2`` in float32 (coefficient ~ 1e-3)."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(jnp.asarray(logits, jnp.float32), axis=-1)))


def _same_sequence_neighbours(shape, segment_ids):
    """bool ``[B, T-1]``: token i and i+1 are in the same sequence (and document)."""
    if segment_ids is None:
        return jnp.ones((shape[0], shape[1] - 1), bool)
    segment_ids = jnp.asarray(segment_ids)
    return segment_ids[:, 1:] == segment_ids[:, :-1]


def activation_locality_loss(logits, *, segment_ids=None, sharpness: float = 100.0):
    """BlockFFN activation-locality loss: neighbouring tokens should use the same experts.

    Binary cross-entropy with logit ``s * r_{i-1,e}`` against the target ``sigmoid(s * r_{i,e})`` for
    adjacent tokens of the same sequence, averaged over those pairs and experts (s = ``sharpness``,
    100 in the paper; coefficient 2e-3). Gradients flow through both terms (unconfirmed in the paper).

    Args:
      logits: router outputs ``[B, T, E]`` (before ReLU).
      segment_ids: optional int ``[B, T]``; neighbours in different documents are not compared.
    """
    logits = jnp.asarray(logits, jnp.float32)
    if logits.ndim != 3:
        raise ValueError(f"logits must be [B, T, E], got shape {logits.shape}")
    previous, current = sharpness * logits[:, :-1], sharpness * logits[:, 1:]
    target = jax.nn.sigmoid(current)
    bce = jnp.maximum(previous, 0) - previous * target + jnp.log1p(jnp.exp(-jnp.abs(previous)))
    pairs = _same_sequence_neighbours(logits.shape, segment_ids)
    return jnp.sum(jnp.where(pairs[..., None], bce, 0.0)) / jnp.maximum(jnp.sum(pairs) * logits.shape[-1], 1)


def chunk_sparsification_loss(probs, chunk: int = 64):
    """BlockFFN chunk-sparsification loss: ``mean_{c,e} 1 - prod_{i in c} (1 - p_{i,e})``.

    The probability that expert e is used by at least one token of chunk c, averaged over chunks
    and experts (coefficient 5e-2, see :class:`AdaptiveLossWeight`). A trailing partial chunk counts
    with the tokens it has.

    Args:
      probs: ``[B, T, E]`` per-token expert probabilities (``Routing.router_probs`` of
        :func:`~jaxsparse.moe.routing.blockffn_router`, reshaped).
      chunk: tokens per chunk, a positive int.
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    probs = jnp.asarray(probs, jnp.float32)
    if probs.ndim != 3:
        raise ValueError(f"probs must be [B, T, E], got shape {probs.shape}")
    batch, length, experts = probs.shape
    padded = -(-length // chunk) * chunk
    probs = jnp.pad(probs, ((0, 0), (0, padded - length), (0, 0)))
    log_unused = jnp.sum(jnp.log1p(-jnp.minimum(probs, 1.0 - 1e-7)).reshape(batch, padded // chunk, chunk, experts), axis=2)
    return jnp.mean(1.0 - jnp.exp(log_unused))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdaptiveLossWeight:
    """BlockFFN's adaptive coefficient for the chunk-sparsification loss, as a small pure state.

    The weight starts at ``initial`` and is multiplied by ``growth`` after each step whose loss rose
    above the previous step's, up to ``max_factor * initial`` (the paper raises it at most 4x; the
    exact schedule is unconfirmed). Use ``state = state.update(loss)`` each step and multiply the
    loss by ``state.weight``.
    """

    weight: jax.Array
    previous_loss: jax.Array
    initial: float = dataclasses.field(default=5e-2, metadata=dict(static=True))
    max_factor: float = dataclasses.field(default=4.0, metadata=dict(static=True))
    growth: float = dataclasses.field(default=1.05, metadata=dict(static=True))

    @classmethod
    def create(cls, initial: float = 5e-2, *, max_factor: float = 4.0, growth: float = 1.05) -> "AdaptiveLossWeight":
        return cls(weight=jnp.float32(initial), previous_loss=jnp.float32(jnp.inf), initial=initial,
                   max_factor=max_factor, growth=growth)

    def update(self, loss) -> "AdaptiveLossWeight":
        loss = jax.lax.stop_gradient(jnp.asarray(loss, jnp.float32))
        raised = jnp.minimum(self.weight * self.growth, self.initial * self.max_factor)
        weight = jnp.where(loss > self.previous_loss, raised, self.weight)
        return dataclasses.replace(self, weight=weight, previous_loss=loss)
