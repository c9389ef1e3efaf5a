"""How evenly and how sparsely an MoE layer routes: expert load and its imbalance."""

from __future__ import annotations

import jax.numpy as jnp

from jaxsparse.moe.routing import Routing


def expert_load(routing: Routing):
    """int32 ``[E]``: slots (token, expert pairs with nonzero weight) routed to each expert."""
    return jnp.sum(routing.active(), axis=0, dtype=jnp.int32)


def load_imbalance(load):
    """``(coefficient of variation, max / mean)`` of an expert load ``[E]``: 0 and 1 when balanced."""
    load = jnp.asarray(load, jnp.float32)
    mean = jnp.maximum(jnp.mean(load), 1e-9)
    return jnp.std(load) / mean, jnp.max(load) / mean
