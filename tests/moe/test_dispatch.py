"""MoE dispatch: dropless equals a per-token loop, capacity drops exactly the formula's slots,
one expert with unlimited capacity equals the dense FFN."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxsparse.moe import blockffn_router, capacity, moe_ffn, top_k_router
from jaxsparse.testing import assert_allclose, random_normal

N, M, F, E = 48, 16, 24, 4


def _weights(seed, experts=E):
    keys = jax.random.split(jax.random.key(seed), 4)
    return (random_normal(keys[0], (experts, M, F), scale=M**-0.5), random_normal(keys[1], (experts, M, F), scale=M**-0.5),
            random_normal(keys[2], (experts, F, M), scale=F**-0.5), random_normal(keys[3], (N, M)))


def _loop(x, routing, w_gate, w_up, w_down):
    """float64 per-token, per-slot loop over SwiGLU experts."""
    x, w_gate, w_up, w_down = (np.asarray(a, np.float64) for a in (x, w_gate, w_up, w_down))
    silu = lambda z: z / (1 + np.exp(-z))  # noqa: E731
    y = np.zeros_like(x)
    for n in range(x.shape[0]):
        for e, weight in zip(np.asarray(routing.expert_index[n]), np.asarray(routing.expert_weight[n])):
            if weight != 0:
                y[n] += weight * ((silu(x[n] @ w_gate[e]) * (x[n] @ w_up[e])) @ w_down[e])
    return y


@pytest.mark.parametrize("router", ["top2", "blockffn"])
@pytest.mark.parametrize("capacity_factor", [0.0, 100.0])
def test_matches_per_token_loop(router, capacity_factor):
    w_gate, w_up, w_down, x = _weights(0)
    logits = x @ random_normal(jax.random.key(1), (M, E))
    routing = top_k_router(logits, 2) if router == "top2" else blockffn_router(logits)
    y, stats = jax.jit(lambda: moe_ffn(x, routing, w_up, w_down, w_gate=w_gate, capacity_factor=capacity_factor))()
    assert_allclose(y, _loop(x, routing, w_gate, w_up, w_down), dtype=jnp.float32)
    assert int(stats.dropped) == 0
    np.testing.assert_array_equal(np.asarray(stats.expert_load), np.asarray(routing.active()).sum(0))


def test_dropless_gradients_match_capacity_gradients():
    w_gate, w_up, w_down, x = _weights(2)
    router = random_normal(jax.random.key(3), (M, E))

    def loss(params, capacity_factor):
        w_gate, w_up, w_down, router, x = params
        routing = top_k_router(x @ router, 2)
        return jnp.sum(jnp.sin(moe_ffn(x, routing, w_up, w_down, w_gate=w_gate, capacity_factor=capacity_factor)[0]))

    params = (w_gate, w_up, w_down, router, x)
    grads = jax.jit(lambda p: (jax.grad(loss)(p, 0.0), jax.grad(loss)(p, 100.0)))(params)
    assert_allclose(grads[0], grads[1], kind="gradient")


def test_capacity_drops_exactly_the_formula_slots():
    w_gate, w_up, w_down, x = _weights(4)
    logits = jnp.zeros((N, E)).at[:, 0].set(3.0).at[:, 1].set(2.0) + 0.01 * random_normal(jax.random.key(5), (N, E))
    routing = top_k_router(logits, 2)  # every token: expert 0 first, expert 1 second
    slots = capacity(N, 2, E, 1.0)
    y, stats = moe_ffn(x, routing, w_up, w_down, w_gate=w_gate, capacity_factor=1.0)
    assert slots == 24 and int(stats.dropped) == 2 * (N - slots)
    np.testing.assert_allclose(float(stats.dropped_share), 2 * (N - slots) / (2 * N))
    # GShard order: the first 24 tokens keep both experts, the rest keep none.
    kept = _loop(x[:slots], top_k_router(logits[:slots], 2), w_gate, w_up, w_down)
    assert_allclose(y[:slots], kept, dtype=jnp.float32)
    assert np.all(np.asarray(y[slots:]) == 0)


def test_one_expert_with_unlimited_capacity_is_the_dense_ffn():
    w_gate, w_up, w_down, x = _weights(6, experts=1)
    routing = top_k_router(jnp.zeros((N, 1)), 1)
    dense = (jax.nn.silu(x @ w_gate[0]) * (x @ w_up[0])) @ w_down[0]
    for capacity_factor in (0.0, 1.0):
        y, _ = moe_ffn(x, routing, w_up, w_down, w_gate=w_gate, capacity_factor=capacity_factor)
        assert_allclose(y, dense)


def test_shape_errors():
    w_gate, w_up, w_down, x = _weights(7)
    routing = top_k_router(x @ jnp.ones((M, E)), 1)
    with pytest.raises(ValueError, match="w_down must be"):
        moe_ffn(x, routing, w_up, w_up, w_gate=w_gate)
    with pytest.raises(ValueError, match="x must be"):
        moe_ffn(x[:5], routing, w_up, w_down)
    with pytest.raises(ValueError, match="w_up must be"):
        moe_ffn(x, routing, w_up[:2], w_down)
