"""MoE routers as pure functions: each returns a :class:`Routing` with the chosen experts, their
weights, and the router values the losses need.

Every router returns ``k`` slots per token (``expert_index``, ``expert_weight``); routers that pick
a variable number of experts (expert choice, BlockFFN) use ``k = E`` slots with weight 0 for the
experts a token does not use, and dispatch skips zero-weight slots. Routers run in float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

RENORMALIZE = ("none", "sum")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Routing:
    """Routing decisions for N tokens over E experts.

    Attributes:
      expert_index: int32 ``[N, k]``, the expert of each slot.
      expert_weight: float32 ``[N, k]``, the combine weight of each slot; 0 means the slot is unused.
      router_probs: float32 ``[N, E]``, the router's probabilities (softmax; sigmoid scores;
        BlockFFN's normalised activations divided by their sum), for the balance loss and metrics.
      router_logits: float32 ``[N, E]``, pre-activation router outputs, for the z-loss.
    """

    expert_index: jax.Array
    expert_weight: jax.Array
    router_probs: jax.Array
    router_logits: jax.Array

    @property
    def num_experts(self) -> int:
        return self.router_logits.shape[-1]

    def dense_weights(self) -> jax.Array:
        """float32 ``[N, E]``: each token's combine weight per expert (0 where not routed)."""
        one_hot = jax.nn.one_hot(self.expert_index, self.num_experts, dtype=jnp.float32)
        return jnp.einsum("nk,nke->ne", self.expert_weight, one_hot)

    def active(self) -> jax.Array:
        """bool ``[N, E]``: which experts each token uses."""
        return self.dense_weights() != 0


def _check_logits(logits):
    logits = jnp.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"router logits must be [N, E], got shape {logits.shape}")
    return logits.astype(jnp.float32)


def check_k(k, num_experts: int) -> None:
    """Raises ValueError unless ``k`` (experts per token) is an integer in ``[1, E]``."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_experts:
        raise ValueError(f"k must be an integer in [1, {num_experts}] (the number of experts E), got {k!r}")


def _from_dense(weights, probs, logits) -> Routing:
    tokens, experts = weights.shape
    index = jnp.broadcast_to(jnp.arange(experts, dtype=jnp.int32), (tokens, experts))
    return Routing(expert_index=index, expert_weight=weights, router_probs=probs, router_logits=logits)


def jitter(x, key, noise: float):
    """Multiplicative router input jitter (Switch Transformer): ``x * uniform(1 - noise, 1 + noise)``."""
    return x * jax.random.uniform(key, x.shape, x.dtype, 1.0 - noise, 1.0 + noise)


def top_k_router(logits, k: int, *, renormalize: str = "sum") -> Routing:
    """Top-k softmax routing (Switch for k = 1, GShard / Mixtral for k = 2).

    ``p = softmax(logits)``; each token keeps its k largest ``p``; ``renormalize="sum"`` divides the
    kept weights by their sum (Mixtral), ``"none"`` keeps the raw probabilities (Switch, GShard).

    Args:
      logits: ``[N, E]`` router outputs ``x W_r`` (cast to float32).
      k: experts per token, in ``[1, E]``.
      renormalize: ``"sum"`` or ``"none"``.

    Raises:
      ValueError: ``k`` outside ``[1, E]``, an unknown ``renormalize``, logits not ``[N, E]``.
    """
    logits = _check_logits(logits)
    check_k(k, logits.shape[-1])
    if renormalize not in RENORMALIZE:
        raise ValueError(f"renormalize must be one of {RENORMALIZE}, got {renormalize!r}")
    probs = jax.nn.softmax(logits, axis=-1)
    weight, index = lax.top_k(probs, k)
    if renormalize == "sum":
        weight = weight / jnp.sum(weight, axis=-1, keepdims=True)
    return Routing(expert_index=index.astype(jnp.int32), expert_weight=weight, router_probs=probs, router_logits=logits)


def expert_choice_router(logits, capacity_factor: float) -> Routing:
    """Expert choice (Zhou et al. 2022): each expert takes its top ``C = ceil(N * c / E)`` tokens.

    ``S = softmax(logits)`` over experts; expert e selects the C tokens with the largest ``S[:, e]``
    and weights them by ``S``. A token may get 0..E experts (returned as E slots, 0 = unused).
    Not causal: an expert's choice depends on every token of the batch (training and prefill).

    Raises:
      ValueError: ``capacity_factor <= 0`` or logits not ``[N, E]``.
    """
    logits = _check_logits(logits)
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0 for expert choice, got {capacity_factor!r}")
    tokens, experts = logits.shape
    capacity = min(tokens, -(-int(tokens * capacity_factor) // experts))
    probs = jax.nn.softmax(logits, axis=-1)
    _, chosen = lax.top_k(probs.T, capacity)  # [E, C] token ids
    picked = jnp.zeros((experts, tokens), bool).at[jnp.arange(experts)[:, None], chosen].set(True).T
    return _from_dense(jnp.where(picked, probs, 0.0), probs, logits)


def sigmoid_bias_router(logits, bias, k: int) -> Routing:
    """Auxiliary-loss-free routing (DeepSeek-V3): select by ``sigmoid(logits) + bias``, weight by the
    normalised sigmoid scores of the selected experts.

    ``s = sigmoid(logits)``; experts = top-k of ``s + bias`` (bias only steers selection);
    weights = ``s`` of those experts divided by their sum. Update ``bias`` between steps with
    :func:`update_router_bias`.

    Args:
      logits: ``[N, E]``.
      bias: ``[E]`` float32 routing bias (no gradient flows into it).
      k: experts per token, in ``[1, E]``.
    """
    logits = _check_logits(logits)
    check_k(k, logits.shape[-1])
    bias = jnp.asarray(bias, jnp.float32)
    if bias.shape != logits.shape[-1:]:
        raise ValueError(f"bias must be [E] = [{logits.shape[-1]}], got shape {bias.shape}")
    scores = jax.nn.sigmoid(logits)
    _, index = lax.top_k(scores + lax.stop_gradient(bias), k)
    weight = jnp.take_along_axis(scores, index, axis=-1)
    weight = weight / jnp.sum(weight, axis=-1, keepdims=True)
    return Routing(expert_index=index.astype(jnp.int32), expert_weight=weight, router_probs=scores, router_logits=logits)


def update_router_bias(bias, expert_load, rate: float = 1e-3):
    """DeepSeek-V3's bias update: ``b_e -= rate * sign(load_e - mean(load))``, no gradient.

    Args:
      bias: ``[E]``.
      expert_load: ``[E]`` tokens (or slots) routed to each expert in the last step.
      rate: the update speed gamma (DeepSeek-V3: 1e-3).

    Returns:
      The new bias ``[E]`` float32.
    """
    load = jnp.asarray(expert_load, jnp.float32)
    return lax.stop_gradient(jnp.asarray(bias, jnp.float32) - rate * jnp.sign(load - jnp.mean(load)))


def blockffn_router(logits, *, gain=None, eps: float = 1e-6) -> Routing:
    """BlockFFN routing (Song et al. 2025): ReLU, then RMSNorm over experts; a variable number of experts.

    ``A = relu(logits)``; ``R = A / sqrt(mean_e A_e^2 + eps)`` (times ``gain`` ``[E]`` if given); the
    token uses every expert with ``R_e > 0`` with weight ``R_e`` (E slots, 0 = unused).
    ``router_probs`` is ``R / sum_e R`` (0 for a token with no active expert), which the
    chunk-sparsification loss uses.
    """
    logits = _check_logits(logits)
    active = jax.nn.relu(logits)
    weights = active * lax.rsqrt(jnp.mean(jnp.square(active), axis=-1, keepdims=True) + eps)
    if gain is not None:
        weights = weights * jnp.asarray(gain, jnp.float32)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    probs = jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 0.0)
    return _from_dense(weights, probs, logits)
