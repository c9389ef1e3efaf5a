"""Routers against hand-written numpy references."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxsparse.moe import blockffn_router, expert_choice_router, sigmoid_bias_router, top_k_router, update_router_bias
from jaxsparse.testing import random_normal


def _softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _dense(routing):
    return np.asarray(routing.dense_weights(), np.float64)


LOGITS = random_normal(jax.random.key(0), (24, 8))


@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("renormalize", ["none", "sum"])
def test_top_k_router(k, renormalize):
    routing = jax.jit(top_k_router, static_argnums=1, static_argnames="renormalize")(LOGITS, k, renormalize=renormalize)
    p = _softmax(LOGITS)
    expected = np.zeros_like(p)
    for n, row in enumerate(p):
        chosen = np.argsort(-row)[:k]
        expected[n, chosen] = row[chosen] / (row[chosen].sum() if renormalize == "sum" else 1.0)
    np.testing.assert_allclose(_dense(routing), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(routing.router_probs), p, rtol=1e-5)


def test_expert_choice_router():
    routing = expert_choice_router(LOGITS, capacity_factor=2.0)
    p = _softmax(LOGITS)
    capacity = int(np.ceil(24 * 2.0 / 8))
    expected = np.zeros_like(p)
    for e in range(8):
        chosen = np.argsort(-p[:, e])[:capacity]
        expected[chosen, e] = p[chosen, e]
    np.testing.assert_allclose(_dense(routing), expected, rtol=1e-5, atol=1e-6)
    assert np.all((_dense(routing) != 0).sum(0) == capacity)  # every expert exactly full


def test_sigmoid_bias_router_selects_with_bias_and_weights_without():
    bias = jnp.asarray([5.0, 0, 0, 0, 0, 0, 0, -5.0])
    routing = sigmoid_bias_router(LOGITS, bias, 2)
    s = 1 / (1 + np.exp(-np.asarray(LOGITS, np.float64)))
    expected = np.zeros_like(s)
    for n, row in enumerate(s):
        chosen = np.argsort(-(row + np.asarray(bias)))[:2]
        expected[n, chosen] = row[chosen] / row[chosen].sum()
    np.testing.assert_allclose(_dense(routing), expected, rtol=1e-5, atol=1e-6)
    assert np.all(_dense(routing)[:, 0] > 0) and np.all(_dense(routing)[:, 7] == 0)


def test_router_bias_update_moves_against_load():
    new = update_router_bias(jnp.zeros(4), jnp.asarray([10, 2, 6, 6]), rate=0.01)
    np.testing.assert_allclose(np.asarray(new), [-0.01, 0.01, 0.0, 0.0])


def test_blockffn_router():
    gain = jnp.linspace(0.5, 1.5, 8)
    routing = blockffn_router(LOGITS, gain=gain)
    a = np.maximum(np.asarray(LOGITS, np.float64), 0)
    r = a / np.sqrt((a**2).mean(-1, keepdims=True) + 1e-6) * np.asarray(gain)
    np.testing.assert_allclose(_dense(routing), r, rtol=1e-5, atol=1e-6)
    total = r.sum(-1, keepdims=True)
    expected_probs = np.divide(r, total, out=np.zeros_like(r), where=total > 0)  # a token with no expert: 0
    np.testing.assert_allclose(np.asarray(routing.router_probs), expected_probs, rtol=1e-5, atol=1e-6)
    counts = (r > 0).sum(-1)
    assert counts.min() < counts.max()  # a variable number of experts per token


def test_router_gradients_are_finite_and_flow():
    grads = jax.grad(lambda z: jnp.sum(top_k_router(z, 2).expert_weight * jnp.arange(2.0)))(LOGITS)
    assert np.all(np.isfinite(np.asarray(grads))) and np.any(np.asarray(grads) != 0)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: top_k_router(LOGITS, 0), "k must be"),
        (lambda: top_k_router(LOGITS, 9), "k must be"),
        (lambda: top_k_router(LOGITS, 2, renormalize="softmax"), "renormalize must be"),
        (lambda: top_k_router(LOGITS[0], 1), r"router logits must be \[N, E\]"),
        (lambda: expert_choice_router(LOGITS, 0.0), "capacity_factor must be > 0"),
        (lambda: sigmoid_bias_router(LOGITS, jnp.zeros(7), 2), "bias must be"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()
