"""Sending tokens to their experts and back: capacity buffers (tokens may drop) or dropless sorting.

Both compute ``y_n = sum over the slots of token n of weight * FFN_e(x_n)`` with per-expert FFNs
``FFN_e(x) = (act(x W_gate[e]) * (x W_up[e])) W_down[e]`` (or ``act(x W_up[e]) W_down[e]`` without a
gate), and report the load and the dropped slots.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxsparse.moe.routing import Routing
from jaxsparse.ops.activations import get_activation
from jaxsparse.ops.grouped_matmul import grouped_matmul


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DispatchStats:
    """What a dispatch did. ``expert_load`` int32 ``[E]``: routed slots per expert (before drops);
    ``dropped`` int32: slots over capacity (0 when dropless); ``routed`` int32: slots with weight."""

    expert_load: jax.Array
    dropped: jax.Array
    routed: jax.Array

    @property
    def dropped_share(self) -> jax.Array:
        """``sum_e max(0, n_e - C) / (routed slots)``."""
        return self.dropped / jnp.maximum(self.routed, 1)


def capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
    """``C = ceil(capacity_factor * k * N / E)`` slots per expert (at least 1)."""
    return max(1, -(-int(capacity_factor * k * num_tokens) // num_experts))


def check_moe_args(x, routing: Routing, w_gate, w_up, w_down) -> None:
    """Raises ValueError (naming the argument) unless x and the expert weights fit the routing."""
    if x.ndim != 2 or routing.expert_index.shape[0] != x.shape[0]:
        raise ValueError(f"x must be [N, M] with N = {routing.expert_index.shape[0]} (the routed tokens), got {x.shape}")
    experts, model_dim = routing.num_experts, x.shape[1]
    if w_up.ndim != 3 or w_up.shape[:2] != (experts, model_dim):
        raise ValueError(f"w_up must be [E, M, F] = [{experts}, {model_dim}, F], got {w_up.shape}")
    hidden = w_up.shape[2]
    if w_gate is not None and w_gate.shape != w_up.shape:
        raise ValueError(f"w_gate must be [E, M, F] = {w_up.shape}, got {w_gate.shape}")
    if w_down.shape != (experts, hidden, model_dim):
        raise ValueError(f"w_down must be [E, F, M] = [{experts}, {hidden}, {model_dim}], got {w_down.shape}")


def _slots(routing: Routing):
    """Flat slot arrays: expert, weight, token, and whether the slot is routed (weight != 0)."""
    tokens, k = routing.expert_index.shape
    expert = routing.expert_index.reshape(-1)
    weight = routing.expert_weight.reshape(-1)
    token = jnp.repeat(jnp.arange(tokens, dtype=jnp.int32), k)
    return expert, weight, token, weight != 0


def moe_ffn(x, routing: Routing, w_up, w_down, *, w_gate=None, activation="silu", capacity_factor: float = 0.0,
            implementation: str | None = None):
    """The routed expert FFNs of an MoE layer, combined with the routing weights.

    Args:
      x: ``[N, M]``.
      routing: from a router of :mod:`jaxsparse.moe.routing` on the same N tokens.
      w_up: ``[E, M, F]``; w_down: ``[E, F, M]``; w_gate: ``[E, M, F]`` or None (ungated experts).
      activation: name or callable (``"silu"`` for SwiGLU experts).
      capacity_factor: > 0: each expert takes at most ``C = ceil(cf * k * N / E)`` slots (GShard
        order: every token's first choice before any second choice, tokens in order); the rest
        are dropped and counted. <= 0: dropless (sort by expert, :func:`grouped_matmul`).
      implementation: the grouped matmul backend for the dropless path.

    Returns:
      ``(y [N, M] in x's dtype, DispatchStats)``.
    """
    x = jnp.asarray(x)
    check_moe_args(x, routing, w_gate, w_up, w_down)
    act = get_activation(activation)
    if capacity_factor > 0:
        return _capacity_ffn(x, routing, w_gate, w_up, w_down, act, capacity_factor)
    return _dropless_ffn(x, routing, w_gate, w_up, w_down, act, implementation)


def dispatch_stats(routing: Routing, dropped) -> DispatchStats:
    """The load of ``routing`` and the ``dropped`` slot count as :class:`DispatchStats`."""
    expert, _, _, routed = _slots(routing)
    load = jnp.zeros(routing.num_experts, jnp.int32).at[expert].add(routed.astype(jnp.int32))
    return DispatchStats(expert_load=load, dropped=jnp.asarray(dropped, jnp.int32), routed=jnp.sum(routed, dtype=jnp.int32))


def _dropless_ffn(x, routing, w_gate, w_up, w_down, act, implementation):
    expert, weight, token, routed = _slots(routing)
    experts = routing.num_experts
    order = jnp.argsort(jnp.where(routed, expert, experts), stable=True)  # unrouted slots last: padding rows
    group_sizes = jnp.zeros(experts, jnp.int32).at[expert].add(routed.astype(jnp.int32))
    sorted_token = token[order]
    rows = x[sorted_token]
    gmm = lambda a, w: grouped_matmul(a, w, group_sizes, implementation=implementation)  # noqa: E731
    up = gmm(rows, w_up)
    hidden = act(up) if w_gate is None else act(gmm(rows, w_gate)) * up
    out = gmm(hidden.astype(x.dtype), w_down)
    contribution = out.astype(jnp.float32) * jnp.where(routed, weight, 0.0)[order][:, None]
    y = jax.ops.segment_sum(contribution, sorted_token, num_segments=x.shape[0])
    return y.astype(x.dtype), dispatch_stats(routing, 0)


def _capacity_ffn(x, routing, w_gate, w_up, w_down, act, capacity_factor):
    slots_per_expert = capacity(routing.expert_index.shape[0], routing.expert_index.shape[1], routing.num_experts,
                                capacity_factor)
    buffer, plan = capacity_buffers(x, routing, slots_per_expert)
    y = combine_buffers(expert_ffn(buffer, w_gate, w_up, w_down, act), plan, x.shape[0], x.dtype)
    return y, dispatch_stats(routing, plan.dropped)


class CapacityPlan(NamedTuple):
    """Where each of the ``k * N`` slots went, in GShard priority order (slot rank, then token).

    ``expert`` / ``slot`` / ``token`` int32 ``[k * N]`` (``slot == C`` for a dropped or unrouted slot);
    ``weight`` float32 ``[k * N]``, the combine weight, 0 where not kept; ``dropped`` int32 scalar.
    """

    expert: jax.Array
    slot: jax.Array
    token: jax.Array
    weight: jax.Array
    dropped: jax.Array


def capacity_buffers(x, routing: Routing, slots_per_expert: int):
    """``x [N, M]`` -> ``(buffer [E, C, M] in x's dtype, CapacityPlan)``; zero rows where unfilled."""
    tokens, k = routing.expert_index.shape
    experts = routing.num_experts
    # GShard priority: slot rank first (all first choices, then all second choices), then token order.
    expert = routing.expert_index.T.reshape(-1)
    weight = routing.expert_weight.T.reshape(-1)
    token = jnp.tile(jnp.arange(tokens, dtype=jnp.int32), k)
    routed = weight != 0
    one_hot = jax.nn.one_hot(expert, experts, dtype=jnp.int32) * routed[:, None].astype(jnp.int32)
    position = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=-1)
    kept = routed & (position < slots_per_expert)
    slot = jnp.where(kept, position, slots_per_expert)  # out of range: dropped by the scatter
    buffer = jnp.zeros((experts, slots_per_expert, x.shape[1]), x.dtype).at[expert, slot].set(x[token], mode="drop")
    plan = CapacityPlan(expert=expert, slot=slot, token=token, weight=jnp.where(kept, weight, 0.0),
                         dropped=jnp.sum(routed & ~kept, dtype=jnp.int32))
    return buffer, plan


def expert_ffn(buffer, w_gate, w_up, w_down, act):
    """``buffer [E, R, M]`` through expert e's FFN per row group e -> float32 ``[E, R, M]``."""
    einsum = lambda spec, a, w: jnp.einsum(spec, a, w, preferred_element_type=jnp.float32)  # noqa: E731
    up = einsum("ecm,emf->ecf", buffer, w_up)
    hidden = act(up) if w_gate is None else act(einsum("ecm,emf->ecf", buffer, w_gate)) * up
    return einsum("ecf,efm->ecm", hidden.astype(buffer.dtype), w_down)


def combine_buffers(out, plan: CapacityPlan, num_tokens: int, dtype):
    """``out [E, C, M]`` (float32) -> ``y [N, M]`` in ``dtype``: ``y_n = sum of weight * out[e, slot]``."""
    gathered = out.at[plan.expert, plan.slot].get(mode="fill", fill_value=0.0)  # [k * N, M]
    y = jax.ops.segment_sum(gathered * plan.weight[:, None], plan.token, num_segments=num_tokens)
    return y.astype(dtype)
